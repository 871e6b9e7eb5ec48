"""How often `scripts/search.py` finds the right page: PDFs of held-out SynthDocs pages (plus a corrupt one) are
indexed with a model, and every page is queried with the query SynthDocs wrote for it.

    PYTHONPATH=. python tests/search/hit_rate.py --model embedded:tiny-internvl3_5-pretrained --domain a --pages all
    PYTHONPATH=. python tests/search/hit_rate.py --model experiments/demo --domain all --pages 120
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from colintern.search import Searcher, build_index
from colintern.utils import setup_logging
from tests.search.synthdocs_pdfs import synthdocs_pdfs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--domain", default="a", help="a, b or all (the whole corpus)")
    parser.add_argument("--pages", default="all", help="held-out test pages to index (default all)")
    parser.add_argument("--dpi", type=int, default=150)
    args = parser.parse_args()
    setup_logging()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = synthdocs_pdfs(root / "pdfs", None if args.pages == "all" else int(args.pages),
                                 domain=None if args.domain == "all" else args.domain)
        start = time.perf_counter()
        stats = build_index(root / "pdfs", root / "index", args.model, dpi=args.dpi)
        print(stats.summary())
        searcher = Searcher(root / "index")
        top1 = top5 = 0
        for text, file, page in records:
            found = [(hit.document, hit.page) for hit in searcher.search(text, 5)]
            top1 += found[0] == (file, page)
            top5 += (file, page) in found
        n = len(records)
        print(f"{args.model}: {n} queries over {len(searcher.entries)} pages (dpi {args.dpi}): right page first "
              f"{top1}/{n} ({top1 / n:.3f}), in the top 5 {top5}/{n} ({top5 / n:.3f}); {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
