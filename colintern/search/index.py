"""A page index of your own documents, built with a trained retriever, and exact MaxSim search over it.

    build_index("pdfs/", "my-index", "experiments/run")     # python scripts/search.py index pdfs/ --model RUN --index DIR
    Searcher("my-index").search("operating margin 2023", k=5)

Layout of an index folder (everything in it is written by `build_index`):
    index.json                  the model (path and a fingerprint of its weights), the rendering and tiling settings,
                                every indexed document (content hash, pages, rendered page files) and the problems found
    shards/<sha256>.safetensors one per document content: `embeddings` (all its pages' tokens, float16, concatenated),
                                `lengths` (tokens per page), `pages` (1-based page numbers); written atomically
    pages/                      the rendered pages (PNG, by content hash: `colintern.data.documents.PageRenderer`)

Resuming and adding: a document whose content hash already has a shard is not rendered or encoded again, so an
interrupted run keeps every document encoded before the interruption, and a re-run after adding a PDF encodes that
PDF only. Documents are found, and unreadable ones (corrupt, encrypted, empty PDFs) reported and skipped, by
`colintern.data.documents.open_documents`. A document removed from the folder leaves the index on the next run.

Search is exact MaxSim (`colintern.model.scoring.max_sim`) over every page. A PLAID index (the `fast-plaid` package)
would trade exactness for speed on large collections; every fast-plaid release pins one torch version (1.7.0: torch
2.11.0), so it cannot be installed beside this project's torch (docs/own-documents.md, "Searching your documents").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from colintern.utils import ColinternError, atomic_write_json, prepare_output_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "index.json"
COMMAND = "search-index"
OWNED = (MANIFEST, "shards", "pages")
DEFAULT_CHUNK_PAGES = 64  # pages rendered and encoded between two saves (an interruption loses at most this many)


# ---------------------------------------------------------------------------------------------------- model identity
WEIGHT_SUFFIXES = (".safetensors", ".bin")
IDENTITY_FILES = ("config.json", "adapter_config.json", "processor_config.json", "preprocessor_config.json")


def model_fingerprint(model: str) -> str:
    """A hash of a local model folder's weights and configuration (for a Hub id: the id itself).

    An index is only searched with the model that built it: the same path holding retrained weights is another model.
    """
    from colintern.model.embedded import resolve_embedded

    folder = Path(resolve_embedded(model))
    if not folder.is_dir():
        return "id:" + model
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in
                                                                   IDENTITY_FILES))
    if not files:
        raise ColinternError(f"--model {model}: {folder} holds no model weights (*.safetensors).")
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _model_reference(model: str) -> str:
    """How the index records the model: an absolute path for a local folder, else the alias or Hub id as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


# ---------------------------------------------------------------------------------------------------- the index
@dataclass
class PageEntry:
    """One indexed page."""

    document: str  # id: path relative to the documents folder
    page: int  # 1-based
    image: Path  # the rendered page

    @property
    def label(self) -> str:
        return f"{self.document}#page={self.page}"


@dataclass
class BuildStats:
    """What one `build_index` run did."""

    documents: int = 0  # readable documents in the folder
    documents_encoded: int = 0
    documents_reused: int = 0  # already in the index (same content)
    pages_encoded: int = 0
    pages_indexed: int = 0  # pages in the index after the run
    documents_removed: int = 0  # in the index before, no longer in the folder
    documents_skipped: int = 0  # readable but with no page that could be rendered
    problems: list[str] = field(default_factory=list)  # one line per unreadable document or page
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"{self.pages_indexed} pages of {self.documents - self.documents_skipped} documents indexed: "
            f"{self.pages_encoded} pages of {self.documents_encoded} documents encoded now, "
            f"{self.documents_reused} documents already indexed"
            + (f", {self.documents_removed} removed (no longer in the folder)" if self.documents_removed else "")
            + f" ({self.seconds:.1f} s)",
        ]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s), skipped:")
            lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


class SearchIndex:
    """An index folder: its manifest and shards (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise ColinternError(
                f"--index {self.path}: no search index there (no {MANIFEST}). Build one with "
                f"`python scripts/search.py index PDF_DIR --model RUN --index {self.path}`."
            )
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ColinternError(f"{manifest_path} is not valid JSON ({error}): rebuild the index.") from error
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ColinternError(f"{manifest_path} has format {self.manifest.get('format_version')!r}, this colintern "
                                 f"reads {FORMAT_VERSION}: rebuild the index into a new folder.")

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def max_num_visual_tokens(self) -> int:
        return int(self.manifest["settings"]["max_num_visual_tokens"])

    def entries(self) -> list[PageEntry]:
        """Every indexed page, ordered by document id and page."""
        out = []
        for doc_id, record in sorted(self.manifest["documents"].items()):
            for page in record["pages"]:
                out.append(PageEntry(doc_id, int(page), self.path / record["images"][str(page)]))
        return out

    def load(self) -> tuple[list[PageEntry], list[torch.Tensor]]:
        """(pages, their embeddings as (tokens, dim) float16 tensors), in `entries()` order."""
        from safetensors.torch import load_file

        entries, embeddings = [], []
        for doc_id, record in sorted(self.manifest["documents"].items()):
            shard = load_file(str(self.path / "shards" / f"{record['sha256']}.safetensors"))
            pages = shard["pages"].tolist()
            per_page = dict(zip(pages, torch.split(shard["embeddings"], shard["lengths"].tolist())))
            for page in record["pages"]:
                entries.append(PageEntry(doc_id, int(page), self.path / record["images"][str(page)]))
                embeddings.append(per_page[int(page)])
        return entries, embeddings


def _write_shard(path: Path, pages: list[int], embeddings: list[torch.Tensor]) -> None:
    """Save one document's page embeddings so that a reader finds the whole file or none."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({
            "embeddings": torch.cat(embeddings).to(torch.float16).contiguous(),
            "lengths": torch.tensor([len(e) for e in embeddings], dtype=torch.int64),
            "pages": torch.tensor(pages, dtype=torch.int64),
        }, tmp)  # fmt: skip
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_index(
    pdf_dir: str | Path,
    index_dir: str | Path,
    model: str | None = None,
    *,
    dpi: int | None = None,
    max_side: int | None = None,
    max_num_visual_tokens: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    chunk_pages: int = DEFAULT_CHUNK_PAGES,
    progress: bool = True,
    loaded=None,
    on_chunk=None,
) -> BuildStats:
    """Render and encode every document of `pdf_dir` that the index at `index_dir` does not hold yet.

    Args:
        model: the retriever (run folder, adapter, checkpoint, `embedded:` alias); may be left out to add to an
            existing index with its own model.
        dpi, max_side: PDF rendering (default 150 and 4096 px, see `PrepareConfig`).
        max_num_visual_tokens: visual-token budget per page (default: the model's processor's).
        An existing index keeps the settings it was built with: those left out are taken from it, others must match.
        chunk_pages: pages encoded between two saves of the manifest.
        loaded: an already loaded (model, processor) for `model` (tests, the server).
        on_chunk: called with the stats after each saved chunk (tests interrupt a build with it).
    """
    from colintern.data.documents import PageRenderer, PrepareConfig, ProblemLog, open_documents
    from colintern.model.encoding import encode_pages
    from colintern.model.loading import load_retriever

    start = time.perf_counter()
    pdf_dir, index_dir = Path(pdf_dir), Path(index_dir)
    existing = (index_dir / MANIFEST).is_file()
    manifest = SearchIndex(index_dir).manifest if existing else None
    if model is None:
        if manifest is None:
            raise ColinternError(f"--model is required to build a new index ({index_dir} holds none yet).")
        model = manifest["model"]
    if manifest is not None:  # settings left out: the index's own
        dpi = manifest["settings"]["dpi"] if dpi is None else dpi
        max_side = manifest["settings"]["max_side"] if max_side is None else max_side
        if max_num_visual_tokens is None:
            max_num_visual_tokens = manifest["settings"]["max_num_visual_tokens"]
    dpi, max_side = dpi or 150, max_side or 4096
    reference, fingerprint = _model_reference(model), model_fingerprint(model)
    prepare_output_dir(index_dir, command=COMMAND, inputs={"PDF_DIR": pdf_dir}, overwrite=existing,
                       owned_names=OWNED, option="--index")
    if manifest is not None and manifest["model_fingerprint"] != fingerprint:
        raise ColinternError(
            f"--index {index_dir} was built with another model ({manifest['model']}, weights "
            f"{manifest['model_fingerprint']}; now {reference}, {fingerprint}): its pages cannot be searched with "
            "this one. Choose a new --index folder."
        )
    if loaded is None:
        net, processor = load_retriever(model, device=device, max_num_visual_tokens=max_num_visual_tokens)
    else:
        net, processor = loaded
        if max_num_visual_tokens is not None:
            processor.set_max_num_visual_tokens(max_num_visual_tokens)
    net.eval()
    settings = {"dpi": dpi, "max_side": max_side, "max_num_visual_tokens": processor.max_num_visual_tokens}
    if manifest is not None and manifest["settings"] != settings:
        raise ColinternError(f"--index {index_dir} was built with {manifest['settings']}, not {settings}: use the "
                             "same settings, or choose a new --index folder.")
    documents_before = dict(manifest["documents"]) if manifest else {}
    manifest = {"format_version": FORMAT_VERSION, "model": reference, "model_fingerprint": fingerprint,
                "settings": settings, "documents": {}, "problems": []}
    shard_dir = index_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for partial in shard_dir.glob(".*.tmp"):  # left by a run killed while writing a shard
        partial.unlink()

    problems = ProblemLog()
    documents, _unusable = open_documents(pdf_dir, problems)
    # the page renderer of prepare_dataset, its cache inside the index (no queries file is read here)
    config = PrepareConfig(documents=pdf_dir, queries=pdf_dir, output_dir=index_dir, dpi=dpi, max_side=max_side,
                           cache_dir=index_dir / "pages")
    renderer = PageRenderer(config)
    stats = BuildStats(documents=len(documents))

    def record(document, images: dict[int, Path]) -> None:
        manifest["documents"][document.id] = {
            "sha256": document.sha256, "source": str(document.path.resolve()), "pages": sorted(images),
            "images": {str(p): images[p].relative_to(index_dir).as_posix() for p in sorted(images)},
        }  # fmt: skip

    def save() -> None:
        manifest["problems"] = [problem.to_dict() for problem in problems.problems]
        atomic_write_json(index_dir / MANIFEST, manifest)

    todo = []
    for document in documents:
        shard = shard_dir / f"{document.sha256}.safetensors"
        if shard.is_file():  # this content was encoded before (by this model: checked above)
            images = renderer.render(document, list(_shard_pages(shard)), problems)
            record(document, images)
            stats.documents_reused += 1
        else:
            todo.append(document)
    save()
    if todo:
        logger.info("Indexing %d document(s) (%d already indexed) with %s", len(todo), stats.documents_reused,
                    reference)
    n_todo = sum(d.n_pages - len(d.bad_pages) for d in todo)
    with tqdm(total=n_todo, desc="Rendering pages", unit="page", disable=not progress) as render_bar, \
            tqdm(total=n_todo, desc="Encoding pages", unit="page", disable=not progress) as encode_bar:
        while todo:
            chunk, size = [], 0
            while todo and (not chunk or size + todo[0].n_pages <= chunk_pages):
                size += todo[0].n_pages
                chunk.append(todo.pop(0))
            rendered = []
            for document in chunk:
                pages = [p for p in range(1, document.n_pages + 1) if p not in document.bad_pages]
                images = renderer.render(document, pages, problems, render_bar)
                if images:
                    rendered.append((document, images))
                else:
                    stats.documents_skipped += 1
            flat = [(document, page, path) for document, images in rendered for page, path in sorted(images.items())]
            if not flat:
                continue
            embeddings = encode_pages(net, processor, [path for _, _, path in flat], batch_size=batch_size,
                                      page_ids=[f"{d.id}#page={p}" for d, p, _ in flat], on_batch=encode_bar.update)
            position = 0
            for document, images in rendered:
                pages = sorted(images)
                _write_shard(shard_dir / f"{document.sha256}.safetensors", pages,
                             embeddings[position : position + len(pages)])
                position += len(pages)
                record(document, images)
                stats.documents_encoded += 1
                stats.pages_encoded += len(pages)
            save()
            if on_chunk is not None:
                on_chunk(stats)

    stats.documents_removed = len(set(documents_before) - set(manifest["documents"]))
    # shards and rendered pages of documents no longer in the folder (or changed since)
    kept = {f"{entry['sha256']}.safetensors" for entry in manifest["documents"].values()}
    for shard in shard_dir.glob("*.safetensors"):
        if shard.name not in kept:
            shard.unlink()
    kept_images = {index_dir / image for entry in manifest["documents"].values() for image in entry["images"].values()}
    for image in (index_dir / "pages").rglob("*"):
        if image.is_file() and image not in kept_images:
            image.unlink()
    save()
    stats.pages_indexed = sum(len(r["pages"]) for r in manifest["documents"].values())
    stats.problems = [str(problem) for problem in problems.problems]
    stats.seconds = time.perf_counter() - start
    return stats


def _shard_pages(path: Path) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor("pages").tolist()


# ---------------------------------------------------------------------------------------------------- search
@dataclass
class Hit:
    """One ranked page."""

    rank: int  # 1-based
    index: int  # position in the index's pages (Searcher.entries)
    document: str
    page: int  # 1-based
    score: float
    image: Path

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "index": self.index, "file": self.document, "page": self.page,
                "score": round(self.score, 4)}


class Searcher:
    """An index loaded in memory with its model: `search` ranks every page by exact MaxSim."""

    def __init__(self, index_dir: str | Path, device: str | None = None, loaded=None):
        from colintern.model.loading import load_retriever

        self.index = SearchIndex(index_dir)
        if loaded is None:
            fingerprint = model_fingerprint(self.index.model)
            if fingerprint != self.index.manifest["model_fingerprint"]:
                raise ColinternError(
                    f"The model of {self.index.path} ({self.index.model}) has changed since the index was built "
                    f"(weights {fingerprint}, index {self.index.manifest['model_fingerprint']}): rebuild the index "
                    "into a new folder."
                )
            loaded = load_retriever(self.index.model, device=device,
                                    max_num_visual_tokens=self.index.max_num_visual_tokens)
        self.model, self.processor = loaded
        self.model.eval()
        self.entries, self.embeddings = self.index.load()
        if not self.entries:
            raise ColinternError(f"{self.index.path} holds no pages: index some documents first.")

    def encode_query(self, text: str) -> torch.Tensor:
        from colintern.model.encoding import encode_queries

        if not text.strip():
            raise ColinternError("The query is empty: give some text to search for.")
        return encode_queries(self.model, self.processor, [text])[0]

    def search(self, text: str, k: int = 5) -> list[Hit]:
        """The `k` best pages for `text`, best first (ties keep index order)."""
        from colintern.model.scoring import max_sim

        if k < 1:
            raise ColinternError(f"-k {k}: must be at least 1.")
        scores = max_sim([self.encode_query(text)], self.embeddings)[0]
        top = torch.topk(scores, min(k, len(self.entries)))  # ties: torch.topk is not stable, so re-sort
        order = sorted(zip(top.values.tolist(), top.indices.tolist()), key=lambda item: (-item[0], item[1]))
        return [Hit(rank, i, self.entries[i].document, self.entries[i].page, score, self.entries[i].image)
                for rank, (score, i) in enumerate(order, start=1)]

    def explain(self, hit: Hit, text: str, output: str | Path) -> Path:
        """Write the page of `hit` and each query token's similarity map over it to the PNG `output`."""
        from colintern.search.explain import plot_similarity_maps, query_token_labels, similarity_maps

        query = self.encode_query(text)
        labels, positions = query_token_labels(self.processor, text)
        from PIL import Image

        with Image.open(hit.image) as image:
            page = image.convert("RGB")
        maps = similarity_maps(query[positions], self.embeddings[hit.index], self.processor, page.size)
        title = f"{hit.document}  page {hit.page}  score {hit.score:.2f}  (rank {hit.rank})"
        return plot_similarity_maps(page, maps, labels, Path(output), title=title)
