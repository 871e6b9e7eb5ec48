"""Score tables of one model from its mteb result files: NDCG@5, NDCG@10 and Recall@100 per task, and benchmark
averages. The files are read by `colintern.mteb_results` (`TaskScores`, `read_task_result`, `task_scores`), the one
reader the reports use too.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from colintern.mteb_results import (
    KNOWN_BENCHMARKS,
    TaskScores,
    benchmark_tasks,
    read_task_result,
    task_main_metric,
    task_scores,
)

logger = logging.getLogger(__name__)

TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("ndcg_at_5", "NDCG@5"),
    ("ndcg_at_10", "NDCG@10"),
    ("recall_at_100", "Recall@100"),
)


@dataclass
class BenchmarkAverage:
    """Mean of each metric over a benchmark's tasks that have results (`n_tasks` of `n_total`)."""

    label: str
    n_tasks: int
    n_total: int
    scores: dict[str, float] = field(default_factory=dict)
    n_private: int = 0  # of n_total, tasks whose data is private (not run here, see colintern.evaluation.tasks)

    @property
    def complete(self) -> bool:
        return self.n_tasks == self.n_total


def main_metric(task_name: str) -> str:
    """A task's main metric: colintern's own tasks (SynthDocs, local folders: NDCG@5), else mteb's registry."""
    from colintern.evaluation.tasks import LOCAL_TASKS

    if task_name in LOCAL_TASKS:
        return LOCAL_TASKS[task_name].metadata.main_score
    return task_main_metric(task_name) or "ndcg_at_5"


@functools.cache
def private_task(task_name: str) -> bool:
    """Whether mteb marks `task_name`'s data as private (`is_public=False`); False for tasks mteb does not know."""
    import mteb

    try:
        return mteb.get_task(task_name).metadata.is_public is False
    except Exception:  # noqa: BLE001 - a local task
        return False


def average(label: str, rows: Sequence[TaskScores], n_total: int, n_private: int = 0) -> BenchmarkAverage:
    """Each metric's mean over the rows that have it (every table metric is present, NaN when no row has it)."""
    keys = [key for key, _label in TABLE_METRICS]
    keys += sorted({key for row in rows for key in row.scores} - set(keys))
    scores = {}
    for key in keys:
        values = [row.scores[key] for row in rows if not math.isnan(row.scores.get(key, math.nan))]
        scores[key] = sum(values) / len(values) if values else math.nan
    return BenchmarkAverage(label=label, n_tasks=len(rows), n_total=n_total, scores=scores, n_private=n_private)


def results_table(
    results_dir: str | Path,
    benchmarks: Sequence[tuple[str, Sequence[str]]] | None = None,
    split: str = "test",
) -> tuple[list[TaskScores], list[BenchmarkAverage]]:
    """Rows and averages from the mteb result files of one model revision.

    Args:
        results_dir: `{cache}/results/{model}/{revision}`, holding `{Task}.json` files (or the model folder above it
            when it holds a single revision).
        benchmarks: (label, task names) groups to average, in display order; default every task file found, with
            averages for the ViDoRe benchmarks whose tasks are present.
        split: which split's scores to show.

    Returns:
        (rows, averages). Tasks without a result file are left out of the rows and counted in the averages'
        `n_total` only: a missing task is shown as missing, never as zero.
    """
    results_dir = _revision_folder(Path(results_dir))
    files = {p.stem: p for p in sorted(results_dir.glob("*.json")) if p.name != "model_meta.json"}
    if benchmarks is None:
        benchmarks = [(name, [name]) for name in files] + _known_benchmarks(set(files))
    rows: dict[str, TaskScores] = {}
    averages = []
    for label, task_names in benchmarks:
        present = []
        for name in task_names:
            if name not in rows and name in files:
                try:
                    rows[name] = task_scores(read_task_result(files[name]), split, files[name], main_metric(name))
                except KeyError as error:
                    logger.warning("%s", error)
                    continue
            if name in rows:
                present.append(rows[name])
        if len(task_names) > 1:
            n_private = sum(private_task(name) and name not in rows for name in task_names)
            averages.append(average(label, present, len(task_names), n_private))
    return list(rows.values()), averages


def _revision_folder(path: Path) -> Path:
    """`path` if it holds task JSON files, else its only revision subfolder."""
    from colintern.utils import ColinternError

    if not path.is_dir():
        raise ColinternError(f"{path}: no such results folder.")
    if any(p.name != "model_meta.json" for p in path.glob("*.json")):
        return path
    revisions = [p for p in sorted(path.iterdir()) if p.is_dir() and any(p.glob("*.json"))]
    if len(revisions) == 1:
        return revisions[0]
    if not revisions:
        raise ColinternError(f"{path} holds no mteb result files ({{Task}}.json).")
    raise ColinternError(
        f"{path} holds results of several revisions ({', '.join(p.name for p in revisions)}): pass one of them."
    )


def _known_benchmarks(task_names: set[str]) -> list[tuple[str, list[str]]]:
    groups = []
    for name in KNOWN_BENCHMARKS:
        members = list(benchmark_tasks(name))
        if task_names & set(members):
            groups.append((name, members))
    return groups


def _format_score(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _format_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(
    rows: Sequence[TaskScores], averages: Sequence[BenchmarkAverage] = (), not_run: Sequence[tuple[str, str]] = ()
) -> str:
    """A Markdown table: one row per task (scores x100, as on the mteb leaderboard), a row per task not run
    (`not_run`: (task, reason), e.g. "private: not run"), then the averages."""
    show_rates = any(row.pages_per_s is not None or row.queries_per_s is not None for row in rows)
    header = ["Task", *(label for _key, label in TABLE_METRICS)]
    if show_rates:
        header += ["pages/s", "queries/s"]
    lines = [header]
    for row in rows:
        line = [row.task, *(_format_score(row.scores.get(key)) for key, _label in TABLE_METRICS)]
        if show_rates:
            line += [_format_rate(row.pages_per_s), _format_rate(row.queries_per_s)]
        lines.append(line)
    for task, reason in not_run:
        lines.append([task, reason, *([""] * (len(header) - 2))])
    for avg in averages:
        coverage = "" if avg.complete else f", {avg.n_tasks} of {avg.n_total} tasks"
        if avg.n_private:
            coverage += f" ({avg.n_private} private: not run)"
        line = [f"**{avg.label} average**{coverage}", *(_format_score(avg.scores.get(k)) for k, _l in TABLE_METRICS)]
        if show_rates:
            line += ["", ""]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        cells = [cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)]
        out.append("| " + " | ".join(cells) + " |")
        if index == 0:
            out.append("|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")
    return "\n".join(out)
