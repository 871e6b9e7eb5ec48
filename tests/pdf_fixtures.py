"""Small real PDFs and page-image folders for the own-documents tests, built locally (PIL writes the PDFs, pypdf
encrypts one): readable multi-page PDFs, an encrypted, a corrupt and an empty PDF, a folder of page images and a
one-page image, plus a queries file with good lines and every kind of bad line."""

from __future__ import annotations

import hashlib
import json
import os
import random
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from colintern.data.synthdocs import CHARTS, COLOURS, SHAPES, PageSpec, render_page

# (document id, number of pages): the readable documents
GOOD_PDFS = {"reports/alpha.pdf": 4, "reports/beta.pdf": 3, "gamma.pdf": 3, "delta.pdf": 2, "epsilon.pdf": 3,
             "zeta.pdf": 2}
IMAGE_FOLDER = ("scans/memo", 2)
ONE_PAGE_IMAGE = "poster.png"
PAGE_SIZE = (96, 128)  # points; rendered at 72 dpi this is 96x128 pixels


def _spec(doc_index: int, page: int) -> PageSpec:
    """Distinct SynthDocs attributes per page (what the tiny model can learn)."""
    colours = list(COLOURS)
    return PageSpec(colours[(doc_index + page) % 8], colours[(3 * doc_index + 5 * page) % 8],
                    SHAPES[(doc_index + 2 * page) % len(SHAPES)], CHARTS[(doc_index * 3 + page) % len(CHARTS)])


def _page(doc_index: int, page: int) -> Image.Image:
    """A SynthDocs-style page with the document and page written on it."""
    image = render_page(_spec(doc_index, page), random.Random(f"{doc_index}-{page}"), *PAGE_SIZE)
    ImageDraw.Draw(image).text((4, PAGE_SIZE[1] - 14), f"d{doc_index} p{page}", fill=(0, 0, 0))
    return image


def describe(doc_index: int, page: int) -> str:
    """The query of a page: it names the page's attributes."""
    return f"doc {doc_index} page {page}: {_spec(doc_index, page).describe()}"


def write_pdf(path: Path, pages: list[Image.Image]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pages[0].save(path, format="PDF", save_all=True, append_images=pages[1:], resolution=72)


def build_documents(root: Path) -> tuple[Path, list[dict]]:
    """A documents folder and the good query records (one per readable page, `page` 1-based)."""
    import pypdf

    folder = root / "documents"
    records = []
    for doc_index, (doc_id, n_pages) in enumerate(GOOD_PDFS.items()):
        write_pdf(folder / doc_id, [_page(doc_index, p) for p in range(1, n_pages + 1)])
        records += [{"query": describe(doc_index, p), "file": doc_id, "page": p, "answer": f"p{p}"}
                    for p in range(1, n_pages + 1)]
    image_index = len(GOOD_PDFS)
    memo_dir = folder / IMAGE_FOLDER[0]
    memo_dir.mkdir(parents=True)
    for p in range(1, IMAGE_FOLDER[1] + 1):  # 2.png before 10.png: natural order, so name them out of lexical order
        _page(image_index, p).save(memo_dir / f"page-{p * 5}.png")
        records.append({"query": describe(image_index, p), "file": IMAGE_FOLDER[0], "page": p})
    _page(image_index + 1, 1).save(folder / ONE_PAGE_IMAGE)
    records.append({"query": describe(image_index + 1, 1), "file": ONE_PAGE_IMAGE})  # page left out: one-page doc

    # the bad documents
    write_pdf(folder / "locked.pdf", [_page(90, 1), _page(90, 2)])
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(folder / "locked.pdf"))
    writer.encrypt("secret", algorithm="RC4-128")  # RC4 needs no crypto library
    with open(folder / "locked.pdf", "wb") as handle:
        writer.write(handle)
    good = (folder / "gamma.pdf").read_bytes()
    (folder / "broken.pdf").write_bytes(good[: len(good) // 3])  # truncated: no cross-reference table
    with open(folder / "empty.pdf", "wb") as handle:
        pypdf.PdfWriter().write(handle)  # a valid PDF without pages
    (folder / "notes.txt").write_text("not a document")
    return folder, records


BAD_RECORDS = [
    {"query": "a page that does not exist", "file": "gamma.pdf", "page": 7},  # page_out_of_range
    {"query": "page zero", "file": "gamma.pdf", "page": 0},  # page_out_of_range (pages count from 1)
    {"query": "a missing file", "file": "missing.pdf", "page": 1},  # missing_file
    {"query": "in the locked report", "file": "locked.pdf", "page": 1},  # unusable_document
    {"query": "", "file": "gamma.pdf", "page": 1},  # empty_query
    {"query": "not a number", "file": "gamma.pdf", "page": "two"},  # bad_page_number
]
EXPECTED_BAD = {"encrypted_pdf": 1, "corrupt_pdf": 1, "empty_pdf": 1, "page_out_of_range": 2, "missing_file": 1,
                "unusable_document": 1, "empty_query": 1, "bad_page_number": 1, "duplicate_query": 2}


def write_queries(path: Path, records: list[dict]) -> Path:
    """Good records, the bad ones, and two duplicates (an exact repeat and the same query for another page)."""
    lines = list(records[:3]) + BAD_RECORDS + list(records[3:])
    lines.append(dict(records[0]))  # exact repeat
    lines.append({**records[1], "query": records[1]["query"].upper(), "page": 1})  # same query (case), other page
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------------------------- running
def run_script(*args, env_extra=None, timeout=600):
    """A script in a fresh process (one thread), as a user runs it."""
    from .conftest import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO_ROOT)


def run_script_in_process(script: str, *args) -> int:
    """A script's own main() through colintern.cli.run, in this process (no second start-up of torch)."""
    from .conftest import REPO_ROOT

    namespace = runpy.run_path(str(REPO_ROOT / script), run_name=f"colintern_test_{Path(script).stem}")
    return namespace["run"](namespace["main"], namespace["build_parser"](), list(args))


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every output file under `folder` (the page cache left out)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".page-cache" not in p.parts
    }


@dataclass
class Prepared:
    documents: Path
    queries: Path
    records: list[dict]
    out: Path
    stdout: str
    console: str  # stderr: the log lines

    @property
    def counts(self) -> dict:
        return json.loads((self.out / "report.json").read_text())["counts"]


_PREPARED: dict[Path, Prepared] = {}


def prepared_folder(tmp_path_factory) -> Prepared:
    """The fixture documents run through scripts/prepare_dataset.py once per session (72 dpi: 96x128 px pages)."""
    base = tmp_path_factory.getbasetemp() / "owndocs"
    if base not in _PREPARED:
        base.mkdir()
        documents, records = build_documents(base)
        queries = write_queries(base / "queries.jsonl", records)
        out = base / "out"
        done = run_script("scripts/prepare_dataset.py", "--pdfs", str(documents), "--queries", str(queries),
                          "--output-dir", str(out), "--dpi", "72", "--eval-fraction", "0.3")
        assert done.returncode == 0, done.stderr[-3000:]
        _PREPARED[base] = Prepared(documents, queries, records, out, done.stdout, done.stderr)
    return _PREPARED[base]
