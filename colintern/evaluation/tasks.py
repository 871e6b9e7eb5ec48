"""mteb tasks: local retrieval folders (SynthDocs, your own documents) and name resolution for `--benchmarks`.

A local retrieval folder holds mteb's retrieval layout as parquet files, either directly (one split, "test"):

    FOLDER/corpus.parquet     id (str), image (image: {"bytes", "path"}), optionally text (str: the page's OCR text)
    FOLDER/queries.parquet    id (str), text (str)
    FOLDER/qrels.parquet      query-id (str), corpus-id (str), score (int)

or one subfolder per split (`FOLDER/test/...`, `FOLDER/validation/...`), as SynthDocs writes them. An optional
`FOLDER/task.json` may give the task a `name` (made a plain file name by `colintern.utils.safe_name`: mteb names the
result file after it) and `description`; without one, a SynthDocs folder (synthdocs.json) is
`SynthDocsRetrieval` and any other folder `LocalRetrieval-<parent>-<folder>`. `local_retrieval_task(FOLDER)` turns
such a folder into an `AbsTaskRetrieval`, so mteb's own evaluation loop, metrics and result files apply unchanged. Its
dataset revision is a hash of the parquet files: results computed on other data are recomputed, not reused. A corpus
with a text column makes a "t2it" task (page image and text, the shape of ViDoRe(v3.1)): the retriever's
`corpus_text` mode decides whether the text is used.

Private tasks (mteb's `is_public=False`, e.g. ViDoRe(v3)'s Telecom and Nuclear domains, whose data only the
benchmark's maintainers hold) are kept apart by `resolve_benchmarks`: they are reported as not run, never loaded.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata

from colintern.data.synthdocs import DOMAIN_DATASETS, EMBEDDED_DATASET, resolve_dataset
from colintern.utils import ColinternError, safe_name

logger = logging.getLogger(__name__)

SPLIT_FILES = ("corpus", "queries", "qrels")
REQUIRED_COLUMNS = {"corpus": ("id", "image"), "queries": ("id", "text"), "qrels": ("query-id", "corpus-id", "score")}
TASK_INFO_FILE = "task.json"


# ---------------------------------------------------------------------------------------------------- folders
def find_splits(folder: str | Path) -> dict[str, Path]:
    """{split: folder holding corpus/queries/qrels.parquet}; a flat folder is the "test" split."""
    folder = Path(folder)

    def complete(path: Path) -> bool:
        return all((path / f"{name}.parquet").is_file() for name in SPLIT_FILES)

    if complete(folder):
        return {"test": folder}
    if not folder.is_dir():
        raise ColinternError(f"{folder}: no such folder.")
    splits = {child.name: child for child in sorted(folder.iterdir()) if child.is_dir() and complete(child)}
    if not splits:
        raise ColinternError(
            f"{folder} is not a retrieval task folder: it needs corpus.parquet, queries.parquet and qrels.parquet, "
            "directly or in one subfolder per split (test/, validation/)."
        )
    return splits


def folder_revision(split_dirs: dict[str, Path]) -> str:
    """12 hex digits identifying the data of every split (content hash of the parquet files)."""
    hasher = hashlib.blake2b(digest_size=16)
    for split in sorted(split_dirs):
        for name in SPLIT_FILES:
            path = split_dirs[split] / f"{name}.parquet"
            hasher.update(f"{split}/{name}\0".encode())
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(chunk)
    return hasher.hexdigest()[:12]


def _read_table(path: Path, kind: str):
    """A parquet file as an in-memory `datasets.Dataset` (no cache files written), its columns checked."""
    import datasets
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise ColinternError(f"{path} is not a readable parquet file: {error}") from error
    missing = [column for column in REQUIRED_COLUMNS[kind] if column not in table.column_names]
    if missing:
        raise ColinternError(
            f"{path} lacks the column(s) {', '.join(missing)}: a {kind} file needs {', '.join(REQUIRED_COLUMNS[kind])}."
        )
    dataset = datasets.Dataset(table)
    if kind == "corpus" and "text" in dataset.column_names and dataset.features["text"] != datasets.Value("string"):
        raise ColinternError(
            f"{path}: the optional text column (the page's OCR text) must hold strings, got {dataset.features['text']}."
        )
    if kind == "corpus" and not isinstance(dataset.features["image"], datasets.Image):
        try:
            dataset = dataset.cast_column("image", datasets.Image())
        except Exception as error:  # noqa: BLE001
            raise ColinternError(
                f"{path}: the image column must hold images ({{'bytes', 'path'}} structs as datasets.Image writes "
                f"them), got {dataset.features['image']}."
            ) from error
    for column in ("id", "query-id", "corpus-id"):
        if column in dataset.column_names and dataset.features[column].dtype != "string":
            dataset = dataset.cast_column(column, datasets.Value("string"))
    return dataset


def read_split(folder: Path) -> RetrievalSplitData:
    """One split of a local retrieval folder as mteb's `RetrievalSplitData`, with its references checked."""
    corpus = _read_table(folder / "corpus.parquet", "corpus")
    queries = _read_table(folder / "queries.parquet", "queries")
    qrels = _read_table(folder / "qrels.parquet", "qrels")
    for name, table in (("corpus", corpus), ("queries", queries)):
        ids = table["id"]
        if len(set(ids)) != len(ids):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})[:5] if len(ids) < 100_000 else []
            raise ColinternError(f"{folder}/{name}.parquet has duplicate ids {duplicates}: every id must be unique.")
    doc_ids, query_ids = set(corpus["id"]), set(queries["id"])
    relevant_docs: dict[str, dict[str, int]] = {}
    for row in qrels:
        if row["query-id"] not in query_ids or row["corpus-id"] not in doc_ids:
            unknown = row["query-id"] if row["query-id"] not in query_ids else row["corpus-id"]
            raise ColinternError(
                f"{folder}/qrels.parquet names {unknown!r}, which is not in queries.parquet / corpus.parquet."
            )
        relevant_docs.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    if not relevant_docs:
        raise ColinternError(f"{folder}/qrels.parquet is empty: no query has a relevant page.")
    return RetrievalSplitData(corpus=corpus, queries=queries, relevant_docs=relevant_docs, top_ranked=None)


# ---------------------------------------------------------------------------------------------------- tasks
class LocalRetrievalTask(AbsTaskRetrieval):
    """A text-to-page retrieval task over a local folder (see the module docstring). Build with
    `local_retrieval_task`; the folder and metadata live on the class because mteb restores class metadata when it
    unloads a task."""

    data_path: ClassVar[str]

    def data_folder(self) -> Path:
        return Path(resolve_dataset(str(self.data_path))).expanduser()

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        split_dirs = find_splits(self.data_folder())
        missing = [split for split in self.eval_splits if split not in split_dirs]
        if missing:
            raise ColinternError(
                f"{self.data_folder()} has no {', '.join(missing)} split (found: {', '.join(split_dirs)})."
            )
        self.dataset = {"default": {split: read_split(split_dirs[split]) for split in self.eval_splits}}
        self.data_loaded = True


def _task_metadata(
    name: str, path: str, revision: str, splits: Sequence[str], description: str, category: str = "t2i"
) -> TaskMetadata:
    return TaskMetadata(
        name=name,
        description=description,
        reference=None,
        dataset={"path": path, "revision": revision},
        type="DocumentUnderstanding",
        category=category,  # "t2it": corpus rows hold a page image and its text (as ViDoRe(v3.1))
        eval_splits=list(splits),
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_5",  # as ViDoRe(v1)
        date=None,
        domains=None,
        task_subtypes=["Image Text Retrieval"],
        license="not specified",
        annotations_creators="derived",
        dialect=[],
        modalities=["text", "image"],
        sample_creation="created",
        bibtex_citation="",
    )


def _task_info(folder: Path) -> dict[str, Any]:
    """The folder's task.json as a dict ({} without one)."""
    info = folder / TASK_INFO_FILE
    if not info.is_file():
        return {}
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ColinternError(f"{info} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ColinternError(f"{info} must hold a JSON object such as {{\"name\": \"...\", \"description\": \"...\"}}.")
    return data


def _task_name(name: Any, where: str) -> str:
    """A task name from data, safe as the result file name mteb makes of it (`{name}.json`)."""
    cleaned = safe_name(name, fallback="LocalRetrieval")
    if cleaned != str(name):
        logger.warning("%s: task name %r is not a plain file name; the task is called %r", where, name, cleaned)
    return cleaned


def _task_name_for(folder: Path) -> str:
    name = _task_info(folder).get("name")
    if name:
        return _task_name(name, str(folder / TASK_INFO_FILE))
    parts = [folder.parent.name, folder.name] if folder.parent.name else [folder.name]
    return "LocalRetrieval-" + "-".join(filter(None, (safe_name(part, fallback="") for part in parts)))


def local_retrieval_task(
    folder: str | Path, splits: Sequence[str] | None = None, name: str | None = None
) -> LocalRetrievalTask:
    """An mteb retrieval task over a local folder; a SynthDocs folder (synthdocs.json) becomes `SynthDocsRetrieval`.

    Args:
        splits: splits to evaluate (default "test" when present, else every split found).
        name: task name (default: task.json's `name`, else `LocalRetrieval-<parent>-<folder>`).
    """
    folder = Path(folder).expanduser().resolve()
    if (folder / "synthdocs.json").is_file() and name is None and not (folder / TASK_INFO_FILE).is_file():
        return SynthDocsRetrieval.for_folder(folder, splits)
    split_dirs = find_splits(folder)
    chosen = list(splits) if splits else (["test"] if "test" in split_dirs else sorted(split_dirs))
    unknown = [split for split in chosen if split not in split_dirs]
    if unknown:
        raise ColinternError(f"{folder} has no {', '.join(unknown)} split (it has {', '.join(split_dirs)}).")
    description = str(_task_info(folder).get("description") or f"Text-to-page retrieval on the local folder {folder}.")
    task_name = _task_name(name, str(folder)) if name else _task_name_for(folder)
    category = "t2it" if all(_corpus_has_text(path) for path in split_dirs.values()) else "t2i"
    metadata = _task_metadata(
        task_name, str(folder), folder_revision(split_dirs), sorted(split_dirs), description, category
    )
    attributes = {"metadata": metadata, "data_path": str(folder)}
    return type("LocalRetrievalTask", (LocalRetrievalTask,), attributes)().filter_eval_splits(chosen)


def _corpus_has_text(split_dir: Path) -> bool:
    """Whether the split's corpus.parquet has a text column (read from the schema only)."""
    import pyarrow.parquet as pq

    try:
        return "text" in pq.read_schema(split_dir / "corpus.parquet").names
    except Exception:  # noqa: BLE001 - unreadable: load_data names the file
        return False


def synthdocs_revision(config=None) -> str:
    """The SynthDocs data revision: format version + a hash of the generation parameters (the data is a function
    of both)."""
    from colintern.data.synthdocs import FORMAT_VERSION, SynthDocsConfig

    config = (config or SynthDocsConfig()).to_dict()
    digest = hashlib.blake2b(json.dumps(config, sort_keys=True).encode(), digest_size=6).hexdigest()
    return f"v{FORMAT_VERSION}-{digest}"


class SynthDocsRetrieval(LocalRetrievalTask):
    """SynthDocs held-out pages as an mteb task (default: `embedded:synthdocs`, built on first use).

    Test split by default; `SynthDocsRetrieval().filter_eval_splits(["validation"])` scores the validation split.
    """

    data_path: ClassVar[str] = EMBEDDED_DATASET
    metadata = _task_metadata(
        "SynthDocsRetrieval",
        EMBEDDED_DATASET,
        synthdocs_revision(),
        ["test", "validation"],
        "Retrieve the synthetic document page (title-band colour, logo shape and colour, chart type) a query "
        "describes; every attribute combination of the test split is unseen in training.",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self._eval_splits:
            self.filter_eval_splits(["test"])

    @classmethod
    def for_folder(cls, folder: str | Path, splits: Sequence[str] | None = None) -> SynthDocsRetrieval:
        """SynthDocsRetrieval over another SynthDocs folder (other seed or size); its revision records its config."""
        from colintern.data.synthdocs import SynthDocsConfig, read_manifest

        folder = Path(folder).expanduser().resolve()
        manifest = read_manifest(folder)
        unknown = [split for split in splits or [] if split not in find_splits(folder)]
        if unknown:
            raise ColinternError(f"{folder} has no {', '.join(unknown)} split (it has test, validation).")
        revision = synthdocs_revision(SynthDocsConfig(**manifest["config"]))
        metadata = cls.metadata.model_copy(update={"dataset": {"path": str(folder), "revision": revision}})
        subclass = type("SynthDocsRetrieval", (cls,), {"metadata": metadata, "data_path": str(folder)})
        task = subclass()
        return task.filter_eval_splits(list(splits)) if splits else task


# ---------------------------------------------------------------------------------------------------- resolution
@dataclass
class BenchmarkSelection:
    """What one `--benchmarks` value resolved to: a label for averages and its tasks."""

    label: str
    tasks: list[Any]  # the tasks to evaluate
    is_benchmark: bool  # a named group (its average is reported) rather than a single task
    private: list[Any] = field(default_factory=list)  # tasks whose data is not public: reported, never loaded

    @property
    def n_total(self) -> int:
        return len(self.tasks) + len(self.private)


def is_private(task) -> bool:
    """Whether mteb marks the task's data as private (`is_public=False`): only the benchmark's maintainers can run it."""
    return getattr(task.metadata, "is_public", True) is False


def _split_private(tasks: list[Any]) -> tuple[list[Any], list[Any]]:
    return [t for t in tasks if not is_private(t)], [t for t in tasks if is_private(t)]


LOCAL_TASKS = {"SynthDocsRetrieval": SynthDocsRetrieval}


def resolve_benchmarks(names: Sequence[str], splits: Sequence[str] | None = None) -> list[BenchmarkSelection]:
    """Turn benchmark names ("ViDoRe(v1)"), task names ("VidoreDocVQARetrieval", "SynthDocsRetrieval") and local
    folders into mteb tasks.

    Raises:
        ColinternError naming the unknown value and close matches.
    """
    import mteb

    selections = []
    for raw in names:
        name = raw.strip()
        if name in DOMAIN_DATASETS:  # embedded:synthdocs-a / -b: that domain's held-out split
            name = resolve_dataset(name)
        path = Path(name).expanduser()
        if path.is_dir():
            task = local_retrieval_task(path, splits)
            selections.append(BenchmarkSelection(task.metadata.name, [task], False))
            continue
        if name in LOCAL_TASKS:
            selections.append(BenchmarkSelection(name, _with_splits([LOCAL_TASKS[name]()], splits), False))
            continue
        try:
            benchmark = mteb.get_benchmark(name)
            public, private = _split_private(list(benchmark.tasks))
            selections.append(BenchmarkSelection(benchmark.name, _with_splits(public, splits), True, private))
            continue
        except KeyError:
            pass
        try:
            task = mteb.get_task(name)
            public, private = _split_private([task])
            selections.append(BenchmarkSelection(task.metadata.name, _with_splits(public, splits), False, private))
            continue
        except KeyError:
            pass
        if "/" in name or name.startswith((".", "~")):
            raise ColinternError(f"--benchmarks {name!r}: no such folder (a local task is a folder of parquet files).")
        known = [b.name for b in mteb.get_benchmarks()] + list(LOCAL_TASKS)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5) or difflib.get_close_matches(
            name, [t.metadata.name for t in mteb.get_tasks()], n=3, cutoff=0.6
        )
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ColinternError(
            f"--benchmarks {name!r} is not an mteb benchmark, an mteb task, SynthDocsRetrieval or a folder.{hint}"
        )
    return selections


def _with_splits(tasks: list[Any], splits: Sequence[str] | None) -> list[Any]:
    if not splits:
        return tasks
    for task in tasks:
        unknown = [s for s in splits if s not in task.metadata.eval_splits]
        if unknown:
            raise ColinternError(
                f"{task.metadata.name} has no {', '.join(unknown)} split "
                f"(it has {', '.join(task.metadata.eval_splits)})."
            )
        task.filter_eval_splits(list(splits))
    return tasks


def is_hub_task(task) -> bool:
    return not isinstance(task, LocalRetrievalTask)
