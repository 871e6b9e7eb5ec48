"""One trial, from its sampled parameters to its objective values: the memory check, training in this process,
pruning on the evaluations, and trial.json."""

from __future__ import annotations

import datetime as dt
import gc
import logging
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from transformers import TrainerCallback

from colintern.training.arguments import RunConfig
from colintern.tuning.search.memory import MEMORY_CONSTRAINT, MemoryCheck, check_memory
from colintern.tuning.search.settings import OBJECTIVES, SearchSettings
from colintern.tuning.search.space import SearchSpace, describe_params, trial_config
from colintern.tuning.search.storage import WORKER_ATTR, retry_trial, worker_identity
from colintern.utils import ColinternError, atomic_write_json

logger = logging.getLogger(__name__)

TRIAL_RECORD_FILE = "trial.json"
TRIALS_DIR = "trials"
LOGS_DIR = "logs"


def trial_folder(output_dir: Path, number: int) -> Path:
    """trials/trial-NNNN: the trial's run folder (configuration, trainer_state.json, trial.json)."""
    return Path(output_dir) / TRIALS_DIR / f"trial-{number:04d}"


def trial_log_path(output_dir: Path, number: int) -> Path:
    """logs/trial-NNNN.log: the trial's log, outside its run folder (which the trainer owns)."""
    return Path(output_dir) / LOGS_DIR / f"trial-{number:04d}.log"


class TrialLog:
    """The trial's log file: the log records emitted while it trains and, when it fails, the traceback (which the
    console gets in one line)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.handler: logging.FileHandler | None = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()

    def exception(self, number: int, kind: str) -> None:
        """Write the exception being handled, with its traceback, to this file only."""
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "Trial %d failed (%s)", (number, kind),
                                   sys.exc_info())
        self.handler.handle(record)


def _retry_running(trial) -> None:
    """Enqueue the parameters of this (still running) trial once more, as Optuna retries a stale trial."""
    from optuna.trial import TrialState

    frozen = next(t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                  if t.number == trial.number)
    retry_trial(trial.study, frozen)


class TrialFailed(ColinternError):
    """A trial's training failed (NaN loss, out of memory, ...): recorded as failed, the study goes on."""


class OptunaReporter(TrainerCallback):
    """Records each evaluation's metrics, reports the objective to the trial and raises `optuna.TrialPruned` when the
    pruner says so (never at the last step: a finished run is scored, not pruned)."""

    def __init__(self, trial, metric: str, prune: bool):
        self.trial, self.metric, self.prune = trial, metric, prune
        self.last_step: int | None = None
        self.last_metrics: dict = {}
        self.history: list[tuple[int, float]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = dict(metrics or {})
        if self.metric not in metrics:
            hint = ("NDCG@5 needs --retrieval-eval and a retrieval-format --eval-split (corpus/queries/qrels, as "
                    "SynthDocs' validation split); or search on --objective eval_loss." if "ndcg" in self.metric
                    else "Set --eval-split to a held-out split.")
            raise ColinternError(f"The evaluation reported no {self.metric} (got "
                                 f"{', '.join(sorted(metrics)) or 'nothing'}). {hint}")
        value = float(metrics[self.metric])
        self.last_step, self.last_metrics = state.global_step, metrics
        self.history.append((state.global_step, value))
        if not self.prune or not math.isfinite(value):
            return
        self.trial.report(value, state.global_step)
        if state.global_step < state.max_steps and self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric} {value:.4g} at step {state.global_step}")


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_trial(config: RunConfig, reporter: OptunaReporter, callbacks: list | None = None) -> dict:
    """Train one trial's configuration in this process (no checkpoints), evaluate the final model, return its
    metrics plus train_seconds and measured_peak_gib (CUDA). Raises what training raises (TrialPruned included)."""
    import torch

    from colintern.training.trainer import build_trainer

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(config, [reporter, *(callbacks or [])], save_checkpoints=False,
                            validate_resume=False).trainer
    started = time.perf_counter()
    try:
        trainer.train()
        seconds = time.perf_counter() - started
        if reporter.last_step != trainer.state.global_step:
            trainer.evaluate()  # score the final model (the reporter never prunes at the last step)
        metrics = dict(reporter.last_metrics)
        metrics["train_seconds"] = round(seconds, 2)
        if torch.cuda.is_available():
            metrics["measured_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 4)
        return metrics
    finally:
        trainer.save_state()  # trainer_state.json: the trial's curves, also for pruned or failed trials
        del trainer
        _release_memory()


@dataclass
class TrialRunner:
    """The objective function: one trial from sampling to its values."""

    base: RunConfig
    space: SearchSpace
    settings: SearchSettings
    vram_gib: float
    callbacks: list = field(default_factory=list)  # further TrainerCallbacks for every trial
    fatal: ColinternError | None = field(default=None, init=False)  # the configuration error that stopped the study

    def __call__(self, trial):
        settings = self.settings
        trial.set_user_attr(WORKER_ATTR, worker_identity())  # so that its trial runs again if this process dies
        params = self.space.sample(trial)
        config = trial_config(self.base, params)
        trial_dir = trial_folder(settings.output_dir, trial.number)
        config.training.output_dir = str(trial_dir)
        config.training.run_name = f"{settings.study_name}-trial-{trial.number:04d}"
        config.training.resume_from_checkpoint = None
        config.training.overwrite = True  # a trial folder is the study's own: an earlier try there is set aside

        check = check_memory(config, self.vram_gib)
        trial.set_user_attr("estimated_peak_gib", check.estimated_gib)
        trial.set_user_attr("vram_budget_gib", check.budget_gib)
        trial.set_constraint(MEMORY_CONSTRAINT, check.excess_gib)
        if not check.fits:
            reason = (f"infeasible: the memory model predicts {check.estimated_gib:.2f} GiB, over the "
                      f"{check.budget_gib:.2f} GiB usable of {check.vram_gib:g} GiB")
            trial.set_user_attr("infeasible", reason)
            logger.info("Trial %d rejected before training (%s): %s", trial.number, describe_params(params), reason)
            raise optuna.TrialPruned(reason)

        objective = OBJECTIVES[settings.objectives[0]]
        reporter = OptunaReporter(trial, objective.metric, prune=not settings.multi_objective)
        logger.info("Trial %d: %s -> %s", trial.number, describe_params(params), trial_dir)
        record = {"number": trial.number, "params": params, "estimated_peak_gib": check.estimated_gib}
        with TrialLog(trial_log_path(settings.output_dir, trial.number)) as log:
            metrics, failure = self._train(trial, config, trial_dir, record, reporter, log)
        if failure is not None:  # raised outside the handler: no reference to the failed run's frames remains
            raise failure

        values = [self._value(name, metrics, check) for name in settings.objectives]
        trial.set_user_attr("eval_metrics", {k: v for k, v in metrics.items() if k.startswith("eval_")})
        if "measured_peak_gib" in metrics:
            trial.set_user_attr("measured_peak_gib", metrics["measured_peak_gib"])
        trial.set_user_attr("train_seconds", metrics["train_seconds"])
        if not all(math.isfinite(v) for v in values):
            raise self._failed(trial, trial_dir, record, reporter, "nan", ValueError(f"non-finite objective {values}"))
        self._finish(trial, trial_dir, {**record, "values": values, "metrics": metrics}, "complete", reporter)
        return values[0] if len(values) == 1 else values

    def _train(self, trial, config: RunConfig, trial_dir: Path, record: dict, reporter: OptunaReporter,
               log: TrialLog) -> tuple[dict | None, TrialFailed | None]:
        """Train the trial: (metrics, None), or (None, the failure to raise). Pruning, Ctrl-C and errors that are not
        the trial's own propagate."""
        failure: TrialFailed | None = None
        try:
            return train_trial(config, reporter, self.callbacks), None
        except optuna.TrialPruned as pruned:
            self._finish(trial, trial_dir, record, "pruned", reporter, reason=str(pruned))
            raise
        except (KeyboardInterrupt, ColinternError) as error:
            from colintern.training.trainer import NonFiniteLossError

            if isinstance(error, NonFiniteLossError):
                log.exception(trial.number, "nan")
                failure = self._failed(trial, trial_dir, record, reporter, "nan", error)
            else:
                # Ctrl-C, or a configuration problem that would stop every trial: not this trial's result. It runs
                # again first when the study is resumed, and does not count towards --trials meanwhile.
                reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"stopped: {error}"[:500]
                trial.set_user_attr("interrupted", reason)
                _retry_running(trial)
                self._finish(trial, trial_dir, record, "interrupted", reporter, reason=reason)
                if isinstance(error, KeyboardInterrupt):
                    raise
                # the study stops after this trial and run_search raises the error itself (one line, no traceback)
                self.fatal = error
                trial.study.stop()
                failure = TrialFailed(f"trial {trial.number} stopped the study: {error}")
        except Exception as error:  # any training failure fails this trial only
            kind = "out of memory" if "out of memory" in str(error).lower() else "error"
            logger.debug("Trial %d traceback:\n%s", trial.number, traceback.format_exc())
            log.exception(trial.number, kind)
            failure = self._failed(trial, trial_dir, record, reporter, kind, error)
        return None, failure

    @staticmethod
    def _value(name: str, metrics: dict, check: MemoryCheck) -> float:
        objective = OBJECTIVES[name]
        if objective.metric is not None:
            return float(metrics.get(objective.metric, math.nan))
        if name == "memory":
            return float(metrics.get("measured_peak_gib", check.estimated_gib))
        return float(metrics["train_seconds"])

    def _failed(self, trial, trial_dir: Path, record: dict, reporter, kind: str, error: BaseException) -> TrialFailed:
        message = f"{type(error).__name__}: {error}".strip()[:500]
        trial.set_user_attr("failure", kind)
        trial.set_user_attr("error", message)
        self._finish(trial, trial_dir, record, f"failed ({kind})", reporter, reason=message)
        return TrialFailed(f"trial {trial.number} failed ({kind}): {message}")

    @staticmethod
    def _finish(trial, trial_dir: Path, record: dict, status: str, reporter, reason: str | None = None) -> None:
        """trial.json: how the trial ended, written once at its end (a trial folder without it was cut short)."""
        if not trial_dir.is_dir():
            return
        record = {**record, "status": status, "evaluations": reporter.history,
                  "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        if reason:
            record["reason"] = reason
        atomic_write_json(trial_dir / TRIAL_RECORD_FILE, record)


class _ShortTrialFailures(logging.Filter):
    """Optuna logs every failed trial with its traceback; a TrialFailed (whose message says everything) or a Ctrl-C
    needs none."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (TrialFailed, KeyboardInterrupt)):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_trial_failure_tracebacks() -> None:
    """Log failed trials in one line (used by scripts/optuna_optimizer.py)."""
    target = logging.getLogger("optuna.study._optimize")  # the logger optuna reports failed trials on
    if not any(isinstance(f, _ShortTrialFailures) for f in target.filters):
        target.addFilter(_ShortTrialFailures())


