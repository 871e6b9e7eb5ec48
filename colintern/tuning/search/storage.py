"""Where the study lives (SQLite by default, a journal file, or a database URL) and the accounting of its trials
across invocations and workers."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import optuna

from colintern.utils import ColinternError

logger = logging.getLogger(__name__)

DEFAULT_STORAGE_FILE = "optuna.db"


def open_storage(spec: str | None, output_dir: str | Path):
    """An Optuna storage from --storage: SQLite in output_dir by default, a database URL, or a journal file."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if spec is None:
        path = Path(output_dir) / DEFAULT_STORAGE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        spec = f"sqlite:///{path}"
    elif "://" not in spec:
        path = Path(spec).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix not in (".db", ".sqlite", ".sqlite3"):
            logger.info("Storage: Optuna journal file %s", path)
            return JournalStorage(JournalFileBackend(str(path)))
        spec = f"sqlite:///{path}"
    elif spec.startswith("sqlite:///"):
        Path(spec.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    logger.info("Storage: %s", spec)
    try:
        # The heartbeat marks the trials of a killed worker as failed (after the grace period) and enqueues them
        # once more, so a crash never leaves a trial "running" forever.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(spec, heartbeat_interval=60, grace_period=180,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError) as error:
        raise ColinternError(f"--storage {spec}: cannot open it ({error})") from error



def counted_trials(study) -> int:
    """Finished trials that count towards n_trials: complete, pruned (infeasible included) and failed, except those
    interrupted by the user or retried after a crashed worker (their rerun counts instead)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} | {t.user_attrs.get("retry_of") for t in trials}
    return sum(
        1 for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        and not t.user_attrs.get("interrupted") and t.number not in retried
    )


def spent_seconds(study) -> float:
    """Time the study's trials have run, over all invocations and workers (finished trials)."""
    total = 0.0
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start and t.datetime_complete:
            total += (t.datetime_complete - t.datetime_start).total_seconds()
    return total


