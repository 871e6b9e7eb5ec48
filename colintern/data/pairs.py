"""Training data: loading query-page pairs, validating them before the first step, and collating batches.

Accepted sources (`--dataset`):
  * a Hub dataset id (e.g. `vidore/colpali_train_set`), loaded with `datasets.load_dataset(id, split=...)`;
  * a local folder: `<folder>/<split>/` holding parquet/arrow files or a retrieval split (corpus / queries / qrels
    parquet files, turned into one pair per relevant page); a folder of data files directly (the `train` split);
    or a `save_to_disk` dataset;
  * `embedded:synthdocs`.

Pairs have a query column (text) and an image column (a page). An optional negatives column holds hard negatives per
query, either page images or integer row indices into the same dataset (compact; what mine_hard_negatives writes).
Images are kept undecoded until collation, so a corrupt page is reported with its row number.
"""

from __future__ import annotations

import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image
from tqdm.auto import tqdm

from colintern.data.pages import open_page
from colintern.data.synthdocs import resolve_dataset
from colintern.utils import ColinternError, atomic_write_json

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
            f"Cannot load dataset '{source}' (split '{split}'): {error}. If it is a Hub dataset, this machine cannot "
            f"reach it: download it where the Hub is reachable and pass the local folder, or use --preset demo."
        ) from error
    except ValueError as error:  # e.g. unknown split
        raise ColinternError(f"Cannot load split '{split}' of '{source}': {error}") from error
    if image_column in dataset.column_names and isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def _load_local(path: Path, split: str, query_column: str, image_column: str) -> datasets.Dataset:
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ColinternError(f"{path} has no split '{split}' (it has: {', '.join(loaded)})")
            return loaded[split]
        return loaded
    split_dir = path / split
    if split_dir.is_dir():
        if _is_retrieval_split(split_dir):
            return retrieval_split_to_pairs(split_dir, query_column, image_column)
        files = _data_files(split_dir)
        if files:
            return _load_files(files)
    if _is_retrieval_split(path):
        return retrieval_split_to_pairs(path, query_column, image_column)
    files = _data_files(path)
    if files and split == "train":
        return _load_files(files)
    splits = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    raise ColinternError(
        f"{path} has no split '{split}'" + (f" (found folders: {', '.join(splits)})" if splits else "")
        + ". Expected <folder>/<split>/ with parquet files or corpus/queries/qrels."
    )


# ---------------------------------------------------------------------------------------------------- validation
def decode_image(value: Any, page_id: Any = None) -> Image.Image:
    """A page from what a dataset stores (PIL image, {'bytes', 'path'}, bytes, path, array), fully decoded;
    `page_id` names it in errors."""
    image = open_page(value, page_id)
    image.load()
    if image.width == 0 or image.height == 0:
        raise ValueError("empty image (0 pixels)")
    return image


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


def validate_pairs(
    dataset: datasets.Dataset,
    query_column: str,
    image_column: str,
    split: str,
    negatives_column: str | None = None,
    tile_counter=None,
    num_threads: int | None = None,
    negative_rows: int | None = None,
) -> tuple[ValidationReport, list[int]]:
    """Check every row: non-empty query text, a decodable non-empty page (and negatives). Returns the report and, per
    row, the page's tile count (from `tile_counter(width, height)`, 1 when None) for length-grouped batching.
    `negative_rows`: rows of the split that hard-negative row indices point into (default: len(dataset)); larger
    when `dataset` is a subsample."""
    check_columns(dataset, query_column, image_column, split)
    report = ValidationReport(split=split, n_rows=len(dataset))
    for row, query in enumerate(dataset[query_column]):
        if not isinstance(query, str) or not query.strip():
            report.problems.append((row, "empty query" if isinstance(query, str) or query is None else "query is not text"))

    images = dataset[image_column]

    def inspect(row: int) -> tuple[int, int, str | None]:
        try:
            image = decode_image(images[row])
        except Exception as error:  # noqa: BLE001 - any decoding failure is a data problem to report
            return row, 1, f"unreadable image ({type(error).__name__}: {error})"
        return row, (tile_counter(image.size) if tile_counter else 1), None

    tiles = [1] * len(dataset)
    threads = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for row, n_tiles, problem in tqdm(
            pool.map(inspect, range(len(dataset))), total=len(dataset), desc=f"Checking {split} pages", leave=False
        ):
            tiles[row] = n_tiles
            if problem:
                report.problems.append((row, problem))
    if negatives_column and negatives_column in dataset.column_names:
        for row, negatives in enumerate(dataset[negatives_column]):
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
) -> datasets.Dataset:
    """Validate a split and return it with the row-index and tile-count columns the collator and sampler use."""
    check_columns(dataset, query_column, image_column, split)
    tiles = [1] * len(dataset)
    if validate:
        report, tiles = validate_pairs(
            dataset, query_column, image_column, split, negatives_column, tile_counter=tile_counter,
            negative_rows=negative_rows,
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

    Queries get the processor's prefix and augmentation tokens; pages are tiled. Hard negatives given as row indices
    are looked up in `page_source` (the split's undecoded image column).
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
    ):
        self.processor = processor
        self.query_column = query_column
        self.image_column = image_column
        self.negatives_column = negatives_column
        self.num_negatives = num_negatives
        self.page_source = page_source
        self.augment = augment
        self.rng = random.Random(seed)

    def _page(self, value: Any, row: int, what: str = "page") -> Image.Image:
        try:
            image = decode_image(value)
        except Exception as error:  # noqa: BLE001
            raise ColinternError(f"Row {row}: unreadable {what} ({error}). Run with validation on to find all.") from error
        return self.augment(image) if self.augment is not None else image

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [ex.get(ROW_COLUMN, i) for i, ex in enumerate(examples)]
        queries = [ex[self.query_column] or "" for ex in examples]
        pages = [self._page(ex[self.image_column], row) for ex, row in zip(examples, rows)]
        batch = {f"query_{k}": v for k, v in self.processor.process_queries(queries).items()}
        batch.update({f"doc_{k}": v for k, v in self.processor.process_images(pages).items()})
        if self.negatives_column and self.negatives_column in examples[0]:
            negatives = []
            for ex, row in zip(examples, rows):
                chosen = list(ex[self.negatives_column] or [])[: self.num_negatives]
                if len(chosen) < self.num_negatives:
                    raise ColinternError(f"Row {row}: fewer than {self.num_negatives} hard negatives")
                for value in chosen:
                    if isinstance(value, int):
                        value = self.page_source[value]
                    negatives.append(self._page(value, row, "hard negative"))
            batch.update({f"neg_doc_{k}": v for k, v in self.processor.process_images(negatives).items()})
            batch["neg_doc_count"] = torch.tensor(self.num_negatives)
        return batch


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
