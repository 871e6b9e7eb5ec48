#!/usr/bin/env python
"""Compare models on their mteb evaluation results and against the published ViDoRe retrievers.

    python scripts/compare_models.py experiments/demo colpali-v1.3
    python scripts/compare_models.py results/mteb_evaluation colqwen2.5-v0.2 --metric recall@100 --plot cmp.png
    python scripts/compare_models.py my-model colpali-v1.3 --markdown model_card_table.md

Each argument is one of:
  * a folder with mteb result files at any depth (an mteb cache root such as results/mteb_evaluation, a
    results/<model>/<revision> folder, a training run such as experiments/demo); one column per model found;
  * a model evaluated under --evaluation-root (results/mteb_evaluation): `org/model` or just `model`;
  * a reference model from results/leaderboard/ (`vidore/colpali-v1.3` or `colpali-v1.3`; prefix `leaderboard:`
    to skip your own evaluations of the same name).

Prints a table (task rows, model columns; NDCG@5 by default), the average per benchmark with the number of tasks it
covers, each model's rank among the reference models, and the deltas to the baseline (the first argument unless
--baseline). Tasks a model was not evaluated on are shown as missing, never as zero. For runs evaluated by colintern
(which keeps each query's NDCG@5/@10 in per_query/ beside mteb's files): 95% bootstrap intervals per task and for the
benchmark mean, and a paired bootstrap of each run against the baseline ("A beats B on ViDoRe(v1): +1.30, 95% CI
[0.40, 2.20]").
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from colintern.cli import run

logger = logging.getLogger("compare_models")


def main(args: argparse.Namespace) -> int:
    from colintern.reports.compare import compare_models
    from colintern.utils import atomic_write_text

    if args.bootstrap < 0:
        from colintern.utils import ColinternError

        raise ColinternError(f"--bootstrap must be 0 (no intervals) or a number of draws, got {args.bootstrap}")
    comparison = compare_models(
        args.models,
        metric=args.metric,
        baseline=args.baseline,
        benchmarks=args.benchmarks,
        evaluation_root=args.evaluation_root,
        leaderboard_dir=args.leaderboard_dir,
        draws=args.bootstrap,
        seed=args.seed,
    )
    print(comparison.to_text())
    if args.markdown == "-":
        print()
        print(comparison.to_markdown(), end="")
    elif args.markdown:
        atomic_write_text(args.markdown, comparison.to_markdown())
        logger.info("Markdown table: %s", args.markdown)
    if args.plot:
        logger.info("Plot: %s", comparison.plot(args.plot))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="MODEL", help="result folder, evaluated model or reference model")
    parser.add_argument("--metric", default="ndcg_at_5",
                        help="mteb metric: ndcg_at_5 (default), ndcg_at_10, recall_at_100, map_at_5, mrr_at_10, "
                             "main_score (each task's own main score); NDCG@10-style spellings work too")
    parser.add_argument("--baseline", help="the column the deltas are computed against: a label, model name or "
                                           "position (default: the first model)")
    parser.add_argument("--benchmarks", nargs="+", metavar="NAME",
                        help='only these groups, e.g. "ViDoRe(v1)" "ViDoRe(v2)" "Other tasks" (default: all)')
    parser.add_argument("--plot", type=Path, metavar="PNG", help="write a grouped bar chart per task")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown (for a model card); - prints")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="DRAWS",
                        help="bootstrap draws for the 95%% intervals and paired tests of runs with per-query scores "
                             "(our own evaluations keep them; 0: none; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    parser.add_argument("--evaluation-root", type=Path, default=Path("results/mteb_evaluation"),
                        help="where model names are looked up (default: results/mteb_evaluation)")
    parser.add_argument("--leaderboard-dir", type=Path,
                        help="reference scores folder (default: the project's results/leaderboard)")
    return parser


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
