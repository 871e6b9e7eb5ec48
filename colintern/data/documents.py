"""Your own documents: a folder of PDFs (or page images) and a queries file -> training pairs and an evaluation task.

    prepare_dataset(PrepareConfig(documents="pdfs/", queries="queries.jsonl", output_dir="OUT"))

Inputs
  * documents folder: every `*.pdf` under it (any depth) is a document; a sub-folder holding image files is a
    document whose pages are its images in natural order (`2.png` before `10.png`); an image file directly in the
    folder is a one-page document. A document's id is its path relative to the folder (`reports/2023.pdf`).
  * queries file, JSONL or CSV, one query per line: `query`, `file` (the document id, or its file name when that is
    unique), `page` (1-based; may be left empty for one-page documents), optional `answer`.

Output (OUT/: a new or empty folder, outside the inputs; `overwrite=True` (--overwrite) writes into a non-empty one,
replacing only what prepare_dataset wrote there before, as recorded in OUT/.colintern-output)
  * train/data-*.parquet   training pairs in the `vidore/colpali_train_set` columns (query, image, image_filename,
                           answer, source) plus `document` and `page`; `scripts/train.py --dataset OUT/train`.
  * eval/{corpus,queries,qrels}.parquet   a retrieval task in mteb's layout (corpus: id, image; queries: id, text;
                           qrels: query-id, corpus-id, score): every page of the held-out documents, one query per
                           line of the queries file; eval/task.json names the task (`<Source>Retrieval`).
                           `scripts/evaluate.py --benchmarks OUT/eval`.
  * report.json            every problem found in the inputs (also logged, one line each).
  * manifest.json          settings, counts, which documents went where, and which page each corpus id is.
  * .page-cache/           rendered pages by content hash: a re-run renders nothing it has rendered before.

The split is by document (no page of a document is in both splits; identical files are kept together), decided from
a hash of each document's id and the seed, so it does not depend on file order. Ids in the evaluation task are
content hashes, which carry no information about relevance (an untrained model's score ties cannot favour them).
Outputs are byte-identical for identical inputs and settings.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from tqdm.auto import tqdm

from colintern.cli import read_text
from colintern.utils import ColinternError, atomic_directory, atomic_write_json, prepare_output_dir

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
QUERY_COLUMNS = ("query", "file")  # required; `page` may be left out for one-page documents, `answer` is optional
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
MAX_SHARD_BYTES = 500 * 1024 * 1024  # parquet files of at most ~500 MB, like the Hub's own shards
FORMAT_VERSION = 1  # bump when the layout on disk or the rendering changes


@dataclass
class PrepareConfig:
    """Settings of `prepare_dataset`."""

    documents: Path  # folder of PDFs and/or page-image folders
    queries: Path  # JSONL or CSV: query, file, page (1-based), optional answer
    output_dir: Path
    dpi: int = 150  # ~1240x1750 px for A4: InternVL's 6 tiles of 448 px (896x1344) see it near full resolution
    max_side: int = 4096  # longest side of a page image at most (bounds posters and giant pages)
    image_format: str = "png"  # png (lossless) or jpeg
    jpeg_quality: int = 90
    eval_fraction: float = 0.2  # share of documents held out for the evaluation task (0: none, 1: all)
    seed: int = 0
    strict: bool = False  # any problem in the inputs is fatal
    distractors: bool = False  # add the pages of documents without queries to the evaluation corpus
    source: str | None = None  # the `source` column of the training pairs (default: the documents folder's name)
    cache_dir: Path | None = None  # rendered-page cache (default OUT/.page-cache)
    overwrite: bool = False  # write into a non-empty output folder, replacing only what prepare_dataset wrote there

    def __post_init__(self) -> None:
        self.documents, self.queries, self.output_dir = Path(self.documents), Path(self.queries), Path(self.output_dir)
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else self.output_dir / ".page-cache"
        self.image_format = self.image_format.lower().replace("jpg", "jpeg")
        if self.image_format not in IMAGE_FORMATS:
            raise ColinternError(f"--image-format {self.image_format!r}: choose png or jpeg")
        if not 1 <= self.jpeg_quality <= 100:
            raise ColinternError(f"--jpeg-quality {self.jpeg_quality}: must be between 1 and 100")
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise ColinternError(f"--eval-fraction {self.eval_fraction}: must be between 0 and 1")
        if self.dpi < 10 or self.max_side < 64:
            raise ColinternError("--dpi must be at least 10 and --max-side at least 64")

    def render_settings(self) -> dict[str, Any]:
        """Everything a rendered page's bytes depend on, besides the input file (keys the page cache)."""
        import pypdfium2
        import PIL

        return {
            "dpi": self.dpi,
            "max_side": self.max_side,
            "format": self.image_format,
            "jpeg_quality": self.jpeg_quality if self.image_format == "jpeg" else None,
            "pdfium": str(pypdfium2.version.PDFIUM_INFO),
            "pillow": PIL.__version__,
            "format_version": FORMAT_VERSION,
        }


# ---------------------------------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """One thing wrong with the inputs; the rest is processed unless --strict."""

    kind: str  # encrypted_pdf, corrupt_pdf, empty_pdf, unreadable_image, unrenderable_page, invalid_line,
    # missing_column_value, bad_page_number, missing_file, ambiguous_file, unusable_document, unusable_page,
    # page_out_of_range, empty_query, duplicate_query
    message: str
    file: str | None = None
    line: int | None = None
    page: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}" if self.file else ""
        if self.line is not None:
            where = f"queries line {self.line}" + (f" ({where})" if where else "")
        return f"{where}: {self.message}" if where else self.message

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class ProblemLog:
    """Collects problems, logging each as one line when it is found."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, kind: str, message: str, **where: Any) -> None:
        problem = Problem(kind, message, **where)
        self.problems.append(problem)
        logger.warning("%s", problem)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for problem in self.problems:
            counts[problem.kind] += 1
        return dict(sorted(counts.items()))

    def __len__(self) -> int:
        return len(self.problems)


# ---------------------------------------------------------------------------------------------------- documents
@dataclass
class Document:
    """A readable document: a PDF or a folder of page images."""

    id: str  # path relative to the documents folder
    kind: str  # "pdf" or "images"
    path: Path
    n_pages: int
    sha256: str  # of the PDF file, or of the page images' hashes in page order
    page_files: list[Path] = field(default_factory=list)  # image documents: one file per page
    page_hashes: list[str] = field(default_factory=list)  # image documents: sha256 of each page file
    bad_pages: set[int] = field(default_factory=set)  # 1-based pages that cannot be read (numbering is kept)


def natural_key(text: str) -> list:
    """Sort key putting `page2` before `page10`."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def find_documents(folder: Path) -> list[tuple[str, str, Path, list[Path]]]:
    """(id, kind, path, page files) of every document under `folder`, sorted by id."""
    if not folder.is_dir():
        raise ColinternError(f"Documents folder not found: {folder}. Pass --pdfs with a folder of PDFs or page images.")
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and path.suffix.lower() == ".pdf":
            found.append((rel.as_posix(), "pdf", path, []))
        elif path.is_file() and _is_image(path) and path.parent == folder:
            found.append((rel.as_posix(), "images", path, [path]))
        elif path.is_dir():
            images = sorted((p for p in path.iterdir() if p.is_file() and _is_image(p)),
                            key=lambda p: natural_key(p.name))
            if images:
                found.append((rel.as_posix(), "images", path, images))
    return sorted(found, key=lambda item: item[0])


def _pdf_load_problem(data: bytes, error: Exception) -> tuple[str, str]:
    """(kind, message) for a PDF pdfium cannot open."""
    reason = re.search(r"PDFium: (.*?)\)", str(error))
    reason = reason.group(1) if reason else str(error)
    # pdfium's error code is process-wide and not reset by a load that fails without one (a PDF without pages): after
    # an encrypted file it still says "password". So a password error counts only for a file with an /Encrypt entry.
    encrypted = re.search(rb"/Encrypt\b", data) is not None
    if encrypted and (getattr(error, "err_code", None) == 4 or "password" in reason.lower()):  # FPDF_ERR_PASSWORD
        return "encrypted_pdf", "encrypted (needs a password): decrypt it (`qpdf --decrypt in.pdf out.pdf`) or drop it"
    # pdfium refuses PDFs without pages as malformed; tell that case apart for a clearer message
    if re.search(rb"/Count\s+0\b", data) and not re.search(rb"/Count\s+[1-9]", data):
        return "empty_pdf", "the PDF has no pages"
    if not encrypted:
        reason = re.sub(r"^Incorrect password error$", "not a valid PDF", reason)  # the stale code's text
    return "corrupt_pdf", f"not a readable PDF (pdfium: {reason}): re-export or repair it, or remove it"


def open_documents(folder: Path, problems: ProblemLog) -> tuple[list[Document], set[str]]:
    """(readable documents, ids of unreadable ones) under `folder`; every unreadable file is reported."""
    import pypdfium2 as pdfium

    documents, unusable = [], set()
    for doc_id, kind, path, page_files in find_documents(folder):
        if kind == "pdf":
            data = path.read_bytes()
            n_pages = 0
            if not data:
                problems.add("empty_pdf", "empty file (0 bytes)", file=doc_id)
            else:
                try:
                    pdf = pdfium.PdfDocument(data)
                except pdfium.PdfiumError as error:
                    problems.add(*_pdf_load_problem(data, error), file=doc_id)
                else:
                    n_pages = len(pdf)
                    pdf.close()
                    if n_pages == 0:
                        problems.add("empty_pdf", "the PDF has no pages", file=doc_id)
            if n_pages:
                documents.append(Document(doc_id, "pdf", path, n_pages, hashlib.sha256(data).hexdigest()))
            else:
                unusable.add(doc_id)
            continue
        hashes, bad = [], set()
        for page, image_path in enumerate(page_files, start=1):
            try:
                with Image.open(image_path) as image:
                    image.verify()
            except Exception as error:  # noqa: BLE001 - any decoding failure is an input problem
                problems.add("unreadable_image", f"page {page} ({image_path.name}) is not a readable image ({error})",
                             file=doc_id, page=page)
                bad.add(page)
            hashes.append(_sha256_file(image_path))
        if len(bad) == len(page_files):
            unusable.add(doc_id)
            continue
        digest = hashlib.sha256("".join(hashes).encode()).hexdigest()
        documents.append(Document(doc_id, "images", path, len(page_files), digest, page_files, hashes, bad))
    if not documents:
        raise ColinternError(f"No readable documents in {folder} (PDFs, or folders of page images).")
    return documents, unusable


# ---------------------------------------------------------------------------------------------------- queries
@dataclass
class Query:
    """A valid line of the queries file, matched to a document page."""

    line: int
    text: str
    document: str
    page: int  # 1-based
    answer: str | None = None


def normalize_query(text: str) -> str:
    """The form under which two queries count as the same: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def _read_query_lines(path: Path, problems: ProblemLog) -> list[tuple[int, dict]]:
    """(line number, record) of every non-empty line of a JSONL or CSV queries file."""
    if not path.is_file():
        raise ColinternError(f"Queries file not found: {path}")
    suffix = path.suffix.lower()
    records = []
    text = read_text(path, "Queries file")
    if suffix in (".jsonl", ".ndjson", ".json"):
        with io.StringIO(text, newline=None) as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as error:
                    problems.add("invalid_line", f"not valid JSON ({error.msg})", line=number)
                    continue
                if not isinstance(record, dict):
                    problems.add("invalid_line", "not a JSON object", line=number)
                    continue
                records.append((number, record))
        missing = [c for c in QUERY_COLUMNS if records and all(c not in r for _, r in records)]
    elif suffix in (".csv", ".tsv"):
        with io.StringIO(text, newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            missing = [c for c in QUERY_COLUMNS if c not in (reader.fieldnames or [])]
            if not missing:
                for record in reader:
                    if any((v or "").strip() for v in record.values() if isinstance(v, str)):
                        records.append((reader.line_num, record))  # the record's last physical line
    else:
        raise ColinternError(f"Queries file {path}: unknown format {suffix!r}. Use .jsonl or .csv.")
    if missing:
        raise ColinternError(
            f"Queries file {path} has no {' or '.join(repr(c) for c in missing)} column. Each line needs `query`, "
            f"`file` and `page` (1-based; may be left out for one-page documents), and optionally `answer`."
        )
    return records


def _parse_page(raw: Any) -> int | None:
    """A page number from JSON (3, 3.0) or CSV ("3", " 3 ", "3.0"); None when it is not a whole number."""
    if isinstance(raw, bool):
        return None
    try:
        value = float(str(raw).strip())
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _resolve_file(name: str, documents: dict[str, Document], by_name: dict[str, list[str]]) -> tuple[str | None, str]:
    """(document id, problem kind) for the `file` value of a query."""
    name = name.strip().replace("\\", "/")
    name = name[2:] if name.startswith("./") else name
    if name in documents:
        return name, ""
    matches = by_name.get(Path(name).name, [])
    if len(matches) == 1:
        return matches[0], ""
    return None, "ambiguous_file" if matches else "missing_file"


def match_queries(
    records: list[tuple[int, dict]], documents: list[Document], unusable: set[str], problems: ProblemLog
) -> list[Query]:
    """Queries whose document page exists; every other line is reported."""
    by_id = {doc.id: doc for doc in documents}
    by_name: dict[str, list[str]] = defaultdict(list)
    for doc_id in [*by_id, *unusable]:
        by_name[Path(doc_id).name].append(doc_id)
    seen: dict[str, tuple[int, str, int]] = {}
    queries = []
    for line, record in records:
        text = str(record.get("query") or "").strip()
        name = str(record.get("file") or "").strip()
        if not text:
            problems.add("empty_query", "empty query", line=line, file=name or None)
            continue
        if not name:
            problems.add("missing_column_value", "no `file` given", line=line)
            continue
        doc_id, failure = _resolve_file(name, by_id, by_name)
        if doc_id is None:
            if failure == "ambiguous_file":
                problems.add("ambiguous_file", f"{name!r} matches {len(by_name[Path(name).name])} documents: give "
                             "the path relative to the documents folder", line=line, file=name)
            else:
                problems.add("missing_file", f"no document {name!r} in the documents folder", line=line, file=name)
            continue
        if doc_id in unusable:
            problems.add("unusable_document", "its document could not be read (see above)", line=line, file=doc_id)
            continue
        document = by_id[doc_id]
        raw_page = record.get("page")
        if raw_page is None or str(raw_page).strip() == "":
            if document.n_pages != 1:
                problems.add("bad_page_number", f"no page given and the document has {document.n_pages} pages",
                             line=line, file=doc_id)
                continue
            page = 1
        else:
            page = _parse_page(raw_page)
            if page is None:
                problems.add("bad_page_number", f"page {raw_page!r} is not a whole number (pages count from 1)",
                             line=line, file=doc_id)
                continue
        if not 1 <= page <= document.n_pages:
            problems.add("page_out_of_range", f"page {page} is out of range: the document has {document.n_pages} "
                         f"page(s), numbered from 1", line=line, file=doc_id, page=page)
            continue
        if page in document.bad_pages:
            problems.add("unusable_page", f"page {page} could not be read (see above)", line=line, file=doc_id,
                         page=page)
            continue
        key = normalize_query(text)
        if key in seen:
            first_line, first_doc, first_page = seen[key]
            same = (first_doc, first_page) == (doc_id, page)
            problems.add(
                "duplicate_query",
                f"repeats line {first_line}" if same else
                f"same query as line {first_line} ({first_doc} page {first_page}): a query names one page; keep one "
                "line or reword it",
                line=line, file=doc_id, page=page,
            )
            continue
        seen[key] = (line, doc_id, page)
        answer = record.get("answer")
        queries.append(Query(line, text, doc_id, page, None if answer in (None, "") else str(answer)))
    return queries


# ---------------------------------------------------------------------------------------------------- split
def split_documents(
    documents: list[Document], queried: set[str], eval_fraction: float, seed: int
) -> tuple[set[str], set[str]]:
    """(train ids, eval ids) among the documents with queries. Identical files (same content hash) stay together.

    Groups are ranked by a hash of (seed, first id) and the first round(n * fraction) go to eval (at least one and
    at most n - 1 when 0 < fraction < 1), so the split does not depend on the order files are listed in.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for doc in documents:
        if doc.id in queried:
            groups[doc.sha256].append(doc.id)
    ranked = sorted(groups.values(), key=lambda ids: hashlib.sha256(f"{seed}:{min(ids)}".encode()).hexdigest())
    n = len(ranked)
    n_eval = round(n * eval_fraction)
    if 0 < eval_fraction < 1 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    elif 0 < eval_fraction < 1:
        logger.warning("Only one document has queries: it all goes to training; there is no evaluation task.")
        n_eval = 0
    eval_ids = {doc_id for ids in ranked[:n_eval] for doc_id in ids}
    train_ids = {doc_id for ids in ranked[n_eval:] for doc_id in ids}
    return train_ids, eval_ids


# ---------------------------------------------------------------------------------------------------- rendering
def is_greyscale(image: Image.Image) -> bool:
    """True when every pixel of an RGB image has R == G == B."""
    import numpy as np

    pixels = np.asarray(image)
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


class PageRenderer:
    """Renders document pages to encoded image bytes, through a cache keyed by content hash and settings."""

    def __init__(self, config: PrepareConfig):
        self.config = config
        settings = json.dumps(config.render_settings(), sort_keys=True)
        self.settings_key = hashlib.sha256(settings.encode()).hexdigest()[:12]
        self.cache_dir = config.cache_dir
        self.suffix = "png" if config.image_format == "png" else "jpg"
        self.hits = 0
        self.misses = 0

    def _cache_path(self, content_hash: str, page: int) -> Path:
        return self.cache_dir / content_hash[:2] / f"{content_hash}-{page:05d}-{self.settings_key}.{self.suffix}"

    def _encode(self, image: Image.Image) -> bytes:
        image = image.convert("RGB")
        if max(image.size) > self.config.max_side:
            scale = self.config.max_side / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.LANCZOS)
        if is_greyscale(image):
            # lossless for a page without colour (black text renders as pure greys): a third of the pixel data,
            # PNG about half the size and twice as fast to encode (measured on 150-dpi text pages)
            image = image.convert("L")
        buffer = io.BytesIO()
        if self.config.image_format == "jpeg":
            image.save(buffer, format="JPEG", quality=self.config.jpeg_quality)
        else:
            image.save(buffer, format="PNG")
        return buffer.getvalue()

    def _store(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    def render(self, document: Document, pages: list[int], problems: ProblemLog, progress=None) -> dict[int, Path]:
        """{page: cached image file} for the 1-based `pages` of `document` (pages that fail are reported, left out).

        Pages are not kept in memory: the dataset writers read them back from the cache one batch at a time."""
        out: dict[int, Path] = {}
        todo = []
        for page in pages:
            key = document.page_hashes[page - 1] if document.kind == "images" else document.sha256
            path = self._cache_path(key, page if document.kind == "pdf" else 0)
            if path.is_file():
                out[page] = path
                self.hits += 1
                if progress is not None:
                    progress.update(1)
            else:
                todo.append((page, path))
        if not todo:
            return out
        pdf = None
        if document.kind == "pdf":
            import pypdfium2 as pdfium

            pdf = pdfium.PdfDocument(document.path)
            pdf.init_forms()  # draw form fields (filled-in values) like a viewer does
        try:
            for page, path in todo:
                try:
                    image = self._render_pdf_page(pdf, page) if pdf is not None else self._load_image(document, page)
                    data = self._encode(image)
                except Exception as error:  # noqa: BLE001 - a page that cannot be rendered is reported, not fatal
                    problems.add("unrenderable_page", f"page {page} could not be rendered ({error})",
                                 file=document.id, page=page)
                else:
                    self._store(path, data)
                    out[page] = path
                    self.misses += 1
                if progress is not None:
                    progress.update(1)
        finally:
            if pdf is not None:
                pdf.close()
        return out

    def _render_pdf_page(self, pdf, page: int) -> Image.Image:
        pdf_page = pdf[page - 1]
        try:
            width, height = pdf_page.get_size()  # in points (1/72 inch)
            scale = min(self.config.dpi / 72, self.config.max_side / max(width, height, 1.0))
            bitmap = pdf_page.render(scale=scale, may_draw_forms=True)
            return bitmap.to_pil()
        finally:
            pdf_page.close()

    @staticmethod
    def _load_image(document: Document, page: int) -> Image.Image:
        with Image.open(document.page_files[page - 1]) as image:
            return ImageOps.exif_transpose(image).convert("RGB")  # phone scans carry their rotation in EXIF


# ---------------------------------------------------------------------------------------------------- writing
def _content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


ROWS_PER_ROW_GROUP = 100  # what `datasets` uses for image columns


def _image_size(value: Path | bytes) -> int:
    return value.stat().st_size if isinstance(value, Path) else len(value)


def write_image_rows(
    rows: list[dict], features, folder: Path, image_column: str = "image", name: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[Path]:
    """Rows whose image is a file (or bytes) as parquet in `folder`, streamed: at most ROWS_PER_ROW_GROUP images are
    in memory at once. With `name`, one file `<name>.parquet`; else data-XXXXX-of-YYYYY.parquet shards of about
    `max_shard_bytes` at most (contiguous, in row order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards: list[list[dict]] = [[]]
    size = 0
    for row in rows:
        row_size = _image_size(row[image_column])
        if name is None and shards[-1] and size + row_size > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(row)
        size += row_size
    schema = features.arrow_schema
    paths = []
    for index, shard in enumerate(shards):
        path = folder / (f"{name}.parquet" if name else f"data-{index:05d}-of-{len(shards):05d}.parquet")
        with pq.ParquetWriter(str(path), schema=schema) as writer:
            for start in range(0, max(1, len(shard)), ROWS_PER_ROW_GROUP):
                batch = shard[start : start + ROWS_PER_ROW_GROUP]
                columns = {column: [row[column] for row in batch] for column in features}
                columns[image_column] = [
                    {"bytes": v.read_bytes() if isinstance(v, Path) else v, "path": None} for v in columns[image_column]
                ]
                writer.write_table(pa.Table.from_pydict(features.encode_batch(columns), schema=schema))
        paths.append(path)
    return paths


TRAIN_FEATURES = {
    "query": "string", "image": "image", "image_filename": "string", "answer": "string", "source": "string",
    "document": "string", "page": "int32",
}  # fmt: skip


def _features(spec: dict[str, str]):
    import datasets

    return datasets.Features(
        {name: datasets.Image() if kind == "image" else datasets.Value(kind) for name, kind in spec.items()}
    )


def _write_train(folder: Path, rows: list[dict]) -> None:
    with atomic_directory(folder) as tmp:
        write_image_rows(rows, _features(TRAIN_FEATURES), tmp)


def task_name(source: str) -> str:
    """An mteb task name from the collection's name: `annual reports` -> `AnnualReportsRetrieval`."""
    words = re.findall(r"[A-Za-z0-9]+", source)
    return "".join(w[:1].upper() + w[1:] for w in words) + "Retrieval" if words else "OwnDocumentsRetrieval"


def _write_eval(folder: Path, corpus: list[dict], queries: list[dict], qrels: list[dict], info: dict) -> None:
    import datasets

    with atomic_directory(folder) as tmp:
        write_image_rows(corpus, _features({"id": "string", "image": "image"}), tmp, name="corpus")
        for name, rows, spec in (
            ("queries", queries, {"id": "string", "text": "string"}),
            ("qrels", qrels, {"query-id": "string", "corpus-id": "string", "score": "int32"}),
        ):
            columns = {column: [row[column] for row in rows] for column in spec}
            datasets.Dataset.from_dict(columns, features=_features(spec)).to_parquet(str(tmp / f"{name}.parquet"))
        (tmp / "task.json").write_text(json.dumps(info, indent=2) + "\n")  # the task's name for scripts/evaluate.py


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def format_size(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TB"  # pragma: no cover


# ---------------------------------------------------------------------------------------------------- pipeline
@dataclass
class PreparedDataset:
    """What `prepare_dataset` wrote."""

    output_dir: Path
    counts: dict[str, Any]
    sizes: dict[str, int]  # bytes on disk of train/ and eval/
    problems: list[Problem]
    train_documents: list[str]
    eval_documents: list[str]

    @property
    def train_dir(self) -> Path | None:
        return self.output_dir / "train" if self.counts["train_pairs"] else None

    @property
    def eval_dir(self) -> Path | None:
        return self.output_dir / "eval" if self.counts["eval_queries"] else None

    def summary(self) -> str:
        c = self.counts
        lines = [f"Wrote {self.output_dir}"]
        if self.train_dir:
            lines.append(f"  train/  {c['train_pairs']} query-page pairs from {len(self.train_documents)} documents "
                         f"({format_size(self.sizes['train'])})")
        if self.eval_dir:
            lines.append(f"  eval/   {c['eval_queries']} queries over {c['eval_pages']} pages of "
                         f"{len(self.eval_documents)} documents ({format_size(self.sizes['eval'])})")
        lines.append(f"  pages: {c['pages_rendered']} ({c['pages_from_cache']} reused from the page cache)")
        lines.append(f"  problems: {len(self.problems)}" + (f" (see {self.output_dir / 'report.json'})"
                                                             if self.problems else ""))
        return "\n".join(lines)


def _write_report(config: PrepareConfig, problems: ProblemLog, counts: dict | None) -> None:
    atomic_write_json(
        config.output_dir / "report.json",
        {"problems": [p.to_dict() for p in problems.problems], "problem_counts": problems.counts(), "counts": counts},
    )


def _fail_if_strict(config: PrepareConfig, problems: ProblemLog) -> None:
    if config.strict and len(problems):
        _write_report(config, problems, None)
        raise ColinternError(
            f"--strict: {len(problems)} problem(s) in the inputs (first: {problems.problems[0]}); all are in "
            f"{config.output_dir / 'report.json'}. Fix them, or run without --strict to skip them."
        )


def prepare_dataset(config: PrepareConfig) -> PreparedDataset:
    """Render the documents, pair them with the queries, split by document and write OUT/train, OUT/eval and reports."""
    problems = ProblemLog()
    owned = ["train", "eval", "report.json", "manifest.json"]
    if config.cache_dir == config.output_dir / ".page-cache":
        owned.append(".page-cache")
    prepare_output_dir(config.output_dir, command="prepare_dataset", inputs={"--pdfs": config.documents,
                       "--queries": config.queries}, overwrite=config.overwrite, owned_names=owned)  # fmt: skip

    # 1. inputs: every problem is found before any rendering, so --strict fails fast
    records = _read_query_lines(config.queries, problems)  # a malformed queries file stops before any PDF is read
    documents, unusable = open_documents(config.documents, problems)
    queries = match_queries(records, documents, unusable, problems)
    _fail_if_strict(config, problems)
    if not queries:
        _write_report(config, problems, None)
        raise ColinternError(f"No usable queries in {config.queries} (problems: {config.output_dir / 'report.json'}).")

    # 2. split by document
    by_id = {doc.id: doc for doc in documents}
    queried = {q.document for q in queries}
    train_ids, eval_ids = split_documents(documents, queried, config.eval_fraction, config.seed)
    distractor_ids = {d.id for d in documents if d.id not in queried} if config.distractors and eval_ids else set()
    unqueried = len(documents) - len(queried)
    if unqueried and not distractor_ids:
        logger.info("%d document(s) have no queries and are not used (--distractors adds them to the eval corpus).",
                    unqueried)

    # 3. render what is needed: the queried pages of training documents, every page of evaluation documents
    plan: dict[str, list[int]] = {}
    for q in queries:
        if q.document in train_ids:
            plan.setdefault(q.document, [])
            if q.page not in plan[q.document]:
                plan[q.document].append(q.page)
    for doc_id in sorted(eval_ids | distractor_ids):
        plan[doc_id] = [p for p in range(1, by_id[doc_id].n_pages + 1) if p not in by_id[doc_id].bad_pages]
    renderer = PageRenderer(config)
    rendered: dict[tuple[str, int], Path] = {}
    with tqdm(total=sum(len(p) for p in plan.values()), desc="Rendering pages", unit="page") as progress:
        for doc_id in sorted(plan):
            for page, path in renderer.render(by_id[doc_id], sorted(plan[doc_id]), problems, progress).items():
                rendered[(doc_id, page)] = path
    _fail_if_strict(config, problems)

    # 4. training pairs, in the order of the queries file
    source = config.source or config.documents.resolve().name
    train_rows = []
    for q in queries:
        path = rendered.get((q.document, q.page))
        if q.document in train_ids and path is not None:
            train_rows.append({
                "query": q.text, "image": path,
                "image_filename": f"{q.document}#page={q.page}", "answer": q.answer, "source": source,
                "document": q.document, "page": q.page,
            })  # fmt: skip

    # 5. the evaluation task: identical pages share one corpus entry (a copy would count as a wrong answer)
    corpus, corpus_ids, page_of_id = [], {}, {}
    for (doc_id, page), path in sorted(rendered.items(), key=lambda item: (item[0][0], item[0][1])):
        if doc_id not in eval_ids and doc_id not in distractor_ids:
            continue
        cid = "p-" + _content_id(path.read_bytes())
        corpus_ids[(doc_id, page)] = cid
        page_of_id.setdefault(cid, []).append(f"{doc_id}#page={page}")
        if len(page_of_id[cid]) == 1:
            corpus.append({"id": cid, "image": path})
    eval_queries, qrels = [], []
    for q in queries:
        if q.document in eval_ids and (q.document, q.page) in corpus_ids:
            qid = "q-" + _content_id(normalize_query(q.text).encode())
            eval_queries.append({"id": qid, "text": q.text})
            qrels.append({"query-id": qid, "corpus-id": corpus_ids[(q.document, q.page)], "score": 1})
    # ids are content hashes, so sorting by id orders pages and queries independently of relevance
    corpus.sort(key=lambda r: r["id"])
    eval_queries.sort(key=lambda r: r["id"])
    qrels.sort(key=lambda r: r["query-id"])

    # 6. write (each folder atomically; stale folders from an earlier run of ours with other settings are removed)
    train_dir, eval_dir = config.output_dir / "train", config.output_dir / "eval"
    if train_rows:
        _write_train(train_dir, train_rows)
    elif train_dir.exists():
        shutil.rmtree(train_dir)
    if eval_queries:
        _write_eval(eval_dir, corpus, eval_queries, qrels, {
            "name": task_name(source),
            "description": f"Text-to-page retrieval over {len(corpus)} pages of {len(eval_ids)} held-out documents "
                           f"of '{source}' (prepared by colintern's prepare_dataset).",
        })  # fmt: skip
    elif eval_dir.exists():
        shutil.rmtree(eval_dir)
    counts = {
        "documents": len(documents), "documents_with_queries": len(queried), "queries": len(queries),
        "train_documents": len(train_ids), "train_pairs": len(train_rows),
        "eval_documents": len(eval_ids), "distractor_documents": len(distractor_ids),
        "eval_queries": len(eval_queries), "eval_pages": len(corpus),
        "pages_rendered": renderer.hits + renderer.misses, "pages_from_cache": renderer.hits,
    }  # fmt: skip
    manifest_settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    for where in ("cache_dir", "output_dir", "overwrite"):  # the files do not depend on where they are written
        manifest_settings.pop(where)
    atomic_write_json(config.output_dir / "manifest.json", {
        "format_version": FORMAT_VERSION,
        "settings": manifest_settings,
        "render_settings": config.render_settings(),
        "counts": {k: v for k, v in counts.items() if k not in ("pages_rendered", "pages_from_cache")},
        "train_documents": sorted(train_ids),
        "eval_documents": sorted(eval_ids),
        "distractor_documents": sorted(distractor_ids),
        "eval_corpus_pages": dict(sorted(page_of_id.items())),
    })  # fmt: skip
    report_counts = {k: v for k, v in counts.items() if k not in ("pages_rendered", "pages_from_cache")}
    _write_report(config, problems, report_counts)
    return PreparedDataset(
        output_dir=config.output_dir,
        counts=counts,
        sizes={"train": folder_size(train_dir), "eval": folder_size(eval_dir)},
        problems=problems.problems,
        train_documents=sorted(train_ids),
        eval_documents=sorted(eval_ids),
    )
