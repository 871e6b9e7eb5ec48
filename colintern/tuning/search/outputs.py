"""What a study writes: optuna_best_params.json (for scripts/train.py --config-from), trials.csv, the PNG plots and
the closing summary."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from colintern.training.arguments import RunConfig, advisor_key
from colintern.tuning.search.settings import SearchSettings
from colintern.tuning.search.space import describe_params
from colintern.tuning.search.storage import DEFAULT_STORAGE_FILE, spent_seconds
from colintern.utils import RUN_CONFIG_FILE, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

BEST_PARAMS_FILE = "optuna_best_params.json"
TRIALS_CSV = "trials.csv"


@dataclass
class SearchResult:
    study: Any
    output_dir: Path
    best_params_path: Path
    trials_csv: Path
    plots: list[Path] = field(default_factory=list)
    ran_trials: int = 0


def _feasible_complete(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if all(v <= 0 for v in t.constraints.values())]


def best_trials(study) -> list:
    """The best trial (single objective) or the Pareto front (multi-objective), feasible complete trials only."""
    if not _feasible_complete(study):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.number)


def best_params_record(study, settings: SearchSettings, base: RunConfig) -> dict:
    """optuna_best_params.json: the advisor keys `scripts/train.py --config-from` reads (learning_rate,
    per_device_train_batch_size, lora_rank, ...), other searched fields in the configuration's sections, then the
    objective values and the study's bookkeeping. Multi-objective: the Pareto trial best at the first objective,
    and the whole front under `optuna.pareto_front`."""
    from optuna.trial import TrialState

    front = best_trials(study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    summary = {
        "study_name": settings.study_name,
        "storage": settings.storage or str(settings.output_dir / DEFAULT_STORAGE_FILE),
        "objectives": dict(zip(settings.metric_names, settings.directions)),
        "trials": {"complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
                   "failed": states.count(TrialState.FAIL), "running": states.count(TrialState.RUNNING),
                   "infeasible": sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("infeasible"))},
        "spent_hours": round(spent_seconds(study) / 3600, 4),
        "base": {"preset": base.preset, "model": base.model.name_or_path, "dataset": base.data.dataset,
                 "max_steps": base.training.max_steps, "epochs": base.training.num_train_epochs, "seed": base.training.seed},
    }
    if not front:
        return {"optuna": {**summary, "best_trial": None, "note": "no feasible trial has completed yet"}}
    direction = 1 if study.directions[0].name == "MAXIMIZE" else -1
    best = max(front, key=lambda t: direction * t.values[0])
    record: dict = {}
    values = dict(best.params)
    if "lora.rank" in values and "lora.alpha" not in values:
        values["lora.alpha"] = values["lora.rank"]  # the rule the trial ran with
    for path, value in values.items():  # the advisor's names first, then the other fields by section
        if advisor_key(path):
            record[advisor_key(path)] = value
    for path, value in values.items():
        if not advisor_key(path):
            section, name = path.split(".", 1)
            record.setdefault(section, {})[name] = value
    record["objective"] = dict(zip(settings.metric_names, best.values))
    preset = f"--preset {base.preset} " if base.preset else ""
    summary.update(
        best_trial=best.number,
        params=best.params,
        eval_metrics=best.user_attrs.get("eval_metrics", {}),
        trial_config=str(Path(settings.output_dir) / "trials" / f"trial-{best.number:04d}" / RUN_CONFIG_FILE),
        train_command=f"python scripts/train.py {preset}--config-from {Path(settings.output_dir) / BEST_PARAMS_FILE}",
    )
    if len(study.directions) > 1:
        summary["pareto_front"] = [
            {"trial": t.number, "values": dict(zip(settings.metric_names, t.values)), "params": t.params}
            for t in front
        ]
    record["optuna"] = summary
    return record


def trials_table(study):
    """The trials as a DataFrame: Optuna's columns (values, params, user attributes, the memory constraint among the
    system attributes, state, durations)."""
    return study.trials_dataframe()


def write_outputs(study, settings: SearchSettings, base: RunConfig) -> tuple[Path, Path, list[Path]]:
    out = Path(settings.output_dir)
    best_path, csv_path = out / BEST_PARAMS_FILE, out / TRIALS_CSV
    atomic_write_json(best_path, best_params_record(study, settings, base))
    atomic_write_text(csv_path, trials_table(study).to_csv(index=False))
    plots = write_plots(study, settings, out)
    logger.info("Wrote %s, %s and %d plot(s) in %s", best_path.name, csv_path.name, len(plots), out)
    return best_path, csv_path, plots


def write_plots(study, settings: SearchSettings, output_dir: Path) -> list[Path]:
    """PNG plots: optimisation history, parameter importances, learning curves (pruning), Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    first = settings.metric_names[0]
    multi = settings.multi_objective
    target = (lambda t: t.values[0]) if multi else None
    plots: dict[str, Any] = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study, target=target, target_name=first),
        "param_importances.png": lambda: ovm.plot_param_importances(study, target=target, target_name=first),
    }
    if not multi:
        plots["intermediate_values.png"] = lambda: ovm.plot_intermediate_values(study)
    else:
        plots["pareto_front.png"] = lambda: ovm.plot_pareto_front(study, target_names=settings.metric_names)
    written = []
    n_complete = len(_feasible_complete(study))
    if n_complete == 0:
        logger.info("No trial has completed yet: no plots.")
        return written
    for name, draw in plots.items():
        if name == "param_importances.png" and n_complete < 2:
            logger.info("%s: needs 2 completed trials.", name)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw()
            figure = _figure_of(axes)
            figure.set_size_inches(9, 5.5)
            figure.suptitle(f"{settings.study_name}: {name.removesuffix('.png').replace('_', ' ')}", fontsize=10)
            figure.tight_layout()
            _save_figure(figure, output_dir / name)
            plt.close(figure)
            written.append(output_dir / name)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:  # e.g. importances of a constant parameter
            logger.warning("%s not drawn: %s", name, error)
            plt.close("all")
    return written


def _figure_of(axes):
    import numpy as np

    if isinstance(axes, np.ndarray):
        return axes.flat[0].figure
    return axes.figure


def _save_figure(figure, path: Path) -> None:
    """Save atomically: a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        figure.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def format_summary(result: SearchResult, settings: SearchSettings) -> str:
    """The closing table: the best trial (or the Pareto front) and where the outputs are."""
    from optuna.trial import TrialState

    study = result.study
    trials = study.get_trials(deepcopy=False)
    count = {state: sum(1 for t in trials if t.state == state) for state in TrialState}
    infeasible = sum(1 for t in trials if t.user_attrs.get("infeasible"))
    lines = [
        (f"Study {settings.study_name}: {len(trials)} trials ({count[TrialState.COMPLETE]} complete, "
        f"{count[TrialState.PRUNED] - infeasible} pruned, {infeasible} rejected by the memory constraint, "
        f"{count[TrialState.FAIL]} failed); {result.ran_trials} run now; {spent_seconds(study) / 60:.1f} min of "
        "trial time in all."),
    ]
    front = best_trials(study)
    if not front:
        lines.append("No feasible trial has completed yet.")
    else:
        header = "Pareto front" if settings.multi_objective else "Best trial"
        lines.append(f"{header}:")
        for t in front:
            values = ", ".join(f"{n} {v:.4g}" for n, v in zip(settings.metric_names, t.values))
            lines.append(f"  trial {t.number}: {values}  |  {describe_params(t.params)}")
    lines += [f"Best parameters: {result.best_params_path}", f"Trials: {result.trials_csv}"]
    lines += [f"Plot: {path}" for path in result.plots]
    return "\n".join(lines)

