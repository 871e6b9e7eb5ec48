"""Small shared helpers: atomic file output, locking, logging set-up, errors with a fix."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
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


# ---------------------------------------------------------------------------------------------------- names and output
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_LENGTH = 120  # well under the 255 bytes a file name may have, leaving room for suffixes


def safe_name(text: Any, fallback: str = "item") -> str:
    """`text` as one file or folder name: the only way a name from data (a task.json `name`, a dataset or model name,
    a query id, a file stem) becomes part of a path.

    Runs of characters other than letters, digits, `.`, `_` and `-` become `-`; leading and trailing `-` and `.` are
    dropped, so the result is never empty, `.`, `..`, hidden or more than one path component. A name longer than
    MAX_NAME_LENGTH is cut and ends in a hash of the whole text (two long names stay apart).
    """
    text = str(text)
    cleaned = _UNSAFE_NAME_CHARS.sub("-", text).strip("-.")
    if len(cleaned) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        cleaned = cleaned[: MAX_NAME_LENGTH - 9].rstrip("-.") + "-" + digest
    return cleaned or fallback


OUTPUT_RECORD = ".colintern-output"  # JSON: which names in a folder each command wrote (what --overwrite may replace)


def _overlap(output: Path, source: Path) -> str | None:
    if output == source:
        return "is"
    if output.is_relative_to(source):
        return "lies inside"
    if source.is_relative_to(output):
        return "contains"
    return None


def read_output_record(folder: Path) -> dict[str, list[str]]:
    """{command: names it wrote} from `folder`'s OUTPUT_RECORD ({} when there is none or it is unreadable)."""
    try:
        record = json.loads((folder / OUTPUT_RECORD).read_text(encoding="utf-8"))
        return {str(k): [str(n) for n in v] for k, v in record.get("written_by", {}).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


class OutputDir:
    """A folder a command writes into, after `prepare_output_dir` checked it; see there."""

    def __init__(self, path: Path, command: str, overwrite: bool, created: bool, option: str) -> None:
        self.path, self.command, self.overwrite, self.created, self.option = path, command, overwrite, created, option

    def owned(self) -> set[str]:
        return set(read_output_record(self.path).get(self.command, []))

    def claim(self, names: Iterable[str]) -> None:
        """Record `names` as this command's output; a name that exists and is not already ours is refused."""
        names = sorted(set(names))
        owned = self.owned()
        for name in names:
            if Path(name).name != name or name in ("", ".", "..", OUTPUT_RECORD):
                raise ValueError(f"not a plain file name: {name!r}")  # a programming error, not the user's
            if name not in owned and os.path.lexists(self.path / name):
                raise ColinternError(
                    f"{self.path / name} was not written by {self.command} (it is not listed in "
                    f"{self.path / OUTPUT_RECORD}), and --overwrite only replaces {self.command}'s own output: move it "
                    f"away or choose another {self.option}."
                )
        record = read_output_record(self.path)
        record[self.command] = sorted(owned | set(names))
        atomic_write_json(self.path / OUTPUT_RECORD, {"written_by": dict(sorted(record.items()))})

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """Build the output in a hidden folder inside this one; on success its entries replace this command's earlier
        output of the same names (one rename each), earlier output of other names is removed, nothing else is touched.
        """
        stage = Path(tempfile.mkdtemp(prefix=f".{self.command}.", suffix=".partial", dir=self.path))
        os.chmod(stage, 0o777 & ~_umask())
        try:
            yield stage
            names = sorted(entry.name for entry in stage.iterdir())
            stale = self.owned() - set(names)
            self.claim(names)
            for name in names:
                _replace_entry(stage / name, self.path / name)
            for name in sorted(stale):
                _remove_entry(self.path / name)
            record = read_output_record(self.path)
            record[self.command] = names
            atomic_write_json(self.path / OUTPUT_RECORD, {"written_by": dict(sorted(record.items()))})
        except BaseException:
            self.discard_if_unused()
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def discard_if_unused(self) -> None:
        """Remove the folder again when this run created it and wrote nothing but its record into it."""
        if self.created and self.path.is_dir():
            left = [p for p in self.path.iterdir() if p.name != OUTPUT_RECORD and not p.name.endswith(".partial")]
            if not left:
                shutil.rmtree(self.path, ignore_errors=True)


def _replace_entry(new: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def _remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def prepare_output_dir(
    path: str | Path,
    *,
    command: str,
    inputs: dict[str, str | Path | None] | None = None,
    overwrite: bool = False,
    owned_names: Iterable[str] | None = None,
    option: str = "--output-dir",
) -> OutputDir:
    """Check and claim `path` as the output folder of `command`, before any work is done.

    The rules every command that writes a folder follows (nothing it did not create in this run is deleted or
    replaced):
      * an output folder that is, lies inside or contains one of `inputs` ({option: path}; missing paths and Hub ids
        are skipped) is refused, naming both;
      * a non-empty folder is refused unless `overwrite`; with it, only names this command recorded as its own
        output (in the folder's OUTPUT_RECORD) are replaced, never a file of the user's or of another command;
      * `owned_names` (when known in advance) are checked against that now and recorded; else write through
        `OutputDir.staged()`, which checks and records the names it installs.
    """
    raw = Path(path).expanduser()
    out = raw.resolve()
    for label, source in (inputs or {}).items():
        if source is None or not Path(source).expanduser().exists():
            continue
        relation = _overlap(out, Path(source).expanduser().resolve())
        if relation:
            raise ColinternError(
                f"{option} {path} {relation} the input {label} {source}: a command never writes over its own input. "
                f"Choose an output folder outside it."
            )
    if out.exists() and not out.is_dir():
        raise ColinternError(f"{option} {path} is a file, not a folder: choose a folder (new or empty).")
    entries = [  # the record and this command's scratch left by a killed run do not make the folder non-empty
        p.name for p in (sorted(out.iterdir()) if out.is_dir() else [])
        if p.name != OUTPUT_RECORD and not (p.name.startswith(f".{command}.") and p.name.endswith(".partial"))
    ]
    if entries and not overwrite:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ColinternError(
            f"{option} {path} is not empty (it holds {shown}): choose a new folder, or pass --overwrite to replace "
            f"what {command} wrote there before (nothing else in it is touched)."
        )
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    output = OutputDir(raw, command, overwrite, created, option)
    if owned_names is not None:
        output.claim(owned_names)
    return output
