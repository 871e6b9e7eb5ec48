#!/usr/bin/env python
"""Merge checkpoints into one model ("model soup", Wortsman et al. 2022): LoRA adapters or full weights, averaged.

    python scripts/merge_checkpoints.py experiments/runs/r1 --last 4 --method uniform --output experiments/runs/r1-soup
    python scripts/merge_checkpoints.py runs/seed1 runs/seed2 runs/seed3 --final --method greedy --output runs/soup
    python scripts/merge_checkpoints.py runs/r1/checkpoint-600 runs/r1/checkpoint-800 --output runs/r1-avg

RUN_DIR is a training run folder (its complete checkpoint-* folders are the candidates: all, the --last N, or with
--final the run's final model at its top) or a checkpoint-N folder itself. uniform averages every candidate; greedy
scores each on the runs' validation split (NDCG@5, mteb), walks them best first and keeps one only when the soup's
NDCG@5 does not drop. LoRA adapters are averaged exactly (the result is a LoRA of rank n*r computing the mean of
the merged models); full weights are averaged tensor by tensor. Checkpoints of different base models, LoRA settings
or attention modes are refused. The output, a new folder (an existing non-empty one is refused), is a normal adapter
or model folder for scripts/evaluate.py and scripts/merge_adapter.py; colintern_merge.json in it lists the
ingredients and their validation scores.
"""

from __future__ import annotations

import argparse
import sys

from colintern.cli import limits, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders or checkpoint-N folders")
    parser.add_argument("--method", choices=["uniform", "greedy"], default="uniform", help="default uniform")
    parser.add_argument("--output", required=True, help="new folder for the merged adapter or model")
    parser.add_argument("--last", type=int, **limits(ge=1), help="take each run's N newest complete checkpoints")
    parser.add_argument("--final", action="store_true", help="take each run's final model instead of checkpoints")
    parser.add_argument("--validation", help="retrieval split folder for greedy (default: the runs' eval_split)")
    parser.add_argument("--batch-size", type=int, default=16, **limits(ge=1), help="encoding batch for greedy")
    parser.add_argument("--device", help="cuda, cpu (default: cuda when available)")
    return parser


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from colintern.hub import prefer_offline_when_unreachable
    from colintern.training.merging import find_candidates, merge_checkpoints, ndcg_scorer, validation_split
    from colintern.utils import ColinternError

    prefer_offline_when_unreachable()
    if args.final and args.last:
        raise ColinternError("--final takes each run's final model; --last N its checkpoints: give one of them.")
    candidates = find_candidates(args.run_dirs, last=args.last, final=args.final)
    scorer = None
    if args.method == "greedy":
        split = Path(args.validation) if args.validation else validation_split(candidates[0])
        scorer = ndcg_scorer(split, batch_size=args.batch_size, device=args.device)
    result = merge_checkpoints(candidates, args.output, method=args.method, score_folder=scorer)
    for label, score in result.scores.items():
        print(f"{label}: validation NDCG@5 {score:.4f}")
    for step in result.history:
        print(f"  + {step['candidate']}: soup NDCG@5 {step['soup_ndcg_at_5']:.4f} ({'kept' if step['kept'] else 'left out'})")
    print(f"Merged {len(result.ingredients)} checkpoint(s) ({args.method}): {', '.join(result.ingredients)} -> {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
