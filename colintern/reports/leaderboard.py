"""Reference scores of the leading public retrievers, rebuilt from the public mteb results repository.

    python scripts/update_leaderboard.py --results-repo ~/src/results     # a clone of embeddings-benchmark/results
    python scripts/update_leaderboard.py --results-repo ~/mirror.git      # a bare snapshot (git clone --mirror)
    python scripts/update_leaderboard.py                                  # clones the models' folders itself

The repository is read with mteb's own `ResultCache` (its `results/{model}/{revision}/{Task}.json` layout is the
one a local cache uses); a bare git snapshot is read at its HEAD (only the reference models' ViDoRe files are
extracted, into a temporary folder). For each reference model and each ViDoRe task, the result from the model's
registered revision (mteb's `ModelMeta.revision`) is preferred, else the revision with the most ViDoRe results; a
model listed in PREFERRED_EXPERIMENTS takes a task from that mteb experiment folder
(`{revision}/experiments/{name}/`) when it has it, and its record says which mode that is. One JSON file per model
is written to `results/leaderboard/`: every task's retrieval metrics (0-1, averaged over language subsets like
mteb), the mteb version that computed them, the exact source file and commit, the language subsets a result lacks
(such a task is flagged partial, not counted complete), and the per-benchmark averages; plus a README.md table of
the averages with each model's rank per benchmark.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from colintern.mteb_results import (
    KNOWN_BENCHMARKS,
    TaskScores,
    benchmark_tasks,
    missing_subsets,
    read_task_result,
    task_scores,
)
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
    # The 2026 leaders of ViDoRe v1/v2/v3 (folder names as in the results repository).
    "DataScience-UIBK/Argus-Colqwen3.5-9b-v0",
    "OpenSearch-AI/Ops-Colqwen3-4B",
    "vultr/VultronRetrieverPrime-Qwen3.5-8B",
    "vultr/VultronRetrieverCore-Qwen3.5-4.5B",
    "vultr/VultronRetrieverFlash-Qwen3.5-0.8B",
    "webAI-Official/webAI-ColVec1.1-8b",
    "webAI-Official/webAI-ColVec1.1-4b",
    "TomoroAI/tomoro-colqwen3-embed-8b",
    "ApsaraStackMaaS/EvoQwen2.5-VL-Retriever-7B-v1",
)
# model -> (mteb experiment folder, the mode it is): tasks found there are taken from it. jina-embeddings-v4's
# default ViDoRe(v3) files are its single-vector scores; its v1/v2 files, and the experiment, are multi-vector.
PREFERRED_EXPERIMENTS: dict[str, tuple[str, str]] = {
    "jinaai/jina-embeddings-v4": ("vector_type_multi_vector", "multi-vector"),
}
EXPERIMENTS_FOLDER = "experiments"  # mteb's name (mteb.cache.result_cache._EXPERIMENTS_FOLDER_NAME)
# The metrics kept per task: the ones retrieval practitioners compare (mteb also stores precision, nAUC, ...).
STORED_METRICS: tuple[str, ...] = tuple(
    f"{name}_at_{k}" for name in ("ndcg", "recall", "map", "mrr") for k in (1, 3, 5, 10, 20, 100, 1000)
)


def git_commit(path: Path) -> str | None:
    """The checked-out commit of a git clone (or HEAD of a bare one), or None when `path` is not one."""
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _is_bare_git(path: Path) -> bool:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--is-bare-repository"], capture_output=True,
                             text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == "true"


def model_folder(model: str) -> str:
    """mteb's folder name for a model (`org/name` -> `org__name`)."""
    return model.replace("/", "__").replace(" ", "_")


def _wanted(relative: str, folders: set[str], task_names: set[str]) -> bool:
    """A results/{folder}/{revision}/[experiments/{name}/]{file}.json path of a reference model's ViDoRe task (or its
    model_meta.json)."""
    parts = relative.split("/")
    if len(parts) not in (4, 6) or parts[0] != "results" or parts[1] not in folders:
        return False
    if len(parts) == 6 and parts[3] != EXPERIMENTS_FOLDER:
        return False
    name = parts[-1]
    return name == "model_meta.json" or (name.endswith(".json") and name[: -len(".json")] in task_names)


def extract_snapshot(git_dir: Path, destination: Path, models: Sequence[str], task_names: Sequence[str]) -> str:
    """Write the reference models' ViDoRe result files at HEAD of the git repository `git_dir` (bare or not) below
    `destination` (same relative paths); returns the commit. A blob the snapshot lacks is an error naming it."""
    commit = git_commit(git_dir)
    if commit is None:
        raise ColinternError(f"{git_dir} is not a git repository: pass a clone or snapshot of {RESULTS_REPOSITORY}")
    folders = {model_folder(m) for m in models}
    listing = subprocess.run(
        ["git", "-C", str(git_dir), "ls-tree", "-r", "-z", commit, "--", *(f"results/{f}" for f in sorted(folders))],
        capture_output=True, check=True, timeout=300,
    ).stdout.decode("utf-8").split("\0")
    entries = []  # (sha, relative path)
    for line in filter(None, listing):
        meta, relative = line.split("\t", 1)
        if meta.split()[1] == "blob" and _wanted(relative, folders, set(task_names)):
            entries.append((meta.split()[2], relative))
    if not entries:
        return commit
    batch = subprocess.run(["git", "-C", str(git_dir), "cat-file", "--batch"], input="\n".join(s for s, _ in entries)
                           .encode() + b"\n", capture_output=True, check=True, timeout=600).stdout
    offset = 0
    for sha, relative in entries:
        end = batch.index(b"\n", offset)
        header = batch[offset:end].decode().split()
        if len(header) < 3 or header[1] == "missing":
            raise ColinternError(f"the snapshot {git_dir} lacks the contents of {relative} (blob {sha}): fetch it "
                                 "completely (git fetch, or a fresh git clone --depth 1).")
        size = int(header[2])
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(batch[end + 1 : end + 1 + size])
        offset = end + 1 + size + 1
    return commit


def sparse_clone(destination: Path, models: Sequence[str], repository: str = RESULTS_REPOSITORY) -> Path:
    """A shallow, sparse clone of the results repository holding only the models' folders (needs the network)."""
    folders = [f"results/{model_folder(m)}" for m in models]
    commands = [
        ["git", "clone", "--quiet", "--depth", "1", "--filter=blob:none", "--sparse", repository, str(destination)],
        ["git", "-C", str(destination), "sparse-checkout", "set", *folders],
    ]
    for command in commands:
        try:
            subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800)
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", "") or str(error)
            raise ColinternError(
                f"could not clone {repository} ({' '.join(command[:3])}...: {(detail.strip().splitlines() or ['?'])[-1]}). "
                "Without network, pass a clone or snapshot made elsewhere with --results-repo."
            ) from error
    return destination


@contextlib.contextmanager
def results_checkout(
    results_repo: str | Path | None, models: Sequence[str], task_names: Sequence[str],
    repository: str = RESULTS_REPOSITORY,
) -> Iterator[tuple[Path, Path, str | None]]:
    """(folder holding results/, the path to name as the source, commit) for a clone, a bare snapshot, or (None)
    a sparse clone made here; temporary folders are removed afterwards."""
    if results_repo is not None:
        results_repo = Path(results_repo).expanduser()
        if (results_repo / "results").is_dir():
            commit = git_commit(results_repo)
            if commit is None:
                logger.warning("%s is not a git clone: the reference files will not record a commit", results_repo)
            yield results_repo, results_repo, commit
            return
        if not _is_bare_git(results_repo):
            raise ColinternError(
                f"{results_repo} does not look like a clone of {repository} (no results/ folder, not a bare git "
                f"snapshot). Clone it with `git clone --depth 1 {repository}` and pass that folder to --results-repo."
            )
    scratch = Path(tempfile.mkdtemp(prefix="colintern-mteb-results-"))
    try:
        if results_repo is None:
            logger.info("Cloning the reference models' folders of %s", repository)
            clone = sparse_clone(scratch / "results-repo", models, repository)
            yield clone, Path(repository), git_commit(clone)
        else:
            commit = extract_snapshot(results_repo, scratch, models, task_names)
            yield scratch, results_repo, commit
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _registered_revision(model_name: str) -> str | None:
    import mteb

    try:
        return mteb.get_model_meta(model_name).revision
    except Exception:  # noqa: BLE001 - a model mteb does not know: fall back to the best-covered revision
        return None


@dataclass(frozen=True)
class _Found:
    revision: str
    experiment: str | None
    path: Path


def collect_reference_scores(
    results_repo: str | Path | None,
    models: Sequence[str] = REFERENCE_MODELS,
    benchmarks: Sequence[str] = KNOWN_BENCHMARKS,
    repository: str = RESULTS_REPOSITORY,
) -> list[dict]:
    """Read the reference models' benchmark results from the mteb results repository: a local clone, a bare git
    snapshot of it, or (None) a sparse clone made here.

    Returns one record per model that has any result (the content of its `results/leaderboard/` file).
    """
    task_names = [task for benchmark in benchmarks for task in benchmark_tasks(benchmark)]
    with results_checkout(results_repo, models, task_names, repository) as (root, _source, commit):
        return _collect(root, commit, models, benchmarks, task_names, repository,
                        shown=results_repo if results_repo is not None else repository)


def _collect(root: Path, commit: str | None, models: Sequence[str], benchmarks: Sequence[str],
             task_names: Sequence[str], repository: str, shown) -> list[dict]:
    from mteb.cache import ResultCache

    cache = ResultCache(root)  # its results/{model}/{revision}/{task}.json layout is the repository's
    paths = cache.get_cache_paths(models=list(models), tasks=list(task_names), require_model_meta=False,
                                  include_remote=False, load_experiments="match_name")
    by_model: dict[str, dict[str, list[_Found]]] = {}  # model -> task -> candidates
    folder_to_model = {model_folder(model): model for model in models}
    results_dir = (root / "results").resolve()
    for path in paths:
        parts = path.resolve().relative_to(results_dir).parts
        model = folder_to_model.get(parts[0])
        if model is None:
            continue
        experiment = parts[3] if len(parts) == 5 and parts[2] == EXPERIMENTS_FOLDER else None
        if len(parts) not in (3, 5) or (len(parts) == 5 and experiment is None):
            continue
        preferred = PREFERRED_EXPERIMENTS.get(model, (None, None))[0]
        if experiment is not None and experiment != preferred:
            continue  # other experiments are other settings of the model, not its reference scores
        by_model.setdefault(model, {}).setdefault(path.stem, []).append(_Found(parts[1], experiment, path))

    records = []
    for model in models:
        tasks = by_model.get(model)
        if not tasks:
            logger.warning("No %s results for %s in %s", "/".join(benchmarks), model, shown)
            continue
        registered = _registered_revision(model)
        per_revision = Counter(f.revision for found in tasks.values() for f in found)
        chosen = {
            task: min(found, key=lambda f: (f.experiment is None, f.revision != registered,
                                            -per_revision[f.revision], f.revision))
            for task, found in tasks.items()
        }
        records.append(_model_record(model, chosen, root, commit, repository, benchmarks))
        logger.info("%s: %d tasks from %s", model, len(chosen), ", ".join(sorted({f.revision for f in chosen.values()})))
    if not records:
        raise ColinternError(
            f"none of the reference models has ViDoRe results in {shown}. Is the clone complete "
            "(not a sparse checkout of other folders)?"
        )
    return records


def _model_record(
    model: str,
    chosen: dict[str, _Found],
    results_repo: Path,
    commit: str | None,
    repository: str,
    benchmarks: Sequence[str],
) -> dict:
    import mteb

    tasks: dict[str, dict] = {}
    scored: dict[str, TaskScores] = {}
    partial: set[str] = set()
    for benchmark in benchmarks:
        for task in benchmark_tasks(benchmark):
            if task not in chosen:
                continue
            found = chosen[task]
            result = read_task_result(found.path)
            scores = task_scores(result)
            scored[task] = scores
            entry = {
                "benchmark": benchmark,
                "main_metric": scores.main_metric,
                "main_score": _round(scores.get("main_score")),
                "scores": {m: _round(scores.scores[m]) for m in STORED_METRICS if m in scores.scores},
                "mteb_version": scores.mteb_version,
                "dataset_revision": scores.dataset_revision,
                "split": scores.split,
                "revision": found.revision,
                "path": found.path.resolve().relative_to(results_repo.resolve()).as_posix(),
            }
            if found.experiment:
                entry["experiment"] = found.experiment
            missing = missing_subsets(result)
            if missing:
                partial.add(task)
                entry["missing_subsets"] = missing
                entry["subsets_of"] = len(mteb.get_task(task).hf_subsets)
            tasks[task] = entry
    averages = {}
    for benchmark in benchmarks:
        members = benchmark_tasks(benchmark)
        have = [t for t in members if t in scored]
        if not have:
            continue
        main = benchmark_main_metric(benchmark)
        entry = {"main_metric": main, "n_tasks": len(have), "of": len(members)}
        partial_here = [t for t in have if t in partial]
        if partial_here:
            entry["partial_tasks"] = partial_here  # results lacking language subsets: the mean is not comparable
        for metric in dict.fromkeys((main, "ndcg_at_5", "ndcg_at_10")):
            values = [scored[t].get(metric) for t in have]
            if all(v is not None for v in values):
                entry[f"{metric}_mean"] = _round(sum(values) / len(values))
        averages[benchmark] = entry
    record = {
        "model": model,
        "revision": Counter(f.revision for f in chosen.values()).most_common(1)[0][0],
    }
    experiments = {f.experiment for t, f in chosen.items() if t in tasks and f.experiment}
    if experiments:
        (experiment,) = experiments
        mode = PREFERRED_EXPERIMENTS[model][1]
        where = sorted({tasks[t]["benchmark"] for t, f in chosen.items() if t in tasks and f.experiment})
        record["mode"] = mode
        record["mode_note"] = (f"{', '.join(where)} from the mteb experiment {experiment} ({mode}); other "
                               f"benchmarks from the model's default result files")
    record.update({
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
    })
    return record


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
        if _same_but_date(path, record):
            logger.info("%s: unchanged", record["model"])
        else:
            atomic_write_text(path, _dump_compact(record) + "\n")
        written.append(path)
    atomic_write_text(output_dir / "README.md", leaderboard_markdown(_all_records(output_dir)))
    return written


def _same_but_date(path: Path, record: dict) -> bool:
    """Whether `path` already holds `record` up to its generation date (kept, so a refresh only shows changes)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False

    def strip(r: dict) -> dict:
        return {**r, "generated": {k: v for k, v in r.get("generated", {}).items() if k != "date"}}

    return strip(old) == strip(record)


def _all_records(output_dir: Path) -> list[dict]:
    records = []
    for path in sorted(output_dir.glob("*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError:
            logger.warning("Skipping unreadable %s", path)
    return records


def _mean(entry: dict | None) -> float | None:
    return entry.get(f"{entry['main_metric']}_mean") if entry else None


def benchmark_ranks(records: Sequence[dict], benchmark: str) -> dict[str, int]:
    """model -> rank (1 = best) on `benchmark` among the records that have all its tasks with all their language
    subsets; a model with a missing or partial task is not ranked."""
    complete = []
    for record in records:
        entry = record.get("benchmarks", {}).get(benchmark)
        mean = _mean(entry)
        if mean is not None and entry["n_tasks"] == entry["of"] and not entry.get("partial_tasks"):
            complete.append((record["model"], mean))
    return {model: 1 + sum(other > mean for _, other in complete) for model, mean in complete}


def leaderboard_markdown(records: Sequence[dict]) -> str:
    """The README of results/leaderboard/: benchmark averages per model (x100) with the rank per benchmark, and
    sources. Sorted by the mean rank over the benchmarks a model is ranked on (more benchmarks first)."""
    benchmarks = [b for b in KNOWN_BENCHMARKS if any(b in r.get("benchmarks", {}) for r in records)]
    ranks = {b: benchmark_ranks(records, b) for b in benchmarks}
    lines = [
        "# Reference scores",
        "",
        "Published ViDoRe scores of leading public retrievers, read from mteb's result files in the public results "
        f"repository ({RESULTS_REPOSITORY}). Rebuilt by `python scripts/update_leaderboard.py --results-repo PATH` "
        "from a local clone or a bare snapshot (without --results-repo it clones the models' folders); one JSON "
        "file per model holds every task's metrics, the mteb version and the source path.",
        "",
        "Averages x100 over the benchmark's tasks (n = tasks the model has / tasks in the benchmark); "
        + ", ".join(f"{b}: {metric_label(benchmark_main_metric(b))}" for b in benchmarks)
        + ". #k = rank on that benchmark among the models with all its tasks in all their languages; a model "
        "lacking tasks or languages (\"partial\": mteb averaged only the languages it has) is not ranked there.",
        "",
        "| model | " + " | ".join(benchmarks) + " | mteb versions | source commit |",
        "|---|" + "---:|" * len(benchmarks) + "---|---|",
    ]

    def sort_key(record: dict) -> tuple:
        own = [ranks[b][record["model"]] for b in benchmarks if record["model"] in ranks[b]]
        first = _mean(record.get("benchmarks", {}).get(benchmarks[0])) if benchmarks else None
        return (-len(own), sum(own) / len(own) if own else 0.0, -(first or 0.0), record["model"])

    notes = []
    for record in sorted(records, key=sort_key):
        cells = []
        for benchmark in benchmarks:
            entry = record.get("benchmarks", {}).get(benchmark)
            mean = _mean(entry)
            if mean is None:
                cells.append("—")
                continue
            rank = ranks[benchmark].get(record["model"])
            partial = entry.get("partial_tasks", [])
            flag = f", {len(partial)} partial" if partial else ""
            cells.append((f"#{rank} " if rank else "") + f"{100 * mean:.2f} (n={entry['n_tasks']}/{entry['of']}{flag})")
            if partial:
                langs = {t: record["tasks"][t].get("missing_subsets", []) for t in partial}
                notes.append(f"- {record['model']}, {benchmark}: "
                             + "; ".join(f"{t} lacks {', '.join(m)}" for t, m in langs.items()))
        commit = (record.get("source", {}).get("commit") or "unknown")[:7]
        versions = ", ".join(record.get("mteb_versions", []))
        name = record["model"] + (f" ({record['mode']})" if record.get("mode") else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {versions} | {commit} |")
        if record.get("mode_note"):
            notes.append(f"- {record['model']}: {record['mode_note']}.")
    if notes:
        lines += ["", "Notes:", "", *notes]
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
