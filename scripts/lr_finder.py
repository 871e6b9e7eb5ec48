#!/usr/bin/env python
"""Learning-rate range test: sweep the learning rate exponentially over a few hundred real training steps, plot the
loss against it (PNG) and suggest a value (fastai's valley rule; minimum / 10 and steepest descent are recorded too).

    python scripts/lr_finder.py --preset demo --output-dir experiments/lr_finder
    python scripts/lr_finder.py --peft --lr-min 1e-7 --lr-max 1e-2 --steps 300     # the real recipe (GPU)

Every training flag of scripts/train.py applies (model, data, LoRA, batch size...); the learning-rate schedule and
the number of steps are the finder's. Writes lr_finder.png and lr_finder.json in --output-dir; nothing else is saved.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from colintern.cli import limits, run

logger = logging.getLogger("lr_finder")


def build_parser() -> argparse.ArgumentParser:
    from colintern.training.arguments import add_config_arguments
    from colintern.training.lr_finder import MIN_POINTS, SKIP_START

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    finder = parser.add_argument_group("range test")
    finder.add_argument("--lr-min", type=float, default=1e-6, help="first learning rate (default 1e-6)", **limits(gt=0))
    finder.add_argument("--lr-max", type=float, default=1.0, help="last learning rate (default 1)", **limits(gt=0))
    finder.add_argument("--steps", type=int, default=200, help="optimizer steps of the sweep (default 200)",
                        **limits(ge=SKIP_START + MIN_POINTS))
    finder.add_argument("--divergence", type=float, default=4.0, help="stop when loss > this x its minimum",
                        **limits(gt=1))
    add_config_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    from colintern.training.arguments import config_from_args
    from colintern.hub import prefer_offline_when_unreachable
    from colintern.training.lr_finder import find_lr, plot_lr_finder
    from colintern.utils import atomic_write_json

    config = config_from_args(args)
    if getattr(args, "output_dir", None) is None:  # --output-dir (a TrainingArguments flag: absent unless given)
        config.training.output_dir = "experiments/lr_finder"
    prefer_offline_when_unreachable()
    out = Path(config.training.output_dir)
    result = find_lr(config, args.lr_min, args.lr_max, args.steps, args.divergence)
    plot = plot_lr_finder(result, out / "lr_finder.png", f"LR range test: {config.preset or config.model.name_or_path}")
    atomic_write_json(out / "lr_finder.json", result.to_dict())
    if result.suggestion is None:
        logger.warning("No clear suggestion: %s See %s", result.why_no_suggestion(), plot)
    else:
        print(f"Suggested learning rate: {result.suggestion:.2e}  ({result.rule}; valley {result.valley_lr:.2e}, "
              f"minimum of the loss at {result.min_loss_lr:.2e}, min/10 = {result.min_over_10:.2e}, "
              f"steepest descent {result.steepest_lr:.2e})")
    print(f"Plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
