"""Fault injection: the probes of issue 14 replayed against the real scripts, as a careless or hostile user would run
them (bad option values from flags, config files, presets and advisor JSON; non-UTF-8 files; decompression-bomb
pages; pickles in checkpoint files; output paths that are files, read-only or full; output folders that hold data).

Each probe runs one script's own `main` through `colintern.cli.run` in this process (no second start-up of torch)
and its outcome is one of:
  clear         a non-zero exit with one `error:` line naming the option or file (or, for a probe whose right
                answer is not an error, the right result)
  traceback     an exception escaped (a library traceback instead of a message)
  unclear       a non-zero exit whose message does not name the option or file (or none at all)
  silent wrong  exit 0 where the input was bad, or a wrong result
  data lost     a file the command did not create is gone or replaced

    python tests/test_fault_injection.py            # the table and the counts (probes / clear / ... / data lost)
    python -m pytest tests/test_fault_injection.py  # every probe must be `clear`

Every probe must end clear (or right); the item numbers are issue 14's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTCOMES = ("clear", "unclear", "traceback", "silent wrong", "data lost")
FIXED_ITEMS = (2, 3, 4, 6, 7, 8, 9)  # issue 14's items whose probes must pass (all of those probed here)


# ---------------------------------------------------------------------------------------------------- the fixtures
@dataclass
class World:
    """What the probes run against: the tiny model, a small SynthDocs corpus, and a fresh folder per probe."""

    model: Path
    data: Path
    shared: Path  # probes' common inputs built once (a trained run with a checkpoint)
    tmp: Path = Path()
    mounts: list[Path] = field(default_factory=list)

    def train_args(self, out: str = "run") -> list[str]:
        """A one-step training run on 4 pairs, no evaluation: seconds, when a probe's bad value is not caught."""
        return ["--preset", "demo", "--dataset", str(self.data), "--output-dir", str(self.tmp / out),
                "--max-steps", "1", "--batch-size", "2", "--max-train-samples", "4", "--eval-split", "none",
                "--no-retrieval-eval", "--save-steps", "1000", "--num-workers", "0", "--report-to", "none"]

    def trained_run(self) -> Path:
        """A finished one-step full fine-tuning run with checkpoint-1 (built once, copied by the probes)."""
        run = self.shared / "trained"
        if not (run / "checkpoint-1").is_dir():
            saved, self.tmp = self.tmp, self.shared
            outcome = run_in_process("train", [*self.train_args("trained"), "--save-steps", "1"])
            self.tmp = saved
            assert outcome.rc == 0, outcome.err[-2000:]
        return run


# ---------------------------------------------------------------------------------------------------- running
@dataclass
class Result:
    rc: int
    out: str
    err: str
    traceback: str | None = None

    def error_line(self) -> str:
        """The last `error:` line (colintern.cli.run's, or argparse's `prog: error:`), even after a progress bar."""
        found = re.findall(r"(?:^|\r|\])(error: [^\r\n]*)|^(\S+: error: [^\r\n]*)", self.err, re.MULTILINE)
        return "".join(found[-1]) if found else ""


def _entry(script: str) -> tuple[Callable, Callable]:
    if script == "train":
        from colintern.training.__main__ import build_parser, main

        return main, build_parser
    namespace = runpy.run_path(str(REPO_ROOT / "scripts" / f"{script}.py"), run_name=f"fault_injection_{script}")
    return namespace["main"], namespace["build_parser"]


def run_in_process(script: str, argv: list[str]) -> Result:
    """`scripts/<script>.py argv` through colintern.cli.run in this process, stdout and stderr captured."""
    from colintern.cli import run

    out, err = io.StringIO(), io.StringIO()
    caught = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main, build_parser = _entry(script)
            rc = run(main, build_parser(), argv)
        except SystemExit as exit_:  # argparse
            rc = exit_.code if isinstance(exit_.code, int) else 2
        except Exception:  # noqa: BLE001 - what the probe measures
            rc, caught = 1, traceback.format_exc()
    return Result(rc, out.getvalue(), err.getvalue(), caught)


def run_in_subprocess(script: str, argv: list[str], preexec=None) -> Result:
    """For probes that change the process itself (resource limits)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / f"{script}.py"), *argv], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=600, preexec_fn=preexec, check=False)
    tb = done.stderr if "Traceback (most recent call last)" in done.stderr else None
    return Result(done.returncode, done.stdout, done.stderr, tb)


# ---------------------------------------------------------------------------------------------------- probes
@dataclass
class Probe:
    name: str
    item: int  # issue 14's item
    script: str
    args: Callable[[World], list[str]]
    expect: Callable[[World], list[str]] = lambda w: []  # what the error line must name
    setup: Callable[[World], None] | None = None
    lost: Callable[[World], bool] | None = None  # True when data the command did not create is gone
    right: Callable[[World, Result], bool] | None = None  # for probes whose right answer is not an error
    runner: Callable[[World, Probe], Result] | None = None  # default: in this process


def classify(probe: Probe, world: World, result: Result) -> str:
    if probe.lost is not None and probe.lost(world):
        return "data lost"
    if result.traceback:
        return "traceback"
    if probe.right is not None:
        return "clear" if probe.right(world, result) else "silent wrong"
    if result.rc == 0:
        return "silent wrong"
    line = result.error_line()
    return "clear" if line and all(part in line for part in probe.expect(world)) else "unclear"


def replay(probe: Probe, world: World) -> tuple[str, Result]:
    if probe.setup is not None:
        probe.setup(world)
    argv = probe.args(world)
    result = probe.runner(world, probe) if probe.runner else run_in_process(probe.script, argv)
    return classify(probe, world, result), result


def train(flag: str, value: str, *extra: str, name: str | None = None, item: int = 6) -> Probe:
    """train.py with one bad flag value: the error must name the flag (the exact wording, with the value, the range
    and the source, is tests/test_cli.py's and tests/training/test_arguments.py's business)."""
    return Probe(name or f"train {flag} {value}", item, "train", lambda w: [*w.train_args(), *extra, flag, value],
                 lambda w: [flag])


# --- files the probes write
def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 8x8 PNG whose header claims width x height pixels (PIL refuses it as a decompression bomb on open)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header) & 0xFFFFFFFF)
    return bytes(data)


def with_bomb(source: Path, target: Path, column: str = "image", row: int = 0, rows: int | None = None) -> None:
    """Copy a parquet file, the image in `row` replaced by a decompression bomb."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    if rows is not None:
        table = table.slice(0, rows)
    images = table.column(column).to_pylist()
    images[row] = {"bytes": bomb_png(), "path": None}
    index = table.column_names.index(column)
    table = table.set_column(index, table.schema.field(index), pa.array(images, type=table.schema.field(index).type))
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, target)


def pickle_file(path: Path) -> None:
    """A harmless pickle that `torch.load(weights_only=True)` refuses (a Fraction is not on its allow-list)."""
    import fractions
    import pickle

    path.write_bytes(pickle.dumps({"weight": fractions.Fraction(1, 3)}, protocol=2))  # torch.save's protocol


def image_document(folder: Path) -> None:
    """A one-document folder (one page image) for prepare_dataset."""
    from PIL import Image

    (folder / "doc").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 128), (200, 30, 30)).save(folder / "doc" / "page-1.png")


def latin1_queries(world: World, suffix: str) -> None:
    image_document(world.tmp / "docs")
    if suffix == ".jsonl":
        text = json.dumps({"query": "café menu", "file": "doc", "page": 1}, ensure_ascii=False) + "\n"
    else:
        text = "query,file,page\ncafé menu,doc,1\n"
    (world.tmp / f"queries{suffix}").write_bytes(text.encode("latin-1"))


def small_task_with_bomb(world: World) -> None:
    folder = world.tmp / "task"
    shutil.copytree(world.data / "validation", folder)
    with_bomb(world.data / "validation" / "corpus.parquet", folder / "corpus.parquet")


def pairs_with_bomb(world: World) -> None:
    (source,) = sorted((world.data / "train").glob("*.parquet"))
    with_bomb(source, world.tmp / "pairs" / "train" / "data.parquet", row=1, rows=8)


def pickled_model(world: World) -> None:
    folder = world.tmp / "pickled"
    shutil.copytree(world.model, folder)
    for weights in folder.glob("*.safetensors*"):
        weights.unlink()
    pickle_file(folder / "pytorch_model.bin")


def pickled_optimizer(world: World) -> None:
    shutil.copytree(world.trained_run(), world.tmp / "run")
    checkpoint = world.tmp / "run" / "checkpoint-1"
    pickle_file(checkpoint / "optimizer.pt")
    # a crafted checkpoint: its completion marker agrees with the swapped file, so only the pickle check can refuse it
    marker = checkpoint / "colintern_checkpoint.json"
    record = json.loads(marker.read_text())
    record["files"]["optimizer.pt"] = (checkpoint / "optimizer.pt").stat().st_size
    marker.write_text(json.dumps(record))


def write(path_text: str, text: str | bytes) -> Callable[[World], None]:
    def setup(world: World) -> None:
        path = world.tmp / path_text
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return setup


# --- environments: read-only and full file systems
def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def mount_tmpfs(world: World, folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                          check=False)
    if done.returncode == 0:
        world.mounts.append(folder)
    return done.returncode == 0


def read_only_folder(world: World) -> None:
    """A folder the user cannot write: a read-only tmpfs as root (root ignores permissions), else mode 0555."""
    folder = world.tmp / "readonly"
    if not (can_mount() and mount_tmpfs(world, folder, "ro,size=1m")):
        folder.mkdir(exist_ok=True)
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):
            pytest.skip("cannot make a read-only folder here (root without mount)")


def full_disk_run(world: World, probe: Probe) -> Result:
    """train.py into a 1 MiB file system: the config files fit, the checkpoint (4 MB) does not (ENOSPC mid-save).
    Without mount rights, the process's file-size limit does the same (EFBIG)."""
    folder = world.tmp / "full"
    argv = [*world.train_args("full/run"), "--save-steps", "1"]
    if can_mount() and mount_tmpfs(world, folder, "size=1m"):
        return run_in_process("train", argv)
    import resource
    import signal

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    return run_in_subprocess("train", argv, preexec=limit_file_size)


# --- probes of items 2, 3, 4, 8, 9
def prepare_into_its_own_input(world: World) -> None:
    """A document folder named `train` inside the documents folder: what OUT/train would replace."""
    from PIL import Image

    (world.tmp / "docs" / "train").mkdir(parents=True)
    Image.new("RGB", (96, 128), (200, 30, 30)).save(world.tmp / "docs" / "train" / "page-1.png")
    (world.tmp / "queries.jsonl").write_text(json.dumps({"query": "a red page", "file": "train", "page": 1}) + "\n")


def merge_into_a_folder_with_data(world: World) -> None:
    from tests.helpers import build_tiny_adapter

    build_tiny_adapter(world.model, world.tmp / "adapter")
    (world.tmp / "exports" / "other-model").mkdir(parents=True)
    (world.tmp / "exports" / "other-model" / "model.safetensors").write_text("another export")


def traversal_task(world: World) -> None:
    folder = world.tmp / "task"
    shutil.copytree(world.data / "validation", folder)
    # results go to eval/results/<model>/<revision>/<name>.json: four levels up is this probe's folder
    (folder / "task.json").write_text(json.dumps({"name": "../../../../escaped-result"}))


def escaped(world: World) -> bool:
    return any(world.tmp.glob("escaped-result*"))


def encrypted_then_empty(world: World) -> None:
    import pypdf
    from PIL import Image

    docs = world.tmp / "docs"
    docs.mkdir()
    Image.new("RGB", (96, 128), "white").save(docs / "a-good.pdf", format="PDF", resolution=72)
    Image.new("RGB", (96, 128), "white").save(docs / "b-locked.pdf", format="PDF", resolution=72)
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(docs / "b-locked.pdf"))
    writer.encrypt("secret", algorithm="RC4-128")
    with open(docs / "b-locked.pdf", "wb") as handle:
        writer.write(handle)
    with open(docs / "c-empty.pdf", "wb") as handle:
        pypdf.PdfWriter().write(handle)
    (world.tmp / "queries.jsonl").write_text(json.dumps({"query": "a white page", "file": "a-good.pdf", "page": 1})
                                             + "\n")


def empty_reported_as_empty(world: World, result: Result) -> bool:
    report = world.tmp / "out" / "report.json"
    if result.rc != 0 or not report.is_file():
        return False
    problems = json.loads(report.read_text()).get("problems", [])
    kinds = {p.get("kind") or p.get("type") for p in problems if "c-empty.pdf" in json.dumps(p)}
    return bool(kinds) and not any("encrypt" in str(k) for k in kinds)


def half_written_checkpoint(world: World) -> None:
    shutil.copytree(world.trained_run(), world.tmp / "run")
    partial = world.tmp / "run" / "checkpoint-2"
    shutil.copytree(world.tmp / "run" / "checkpoint-1", partial)
    weights = partial / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # killed mid-save
    (partial / "trainer_state.json").unlink()


def resumed_from_the_complete_checkpoint(world: World, result: Result) -> bool:
    state = world.tmp / "run" / "trainer_state.json"
    return result.rc == 0 and state.is_file() and json.loads(state.read_text())["global_step"] == 3


def optuna_args(world: World, *extra: str) -> list[str]:
    """A study of one-step trials scored on the validation split."""
    return [*world.train_args("study"), "--eval-split", "validation", "--eval-steps", "1", "--max-eval-samples", "8",
            *extra]


def diverging_search_space(world: World) -> None:
    """A search space whose every learning rate makes the loss non-finite: each trial fails (nan) on its own."""
    (world.tmp / "space.yaml").write_text("parameters:\n  training.learning_rate: {type: categorical, choices: [1.0e+30, 1.0e+32]}\n")


def bad_optuna_trials(world: World) -> list[str]:
    return optuna_args(world, "--trials", "2", "--max-steps", "2", "--logging-steps", "1", "--warmup-steps", "0",
                       "--startup-trials", "1", "--search-space", str(world.tmp / "space.yaml"))


T = "train"
PROBES: list[Probe] = [
    # ---- item 6: every bad value is one line naming the option, the value, the range and where it came from
    train("--lr", "-1"),
    train("--lr", "nan"),
    train("--lr", "inf"),
    train("--batch-size", "0"),
    train("--grad-accum", "0"),
    train("--warmup-steps", "-5"),
    train("--lora-rank", "0", "--peft"),
    train("--lora-alpha", "0", "--peft"),
    train("--lora-dropout", "2", "--peft"),
    train("--num-workers", "-1"),
    train("--logging-steps", "0"),
    train("--scheduler", "bogus"),
    train("--max-num-visual-tokens", "0"),
    train("--max-num-visual-tokens", "8", name="train --max-num-visual-tokens 8 (below one 16-token tile)"),
    train("--max-steps", "0"),
    train("--epochs", "-1", "--max-steps", "-1"),
    train("--epochs", "0", "--max-steps", "-1"),
    train("--max-grad-norm", "nan"),
    train("--weight-decay", "-1"),
    train("--save-steps", "0"),
    train("--eval-steps", "0"),
    train("--seed", "-1"),
    train("--max-train-samples", "0"),
    train("--dtype", "bogus"),
    train("--bf16", "maybe"),
    Probe("train --config with lr: -1", 6, T, lambda w: [*w.train_args(), "--config", str(w.tmp / "bad.yaml")],
          lambda w: ["training.learning_rate", "bad.yaml"], setup=write("bad.yaml", "base: demo.yaml\ntraining: {lr: -1}\n")),
    Probe("train --config with lora dropout 5 (advisor JSON)", 6, T,
          lambda w: [*w.train_args(), "--config-from", str(w.tmp / "advice.json")],
          lambda w: ["dropout", "advice.json"],
          setup=write("advice.json", json.dumps({"learning_rate": 1e-4, "lora_dropout": 5}))),
    Probe("advisor --lora-dropout 5 --output", 6, "hyperparameter_optimizer",
          lambda w: ["--lora-dropout", "5", "--output", str(w.tmp / "advice.json")], lambda w: ["--lora-dropout"]),
    Probe("advisor --num-gpus 0", 6, "hyperparameter_optimizer", lambda w: ["--num-gpus", "0", "--json"],
          lambda w: ["--num-gpus"]),
    Probe("advisor --vram-gb nan", 6, "hyperparameter_optimizer", lambda w: ["--vram-gb", "nan"],
          lambda w: ["--vram-gb"]),
    Probe("advisor --epochs 0", 6, "hyperparameter_optimizer", lambda w: ["--epochs", "0"],
          lambda w: ["--epochs"]),
    Probe("advisor --query-tokens 0", 6, "hyperparameter_optimizer", lambda w: ["--query-tokens", "0"],
          lambda w: ["--query-tokens"]),
    Probe("lr_finder --lr-min 0", 6, "lr_finder", lambda w: [*w.train_args(), "--lr-min", "0", "--steps", "13"],
          lambda w: ["--lr-min"]),
    Probe("lr_finder inverted range", 6, "lr_finder",
          lambda w: [*w.train_args(), "--lr-min", "1", "--lr-max", "1e-4", "--steps", "13"],
          lambda w: ["--lr-max", "--lr-min"]),
    Probe("lr_finder --steps 0", 6, "lr_finder", lambda w: [*w.train_args(), "--steps", "0"],
          lambda w: ["--steps"]),
    Probe("evaluate --batch-size 0", 6, "evaluate",
          lambda w: ["--model-path", str(w.model), "--allow-untrained-head", "--benchmarks", str(w.data),
                     "--output-dir", str(w.tmp / "eval"), "--batch-size", "0", "--no-progress"],
          lambda w: ["--batch-size"]),
    Probe("optuna --trials 0", 6, "optuna_optimizer", lambda w: optuna_args(w, "--trials", "0"),
          lambda w: ["--trials"]),
    Probe("optuna --time-budget-hours -1", 6, "optuna_optimizer",
          lambda w: optuna_args(w, "--trials", "1", "--time-budget-hours", "-1"),
          lambda w: ["--time-budget-hours"]),
    Probe("ablate --vary lr=-1", 6, "ablate",
          lambda w: ["--base", "demo", "--vary", "lr=-1", *w.train_args("abl")[2:], "--log", str(w.tmp / "log.jsonl"),
                     "--output-root", str(w.tmp / "ablations")],
          lambda w: ["lr"]),
    # ---- item 7: expected failures of files and folders are one line naming the file and the fix
    Probe("prepare_dataset latin-1 queries JSONL", 7, "prepare_dataset",
          lambda w: ["--pdfs", str(w.tmp / "docs"), "--queries", str(w.tmp / "queries.jsonl"), "--output-dir",
                     str(w.tmp / "out")], lambda w: ["queries.jsonl", "UTF-8"],
          setup=lambda w: latin1_queries(w, ".jsonl")),
    Probe("prepare_dataset latin-1 queries CSV", 7, "prepare_dataset",
          lambda w: ["--pdfs", str(w.tmp / "docs"), "--queries", str(w.tmp / "queries.csv"), "--output-dir",
                     str(w.tmp / "out")], lambda w: ["queries.csv", "UTF-8"],
          setup=lambda w: latin1_queries(w, ".csv")),
    Probe("train latin-1 YAML config", 7, T, lambda w: [*w.train_args(), "--config", str(w.tmp / "latin.yaml")],
          lambda w: ["latin.yaml", "UTF-8"],
          setup=write("latin.yaml", "training: {lr: 1.0e-3}  # café\n".encode("latin-1"))),
    Probe("evaluate decompression-bomb page", 7, "evaluate",
          lambda w: ["--model-path", str(w.model), "--allow-untrained-head", "--benchmarks", str(w.tmp / "task"),
                     "--output-dir", str(w.tmp / "eval"), "--no-progress"],
          lambda w: ["page", "decompression bomb"], setup=small_task_with_bomb),
    Probe("mine_hard_negatives decompression-bomb page", 7, "mine_hard_negatives",
          lambda w: ["--model-path", str(w.model), "--dataset", str(w.tmp / "pairs"), "--output-dir",
                     str(w.tmp / "mined"), "--max-num-visual-tokens", "16"],
          lambda w: ["page 'row 1'", "decompression bomb"], setup=pairs_with_bomb),
    Probe("train --output-dir is a file", 7, T, lambda w: w.train_args("file.txt"),
          lambda w: ["file.txt", "is a file"], setup=write("file.txt", "my notes")),
    Probe("advisor --output under a file", 7, "hyperparameter_optimizer",
          lambda w: ["--output", str(w.tmp / "file.txt" / "advice.json")], lambda w: ["file.txt", "is a file"],
          setup=write("file.txt", "my notes")),
    Probe("train --output-dir read-only", 7, T, lambda w: w.train_args("readonly/run"), lambda w: ["readonly"],
          setup=read_only_folder),
    Probe("advisor --output read-only", 7, "hyperparameter_optimizer",
          lambda w: ["--output", str(w.tmp / "readonly" / "advice.json")], lambda w: ["readonly"],
          setup=read_only_folder),
    Probe("train disk full mid-save", 7, T, lambda w: [], lambda w: ["--output-dir"], runner=full_disk_run),
    Probe("optuna --storage bogus://", 7, "optuna_optimizer",
          lambda w: optuna_args(w, "--trials", "1", "--storage", "bogus://"), lambda w: ["--storage"]),
    Probe("evaluate pickle in pytorch_model.bin", 7, "evaluate",
          lambda w: ["--model-path", str(w.tmp / "pickled"), "--allow-untrained-head", "--benchmarks", str(w.data),
                     "--output-dir", str(w.tmp / "eval"), "--no-progress"],
          lambda w: ["pickle"], setup=pickled_model),
    Probe("train --resume with a pickle in optimizer.pt", 7, T,
          lambda w: [*w.train_args(), "--max-steps", "2", "--resume", str(w.tmp / "run" / "checkpoint-1")],
          lambda w: ["pickle"], setup=pickled_optimizer),
    # ---- items 2, 3, 4, 8, 9 of issue 14
    Probe("prepare_dataset --output-dir its own --pdfs folder", 2, "prepare_dataset",
          lambda w: ["--pdfs", str(w.tmp / "docs"), "--queries", str(w.tmp / "queries.jsonl"), "--output-dir",
                     str(w.tmp / "docs")], lambda w: ["docs"], setup=prepare_into_its_own_input,
          lost=lambda w: not (w.tmp / "docs" / "train" / "page-1.png").is_file()),
    Probe("merge_adapter --output-dir a folder holding other exports", 2, "merge_adapter",
          lambda w: ["--adapter", str(w.tmp / "adapter"), "--output-dir", str(w.tmp / "exports")],
          lambda w: ["exports"], setup=merge_into_a_folder_with_data,
          lost=lambda w: not (w.tmp / "exports" / "other-model" / "model.safetensors").is_file()),
    Probe("evaluate task.json name with ../", 3, "evaluate",
          lambda w: ["--model-path", str(w.model), "--allow-untrained-head", "--benchmarks", str(w.tmp / "task"),
                     "--output-dir", str(w.tmp / "eval"), "--no-progress", "--batch-size", "32"],
          setup=traversal_task, right=lambda w, r: not escaped(w)),
    Probe("train --resume latest after a half-written checkpoint", 4, T,
          lambda w: [*w.train_args(), "--max-steps", "3", "--resume", "latest"], setup=half_written_checkpoint,
          right=resumed_from_the_complete_checkpoint),
    Probe("optuna: every trial fails", 8, "optuna_optimizer", bad_optuna_trials, lambda w: ["trial"],
          setup=diverging_search_space),
    Probe("prepare_dataset 0-page PDF after an encrypted one", 9, "prepare_dataset",
          lambda w: ["--pdfs", str(w.tmp / "docs"), "--queries", str(w.tmp / "queries.jsonl"), "--output-dir",
                     str(w.tmp / "out"), "--eval-fraction", "0"], setup=encrypted_then_empty,
          right=empty_reported_as_empty),
]


# ---------------------------------------------------------------------------------------------------- pytest
@pytest.fixture(scope="module")
def world(tiny_model_dir, small_synthdocs_dir, tmp_path_factory):
    return World(tiny_model_dir, small_synthdocs_dir, tmp_path_factory.mktemp("fault-shared"))


@pytest.fixture
def probe_world(world, tmp_path):
    world.tmp = tmp_path
    yield world
    unmount(world)


def unmount(world: World) -> None:
    while world.mounts:
        subprocess.run(["umount", "-l", str(world.mounts.pop())], capture_output=True, check=False)


def _param(probe: Probe):
    marks = () if probe.item in FIXED_ITEMS else pytest.mark.xfail(
        strict=True, reason=f"issue 14 item {probe.item}: not fixed yet")
    return pytest.param(probe, id=probe.name, marks=marks)


@pytest.mark.parametrize("probe", [_param(p) for p in PROBES])
def test_probe_ends_in_a_clear_error_or_the_right_result(probe, probe_world):
    outcome, result = replay(probe, probe_world)
    detail = result.traceback or result.err[-3000:]
    assert outcome == "clear", f"{probe.name}: {outcome} (exit {result.rc})\n{result.error_line()}\n{detail}"


def test_every_bad_value_of_item_6_names_where_it_came_from(probe_world):
    """Flags say 'command line', files their name: the same check whatever the source."""
    result = run_in_process(T, [*probe_world.train_args(), "--batch-size", "0"])
    assert "(set on the command line)" in result.error_line()
    (probe_world.tmp / "bad.yaml").write_text("base: demo.yaml\ntraining: {batch_size: 0}\n")
    result = run_in_process(T, [*probe_world.train_args(), "--config", str(probe_world.tmp / "bad.yaml")])
    assert "training.per_device_train_batch_size (--batch-size) = 0: must be an integer >= 1" in result.error_line()
    assert "bad.yaml)" in result.error_line()


# ---------------------------------------------------------------------------------------------------- the table
def measure(items: tuple[int, ...] | None = None, only: str | None = None) -> int:
    """Replay the probes (of `items`, default all; `only`: names containing it) and print the outcome of each and the
    counts. A throw-away $COLINTERN_HOME holds the tiny model and a small SynthDocs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    sys.path.insert(0, str(REPO_ROOT))
    from colintern.utils import setup_logging

    setup_logging()
    with tempfile.TemporaryDirectory(prefix="fault-injection-") as root:
        os.environ["COLINTERN_HOME"] = str(Path(root) / "home")
        from colintern.data.synthdocs import SynthDocsConfig, write_synthdocs
        from colintern.model.embedded import ensure_embedded_model

        data = write_synthdocs(Path(root) / "synthdocs", SynthDocsConfig(n_train=64, max_eval_pages=24))
        world = World(ensure_embedded_model(), data, Path(root) / "shared")
        counts: Counter = Counter()
        rows = []
        for index, probe in enumerate(PROBES):
            if (items and probe.item not in items) or (only and only not in probe.name):
                continue
            world.tmp = Path(root) / f"probe-{index:02d}"
            world.tmp.mkdir()
            try:
                outcome, result = replay(probe, world)
            except pytest.skip.Exception as skipped:
                outcome, result = "skipped", Result(0, "", str(skipped))
            finally:
                unmount(world)
            counts[outcome] += 1
            shown = (result.traceback or "").strip().splitlines()[-1:] or [result.error_line()]
            rows.append(f"{probe.item:>4}  {outcome:<12}  {probe.name:<58} {shown[0][:150]}")
            print(rows[-1], file=sys.__stdout__, flush=True)
    total = sum(counts[o] for o in OUTCOMES)
    print(f"\nprobes {total} / clear errors {counts['clear']} / unclear errors {counts['unclear']} / tracebacks "
          f"{counts['traceback']} / silent wrong {counts['silent wrong']} / data lost {counts['data lost']}"
          + (f" (skipped {counts['skipped']})" if counts["skipped"] else ""))
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Replay issue 14's probes and count the outcomes.")
    parser.add_argument("--items", type=int, nargs="+", help="only these items of issue 14 (default: all)")
    parser.add_argument("--only", help="only probes whose name contains this")
    arguments = parser.parse_args()
    sys.exit(measure(tuple(arguments.items or ()), arguments.only))
