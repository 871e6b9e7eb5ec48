"""Training data: loading query-page pairs, validating them before the first step, and collating batches.

Accepted sources (`--dataset`):
  * a Hub dataset id (e.g. `vidore/colpali_train_set`), loaded with `datasets.load_dataset(id, split=...)`;
  * a local folder, read with its own splits: whatever `datasets.load_dataset(folder)` reads (a Hub snapshot from
    `hf download --repo-type dataset ID --local-dir DIR` with `data/train-*.parquet` and `data/test-*.parquet`,
    `train/` and `test/` folders, split names in file names, README configs, image folders with metadata); a
    `save_to_disk` dataset; the retrieval-split layout (SynthDocs, prepare_dataset: a folder per split, evaluation
    splits as corpus / queries / qrels, turned into one pair per relevant page); or `<folder>/<split>/` by any name.
    Files that look like several splits datasets cannot tell apart are an error naming them;
  * `embedded:synthdocs`.

Pairs have a query column (text) and an image column (a page). An optional negatives column holds hard negatives per
query, either page images or integer row indices into the same dataset (compact; what mine_hard_negatives writes).
Before the first step every page's header and structure is checked in parallel processes, without decoding pixels
(`check_pages`; the result is cached for the next run on the same data); pages are decoded in the collator, and any
that fails there is reported with its row number.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.data_files import SPLIT_KEYWORDS
from PIL import Image
from tqdm.auto import tqdm

from colintern.data.pages import open_page
from colintern.data.synthdocs import resolve_dataset
from colintern.utils import ColinternError, atomic_write_json, cache_dir, file_lock

logger = logging.getLogger(__name__)

ROW_COLUMN = "__row__"  # original row index, kept so problems can be reported by row
LENGTH_COLUMN = "__tiles__"  # tiles per page, for length-grouped batching
DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")
RETRIEVAL_FILES = ("corpus", "queries", "qrels")


# ---------------------------------------------------------------------------------------------------- loading
def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())


def _is_retrieval_split(folder: Path) -> bool:
    names = {p.stem for p in _data_files(folder)} if folder.is_dir() else set()
    return set(RETRIEVAL_FILES) <= names


def _load_files(files: list[Path]) -> datasets.Dataset:
    suffix = files[0].suffix
    builder = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}[suffix]
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")


def _retrieval_file(folder: Path, name: str) -> datasets.Dataset:
    return _load_files([p for p in _data_files(folder) if p.stem == name])


def retrieval_split_to_pairs(folder: Path, query_column: str = "query", image_column: str = "image") -> datasets.Dataset:
    """A corpus / queries / qrels split as (query, page) pairs, one per relevant page."""
    corpus = _retrieval_file(folder, "corpus").cast_column("image", datasets.Image(decode=False))
    queries = _retrieval_file(folder, "queries")
    qrels = _retrieval_file(folder, "qrels")
    page_row = {doc_id: i for i, doc_id in enumerate(corpus["id"])}
    query_text = dict(zip(queries["id"], queries["text"]))
    images, texts = [], []
    for qid, cid, score in zip(qrels["query-id"], qrels["corpus-id"], qrels["score"]):
        if score > 0 and qid in query_text and cid in page_row:
            texts.append(query_text[qid])
            images.append(corpus[page_row[cid]]["image"])
    features = datasets.Features({query_column: datasets.Value("string"), image_column: datasets.Image(decode=False)})
    return datasets.Dataset.from_dict({query_column: texts, image_column: images}, features=features)


def load_pairs(source: str, split: str, query_column: str = "query", image_column: str = "image") -> datasets.Dataset:
    """Load one split of a training set as a `datasets.Dataset` (images undecoded)."""
    resolved = resolve_dataset(source)
    path = Path(resolved).expanduser()
    try:
        if path.is_dir():
            dataset = _load_local(path, split, query_column, image_column)
        elif source.startswith(("/", ".", "~")) or source.count("/") > 1:
            raise ColinternError(f"Dataset folder not found: {source}")
        else:
            dataset = datasets.load_dataset(source, split=split)
    except ColinternError:
        raise
    except (ConnectionError, FileNotFoundError, OSError) as error:
        raise ColinternError(
            f"Cannot load dataset '{source}' (split '{split}'): {error}. If it is a Hub dataset and this machine cannot "
            f"reach the Hub, download it where it can: `hf download --repo-type dataset {source} --local-dir DIR` "
            f"(`huggingface-cli download` before huggingface_hub 1.0), copy DIR here and pass --dataset DIR (DIR "
            f"itself, not DIR/data: its train and test splits are read from it). Or use --preset demo."
        ) from error
    except ValueError as error:  # e.g. unknown split, several configs
        raise ColinternError(f"Cannot load split '{split}' of '{source}': {error}") from error
    if image_column in dataset.column_names and isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def _is_saved(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_local(path: Path, split: str, query_column: str, image_column: str) -> datasets.Dataset:
    """One split of a local folder, tried in this order: a `save_to_disk` folder; a retrieval split (corpus/queries/
    qrels) or a folder of split folders some of which are retrieval splits (SynthDocs, prepare_dataset), each split
    folder read on its own; whatever `datasets.load_dataset(folder)` reads as splits (the Hub snapshot layout
    `data/train-*.parquet`, `train/` folders, split names in file names, README configs, parquet / arrow / json / csv
    files, image folders with metadata); finally `<folder>/<split>/` under any other name."""
    if _is_saved(path):
        loaded = datasets.load_from_disk(str(path))
        if not isinstance(loaded, datasets.DatasetDict):
            return loaded
        if split not in loaded:
            raise ColinternError(f"{path} has no split '{split}' (it has: {', '.join(loaded)})")
        return loaded[split]
    if _is_retrieval_split(path):
        return retrieval_split_to_pairs(path, query_column, image_column)
    split_dir = path / split
    subfolders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if split_dir.is_dir() and any(_is_retrieval_split(p) for p in subfolders):
        return _load_split_folder(split_dir, query_column, image_column)
    splits = _folder_splits(path)
    if split in splits:
        _check_one_split(path, split, splits[split])
        _warn_unread(path, splits)
        return _load_split(path, split, splits[split])
    if split_dir.is_dir():
        return _load_split_folder(split_dir, query_column, image_column)
    found = f"it has: {', '.join(splits)}" if splits else "no data files"
    folders = f"; folders: {', '.join(p.name for p in subfolders)}" if subfolders else ""
    raise ColinternError(
        f"{path} has no split '{split}' ({found}{folders}). Expected <folder>/<split>/ folders, <split>-*.parquet "
        f"files, corpus/queries/qrels, or a README whose configs name the splits' files."
    )


def _load_split_folder(folder: Path, query_column: str, image_column: str) -> datasets.Dataset:
    """A folder that is one split as a whole (SynthDocs' train/, a custom split name)."""
    if _is_saved(folder) or _is_retrieval_split(folder):
        return _load_local(folder, "train", query_column, image_column)
    splits = _folder_splits(folder)
    if len(splits) != 1:
        raise ColinternError(
            f"{folder} holds several splits ({', '.join(splits)}): pass --dataset {folder} and name the one to use with "
            f"--train-split / --eval-split." if splits else f"{folder} holds no data files (parquet, arrow, json, csv)."
        )
    (name, files), = splits.items()
    _check_one_split(folder, name, files)
    return _load_split(folder, name, files)


def _load_split(folder: Path, split: str, files: list[Path]) -> datasets.Dataset:
    """`load_dataset(folder)`'s split, with its files named: datasets then keys its cache on those files and their
    modification times (given only the folder, datasets 5.2 reuses the cache of another folder of the same name whose
    README names the same file patterns, e.g. a second snapshot of a dataset), and prepares only this split."""
    return datasets.load_dataset(str(folder), data_files={split: [str(f) for f in files]}, split=split)


def _folder_splits(folder: Path) -> dict[str, list[Path]]:
    """The splits `datasets.load_dataset(folder)` gives, with their files ({} when it finds no data files)."""
    try:
        builder = datasets.load_dataset_builder(str(folder))
    except FileNotFoundError:  # datasets' EmptyDatasetError / DataFilesNotFoundError: no data files
        return {}
    return {str(name): [Path(f) for f in files] for name, files in (builder.config.data_files or {}).items()}


def _warn_unread(folder: Path, splits: dict[str, list[Path]]) -> None:
    """Data files in `folder` that no split reads (datasets ignores files not named after a split when others are)."""
    read = {f for files in splits.values() for f in files}
    unread = sorted(
        str(f.relative_to(folder)) for f in folder.rglob("*")
        if f.suffix in DATA_SUFFIXES and f not in read and not any(p.startswith(".") for p in f.relative_to(folder).parts)
    )
    if unread:
        logger.warning("%s: %d data file(s) belong to no split and are not read (%s). Name them after a split "
                       "(train-*, test-*) or put them in a split folder to use them.", folder, len(unread),
                       ", ".join(unread[:3]) + (", ..." if len(unread) > 3 else ""))


def _split_words(name: str) -> set[str]:
    """The splits a file name names, as datasets' split keywords, whole words or joined to set/data/split
    ('train-00001', 'my_val_pairs', 'trainset', 'test.parquet')."""
    found = set()
    for word in re.split(r"[^a-z]+", name.lower()):
        for split, keywords in SPLIT_KEYWORDS.items():
            if any(word in (k, k + "set", k + "data", k + "split") for k in keywords):
                found.add(str(split))
    return found


def _check_one_split(folder: Path, split: str, files: list[Path]) -> None:
    """Refuse a split that datasets builds from files that look like several splits: different subfolders (`pairs/`,
    `holdout/`) or file names naming different splits in a way datasets does not recognise (`trainset.parquet`,
    `testset.parquet`). Splits a README's configs name are taken as written; image files are not counted."""
    data_files = [f for f in files if f.suffix in DATA_SUFFIXES]
    if len(data_files) < 2 or _has_readme_configs(folder):
        return
    groups: dict[str, list[str]] = {}
    for file in data_files:
        relative = file.relative_to(folder) if file.is_relative_to(folder) else Path(file.name)
        if len(relative.parts) > 1:
            key = relative.parts[0] + "/"
        else:
            key = " and ".join(sorted(_split_words(relative.stem))) or "(no split name)"
        groups.setdefault(key, []).append(str(relative))
    if len(groups) > 1:
        found = "; ".join(f"{key}: {len(names)} file(s), e.g. {names[0]}" for key, names in sorted(groups.items()))
        raise ColinternError(
            f"{folder}: the files datasets reads as its '{split}' split look like {len(groups)} different splits "
            f"({found}), which would be trained on together. Pick one by passing its folder as --dataset, or name them "
            f"after their splits: train/ and test/ folders, or train-*.parquet and test-*.parquet files."
        )


def _has_readme_configs(folder: Path) -> bool:
    readme = folder / "README.md"
    if not readme.is_file():
        return False
    from huggingface_hub import DatasetCard

    return bool(DatasetCard.load(readme).data.get("configs"))


# ---------------------------------------------------------------------------------------------------- validation
def decode_image(value: Any, page_id: Any = None) -> Image.Image:
    """A page from what a dataset stores (PIL image, {'bytes', 'path'}, bytes, path, array), fully decoded;
    `page_id` names it in errors."""
    image = open_page(value, page_id)
    image.load()
    if image.width == 0 or image.height == 0:
        raise ValueError("empty image (0 pixels)")
    return image


def _encoded(value: Any) -> bytes | None:
    """The encoded bytes of a page as datasets stores it ({'bytes', 'path'}, bytes, a path); None for other values."""
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        return Path(value["path"]).read_bytes() if value.get("path") else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, Path)):
        return Path(value).read_bytes()
    return None


def _jpeg_scan_start(data: bytes) -> int:
    """Offset of a JPEG's first start-of-scan marker, walking the marker segments before it."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise SyntaxError(f"broken JPEG marker structure at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:
            return pos
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    raise OSError("image file is truncated (no scan data)")


def check_page(value: Any) -> tuple[int, int]:
    """(width, height) of a page, from checks that do not decode its pixels: PIL identifies the file and reads its
    header (refusing decompression bombs, `Image.MAX_IMAGE_PIXELS`); a PNG is read chunk by chunk to its end with
    every chunk's CRC checked (`Image.verify`); a JPEG must close its scan data with an end-of-image marker. Truncated
    files fail all of these. Pages in other formats are decoded in full.

    Raises:
        ColinternError, OSError, ValueError or SyntaxError describing what is wrong.
    """
    data = _encoded(value)
    image = open_page(data if data is not None else value)
    with image:
        if image.width == 0 or image.height == 0:
            raise ValueError("empty image (0 pixels)")
        size = image.size
        if data is not None and image.format == "PNG":
            image.verify()
        elif data is not None and image.format in ("JPEG", "MPO"):
            if data.rfind(b"\xff\xd9", _jpeg_scan_start(data)) < 0:
                raise OSError("image file is truncated (no end-of-image marker after the scan data)")
        else:
            image.load()
    return size


def _check_rows(dataset: datasets.Dataset, image_column: str, start: int, stop: int) -> list[tuple[int, int] | str]:
    """`check_page` on rows [start, stop): the page's size, or the problem as text."""
    results: list[tuple[int, int] | str] = []
    for value in dataset.select_columns([image_column])[start:stop][image_column]:
        try:
            results.append(check_page(value))
        except Exception as error:  # noqa: BLE001 - any failure is a data problem to report
            results.append(f"unreadable image ({type(error).__name__}: {error})")
    return results


_FORKED_DATASET: datasets.Dataset | None = None  # the dataset checker processes read (inherited when forked)


def _check_rows_in_worker(task: tuple[str, int, int]) -> list[tuple[int, int] | str]:
    image_column, start, stop = task
    return _check_rows(_FORKED_DATASET, image_column, start, stop)


@dataclass
class PageChecks:
    """What `check_pages` found: every page's (width, height) and, by row, the pages that failed."""

    sizes: list[tuple[int, int]]
    problems: dict[int, str]
    seconds: float = 0.0
    cached: bool = False


CHECK_BATCH_ROWS = 512
PAGE_CHECKS_VERSION = 1  # bump when check_page changes what it accepts: cached results are then ignored


def check_pages(
    dataset: datasets.Dataset, image_column: str, *, num_workers: int | None = None, cache: bool = True,
    desc: str = "Checking pages",
) -> PageChecks:
    """`check_page` on every row, in `num_workers` processes (default: the CPUs this process may use, at most 8), the
    rows read from the dataset's arrow files in batches. With `cache`, the result is kept in
    `<cache_dir>/page-checks/` under a key of the dataset's fingerprint and the path, size and modification time of
    each of its arrow files, so a second run or `--resume` on the same data reads it back instead of checking again
    (concurrent ranks wait for the first one's result)."""
    path = page_checks_dir() / f"{_page_checks_key(dataset, image_column)}.json"
    with contextlib.ExitStack() as stack:
        if cache:
            try:
                stack.enter_context(file_lock(path.with_suffix(".lock")))
            except OSError as error:  # e.g. a read-only home: check without a cache
                logger.warning("Page checks are not cached (%s: %s)", path.parent, error)
                cache = False
        stored = _read_page_checks(path, len(dataset)) if cache else None
        if stored is not None:
            logger.info("Page checks of %d rows read from %s", len(dataset), path)
            return stored
        checks = _run_page_checks(dataset, image_column, num_workers, desc)
        if cache:
            atomic_write_json(path, {
                "version": PAGE_CHECKS_VERSION, "rows": len(dataset), "seconds": round(checks.seconds, 3),
                "widths": [w for w, _ in checks.sizes], "heights": [h for _, h in checks.sizes],
                "problems": [[row, problem] for row, problem in sorted(checks.problems.items())],
            })
    return checks


def page_checks_dir() -> Path:
    return cache_dir() / "page-checks"


def _page_checks_key(dataset: datasets.Dataset, image_column: str) -> str:
    files = []
    for entry in dataset.cache_files:
        stat = os.stat(entry["filename"])
        files.append([entry["filename"], stat.st_size, stat.st_mtime_ns])
    identity = [PAGE_CHECKS_VERSION, Image.MAX_IMAGE_PIXELS, dataset._fingerprint, len(dataset), image_column, files]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def _read_page_checks(path: Path, n_rows: int) -> PageChecks | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if stored.get("version") != PAGE_CHECKS_VERSION or stored.get("rows") != n_rows:
        return None
    return PageChecks(list(zip(stored["widths"], stored["heights"])), {row: p for row, p in stored["problems"]},
                      stored.get("seconds", 0.0), cached=True)


def _run_page_checks(dataset: datasets.Dataset, image_column: str, num_workers: int | None, desc: str) -> PageChecks:
    global _FORKED_DATASET
    started = time.perf_counter()
    tasks = [(image_column, start, min(len(dataset), start + CHECK_BATCH_ROWS))
             for start in range(0, len(dataset), CHECK_BATCH_ROWS)]
    workers = min(num_workers or min(8, len(os.sched_getaffinity(0))), len(tasks))
    progress = tqdm(total=len(dataset), desc=desc, leave=False, unit="rows")
    sizes: list[tuple[int, int]] = []
    problems: dict[int, str] = {}

    def collect(results: list) -> None:
        for result in results:
            if isinstance(result, str):
                problems[len(sizes)] = result
                sizes.append((0, 0))
            else:
                sizes.append(tuple(result))
        progress.update(len(results))

    try:
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            # forked: the workers inherit the dataset (memory-mapped arrow files) instead of receiving it pickled
            _FORKED_DATASET = dataset
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                for results in pool.map(_check_rows_in_worker, tasks):
                    collect(results)
        else:
            for column, start, stop in tasks:
                collect(_check_rows(dataset, column, start, stop))
    finally:
        _FORKED_DATASET = None
        progress.close()
    seconds = time.perf_counter() - started
    logger.info("Checked %d pages in %.1f s (%.0f rows/s, %d process(es))", len(dataset), seconds,
                len(dataset) / max(seconds, 1e-9), max(1, workers))
    return PageChecks(sizes, problems, seconds)


@dataclass
class ValidationReport:
    """Problems found in a training split, by row."""

    split: str
    n_rows: int
    problems: list[tuple[int, str]] = field(default_factory=list)

    @property
    def bad_rows(self) -> list[int]:
        return sorted({row for row, _ in self.problems})

    def summary(self, limit: int = 10) -> str:
        lines = [f"row {row}: {problem}" for row, problem in self.problems[:limit]]
        more = len(self.problems) - limit
        return "; ".join(lines) + (f"; ... and {more} more" if more > 0 else "")

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "rows": self.n_rows,
            "bad_rows": len(self.bad_rows),
            "problems": [{"row": r, "problem": p} for r, p in self.problems],
        }


def check_columns(dataset: datasets.Dataset, query_column: str, image_column: str, split: str) -> None:
    missing = [c for c in (query_column, image_column) if c not in dataset.column_names]
    if missing:
        raise ColinternError(
            f"The {split} split has no column {' or '.join(repr(c) for c in missing)} (columns: "
            f"{', '.join(dataset.column_names)}). Name the right ones with --query-column / --image-column."
        )


def _column(dataset: datasets.Dataset, name: str) -> list:
    """A column as a Python list, read in one pass (indexing datasets' lazy `Column` row by row reads row by row)."""
    return dataset.select_columns([name])[:][name]


def validate_pairs(
    dataset: datasets.Dataset,
    query_column: str,
    image_column: str,
    split: str,
    negatives_column: str | None = None,
    tile_counter=None,
    num_workers: int | None = None,
    negative_rows: int | None = None,
    cache: bool = True,
) -> tuple[ValidationReport, list[int]]:
    """Check every row: non-empty query text, a readable non-empty page (`check_pages`: header and structure, not
    pixels; the collator decodes and reports any page that still fails) and its negatives. Returns the report and,
    per row, the page's tile count (from `tile_counter((width, height))`, 1 when None) for length-grouped batching.
    `negative_rows`: rows of the split that hard-negative row indices point into (default: len(dataset)); larger
    when `dataset` is a subsample."""
    check_columns(dataset, query_column, image_column, split)
    report = ValidationReport(split=split, n_rows=len(dataset))
    for row, query in enumerate(_column(dataset, query_column)):
        if not isinstance(query, str) or not query.strip():
            report.problems.append((row, "empty query" if isinstance(query, str) or query is None else "query is not text"))
    pages = check_pages(dataset, image_column, num_workers=num_workers, cache=cache, desc=f"Checking {split} pages")
    report.problems.extend(pages.problems.items())
    tiles = [1 if row in pages.problems or not tile_counter else tile_counter(size) for row, size in enumerate(pages.sizes)]
    if negatives_column and negatives_column in dataset.column_names:
        for row, negatives in enumerate(_column(dataset, negatives_column)):
            if not negatives:
                report.problems.append((row, f"no hard negatives in '{negatives_column}'"))
            elif all(isinstance(n, int) for n in negatives) and max(negatives) >= (negative_rows or len(dataset)):
                report.problems.append((row, f"hard-negative row index out of range ({max(negatives)})"))
    report.problems.sort()
    return report, tiles


def prepare_split(
    dataset: datasets.Dataset,
    *,
    query_column: str,
    image_column: str,
    split: str,
    negatives_column: str | None,
    validate: bool,
    skip_bad_rows: bool,
    tile_counter=None,
    report_path: Path | None = None,
    negative_rows: int | None = None,
    cache: bool = True,
) -> datasets.Dataset:
    """Validate a split and return it with the row-index and tile-count columns the collator and sampler use.
    `cache`: keep the page checks' result for the next run on the same data (`check_pages`)."""
    check_columns(dataset, query_column, image_column, split)
    tiles = [1] * len(dataset)
    if validate:
        report, tiles = validate_pairs(
            dataset, query_column, image_column, split, negatives_column, tile_counter=tile_counter,
            negative_rows=negative_rows, cache=cache,
        )
        if report_path is not None:
            atomic_write_json(report_path, report.to_dict())
        if report.problems:
            where = f" (full report: {report_path})" if report_path else ""
            if not skip_bad_rows:
                raise ColinternError(
                    f"The {split} split has {len(report.bad_rows)} bad row(s) of {report.n_rows}: {report.summary()}"
                    f"{where}. Fix them, or pass --skip-bad-rows to train without them."
                )
            logger.warning("Skipping %d bad row(s) of the %s split: %s%s", len(report.bad_rows), split,
                           report.summary(), where)
    dataset = dataset.add_column(ROW_COLUMN, list(range(len(dataset))))
    dataset = dataset.add_column(LENGTH_COLUMN, tiles)
    if validate and report.problems:
        bad = set(report.bad_rows)
        dataset = dataset.filter(lambda row: row not in bad, input_columns=[ROW_COLUMN])
    if len(dataset) == 0:
        raise ColinternError(f"The {split} split has no usable rows.")
    return dataset


# ---------------------------------------------------------------------------------------------------- collation
class RetrievalCollator:
    """Batches of (query, page[, hard negatives]) -> `query_*`, `doc_*` (and `neg_doc_*`) model inputs.

    Queries get the processor's prefix and augmentation tokens; pages are decoded here and tiled. Hard negatives given
    as row indices are looked up in `page_source` (the split's undecoded image column). A page that fails to decode
    (rare once `check_pages` has passed it: a well-formed file with corrupt compressed data) stops training with its
    row number, or with `skip_bad_rows` is logged by row and left out of its batch (that batch is one row smaller).
    """

    def __init__(
        self,
        processor,
        query_column: str = "query",
        image_column: str = "image",
        negatives_column: str | None = None,
        num_negatives: int = 1,
        page_source=None,
        augment=None,
        seed: int = 0,
        skip_bad_rows: bool = False,
    ):
        self.processor = processor
        self.query_column = query_column
        self.image_column = image_column
        self.negatives_column = negatives_column
        self.num_negatives = num_negatives
        self.page_source = page_source
        self.augment = augment
        self.rng = random.Random(seed)
        self.skip_bad_rows = skip_bad_rows

    def _page(self, value: Any, row: int, what: str = "page") -> Image.Image:
        try:
            image = decode_image(value)
        except Exception as error:  # noqa: BLE001
            raise _UnreadablePage(f"Row {row}: unreadable {what} ({type(error).__name__}: {error})") from error
        return self.augment(image) if self.augment is not None else image

    def _negatives(self, example: dict, row: int) -> list[Image.Image]:
        chosen = list(example[self.negatives_column] or [])[: self.num_negatives]
        if len(chosen) < self.num_negatives:
            raise ColinternError(f"Row {row}: fewer than {self.num_negatives} hard negatives")
        return [self._page(self.page_source[v] if isinstance(v, int) else v, row, "hard negative") for v in chosen]

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        with_negatives = bool(self.negatives_column and self.negatives_column in examples[0])
        queries, pages, negatives, skipped = [], [], [], []
        for i, example in enumerate(examples):
            row = example.get(ROW_COLUMN, i)
            try:
                page = self._page(example[self.image_column], row)
                row_negatives = self._negatives(example, row) if with_negatives else []
            except _UnreadablePage as error:
                if not self.skip_bad_rows:
                    raise ColinternError(f"{error}. Replace the page, or pass --skip-bad-rows to train without the "
                                         f"rows whose pages cannot be decoded.") from error
                logger.warning("%s: left out of its batch (--skip-bad-rows)", error)
                skipped.append(row)
                continue
            queries.append(example[self.query_column] or "")
            pages.append(page)
            negatives.extend(row_negatives)
        if not pages:
            raise ColinternError(f"No row of a batch has a readable page (rows {', '.join(map(str, skipped))}).")
        batch = {f"query_{k}": v for k, v in self.processor.process_queries(queries).items()}
        batch.update({f"doc_{k}": v for k, v in self.processor.process_images(pages).items()})
        if with_negatives:
            batch.update({f"neg_doc_{k}": v for k, v in self.processor.process_images(negatives).items()})
            batch["neg_doc_count"] = torch.tensor(self.num_negatives)
        return batch


class _UnreadablePage(ColinternError):
    pass


# ---------------------------------------------------------------------------------------------------- assembly
@dataclass
class TrainingData:
    train_dataset: datasets.Dataset
    eval_dataset: datasets.Dataset | None
    collator: RetrievalCollator
    retrieval_split: Path | None  # a corpus/queries/qrels evaluation split, scored by NDCG during training
    has_negatives: bool
    varied_lengths: bool
    length_column: str = LENGTH_COLUMN

    @property
    def best_metric(self) -> str:
        return "eval_ndcg_at_5" if self.retrieval_split is not None else "eval_loss"

    @property
    def best_metric_greater_is_better(self) -> bool:
        return self.retrieval_split is not None


def _load_training_split(config, split: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(the rows to train on, the whole split): they differ with max_train_samples, and hard negatives stored as row
    indices point into the whole split."""
    data = config.data
    if not data.mixture:
        whole = load_pairs(data.dataset, split, data.query_column, data.image_column)
        dataset = whole
        if data.max_train_samples is not None and split == data.train_split:
            dataset = whole.shuffle(seed=config.training.seed).select(range(min(len(whole), data.max_train_samples)))
        return dataset, whole
    mixed = load_mixture(data.mixture, split, data.query_column, data.image_column, config.training.seed)
    return mixed, mixed


def load_mixture(mixture: list[dict], split: str, query_column: str, image_column: str, seed: int) -> datasets.Dataset:
    """Several training sets as one: each entry {dataset, split?, max_samples?, weight?, query_column?, image_column?}.

    `max_samples` caps a source; `weight` sets its share of the mixture (sources are resampled, with replacement when
    needed, so that their sizes are proportional to their weights; the largest weighted source keeps its size).
    """
    parts, weights = [], []
    for i, entry in enumerate(mixture):
        if "dataset" not in entry:
            raise ColinternError(f"data.mixture[{i}] needs a 'dataset'")
        q_col, i_col = entry.get("query_column", query_column), entry.get("image_column", image_column)
        part = load_pairs(entry["dataset"], entry.get("split", split), q_col, i_col)
        check_columns(part, q_col, i_col, f"{entry['dataset']}:{entry.get('split', split)}")
        part = part.select_columns([q_col, i_col]).rename_columns({q_col: query_column, i_col: image_column})
        if entry.get("max_samples"):
            part = part.shuffle(seed=seed).select(range(min(len(part), int(entry["max_samples"]))))
        parts.append(part)
        weights.append(float(entry.get("weight", 1.0)))
    if any(w <= 0 for w in weights):
        raise ColinternError("data.mixture weights must be positive")
    per_weight = max(len(p) / w for p, w in zip(parts, weights))
    rng = random.Random(seed)
    resized = []
    for part, weight in zip(parts, weights):
        target = max(1, round(per_weight * weight))
        index = list(range(len(part))) * (target // len(part)) + rng.sample(range(len(part)), target % len(part))
        resized.append(part.select(index))
    return datasets.concatenate_datasets(resized).shuffle(seed=seed)


def build_datasets(config, processor, report_dir: Path | None = None, *, use_negatives: bool = False) -> TrainingData:
    """Training and evaluation data for a run: loaded, validated, with the collator.

    `use_negatives`: the loss consumes hard negatives, so the collator adds the negatives column's pages.
    """
    data = config.data
    raw_train, whole_train = _load_training_split(config, data.train_split)
    negatives_column = data.negatives_column if use_negatives else None
    has_negatives = bool(data.negatives_column) and data.negatives_column in raw_train.column_names
    train = prepare_split(
        raw_train,
        query_column=data.query_column,
        image_column=data.image_column,
        split=data.train_split,
        negatives_column=negatives_column,
        validate=data.validate,
        skip_bad_rows=data.skip_bad_rows,
        tile_counter=processor.n_tiles,
        report_path=(report_dir / "data_report.json") if report_dir else None,
        negative_rows=len(whole_train),
    )
    eval_dataset, retrieval_split = None, None
    if data.eval_split:
        source = Path(resolve_dataset(data.dataset)) if not data.mixture else None
        if source is not None and source.is_dir() and _is_retrieval_split(source / data.eval_split):
            if config.training.retrieval_eval:
                retrieval_split = source / data.eval_split
        try:
            eval_dataset = load_pairs(data.dataset if not data.mixture else data.mixture[0]["dataset"], data.eval_split,
                                      data.query_column, data.image_column)
        except ColinternError as error:
            logger.warning("No evaluation split: %s. Training without an evaluation loss.", error)
        if eval_dataset is not None:
            if data.max_eval_samples is not None and len(eval_dataset) > data.max_eval_samples:
                eval_dataset = eval_dataset.shuffle(seed=0).select(range(data.max_eval_samples))
            eval_dataset = prepare_split(
                eval_dataset, query_column=data.query_column, image_column=data.image_column, split=data.eval_split,
                negatives_column=None, validate=data.validate, skip_bad_rows=True, tile_counter=processor.n_tiles,
                report_path=(report_dir / f"data_report_{data.eval_split}.json") if report_dir else None,
            )
    if config.training.retrieval_eval and retrieval_split is None:
        logger.warning("--retrieval-eval: the '%s' split is not a retrieval split (corpus/queries/qrels); skipped.",
                       data.eval_split)
    negatives_are_rows = has_negatives and negatives_column and _first_is_int(train[negatives_column])
    collator = RetrievalCollator(
        processor,
        query_column=data.query_column,
        image_column=data.image_column,
        negatives_column=negatives_column if has_negatives else None,
        num_negatives=data.num_negatives,
        page_source=PageLookup(whole_train, data.image_column) if negatives_are_rows else None,
        augment=build_augmentation(config.training.augment, config.training.seed),
        seed=config.training.seed,
        skip_bad_rows=data.skip_bad_rows,
    )
    lengths = set(train[LENGTH_COLUMN])
    return TrainingData(train, eval_dataset, collator, retrieval_split, has_negatives, len(lengths) > 1)


class PageLookup:
    """`lookup[row]` -> the undecoded page of an original row (hard negatives stored as row indices)."""

    def __init__(self, dataset: datasets.Dataset, image_column: str):
        self.dataset, self.image_column = dataset, image_column

    def __getitem__(self, row: int):
        return self.dataset[int(row)][self.image_column]


def _first_is_int(column) -> bool:
    for value in column:
        if value:
            return isinstance(value[0], int)
    return False


def build_augmentation(settings: dict, seed: int):
    """Training-page augmentation from the run config (`training.augment`); None when off (the default)."""
    if not settings:
        return None
    from colintern.data.augment import PageAugmentation

    return PageAugmentation.from_dict(settings, seed=seed)
