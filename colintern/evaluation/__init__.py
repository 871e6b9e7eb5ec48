"""Evaluation through mteb: ViDoRe benchmarks, SynthDocs and local task folders, with results in mteb's format.

    evaluate(model_path, benchmarks, ...)       score a checkpoint, resuming from earlier result files
    evaluate_in_memory(model, processor, ...)   score a model in memory on a local split (training, Optuna)
    model_results_dir(model_path, output_dir)   where evaluate() writes a model's result files
    results_table(results_dir)                  NDCG@5 / NDCG@10 / Recall@100 rows + benchmark averages from files
    resolve_benchmarks(names)                   "ViDoRe(v1)", task names, "SynthDocsRetrieval", folders -> mteb tasks
    check_invariance(model, processor, ...)     scores of a sample at batch 1 vs the run's batch size
    build_protocol / read_protocol              what determined a task's scores (protocol/{Task}.json)
"""

from colintern.evaluation.invariance import InvarianceReport, check_invariance
from colintern.evaluation.protocol import build_protocol, read_protocol
from colintern.evaluation.results import TABLE_METRICS, BenchmarkAverage, format_table, results_table
from colintern.evaluation.runner import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_OUTPUT_DIR,
    EvaluationSummary,
    download_benchmarks,
    ensure_hub_datasets_available,
    evaluate,
    evaluate_in_memory,
    model_results_dir,
)
from colintern.evaluation.tasks import (
    LocalRetrievalTask,
    SynthDocsRetrieval,
    find_splits,
    is_private,
    local_retrieval_task,
    resolve_benchmarks,
)
from colintern.mteb_results import TaskScores, read_task_result, task_scores

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_OUTPUT_DIR",
    "TABLE_METRICS",
    "BenchmarkAverage",
    "EvaluationSummary",
    "InvarianceReport",
    "LocalRetrievalTask",
    "SynthDocsRetrieval",
    "TaskScores",
    "build_protocol",
    "check_invariance",
    "download_benchmarks",
    "ensure_hub_datasets_available",
    "evaluate",
    "evaluate_in_memory",
    "find_splits",
    "format_table",
    "is_private",
    "local_retrieval_task",
    "model_results_dir",
    "read_protocol",
    "read_task_result",
    "resolve_benchmarks",
    "results_table",
    "task_scores",
]
