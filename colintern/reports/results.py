"""Evaluation results as mteb writes them, the published reference scores, and the lookup of a name to results.

A *result set* is one model's scores on a set of tasks: read from mteb `TaskResult` files (what `mteb.evaluate(...,
cache=ResultCache(root))` writes to `{root}/results/{model}/{revision}/{Task}.json`, found recursively under any
folder) or from a reference file in `results/leaderboard/` (published scores, see `colintern.reports.leaderboard`).
Scores are kept per task as mteb reports them (0-1), averaged over the task's language subsets the way mteb's own
`TaskResult.get_score` does. Result files are read by `colintern.mteb_results`, the one reader the evaluation uses too.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from colintern.mteb_results import (
    KNOWN_BENCHMARKS,
    PER_QUERY_DIR,
    TaskScores,
    benchmark_tasks,
    read_per_query,
    read_task_result,
    task_scores,
)
from colintern.utils import ADAPTER_CONFIG_FILE, REFERENCES_DIR, RUN_CONFIG_FILE, ColinternError

logger = logging.getLogger(__name__)

# Where `scripts/evaluate.py` writes by default (an mteb ResultCache root), relative to the working directory.
DEFAULT_EVALUATION_ROOT = Path("results/mteb_evaluation")
# The reference scores shipped with colintern.
DEFAULT_LEADERBOARD_DIR = REFERENCES_DIR
# A task in none of KNOWN_BENCHMARKS is shown in its own group without an average.
OTHER_TASKS = "Other tasks"
DEFAULT_METRIC = "ndcg_at_5"
# Prefix that forces a name to be looked up among the reference models only (`leaderboard:colpali-v1.3`).
REFERENCE_PREFIX = "leaderboard:"
# JSON files that are never mteb task results; skipped without opening them.
_NOT_TASK_RESULTS = {
    "model_meta.json",
    "trainer_state.json",
    RUN_CONFIG_FILE,
    "config.json",
    ADAPTER_CONFIG_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
    "vocab.json",
    "added_tokens.json",
}


@dataclass
class ResultSet:
    """One column of a comparison: a model's scores on the tasks it was evaluated on."""

    label: str
    tasks: dict[str, TaskScores]
    model_name: str | None = None
    revision: str | None = None
    is_reference: bool = False
    origin: str = ""  # the folder or reference file the scores came from
    source_commit: str | None = None  # for a reference: the commit of the public results repository
    # task -> {split: {subset: {query id: {metric: value}}}}: our own evaluations' per-query scores, when kept
    per_query: dict[str, dict] = field(default_factory=dict)

    def score(self, task_name: str, metric: str) -> float | None:
        task = self.tasks.get(task_name)
        return task.get(metric) if task else None

    @property
    def short_name(self) -> str:
        return (self.model_name or self.label).split("/")[-1]


# ---------------------------------------------------------------------------------------------------------- metrics


def normalize_metric(metric: str) -> str:
    """'NDCG@5', 'ndcg5', 'recall@100', 'main' -> mteb's key ('ndcg_at_5', 'recall_at_100', 'main_score')."""
    text = metric.strip().lower().replace("-", "_")
    if text in ("main", "main_score", "main score"):
        return "main_score"
    match = re.fullmatch(r"([a-z_]+?)_?(?:@|_at_|at)?(\d+)", text)
    if match and not text.startswith("nauc"):
        return f"{match.group(1).rstrip('_')}_at_{match.group(2)}"
    return text


def metric_label(metric: str) -> str:
    """'ndcg_at_5' -> 'NDCG@5' for tables and plots."""
    match = re.fullmatch(r"([a-z_]+)_at_(\d+)", metric)
    if match:
        name = {"ndcg": "NDCG", "map": "MAP", "mrr": "MRR", "recall": "Recall", "precision": "Precision"}.get(
            match.group(1), match.group(1)
        )
        return f"{name}@{match.group(2)}"
    return "main score" if metric == "main_score" else metric


def check_metric(metric: str, result_sets: Sequence[ResultSet]) -> str:
    """The normalised metric, or an error listing close matches when no result set has it."""
    metric = normalize_metric(metric)
    if metric == "main_score":
        return metric
    available = {name for rs in result_sets for task in rs.tasks.values() for name in task.scores}
    if metric in available or not available:
        return metric
    close = difflib.get_close_matches(metric, sorted(available), n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ColinternError(
        f"no result has the metric {metric!r}.{hint} Use mteb's names, e.g. ndcg_at_5, ndcg_at_10, recall_at_100, "
        "map_at_5, mrr_at_10, or main_score."
    )


# ------------------------------------------------------------------------------------------------------- benchmarks


@functools.cache
def benchmark_main_metric(name: str) -> str:
    import mteb

    mains = {task.metadata.main_score for task in mteb.get_benchmark(name).tasks}
    return mains.pop() if len(mains) == 1 else "main_score"


def benchmark_of(task_name: str, benchmarks: Sequence[str] = KNOWN_BENCHMARKS) -> str | None:
    for name in benchmarks:
        if task_name in benchmark_tasks(name):
            return name
    return None


# --------------------------------------------------------------------------------------------- mteb result files


def _looks_like_task_result(path: Path) -> bool:
    if path.name in _NOT_TASK_RESULTS or path.name.startswith("."):
        return False
    try:
        with path.open("r", encoding="utf-8") as handle:
            head = handle.read(2048)
    except (OSError, UnicodeDecodeError):
        return False
    return '"task_name"' in head or '"mteb_dataset_name"' in head


def find_task_result_files(folder: Path) -> list[Path]:
    """Every mteb TaskResult JSON below `folder` (any depth; hidden and partial folders skipped)."""
    if folder.is_file():
        return [folder] if _looks_like_task_result(folder) else []
    files = []
    for path in sorted(folder.rglob("*.json")):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") or part.endswith(".partial") or part == PER_QUERY_DIR for part in relative[:-1]):
            continue
        if _looks_like_task_result(path):
            files.append(path)
    return files


def model_identity(revision_dir: Path) -> tuple[str | None, str | None]:
    """(model name, revision) of a folder of result files: from mteb's model_meta.json, else from the
    `results/{model}/{revision}/` layout, else (None, None)."""
    meta_path = revision_dir / "model_meta.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            return meta.get("name"), meta.get("revision")
        except (OSError, json.JSONDecodeError):
            logger.warning("Ignoring unreadable %s", meta_path)
    if revision_dir.parent.parent.name == "results":
        return revision_dir.parent.name.replace("__", "/"), revision_dir.name
    return None, None


def load_result_folder(folder: str | Path, label: str | None = None) -> list[ResultSet]:
    """All result sets below `folder`: one per folder of task result files (i.e. per model and revision).

    A single result set is labelled `label` (default: the folder as given); several get `model@revision` labels.
    A task found twice in one result set keeps the most recently written file.
    """
    folder = Path(folder)
    files = find_task_result_files(folder)
    if not files:
        raise ColinternError(
            f"no mteb result files under {folder}. Evaluate first: python scripts/evaluate.py --model-path MODEL "
            f"--benchmarks ... --output-dir {folder}"
        )
    by_directory: dict[Path, list[Path]] = {}
    for path in files:
        by_directory.setdefault(path.parent, []).append(path)
    result_sets = []
    for directory, paths in sorted(by_directory.items()):
        model_name, revision = model_identity(directory)
        tasks: dict[str, TaskScores] = {}
        for path in sorted(paths, key=lambda p: p.stat().st_mtime):
            scores = task_scores(read_task_result(path), source=path)
            tasks[scores.task] = scores
        per_query = {task: pq for task in tasks if (pq := read_per_query(directory, task)) is not None}
        result_sets.append(
            ResultSet(
                label=str(directory),
                tasks=tasks,
                model_name=model_name,
                revision=revision,
                origin=str(directory),
                per_query=per_query,
            )
        )
    if len(result_sets) == 1:
        result_sets[0].label = label or str(folder)
    else:
        names = [rs.model_name or str(rs.origin) for rs in result_sets]
        for rs, name in zip(result_sets, names, strict=True):
            rs.label = f"{name}@{(rs.revision or '')[:7]}" if names.count(name) > 1 and rs.revision else name
    return result_sets


# ------------------------------------------------------------------------------------------------ reference scores


def load_reference_models(leaderboard_dir: str | Path | None = None) -> list[ResultSet]:
    """The published reference scores in `results/leaderboard/*.json` (written by scripts/update_leaderboard.py)."""
    directory = Path(leaderboard_dir) if leaderboard_dir else DEFAULT_LEADERBOARD_DIR
    references = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            model = data["model"]
            task_entries = data["tasks"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ColinternError(
                f"{path} is not a colintern reference file ({type(error).__name__}: {error}). Rebuild the folder with "
                "python scripts/update_leaderboard.py --results-repo PATH_TO_A_CLONE_OF_embeddings-benchmark/results"
            ) from error
        source = data.get("source", {})
        tasks = {
            name: TaskScores(
                task=name,
                scores={k: float(v) for k, v in entry.get("scores", {}).items() if v is not None},
                main_metric=entry.get("main_metric"),
                mteb_version=entry.get("mteb_version"),
                dataset_revision=entry.get("dataset_revision"),
                split=entry.get("split"),
                source=f"{source.get('repository', '?')}@{str(source.get('commit', '?'))[:7]}:{entry.get('path', '')}",
                missing_subsets=tuple(entry.get("missing_subsets", ())),
            )
            for name, entry in task_entries.items()
        }
        references.append(
            ResultSet(
                label=model,
                tasks=tasks,
                model_name=model,
                revision=data.get("revision"),
                is_reference=True,
                origin=str(path),
                source_commit=source.get("commit"),
            )
        )
    return references


# --------------------------------------------------------------------------------------------------- name lookup


def _name_keys(name: str) -> set[str]:
    """The spellings a user may type for a model: the full name, the part after the owner, either with __ for /."""
    name = name.strip().rstrip("/")
    full = name.replace("__", "/").lower()
    return {full, full.split("/")[-1], name.lower()}


def _local_models(evaluation_root: Path) -> dict[Path, tuple[str, str | None]]:
    """revision folder -> (model name, revision) for every model evaluated under an mteb ResultCache root."""
    found: dict[Path, tuple[str, str | None]] = {}
    results = evaluation_root / "results"
    if not results.is_dir():
        return found
    for path in find_task_result_files(results):
        if path.parent not in found:
            model_name, revision = model_identity(path.parent)
            found[path.parent] = (model_name or path.parent.parent.name, revision)
    return found


def resolve_result_sets(
    names: Sequence[str],
    evaluation_root: str | Path = DEFAULT_EVALUATION_ROOT,
    leaderboard_dir: str | Path | None = None,
    references: Sequence[ResultSet] | None = None,
) -> list[ResultSet]:
    """Turn command-line names into result sets, in order.

    Each name is, in this order of precedence: an existing path (a folder with result files at any depth, or one
    result file), a model evaluated under `evaluation_root` (full name `org/model`, `org__model` or just `model`;
    the most recently written revision), or a reference model (`vidore/colpali-v1.3` or `colpali-v1.3`;
    prefix `leaderboard:` to skip the local lookup). An unknown name is an error listing close matches.
    """
    evaluation_root = Path(evaluation_root)
    if references is None:
        references = load_reference_models(leaderboard_dir)
    local = _local_models(evaluation_root)
    result_sets: list[ResultSet] = []
    for name in names:
        result_sets.extend(_resolve_one(name, evaluation_root, local, references))
    _deduplicate_labels(result_sets)
    return result_sets


def _resolve_one(
    name: str, evaluation_root: Path, local: dict[Path, tuple[str, str | None]], references: Sequence[ResultSet]
) -> list[ResultSet]:
    reference_only = name.startswith(REFERENCE_PREFIX)
    query = name[len(REFERENCE_PREFIX) :] if reference_only else name
    if not reference_only and Path(query).exists():
        return load_result_folder(query, label=query)
    keys = _name_keys(query)
    if not reference_only:
        matches = [path for path, (model, _) in local.items() if keys & _name_keys(model)]
        if matches:
            newest = max(matches, key=lambda p: max(f.stat().st_mtime for f in p.glob("*.json")))
            if len({local[p][0] for p in matches}) > 1 or len(matches) > 1:
                logger.info(
                    "%r matches %d evaluated folders; using the newest, %s (pass a folder path to choose)",
                    name,
                    len(matches),
                    newest,
                )
            (result_set,) = load_result_folder(newest, label=local[newest][0])
            if any(keys & _name_keys(ref.model_name or "") for ref in references):
                logger.info("%r is your evaluation in %s; use %s%s for the published scores", name, newest,
                            REFERENCE_PREFIX, query)
            return [result_set]
    for reference in references:
        if keys & _name_keys(reference.model_name or ""):
            return [reference]
    # A unique prefix of a reference model's short name ("colqwen2.5" for vidore/colqwen2.5-v0.2) is enough.
    short = query.lower().replace("__", "/").split("/")[-1]
    prefixed = [ref for ref in references if ref.short_name.lower().startswith(short)] if short else []
    if len(prefixed) == 1:
        logger.info("%r taken as the reference model %s", name, prefixed[0].model_name)
        return prefixed
    if len(prefixed) > 1:
        raise ColinternError(
            f"{name!r} is ambiguous: it could be {', '.join(ref.model_name or ref.label for ref in prefixed)}. "
            "Give the full name."
        )
    raise ColinternError(_unknown_name_message(name, evaluation_root, local, references))


def _unknown_name_message(
    name: str, evaluation_root: Path, local: dict[Path, tuple[str, str | None]], references: Sequence[ResultSet]
) -> str:
    candidates: dict[str, str] = {}  # spelling -> the name to suggest
    for model in [m for m, _ in local.values()] + [ref.model_name or "" for ref in references]:
        for key in _name_keys(model):
            candidates.setdefault(key, model)
    query = name[len(REFERENCE_PREFIX) :] if name.startswith(REFERENCE_PREFIX) else name
    close = []
    for key in difflib.get_close_matches(query.lower(), list(candidates), n=8, cutoff=0.6):
        if candidates[key] not in close:
            close.append(candidates[key])
    hint = f" Close matches: {', '.join(close)}." if close else ""
    known = ", ".join(sorted(ref.short_name for ref in references)) or "none (results/leaderboard/ is empty)"
    return (
        f"no results for {name!r}: not an existing folder, not a model evaluated under {evaluation_root}/results, "
        f"and not a reference model.{hint} Reference models: {known}."
    )


def _deduplicate_labels(result_sets: Iterable[ResultSet]) -> None:
    seen: dict[str, int] = {}
    for rs in result_sets:
        count = seen.get(rs.label, 0)
        seen[rs.label] = count + 1
        if count:
            rs.label = f"{rs.label} #{count + 1}"
