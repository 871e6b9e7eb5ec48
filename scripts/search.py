#!/usr/bin/env python
"""Search your own documents with a trained retriever.

    python scripts/search.py index PDF_DIR --model RUN --index DIR     render and encode the pages (resumable; a re-run
                                                                        encodes only new or changed documents)
    python scripts/search.py query --index DIR "text" -k 5              ranked pages: file, page number, score
    python scripts/search.py query --index DIR "text" --explain OUT     also a PNG per hit: the page and each query
                                                                        token's similarity map over it
    python scripts/search.py serve --index DIR [--port 8000]            a local search page in the browser

PDF_DIR holds PDFs (any depth) and/or folders of page images, as for scripts/prepare_dataset.py. Unreadable files
(corrupt, encrypted, empty) are reported, one line each, and skipped. --model is a run folder, an adapter, a
checkpoint or an `embedded:` alias; the index records it, so `query` and `serve` need only --index. Search is exact
MaxSim over every page.
"""

from __future__ import annotations

import argparse
import logging
import sys

from colintern.cli import limits, run

logger = logging.getLogger("search")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="render and encode a folder of documents into an index")
    index.add_argument("pdf_dir", metavar="PDF_DIR", help="folder of PDFs and/or page-image folders")
    index.add_argument("--model", help="the retriever (required for a new index; an existing one keeps its own)")
    index.add_argument("--index", required=True, metavar="DIR", help="index folder (new, or an index to add to)")
    index.add_argument("--dpi", type=int, help="PDF rendering resolution (default 150; an existing index: its own)",
                       **limits(ge=10))
    index.add_argument("--max-side", type=int, help="longest side of a page in pixels at most (default 4096)",
                       **limits(ge=64))
    index.add_argument("--max-num-visual-tokens", type=int,
                       help="visual tokens per page (default: the model's; an existing index: its own)", **limits(ge=1))
    index.add_argument("--batch-size", type=int, default=8, help="pages per forward pass (default 8)", **limits(ge=1))
    index.add_argument("--device", help="cuda or cpu (default: cuda when available)")

    query = commands.add_parser("query", help="the best pages for a query")
    query.add_argument("text", help="what to look for")
    query.add_argument("--index", required=True, metavar="DIR")
    query.add_argument("-k", type=int, default=5, help="pages to return (default 5)", **limits(ge=1))
    query.add_argument("--explain", nargs="?", const="search-explain", metavar="OUT",
                       help="write a PNG per hit into OUT (default ./search-explain): the page and the similarity "
                            "map of each query token")
    query.add_argument("--json", action="store_true", help="print the hits as JSON")
    query.add_argument("--device", help="cuda or cpu (default: cuda when available)")

    serve = commands.add_parser("serve", help="a local search page")
    serve.add_argument("--index", required=True, metavar="DIR")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)",
                       **limits(ge=0, le=65535))
    serve.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.command == "index":
        from colintern.search import build_index

        stats = build_index(args.pdf_dir, args.index, args.model, dpi=args.dpi, max_side=args.max_side,
                            max_num_visual_tokens=args.max_num_visual_tokens, batch_size=args.batch_size,
                            device=args.device)
        print(stats.summary())
        return 0
    if args.command == "serve":
        from colintern.search.server import serve

        serve(args.index, host=args.host, port=args.port, device=args.device)
        return 0

    import json

    from colintern.search import Searcher
    from colintern.utils import prepare_output_dir, safe_name

    searcher = Searcher(args.index, device=args.device)
    hits = searcher.search(args.text, args.k)
    written = {}
    if args.explain:
        output = prepare_output_dir(args.explain, command="search-explain", overwrite=True, option="--explain")
        with output.staged() as stage:
            for hit in hits:
                name = f"{hit.rank:02d}-{safe_name(hit.document)}-page{hit.page}.png"
                searcher.explain(hit, args.text, stage / name)
                written[hit.rank] = output.path / name
    if args.json:
        print(json.dumps([dict(hit.to_dict(), explain=str(written.get(hit.rank, "")) or None) for hit in hits],
                         indent=2))
        return 0
    width = max(len(hit.document) for hit in hits)
    print(f"{'rank':>4}  {'score':>8}  {'file':<{width}}  page")
    for hit in hits:
        print(f"{hit.rank:>4}  {hit.score:>8.3f}  {hit.document:<{width}}  {hit.page}"
              + (f"  {written[hit.rank]}" if hit.rank in written else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
