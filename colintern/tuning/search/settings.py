"""What the study optimises and how it runs: the objectives and `SearchSettings`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from colintern.utils import ColinternError

PRUNERS = ("median", "hyperband", "none")


@dataclass(frozen=True)
class Objective:
    """One thing the study optimises: an evaluation metric of the final model or a cost of the trial."""

    name: str
    direction: str  # "maximize" or "minimize"
    metric: str | None  # the Trainer's evaluation metric, None for costs measured around training
    description: str


OBJECTIVES: dict[str, Objective] = {
    "ndcg": Objective("ndcg_at_5", "maximize", "eval_ndcg_at_5", "NDCG@5 on the validation split"),
    "eval_loss": Objective("eval_loss", "minimize", "eval_loss", "loss on the evaluation split"),
    "memory": Objective("peak_memory_gib", "minimize", None,
                        "peak memory per device in GiB (measured on CUDA, the memory model's estimate elsewhere)"),
    "time": Objective("train_seconds", "minimize", None, "training time of the trial in seconds"),
}
OBJECTIVE_ALIASES = {"ndcg_at_5": "ndcg", "loss": "eval_loss", "peak_memory": "memory", "train_time": "time"}


def parse_objectives(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """"ndcg" or "ndcg,memory" -> ("ndcg", "memory"); two or more make a multi-objective (Pareto) study."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out = []
    for name in names:
        name = OBJECTIVE_ALIASES.get(name, name)
        if name not in OBJECTIVES:
            raise ColinternError(f"--objective {name!r}: choose from {', '.join(OBJECTIVES)} (comma-separated for a "
                                 "multi-objective study, e.g. ndcg,memory)")
        if name in out:
            raise ColinternError(f"--objective names {name} twice")
        out.append(name)
    if not out:
        raise ColinternError("--objective is empty; use e.g. ndcg or ndcg,memory")
    if OBJECTIVES[out[0]].metric is None:
        raise ColinternError(f"--objective {','.join(out)}: the first objective must be an evaluation metric "
                             "(ndcg or eval_loss); memory and time only make sense next to one")
    return tuple(out)



@dataclass
class SearchSettings:
    """How the study runs (the search space and the base training configuration are separate objects).

    Args:
        output_dir: where the study writes (trials/, optuna_best_params.json, trials.csv, PNG plots, the default
            SQLite storage).
        study_name: the study's name in the storage.
        storage: None (SQLite in output_dir), a database URL (sqlite:///..., postgresql://...), a .db/.sqlite file,
            or any other path: an Optuna journal file (safe for several workers on one file system).
        objectives: keys of OBJECTIVES; two or more make a multi-objective study.
        pruner: "median", "hyperband" or "none" (multi-objective studies cannot prune on intermediate values).
        n_trials: the study's total number of finished trials (those already in the storage count).
        time_budget_hours: the study's total trial time (also counting earlier invocations).
        vram_gib: GPU memory per device for the batch bound and the memory constraint; None: the visible GPU, else
            the advisor's default (16 GiB).
        seed: seeds the sampler (trial n draws with seed + n) and is the training seed of the base configuration.
        startup_trials: random trials before TPE models the results.
        pruner_startup_trials / pruner_warmup_steps: the median pruner waits for this many finished trials, and
            never prunes before this training step.
    """

    output_dir: str | Path
    study_name: str = "colintern"
    storage: str | None = None
    objectives: tuple[str, ...] = ("ndcg",)
    pruner: str = "median"
    n_trials: int = 20
    time_budget_hours: float | None = None
    vram_gib: float | None = None
    seed: int = 42
    startup_trials: int = 10
    pruner_startup_trials: int = 2
    pruner_warmup_steps: int = 0

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)
        self.objectives = parse_objectives(self.objectives)
        if self.pruner not in PRUNERS:
            raise ColinternError(f"--pruner must be one of {', '.join(PRUNERS)}, not {self.pruner!r}")
        if self.n_trials < 1:
            raise ColinternError("--trials must be at least 1")
        if self.time_budget_hours is not None and self.time_budget_hours <= 0:
            raise ColinternError("--time-budget-hours must be positive")
        if self.vram_gib is not None and self.vram_gib <= 0:
            raise ColinternError("--vram-gb must be positive")

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[name].direction for name in self.objectives]

    @property
    def metric_names(self) -> list[str]:
        return [OBJECTIVES[name].name for name in self.objectives]


