"""mteb result files, read one way for the whole package: `colintern.evaluation` (the scores of a run it just made)
and `colintern.reports` (comparisons, the leaderboard) both use this module.

mteb writes one `TaskResult` JSON per task, `{cache}/results/{model}/{revision}/{Task}.json`, with
`scores[split] = [{"hf_subset": ..., "ndcg_at_5": ..., "main_score": ..., ...}, ...]` (values in [0, 1]).
`read_task_result` loads one with mteb's own `TaskResult.from_disk`; `task_scores` flattens it to one value per
metric, averaged over the task's subsets (languages) by mteb's `TaskResult.get_score`.

Plumbing: imports nothing of colintern but `colintern.utils`, and mteb only inside the functions.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from colintern.utils import ColinternError

if TYPE_CHECKING:  # pragma: no cover
    from mteb import TaskResult

# Benchmarks whose tasks are grouped (and averaged) together, in display order. ViDoRe(v1)/(v2) rank by NDCG@5,
# ViDoRe(v3) and ViDoRe(v3.1) (the v3 corpora with each page's OCR text, tasks "<name>.v2") by NDCG@10 (mteb's main
# scores).
KNOWN_BENCHMARKS: tuple[str, ...] = ("ViDoRe(v1)", "ViDoRe(v2)", "ViDoRe(v3)", "ViDoRe(v3.1)")


@dataclass
class TaskScores:
    """One model's scores on one task: metric name -> value in [0, 1], averaged over the task's subsets.

    `computed`, `pages_per_s` and `queries_per_s` are set by `colintern.evaluation.evaluate` for the tasks it
    evaluated in that run (the others came from earlier result files).
    """

    task: str
    scores: dict[str, float]
    main_metric: str | None = None
    split: str | None = None
    mteb_version: str | None = None
    dataset_revision: str | None = None
    source: str | None = None  # the file it was read from, or the reference's source path
    evaluation_time_s: float | None = None
    computed: bool = False
    pages_per_s: float | None = None
    queries_per_s: float | None = None
    missing_subsets: tuple[str, ...] = ()  # language subsets of the task the result lacks (set for references)

    @property
    def main_score(self) -> float:
        return self.scores.get("main_score", math.nan)

    def get(self, metric: str) -> float | None:
        """The value of `metric` ("main_score": the task's main metric), None when missing or not finite."""
        if metric == "main_score":
            metric = self.main_metric or "main_score"
        value = self.scores.get(metric)
        return value if value is not None and math.isfinite(value) else None

    def as_dict(self) -> dict:
        """{"task", "split", "ndcg_at_5", ..., "main_score", "main_metric", "pages_per_s", "queries_per_s"}."""
        return {
            "task": self.task,
            "split": self.split,
            **self.scores,
            "main_score": self.main_score,
            "main_metric": self.main_metric,
            "pages_per_s": self.pages_per_s,
            "queries_per_s": self.queries_per_s,
        }


def read_task_result(path: str | Path) -> TaskResult:
    """Load one result file with mteb's own reader; a broken file is an error that names it."""
    from mteb import TaskResult

    try:
        return TaskResult.from_disk(Path(path))
    except Exception as error:  # noqa: BLE001 - pydantic/JSON errors: say which file
        raise ColinternError(
            f"{path} is not a readable mteb result file ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "Re-run the evaluation for that task (scripts/evaluate.py --overwrite) or remove the file."
        ) from error


def task_scores(
    result: TaskResult, split: str | None = None, source: str | Path | None = None, main_metric: str | None = None
) -> TaskScores:
    """Flatten an mteb `TaskResult` to per-metric values, averaged over subsets as `TaskResult.get_score` does.

    Args:
        split: the split to read; None: "test" when present (the ViDoRe evaluation split), else every split.
        main_metric: the task's main metric; None: looked up in mteb's registry (`task_main_metric`).

    Raises:
        KeyError when the result has no scores for `split`.
    """
    if split is not None and split not in result.scores:
        raise KeyError(f"{result.task_name} has no results for the {split} split (has: {', '.join(result.scores)})")
    splits = [split] if split is not None else ["test"] if "test" in result.scores else list(result.scores)
    entries = [entry for name in splits for entry in result.scores[name]]
    metrics = {
        key
        for key, value in (entries[0].items() if entries else ())
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    metrics = {key for key in metrics if all(isinstance(entry.get(key), int | float) for entry in entries)}
    scores = {}
    for key in sorted(metrics):
        value = float(result.get_score(splits=splits, getter=lambda s, k=key: s[k]))
        if math.isfinite(value):
            scores[key] = value
    return TaskScores(
        task=result.task_name,
        scores=scores,
        main_metric=main_metric or task_main_metric(result.task_name),
        split=",".join(splits),
        mteb_version=result.mteb_version,
        dataset_revision=result.dataset_revision,
        source=None if source is None else str(source),
        evaluation_time_s=result.evaluation_time,
    )


@functools.cache
def task_main_metric(task_name: str) -> str | None:
    """The task's main score name from mteb's registry; None for a task mteb does not know (e.g. a local one)."""
    import mteb

    try:
        return mteb.get_task(task_name).metadata.main_score
    except Exception:  # noqa: BLE001 - unknown or local task: its file's main_score stands
        return None


@functools.cache
def benchmark_tasks(name: str) -> tuple[str, ...]:
    """The task names of an mteb benchmark, in mteb's order (no data is downloaded)."""
    import mteb

    return tuple(task.metadata.name for task in mteb.get_benchmark(name).tasks)


def missing_subsets(result: TaskResult, split: str = "test") -> list[str]:
    """The task's language subsets (mteb's `hf_subsets`) that `result` has no `split` scores for; [] for a task mteb
    does not know. A ViDoRe(v3) result with 3 of its 6 languages averages only those 3: not comparable."""
    import mteb

    try:
        task = mteb.get_task(result.task_name)
    except Exception:  # noqa: BLE001 - unknown or local task: nothing to check against
        return []
    if split not in task.eval_splits:
        return []
    return sorted(result.get_missing_evaluations(task).get(split, []))


# ------------------------------------------------------------------------------------------- per-query scores
# Beside mteb's `{Task}.json`, colintern keeps each query's NDCG@5/@10 in `per_query/{Task}.json` (a subfolder, so
# mteb's `ResultCache`, which reads `{model}/{revision}/*.json`, never takes it for a task result): what bootstrap
# confidence intervals and paired tests need. The values are mteb's own (pytrec_eval's per-query scores, the ones
# mteb averages), captured through `AbsTaskRetrieval.task_specific_scores`, its hook for per-task extras.
PER_QUERY_DIR = "per_query"
PER_QUERY_FORMAT = "colintern-per-query/1"
PER_QUERY_METRICS: tuple[str, ...] = ("ndcg_at_5", "ndcg_at_10")


def per_query_path(results_dir: str | Path, task_name: str) -> Path:
    return Path(results_dir) / PER_QUERY_DIR / f"{task_name}.json"


class PerQueryRecorder:
    """`recorder = PerQueryRecorder(task).attach()`, `mteb.evaluate(model, task, ...)`, `recorder.detach()` (or
    `with PerQueryRecorder(task):`) keeps every query's NDCG@5/@10, per split and language subset;
    `.write(results_dir)` stores them (atomically). A task that is not a retrieval task records nothing."""

    def __init__(self, task) -> None:
        self.task = task
        self.scores: dict[str, dict[str, dict[str, list[float]]]] = {}  # split -> subset -> query id -> values

    def __enter__(self) -> PerQueryRecorder:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> PerQueryRecorder:
        original = getattr(self.task, "task_specific_scores", None)
        if original is None:
            return self

        def capture(scores, qrels, results, hf_split, hf_subset):
            keys = [f"ndcg_cut_{metric.rsplit('_', 1)[1]}" for metric in PER_QUERY_METRICS]
            if all(key in row for row in scores.values() for key in keys):
                self.scores.setdefault(hf_split, {})[hf_subset] = {
                    str(qid): [round(float(row[key]), 6) for key in keys] for qid, row in scores.items()
                }
            return original(scores, qrels, results, hf_split=hf_split, hf_subset=hf_subset)

        self.task.task_specific_scores = capture  # an instance attribute over mteb's method, removed on exit
        return self

    def detach(self) -> None:
        self.task.__dict__.pop("task_specific_scores", None)

    def write(self, results_dir: str | Path, *, replace: bool = False) -> Path | None:
        """Store what was recorded; subsets evaluated earlier (mteb's "only-missing" reruns) are kept unless
        `replace`. Returns the file, or None when nothing was recorded."""
        from colintern.utils import atomic_write_text

        if not self.scores:
            return None
        name = self.task.metadata.name
        path = per_query_path(results_dir, name)
        old = None if replace else read_per_query(path.parent.parent, name, check=False)
        merged = {split: dict(subsets) for split, subsets in (old or {}).items()}
        for split, subsets in self.scores.items():
            merged.setdefault(split, {}).update(subsets)
        record = {
            "format": PER_QUERY_FORMAT,
            "task": name,
            "dataset_revision": self.task.metadata.revision,
            "metrics": list(PER_QUERY_METRICS),
            "scores": merged,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, separators=(",", ":")) + "\n")
        return path


def read_per_query(
    results_dir: str | Path, task_name: str, *, check: bool = True
) -> dict[str, dict[str, dict[str, dict[str, float]]]] | None:
    """{split: {subset: {query id: {metric: value}}}} from `results_dir/per_query/{task}.json`, or None when there
    is none. With `check`, a file whose means disagree with the task's result file (stale: the task was recomputed
    without it) is ignored with a warning."""
    import logging

    path = per_query_path(results_dir, task_name)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        metrics = data["metrics"]
        scores = {
            split: {
                subset: {qid: dict(zip(metrics, values, strict=True)) for qid, values in queries.items()}
                for subset, queries in subsets.items()
            }
            for split, subsets in data["scores"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logging.getLogger(__name__).warning("Ignoring unreadable per-query file %s (%s)", path, error)
        return None
    if check:
        result_file = Path(results_dir) / f"{task_name}.json"
        if not result_file.is_file():
            return None
        result = read_task_result(result_file)
        for split, subsets in scores.items():
            stored = {entry["hf_subset"]: entry for entry in result.scores.get(split, [])}
            for subset, queries in subsets.items():
                for metric in metrics:
                    mean = sum(q[metric] for q in queries.values()) / max(1, len(queries))
                    if subset not in stored or not abs(stored[subset].get(metric, math.nan) - mean) <= 1e-4:
                        logging.getLogger(__name__).warning(
                            "Ignoring %s: its %s mean for %s/%s differs from %s (stale per-query scores)",
                            path, metric, split, subset, result_file)
                        return None
    return scores
