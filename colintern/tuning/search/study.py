"""The study: sampler and pruner, creating or resuming it in its storage, and `run_search`."""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import warnings
from typing import Any

import optuna

from colintern.training.arguments import RunConfig, canonical_path
from colintern.tuning.search.memory import bound_batch_size
from colintern.tuning.search.outputs import SearchResult, write_outputs
from colintern.tuning.search.runner import TrialFailed, TrialRunner, trial_log_path
from colintern.tuning.search.settings import OBJECTIVES, SearchSettings
from colintern.tuning.search.space import SearchSpace, describe_params
from colintern.tuning.search.storage import (
    counted,
    counted_trials,
    fail_stale_trials,
    in_flight,
    open_storage,
    recover_dead_trials,
    resolve_storage,
    spent_seconds,
)
from colintern.utils import ColinternError

logger = logging.getLogger(__name__)

# Fields that change where or how a run is logged, not what it learns: ignored when a resumed study's base
# configuration is compared with the one it was created with.
BOOKKEEPING_FIELDS = {
    "training.output_dir", "training.run_name", "training.resume_from_checkpoint", "training.report_to", "training.logging_steps",
    "training.save_steps", "training.save_total_limit", "training.dataloader_num_workers",
}


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's TPE with its randomness seeded per trial (seed + trial number).

    A plain `TPESampler(seed=s)` restarts its random stream in every process: a resumed study would draw its first new
    startup trials exactly as the first invocation did (duplicates), and parallel workers would all draw the same ones.
    Seeding by the trial number, unique in a study, keeps the search reproducible and never repeats itself.
    """

    def __init__(self, seed: int, **tpe_kwargs):
        self.seed, self.tpe_kwargs = seed, tpe_kwargs
        self._samplers: dict[int, optuna.samplers.TPESampler] = {}

    def _for(self, trial) -> optuna.samplers.TPESampler:
        if trial.number not in self._samplers:
            self._samplers[trial.number] = optuna.samplers.TPESampler(seed=self.seed + trial.number, **self.tpe_kwargs)
        return self._samplers[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._samplers.pop(trial.number, None)

    def reseed_rng(self) -> None:  # Optuna calls this on copies for n_jobs > 1; the per-trial seeds stay distinct
        pass


def build_sampler(settings: SearchSettings):

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # multivariate: models the parameters jointly (lr and batch interact); constant_liar: parallel workers do not
        # all sample the same point while the others' trials are running
        return TrialSeededSampler(settings.seed, n_startup_trials=settings.startup_trials, multivariate=True,
                                  constant_liar=True)


def build_pruner(settings: SearchSettings, config: RunConfig):

    if settings.pruner == "none" or settings.multi_objective:
        if settings.multi_objective and settings.pruner != "none":
            logger.info("Multi-objective study: Optuna cannot prune on intermediate values; trials run to the end "
                        "(the memory constraint still rejects configurations before training).")
        return optuna.pruners.NopPruner()
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials,
                                           n_warmup_steps=settings.pruner_warmup_steps)
    # Hyperband over training steps: the first rung at the first evaluation, the last at the end of the run
    steps = config.training.max_steps
    min_resource = config.training.eval_steps or 1
    return optuna.pruners.HyperbandPruner(min_resource=min_resource,
                                          max_resource=steps if steps and steps > 0 else "auto", reduction_factor=3)



def prepare_base(base: RunConfig, settings: SearchSettings, space: SearchSpace) -> tuple[RunConfig, SearchSpace]:
    """The base configuration as every trial starts from it, and the space as it applies to it."""
    base = copy.deepcopy(base)
    base.training.seed = settings.seed
    base.training.resume_from_checkpoint = None
    metrics = {OBJECTIVES[name].metric for name in settings.objectives}
    if "eval_ndcg_at_5" in metrics and not base.training.retrieval_eval:
        logger.info("Objective NDCG@5: turning on --retrieval-eval.")
        base.training.retrieval_eval = True
    if not base.data.eval_split or not base.training.eval_steps:
        raise ColinternError("The search scores each trial on an evaluation: set --eval-split and --eval-steps "
                             "(the steps between the evaluations the pruner sees).")
    if not base.lora.enabled:
        skipped = {p.path for p in space.parameters if p.section == "lora"}
        if skipped:
            logger.info("LoRA is off in the base configuration: not searching %s (add --peft to search them).",
                        ", ".join(sorted(skipped)))
            space = space.without(skipped)
    if not space.parameters:
        raise ColinternError(f"{space.source}: nothing left to search for this configuration")
    return base, space


def _comparable(config: RunConfig, space: SearchSpace) -> dict:
    """The base configuration as far as it decides results: bookkeeping and the searched fields left out."""
    data = config.to_dict()
    data.pop("experiment", None)
    for path in BOOKKEEPING_FIELDS | {p.path for p in space.parameters}:
        section, name = canonical_path(path).split(".", 1)
        data.get(section, {}).pop(name, None)
    return json.loads(json.dumps(data, default=str))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def open_study(settings: SearchSettings, base: RunConfig, space: SearchSpace):
    """Create the study, or load it and check it is the same search (configuration, space, objectives)."""

    storage = open_storage(settings.storage, settings.output_dir)
    identity = {
        "objectives": list(settings.objectives),
        "base_config": _comparable(base, space),
        "search_space": space.to_dict(),
    }
    study = optuna.create_study(
        study_name=settings.study_name, storage=storage, sampler=build_sampler(settings),
        pruner=build_pruner(settings, base), directions=settings.directions, load_if_exists=True,
    )
    stored = study.user_attrs
    if "search" not in stored:
        study.set_user_attr("search", identity)
        study.set_user_attr("created_at", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(settings.metric_names)
        return study
    previous = dict(stored["search"])
    try:  # a study created before the training options took TrainingArguments' names: compared by the new names
        previous["base_config"] = _comparable(RunConfig.from_dict(previous["base_config"]), space)
    except (ColinternError, KeyError, TypeError, AttributeError):
        pass  # compared as stored: the differences are reported below
    problems = _differences(json.loads(json.dumps(previous)), json.loads(json.dumps(identity)))
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ColinternError(
            f"Study '{settings.study_name}' in this storage was created for another search ({shown}). Continue it "
            "with the same configuration, search space and --objective, or start a new one with --study-name."
        )
    return study


def run_search(base: RunConfig, space: SearchSpace, settings: SearchSettings,
               enqueue: list[dict[str, Any]] | None = None, callbacks: list | None = None) -> SearchResult:
    """Run (or continue) the study until it has `settings.n_trials` finished trials or its time budget is spent,
    then write the best parameters, the trials CSV and the plots.

    `enqueue`: parameter sets ({"training.learning_rate": 1e-3, ...}) to run before the sampler's own, e.g. a known baseline
    (skipped when the study already has a trial with exactly those values). `callbacks`: further TrainerCallbacks
    for every trial's Trainer.

    Trials left RUNNING by a dead worker on this machine run again first (`storage.recover_dead_trials`). Raises
    ColinternError when every finished trial of the study failed (after writing the outputs).
    """

    from colintern.tuning.advisor import detect_gpu

    base, space = prepare_base(base, settings, space)
    gpu = detect_gpu(settings.vram_gib)
    if not gpu.detected and settings.vram_gib is None:
        logger.info("No GPU is visible: the batch bound and the memory constraint plan for %.0f GiB (set --vram-gb "
                    "for your GPU).", gpu.vram_gib)
    space, _ = bound_batch_size(base, space, gpu.vram_gib)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(settings, base, space)
    for params in enqueue or []:
        study.enqueue_trial(params, skip_if_exists=True)

    lock = resolve_storage(settings.storage, settings.output_dir).lock_path
    recover_dead_trials(study, lock)  # a killed worker's trial runs again, first
    done = counted_trials(study)
    budget = settings.time_budget_hours * 3600 if settings.time_budget_hours else None
    timeout = None if budget is None else budget - spent_seconds(study)
    before = len(study.trials)
    if done:
        logger.info("Study '%s': %d trial(s) already finished; continuing to %d.", settings.study_name, done,
                    settings.n_trials)
    try:
        if done + in_flight(study) >= settings.n_trials:
            running = in_flight(study)
            logger.info("Study '%s' already has %d finished trials%s (--trials %d): nothing to run; raise --trials to "
                        "continue it.", settings.study_name, done,
                        f" and {running} running in other workers" if running else "", settings.n_trials)
        elif timeout is not None and timeout <= 0:
            logger.info("Study '%s' has used its time budget (%.2f of %.2f h of trial time).", settings.study_name,
                        spent_seconds(study) / 3600, settings.time_budget_hours)
        else:
            def stop_when_done(study, trial) -> None:
                # Not Optuna's MaxTrialsCallback: it counts trials by state, and a retried trial (interrupted, or
                # its worker killed) is FAIL but must not count, its retry does. Other workers' running trials count.
                recover_dead_trials(study, lock)
                fail_stale_trials(study)
                if counted_trials(study) + in_flight(study) >= settings.n_trials:
                    study.stop()
                elif budget is not None and spent_seconds(study) >= budget:
                    logger.info("Time budget of %.2f h spent: stopping.", settings.time_budget_hours)
                    study.stop()

            runner = TrialRunner(base, space, settings, gpu.vram_gib, list(callbacks or []))
            # no n_trials: the study stops when stop_when_done says so (retries of dead workers' trials come on top)
            study.optimize(runner, timeout=timeout, catch=(TrialFailed,), callbacks=[stop_when_done],
                           gc_after_trial=True)
            if runner.fatal is not None:
                raise runner.fatal
    except BaseException:  # Ctrl-C or a configuration error: the outputs still show what the storage holds
        try:
            write_outputs(study, settings, base)
        except Exception as error:  # noqa: BLE001 - never hide the original error
            logger.warning("Could not write the study's outputs: %s", error)
        raise
    outputs = write_outputs(study, settings, base)
    check_not_all_failed(study, settings)
    return SearchResult(study, settings.output_dir, *outputs, ran_trials=len(study.trials) - before)


def check_not_all_failed(study, settings: SearchSettings) -> None:
    """A study whose trials all failed (none complete, none pruned) is an error, naming the first failure and its
    log file: a search that produced nothing must not look like a finished one."""
    from optuna.trial import TrialState

    finished = counted(study)
    if not finished or any(t.state != TrialState.FAIL for t in finished):
        return
    first = min(finished, key=lambda t: t.number)
    if first.user_attrs.get("error"):
        what = f"failed ({first.user_attrs.get('failure', 'error')}): {first.user_attrs['error'].rstrip('.')}"
    else:
        what = "its worker stopped without a result (killed?), also when it ran again"
    log = trial_log_path(settings.output_dir, first.number)
    raise ColinternError(
        f"All {len(finished)} trial(s) of study '{settings.study_name}' failed. The first, trial {first.number} "
        f"({describe_params(first.params)}), {what}. Its log: {log}"
        + ("" if log.is_file() else " (not written)")
    )
