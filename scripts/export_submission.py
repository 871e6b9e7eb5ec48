#!/usr/bin/env python
"""Write a leaderboard submission bundle from evaluation results, and check it with mteb's own loader.

    python scripts/export_submission.py results/mteb_evaluation --name my-org/colintern3_5-1b
    python scripts/export_submission.py experiments/demo --name me/demo --include-local-tasks --output-dir /tmp/b

RUN_OR_RESULTS is any folder with one model's mteb result files (a run folder, an mteb cache root, a
results/<model>/<revision> folder). The bundle (default: submission/<org__model>) holds the results repository's
layout, results/<org__model>/<revision>/<Task>.json + model_meta.json, an mteb ModelMeta + loader module for the
model pull request (mteb_model/), submission.json and SUBMISSION.md (which pull request gets what, and the private
ViDoRe(v3) tasks only the maintainers can run). The results are loaded back with mteb's ResultCache and the
benchmark means compared with the evaluation's before anything is installed. An existing non-empty folder is refused
unless it is an earlier bundle of the same --name.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from colintern.cli import run

logger = logging.getLogger("export_submission")


def main(args: argparse.Namespace) -> int:
    from colintern.reports.submission import export_submission

    output_dir = args.output_dir or Path("submission") / args.name.replace("/", "__")
    bundle = export_submission(args.results, args.name, output_dir, revision=args.revision,
                               include_local_tasks=args.include_local_tasks)
    print(f"Bundle for {bundle.name} (revision {bundle.revision}) in {bundle.folder}: {len(bundle.tasks)} tasks, "
          "checked with mteb's ResultCache")
    for benchmark, entry in bundle.means.items():
        print(f"  {benchmark}: {100 * entry['mean']:.2f} ({entry['n_tasks']}/{entry['of']} tasks)")
    if bundle.private_tasks:
        print(f"  private tasks the maintainers must run: {', '.join(bundle.private_tasks)}")
    if bundle.local_tasks:
        print(f"  dry run: local tasks included ({', '.join(bundle.local_tasks)}); the leaderboard cannot take them")
    print(f"Next steps: {bundle.folder / 'SUBMISSION.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, metavar="RUN_OR_RESULTS", help="folder with one model's mteb results")
    parser.add_argument("--name", required=True, help="the published Hugging Face id, org/model")
    parser.add_argument("--revision", help="the model's Hub commit (default: the revision the results were made at)")
    parser.add_argument("--output-dir", type=Path, help="bundle folder (default: submission/<org__model>)")
    parser.add_argument("--include-local-tasks", action="store_true",
                        help="also export tasks mteb does not know (SynthDocs, own folders): a dry run of the bundle")
    return parser


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
