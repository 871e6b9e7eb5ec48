"""Small shared helpers: atomic file output, locking, logging set-up, errors with a fix."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Package data (installed with the package, so an installed colintern finds them as an editable checkout does).
PACKAGE_DIR = Path(__file__).resolve().parent
PRESETS_DIR = PACKAGE_DIR / "configs" / "presets"  # training presets and Optuna search spaces (experiments/configs)
ARCHITECTURES_DIR = PACKAGE_DIR / "configs" / "internvl3_5"  # the shipped InternVL3.5 model configs
REFERENCES_DIR = PACKAGE_DIR / "reports" / "references"  # published leaderboard scores (results/leaderboard)
# The resolved configuration colintern's trainer writes into a run folder (and export copies beside the weights).
RUN_CONFIG_FILE = "colintern_run.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's CONFIG_NAME: what makes a folder a PEFT adapter

logger = logging.getLogger(__name__)


class ColinternError(RuntimeError):
    """An error caused by the user's input or environment; the message names the problem and the fix.

    Scripts print these as one line instead of a stack trace.
    """


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared like any file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name next to `path` and rename it into place on success.

    An interrupted build leaves no half-written `path`; an existing `path` is replaced only once the new one is whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive inter-process lock (e.g. two torchrun ranks building the same embedded checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def setup_logging(verbose: bool = False) -> None:
    """Logging for the command-line scripts: our messages at INFO, the libraries' at WARNING."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec", "PIL", "matplotlib", "mteb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_library_notices)
    # The libraries' own progress bars for tiny, instant steps (parquet writes, weight loading) are noise;
    # colintern shows its own bars for long work.
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - hard dependencies
        pass


def _drop_library_notices(record: logging.LogRecord) -> bool:
    """colpali-engine announces at import, on the root logger, that an optional package (FastPlaid) is missing."""
    return not (record.name == "root" and str(record.msg).startswith("FastPlaid is not installed"))


def cache_dir() -> Path:
    """Where on-demand assets (the embedded checkpoint, SynthDocs) are built: $COLINTERN_HOME or ~/.cache/colintern."""
    return Path(os.environ.get("COLINTERN_HOME", Path.home() / ".cache" / "colintern")).expanduser()


def read_run_config(folder: str | Path) -> dict[str, Any] | None:
    """The run configuration saved in `folder` (`RUN_CONFIG_FILE`); None when there is none, or it is unreadable
    (with a warning: it describes a run, it never decides whether one can be loaded)."""
    path = Path(folder) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("Ignoring unreadable %s: %s", path, error)
        return None
    if not isinstance(config, dict):
        logger.warning("Ignoring %s: not a JSON object", path)
        return None
    return config


def manifest_matches(path: Path, manifest_name: str, expected: dict) -> bool:
    """True when `path` holds a complete build whose manifest records exactly `expected` (else rebuild)."""
    try:
        manifest = json.loads((path / manifest_name).read_text())
    except (OSError, ValueError):
        return False
    return all(manifest.get(key) == value for key, value in expected.items())
