"""Bootstrap confidence intervals and paired tests from per-query scores (`per_query/{Task}.json` beside mteb's
files, written by `colintern.evaluation.evaluate`).

A task's score is mteb's: the mean over its queries within each language subset (split), then the mean over the
subsets. A bootstrap draw resamples the queries of each subset with replacement (stratified, so every subset keeps
its size) and recomputes that; a benchmark mean's draw averages one draw per task (tasks are resampled
independently). The 95% interval is the 2.5th-97.5th percentile of the draws. A paired test between two runs draws
the same queries for both (queries both were scored on) and gives the interval of the difference: "A beats B"
when it excludes zero.

Leaderboard references have no per-query scores, so they get no intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_DRAWS = 1000
DEFAULT_SEED = 0
LEVEL = 0.95

# {split: {subset: {query id: {metric: value}}}}, as colintern.mteb_results.read_per_query returns it.
PerQuery = dict[str, dict[str, dict[str, dict[str, float]]]]


@dataclass
class Interval:
    estimate: float  # the score itself (equal to the table's, from the same per-query values)
    low: float
    high: float
    n_queries: int
    n_tasks: int = 1

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def strata(per_query: PerQuery, metric: str, splits: Sequence[str] | None = None) -> dict[tuple[str, str], np.ndarray]:
    """(split, subset) -> the metric's per-query values; {} when the metric is not among them."""
    out = {}
    for split, subsets in per_query.items():
        if splits is not None and split not in splits:
            continue
        for subset, rows in subsets.items():
            if not rows or any(metric not in row for row in rows.values()):
                return {}
            out[(split, subset)] = np.array([rows[q][metric] for q in sorted(rows)], dtype=np.float64)
    return out


def _draw_indices(sizes: dict[tuple[str, str], int], draws: int, rng: np.random.Generator) -> dict:
    return {key: rng.integers(0, n, size=(draws, n)) for key, n in sizes.items()}


def _task_draws(values: dict[tuple[str, str], np.ndarray], indices: dict) -> np.ndarray:
    return np.mean([values[key][indices[key]].mean(axis=1) for key in values], axis=0)


def _task_estimate(values: dict[tuple[str, str], np.ndarray]) -> float:
    return float(np.mean([v.mean() for v in values.values()]))


def _interval(estimate: float, draws: np.ndarray, n_queries: int, n_tasks: int) -> Interval:
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), n_queries, n_tasks)


def bootstrap(tasks: dict[str, dict[tuple[str, str], np.ndarray]], draws: int = DEFAULT_DRAWS,
              seed: int = DEFAULT_SEED) -> tuple[dict[str, Interval], Interval | None]:
    """Per-task intervals and the interval of the mean over the tasks, from {task: strata(...)}."""
    rng = np.random.default_rng(seed)
    per_task, all_draws = {}, []
    for task, values in sorted(tasks.items()):
        task_draws = _task_draws(values, _draw_indices({k: len(v) for k, v in values.items()}, draws, rng))
        n = sum(len(v) for v in values.values())
        per_task[task] = _interval(_task_estimate(values), task_draws, n, 1)
        all_draws.append(task_draws)
    return per_task, _mean_interval(per_task, all_draws)


def paired_bootstrap(a: dict[str, PerQuery], b: dict[str, PerQuery], metric: str | dict[str, str],
                     splits: dict[str, Sequence[str] | None] | None = None, draws: int = DEFAULT_DRAWS,
                     seed: int = DEFAULT_SEED) -> tuple[dict[str, Interval], Interval | None]:
    """Intervals of A - B per task and for the mean over the tasks, on the queries both runs were scored on (the
    same resampled queries for both). `metric`: one metric, or one per task."""
    rng = np.random.default_rng(seed)
    per_task, all_draws = {}, []
    for task in sorted(set(a) & set(b)):
        name = metric if isinstance(metric, str) else metric.get(task)
        wanted = (splits or {}).get(task)
        common = {}
        for split, subsets in a[task].items():
            for subset, rows in subsets.items():
                other = b[task].get(split, {}).get(subset)
                if other is not None and (wanted is None or split in wanted):
                    ids = sorted(set(rows) & set(other))
                    if ids:
                        common[(split, subset)] = ids
        if not name or not common:
            continue
        try:
            va, vb = ({key: np.array([run[task][key[0]][key[1]][q][name] for q in ids], dtype=np.float64)
                       for key, ids in common.items()} for run in (a, b))
        except KeyError:  # the metric is not among the per-query scores
            continue
        diff = {key: va[key] - vb[key] for key in va}
        indices = _draw_indices({k: len(v) for k, v in diff.items()}, draws, rng)
        task_draws = _task_draws(diff, indices)
        per_task[task] = _interval(_task_estimate(diff), task_draws, sum(len(v) for v in diff.values()), 1)
        all_draws.append(task_draws)
    return per_task, _mean_interval(per_task, all_draws)


def verdict(a: str, b: str, where: str, interval: Interval, scale: float = 100.0) -> str:
    """'A beats B on ViDoRe(v1): +1.30, 95% CI [0.40, 2.20]' (x100), 'B beats A ...' or 'no significant
    difference'."""
    figures = (f"{scale * interval.estimate:+.2f}, {round(100 * LEVEL)}% CI [{scale * interval.low:.2f}, "
               f"{scale * interval.high:.2f}]")
    counts = f"({interval.n_queries} paired queries" + (f", {interval.n_tasks} tasks)" if interval.n_tasks > 1 else ")")
    if interval.low > 0:
        return f"{a} beats {b} on {where}: {figures} {counts}"
    if interval.high < 0:
        return f"{b} beats {a} on {where}: {scale * -interval.estimate:+.2f}, {round(100 * LEVEL)}% CI " \
               f"[{scale * -interval.high:.2f}, {scale * -interval.low:.2f}] {counts}"
    return f"no significant difference between {a} and {b} on {where}: {figures} {counts}"


def _mean_interval(per_task: dict[str, Interval], all_draws: list) -> Interval | None:
    """The interval of the mean over the tasks, from the tasks' own draws (None without tasks)."""
    if not per_task:
        return None
    estimate = float(np.mean([i.estimate for i in per_task.values()]))
    total = sum(i.n_queries for i in per_task.values())
    return _interval(estimate, np.mean(all_draws, axis=0), total, len(per_task))
