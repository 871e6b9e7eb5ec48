#!/usr/bin/env python
"""Hyperparameter advisor: a ColIntern3.5 LoRA training configuration that fits your GPU, with the reasoning.

    python scripts/hyperparameter_optimizer.py --model OpenGVLab/InternVL3_5-1B-HF
    python scripts/hyperparameter_optimizer.py --model OpenGVLab/InternVL3_5-4B-HF --vram-gb 24 --json
    python scripts/hyperparameter_optimizer.py --model path/to/checkpoint --output advisor.json
    python scripts/train.py --config-from advisor.json ...

From the model's config alone (no weights are loaded; the InternVL3.5 1B-14B configs ship with colintern, so their
Hub ids work offline) it prints the architecture, the estimated peak memory as a sum of named parts, and the block
OPTIMAL HYPERPARAMETERS: learning rate by model size (square-root scaled when the effective batch is not 64), the
largest per-device batch that fits with a 10% margin (gradient checkpointing when it lets a larger batch fit),
gradient accumulation to an effective batch of 64, LoRA rank by size (alpha = rank), 5 epochs, warmup from the
number of optimizer steps. Without a visible GPU it plans for 16 GB unless --vram-gb says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from colintern.cli import limits, run

logger = logging.getLogger("hyperparameter_optimizer")


def main(args: argparse.Namespace) -> int:
    from colintern.tuning.advisor import format_recommendation, recommend
    from colintern.utils import atomic_write_json

    recommendation = recommend(
        args.model,
        vram_gib=args.vram_gb,
        num_gpus=args.num_gpus,
        dataset_size=args.dataset_size,
        max_num_visual_tokens=args.max_num_visual_tokens,
        query_tokens=args.query_tokens,
        dtype=args.precision,
        gradient_checkpointing={"auto": None, "on": True, "off": False}[args.gradient_checkpointing],
        lora_dropout=args.lora_dropout,
        epochs=args.epochs,
        quantize=args.quantize,
    )
    for note in recommendation.notes:
        logger.warning(note)
    payload = recommendation.to_json()
    if args.output:
        atomic_write_json(args.output, payload)
        logger.info("Wrote %s (use it with: python scripts/train.py --config-from %s)", args.output, args.output)
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(format_recommendation(recommendation))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from colintern.model.architecture import INTERNVL3_5_1B
    from colintern.training.arguments import field_limits
    from colintern.tuning.advisor import COLPALI_TRAIN_SET_PAIRS, DEFAULT_EPOCHS, DEFAULT_QUERY_TOKENS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=INTERNVL3_5_1B,
        help="Hub id, shipped preset (InternVL3_5-1B ... -14B), local checkpoint or embedded:tiny-internvl3_5 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--vram-gb",
        type=float,
        default=None,
        help="GPU memory per device in GiB, as torch/nvidia-smi report it (e.g. 80 for an H100 80GB); "
        "default: the visible GPU, or 16 without one",
        **limits(gt=0),
    )
    parser.add_argument("--num-gpus", type=int, default=None, help="data-parallel GPUs (default: the visible ones)",
                        **limits(ge=1))
    parser.add_argument(
        "--dataset-size",
        type=int,
        default=COLPALI_TRAIN_SET_PAIRS,
        help="training pairs (default: %(default)s, vidore/colpali_train_set's train split)",
        **limits(ge=1),
    )
    parser.add_argument(
        "--max-num-visual-tokens",
        type=int,
        default=None,
        help="image tokens per page budget (default: 1536 = 6 tiles for 448px models, one tile for smaller ones)",
        **field_limits("model.max_num_visual_tokens"),
    )
    parser.add_argument(
        "--query-tokens", type=int, default=DEFAULT_QUERY_TOKENS, help="padded query length (default %(default)s)",
        **limits(ge=1),
    )
    parser.add_argument(
        "--precision",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="weights and activations; 16-bit runs under autocast as transformers' Trainer does (default %(default)s)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: on exactly when it lets a larger per-device batch fit (default)",
    )
    parser.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout (default %(default)s)",
                        **field_limits("lora.dropout"))
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs (default %(default)s)",
                        **limits(ge=1))
    parser.add_argument(
        "--quantize", choices=("4bit", "8bit"), default=None,
        help="plan for QLoRA (train.py --quantize): the language model's linears stored in 4 or 8 bits",
    )
    parser.add_argument("--json", action="store_true", help="print the configuration as JSON instead of the report")
    parser.add_argument("--output", help="also save the JSON to this file (for scripts/train.py --config-from)")
    return parser


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
