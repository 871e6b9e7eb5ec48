#!/usr/bin/env python
"""Build the embedded default offline: the tiny InternVL3.5-architecture checkpoint and the SynthDocs corpus.

    python scripts/prepare_demo.py --output-dir DIR

writes DIR/tiny-internvl3_5/ (a checkpoint in the Hub's InternVL layout, loadable with from_pretrained) and
DIR/synthdocs/ (train pairs in the vidore/colpali_train_set layout; validation and test splits as corpus / queries /
qrels). Without --output-dir they go to $COLINTERN_HOME (default ~/.cache/colintern), where the other scripts find
them through the aliases `embedded:tiny-internvl3_5` and `embedded:synthdocs`. DIR must be new or empty; --overwrite
(alias --force) writes into a non-empty one, replacing only the two folders an earlier prepare_demo wrote there.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace

from colintern.cli import run

logger = logging.getLogger("prepare_demo")


def main(args: argparse.Namespace) -> int:
    from colintern.data.synthdocs import ensure_synthdocs
    from colintern.model.embedded import build_tiny_checkpoint, ensure_embedded_model
    from colintern.data.synthdocs import SynthDocsConfig, read_manifest, write_synthdocs

    if args.output_dir is None and not args.force and args.seed == 0:
        model_dir, data_dir = ensure_embedded_model(), ensure_synthdocs()
    else:
        from colintern.utils import cache_dir, prepare_output_dir

        if args.output_dir:  # a folder of the user's: its other contents, and folders prepare_demo did not write, stay
            root = prepare_output_dir(args.output_dir, command="prepare_demo", overwrite=args.force,
                                      owned_names=["tiny-internvl3_5", "synthdocs"]).path
        else:
            root = cache_dir()
        model_dir = build_tiny_checkpoint(root / "tiny-internvl3_5")
        data_dir = write_synthdocs(root / "synthdocs", replace(SynthDocsConfig(), seed=args.seed))
    counts = read_manifest(data_dir)["counts"]
    logger.info("Model:    %s", model_dir)
    logger.info(
        "SynthDocs: %s (train %d pairs; test %d pages / %d queries; validation %d pages)",
        data_dir,
        counts["train"],
        counts["test"]["corpus"],
        counts["test"]["queries"],
        counts["validation"]["corpus"],
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", help="where to write both assets (default: $COLINTERN_HOME)")
    parser.add_argument("--seed", type=int, default=0, help="SynthDocs seed (default 0, the one the demo uses)")
    parser.add_argument("--overwrite", "--force", dest="force", action="store_true",
                        help="rebuild even if up-to-date assets exist; with --output-dir, write into a non-empty folder "
                             "(replacing only what prepare_demo wrote there)")
    return parser


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
