"""Reference scores of the leading public retrievers, rebuilt from a clone of the public mteb results repository.

    python scripts/update_leaderboard.py --results-repo ~/src/results     # a clone of embeddings-benchmark/results

The clone is read with mteb's own `ResultCache` (its `results/{model}/{revision}/{Task}.json` layout is the one a
local cache uses). For each reference model and each ViDoRe task, the result from the model's registered revision
(mteb's `ModelMeta.revision`) is preferred, else the revision with the most ViDoRe results. One JSON file per model
is written to `results/leaderboard/`: every task's retrieval metrics (0-1, averaged over language subsets like
mteb), the mteb version that computed them, the exact source file and commit, and the per-benchmark averages; plus
a README.md table of the averages.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import subprocess
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from colintern.mteb_results import KNOWN_BENCHMARKS, TaskScores, benchmark_tasks, read_task_result, task_scores
from colintern.reports.results import DEFAULT_LEADERBOARD_DIR, benchmark_main_metric, metric_label
from colintern.utils import ColinternError, atomic_write_text, prepare_output_dir, safe_name

logger = logging.getLogger(__name__)

RESULTS_REPOSITORY = "https://github.com/embeddings-benchmark/results"
# The leading public late-interaction / multi-vector page retrievers on ViDoRe (see README, "Comparing models").
REFERENCE_MODELS: tuple[str, ...] = (
    "vidore/colpali-v1.3",
    "vidore/colqwen2-v1.0",
    "vidore/colqwen2.5-v0.2",
    "vidore/colSmol-256M",
    "vidore/colSmol-500M",
    "nomic-ai/colnomic-embed-multimodal-3b",
    "nomic-ai/colnomic-embed-multimodal-7b",
    "jinaai/jina-embeddings-v4",
    "nvidia/llama-nemoretriever-colembed-1b-v1",
    "nvidia/llama-nemoretriever-colembed-3b-v1",
    "nvidia/llama-nemotron-colembed-vl-3b-v2",
    "nvidia/nemotron-colembed-vl-4b-v2",
    "nvidia/nemotron-colembed-vl-8b-v2",
)
# The metrics kept per task: the ones retrieval practitioners compare (mteb also stores precision, nAUC, ...).
STORED_METRICS: tuple[str, ...] = tuple(
    f"{name}_at_{k}" for name in ("ndcg", "recall", "map", "mrr") for k in (1, 3, 5, 10, 20, 100, 1000)
)


def git_commit(path: Path) -> str | None:
    """The checked-out commit of a git clone, or None when `path` is not one (or git is missing)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _registered_revision(model_name: str) -> str | None:
    import mteb

    try:
        return mteb.get_model_meta(model_name).revision
    except Exception:  # noqa: BLE001 - a model mteb does not know: fall back to the best-covered revision
        return None


def collect_reference_scores(
    results_repo: str | Path,
    models: Sequence[str] = REFERENCE_MODELS,
    benchmarks: Sequence[str] = KNOWN_BENCHMARKS,
    repository: str = RESULTS_REPOSITORY,
) -> list[dict]:
    """Read the reference models' benchmark results from a local clone of the mteb results repository.

    Returns one record per model that has any result (the content of its `results/leaderboard/` file).
    """
    from mteb.cache import ResultCache

    results_repo = Path(results_repo).expanduser()
    if not (results_repo / "results").is_dir():
        raise ColinternError(
            f"{results_repo} does not look like a clone of {repository} (no results/ folder). Clone it with "
            f"`git clone --depth 1 {repository}` and pass that folder to --results-repo."
        )
    commit = git_commit(results_repo)
    if commit is None:
        logger.warning("%s is not a git clone: the reference files will not record a commit", results_repo)
    task_names = [task for benchmark in benchmarks for task in benchmark_tasks(benchmark)]
    cache = ResultCache(results_repo)  # its results/{model}/{revision}/{task}.json layout is the repository's
    paths = cache.get_cache_paths(models=list(models), tasks=task_names, require_model_meta=False, include_remote=False)
    by_model: dict[str, dict[str, dict[str, Path]]] = {}  # model -> revision -> task -> path
    folder_to_model = {model.replace("/", "__").replace(" ", "_"): model for model in models}
    for path in paths:
        model = folder_to_model[path.parent.parent.name]
        by_model.setdefault(model, {}).setdefault(path.parent.name, {})[path.stem] = path

    records = []
    for model in models:
        revisions = by_model.get(model)
        if not revisions:
            logger.warning("No %s results for %s in %s", "/".join(benchmarks), model, results_repo)
            continue
        preferred = _registered_revision(model)
        order = sorted(revisions, key=lambda rev: (rev != preferred, -len(revisions[rev]), rev))
        chosen: dict[str, tuple[str, Path]] = {}
        for revision in order:
            for task, path in revisions[revision].items():
                chosen.setdefault(task, (revision, path))
        records.append(_model_record(model, chosen, results_repo, commit, repository, benchmarks))
        logger.info("%s: %d tasks from %s", model, len(chosen), ", ".join(sorted({r for r, _ in chosen.values()})))
    if not records:
        raise ColinternError(
            f"none of the reference models has ViDoRe results in {results_repo}/results. Is the clone complete "
            "(not a sparse checkout of other folders)?"
        )
    return records


def _model_record(
    model: str,
    chosen: dict[str, tuple[str, Path]],
    results_repo: Path,
    commit: str | None,
    repository: str,
    benchmarks: Sequence[str],
) -> dict:
    import mteb

    tasks: dict[str, dict] = {}
    scored: dict[str, TaskScores] = {}
    for benchmark in benchmarks:
        for task in benchmark_tasks(benchmark):
            if task not in chosen:
                continue
            revision, path = chosen[task]
            scores = task_scores(read_task_result(path))
            scored[task] = scores
            tasks[task] = {
                "benchmark": benchmark,
                "main_metric": scores.main_metric,
                "main_score": _round(scores.get("main_score")),
                "scores": {m: _round(scores.scores[m]) for m in STORED_METRICS if m in scores.scores},
                "mteb_version": scores.mteb_version,
                "dataset_revision": scores.dataset_revision,
                "split": scores.split,
                "revision": revision,
                "path": path.relative_to(results_repo).as_posix(),
            }
    averages = {}
    for benchmark in benchmarks:
        members = benchmark_tasks(benchmark)
        have = [scored[t] for t in members if t in scored]
        if not have:
            continue
        main = benchmark_main_metric(benchmark)
        entry = {"main_metric": main, "n_tasks": len(have), "of": len(members)}
        for metric in dict.fromkeys((main, "ndcg_at_5", "ndcg_at_10")):
            values = [s.get(metric) for s in have]
            if all(v is not None for v in values):
                entry[f"{metric}_mean"] = _round(sum(values) / len(values))
        averages[benchmark] = entry
    return {
        "model": model,
        "revision": Counter(revision for revision, _ in chosen.values()).most_common(1)[0][0],
        "source": {"repository": repository, "commit": commit},
        "mteb_versions": sorted({t["mteb_version"] for t in tasks.values() if t["mteb_version"]}),
        "benchmarks": averages,
        "tasks": tasks,
        "generated": {
            "by": "scripts/update_leaderboard.py",
            "date": _dt.date.today().isoformat(),
            "mteb": mteb.__version__,
            "note": "scores in [0, 1] as in mteb's result files, averaged over language subsets like mteb",
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 6)


def reference_file_name(model: str) -> str:
    return safe_name(model.replace("/", "__"), fallback="model") + ".json"  # mteb's folder name for the model


def write_reference_files(
    records: Sequence[dict], output_dir: str | Path = DEFAULT_LEADERBOARD_DIR, *, inputs: dict | None = None
) -> list[Path]:
    """Write one JSON per model (atomically) and a README.md table; files of models not in `records` are kept.

    An update: the folder may hold earlier reference files, but a file of the same name that update_leaderboard did
    not write (a README.md of the user's) is never replaced, and the folder may not be or hold one of `inputs`.
    """
    output_dir = Path(output_dir)
    names = [reference_file_name(record["model"]) for record in records] + ["README.md"]
    prepare_output_dir(output_dir, command="update_leaderboard", overwrite=True, owned_names=names, inputs=inputs)
    written = []
    for record in records:
        path = output_dir / reference_file_name(record["model"])
        atomic_write_text(path, _dump_compact(record) + "\n")
        written.append(path)
    atomic_write_text(output_dir / "README.md", leaderboard_markdown(_all_records(output_dir)))
    return written


def _all_records(output_dir: Path) -> list[dict]:
    records = []
    for path in sorted(output_dir.glob("*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError:
            logger.warning("Skipping unreadable %s", path)
    return records


def leaderboard_markdown(records: Sequence[dict]) -> str:
    """The README of results/leaderboard/: benchmark averages per model (x100), sorted by ViDoRe(v1), and sources."""
    benchmarks = [b for b in KNOWN_BENCHMARKS if any(b in r.get("benchmarks", {}) for r in records)]
    lines = [
        "# Reference scores",
        "",
        "Published ViDoRe scores of leading public retrievers, read from mteb's result files in the public results "
        f"repository ({RESULTS_REPOSITORY}). Rebuilt by `python scripts/update_leaderboard.py --results-repo PATH` "
        "from a local clone; one JSON file per model holds every task's metrics, the mteb version and the source path.",
        "",
        "Averages x100 over the benchmark's tasks (n = tasks the model has / tasks in the benchmark); "
        + ", ".join(f"{b}: {metric_label(benchmark_main_metric(b))}" for b in benchmarks)
        + ".",
        "",
        "| model | " + " | ".join(benchmarks) + " | mteb versions | source commit |",
        "|---|" + "---:|" * len(benchmarks) + "---|---|",
    ]

    def sort_key(record: dict) -> float:
        entry = record.get("benchmarks", {}).get(benchmarks[0] if benchmarks else "", {})
        return -(entry.get(f"{entry.get('main_metric')}_mean") or 0.0)

    for record in sorted(records, key=sort_key):
        cells = []
        for benchmark in benchmarks:
            entry = record.get("benchmarks", {}).get(benchmark)
            mean = entry.get(f"{entry['main_metric']}_mean") if entry else None
            cells.append(f"{100 * mean:.2f} (n={entry['n_tasks']}/{entry['of']})" if mean is not None else "—")
        commit = (record.get("source", {}).get("commit") or "unknown")[:7]
        versions = ", ".join(record.get("mteb_versions", []))
        lines.append(f"| {record['model']} | " + " | ".join(cells) + f" | {versions} | {commit} |")
    return "\n".join(lines) + "\n"


def _dump_compact(record: dict) -> str:
    """Indented JSON with each task's metric dict on one line, so the files stay readable and diffable."""
    text = json.dumps(record, indent=2)
    # json.dumps(indent=2) puts every metric on its own line; fold the innermost `"scores": {...}` objects.
    out, buffer, folding = [], [], False
    for line in text.splitlines():
        if not folding and line.strip() == '"scores": {':
            folding, buffer = True, [line.rstrip()]
            continue
        if folding:
            stripped = line.strip()
            if stripped.startswith("}"):
                out.append(buffer[0] + " ".join(b.strip() for b in buffer[1:]) + " " + stripped)
                folding = False
            else:
                buffer.append(stripped)
            continue
        out.append(line)
    return "\n".join(out)
