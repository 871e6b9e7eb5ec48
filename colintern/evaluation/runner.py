"""`evaluate()`: score a ColIntern3.5 checkpoint on mteb benchmarks, tasks and local folders, resuming what is done.

    from colintern.evaluation import evaluate
    summary = evaluate("experiments/run", ["ViDoRe(v1)"], batch_size=16)
    print(summary.table())

Results are written by mteb itself (`mteb.evaluate` with a `ResultCache`): one JSON per task under
`{output_dir}/results/{model}/{revision}/`. A task whose file exists (for the same data revision) is not computed
again, so an interrupted run resumes where it stopped; `overwrite=True` recomputes everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colintern.evaluation.results import BenchmarkAverage, average, format_table
from colintern.evaluation.tasks import BenchmarkSelection, is_hub_task, resolve_benchmarks
from colintern.model.checkpoints import CheckpointInfo, describe_checkpoint
from colintern.model.compression import CompressionConfig
from colintern.mteb_results import TaskScores, read_task_result, task_scores
from colintern.utils import ColinternError

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "results/mteb_evaluation"
DEFAULT_BATCH_SIZE = 16


@dataclass
class EvaluationSummary:
    """What an evaluation produced: where mteb wrote the results, and the scores read back from those files."""

    model_name: str
    revision: str
    results_dir: Path
    rows: list[TaskScores]
    averages: list[BenchmarkAverage]
    computed: list[str]  # tasks evaluated in this run (the others came from earlier result files)
    seconds: float

    def table(self) -> str:
        return format_table(self.rows, self.averages)

    def score(self, task: str, metric: str = "ndcg_at_5") -> float:
        for row in self.rows:
            if row.task == task:
                return row.scores[metric] if metric in row.scores else row.main_score
        raise KeyError(f"no results for {task}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "revision": self.revision,
            "results_dir": str(self.results_dir),
            "computed": self.computed,
            "seconds": round(self.seconds, 2),
            "tasks": [
                {
                    "task": row.task,
                    "split": row.split,
                    **row.scores,
                    "main_score": row.main_score,
                    "pages_per_s": row.pages_per_s,
                    "queries_per_s": row.queries_per_s,
                    "result_file": row.source,
                }
                for row in self.rows
            ],
            "averages": [
                {"benchmark": a.label, "n_tasks": a.n_tasks, "n_total": a.n_total, **a.scores} for a in self.averages
            ],
        }


# ---------------------------------------------------------------------------------------------------- Hub data
def _cached_offline(path: str, revision: str | None) -> bool:
    """Whether `datasets` can load the Hub dataset `path` without the network (prepared in the local cache)."""
    from datasets.load import dataset_module_factory

    try:
        dataset_module_factory(path, revision=revision)
        return True
    except Exception:  # noqa: BLE001 - any failure means it cannot be loaded offline
        return False


def ensure_hub_datasets_available(selections: Sequence[BenchmarkSelection], tasks: Sequence[Any]) -> None:
    """Fail at once, naming the datasets, when Hub tasks must run but the Hub is unreachable and they are not cached.

    Without this, each dataset would first spend ~25 s in the libraries' connection retries, then raise a stack trace.
    """
    from colintern.hub import prefer_offline_when_unreachable

    hub_tasks = [task for task in tasks if is_hub_task(task)]
    if not hub_tasks or not prefer_offline_when_unreachable():
        return
    missing = [
        (task.metadata.name, task.metadata.dataset["path"])
        for task in hub_tasks
        if not _cached_offline(task.metadata.dataset["path"], task.metadata.dataset.get("revision"))
    ]
    if not missing:
        return
    labels = [s.label for s in selections if any(t.metadata.name in {m[0] for m in missing} for t in s.tasks)]
    (first_task, first_path), others = missing[0], missing[1:]
    more = f" (and {len(others)} more: {', '.join(path for _task, path in others)})" if others else ""
    raise ColinternError(
        f"dataset {first_path} (task {first_task}) is not available offline{more}: the Hugging Face Hub cannot be "
        "reached from this machine (or HF_HUB_OFFLINE=1) and the data is not in the local datasets cache. Where the "
        f"Hub is reachable run `python scripts/evaluate.py --download-only --benchmarks "
        f"{' '.join(repr(label) for label in labels)}`, then copy its Hugging Face cache ($HF_HOME, default "
        "~/.cache/huggingface) to this machine."
    )


def _load_task_data(task) -> None:
    """Load a task's data, turning a dataset that cannot be fetched into one clear error."""
    from datasets.exceptions import DatasetNotFoundError

    try:
        task.load_data()
    except ColinternError:
        raise
    except (ConnectionError, DatasetNotFoundError, FileNotFoundError) as error:
        raise ColinternError(
            f"dataset {task.metadata.dataset['path']} (task {task.metadata.name}) cannot be loaded: {error}"
        ) from error


def download_benchmarks(benchmarks: Sequence[str], splits: Sequence[str] | None = None) -> list[str]:
    """Fetch (into the Hugging Face cache) the data of every Hub task in `benchmarks`; returns the task names.

    For GPU machines without internet: run this where the Hub is reachable, then copy the cache over.
    """
    selections = resolve_benchmarks(benchmarks, splits)
    tasks = _unique_tasks(selections)
    ensure_hub_datasets_available(selections, tasks)
    for task in tasks:
        if is_hub_task(task):
            logger.info("Downloading %s (%s)", task.metadata.name, task.metadata.dataset["path"])
            _load_task_data(task)
            task.unload_data()
    return [task.metadata.name for task in tasks]


# ---------------------------------------------------------------------------------------------------- evaluate
def _unique_tasks(selections: Sequence[BenchmarkSelection]) -> list[Any]:
    """Every task once (benchmarks may share tasks); two different datasets under one task name are an error."""
    seen: dict[str, Any] = {}
    for selection in selections:
        for task in selection.tasks:
            name = task.metadata.name
            if name not in seen:
                seen[name] = task
            elif seen[name].metadata.dataset != task.metadata.dataset:
                first, second = seen[name].metadata.dataset["path"], task.metadata.dataset["path"]
                raise ColinternError(
                    f"{first} and {second} are both task {name}, with different data: their results would overwrite "
                    f"each other. Evaluate them in separate runs, or name one with a task.json "
                    '({"name": "..."}) in its folder.'
                )
    return list(seen.values())


def _needs_run(task, result_file: Path, overwrite: bool) -> tuple[bool, bool]:
    """(run it?, recompute from scratch?) for a task whose results may be in `result_file`."""
    if overwrite or not result_file.is_file():
        return True, overwrite
    try:
        existing = read_task_result(result_file)
    except Exception as error:  # noqa: BLE001 - e.g. a file cut short by an interrupted write
        logger.warning("Recomputing %s: its result file %s is unreadable (%s).", task.metadata.name, result_file, error)
        return True, True
    if existing.dataset_revision != task.metadata.revision:
        logger.info(
            "Recomputing %s: its results are for data revision %s, the data is now %s.",
            task.metadata.name,
            existing.dataset_revision,
            task.metadata.revision,
        )
        return True, True
    missing = existing.get_missing_evaluations(task)
    return bool(missing), False


def evaluate(
    model_path: str,
    benchmarks: Sequence[str] = ("ViDoRe(v1)",),
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    overwrite: bool = False,
    allow_untrained_head: bool = False,
    splits: Sequence[str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    model_name: str | None = None,
    max_num_visual_tokens: int | None = None,
    show_progress: bool = True,
    compression: CompressionConfig | None = None,
) -> EvaluationSummary:
    """Evaluate `model_path` on `benchmarks` with mteb and return the scores read back from mteb's result files.

    Args:
        model_path: adapter folder, full checkpoint folder, Hub id or `embedded:` alias.
        benchmarks: mteb benchmark names ("ViDoRe(v1)"), task names ("VidoreDocVQARetrieval",
            "SynthDocsRetrieval") and local task folders (corpus/queries/qrels parquet files).
        batch_size: pages (and queries) per forward pass.
        output_dir: the mteb results cache; files go to `{output_dir}/results/{model}/{revision}/{Task}.json`.
        overwrite: recompute tasks that already have results.
        allow_untrained_head: evaluate a model whose projection head is untrained (a chance-level baseline).
        splits: evaluate these splits (e.g. ["validation"]) instead of each task's default.
        compression: score with compressed page vectors (`colintern.model.compression`); results go to
            `{model}/{revision}/experiments/<settings>/`, a folder of their own, and the bytes per page are logged.

    Raises:
        ColinternError for unknown benchmark names, unusable checkpoints (e.g. an untrained head) and datasets that
        cannot be loaded.
    """
    import mteb
    from mteb.cache import ResultCache

    start = time.perf_counter()
    if batch_size < 1:
        raise ColinternError(f"--batch-size must be at least 1, got {batch_size}.")
    selections = resolve_benchmarks(list(benchmarks), splits)
    tasks = _unique_tasks(selections)
    info = describe_checkpoint(str(model_path), model_name=model_name)
    cache = ResultCache(cache_path=Path(output_dir))
    experiment = _experiment_name(compression)
    results_dir = cache.get_task_result_path("x", info.name, info.revision, experiment_name=experiment).parent
    logger.info("Model %s (revision %s): results in %s", info.name, info.revision, results_dir)

    plan = {
        task.metadata.name: _needs_run(task, results_dir / f"{task.metadata.name}.json", overwrite) for task in tasks
    }
    to_run = [task for task in tasks if plan[task.metadata.name][0]]
    for task in tasks:
        if not plan[task.metadata.name][0]:
            logger.info("%s: results already in %s (use --overwrite to recompute)", task.metadata.name, results_dir)
    if to_run:
        ensure_hub_datasets_available(selections, to_run)

    wrapper = None
    throughput: dict[str, dict[str, Any]] = {}
    for task in to_run:
        name = task.metadata.name
        if wrapper is None:
            wrapper = _load_wrapper(info, device, dtype, allow_untrained_head, max_num_visual_tokens, show_progress)
            wrapper.set_compression(compression)
        _load_task_data(task)
        recompute = plan[name][1]
        logger.info("Evaluating %s (%s)", name, ", ".join(task.eval_splits))
        try:
            mteb.evaluate(
                wrapper,
                task,
                cache=cache,
                encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress},
                overwrite_strategy="always" if recompute else "only-missing",
                co2_tracker=False,
                show_progress_bar=False,
            )
        finally:
            task.unload_data()
        throughput[name] = wrapper.throughput(name)
        rate = throughput[name]
        logger.info(
            "%s: encoded %d pages at %s pages/s and %d queries at %s queries/s",
            name,
            rate["pages"],
            f"{rate['pages_per_s']:.1f}" if rate["pages_per_s"] else "-",
            rate["queries"],
            f"{rate['queries_per_s']:.1f}" if rate["queries_per_s"] else "-",
        )
        storage = wrapper.storage(name)
        if compression is not None and storage["pages"]:
            logger.info(
                "%s: compression %s, %.1f bytes per page (%.4f of float16's %.1f)",
                name,
                compression.label(),
                storage["bytes_per_page"],
                storage["fraction_of_float16"],
                storage["float16_bytes_per_page"],
            )

    rows, averages = _collect(selections, tasks, results_dir, throughput)
    return EvaluationSummary(
        model_name=info.name,
        revision=info.revision,
        results_dir=results_dir,
        rows=rows,
        averages=averages,
        computed=[task.metadata.name for task in to_run],
        seconds=time.perf_counter() - start,
    )


def _experiment_name(compression: CompressionConfig | None) -> str | None:
    """mteb's folder name for the experiment (None for the baseline), as the wrapper's ModelMeta gives it."""
    from mteb.models.model_meta import ModelMeta

    kwargs = compression.experiment_kwargs() if compression is not None else None
    return ModelMeta.create_empty().model_copy(update={"experiment_kwargs": kwargs}).experiment_name


def model_results_dir(
    model_path: str, output_dir: str | Path = DEFAULT_OUTPUT_DIR, model_name: str | None = None
) -> Path:
    """Where `evaluate(model_path, output_dir=...)` writes (or wrote) the model's result files."""
    from mteb.cache import ResultCache

    info = describe_checkpoint(str(model_path), model_name=model_name)
    return ResultCache(cache_path=Path(output_dir)).get_task_result_path("x", info.name, info.revision).parent


def _load_wrapper(info: CheckpointInfo, device, dtype, allow_untrained_head, max_num_visual_tokens, show_progress):
    from mteb_wrappers.colintern3_5_models import ColIntern3_5Wrapper

    return ColIntern3_5Wrapper(
        info.source,
        device=device,
        dtype=dtype,
        allow_untrained_head=allow_untrained_head,
        model_name=info.name,
        max_num_visual_tokens=max_num_visual_tokens,
        show_progress=show_progress,
        checkpoint=info,
    )


def _collect(selections, tasks, results_dir: Path, throughput) -> tuple[list[TaskScores], list[BenchmarkAverage]]:
    rows: dict[str, TaskScores] = {}
    for task in tasks:
        name = task.metadata.name
        path = results_dir / f"{name}.json"
        if not path.is_file():
            raise ColinternError(f"mteb wrote no result file for {name} ({path}).")
        splits = list(task.eval_splits)
        result = read_task_result(path)
        row = task_scores(result, splits[0], path, task.metadata.main_score)
        if len(splits) > 1:  # several splits asked for: one row each
            for split in splits[1:]:
                extra = task_scores(result, split, path, task.metadata.main_score)
                extra.task = f"{name} ({split})"
                rows[extra.task] = extra
        if name in throughput:
            row.computed = True
            row.pages_per_s = throughput[name]["pages_per_s"]
            row.queries_per_s = throughput[name]["queries_per_s"]
        rows[name] = row
    averages = [
        average(selection.label, [rows[t.metadata.name] for t in selection.tasks], len(selection.tasks))
        for selection in selections
        if selection.is_benchmark
    ]
    ordered = [rows[t.metadata.name] for t in tasks] + [row for key, row in rows.items() if " (" in key]
    return ordered, averages


def evaluate_in_memory(
    model,
    processor,
    data: str | Path = "embedded:synthdocs",
    split: str = "validation",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, float]:
    """Scores of a model in memory (e.g. mid-training) on a local task folder's split, through mteb, no files written.

    Returns:
        mteb's score dict for the split ("ndcg_at_5", "ndcg_at_10", "recall_at_100", "main_score", ...), averaged
        over subsets.
    """
    import mteb

    from colintern.model.embedded import resolve_embedded
    from colintern.evaluation.tasks import local_retrieval_task
    from mteb_wrappers.colintern3_5_models import ColIntern3_5Wrapper

    task = local_retrieval_task(resolve_embedded(str(data)), splits=[split])
    wrapper = ColIntern3_5Wrapper.from_model(model, processor)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        result = mteb.evaluate(
            wrapper,
            task,
            cache=None,
            encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
            co2_tracker=False,
            show_progress_bar=False,
        )
    finally:
        model.train(was_training)
    return task_scores(result.task_results[0], split, main_metric=task.metadata.main_score).scores
