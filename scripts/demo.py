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
Then the recipe users run, LoRA on a pretrained backbone (vision frozen), at the advisor's settings:
  6. the advisor's recommendation for the pretrained tiny backbone            scripts/hyperparameter_optimizer.py
  7. the backbone (trained on SynthDocs domain A) on domain B's test split    scripts/evaluate.py
  8. LoRA on domain B (preset demo-lora), and full fine-tuning of the same    scripts/train.py --preset demo-lora
     backbone for the same steps; both scored on domain B's test split
A second run reuses what is already there (training and evaluation results), so it takes seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
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
        if train(config).interrupted:  # Ctrl-C / SIGTERM: the trainer saved a checkpoint; stop here, not in step 4
            logger.warning("Training was stopped; the demo stops too. Run it again to start the stage over.")
            return 130

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

    lora_stage = lora_demo(out, args.retrain) if not args.skip_lora else None

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
    if lora_stage:
        print(lora_stage)
    print(f"Demo wall time: {time.perf_counter() - started:.0f} s")
    print("=" * 78)
    return 0


LORA_STEPS = ("lora", "full")  # the LoRA stage's two runs: the recipe, and full fine-tuning for the same steps


def _train_stage(run_dir: Path, advisor_json: Path, extra: list[str], retrain: bool) -> dict:
    """One training run of the LoRA stage, in its own process (so its peak memory is its own); its train metrics."""
    results = run_dir / "train_results.json"
    if results.is_file() and not retrain:
        logger.info("   %s already holds a finished run; reusing it (--retrain to train again)", run_dir)
    else:
        command = [sys.executable, str(Path(__file__).resolve().parent / "train.py"), "--preset", "demo-lora",
                   "--config-from", str(advisor_json), "--output-dir", str(run_dir), "--overwrite", *extra]
        # --overwrite: the stage folder is the demo's own; an earlier (or interrupted) try is set aside, not deleted
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return json.loads(results.read_text())


def lora_demo(out: Path, retrain: bool) -> str:
    """Steps 6-8: the advisor, the pretrained backbone on domain B, LoRA and full fine-tuning; returns the summary."""
    from colintern.data.synthdocs import SynthDocsConfig, ensure_synthdocs
    from colintern.evaluation import evaluate
    from colintern.model.embedded import PRETRAINED_MODEL
    from colintern.training.arguments import load_yaml_config, preset_path
    from colintern.tuning.advisor import recommend
    from colintern.utils import atomic_write_json

    stage = out / "lora-stage"
    domain_b = "embedded:synthdocs-b"
    preset = load_yaml_config(preset_path("demo-lora"))
    n_train = SynthDocsConfig(domain="b").n_train
    epochs = int(preset["training"]["num_train_epochs"])
    step("6/8 The advisor's settings for the pretrained backbone",
         f"python scripts/hyperparameter_optimizer.py --model {PRETRAINED_MODEL} --dataset-size {n_train} "
         f"--epochs {epochs} --output {stage}/advisor.json")
    advisor = recommend(PRETRAINED_MODEL, dataset_size=n_train, epochs=epochs)
    advisor_json = stage / "advisor.json"
    atomic_write_json(advisor_json, advisor.to_json())
    logger.info("   lr %g, LoRA rank %d (alpha %d), batch %d x %d, warm-up %d of %d steps", advisor.learning_rate,
                advisor.lora_rank, advisor.lora_alpha, advisor.per_device_train_batch_size,
                advisor.gradient_accumulation_steps, advisor.warmup_steps, advisor.total_steps)

    step("7/8 The backbone (trained on domain A) on domain B's test split",
         f"python scripts/evaluate.py --model-path {PRETRAINED_MODEL} --benchmarks {domain_b} "
         f"--output-dir {stage}/results-backbone")
    ensure_synthdocs(domain="b")
    scores = {"backbone": evaluate(PRETRAINED_MODEL, [domain_b], output_dir=stage / "results-backbone", batch_size=64,
                                   model_name="colintern/tiny-internvl3_5-pretrained")}
    # full fine-tuning: every weight (vision included), at the full-training learning rate measured for this model
    # (results/ablations/demo-lr.md), same batch, steps and warm-up as the LoRA run
    full_lr = load_yaml_config(preset_path("demo"))["training"]["learning_rate"]
    runs = {"lora": [], "full": ["--no-peft", "--train-vision", "--lr", str(full_lr)]}
    step("8/8 LoRA on domain B at the advisor's settings; full fine-tuning for the same steps",
         f"python scripts/train.py --preset demo-lora --config-from {advisor_json} --output-dir {stage}/lora; "
         f"python scripts/train.py --preset demo-lora --config-from {advisor_json} --output-dir {stage}/full "
         f"{' '.join(runs['full'])}")
    metrics = {}
    for name, extra in runs.items():
        metrics[name] = _train_stage(stage / name, advisor_json, extra, retrain)
        scores[name] = evaluate(str(stage / name), [domain_b], output_dir=stage / f"results-{name}", batch_size=64,
                                model_name=f"colintern/demo-{name}")
    ndcg = {name: summary.score("SynthDocsRetrieval", "ndcg_at_5") for name, summary in scores.items()}
    total = metrics["full"]["total_parameters"]
    lines = [
        "",
        (f"LoRA stage: SynthDocs domain B test split (purple/brown bands and logos, never seen by the backbone), "
         f"NDCG@5 after {advisor.total_steps} steps of batch {advisor.effective_batch_size}:"),
        f"  {'':34} {'NDCG@5':>7} {'trainable params':>22} {'peak memory':>12}",
        f"  {'backbone before LoRA':34} {ndcg['backbone']:7.3f} {'-':>22} {'-':>12}",
    ]
    labels = {"lora": f"LoRA r={advisor.lora_rank}, lr {advisor.learning_rate:g} (advisor)",
              "full": f"full fine-tuning, lr {full_lr:g}"}
    for name in runs:
        trainable = metrics[name]["trainable_parameters"]
        lines.append(f"  {labels[name]:34} {ndcg[name]:7.3f} {f'{trainable:,} ({100 * trainable / total:.1f}%)':>22} "
                     f"{metrics[name]['peak_memory_gb']:>9.2f} GB")
    lift, ratio = ndcg["lora"] - ndcg["backbone"], ndcg["lora"] / max(ndcg["full"], 1e-9)
    lines.append(f"  LoRA lifts the backbone by {lift:+.3f} and reaches {100 * ratio:.0f}% of full fine-tuning "
                 f"(peak memory: the process's peak resident set on a CPU, GPU memory on CUDA).")
    atomic_write_json(stage / "summary.json", {"ndcg_at_5": ndcg, "train_metrics": metrics,
                                               "advisor": advisor.to_json()})
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="experiments/demo", help="run directory (default experiments/demo)")
    parser.add_argument("--retrain", action="store_true", help="train again even if a finished run exists")
    parser.add_argument("--max-steps", type=int, help="override the demo preset's number of steps")
    parser.add_argument("--skip-lora", action="store_true", help="only the first stage (steps 1-5)")
    return parser


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
