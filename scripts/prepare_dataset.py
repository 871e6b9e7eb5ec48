#!/usr/bin/env python
"""Turn your own documents into a training set and an evaluation task.

    python scripts/prepare_dataset.py --pdfs DIR --queries queries.jsonl --output-dir OUT

DIR holds PDFs (any depth) and/or folders of page images (one folder = one document, pages in natural order); an
image directly in DIR is a one-page document. The queries file (JSONL or CSV) has one query per line with the
columns `query`, `file` (path relative to DIR, or a unique file name), `page` (1-based) and optionally `answer`:

    {"query": "What was the 2023 revenue?", "file": "reports/annual-2023.pdf", "page": 4, "answer": "12.1 M EUR"}

OUT/train/ holds query-page pairs in the vidore/colpali_train_set layout (`scripts/train.py --dataset OUT/train`);
OUT/eval/ a retrieval task over every page of held-out documents (`scripts/evaluate.py --benchmarks OUT/eval`). The
split is by document. Problems in the inputs (encrypted, corrupt or empty PDFs, pages out of range, missing files,
duplicate queries) are logged one per line and listed in OUT/report.json; the rest is processed (--strict: stop).
Rendered pages are cached by content hash in OUT/.page-cache, so a re-run (--overwrite) is fast and gives identical
files. OUT must be new or empty and outside DIR; --overwrite replaces only what this command wrote there before.
"""

from __future__ import annotations

import argparse
import logging
import sys

from colintern.cli import run

logger = logging.getLogger("prepare_dataset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdfs", "--documents", dest="documents", required=True, metavar="DIR",
                        help="folder of PDFs and/or page-image folders")
    parser.add_argument("--queries", required=True, help="JSONL or CSV file: query, file, page (1-based), [answer]")
    parser.add_argument("--output-dir", required=True, help="where train/, eval/, report.json and manifest.json go")
    parser.add_argument("--dpi", type=int, default=150, help="PDF rendering resolution (default 150)")
    parser.add_argument("--max-side", type=int, default=4096, help="longest side of a page in pixels at most")
    parser.add_argument("--image-format", choices=("png", "jpeg"), default="png",
                        help="how pages are stored: png (lossless, default) or jpeg (smaller)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    parser.add_argument("--eval-fraction", type=float, default=0.2,
                        help="share of documents held out for OUT/eval (default 0.2; 0: no eval task, 1: eval only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/eval split by document")
    parser.add_argument("--distractors", action="store_true",
                        help="add the pages of documents without queries to the evaluation corpus")
    parser.add_argument("--source", help="value of the `source` column (default: the documents folder's name)")
    parser.add_argument("--cache-dir", help="rendered-page cache (default OUT/.page-cache)")
    parser.add_argument("--strict", action="store_true", help="stop at any problem in the inputs")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --output-dir, replacing only what prepare_dataset wrote there "
                             "before (train/, eval/, report.json, manifest.json, .page-cache/)")
    return parser


def main(args: argparse.Namespace) -> int:
    from colintern.data.documents import PrepareConfig, prepare_dataset

    config = PrepareConfig(
        documents=args.documents,
        queries=args.queries,
        output_dir=args.output_dir,
        dpi=args.dpi,
        max_side=args.max_side,
        image_format=args.image_format,
        jpeg_quality=args.jpeg_quality,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        strict=args.strict,
        distractors=args.distractors,
        source=args.source,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
    )
    prepared = prepare_dataset(config)
    print(prepared.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
