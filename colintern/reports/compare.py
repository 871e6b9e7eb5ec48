"""Compare result sets: a task x model table of one metric, averages per benchmark, ranks among the published
reference models, deltas to a baseline; as text, Markdown (for a model card) and a grouped bar chart.

    from colintern.reports.compare import compare_models
    comparison = compare_models(["experiments/demo", "colpali-v1.3"], metric="ndcg_at_5")
    print(comparison.to_text())

Missing is never zero: a task a model was not evaluated on is shown as missing and left out of its averages, and
every average says how many of the benchmark's tasks it covers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from colintern.mteb_results import PER_QUERY_METRICS
from colintern.reports.intervals import (
    DEFAULT_DRAWS,
    DEFAULT_SEED,
    LEVEL,
    Interval,
    bootstrap,
    paired_bootstrap,
    strata,
)
from colintern.reports.intervals import verdict as paired_verdict
from colintern.reports.results import (
    DEFAULT_EVALUATION_ROOT,
    DEFAULT_METRIC,
    KNOWN_BENCHMARKS,
    OTHER_TASKS,
    ResultSet,
    benchmark_main_metric,
    benchmark_of,
    benchmark_tasks,
    check_metric,
    load_reference_models,
    metric_label,
    resolve_result_sets,
)
from colintern.utils import ColinternError

logger = logging.getLogger(__name__)

MISSING = "—"


@dataclass
class TaskGroup:
    """Rows of the table that belong together: a benchmark's tasks (averaged) or the tasks of no known benchmark."""

    name: str
    tasks: list[str]
    size: int | None  # tasks in the benchmark; None for the group of other tasks, which gets no average


@dataclass
class Average:
    mean: float | None
    n_tasks: int  # tasks the mean is over
    of: int  # tasks in the benchmark


@dataclass
class Rank:
    position: int  # 1 = best
    of: int  # the model and the reference models that have all the tasks it is ranked on
    n_tasks: int  # the tasks the ranking is computed on (those the model has)
    left_out: int  # reference models lacking some of those tasks (or some of their language subsets)


@dataclass
class Comparison:
    metric: str
    result_sets: list[ResultSet]
    baseline: ResultSet
    groups: list[TaskGroup]
    references: list[ResultSet]
    draws: int = DEFAULT_DRAWS  # bootstrap draws for the confidence intervals (0: none)
    seed: int = DEFAULT_SEED

    # ---------------------------------------------------------------------------------------------------- figures

    def score(self, result_set: ResultSet, task: str) -> float | None:
        return result_set.score(task, self.metric)

    def average(self, result_set: ResultSet, group: TaskGroup) -> Average:
        """Mean over the benchmark's tasks this model has; `n_tasks` of `of` says how complete it is."""
        members = benchmark_tasks(group.name) if group.size else group.tasks
        values = [v for v in (self.score(result_set, t) for t in members) if v is not None]
        return Average(sum(values) / len(values) if values else None, len(values), group.size or len(group.tasks))

    def rank(self, result_set: ResultSet, group: TaskGroup) -> Rank | None:
        """Rank among the reference models on the group's tasks the model has (references lacking any of them are
        left out); None when the model has none of them or no reference qualifies."""
        if not group.size:
            return None
        members = benchmark_tasks(group.name)
        covered = [t for t in members if self.score(result_set, t) is not None]
        if not covered:
            return None
        own = sum(self.score(result_set, t) for t in covered) / len(covered)
        others = [r for r in self.references if r is not result_set and r.model_name != result_set.model_name]
        # a reference lacking language subsets of a task is not comparable on it (mteb averaged fewer languages)
        eligible = [r for r in others if all(self.score(r, t) is not None and not r.tasks[t].missing_subsets
                                             for t in covered)]
        if not eligible:
            return None
        means = [sum(self.score(r, t) for t in covered) / len(covered) for r in eligible]
        return Rank(1 + sum(m > own for m in means), len(eligible) + 1, len(covered), len(others) - len(eligible))

    def delta(self, result_set: ResultSet, task: str) -> float | None:
        mine, base = self.score(result_set, task), self.score(self.baseline, task)
        return None if mine is None or base is None else mine - base

    def average_delta(self, result_set: ResultSet, group: TaskGroup) -> tuple[float | None, int]:
        """Mean difference to the baseline over the group's tasks both have, and how many tasks that is."""
        members = benchmark_tasks(group.name) if group.size else group.tasks
        deltas = [d for d in (self.delta(result_set, t) for t in members) if d is not None]
        return (sum(deltas) / len(deltas) if deltas else None), len(deltas)

    def heading(self, group: TaskGroup) -> str:
        """The group's name, with a note when its leaderboard ranks by another metric than the one shown."""
        if not group.size or self.metric == "main_score":
            return group.name
        main = benchmark_main_metric(group.name)
        if main in (self.metric, "main_score"):
            return group.name
        return f"{group.name}  (its leaderboard ranks by {metric_label(main)}: --metric main_score)"

    # ------------------------------------------------------------------------------------- confidence intervals

    def _task_metric(self, result_set: ResultSet, task: str) -> str | None:
        if self.metric != "main_score":
            return self.metric
        scores = result_set.tasks.get(task)
        return scores.main_metric if scores else None

    def _splits(self, result_set: ResultSet, task: str) -> list[str] | None:
        scores = result_set.tasks.get(task)
        return scores.split.split(",") if scores and scores.split else None

    def intervals(self, result_set: ResultSet, group: TaskGroup) -> tuple[dict[str, Interval], Interval | None]:
        """95% bootstrap intervals of the group's tasks the model has per-query scores for, and of their mean (for
        a benchmark, only when every task of the model's average has them)."""
        if not self.draws or not result_set.per_query:
            return {}, None
        values = {}
        for task in group.tasks:
            if task in result_set.per_query and (metric := self._task_metric(result_set, task)):
                found = strata(result_set.per_query[task], metric, self._splits(result_set, task))
                if found:
                    values[task] = found
        per_task, mean = bootstrap(values, self.draws, self.seed)
        average = self.average(result_set, group)
        if not group.size or len(per_task) != average.n_tasks:
            mean = None
        return per_task, mean

    def paired(self, a: ResultSet, b: ResultSet, group: TaskGroup) -> tuple[dict[str, Interval], Interval | None]:
        """A - B on the group's tasks both have per-query scores for (same resampled queries), and on their mean."""
        if not self.draws:
            return {}, None
        tasks = [t for t in group.tasks if t in a.per_query and t in b.per_query]
        metrics = {t: self._task_metric(a, t) for t in tasks}
        per_task, mean = paired_bootstrap({t: a.per_query[t] for t in tasks}, {t: b.per_query[t] for t in tasks},
                                          metrics, {t: self._splits(a, t) for t in tasks}, self.draws, self.seed)
        return per_task, mean if group.size else None

    def interval_lines(self) -> list[str]:
        """The intervals and paired results as text; [] when no compared model has per-query scores."""
        own = [rs for rs in self.result_sets if rs.per_query]
        if not own or not self.draws:
            return []
        label = metric_label(self.metric)
        single = []
        for rs in own:
            for group in self.groups:
                per_task, mean = self.intervals(rs, group)
                for task, interval in per_task.items():
                    single.append(f"  {rs.label}  {task}: {_fmt_interval(interval)}")
                if mean is not None:
                    single.append(f"  {rs.label}  {group.name} mean: {_fmt_interval(mean)}")
        if not single:
            kept = ", ".join(metric_label(m) for m in PER_QUERY_METRICS)
            return [f"No confidence intervals for {label}: per-query scores are kept for {kept} (--metric)."]
        lines = [f"{round(100 * LEVEL)}% bootstrap intervals ({label} x100; queries resampled within each task and "
                 f"language, {self.draws} draws, seed {self.seed}); references have no per-query scores", *single]
        baseline = self.baseline if self.baseline.per_query else own[0]
        paired = []
        for a in (rs for rs in own if rs is not baseline):
            for group in self.groups:
                per_task, mean = self.paired(a, baseline, group)
                paired += ["  " + paired_verdict(a.label, baseline.label, t, i) for t, i in per_task.items()]
                if mean is not None:
                    paired.append("  " + paired_verdict(a.label, baseline.label, group.name, mean))
        if paired:
            lines += ["", f"Paired bootstrap ({label} x100; the same resampled queries for both runs)", *paired]
        return lines

    # ---------------------------------------------------------------------------------------------------- tables

    def score_rows(self) -> tuple[list[str], list[tuple[str, list[str]] | str]]:
        """Header and rows of the main table; a str row is a group heading."""
        header = ["task"] + [rs.label for rs in self.result_sets]
        rows: list[tuple[str, list[str]] | str] = []
        n_references = len(self.references)
        for group in self.groups:
            rows.append(self.heading(group))
            for task in group.tasks:
                rows.append((task, [_fmt(self.score(rs, task)) for rs in self.result_sets]))
            if group.size:
                averages = [self.average(rs, group) for rs in self.result_sets]
                rows.append(
                    (
                        "average (tasks covered)",
                        [f"{_fmt(a.mean)} ({a.n_tasks}/{a.of})" for a in averages],
                    )
                )
                if n_references:
                    ranks = [self.rank(rs, group) for rs in self.result_sets]
                    rows.append((f"rank among {n_references} references", [_fmt_rank(r) for r in ranks]))
        return header, rows

    def delta_rows(self) -> tuple[list[str], list[tuple[str, list[str]] | str]] | None:
        others = [rs for rs in self.result_sets if rs is not self.baseline]
        if not others:
            return None
        header = ["task"] + [rs.label for rs in others]
        rows: list[tuple[str, list[str]] | str] = []
        for group in self.groups:
            rows.append(group.name)
            for task in group.tasks:
                rows.append((task, [_fmt(self.delta(rs, task), signed=True) for rs in others]))
            pairs = [self.average_delta(rs, group) for rs in others]
            rows.append(
                ("mean delta (common tasks)", [f"{_fmt(d, signed=True)} (n={n})" if n else MISSING for d, n in pairs])
            )
        return header, rows

    def to_text(self) -> str:
        label = metric_label(self.metric)
        parts = [
            f"{label} (x100).  {MISSING} = not evaluated; averages count only evaluated tasks (covered/in benchmark)",
            _render_text(*self.score_rows()),
        ]
        deltas = self.delta_rows()
        if deltas:
            parts += ["", f"Delta to the baseline {self.baseline.label} ({label} x100, on tasks both have)"]
            parts.append(_render_text(*deltas))
        intervals = self.interval_lines()
        if intervals:
            parts += ["", *intervals]
        parts += ["", *self.source_lines()]
        return "\n".join(parts)

    def to_markdown(self) -> str:
        label = metric_label(self.metric)
        parts = [
            f"**{label}** (x100). {MISSING} = not evaluated; averages are over the evaluated tasks "
            "(covered/in benchmark).",
            "",
            _render_markdown(*self.score_rows()),
        ]
        deltas = self.delta_rows()
        if deltas:
            parts += ["", f"**Delta to {self.baseline.label}** ({label} x100, on tasks both have).", ""]
            parts.append(_render_markdown(*deltas))
        intervals = self.interval_lines()
        if intervals:
            parts += ["", "```", *intervals, "```"]
        parts += ["", *(f"- {line}" for line in self.source_lines())]
        return "\n".join(parts) + "\n"

    def source_lines(self) -> list[str]:
        lines = []
        for rs in self.result_sets:
            versions = sorted({t.mteb_version for t in rs.tasks.values() if t.mteb_version})
            kind = "reference" if rs.is_reference else "results"
            mteb_versions = ", ".join(versions) or "unknown"
            lines.append(f"{rs.label}: {kind} from {_display_path(rs.origin)} (mteb {mteb_versions})")
        if self.references:
            commits = sorted({(r.source_commit or "unknown")[:7] for r in self.references})
            lines.append(
                f"ranks: among the {len(self.references)} reference models of results/leaderboard/ (public mteb "
                f"results, commit {', '.join(commits)}), on the tasks the ranked model has"
            )
        return lines

    # ------------------------------------------------------------------------------------------------------ plot

    def plot(self, path: str | Path) -> Path:
        """Grouped bars: one panel per task group, one bar per model and task, plus each benchmark's average."""
        return plot_comparison(self, path)


def compare_models(
    names: Sequence[str],
    metric: str = DEFAULT_METRIC,
    baseline: str | None = None,
    benchmarks: Sequence[str] | None = None,
    evaluation_root: str | Path = DEFAULT_EVALUATION_ROOT,
    leaderboard_dir: str | Path | None = None,
    draws: int = DEFAULT_DRAWS,
    seed: int = DEFAULT_SEED,
) -> Comparison:
    """Resolve `names` (folders, evaluated model names, reference models) and build their comparison."""
    if not names:
        raise ColinternError("name at least one result folder, evaluated model or reference model to compare")
    references = load_reference_models(leaderboard_dir)
    result_sets = resolve_result_sets(names, evaluation_root, references=references)
    comparison = build_comparison(result_sets, metric, baseline=baseline, benchmarks=benchmarks,
                                  references=references)
    comparison.draws, comparison.seed = draws, seed
    return comparison


def build_comparison(
    result_sets: Sequence[ResultSet],
    metric: str = DEFAULT_METRIC,
    baseline: str | None = None,
    benchmarks: Sequence[str] | None = None,
    references: Sequence[ResultSet] = (),
) -> Comparison:
    """Group the tasks the result sets have by benchmark and fix the baseline (a label, model name or position)."""
    result_sets = list(result_sets)
    metric = check_metric(metric, result_sets)
    groups = task_groups({t for rs in result_sets for t in rs.tasks}, benchmarks)
    if not groups:
        wanted = ", ".join(benchmarks or ())
        raise ColinternError(f"none of the compared results has a task in {wanted or 'any benchmark'}")
    return Comparison(metric, result_sets, _pick_baseline(result_sets, baseline), groups, list(references))


def task_groups(task_names: set[str], benchmarks: Sequence[str] | None = None) -> list[TaskGroup]:
    """Known benchmarks first (tasks in mteb's order), then the tasks of no known benchmark."""
    known = list(KNOWN_BENCHMARKS)
    if benchmarks:
        unknown = [b for b in benchmarks if b not in known and b != OTHER_TASKS]
        for name in unknown:
            try:
                benchmark_tasks(name)
            except Exception as error:  # noqa: BLE001 - mteb raises KeyError/ValueError for unknown names
                raise ColinternError(f"unknown benchmark {name!r}: {error}") from error
        known += unknown
    groups = []
    for name in known:
        if benchmarks and name not in benchmarks:
            continue
        tasks = [t for t in benchmark_tasks(name) if t in task_names]
        if tasks:
            groups.append(TaskGroup(name, tasks, len(benchmark_tasks(name))))
    other = sorted(t for t in task_names if benchmark_of(t, known) is None)
    if other and (not benchmarks or OTHER_TASKS in benchmarks):
        groups.append(TaskGroup(OTHER_TASKS, other, None))
    return groups


def _pick_baseline(result_sets: list[ResultSet], baseline: str | None) -> ResultSet:
    if baseline is None:
        return result_sets[0]
    if baseline.isdigit() and 1 <= int(baseline) <= len(result_sets):
        return result_sets[int(baseline) - 1]
    for rs in result_sets:
        if baseline in (rs.label, rs.model_name, rs.short_name):
            return rs
    labels = ", ".join(rs.label for rs in result_sets)
    raise ColinternError(f"baseline {baseline!r} is not one of the compared results ({labels}); pass one of them "
                         "or its position (1 = first)")


def _display_path(path: str) -> str:
    """A path relative to the working directory when it lies below it (shorter in tables and model cards)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _fmt_interval(interval: Interval) -> str:
    return (f"{100 * interval.estimate:.2f} [{100 * interval.low:.2f}, {100 * interval.high:.2f}] "
            f"(n={interval.n_queries} queries" + (f", {interval.n_tasks} tasks)" if interval.n_tasks > 1 else ")"))


def _fmt_rank(rank: Rank | None) -> str:
    if rank is None:
        return MISSING
    partial = "" if rank.left_out == 0 else f", {rank.left_out} left out"
    return f"{rank.position}/{rank.of}{partial}"


def _render_text(header: list[str], rows: list) -> str:
    """Aligned columns: the task column left-aligned (data rows indented under their group heading), numbers right."""
    data = [row for row in rows if not isinstance(row, str)]
    width0 = max([len(header[0])] + [len(label) + 2 for label, _ in data])
    widths = [max([len(header[i])] + [len(cells[i - 1]) for _, cells in data]) for i in range(1, len(header))]

    def line(first: str, cells: list[str]) -> str:
        return "  ".join([first.ljust(width0)] + [c.rjust(w) for c, w in zip(cells, widths, strict=True)]).rstrip()

    lines = [line(header[0], header[1:])]
    for row in rows:
        lines.append(row if isinstance(row, str) else line("  " + row[0], row[1]))
    return "\n".join(lines)


def _render_markdown(header: list[str], rows: list) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        if isinstance(row, str):
            lines.append(f"| **{esc(row)}** |" + " |" * (len(header) - 1))
        else:
            lines.append("| " + " | ".join([esc(row[0])] + [esc(c) for c in row[1]]) + " |")
    return "\n".join(lines)


def _short_task(task: str) -> str:
    """'VidoreSyntheticDocQAEnergyRetrieval' -> 'SyntheticDocQAEnergy' for axis labels."""
    for prefix in ("Vidore3", "Vidore2", "Vidore"):
        if task.startswith(prefix) and len(task) > len(prefix):
            task = task[len(prefix) :]
            break
    return task[: -len("Retrieval")] if task.endswith("Retrieval") and len(task) > len("Retrieval") else task


def plot_comparison(comparison: Comparison, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    groups = comparison.groups
    models = comparison.result_sets
    slots_per_group = [len(g.tasks) + (1 if g.size else 0) for g in groups]
    width = min(28.0, max(8.0, 0.35 * max(slots_per_group) * max(2, len(models)) + 2.5))
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(width, 4.0 * len(groups) + 1.0), squeeze=False, layout="constrained"
    )
    colours = plt.get_cmap("tab10" if len(models) <= 10 else "tab20").colors
    bar_width = 0.8 / len(models)
    label = metric_label(comparison.metric)
    annotate = max(slots_per_group) * len(models) <= 48
    for ax, group, n_slots in zip(axes[:, 0], groups, slots_per_group, strict=True):
        x = np.arange(n_slots, dtype=float)
        names = [_short_task(t) for t in group.tasks]
        if group.size:
            names.append("average")
        for index, rs in enumerate(models):
            values = [comparison.score(rs, t) for t in group.tasks]
            texts = [f"{100 * v:.1f}" if v is not None else "" for v in values]
            if group.size:
                average = comparison.average(rs, group)
                values.append(average.mean)
                coverage = "" if average.n_tasks == average.of else f"\n{average.n_tasks}/{average.of}"
                texts.append(f"{100 * average.mean:.1f}{coverage}" if average.mean is not None else "")
            offsets = x - 0.4 + bar_width * (index + 0.5)
            for offset, value, text in zip(offsets, values, texts, strict=True):
                if value is None:
                    ax.text(offset, 1.5, "n/a", ha="center", va="bottom", rotation=90, fontsize=7, color="0.45")
                    continue
                bar = ax.bar(offset, 100 * value, bar_width * 0.95, color=colours[index % len(colours)])
                if annotate:
                    ax.bar_label(bar, labels=[text], fontsize=7, padding=1)
        if group.size:
            ax.axvline(n_slots - 1.5, color="0.6", linewidth=0.8, linestyle="--")
        ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
        ax.set_xlim(-0.6, n_slots - 0.4)
        ax.set_ylim(0, 108)
        ax.set_ylabel(f"{label} (x100)")
        title = comparison.heading(group)
        if group.size:
            title += f"; {len(group.tasks)} of its {group.size} tasks shown"
        ax.set_title(title, fontsize=11)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i % len(colours)]) for i in range(len(models))]
    fig.suptitle(f"{label} per task ('n/a' = not evaluated; averages over the evaluated tasks)", fontsize=12)
    fig.legend(handles, [rs.label for rs in models], loc="outside lower center", ncol=min(4, len(models)),
               fontsize=9, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
