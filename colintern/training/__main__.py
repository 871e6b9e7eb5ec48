"""Fine-tune ColIntern3.5 (InternVL3.5 + a 128-dim multi-vector head) for visual document retrieval.
(`python scripts/train.py` and `python -m colintern.training` are this command.)

    python scripts/train.py --peft --lr 5e-5                       # the seed recipe (GPU, Hub or local weights)
    python scripts/train.py --preset demo                          # the embedded default, CPU, ~2 minutes
    python scripts/train.py --preset demo --peft --max-steps 20 --output-dir D
    python scripts/train.py --config experiments/configs/my_run.yaml --lr 3e-5
    python scripts/train.py --config-from advisor.json             # hyperparameters from hyperparameter_optimizer.py
    python scripts/train.py --output-dir D --resume latest         # continue an interrupted run
    torchrun --nproc_per_node=4 scripts/train.py --peft            # multi-GPU (DDP; in-batch negatives from all GPUs)
    accelerate launch --num_processes 4 scripts/train.py --peft

The run directory gets the resolved configuration (colintern_run.json), a data report, checkpoint-*/ folders
(adapter or model, optimizer, scheduler, RNG state, trainer_state.json, and last colintern_checkpoint.json, which
marks it complete), and at the end the final adapter (or model) and processor at its top. Ctrl-C or SIGTERM saves a
checkpoint before stopping.
"""

from __future__ import annotations

import argparse
import logging
import sys

from colintern.cli import run

logger = logging.getLogger("train")


def build_parser() -> argparse.ArgumentParser:
    from colintern.training.arguments import config_parser

    parser = config_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    return parser


def main(args: argparse.Namespace) -> int:
    import json

    from colintern.training.arguments import config_from_args
    from colintern.hub import prefer_offline_when_unreachable

    config = config_from_args(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    prefer_offline_when_unreachable()

    from colintern.training.trainer import train

    logger.info("Preset %s: model %s, data %s -> %s", config.preset, config.model.name_or_path, config.data.dataset,
                config.training.output_dir)
    result = train(config)
    if result.interrupted:
        return 130
    logger.info("Done: %d steps in %.0f s; adapter/model and processor in %s", result.global_step,
                result.metrics.get("train_wall_seconds", 0), result.output_dir)
    return 0


def cli(argv=None) -> int:
    return run(main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
