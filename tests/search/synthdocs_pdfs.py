"""A folder of PDFs made of SynthDocs pages (held-out pages of domain A, which the shipped pretrained tiny model
was trained to answer queries about), with each page's query, plus a corrupt PDF."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from colintern.data.synthdocs import SynthDocsConfig, generate_retrieval_split

PRETRAINED = "embedded:tiny-internvl3_5-pretrained"  # trained on SynthDocs domain A (colintern/embedded/README.md)


def synthdocs_pdfs(folder: Path, n_pages: int | None = 40, pages_per_pdf: int = 4, split: str = "test",
                   name: str = "doc", domain: str | None = "a") -> list[tuple[str, str, int]]:
    """Write PDFs of `pages_per_pdf` held-out SynthDocs pages each into `folder`, plus `broken.pdf` (truncated);
    returns (query, file, page) for every page. `domain` None: the whole corpus (what `--preset demo` trains on)."""
    tables = generate_retrieval_split(SynthDocsConfig(domain=domain, max_eval_pages=n_pages), split)
    query_of = {r["corpus-id"]: q for r in tables["qrels"] for q in tables["queries"] if q["id"] == r["query-id"]}
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    corpus = tables["corpus"]
    for start in range(0, len(corpus), pages_per_pdf):
        rows = corpus[start : start + pages_per_pdf]
        file = f"{name}-{start // pages_per_pdf:03d}.pdf"
        pages = [Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB") for row in rows]
        pages[0].save(folder / file, format="PDF", save_all=True, append_images=pages[1:], resolution=72)
        records += [(query_of[row["id"]]["text"], file, page) for page, row in enumerate(rows, start=1)]
    good = (folder / records[0][1]).read_bytes()
    (folder / "broken.pdf").write_bytes(good[: len(good) // 3])  # no cross-reference table: pdfium refuses it
    return records
