#!/usr/bin/env python
"""Optuna hyperparameter search for ColIntern3.5 training: TPE over a YAML search space, pruning on the evaluations,
a GPU-memory constraint from the advisor, and a study that resumes where it stopped.

    python scripts/optuna_optimizer.py --preset demo --trials 4                    # CPU, the embedded demo
    python scripts/optuna_optimizer.py --preset demo --trials 8 --max-steps 160    # shorter trials
    python scripts/optuna_optimizer.py --peft --trials 30 --vram-gb 80 --pruner hyperband
    python scripts/optuna_optimizer.py --preset demo --objective ndcg,memory       # Pareto front
    python scripts/optuna_optimizer.py --preset demo --trials 50 --time-budget-hours 2
    python scripts/optuna_optimizer.py --preset demo --storage study.journal       # several workers: run it N times
    python scripts/train.py --preset demo --config-from experiments/optuna/demo-ndcg/optuna_best_params.json

The base configuration comes from --preset/--config and every training flag (as in scripts/train.py); each trial
overrides the fields named in the search space (--search-space; default experiments/configs/
optuna_search_space_<preset>.yaml if it exists, else optuna_search_space.yaml). Batch sizes the advisor says cannot
fit --vram-gb are dropped from the space, and a trial whose whole configuration would not fit is rejected before it
trains. Objectives: ndcg (NDCG@5 on the validation split, the default), eval_loss, and for a multi-objective study
memory (peak GiB) and time (training seconds), e.g. --objective ndcg,memory.

--trials N is the study's total: re-running the same command resumes an interrupted study (finished trials are kept
and numbering continues; the trial of a killed worker runs again once), a larger N extends it. If every trial
fails, the script exits 2 naming the first failure and its log. The study is stored in --output-dir/optuna.db
unless --storage names a database URL (sqlite:///..., postgresql://...) or a journal file (any other path; safe for
several workers).
Outputs in --output-dir (default experiments/optuna/<study-name>): optuna_best_params.json (for scripts/train.py
--config-from), trials.csv, optimization_history.png, param_importances.png, intermediate_values.png (or
pareto_front.png), trials/trial-NNNN/ with each trial's configuration, trainer_state.json and trial.json, and
logs/trial-NNNN.log (the trial's log, with the traceback of a failure).
--seed seeds both the training runs and the sampler.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from colintern.cli import limits, run

logger = logging.getLogger("optuna_optimizer")


def build_parser() -> argparse.ArgumentParser:
    from colintern.training.arguments import add_config_arguments
    from colintern.tuning.search import OBJECTIVES, PRUNERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("search")
    group.add_argument("--trials", type=int, default=20, help="finished trials the study should have in total "
                       "(default %(default)s)", **limits(ge=1))
    group.add_argument("--search-space", help="YAML search space (default: by preset, see above)")
    group.add_argument("--objective", default="ndcg", help=f"{', '.join(OBJECTIVES)}; comma-separated for a "
                       "multi-objective (Pareto) study, e.g. ndcg,memory (default %(default)s)")
    group.add_argument("--pruner", choices=PRUNERS, default="median", help="prune on the evaluations "
                       "(default %(default)s)")
    group.add_argument("--pruner-startup-trials", type=int, default=2,
                       help="median pruner: finished trials before it prunes (default %(default)s)", **limits(ge=0))
    group.add_argument("--pruner-warmup-steps", type=int, default=0,
                       help="median pruner: never prune before this training step (default %(default)s)",
                       **limits(ge=0))
    group.add_argument("--startup-trials", type=int, default=10,
                       help="random trials before TPE models the results (default %(default)s)", **limits(ge=0))
    group.add_argument("--storage", help="database URL, .db file, or journal file (default: <output-dir>/optuna.db)")
    group.add_argument("--study-name", help="name in the storage (default: <preset>-<objectives>)")
    group.add_argument("--time-budget-hours", type=float, help="stop starting trials once the study's trials have run "
                       "this long in total (earlier invocations count)", **limits(gt=0))
    group.add_argument("--vram-gb", type=float, help="GPU memory per device for the batch bound and the memory "
                       "constraint (default: the visible GPU, else 16)", **limits(gt=0))
    add_config_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    from colintern.training.arguments import config_from_args
    from colintern.tuning.search import SearchSettings, SearchSpace, default_search_space_path, format_summary, run_search
    from colintern.hub import prefer_offline_when_unreachable

    base = config_from_args(args)
    objectives = args.objective.replace(" ", "")
    name = args.study_name or f"{Path(base.preset or args.config or 'colintern').stem}-{objectives.replace(',', '-')}"
    output_dir = getattr(args, "output_dir", None) or str(Path("experiments") / "optuna" / name)
    space = SearchSpace.from_yaml(args.search_space or default_search_space_path(base.preset))
    settings = SearchSettings(
        output_dir=output_dir, study_name=name, storage=args.storage, objectives=objectives, pruner=args.pruner,
        n_trials=args.trials, time_budget_hours=args.time_budget_hours, vram_gib=args.vram_gb,
        seed=base.training.seed, startup_trials=args.startup_trials,
        pruner_startup_trials=args.pruner_startup_trials, pruner_warmup_steps=args.pruner_warmup_steps,
    )
    logger.info("Study %s: %d trials, objective %s, pruner %s, search space %s -> %s", name, settings.n_trials,
                objectives, settings.pruner, space.source, output_dir)
    route_optuna_logging()
    prefer_offline_when_unreachable()
    result = run_search(base, space, settings)
    print(format_summary(result, settings))
    return 0


def route_optuna_logging() -> None:
    """Optuna's messages through this script's log format instead of Optuna's own handler; failed trials in one line."""
    import optuna

    from colintern.tuning.search import quiet_trial_failure_tracebacks

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    quiet_trial_failure_tracebacks()


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
