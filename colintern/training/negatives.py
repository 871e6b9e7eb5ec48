"""Hard-negative mining: for every query of a training split, the highest-scoring pages that are not its answer.

    mine_hard_negatives(MiningConfig(model_path="embedded:tiny-internvl3_5", dataset="OUT/train", top_k=4))

Every query is scored against every distinct page of the split with MaxSim (a base model, a trained checkpoint or a
PEFT adapter). Its negatives are the top-scoring pages that are
  * not a positive: a page paired with the query (or with the same query text, compared whitespace- and
    case-insensitively), or a page with byte-identical image data (the same page stored twice);
  * not a near-duplicate of a positive: the page-to-page similarity sim(a, b) = (MaxSim(a, b) / |a| +
    MaxSim(b, a) / |b|) / 2 (the mean, over the tokens of each page, of the cosine of its best-matching token in
    the other page, averaged over both directions; 1.0 for identical pages) is at least `duplicate_threshold`.
    A near-duplicate (a re-scan, a re-rendered or re-compressed copy, a slide repeated with a small change) most
    likely answers the query too: training on it as a negative teaches the model to separate equivalent pages.
    Measured with the demo model trained on 480 SynthDocs-style PDF pages (16 tokens per page): a JPEG copy
    scores >= 0.9996, a re-scan (0.7 degree rotation, noise, JPEG) >= 0.998; pages differing in one attribute
    0.89-0.9997, 8-13% of those differing only in logo shape or chart type (which that model confuses) above
    0.995, none differing in colour; at 0.99, 21-37% of them would be skipped. Hence the default 0.995. The
    criterion is the model's view: pages it cannot tell apart count as duplicates. With a random (untrained)
    model every page looks alike (0.84-0.998): mine with a trained one.
  * optionally (`max_positive_ratio`, the "positive-aware" filter of NV-Retriever, arXiv 2407.15831) not scoring
    above that fraction of the positive's score, which removes likely false negatives the model already ranks
    as high as the answer.

Page embeddings are held in memory in float16 while mining: about pages x tokens per page x 256 bytes (2 GB for
10,000 pages of 768 tokens); pages are decoded `page_chunk` at a time.

The negatives are stored compactly as row indices into the same split (the first row holding that page), in a
list-of-int column (default `negatives`) that `scripts/train.py --loss negative-ce|pairwise-negative-ce` uses. The
split is rewritten in place (atomically; the folder's other files are kept) unless an output folder is given, which
must be new or empty and outside the dataset (`overwrite`: replace only what mining wrote there before).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from colintern.data.pairs import DATA_SUFFIXES, decode_image, load_pairs
from colintern.data.documents import MAX_SHARD_BYTES, normalize_query
from colintern.utils import ColinternError, atomic_directory, atomic_write_json, prepare_output_dir

logger = logging.getLogger(__name__)


@dataclass
class MiningConfig:
    """Settings of `mine_hard_negatives`."""

    model_path: str  # base model, trained checkpoint or PEFT adapter folder
    dataset: str  # a training set `load_pairs` reads (e.g. OUT/train from prepare_dataset)
    top_k: int = 8  # negatives per query
    split: str = "train"
    output_dir: str | None = None  # default: rewrite the split's parquet files in place
    overwrite: bool = False  # write into a non-empty output_dir, replacing only what mining wrote there before
    column: str = "negatives"
    query_column: str = "query"
    image_column: str = "image"
    duplicate_threshold: float = 0.995  # page-to-page similarity at or above which a page is a near-duplicate
    max_positive_ratio: float | None = None  # e.g. 0.95: skip pages scoring above 95% of the positive's score
    batch_size: int = 8  # pages or queries per forward pass
    page_chunk: int = 256  # pages decoded at a time (bounds memory)
    query_block: int = 512  # queries scored against all pages at a time (bounds the score matrix)
    max_num_visual_tokens: int | None = None  # tiling limit (default: the processor's)
    device: str | None = None
    report_path: str | None = None  # default: <written folder>.negatives.json next to it

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ColinternError("--top-k must be at least 1")
        if not 0.0 < self.duplicate_threshold <= 1.0:
            raise ColinternError("--duplicate-threshold must be in (0, 1]")
        if self.max_positive_ratio is not None and not 0.0 < self.max_positive_ratio <= 1.0:
            raise ColinternError("--max-positive-ratio must be in (0, 1]")


@dataclass
class MiningStats:
    """What mining found; written next to the data as JSON."""

    model: str
    rows: int
    pages: int
    queries: int
    top_k: int
    duplicate_threshold: float
    max_positive_ratio: float | None
    negatives_per_query_mean: float = 0.0
    queries_short_of_top_k: int = 0  # fewer than top_k pages qualified
    rows_sharing_a_page: int = 0  # rows whose page is byte-identical to an earlier row's (counted as one page)
    skipped_near_duplicates: int = 0
    skipped_above_positive_ratio: int = 0
    positive_rank_mean: float = 0.0  # 1 + pages scoring above the best positive: how well the model already does
    examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- pages
def page_key(value: Any) -> str:
    """Identity of a stored page image: a hash of its encoded bytes (or of its path when only a path is stored)."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return hashlib.sha1(data).hexdigest()
        if value.get("path"):
            return "path:" + str(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha1(value).hexdigest()
    raise ColinternError(f"Cannot identify a page stored as {type(value).__name__}; expected image bytes or a path.")


def distinct_pages(images) -> tuple[list[int], list[int]]:
    """(row of the first occurrence of each distinct page, page index of every row); pages are distinct by bytes."""
    first_row: dict[str, int] = {}
    first_of_row = [first_row.setdefault(page_key(value), row) for row, value in enumerate(images)]
    index = {row: i for i, row in enumerate(first_row.values())}
    return list(first_row.values()), [index[row] for row in first_of_row]


def page_similarity(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Symmetric page-to-page similarity (len(a), len(b)) in [-1, 1]: mean best-match cosine, both directions.

    a, b: lists of (tokens, dim) L2-normalised page embeddings.
    """
    from colintern.model.scoring import max_sim

    a_len = torch.tensor([max(1, len(x)) for x in a], dtype=torch.float32)
    b_len = torch.tensor([max(1, len(x)) for x in b], dtype=torch.float32)
    a_to_b = max_sim(a, b, device="cpu") / a_len[:, None]  # each token of a finds its best match in b
    b_to_a = max_sim(b, a, device="cpu") / b_len[:, None]
    return (a_to_b + b_to_a.T) / 2


def encode_distinct_pages(model, processor, images: list[Any], rows: list[int], config: MiningConfig):
    """Embeddings of the pages at `rows`, decoded `page_chunk` at a time: list of (tokens, dim) float16 tensors."""
    from colintern.model.encoding import encode_pages

    embeddings: list[torch.Tensor] = []
    with tqdm(total=len(rows), desc="Encoding pages", unit="page") as progress:
        for start in range(0, len(rows), config.page_chunk):
            chunk = [decode_image(images[row], f"row {row}") for row in rows[start : start + config.page_chunk]]
            embeddings += encode_pages(model, processor, chunk, config.batch_size)
            progress.update(len(chunk))
    return embeddings


# ---------------------------------------------------------------------------------------------------- mining
def select_negatives(
    scores: torch.Tensor,
    positives: set[int],
    top_k: int,
    similarity_to_positives,
    duplicate_threshold: float,
    max_positive_ratio: float | None,
    stats: MiningStats,
    block: int = 64,
) -> list[int]:
    """Page indices of one query's hard negatives, best first.

    scores: (n_pages,) the query's MaxSim score of every page. `similarity_to_positives(candidates)` returns a
    (len(candidates),) tensor: the largest page similarity of each candidate to any positive.
    """
    positive_score = max(float(scores[p]) for p in positives)
    # descending score; a stable sort breaks ties by page index (first occurrence in the data): deterministic
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    chosen: list[int] = []
    start = 0
    while len(chosen) < top_k and start < len(order):
        candidates = [i for i in order[start : start + block] if i not in positives]
        start += block
        if max_positive_ratio is not None:
            kept = [i for i in candidates if float(scores[i]) <= max_positive_ratio * positive_score]
            stats.skipped_above_positive_ratio += len(candidates) - len(kept)
            candidates = kept
        if not candidates:
            continue
        similar = similarity_to_positives(candidates)
        for candidate, sim in zip(candidates, similar.tolist()):
            if sim >= duplicate_threshold:
                stats.skipped_near_duplicates += 1
                continue
            chosen.append(candidate)
            if len(chosen) == top_k:
                break
    return chosen


def mine(model, processor, dataset, config: MiningConfig) -> tuple[list[list[int]], MiningStats]:
    """Per row of `dataset`, the row indices of its hard negatives (one list per row; rows sharing a query text
    share the list), and statistics."""
    from colintern.model.encoding import encode_queries
    from colintern.model.scoring import max_sim

    images = dataset[config.image_column]
    texts = dataset[config.query_column]
    page_rows, page_of_row = distinct_pages(images)
    # queries: one per distinct normalised text; its positives are the pages of all its rows
    query_of_key: dict[str, int] = {}
    query_texts: list[str] = []
    positives: list[set[int]] = []
    query_of_row = []
    for row, text in enumerate(texts):
        key = normalize_query(text or "")
        if key not in query_of_key:
            query_of_key[key] = len(query_texts)
            query_texts.append(text or "")
            positives.append(set())
        query_of_row.append(query_of_key[key])
        positives[query_of_key[key]].add(page_of_row[row])
    stats = MiningStats(
        model=config.model_path, rows=len(dataset), pages=len(page_rows), queries=len(query_texts),
        top_k=config.top_k, duplicate_threshold=config.duplicate_threshold,
        max_positive_ratio=config.max_positive_ratio, rows_sharing_a_page=len(dataset) - len(page_rows),
    )  # fmt: skip
    if len(page_rows) < 2:
        raise ColinternError(f"The {config.split} split has {len(page_rows)} distinct page(s): nothing to mine from.")
    logger.info("Mining %d negatives per query: %d queries, %d distinct pages (%d rows)", config.top_k,
                len(query_texts), len(page_rows), len(dataset))

    page_embeddings = encode_distinct_pages(model, processor, images, page_rows, config)
    query_embeddings = encode_queries(model, processor, query_texts, config.batch_size, progress=True)

    similarity_cache: dict[int, dict[int, float]] = {}

    def similarity_to(positive_pages: set[int]):
        def compute(candidates: list[int]) -> torch.Tensor:
            best = torch.full((len(candidates),), -1.0)
            for p in positive_pages:
                known = similarity_cache.setdefault(p, {})
                missing = [c for c in candidates if c not in known]
                if missing:
                    sims = page_similarity([page_embeddings[p]], [page_embeddings[c] for c in missing])[0]
                    known.update(zip(missing, sims.tolist()))
                best = torch.maximum(best, torch.tensor([known[c] for c in candidates]))
            return best

        return compute

    negatives_of_query: list[list[int]] = []
    ranks = []
    for start in tqdm(range(0, len(query_texts), config.query_block), desc="Scoring queries", unit="block"):
        scores = max_sim(query_embeddings[start : start + config.query_block], page_embeddings)  # (block, pages)
        for offset, row_scores in enumerate(scores):
            query = start + offset
            best_positive = max(float(row_scores[p]) for p in positives[query])
            ranks.append(int((row_scores > best_positive).sum()) + 1)
            chosen = select_negatives(
                row_scores, positives[query], config.top_k, similarity_to(positives[query]),
                config.duplicate_threshold, config.max_positive_ratio, stats,
            )  # fmt: skip
            negatives_of_query.append([page_rows[page] for page in chosen])
    counts = [len(n) for n in negatives_of_query]
    stats.negatives_per_query_mean = round(statistics.fmean(counts), 3)
    stats.queries_short_of_top_k = sum(c < config.top_k for c in counts)
    stats.positive_rank_mean = round(statistics.fmean(ranks), 3)
    for query in range(min(3, len(query_texts))):
        stats.examples.append({
            "query": query_texts[query],
            "negative_rows": negatives_of_query[query],
        })  # fmt: skip
    return [negatives_of_query[query_of_row[row]] for row in range(len(dataset))], stats


# ---------------------------------------------------------------------------------------------------- files
def split_folder(dataset: str, split: str) -> Path | None:
    """The local folder whose parquet files are the split (to rewrite in place), or None."""
    path = Path(dataset).expanduser()
    for folder in (path / split, path if split == "train" else None):
        if folder is not None and folder.is_dir():
            files = [p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES]
            stems = {p.stem for p in files}
            if files and all(p.suffix == ".parquet" for p in files) and not {"corpus", "queries", "qrels"} <= stems:
                _refuse_shared_folder(folder, split)
                return folder
    return None


def _refuse_shared_folder(folder: Path, split: str) -> None:
    """Rewriting a folder in place replaces all its data files: refuse one that also holds other splits' files (a Hub
    snapshot's `data/` with `train-*` and `test-*`), which the rewrite would delete."""
    from datasets.data_files import get_data_patterns

    splits = sorted(str(name) for name in get_data_patterns(str(folder)))
    if splits != [split] and len(splits) > 1:
        raise ColinternError(
            f"{folder} holds the files of several splits ({', '.join(splits)}); rewriting split '{split}' in place "
            f"would replace them all. Pass --output-dir to write the split with its negatives elsewhere."
        )


def write_parquet_shards(
    dataset, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES, size_hint: int = 0
) -> list[Path]:
    """A `datasets.Dataset` as data-XXXXX-of-YYYYY.parquet files in `folder` (which must exist), each of about
    `max_shard_bytes` at most (`size_hint`: the data's total size)."""
    n_shards = max(1, math.ceil(size_hint / max_shard_bytes)) if size_hint else 1
    n_shards = min(n_shards, max(1, len(dataset)))
    paths = []
    for index in range(n_shards):
        shard = dataset.shard(n_shards, index, contiguous=True) if n_shards > 1 else dataset
        path = folder / f"data-{index:05d}-of-{n_shards:05d}.parquet"
        shard.to_parquet(str(path))
        paths.append(path)
    return paths


def with_negatives_column(dataset, negatives: list[list[int]], column: str, image_column: str):
    """The split plus the negatives column (row indices, list of int64), images kept as images."""
    import datasets

    if column in dataset.column_names:
        logger.info("Replacing the existing '%s' column", column)
        dataset = dataset.remove_columns(column)
    dataset = dataset.add_column(column, negatives, feature=datasets.List(datasets.Value("int64")))
    if isinstance(dataset.features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image())
    return dataset


def write_with_negatives(dataset, negatives: list[list[int]], column: str, image_column: str, folder: Path) -> None:
    """The split plus the negatives column as parquet files in `folder`, rewritten in place: the folder is swapped
    atomically for one holding the new parquet files and everything else it held (hard links, else copies)."""
    dataset = with_negatives_column(dataset, negatives, column, image_column)
    size_hint = dataset.data.nbytes  # the arrow table: images dominate, about the size of the parquet files
    with atomic_directory(folder) as tmp:
        if folder.is_dir():  # keep whatever else the folder holds (a README, a data card, sub-folders)
            for other in folder.iterdir():
                if not (other.is_file() and other.suffix in DATA_SUFFIXES):
                    _carry_over(other, tmp / other.name)
        write_parquet_shards(dataset, tmp, size_hint=size_hint)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _carry_over(source: Path, target: Path) -> None:
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(source), str(target))


def mine_hard_negatives(config: MiningConfig) -> tuple[Path, MiningStats]:
    """Load the model and the split, mine, and write the split with its negatives column. Returns (folder, stats).

    With `output_dir`, the split is written there: a new or empty folder outside the dataset and the model (with
    `overwrite`, a non-empty one where only files mining wrote before are replaced; `colintern.utils.
    prepare_output_dir`). Without, the split's parquet files are rewritten in place.
    """
    from colintern.model.loading import load_retriever

    output = None
    if config.output_dir:
        output = prepare_output_dir(config.output_dir, command="mine_hard_negatives", overwrite=config.overwrite,
                                    inputs={"--dataset": config.dataset, "--model-path": config.model_path})
        target = Path(config.output_dir)
    else:
        target = split_folder(config.dataset, config.split)
    if target is None:
        raise ColinternError(
            f"'{config.dataset}' (split {config.split}) is not a local folder of parquet files that can be rewritten "
            f"in place: pass --output-dir to write the split with its negatives elsewhere."
        )
    try:
        dataset = load_pairs(config.dataset, config.split, config.query_column, config.image_column)
        for name in (config.query_column, config.image_column):
            if name not in dataset.column_names:
                raise ColinternError(f"The {config.split} split has no column '{name}' (columns: "
                                     f"{', '.join(dataset.column_names)}). Name it with --query-column / "
                                     f"--image-column.")
        model, processor = load_retriever(config.model_path, device=config.device,
                                          max_num_visual_tokens=config.max_num_visual_tokens)
        model.eval()
        negatives, stats = mine(model, processor, dataset, config)
        if output is None:
            write_with_negatives(dataset, negatives, config.column, config.image_column, target)
        else:
            dataset = with_negatives_column(dataset, negatives, config.column, config.image_column)
            with output.staged() as tmp:
                write_parquet_shards(dataset, tmp, size_hint=dataset.data.nbytes)
    except BaseException:
        if output is not None:
            output.discard_if_unused()
        raise
    report = Path(config.report_path) if config.report_path else target.with_name(f"{target.name}.negatives.json")
    atomic_write_json(report, stats.to_dict())
    logger.info("Wrote %s with a '%s' column (row indices); statistics in %s", target, config.column, report)
    return target, stats
