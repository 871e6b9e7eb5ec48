#!/usr/bin/env python
"""Retrieval quality against storage: NDCG@5/10 and bytes per page for a grid of compression settings.

    python scripts/compression_sweep.py --model experiments/demo --task SynthDocsRetrieval
    python scripts/compression_sweep.py --model RUN --task data/mydocs/eval --output-dir results/compression/mydocs
    python scripts/compression_sweep.py --model RUN --task SynthDocsRetrieval --settings none pool=2 "quant=binary,rescore=16"

The model encodes the task once; each setting (token pooling, dimension truncation, int8 or binary page vectors,
re-scoring of the top candidates: see docs/evaluation.md, "Compressed page vectors") is scored through mteb. The
output folder gets table.md, sweep.json and quality_vs_storage.png (with the Pareto fronts); it must not exist yet:
results are never overwritten.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from colintern.cli import limits, run

logger = logging.getLogger("compression_sweep")


def main(args: argparse.Namespace) -> int:
    from colintern.evaluation.compression_sweep import compression_sweep, default_output_dir

    output_dir = args.output_dir or default_output_dir(args.model, args.task, args.split)
    command = _command(args, output_dir)
    result = compression_sweep(
        args.model,
        args.task,
        output_dir,
        settings=args.settings,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        model_name=args.model_name,
        max_num_visual_tokens=args.max_num_visual_tokens,
        allow_untrained_head=args.allow_untrained_head,
        show_progress=not args.no_progress,
        command=command,
    )
    from colintern.evaluation.compression_sweep import format_table

    print(format_table(result))
    print(f"Results in {output_dir}")
    return 0


def _command(args: argparse.Namespace, output_dir) -> str:
    """The command that reproduces this sweep (from the parsed options, defaults left out)."""
    from colintern.evaluation.compression_sweep import DEFAULT_SETTINGS

    words = ["python", "scripts/compression_sweep.py", "--model", args.model, "--task", args.task]
    for option in ("split", "batch_size", "device", "dtype", "model_name", "max_num_visual_tokens"):
        value = getattr(args, option)
        if value is not None and not (option == "batch_size" and value == 16):
            words += [f"--{option.replace('_', '-')}", str(value)]
    if args.allow_untrained_head:
        words.append("--allow-untrained-head")
    words += ["--output-dir", str(output_dir)]
    if list(args.settings) != list(DEFAULT_SETTINGS):
        words += ["--settings", *args.settings]
    return " ".join(shlex.quote(word) for word in words)


def build_parser() -> argparse.ArgumentParser:
    from colintern.evaluation.compression_sweep import DEFAULT_SETTINGS
    from colintern.training.arguments import field_limits

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="adapter folder, checkpoint folder, Hub id or embedded: alias")
    parser.add_argument("--task", required=True,
                        help="one task: an mteb task name, SynthDocsRetrieval or a task folder (e.g. OUT/eval)")
    parser.add_argument("--split", help="the split to score (default: the task's first, e.g. test)")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), metavar="SPEC",
                        help="compression settings, e.g. pool=2 dim=64 quant=int8 \"quant=binary,rescore=16\" "
                        f"(default: a grid of {len(DEFAULT_SETTINGS)}); the float16 baseline is always scored")
    parser.add_argument("--output-dir", help="a new folder (default results/compression/<model>_<task>_<split>)")
    parser.add_argument("--batch-size", type=int, default=16, help="pages (and queries) per forward pass (default 16)",
                        **limits(ge=1))
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--model-name", help="model name in the outputs (default colintern/<folder>)")
    parser.add_argument("--max-num-visual-tokens", type=int, help="override the processor's visual tokens per page",
                        **field_limits("model.max_num_visual_tokens"))
    parser.add_argument("--allow-untrained-head", action="store_true",
                        help="sweep a model whose projection head is untrained (a chance-level baseline)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
