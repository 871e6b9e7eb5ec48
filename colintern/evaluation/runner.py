"""`evaluate()`: score a ColIntern3.5 checkpoint on mteb benchmarks, tasks and local folders, resuming what is done.

    from colintern.evaluation import evaluate
    summary = evaluate("experiments/run", ["ViDoRe(v1)"], batch_size=16)
    print(summary.table())

Results are written by mteb itself (`mteb.evaluate` with a `ResultCache`): one JSON per task under
`{output_dir}/results/{model}/{revision}/`. A task whose file exists (for the same data revision) is not computed
again, so an interrupted run resumes where it stopped; `overwrite=True` recomputes everything. Beside each task's file,
`protocol/{Task}.json` records what determined its scores (`colintern.evaluation.protocol`). Private tasks (mteb's
`is_public=False`, e.g. ViDoRe(v3)'s Telecom and Nuclear) are listed as "private: not run", never loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colintern.evaluation.protocol import build_protocol, check_same_protocol, score_settings, write_protocol
from colintern.evaluation.results import BenchmarkAverage, average, format_table
from colintern.evaluation.tasks import BenchmarkSelection, is_hub_task, resolve_benchmarks
from colintern.model.checkpoints import CheckpointInfo, describe_checkpoint
from colintern.model.compression import CompressionConfig
from colintern.mteb_results import PerQueryRecorder, TaskScores, read_task_result, task_scores
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
    private: list[str] = field(default_factory=list)  # tasks asked for whose data is private: not run
    corpus_text: str = "ignore"
    protocol_files: list[str] = field(default_factory=list)  # written in this run
    invariance: dict[str, Any] | None = None  # the batch-invariance check, when asked for

    def table(self) -> str:
        return format_table(self.rows, self.averages, [(task, "private: not run") for task in self.private])

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
            "not_run": [{"task": task, "reason": "private: not run"} for task in self.private],
            "corpus_text": self.corpus_text,
            "protocol_files": self.protocol_files,
            "invariance": self.invariance,
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
                {"benchmark": a.label, "n_tasks": a.n_tasks, "n_total": a.n_total, "n_private": a.n_private, **a.scores}
                for a in self.averages
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
    for name in _private_tasks(selections):
        logger.warning("%s: private task (its data is held by the benchmark's maintainers): not downloaded.", name)
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
    corpus_text: str = "ignore",
    corpus_text_max_tokens: int | None = None,
    check_invariance: bool = False,
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
        corpus_text: for corpora whose rows hold a page image and its text (ViDoRe(v3.1)): "ignore" embeds the image
            alone, "prompt" puts the text in the page prompt after the image (see `ColIntern3_5Wrapper`).
        corpus_text_max_tokens: text tokens kept per page in the "prompt" mode (default 1024).
        check_invariance: before evaluating, embed a sample of the first task's pages and queries at batch 1 and at
            `batch_size`; raise (naming the largest score difference) if the scores move.
        compression: score with compressed page vectors (`colintern.model.compression`); results go to
            `{model}/{revision}/experiments/<settings>/`, a folder of their own, and the bytes per page are logged.

    Raises:
        ColinternError for unknown benchmark names, unusable checkpoints (e.g. an untrained head) and datasets that
        cannot be loaded.
    """
    import mteb
    from mteb.cache import ResultCache

    from mteb_wrappers.colintern3_5_models import CORPUS_TEXT_MODES, DEFAULT_CORPUS_TEXT_MAX_TOKENS

    start = time.perf_counter()
    if batch_size < 1:
        raise ColinternError(f"--batch-size must be at least 1, got {batch_size}.")
    if corpus_text not in CORPUS_TEXT_MODES:
        raise ColinternError(f"--corpus-text must be one of {', '.join(CORPUS_TEXT_MODES)}, got {corpus_text!r}.")
    corpus_text_max_tokens = corpus_text_max_tokens or DEFAULT_CORPUS_TEXT_MAX_TOKENS
    if corpus_text_max_tokens < 1:
        raise ColinternError(f"--corpus-text-max-tokens must be at least 1, got {corpus_text_max_tokens}.")
    selections = resolve_benchmarks(list(benchmarks), splits)
    tasks = _unique_tasks(selections)
    private = _private_tasks(selections)
    for name in private:
        logger.warning(
            "%s: private task (only the benchmark's maintainers hold its data): not run. To have it scored, ask them "
            "(https://github.com/embeddings-benchmark/mteb/issues, 'eval request').",
            name,
        )
    info = describe_checkpoint(str(model_path), model_name=model_name)
    cache = ResultCache(cache_path=Path(output_dir))
    experiment = _experiment_name(compression)
    results_dir = cache.get_task_result_path("x", info.name, info.revision, experiment_name=experiment).parent
    logger.info("Model %s (revision %s): results in %s", info.name, info.revision, results_dir)

    plan = {
        task.metadata.name: _needs_run(task, results_dir / f"{task.metadata.name}.json", overwrite) for task in tasks
    }
    requested = {"dtype": dtype, "max_num_visual_tokens": max_num_visual_tokens}
    for task in tasks:  # results kept from an earlier run must have been computed the same way
        if not plan[task.metadata.name][1]:
            settings = {key: value for key, value in requested.items() if value is not None}
            settings.update(_corpus_text_settings(task, corpus_text, corpus_text_max_tokens))
            check_same_protocol(results_dir, task.metadata.name, settings)
    to_run = [task for task in tasks if plan[task.metadata.name][0]]
    for task in tasks:
        if not plan[task.metadata.name][0]:
            logger.info("%s: results already in %s (use --overwrite to recompute)", task.metadata.name, results_dir)
    if to_run:
        ensure_hub_datasets_available(selections, to_run)

    wrapper = None
    throughput: dict[str, dict[str, Any]] = {}
    protocol_files: list[str] = []
    invariance = None
    base_protocol: dict[str, Any] | None = None

    def load_wrapper():
        loaded = _load_wrapper(
            info, device, dtype, allow_untrained_head, max_num_visual_tokens, show_progress, corpus_text,
            corpus_text_max_tokens,
        )  # fmt: skip
        loaded.set_compression(compression)
        return loaded

    if check_invariance and tasks:
        wrapper = load_wrapper()
        invariance = _check_invariance(wrapper, tasks[0], batch_size, selections)
    for task in to_run:
        name = task.metadata.name
        if wrapper is None:
            wrapper = load_wrapper()
        if base_protocol is None:  # once per run: it hashes the weight files
            base_protocol = build_protocol(wrapper, batch_size=batch_size)
        protocol = {**base_protocol, **_corpus_text_settings(task, corpus_text, corpus_text_max_tokens),
                    "compression": compression.experiment_kwargs() if compression is not None else None}
        if invariance is not None:
            protocol["invariance"] = invariance
        if not plan[name][1]:  # adding to earlier results (missing splits): they must share the protocol
            check_same_protocol(results_dir, name, score_settings(protocol))
        _load_task_data(task)
        recompute = plan[name][1]
        logger.info("Evaluating %s (%s)", name, ", ".join(task.eval_splits))
        per_query = PerQueryRecorder(task).attach()  # each query's NDCG@5/@10, for confidence intervals
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
            per_query.detach()
            task.unload_data()
        protocol_files.append(str(write_protocol(results_dir, name, protocol)))
        per_query.write(results_dir, replace=recompute)
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
        private=private,
        corpus_text=corpus_text,
        protocol_files=protocol_files,
        invariance=invariance,
    )


def _private_tasks(selections: Sequence[BenchmarkSelection]) -> list[str]:
    names: list[str] = []
    for selection in selections:
        names += [t.metadata.name for t in selection.private if t.metadata.name not in names]
    return names


def _has_corpus_text(task) -> bool:
    """Whether the task's corpus rows carry a text beside the page image (category "t2it", as ViDoRe(v3.1))."""
    from mteb.types import PromptType

    return "text" in task.metadata.get_modalities(PromptType.document)


def _corpus_text_settings(task, corpus_text: str, max_tokens: int) -> dict[str, Any]:
    """The corpus-text part of a task's protocol: the mode (and text budget) where the corpus has text."""
    if not _has_corpus_text(task):
        return {"corpus_text": "none (image-only corpus)", "corpus_text_max_tokens": None}
    return {"corpus_text": corpus_text, "corpus_text_max_tokens": max_tokens if corpus_text == "prompt" else None}


def _check_invariance(wrapper, task, batch_size: int, selections) -> dict[str, Any]:
    """The batch-invariance check on a sample of `task` (raises `ColinternError` when scores move)."""
    from colintern.evaluation.invariance import check_invariance, sample_task

    ensure_hub_datasets_available(selections, [task])
    _load_task_data(task)
    try:
        pages, queries, texts = sample_task(task)
    finally:
        task.unload_data()
    use_text = texts if wrapper.corpus_text == "prompt" else None
    report = check_invariance(
        wrapper.mdl, wrapper.processor, pages, queries, batch_size, texts=use_text,
        max_text_tokens=wrapper.corpus_text_max_tokens,
    )  # fmt: skip
    report.raise_if_failed()
    return {"task": task.metadata.name, **report.to_dict()}
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


def _load_wrapper(
    info: CheckpointInfo, device, dtype, allow_untrained_head, max_num_visual_tokens, show_progress, corpus_text,
    corpus_text_max_tokens,
):
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
        corpus_text=corpus_text,
        corpus_text_max_tokens=corpus_text_max_tokens,
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
        average(
            selection.label, [rows[t.metadata.name] for t in selection.tasks], selection.n_total, len(selection.private)
        )
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
