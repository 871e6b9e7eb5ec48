#!/usr/bin/env python
"""Diagnose a training run: loss per epoch, convergence, spikes, NaN, oscillation, learning-rate schedule, grad
norm and the train/eval gap, each finding with the change to make; plus a PNG of the curves.

    python scripts/training_report.py --model-path experiments/demo
    python scripts/training_report.py --model-path experiments/run1 --plot run1.png --json run1_report.json

Reads MODEL_PATH/trainer_state.json (written by the transformers Trainer; for an interrupted run the newest
checkpoint-*/trainer_state.json) and, when present, MODEL_PATH/colintern_run.json (the run's configuration: batch
size, accumulation, learning rate, loss). Exit status 0 for a healthy run or one that needs attention, 1 when the
run failed (NaN/inf), so scripts can gate on it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from colintern.cli import run

logger = logging.getLogger("training_report")


def main(args: argparse.Namespace) -> int:
    from colintern.reports.training import training_report
    from colintern.utils import atomic_write_json

    report = training_report(args.model_path)
    print(report.to_text())
    if not args.no_plot:
        plot_path = args.plot or report.run_dir / "training_report.png"
        logger.info("Plot: %s", report.plot(plot_path))
    if args.json:
        atomic_write_json(args.json, report.to_dict())
        logger.info("JSON: %s", args.json)
    return 1 if report.verdict == "failed" else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=Path, required=True,
                        help="the training run's output directory (or a trainer_state.json)")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="where to write the plot (default: MODEL_PATH/training_report.png)")
    parser.add_argument("--no-plot", action="store_true", help="print the diagnosis only")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the report (findings, epochs) as JSON")
    return parser


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
