"""Shared plumbing for the command-line scripts: logging, option limits, and one-line errors instead of stack traces."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import pickle
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colintern.utils import ColinternError, setup_logging

logger = logging.getLogger("colintern")


# ------------------------------------------------------------------------------------------------ option limits
@dataclass(frozen=True)
class Limits:
    """The values an option accepts, declared next to it: in a configuration field's metadata
    (`field(metadata={"flag": ..., "ge": 1})`, see colintern.training.arguments) or on an argparse option
    (`add_argument("--steps", type=int, **limits(ge=1))`). One check serves flags, presets, config files and JSON.

    ge/gt/le/lt: inclusive / exclusive bounds; finite: refuse nan and inf; choices: the only values allowed (strings
    compared case-insensitively); also: further values allowed outside the bounds (e.g. -1 for "off").
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True
    choices: tuple | None = None
    also: tuple = ()

    KEYS = ("ge", "gt", "le", "lt", "finite", "choices", "also")

    @classmethod
    def from_metadata(cls, metadata: Any) -> Limits | None:
        found = {key: metadata[key] for key in cls.KEYS if key in metadata}
        if "choices" in found:
            found["choices"] = tuple(found["choices"])
        return cls(**found) if found else None

    def describe(self, kind: type | None = None) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(str(choice) for choice in self.choices)
        noun = "an integer" if kind is int else "a finite number" if self.finite else "a number"
        low = f">= {_number(self.ge)}" if self.ge is not None else None
        low = f"> {_number(self.gt)}" if self.gt is not None else low
        high = f"<= {_number(self.le)}" if self.le is not None else None
        high = f"< {_number(self.lt)}" if self.lt is not None else high
        if low and high:
            opening, low_value = ("[", self.ge) if self.ge is not None else ("(", self.gt)
            closing, high_value = ("]", self.le) if self.le is not None else (")", self.lt)
            text = f"{noun} in {opening}{_number(low_value)}, {_number(high_value)}{closing}"
        else:
            text = " ".join(part for part in (noun, low or high) if part)
        return text + "".join(f", or {value}" for value in self.also)

    def accepts(self, value: Any) -> bool:
        if value is None or isinstance(value, bool):  # an Optional field left empty; flags are not numbers
            return True
        if self.choices is not None:
            return _folded(value) in {_folded(choice) for choice in self.choices}
        if value in self.also:
            return True
        if not isinstance(value, (int, float)):
            return True  # a type error is coerce's business, not a range's
        if math.isnan(value) or (self.finite and math.isinf(value)):
            return False
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def check(self, value: Any, option: str, source: str | None = "command line", kind: type | None = None) -> Any:
        """`value` when allowed; else a ColinternError naming the option, the value, the range and the source
        ("command line", a file name, "preset demo", ...; None when a caller passed the value in Python)."""
        if not self.accepts(value):
            where = "" if source is None else " (set on the command line)" if source == "command line" else (
                f" (set in {source})")
            raise ColinternError(f"{option} = {value!r}: must be {self.describe(kind)}{where}")
        return value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _folded(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class _LimitedAction(argparse.Action):
    """argparse's store action plus a Limits check, naming the flag (see `limits`)."""

    def __init__(self, option_strings, dest, limits: Limits, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.limits = limits

    def __call__(self, parser, namespace, values, option_string=None):
        kind = self.type if self.type in (int, float) else None
        for value in values if isinstance(values, list) else [values]:
            self.limits.check(value, option_string or self.dest, "command line", kind)
        setattr(namespace, self.dest, values)


def limits(**bounds) -> dict:
    """Keywords for `parser.add_argument(..., **limits(ge=1))`: the value is checked as it is parsed, and a bad one
    becomes one `error:` line from `run` (the same message as a configuration field's)."""
    return {"action": _LimitedAction, "limits": Limits(**bounds)}


def check_option(value: Any, option: str, kind: type | None = None, **bounds) -> Any:
    """For library functions that take an option's value directly (e.g. `recommend(lora_dropout=...)`); the error
    names the option by its flag."""
    return Limits(**bounds).check(value, option, None, kind)


def read_text(path, what: str = "") -> str:
    """A UTF-8 text file's contents (a byte-order mark is dropped); a file in another encoding is a ColinternError
    naming it, the line of the first bad byte and the fix."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ColinternError(
            f"{what + ' ' if what else ''}{path} is not UTF-8 text (line {line}: byte "
            f"{data[error.start:error.start + 1]!r}, {error.reason}); save it as UTF-8 (e.g. 'CSV UTF-8' in a "
            "spreadsheet, or `iconv -f latin1 -t utf-8`)."
        ) from error


# ------------------------------------------------------------------------------------------------ the runner
def run(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse arguments, set up logging, run `main(args)`; expected failures become one `error:` line and exit 2.

    Expected: a ColinternError (bad input, with its fix), an OSError from the file system (missing path, a file
    where a folder is needed, no permission, read-only, disk full), a file that is not UTF-8, a decompression-bomb
    image, a pickle refused by `torch.load(weights_only=True)`. Anything else keeps its traceback.
    """
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    try:
        args = parser.parse_args(argv)
        setup_logging(verbose=args.verbose)
        return int(main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # unexpected ones are re-raised below, traceback intact
        message = expected_failure(error)
        if message is None:
            raise
        logger.debug("Traceback of the error below", exc_info=True)
        print(f"error: {message}", file=sys.stderr)
        return 2


_FIXES = {
    errno.ENOENT: "not found: check the path",
    errno.ENOTDIR: "a part of this path is a file where a folder is needed: choose another path",
    errno.EISDIR: "is a folder where a file is needed: name a file",
    errno.EEXIST: "already exists: choose another path or remove it",
    errno.EACCES: "permission denied: choose a folder you can write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write, or fix its permissions",
    errno.EROFS: "is on a read-only file system: choose a writable folder",
    errno.ENOSPC: "no space left on the device: free some space or write elsewhere (--output-dir)",
    errno.EDQUOT: "disk quota exceeded: free some space or write elsewhere (--output-dir)",
    errno.EFBIG: "file too large for the file system or the size limit (ulimit -f): write elsewhere (--output-dir)",
    errno.ENAMETOOLONG: "file name too long: choose a shorter path",
}


def _os_error_message(code: int, detail: str, *names) -> str:
    paths = []
    for name in names:
        if isinstance(name, (str, bytes, os.PathLike)):
            path = Path(os.fsdecode(name))
            if path.name.startswith(".") and path.suffix in (".tmp", ".partial"):  # an atomic write's temporary name
                path = path.parent
            paths.append(path)
    fix = _FIXES[code]
    if code == errno.EEXIST and len(paths) == 1 and paths[0].is_file():  # mkdir where a file is
        fix = "is a file where a folder is needed: choose another path"
    return f"{' -> '.join(map(str, paths)) or 'writing a file'}: {fix} ({detail})"


def expected_failure(error: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for one that should keep its traceback."""
    if isinstance(error, ColinternError):
        return str(error)
    if isinstance(error, OSError) and error.errno in _FIXES:
        return _os_error_message(error.errno, error.strerror or str(error), error.filename, error.filename2)
    if type(error).__name__ == "SafetensorError":  # safetensors (Rust) reports the OS's error only in its message
        code = re.search(r"os error (\d+)", str(error))
        if code and int(code.group(1)) in _FIXES:
            return _os_error_message(int(code.group(1)), f"safetensors: {error}")
    if isinstance(error, UnicodeDecodeError):
        bad = error.object[error.start : error.end]
        return (f"a text file is not UTF-8 ({error.reason} at byte {error.start}: {bad!r}); save it as UTF-8 "
                "(run with -v to see which file)")
    if type(error).__name__ == "DecompressionBombError":  # PIL.Image; PIL is not imported here
        return f"{error} Shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it."
    if isinstance(error, pickle.UnpicklingError) and re.search(r"weights[ _]only", str(error), re.IGNORECASE):
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        path = _torch_load_path(error)
        return (f"{path or 'a checkpoint file'} holds {what}, which torch.load(weights_only=True) refuses to run. "
                "Load only files you trust, saved as safetensors" + ("" if path else " (run with -v to see the file)"))
    return None


def _torch_load_path(error: BaseException) -> str | None:
    """The file `torch.load` was reading when `error` was raised (its `f` argument), if it was a path."""
    frame, path = error.__traceback__, None
    while frame is not None:
        code = frame.tb_frame.f_code
        if code.co_name == "load" and code.co_filename.endswith(os.path.join("torch", "serialization.py")):
            candidate = frame.tb_frame.f_locals.get("f")
            path = os.fsdecode(candidate) if isinstance(candidate, (str, bytes, os.PathLike)) else path
        frame = frame.tb_next
    return path
