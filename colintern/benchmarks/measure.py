"""Measuring helpers shared by the sub-benchmarks: interleaved timing rounds labelled quiet or under load, peak memory
of a piece of work, isolated worker processes, tables.

Timing. `interleaved_rounds` runs the implementations being compared in alternating order (A B, B A, A B, ...) over
several rounds, so a burst of load from elsewhere hits every implementation alike, and reports per implementation every
round's time, the median (the figure quoted), min, max and the spread ((max - min) / median), with the 1-minute load
average read before and after every round. A figure is labelled "quiet" when every reading stayed below
`QUIET_LOAD_PER_CORE` x cores + the load the benchmark itself adds (`own_load`, by default 1: its own busy process),
and "under load (load avg X)" with the highest reading otherwise.

Peak memory on the CPU is the process's resident-set high-water mark (`VmHWM` in /proc/self/status) above its
resident set just before the work starts. The high-water mark is reset first by writing "5" to
/proc/self/clear_refs (Linux >= 4.0), so whatever the process touched earlier (imports, building the inputs) does not
count, while every page the work touches does, whichever allocator (PyTorch, NumPy, MKL's scratch) made it. Each
implementation runs in its own fresh process, so one cannot inherit another's freed-but-cached memory.
On CUDA, peak memory is `torch.cuda.max_memory_allocated()` above the allocated memory before the work.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from colintern.utils import PACKAGE_DIR, ColinternError

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (None where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Resident-set high-water mark of this process since start or the last `reset_peak_rss()`."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark to the current resident set; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Context manager measuring the peak memory a piece of work adds, in bytes (`.peak_bytes`).

    `device` "cpu": resident-set high-water mark above the resident set at entry (see the module docstring).
    `device` "cuda": PyTorch's CUDA allocator peak above the memory allocated at entry.
    `.method` says which, for the JSON.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.peak_bytes: int | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._baseline = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated above the allocation at start"
        else:
            self._exact = reset_peak_rss()
            self._baseline = rss_bytes() or 0
            self.method = (
                "VmHWM above VmRSS at start, high-water mark reset via /proc/self/clear_refs"
                if self._exact
                else "VmHWM above VmRSS at start (high-water mark could not be reset: an upper bound)"
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated() - self._baseline)
        else:
            peak = peak_rss_bytes()
            self.peak_bytes = None if peak is None else max(0, peak - self._baseline)


def timed(fn: Callable[[], object], device: str = "cpu") -> tuple[object, float]:
    """Run `fn` once and return (its result, wall-clock seconds), synchronising CUDA around it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return result, time.perf_counter() - start


QUIET_LOAD_PER_CORE = 0.25  # background load (beyond the benchmark's own) below which a machine counts as quiet


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15-minute load averages (/proc/loadavg); zeros where the platform has none."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def quiet_threshold(cores: int, own_load: float = 1.0) -> float:
    """The highest 1-minute load average still counted as quiet on `cores` cores."""
    return QUIET_LOAD_PER_CORE * cores + own_load


def conditions(load1_readings: list[float], cores: int, own_load: float = 1.0) -> str:
    """"quiet" when every 1-minute load average reading stayed below `quiet_threshold`, else "under load (...)"."""
    highest = max(load1_readings, default=0.0)
    if highest < quiet_threshold(cores, own_load):
        return "quiet"
    return f"under load (load avg {highest:.2f})"


@dataclass
class RoundStats:
    """One implementation's times over the interleaved rounds, with the load averages around each round."""

    seconds: list[float]  # every round, in round order
    load_before: list[tuple[float, float, float]] = field(default_factory=list)
    load_after: list[tuple[float, float, float]] = field(default_factory=list)
    conditions: str = "quiet"

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: 0.1 means the rounds lay within 10% of the median."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "seconds_median": self.median,
            "seconds_min": self.min,
            "seconds_max": self.max,
            "spread": self.spread,
            "seconds_per_round": list(self.seconds),
            "load_average_before_rounds": [[round(x, 2) for x in load] for load in self.load_before],
            "load_average_after_rounds": [[round(x, 2) for x in load] for load in self.load_after],
            "conditions": self.conditions,
        }


@dataclass
class Interleaved:
    """What `interleaved_rounds` measured: per-implementation stats, the order run, and medians' ratios."""

    stats: dict[str, RoundStats]
    order: list[str]  # implementation names in the order they ran, all rounds
    reference: str | None
    conditions: str
    cores: int
    quiet_below: float

    def ratios(self) -> dict[str, float]:
        """Median time of the reference over the median of each implementation (> 1: faster than the reference)."""
        if self.reference is None:
            return {}
        ref = self.stats[self.reference].median
        return {name: ref / s.median for name, s in self.stats.items() if s.median > 0}

    def to_dict(self) -> dict:
        return {
            "rounds": len(next(iter(self.stats.values())).seconds) if self.stats else 0,
            "order": self.order,
            "reference": self.reference,
            "speedup_vs_reference_of_medians": self.ratios(),
            "conditions": self.conditions,
            "cores": self.cores,
            "quiet_below_load1": self.quiet_below,
            "implementations": {name: s.to_dict() for name, s in self.stats.items()},
        }


def interleaved_order(names: list[str], rounds: int) -> list[list[str]]:
    """The order of each round: forward in even rounds, reversed in odd ones (ABBA...), so neither side always runs
    first (warm caches, thermal state) nor always last."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(max(1, rounds))]


def interleaved_rounds(
    implementations: dict[str, Callable[[], object]],
    rounds: int,
    reference: str | None = None,
    *,
    own_load: float = 1.0,
    load_reader: Callable[[], tuple[float, float, float]] = load_average,
    cores: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
    device: str = "cpu",
) -> Interleaved:
    """Run every implementation once per round, alternating the order (see `interleaved_order`).

    A callable that returns a number has timed its own work (e.g. in a worker process, leaving out its start-up) and
    that number is the round's seconds; otherwise the round's seconds are the wall-clock time of the call (CUDA
    synchronised on `device` "cuda"). `reference`: the implementation the others' medians are compared with.
    `own_load`: the load the benchmark itself adds to the load average (its busy threads), not counted as load."""
    if reference is not None and reference not in implementations:
        raise ValueError(f"reference {reference!r} is not one of {list(implementations)}")
    cores = cores or cpu_cores()
    stats = {name: RoundStats(seconds=[]) for name in implementations}
    order: list[str] = []
    for names in interleaved_order(list(implementations), rounds):
        for name in names:
            before = tuple(load_reader())
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            start = clock()
            returned = implementations[name]()
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            elapsed = clock() - start
            seconds = float(returned) if isinstance(returned, (int, float)) and not isinstance(returned, bool) else elapsed
            after = tuple(load_reader())
            s = stats[name]
            s.seconds.append(seconds)
            s.load_before.append(before)
            s.load_after.append(after)
            order.append(name)
    for s in stats.values():
        s.conditions = conditions([load[0] for load in s.load_before + s.load_after], cores, own_load)
    every = [load[0] for s in stats.values() for load in s.load_before + s.load_after]
    return Interleaved(
        stats=stats, order=order, reference=reference, conditions=conditions(every, cores, own_load),
        cores=cores, quiet_below=quiet_threshold(cores, own_load),
    )


def run_worker(module: str, args: list[str], result_file: Path, timeout: float | None = None) -> dict:
    """Run `python -m <module> <args>` in a fresh process with this checkout first on the path; return the JSON it
    wrote to `result_file`. A failing worker raises ColinternError with the end of its output."""
    package_parent = str(PACKAGE_DIR.parent)  # the checkout, or site-packages when installed
    env = dict(os.environ)
    env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    completed = subprocess.run(
        [sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if completed.returncode != 0 or not result_file.is_file():
        tail = (completed.stderr or completed.stdout or "").strip().splitlines()[-15:]
        raise ColinternError(f"benchmark worker `{module} {' '.join(args)}` failed:\n" + "\n".join(tail))
    return json.loads(result_file.read_text())


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain-text table (Markdown pipe syntax, so it pastes into a README as is)."""

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in text]
    return "\n".join(lines)
