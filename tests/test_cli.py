"""colintern.cli: option limits, UTF-8 reading, and the runner that turns expected failures into one error line."""

import argparse
import errno
import math
import os
import pickle

import pytest

from colintern.cli import Limits, check_option, expected_failure, limits, read_text, run
from colintern.utils import ColinternError


def test_limits_accept_the_range_and_refuse_nan_inf_and_the_bounds():
    positive = Limits(gt=0)
    assert positive.accepts(1e-9) and positive.accepts(3) and positive.accepts(None)
    assert not positive.accepts(0) and not positive.accepts(-1)
    assert not positive.accepts(math.nan) and not positive.accepts(math.inf)
    assert Limits(gt=0, finite=False).accepts(math.inf) and not Limits(gt=0, finite=False).accepts(math.nan)
    dropout = Limits(ge=0, lt=1)
    assert dropout.accepts(0) and dropout.accepts(0.99) and not dropout.accepts(1) and not dropout.accepts(-0.1)
    steps = Limits(ge=1, also=(-1,))
    assert steps.accepts(-1) and steps.accepts(1) and not steps.accepts(0) and not steps.accepts(-2)
    assert Limits(choices=("auto", "true")).accepts("TRUE") and not Limits(choices=("auto", "true")).accepts("no")


def test_limits_describe_the_range_in_words():
    assert Limits(ge=1).describe(int) == "an integer >= 1"
    assert Limits(gt=0).describe(float) == "a finite number > 0"
    assert Limits(ge=0, lt=1).describe(float) == "a finite number in [0, 1)"
    assert Limits(ge=0, le=2**32 - 1).describe(int) == "an integer in [0, 4294967295]"
    assert Limits(ge=1, also=(-1,)).describe(int) == "an integer >= 1, or -1"
    assert Limits(choices=("a", "b")).describe() == "one of a, b"


def test_a_bad_value_names_the_option_the_value_the_range_and_the_source():
    with pytest.raises(ColinternError) as caught:
        check_option(-2.0, "--lr", gt=0)
    assert str(caught.value) == "--lr = -2.0: must be a finite number > 0"  # a value passed in Python
    with pytest.raises(ColinternError, match=r"^training.learning_rate \(--lr\) = nan: .* \(set in run.yaml\)$"):
        Limits(gt=0).check(math.nan, "training.learning_rate (--lr)", "run.yaml")


def parser_with(*arguments) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe")
    for name, kwargs in arguments:
        parser.add_argument(name, **kwargs)
    return parser


def test_script_flags_with_limits_fail_in_one_line_through_run(capsys):
    parser = parser_with(("--steps", {"type": int, "default": 5, **limits(ge=1)}),
                         ("--sizes", {"type": int, "nargs": "+", **limits(ge=1)}))
    seen = []
    assert run(lambda args: seen.append(args.steps), parser, ["--steps", "3"]) == 0 and seen == [3]
    assert run(lambda args: 0, parser_with(("--steps", {"type": int, **limits(ge=1)})), ["--steps", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --steps = 0: must be an integer >= 1 (set on the command line)"]
    parser = parser_with(("--sizes", {"type": int, "nargs": "+", **limits(ge=1)}))
    assert run(lambda args: 0, parser, ["--sizes", "4", "-2"]) == 2
    assert "--sizes = -2" in capsys.readouterr().err


def failing(error: BaseException):
    def main(args):
        raise error

    return main


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.parquet"), "/data/x.parquet: not found"),
        (PermissionError(errno.EACCES, "Permission denied", "/srv/out"), "/srv/out: permission denied"),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/.result.json.abc123.tmp"), "/mnt/ro: is on a read-only"),
        (OSError(errno.ENOSPC, "No space left on device", "/full/run"), "/full/run: no space left on the device"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/a/file.txt/b"), "a file where a folder is needed"),
        (UnicodeDecodeError("utf-8", b"caf\xe9", 3, 4, "invalid continuation byte"), "save it as UTF-8"),
        (pickle.UnpicklingError("Weights only load failed. Unsupported global: fractions.Fraction"),
         "pickled Python objects"),
    ],
)
def test_expected_failures_become_one_error_line(error, expected, capsys):
    assert run(failing(error), argparse.ArgumentParser(prog="probe"), []) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_a_file_where_a_folder_is_needed_is_named(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")

    def main(args):
        (tmp_path / "notes.txt").mkdir(parents=True, exist_ok=True)

    assert run(main, argparse.ArgumentParser(prog="probe"), []) == 2
    assert "notes.txt: is a file where a folder is needed" in capsys.readouterr().err


def test_safetensors_disk_full_is_an_expected_failure():
    class SafetensorError(Exception):  # the name safetensors' Rust extension raises
        pass

    error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "no space left on the device" in expected_failure(error)
    assert expected_failure(SafetensorError("Error while deserializing header: invalid header length")) is None


@pytest.mark.parametrize("error", [ValueError("a bug"), KeyError("x"), OSError(errno.EIO, "I/O error"),
                                   pickle.UnpicklingError("truncated")])
def test_unexpected_failures_keep_their_traceback(error):
    with pytest.raises(type(error)):
        run(failing(error), argparse.ArgumentParser(prog="probe"), [])


def test_read_text_names_the_file_and_the_line_of_a_non_utf8_byte(tmp_path):
    path = tmp_path / "queries.csv"
    path.write_bytes("query,file\nmenu du café,doc\n".encode("latin-1"))
    with pytest.raises(ColinternError, match=r"Queries file .*queries.csv is not UTF-8 text \(line 2: byte b'\\xe9'"):
        read_text(path, "Queries file")
    path.write_bytes("\ufeffquery\ncafé\n".encode())
    assert read_text(path) == "query\ncafé\n"  # a byte-order mark is dropped


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-0555 folder")
def test_a_read_only_folder_is_named(tmp_path, capsys):
    from colintern.utils import atomic_write_json

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert run(lambda args: atomic_write_json(folder / "x.json", {}), argparse.ArgumentParser(prog="p"), []) == 2
    finally:
        folder.chmod(0o755)
    assert f"error: {folder}: permission denied" in capsys.readouterr().err


def test_a_pickle_refused_by_torch_load_names_the_file(tmp_path, capsys):
    import fractions

    import torch

    path = tmp_path / "optimizer.pt"
    path.write_bytes(pickle.dumps({"state": fractions.Fraction(1, 3)}, protocol=2))
    assert run(lambda args: torch.load(path, weights_only=True), argparse.ArgumentParser(prog="p"), []) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: {path} holds a pickled fractions.Fraction, which torch.load(weights_only=True)")
