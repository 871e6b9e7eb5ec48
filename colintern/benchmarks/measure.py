"""Measuring helpers shared by the sub-benchmarks: peak memory of a piece of work, isolated worker processes, tables.

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
import subprocess
import sys
import time
from collections.abc import Callable
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
