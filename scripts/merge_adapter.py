#!/usr/bin/env python
"""Merge a trained PEFT adapter into its base model: a standalone ColIntern3.5 checkpoint that loads without peft.

    python scripts/merge_adapter.py --adapter experiments/runs/colintern3_5-1b --output-dir exports/colintern3_5-1b
    python scripts/merge_adapter.py --adapter D --output-dir OUT --results results/mteb_evaluation   # + eval table

The output holds model.safetensors, config.json, the processor and a model card (training configuration and, with
--results, the evaluation table). It gives the same embeddings as base + adapter (tested in a fresh process).
--output-dir must be a new (or empty) folder outside the adapter's; --overwrite writes into a non-empty one, replacing
only the files an earlier merge_adapter wrote there (listed in its .colintern-output), never anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from colintern.cli import run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter folder (a train.py --peft output or checkpoint)")
    parser.add_argument("--output-dir", required=True, help="where to write the merged checkpoint")
    parser.add_argument("--base-model", help="base model to merge into (default: the one in adapter_config.json)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the saved weights (default float32; bfloat16 halves the size)")
    parser.add_argument("--results", help="folder with mteb result files of this model, for the model card")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --output-dir, replacing only files an earlier merge wrote there")
    return parser


def main(args: argparse.Namespace) -> int:
    import torch

    from colintern.training.export import merge_adapter
    from colintern.hub import prefer_offline_when_unreachable

    prefer_offline_when_unreachable()
    results = None
    if args.results:
        from colintern.evaluation import model_results_dir, results_table  # noqa: PLC0415 - only with --results

        folder = Path(args.results)
        if (folder / "results").is_dir():  # an mteb results cache: this adapter's results in it
            folder = model_results_dir(args.adapter, folder)
        rows, _averages = results_table(folder)
        results = [row.as_dict() for row in rows]
    out = merge_adapter(args.adapter, args.output_dir, base_model=args.base_model, dtype=getattr(torch, args.dtype),
                        results=results, overwrite=args.overwrite)
    print(f"Merged checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
