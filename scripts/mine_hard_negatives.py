#!/usr/bin/env python
"""Add hard negatives to a training set: for every query, the pages a model ranks highest that are not its answer.

    python scripts/mine_hard_negatives.py --model-path M --dataset OUT/train --top-k 8
    python scripts/train.py --dataset OUT/train --loss negative-ce --num-negatives 2 ...

M is a base model, a trained checkpoint or a PEFT adapter folder (or embedded:tiny-internvl3_5). Every query is
scored against every distinct page of the split (MaxSim); its negatives are the top-scoring pages that are not
paired with it, skipping byte-identical copies and near-duplicates of its page (page-to-page similarity, the mean
best-match cosine between the two pages' token embeddings, at least --duplicate-threshold). They are stored as row
indices into the same split in a `negatives` column; the split's parquet files are rewritten in place (atomically)
unless --output-dir is given. Statistics go to <folder>.negatives.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from colintern.cli import run

logger = logging.getLogger("mine_hard_negatives")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="base model, checkpoint or adapter folder that scores")
    parser.add_argument("--dataset", required=True, help="training set folder (e.g. OUT/train) or Hub id")
    parser.add_argument("--top-k", type=positive_int, default=8, help="hard negatives per query (default 8)")
    parser.add_argument("--split", default="train", help="split to mine (default train)")
    parser.add_argument("--output-dir", help="write the split with negatives here (a new or empty folder outside the "
                                             "dataset) instead of in place")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --output-dir, replacing only files mining wrote there before")
    parser.add_argument("--column", default="negatives", help="name of the negatives column (default negatives)")
    parser.add_argument("--query-column", default="query")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--duplicate-threshold", type=float, default=0.995,
                        help="page-to-page similarity at or above which a page counts as a near-duplicate of the "
                             "positive and is skipped (default 0.995)")
    parser.add_argument("--max-positive-ratio", type=float,
                        help="also skip pages scoring above this fraction of the positive's score (e.g. 0.95; "
                             "removes likely false negatives; default off)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="pages or queries per forward pass")
    parser.add_argument("--max-num-visual-tokens", type=int, help="image tokens per page at most (tiling limit)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--report", help="where the statistics go (default: <folder>.negatives.json)")
    return parser


def main(args: argparse.Namespace) -> int:
    from colintern.hub import prefer_offline_when_unreachable
    from colintern.training.negatives import MiningConfig, mine_hard_negatives

    prefer_offline_when_unreachable()
    config = MiningConfig(
        model_path=args.model_path,
        dataset=args.dataset,
        top_k=args.top_k,
        split=args.split,
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        column=args.column,
        query_column=args.query_column,
        image_column=args.image_column,
        duplicate_threshold=args.duplicate_threshold,
        max_positive_ratio=args.max_positive_ratio,
        batch_size=args.batch_size,
        max_num_visual_tokens=args.max_num_visual_tokens,
        device=args.device,
        report_path=args.report,
    )
    folder, stats = mine_hard_negatives(config)
    summary = {k: v for k, v in stats.to_dict().items() if k != "examples"}
    print(f"Hard negatives in {folder} (column '{config.column}'):\n{json.dumps(summary, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
