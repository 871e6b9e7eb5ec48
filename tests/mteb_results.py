"""Real mteb result files for the report tests, made by mteb's own code.

`scored_task_result` ranks a synthetic corpus so that NDCG@5 comes out at a chosen value, scores the ranking with
mteb's retrieval metrics (pytrec_eval underneath) and wraps it with `TaskResult.from_task_results`, exactly the way
`AbsTaskRetrieval.evaluate` does, so every key mteb writes is there. `evaluate_local_task` runs the whole
`mteb.evaluate` loop on a small local text task with mteb's random-encoder baseline (no download).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import mteb
from mteb import TaskResult
from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores, make_score_dict
from mteb.cache import ResultCache

K_VALUES = (1, 3, 5, 10, 20, 100, 1000)


def ranking_scores(ndcg_at_5: float, n_queries: int = 100) -> dict:
    """mteb's score dict for a ranking in which a fraction `ndcg_at_5` of the queries find their page first and the
    others only in 6th place: NDCG@5 = that fraction exactly (up to 1/n_queries)."""
    hits = round(ndcg_at_5 * n_queries)
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(n_queries)}
    results = {}
    for i in range(n_queries):
        distractors = [f"d{(i + j) % n_queries}" for j in range(1, 8)]
        order = [f"d{i}", *distractors] if i < hits else [*distractors[:5], f"d{i}", *distractors[5:]]
        results[f"q{i}"] = {doc: 10.0 - rank for rank, doc in enumerate(order)}
    evaluation = calculate_retrieval_scores(results, qrels, K_VALUES)
    return make_score_dict(
        ndcg=evaluation.ndcg,
        _map=evaluation.map,
        recall=evaluation.recall,
        precision=evaluation.precision,
        mrr=evaluation.mrr,
        naucs=evaluation.naucs,
        naucs_mrr=evaluation.naucs_mrr,
        hit_rate=evaluation.hit_rate,
        task_scores={},
    )


def scored_task_result(task_name: str, ndcg_at_5: float | dict[str, float]) -> TaskResult:
    """A TaskResult of a registered mteb task (e.g. a ViDoRe task; no data is downloaded). A dict gives one value
    per language subset (ViDoRe v2/v3 tasks have several)."""
    task = mteb.get_task(task_name)
    subsets = task.metadata.hf_subsets_to_langscripts
    per_subset = ndcg_at_5 if isinstance(ndcg_at_5, dict) else {subset: ndcg_at_5 for subset in subsets}
    scores = {}
    for subset, value in per_subset.items():
        scores[subset] = ranking_scores(value)
        task._add_main_score(scores[subset])
    return TaskResult.from_task_results(
        task, {"test": scores}, evaluation_time=1.5, date=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    )


def model_meta(name: str, revision: str):
    """A ModelMeta with `name`/`revision`, built from a registered late-interaction model's metadata."""
    return mteb.get_model_meta("vidore/colpali-v1.3").model_copy(update={"name": name, "revision": revision})


def write_results(root: Path, model: str, revision: str, scores: dict[str, float | dict[str, float]]) -> Path:
    """Save TaskResults with mteb's ResultCache (model_meta.json included); returns the revision folder."""
    cache = ResultCache(root)
    meta = model_meta(model, revision)
    for task_name, value in scores.items():
        cache.save_to_cache(scored_task_result(task_name, value), meta)
    return root / "results" / model.replace("/", "__") / revision


def evaluate_local_task(cache_root: Path, n_docs: int = 40) -> Path:
    """Run mteb.evaluate (the real loop) with mteb's random-encoder baseline on a local text retrieval task named
    SynthDocsRetrieval (like the demo's); returns the folder the result was written to."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    class SynthDocsRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="SynthDocsRetrieval",
            description="A local test task.",
            reference=None,
            dataset={"path": "local/synthdocs", "revision": "1"},
            type="Retrieval",
            category="t2t",
            modalities=["text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="ndcg_at_5",
            date=("2026-01-01", "2026-01-02"),
            domains=["Academic"],
            task_subtypes=[],
            license="apache-2.0",
            annotations_creators="derived",
            dialect=[],
            sample_creation="created",
            bibtex_citation="",
        )

        def load_data(self, **kwargs):
            from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

            colours = ["red", "blue", "green", "cyan", "purple", "orange", "grey", "black"]
            docs = [f"report {i} with a {colours[i % 8]} header and chart {i // 8}" for i in range(n_docs)]
            corpus = Dataset.from_dict({"id": [f"d{i}" for i in range(n_docs)], "text": docs})
            asks = [f"which report has the {colours[i % 8]} header and chart number {i // 8}" for i in range(n_docs)]
            queries = Dataset.from_dict({"id": [f"q{i}" for i in range(n_docs)], "text": asks})
            qrels = {f"q{i}": {f"d{i}": 1} for i in range(n_docs)}
            self.dataset = {
                "default": {
                    "test": RetrievalSplitData(corpus=corpus, queries=queries, relevant_docs=qrels, top_ranked=None)
                }
            }
            self.data_loaded = True

    model = mteb.get_model("mteb/baseline-random-encoder")
    mteb.evaluate(
        model, [SynthDocsRetrieval()], cache=ResultCache(cache_root), co2_tracker=False, show_progress_bar=False
    )
    (folder,) = {p.parent for p in (cache_root / "results").rglob("SynthDocsRetrieval.json")}
    return folder
