#!/usr/bin/env python
"""Build embedded:tiny-internvl3_5-pretrained: the tiny model trained in full on SynthDocs domain A (seeded).

    python scripts/build_pretrained.py                       # train (preset demo-pretrain), score, install
    python scripts/build_pretrained.py --run-dir RUN         # install a finished demo-pretrain run instead
    python scripts/build_pretrained.py --check               # train again into a scratch folder and compare scores

It trains `python scripts/train.py --preset demo-pretrain` (the demo recipe on embedded:synthdocs-a), scores the
result on the held-out test splits of domain A and domain B (colours it never saw), and copies the checkpoint files
into the package (colintern/embedded/tiny-internvl3_5-pretrained/, ~4.5 MB) with colintern_pretrained.json recording
the command, the run configuration and both scores. The package ships the result so that `make demo` need not spend
its CPU minutes on it; --check (and tests/model/test_pretrained.py) shows a rebuild reaches the same scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from colintern.cli import run

logger = logging.getLogger("build_pretrained")
SCORE_TOLERANCE = 0.03  # NDCG@5 a rebuild may differ by (other CPUs, BLAS builds, thread counts)


def held_out_scores(model_dir: str | Path, results_dir: str | Path) -> dict[str, float]:
    """NDCG@5 on the test split of each SynthDocs domain."""
    from colintern.data.synthdocs import DOMAIN_DATASETS
    from colintern.evaluation import evaluate

    scores = {}
    for alias, domain in DOMAIN_DATASETS.items():
        summary = evaluate(str(model_dir), [alias], output_dir=Path(results_dir) / f"domain-{domain}", batch_size=64,
                           model_name=f"colintern/tiny-internvl3_5-pretrained-{domain}", show_progress=False)
        scores[f"domain_{domain}_ndcg_at_5"] = round(summary.score("SynthDocsRetrieval", "ndcg_at_5"), 4)
    return scores


def train_losses(run_dir: str | Path) -> dict[str, float]:
    """{step: training loss} as the run logged it (a rebuild's first steps are compared with these)."""
    state = json.loads((Path(run_dir) / "trainer_state.json").read_text())
    return {str(e["step"]): e["loss"] for e in state.get("log_history", []) if "loss" in e}


def train_pretrained(output_dir: str | Path, max_steps: int | None = None) -> Path:
    from colintern.training.arguments import RunConfig, apply_overrides, load_yaml_config, preset_path
    from colintern.training.trainer import train

    config = RunConfig()
    apply_overrides(config, load_yaml_config(preset_path("demo-pretrain")), "preset demo-pretrain")
    config.preset = "demo-pretrain"
    config.training.output_dir = str(output_dir)
    if max_steps:
        config.training.max_steps = max_steps
    return train(config).output_dir


def main(args: argparse.Namespace) -> int:
    from colintern.hub import set_offline_mode
    from colintern.model.embedded import PRETRAINED_DIR, PRETRAINED_MANIFEST, install_pretrained
    from colintern.utils import read_run_config

    set_offline_mode()
    if args.check:
        shipped = json.loads((PRETRAINED_DIR / PRETRAINED_MANIFEST).read_text())["held_out"]
        with tempfile.TemporaryDirectory(prefix="colintern-pretrain-check-") as scratch:
            run_dir = train_pretrained(Path(scratch) / "run")
            rebuilt = held_out_scores(run_dir, Path(scratch) / "results")
        print(json.dumps({"shipped": shipped, "rebuilt": rebuilt}, indent=2))
        worst = max(abs(shipped[key] - rebuilt[key]) for key in shipped)
        return 0 if worst <= SCORE_TOLERANCE else 1
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        from colintern.utils import ColinternError

        raise ColinternError(f"--output {output} exists; pass --overwrite to replace the pretrained checkpoint.")
    run_dir = Path(args.run_dir) if args.run_dir else train_pretrained("experiments/runs/demo-pretrain")
    scores = held_out_scores(run_dir, run_dir / "held-out-results")
    run_config = read_run_config(run_dir) or {}
    run_config.pop("runtime", None)
    manifest = {
        "name": "tiny-internvl3_5-pretrained",
        "made_by": "python scripts/train.py --preset demo-pretrain  (then scripts/build_pretrained.py --run-dir RUN)",
        "base": "embedded:tiny-internvl3_5",
        "trained_on": "embedded:synthdocs-a (no purple or brown band or logo)",
        "held_out": scores,
        "train_loss": train_losses(run_dir),
        "run_config": run_config,
    }
    install_pretrained(run_dir, output, manifest)
    print(json.dumps(scores, indent=2))
    logger.info("Installed %s", output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from colintern.model.embedded import PRETRAINED_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="a finished `train.py --preset demo-pretrain` run (default: train one)")
    parser.add_argument("--output", default=str(PRETRAINED_DIR), help="where to install (default: the package's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an installed pretrained checkpoint")
    parser.add_argument("--check", action="store_true", help="rebuild in a scratch folder and compare the scores")
    return parser


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
