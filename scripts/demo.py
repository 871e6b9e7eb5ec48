#!/usr/bin/env python
"""The whole loop on the embedded default, offline, on a CPU: build, evaluate untrained, train, evaluate, compare.

    python scripts/demo.py                       # what `make demo` runs; writes experiments/demo/
    python scripts/demo.py --retrain             # train again even if experiments/demo holds a finished run

Steps (each is also a command of its own, printed as it runs):
  1. build the tiny InternVL3.5-architecture checkpoint and SynthDocs        scripts/prepare_demo.py
  2. score the untrained model on the held-out SynthDocs test split (chance)  scripts/evaluate.py
  3. train the demo preset                                                    scripts/train.py --preset demo
  4. score the trained model                                                  scripts/evaluate.py
  5. compare with the published retrievers and diagnose the run               scripts/compare_models.py,
                                                                              scripts/training_report.py
A second run reuses what is already there (training and evaluation results), so it takes seconds.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from colintern.cli import run

logger = logging.getLogger("demo")


def step(title: str, command: str) -> None:
    logger.info("== %s", title)
    logger.info("   (by hand: %s)", command)


def main(args: argparse.Namespace) -> int:
    from colintern.training.arguments import RunConfig, apply_overrides, load_yaml_config, preset_path
    from colintern.data.synthdocs import ensure_synthdocs
    from colintern.model.embedded import EMBEDDED_MODEL, ensure_embedded_model
    from colintern.evaluation import evaluate
    from colintern.hub import set_offline_mode
    from colintern.reports.compare import compare_models
    from colintern.reports.results import OTHER_TASKS
    from colintern.reports.training import training_report
    from colintern.training.trainer import train

    set_offline_mode()  # the demo needs nothing from the Hub
    started = time.perf_counter()
    out = Path(args.output_dir)
    results_dir = out / "results"

    step("1/5 Embedded default: tiny checkpoint + SynthDocs", "python scripts/prepare_demo.py")
    ensure_embedded_model()
    ensure_synthdocs()

    step("2/5 Untrained model on the SynthDocs test split (chance level)",
         f"python scripts/evaluate.py --model-path {EMBEDDED_MODEL} --allow-untrained-head "
         f"--benchmarks SynthDocsRetrieval --output-dir {results_dir}")
    untrained = evaluate(EMBEDDED_MODEL, ["SynthDocsRetrieval"], output_dir=results_dir, allow_untrained_head=True,
                         batch_size=64, model_name="colintern/tiny-internvl3_5-untrained")

    step("3/5 Training the demo preset", f"python scripts/train.py --preset demo --output-dir {out}")
    config = RunConfig()
    apply_overrides(config, load_yaml_config(preset_path("demo")), "preset demo")
    config.preset = "demo"
    config.training.output_dir = str(out)
    if args.max_steps:
        config.training.max_steps = args.max_steps
    finished = (out / "train_results.json").is_file() and (out / "model.safetensors").is_file()
    if finished and not args.retrain:
        logger.info("   %s already holds a finished run; reusing it (--retrain to train again)", out)
    else:
        config.training.overwrite = True  # --retrain: the earlier demo run's checkpoints are set aside, not deleted
        train(config)

    step("4/5 Trained model on the SynthDocs test split",
         f"python scripts/evaluate.py --model-path {out} --benchmarks SynthDocsRetrieval --output-dir {results_dir}")
    trained = evaluate(str(out), ["SynthDocsRetrieval"], output_dir=results_dir, batch_size=64,
                       model_name="colintern/demo")

    step("5/5 Comparison and training diagnosis",
         f"python scripts/compare_models.py {out} colpali-v1.3 --benchmarks 'ViDoRe(v1)' 'Other tasks' "
         f"--plot {out}/comparison.png; "
         f"python scripts/training_report.py --model-path {out}")
    comparison = compare_models([str(out), "colpali-v1.3"], benchmarks=["ViDoRe(v1)", OTHER_TASKS],
                                baseline="colintern/tiny-internvl3_5-untrained")
    print(comparison.to_text())
    comparison.plot(out / "comparison.png")
    report = training_report(out)
    print(report.to_text())
    report.plot(out / "training_report.png")

    before = untrained.score("SynthDocsRetrieval", "ndcg_at_5")
    after = trained.score("SynthDocsRetrieval", "ndcg_at_5")
    n_pages = 288
    chance = sum(1 / math.log2(rank + 1) for rank in range(1, 6)) / n_pages  # one relevant page per query
    print()
    print("=" * 78)
    print(f"SynthDocs held-out test split ({n_pages} pages, unseen attribute combinations), NDCG@5:")
    print(f"  untrained tiny model : {before:.3f}   (chance: {chance:.3f})")
    print(f"  after training       : {after:.3f}")
    print(f"Run directory: {out}   plots: {out}/comparison.png, {out}/training_report.png")
    print(f"Demo wall time: {time.perf_counter() - started:.0f} s")
    print("=" * 78)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="experiments/demo", help="run directory (default experiments/demo)")
    parser.add_argument("--retrain", action="store_true", help="train again even if a finished run exists")
    parser.add_argument("--max-steps", type=int, help="override the demo preset's number of steps")
    return parser


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
