"""PDF folder -> training set: `prepare_dataset` against the loop users write by hand (pypdfium2 render, PNG save).

Both render the same vector-text PDFs (built here with pypdfium2: a text page per page, a coloured header band on
every fourth) at the same DPI. The reference saves each page as an RGB PNG, which is what a hand-written loop does;
colintern stores pages without colour as greyscale PNG (lossless) and writes parquet, and a second run reads
every page from its cache. The reference loop and a cold `prepare_dataset` (a fresh output folder each time)
alternate over `--rounds` rounds (`measure.interleaved_rounds`); the seconds are medians, with the spread, the load
averages and a quiet / under-load label.
"""

from __future__ import annotations

import ctypes
import json
import random
import tempfile
import time
from pathlib import Path

from colintern.cli import limits

DESCRIPTION = "PDF pages to a training set: prepare_dataset vs a plain pypdfium2 + PNG loop (time, size)"
WORDS = ("revenue margin quarter growth report annual board lease tenant signed clause total net cost asset "
         "invoice amount due date policy coverage premium claim").split()


def add_arguments(parser) -> None:
    parser.add_argument("--documents", type=int, default=4, help="number of PDFs (default 4)", **limits(ge=1))
    parser.add_argument("--pages", type=int, default=25, help="pages per PDF (default 25)", **limits(ge=1))
    parser.add_argument("--dpi", type=int, default=150, **limits(ge=10))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median counts (default 3)",
                        **limits(ge=1))


def build_text_pdf(path: Path, n_pages: int, seed: int) -> None:
    """A letter-size PDF of Helvetica text lines (vector text, as most real PDFs), a blue band on every 4th page."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as raw

    pdf = pdfium.PdfDocument.new()
    rng = random.Random(seed)
    for index in range(n_pages):
        page = pdf.new_page(612, 792)
        if index % 4 == 0:
            band = raw.FPDFPageObj_CreateNewRect(0, 712, 612, 80)
            raw.FPDFPageObj_SetFillColor(band, 40, 70, 205, 255)
            raw.FPDFPath_SetDrawMode(band, raw.FPDF_FILLMODE_ALTERNATE, False)
            raw.FPDFPage_InsertObject(page.raw, band)
        y = 680
        while y > 60:
            text_obj = raw.FPDFPageObj_NewTextObj(pdf.raw, b"Helvetica", ctypes.c_float(11))
            line = " ".join(rng.choice(WORDS) for _ in range(12)) + "\x00"
            raw.FPDFText_SetText(text_obj, (ctypes.c_ushort * len(line))(*map(ord, line)))
            raw.FPDFPageObj_Transform(text_obj, 1, 0, 0, 1, 60, y)
            raw.FPDFPage_InsertObject(page.raw, text_obj)
            y -= 16
        raw.FPDFPage_GenerateContent(page.raw)
        page.close()
    pdf.save(str(path))
    pdf.close()


def reference_loop(pdfs: list[Path], output: Path, dpi: int) -> None:
    """What a user writes without colintern: render every page and save it as PNG."""
    import pypdfium2 as pdfium

    output.mkdir()
    for path in pdfs:
        pdf = pdfium.PdfDocument(path)
        for index in range(len(pdf)):
            pdf[index].render(scale=dpi / 72).to_pil().save(output / f"{path.stem}-{index + 1}.png")
        pdf.close()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and ".page-cache" not in p.parts)


def run(args) -> int:
    from colintern.benchmarks import record
    from colintern.benchmarks.measure import interleaved_rounds
    from colintern.data.documents import PrepareConfig, prepare_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pdfs").mkdir()
        pdfs = []
        for doc in range(args.documents):
            pdfs.append(root / "pdfs" / f"doc{doc}.pdf")
            build_text_pdf(pdfs[-1], args.pages, seed=doc)
        queries = root / "queries.jsonl"
        queries.write_text("".join(
            json.dumps({"query": f"question {d}-{p}", "file": f"doc{d}.pdf", "page": p}) + "\n"
            for d in range(args.documents) for p in range(1, args.pages + 1)
        ))  # fmt: skip
        n_pages = args.documents * args.pages

        rounds = getattr(args, "rounds", 3)
        made: dict[str, int] = {"reference": 0, "colintern": 0}

        def reference() -> None:
            made["reference"] += 1
            reference_loop(pdfs, root / f"reference-{made['reference']}", args.dpi)

        def colintern() -> None:  # cold: a fresh output folder, so no page cache
            made["colintern"] += 1
            prepare_dataset(PrepareConfig(root / "pdfs", queries, root / f"out-{made['colintern']}", dpi=args.dpi,
                                          eval_fraction=0.0))

        timing = interleaved_rounds({"reference": reference, "colintern": colintern}, rounds, reference="reference")
        reference_s, cold_s = timing.stats["reference"].median, timing.stats["colintern"].median
        config = PrepareConfig(root / "pdfs", queries, root / f"out-{made['colintern']}", dpi=args.dpi,
                               eval_fraction=0.0)
        config.overwrite = True  # the re-run writes over its own output
        start = time.perf_counter()
        prepare_dataset(config)
        warm_s = time.perf_counter() - start
        reference_bytes, colintern_bytes = _size(root / "reference-1"), _size(root / "out-1" / "train")

    figures = {
        "pages": n_pages,
        "dpi": args.dpi,
        "reference": {"what": "pypdfium2 render + PIL PNG save (RGB)", "seconds": round(reference_s, 2),
                      "pages_per_second": round(n_pages / reference_s, 2),
                      "megabytes": round(reference_bytes / 1e6, 2)},
        "colintern": {"what": "prepare_dataset, PNG (greyscale when lossless) in parquet",
                      "seconds": round(cold_s, 2), "pages_per_second": round(n_pages / cold_s, 2),
                      "cached_rerun_seconds": round(warm_s, 2), "megabytes": round(colintern_bytes / 1e6, 2)},
        "speedup_vs_reference": round(reference_s / cold_s, 2),
        "rounds": rounds,
        "conditions": timing.conditions,
        "timing": timing.to_dict(),
        "size_ratio_vs_reference": round(colintern_bytes / reference_bytes, 3),
    }  # fmt: skip
    path = record("render", figures, getattr(args, "output_dir", None))
    print(f"{n_pages} pages at {args.dpi} dpi, medians of {rounds} rounds, {timing.conditions}")
    print(f"  reference loop: {figures['reference']['seconds']:7.2f} s  {figures['reference']['megabytes']:7.2f} MB")
    print(f"  prepare_dataset:{figures['colintern']['seconds']:7.2f} s  {figures['colintern']['megabytes']:7.2f} MB  "
          f"(re-run from the cache {warm_s:.2f} s)")
    print(f"  speed-up x{figures['speedup_vs_reference']}, size x{figures['size_ratio_vs_reference']}  -> {path}")
    return 0
