#!/usr/bin/env python
"""Ablations: vary one hyperparameter at a time around a baseline; train, evaluate and log every variant.

    python scripts/ablate.py --base demo --vary lr=3e-4,1e-3,3e-3 --max-steps 150
    python scripts/ablate.py --base experiments/configs/colintern3_5-1b.yaml --vary lr=1e-5,2e-5,5e-5
    python scripts/ablate.py --base demo --vary batch=8,16,32 --scale-lr sqrt     # keep lr in step with the batch
    python scripts/ablate.py --base demo --vary lr=5e-4,1e-3 --vary rank=8,16 --grid   # full grid instead

--base is a preset name or a YAML/JSON config (which may use `base:`); every flag of scripts/train.py applies to all
variants (e.g. --max-steps, --peft). Names for --vary: lr, lr_head, batch, grad_accum, warmup, epochs, steps, wd,
loss, temperature, rank (alpha follows), alpha, dropout, tokens, or any section.field.

Each variant trains in its own process and appends one JSON line to --log (default experiments/log.jsonl): final
train and eval loss, NDCG@5 per task, stability flags (NaN, spikes, oscillation, ... from the training diagnosis),
wall time, peak memory, checkpoint path. A crashed or NaN variant is logged as such and the sweep goes on. A re-run
skips the variants already finished. The Markdown table (default experiments/<name>.md) is rebuilt after each.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from colintern.cli import run

logger = logging.getLogger("ablate")


def build_parser() -> argparse.ArgumentParser:
    from colintern.training.arguments import add_config_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("ablation")
    group.add_argument("--base", required=True, help="baseline: a preset name or a config file")
    group.add_argument("--vary", action="append", required=True, metavar="NAME=V1,V2,...", help="values to try")
    group.add_argument("--scale-lr", choices=["linear", "sqrt"], help="scale lr with the effective batch")
    group.add_argument("--grid", action="store_true", help="all combinations instead of one factor at a time")
    group.add_argument("--name", help="experiment name (default: the base's experiment.name, else the varied names)")
    group.add_argument("--benchmarks", nargs="+", default=["SynthDocsRetrieval"], help="evaluation tasks")
    group.add_argument("--log", default="experiments/log.jsonl", help="experiment log (JSON lines)")
    group.add_argument("--table", help="Markdown table (default: next to the log, <name>.md)")
    group.add_argument("--output-root", default="experiments/runs/ablations", help="where variants train")
    add_config_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    from colintern.training.arguments import config_from_args
    from colintern.tuning.ablations import ablation_table, parse_vary, plan_ablation, read_log, run_ablation
    from colintern.hub import prefer_offline_when_unreachable

    base_path = Path(args.base)
    if base_path.suffix in (".yaml", ".yml", ".json") or base_path.is_file():
        args.config, args.preset = args.base, args.preset
    else:
        args.preset = args.base
    base = config_from_args(args)
    vary = parse_vary(args.vary)
    name = args.name or base.experiment.name or "-".join(k.split(".")[-1] for k in vary)
    plan = plan_ablation(base, vary, name=name, output_root=args.output_root, scale_lr=args.scale_lr, grid=args.grid,
                         benchmarks=args.benchmarks)
    logger.info("Ablation %s: %d variant(s): %s", plan.name, len(plan.variants), ", ".join(v.name for v in plan.variants))
    prefer_offline_when_unreachable()
    run_ablation(plan, args.log, args.table)
    print(ablation_table(plan.name, read_log(args.log)))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
