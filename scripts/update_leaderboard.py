#!/usr/bin/env python
"""Rebuild the reference scores in results/leaderboard/ from the public mteb results repository.

    git clone --depth 1 https://github.com/embeddings-benchmark/results ~/src/mteb-results
    python scripts/update_leaderboard.py --results-repo ~/src/mteb-results
    python scripts/update_leaderboard.py --results-repo ~/snapshots/results.git   # a bare snapshot works too
    python scripts/update_leaderboard.py                                         # clones the models' folders

Reads the ViDoRe(v1), (v2), (v3) and (v3.1) results of the reference models (ColPali, ColQwen2/2.5, ColSmol,
ColNomic, jina-embeddings-v4 (multi-vector), the Nemotron ColEmbed family, and the 2026 leaders: Argus, Ops-Colqwen3,
Vultron Prime/Core/Flash, webAI-ColVec1.1, tomoro-colqwen3, EvoQwen2.5-VL; see --models) with mteb's own reader and
writes one JSON per model (every task's NDCG/Recall/MAP/MRR@k, the mteb version that computed it, the source path
and commit, language subsets a result lacks, the benchmark averages) plus results/leaderboard/README.md with each
model's rank per benchmark. A sparse checkout of just those models' folders is enough.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from colintern.cli import run

logger = logging.getLogger("update_leaderboard")


def main(args: argparse.Namespace) -> int:
    from colintern.reports.leaderboard import collect_reference_scores, leaderboard_markdown, write_reference_files

    records = collect_reference_scores(
        args.results_repo, models=args.models, benchmarks=args.benchmarks, repository=args.repository
    )
    written = write_reference_files(records, args.output_dir, inputs={"--results-repo": args.results_repo})
    logger.info("Wrote %d reference files to %s", len(written), args.output_dir)
    print(leaderboard_markdown(records), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from colintern.reports.leaderboard import REFERENCE_MODELS, RESULTS_REPOSITORY
    from colintern.reports.results import DEFAULT_LEADERBOARD_DIR, KNOWN_BENCHMARKS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-repo", type=Path,
                        help="local clone of embeddings-benchmark/results (the folder that holds results/) or a bare "
                             "git snapshot of it (read at HEAD); default: a shallow sparse clone of the models' "
                             "folders (needs the network)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_LEADERBOARD_DIR,
                        help="where to write the reference files (default: the project's results/leaderboard)")
    parser.add_argument("--models", nargs="+", default=list(REFERENCE_MODELS), metavar="ORG/MODEL",
                        help=f"models to include (default: the {len(REFERENCE_MODELS)} reference models)")
    parser.add_argument("--benchmarks", nargs="+", default=list(KNOWN_BENCHMARKS), metavar="NAME",
                        help=f"mteb benchmarks whose tasks are read (default: {' '.join(KNOWN_BENCHMARKS)})")
    parser.add_argument("--repository", default=RESULTS_REPOSITORY,
                        help="the repository URL recorded as the source (default: %(default)s)")
    return parser


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
