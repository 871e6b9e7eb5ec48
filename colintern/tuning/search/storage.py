"""Where the study lives (SQLite by default, a journal file, or a database URL) and the accounting of its trials
across invocations and workers: which finished trials count, and how the trial of a worker that died runs again.

A worker that dies mid-trial (kill -9, the OOM killer, a lost machine) leaves its trial RUNNING. Two things bring that
configuration back, both through Optuna's `RetryHeartbeatStaleTrialCallback`, which fails the trial and enqueues its
parameters once more (a WAITING trial that the next `ask()` of any worker runs):
- on a database storage, Optuna's heartbeat (`RDBStorage(heartbeat_interval, grace_period,
  heartbeat_stale_trial_callback)`), for a worker on any machine, once the grace period has passed;
- on every storage (the journal file has no heartbeat), `recover_dead_trials`: each trial records its worker (host,
  boot, process id and start time), and a trial whose worker on this machine no longer exists is failed and retried
  at once, when the study resumes and after every trial of a running worker.
A configuration is retried once (`DEAD_WORKER_RETRIES`): one that kills its worker twice counts as failed. The
process check trusts the host name: workers in separate containers that share one host name and one study would need
distinct host names.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from colintern.utils import ColinternError, file_lock

logger = logging.getLogger(__name__)

DEFAULT_STORAGE_FILE = "optuna.db"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
# Optuna's heartbeat on database storages: a running trial records one every HEARTBEAT_SECONDS; one silent for
# GRACE_SECONDS is failed (and retried) by the next worker that starts a trial.
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 180
DEAD_WORKER_RETRIES = 1
WORKER_ATTR = "worker"
# user attributes of a trial that describe how that run went, not the configuration: not carried into its retry
RUN_ATTRS = (WORKER_ATTR, "failure", "error", "interrupted", "infeasible", "eval_metrics", "train_seconds",
             "measured_peak_gib")


@dataclass(frozen=True)
class StorageLocation:
    """--storage resolved: a database URL, or a journal file."""

    url: str | None = None
    journal: Path | None = None

    @property
    def lock_path(self) -> Path | None:
        """A lock file beside a file storage, taken while dead workers' trials are recovered (so that two workers
        never retry the same trial twice); a database server serialises that itself (the row is locked)."""
        if self.journal is not None:
            return self.journal.with_name(f".{self.journal.name}.recover.lock")
        if self.url and self.url.startswith("sqlite:///") and self.url != "sqlite:///:memory:":
            path = Path(self.url.removeprefix("sqlite:///"))
            return path.with_name(f".{path.name}.recover.lock")
        return None

    @property
    def label(self) -> str:
        if self.journal is not None:
            return f"Optuna journal file {self.journal}"
        try:
            from sqlalchemy.engine import make_url

            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - only a label; the URL itself is checked when the storage opens
            return str(self.url)


def resolve_storage(spec: str | None, output_dir: str | Path) -> StorageLocation:
    """None: SQLite in output_dir; a URL (sqlite:///..., postgresql://...); a .db/.sqlite file; any other path: a
    journal file (safe for several workers on one file system)."""
    if spec is None:
        return StorageLocation(url=f"sqlite:///{Path(output_dir) / DEFAULT_STORAGE_FILE}")
    if "://" not in spec:
        path = Path(spec).expanduser()
        if path.suffix in SQLITE_SUFFIXES:
            return StorageLocation(url=f"sqlite:///{path}")
        return StorageLocation(journal=path)
    if spec.startswith("sqlite:///"):
        return StorageLocation(url="sqlite:///" + str(Path(spec.removeprefix("sqlite:///")).expanduser()))
    return StorageLocation(url=spec)


def open_storage(spec: str | None, output_dir: str | Path):
    """An Optuna storage from --storage: SQLite in output_dir by default, a database URL, or a journal file."""
    import sqlalchemy.exc
    from optuna.storages import RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    location = resolve_storage(spec, output_dir)
    logger.info("Storage: %s", location.label)
    if location.journal is not None:
        location.journal.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(location.journal)))
    if location.url.startswith("sqlite:///"):
        Path(location.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(location.url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                              heartbeat_stale_trial_callback=retry_stale_trial)
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.ArgumentError,
            sqlalchemy.exc.OperationalError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ColinternError(f"--storage {location.label}: cannot open it ({first}). Give a database URL "
                             "(sqlite:///study.db, postgresql://user@host/db), a .db file or a journal file path."
                             ) from error


# ------------------------------------------------------------------------------------------------ workers
@cache
def _this_machine() -> tuple[str, str]:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return socket.gethostname(), boot


def _process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from /proc, or None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return fields[0], int(fields[19])


def worker_identity() -> dict:
    """This process as the worker of a trial (recorded in the trial's user attributes)."""
    host, boot = _this_machine()
    state = _process_state(os.getpid())
    return {"host": host, "boot": boot, "pid": os.getpid(), "start": state[1] if state else None}


def worker_is_gone(worker: dict) -> bool:
    """True when `worker` (a worker_identity) ran on this machine and its process no longer exists: exited, a
    zombie, its pid now someone else's, or the machine rebooted since. False when unsure (another machine)."""
    host, boot = _this_machine()
    if not isinstance(worker, dict) or worker.get("host") != host or not isinstance(worker.get("pid"), int):
        return False
    if worker.get("boot") and boot and worker["boot"] != boot:
        return True
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        pass
    state = _process_state(worker["pid"])
    if state is None:
        return False
    return state[0] in ("Z", "X") or (worker.get("start") is not None and state[1] != worker["start"])


# ------------------------------------------------------------------------------------------------ retries
def retry_trial(study, trial: FrozenTrial, max_retry: int | None = None, **user_attrs) -> None:
    """Enqueue `trial`'s parameters once more through Optuna's RetryHeartbeatStaleTrialCallback (which records
    `failed_trial` and `retry_history` in the retry's system attributes and stops after `max_retry` retries), with
    the attributes of that run left out and `retry_of` (the trial it repeats) added."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    trial = copy.deepcopy(trial)
    trial.user_attrs = {**{k: v for k, v in trial.user_attrs.items() if k not in RUN_ATTRS},
                        "retry_of": trial.number, **user_attrs}
    # the constraint is measured again by the rerun (Optuna keeps the first value set)
    trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith("constraints:")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, trial)


def retry_stale_trial(study, trial: FrozenTrial) -> None:
    """The heartbeat's callback: a trial failed for its silent worker runs again (once)."""
    logger.warning("Trial %d: its worker stopped sending heartbeats; the configuration runs again.", trial.number)
    retry_trial(study, trial, max_retry=DEAD_WORKER_RETRIES, retry_reason="heartbeat")


def recover_dead_trials(study, lock_path: Path | None = None) -> list[int]:
    """Fail the RUNNING trials whose worker on this machine is gone and enqueue their configurations again (once).
    Returns the numbers of the trials recovered by this call."""
    dead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if worker_is_gone(t.user_attrs.get(WORKER_ATTR))]
    if not dead:
        return []
    recovered = []
    with file_lock(lock_path) if lock_path is not None else contextlib.nullcontext():
        for stale in dead:
            try:  # fails only if still RUNNING: another worker may have recovered it meanwhile
                failed = study.tell(stale.number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue
            pid = stale.user_attrs[WORKER_ATTR].get("pid")
            logger.warning("Trial %d: its worker (process %s) is gone; the configuration runs again.", stale.number,
                           pid)
            retry_trial(study, failed, max_retry=DEAD_WORKER_RETRIES, retry_reason=f"worker {pid} gone")
            recovered.append(stale.number)
    return recovered


def fail_stale_trials(study) -> None:
    """Optuna's heartbeat check (database storages; a no-op elsewhere), also run before the study decides to stop."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


# ------------------------------------------------------------------------------------------------ accounting
def _retried_numbers(trials) -> set[int]:
    out = set()
    for t in trials:
        out.update(t.system_attrs.get("retry_history", []))
        if t.user_attrs.get("retry_of") is not None:
            out.add(t.user_attrs["retry_of"])
    return out


def counted(study) -> list[FrozenTrial]:
    """Finished trials that count towards n_trials: complete, pruned (infeasible included) and failed, except those
    interrupted by the user or retried after their worker died (their rerun counts instead)."""
    trials = study.get_trials(deepcopy=False)
    retried = _retried_numbers(trials)
    return [t for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
            and not t.user_attrs.get("interrupted") and t.number not in retried]


def counted_trials(study) -> int:
    return len(counted(study))


def in_flight(study) -> int:
    """RUNNING trials of live (or, on other machines, unknown) workers: they will count once they finish."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if not worker_is_gone(t.user_attrs.get(WORKER_ATTR)))


def spent_seconds(study) -> float:
    """Time the study's trials have run, over all invocations and workers (finished trials)."""
    total = 0.0
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start and t.datetime_complete:
            total += (t.datetime_complete - t.datetime_start).total_seconds()
    return total
