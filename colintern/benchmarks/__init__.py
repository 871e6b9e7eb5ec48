"""Benchmarks behind `python scripts/benchmark.py <name>`: each compares colintern with the reference implementation
users would otherwise pick, measured in the same run, and writes JSON to results/benchmarks/.

A sub-benchmark is a module in this package with:
    DESCRIPTION: str
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> dict        # the figures; `record()` adds machine, versions and command
and one line in `SUBBENCHMARKS` below. Timings that compare implementations use `measure.interleaved_rounds`
(alternating order, median and spread, each figure labelled quiet or under load); `record()` stores the load average
at the benchmark's start (`mark_start()`, called by scripts/benchmark.py) and at its end in every JSON.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import shlex
import sys
from pathlib import Path

from colintern.utils import atomic_write_json

SUBBENCHMARKS: dict[str, str] = {
    # name -> module; modules are imported only when their benchmark runs
    "scoring": "colintern.benchmarks.scoring",
    "encode": "colintern.benchmarks.encode",
    "memory": "colintern.benchmarks.memory",
    "render": "colintern.benchmarks.render",
    "train-step": "colintern.benchmarks.train_step",
    "page-checks": "colintern.benchmarks.page_checks",
    "grad-cache": "colintern.benchmarks.grad_cache",
}

RESULTS_DIR = Path("results") / "benchmarks"  # relative to the working directory (the checkout's root in the docs)

_load_at_start: tuple[float, ...] | None = None


def mark_start() -> None:
    """Note the load average as a benchmark starts (stored by `record()` beside the one at its end)."""
    from colintern.benchmarks.measure import load_average

    global _load_at_start
    _load_at_start = load_average()


def machine_info() -> dict:
    """What the figures were measured on: CPU/GPU, threads and library versions."""
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    # versions from the installed metadata: importing colpali-engine and mteb takes ~10 s each
    for key, distribution in (("colpali_engine", "colpali-engine"), ("mteb", "mteb"), ("peft", "peft")):
        try:
            info[key] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            info[key] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def record(name: str, figures: dict, output_dir: str | Path | None = None, tag: str | None = None) -> Path:
    """Write `figures` with the machine, versions, command line, time and the load averages at the benchmark's start
    and end to results/benchmarks/<name>[-tag].json."""
    from colintern.benchmarks.measure import cpu_cores, load_average

    output_dir = Path(output_dir) if output_dir else RESULTS_DIR
    payload = {
        "benchmark": name,
        "command": "python " + shlex.join(sys.argv),  # quoted, so it can be pasted back
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average": {  # 1, 5 and 15-minute load averages; start is None when mark_start() was not called
            "start": None if _load_at_start is None else [round(x, 2) for x in _load_at_start],
            "end": [round(x, 2) for x in load_average()],
            "cores": cpu_cores(),
        },
        **figures,
    }
    path = output_dir / f"{name}{'-' + tag if tag else ''}.json"
    atomic_write_json(path, payload)
    return path
