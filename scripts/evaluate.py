#!/usr/bin/env python
"""Evaluate a ColIntern3.5 retriever with mteb on ViDoRe, SynthDocs or your own task folders.

    python scripts/evaluate.py --model-path experiments/run --benchmarks "ViDoRe(v1)"
    python scripts/evaluate.py --model-path experiments/run --benchmarks SynthDocsRetrieval
    python scripts/evaluate.py --model-path experiments/run --benchmarks "ViDoRe(v1)" "ViDoRe(v2)" OUT/eval
    python scripts/evaluate.py --model-path experiments/run --benchmarks "ViDoRe(v3.1)" --corpus-text prompt

--model-path is an adapter folder (base + LoRA adapter + trained head, merged before evaluating), a full checkpoint
folder, a Hub id or an `embedded:` alias. --benchmarks takes mteb benchmark names ("ViDoRe(v1)", "ViDoRe(v2)",
"ViDoRe(v3)", "ViDoRe(v3.1)"), mteb task names, SynthDocsRetrieval (the embedded test split) and folders holding
corpus.parquet / queries.parquet / qrels.parquet. mteb writes one JSON per task to
OUTPUT_DIR/results/<model>/<revision>/, and colintern the protocol that determined its scores to protocol/<Task>.json
beside it; tasks that already have results are not recomputed (--overwrite recomputes them), so an interrupted run
resumes. At the end a table gives NDCG@5, NDCG@10 and Recall@100 (x100) per task, the benchmark averages and the
encode throughput.

Private tasks (ViDoRe(v3)'s Telecom and Nuclear: only the benchmark's maintainers hold their data) are listed as
"private: not run"; the averages say how many tasks they cover. ViDoRe(v3.1) corpora give each page its OCR text:
--corpus-text ignore embeds the page image alone, --corpus-text prompt puts the text in the page prompt after the
image. --check-invariance first embeds a sample of pages and queries at batch 1 and at --batch-size and stops if the
scores move (largest difference above 1e-4, or another top-10).

A model whose projection head is untrained (a base model, or an adapter saved without its head) is refused;
--allow-untrained-head evaluates it on purpose, e.g. as the chance-level baseline.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from colintern.cli import limits, run
from colintern.utils import ColinternError

logger = logging.getLogger("evaluate")


def main(args: argparse.Namespace) -> int:
    from colintern.evaluation import download_benchmarks, evaluate
    from colintern.model.compression import CompressionConfig

    if args.download_only:
        names = download_benchmarks(args.benchmarks, args.split)
        logger.info("Data of %d task(s) is in the Hugging Face cache: %s", len(names), ", ".join(names))
        return 0
    if not args.model_path:
        raise ColinternError("--model-path is required (except with --download-only).")
    summary = evaluate(
        args.model_path,
        args.benchmarks,
        batch_size=args.batch_size,
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        allow_untrained_head=args.allow_untrained_head,
        splits=args.split,
        device=args.device,
        dtype=args.dtype,
        model_name=args.model_name,
        max_num_visual_tokens=args.max_num_visual_tokens,
        show_progress=not args.no_progress,
        corpus_text=args.corpus_text,
        corpus_text_max_tokens=args.corpus_text_max_tokens,
        check_invariance=args.check_invariance,
        compression=CompressionConfig.parse(args.compression) if args.compression else None,
    )
    print(f"\n{summary.model_name} (revision {summary.revision}), scores x100, results in {summary.results_dir}")
    if summary.invariance:
        print(f"batch invariance passed on {summary.invariance['task']}: largest score difference "
              f"{summary.invariance['max_score_diff']:.3g} between batch 1 and batch {summary.invariance['batch_size']}")
    print(summary.table())
    if summary.private:
        print(f"Private tasks, not run (only the benchmark's maintainers can score them): {', '.join(summary.private)}")
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from colintern.training.arguments import field_limits

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", help="adapter folder, checkpoint folder, Hub id or embedded: alias")
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        default=["ViDoRe(v1)"],
        metavar="NAME",
        help='benchmarks, tasks or task folders (default: "ViDoRe(v1)")',
    )
    parser.add_argument("--batch-size", type=int, default=16, help="pages (and queries) per forward pass (default 16)",
                        **limits(ge=1))
    parser.add_argument(
        "--output-dir", default="results/mteb_evaluation", help="mteb results cache (default results/mteb_evaluation)"
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute tasks that already have results")
    parser.add_argument(
        "--allow-untrained-head",
        action="store_true",
        help="evaluate a model whose projection head is untrained (e.g. the base model as a chance-level baseline)",
    )
    parser.add_argument("--split", nargs="+", help="splits to evaluate instead of each task's default, e.g. validation")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--model-name", help="mteb model name for the results folder (default colintern/<folder>)")
    parser.add_argument("--max-num-visual-tokens", type=int, help="override the processor's visual tokens per page",
                        **field_limits("model.max_num_visual_tokens"))
    parser.add_argument("--corpus-text", choices=["ignore", "prompt"], default="ignore",
                        help="corpora with page text (ViDoRe(v3.1)): ignore it (image only, default) or put it in the "
                        "page prompt after the image")
    parser.add_argument("--corpus-text-max-tokens", type=int, default=1024,
                        help="text tokens kept per page with --corpus-text prompt (default 1024)", **limits(ge=1))
    parser.add_argument("--check-invariance", action="store_true",
                        help="first check that scores do not depend on the batch size (sample at batch 1 vs "
                        "--batch-size); stop if they move")
    parser.add_argument(
        "--compression",
        metavar="SPEC",
        help='score compressed page vectors, e.g. "pool=2,dim=64,quant=int8" or "quant=binary,rescore=32" '
        "(keys pool, dim, quant float16|int8|binary, scoring asymmetric|hamming, rescore; see docs/evaluation.md)",
    )
    parser.add_argument("--download-only", action="store_true", help="only fetch the Hub datasets into the cache")
    parser.add_argument("--json", action="store_true", help="also print the summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
