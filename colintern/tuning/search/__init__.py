"""Hyperparameter search with Optuna over the trainer: a YAML search space, seeded TPE, pruning on the evaluations,
a memory constraint from the advisor, and a study that survives interruption and killed workers.

    from colintern.tuning.search import SearchSettings, SearchSpace, run_search

    space = SearchSpace.from_yaml("experiments/configs/optuna_search_space_demo.yaml")
    settings = SearchSettings(output_dir="experiments/optuna/demo", study_name="demo", n_trials=4)
    result = run_search(base_config, space, settings)   # base_config: a colintern.training.arguments.RunConfig
    result.best_params_path                              # optuna_best_params.json (scripts/train.py --config-from)

One trial: the sampler draws the searched fields, they are applied to a copy of the base configuration, the memory
model predicts the trial's peak GPU memory and a configuration over the budget is rejected before it trains (pruned,
with an Optuna constraint so that TPE learns where the infeasible region is). Otherwise the run trains in this process
through `colintern.training.trainer.build_trainer` (no checkpoints), reports the objective at every evaluation to the
pruner, and is scored on the final model. A NaN loss or any other error fails that trial and the study goes on; a
configuration error (the same for every trial) stops the study.

The study lives in a storage (SQLite in the output folder by default; a journal file or a database URL lets several
workers share it). `n_trials` is the study's total, so re-running the same command finishes an interrupted study and a
larger `n_trials` extends it; the time budget likewise counts the time already spent by the study's trials. The trial
of a worker that was killed runs again once (see `storage`); a study whose trials all failed raises ColinternError.

Modules, each importing only those before it: `settings` (objectives, `SearchSettings`), `space` (the YAML search
space, a trial's configuration), `memory` (the memory constraint), `storage` (SQLite, journal file or URL; trial
accounting), `runner` (one trial), `outputs` (best parameters, CSV, plots, summary), `study` (sampler, pruner,
`run_search`).
"""

from colintern.tuning.search.memory import MEMORY_CONSTRAINT, MemoryCheck, bound_batch_size, check_memory
from colintern.tuning.search.outputs import (
    BEST_PARAMS_FILE,
    TRIALS_CSV,
    SearchResult,
    best_params_record,
    best_trials,
    format_summary,
    write_outputs,
)
from colintern.tuning.search.runner import (
    TRIAL_RECORD_FILE,
    OptunaReporter,
    TrialFailed,
    quiet_trial_failure_tracebacks,
)
from colintern.tuning.search.settings import OBJECTIVES, PRUNERS, SearchSettings, parse_objectives
from colintern.tuning.search.space import ParameterSpec, SearchSpace, default_search_space_path, trial_config
from colintern.tuning.search.storage import (
    DEFAULT_STORAGE_FILE,
    counted_trials,
    fail_stale_trials,
    open_storage,
    recover_dead_trials,
    spent_seconds,
)
from colintern.tuning.search.study import TrialSeededSampler, build_pruner, build_sampler, open_study, run_search

__all__ = [
    "BEST_PARAMS_FILE",
    "DEFAULT_STORAGE_FILE",
    "MEMORY_CONSTRAINT",
    "OBJECTIVES",
    "PRUNERS",
    "TRIALS_CSV",
    "TRIAL_RECORD_FILE",
    "MemoryCheck",
    "OptunaReporter",
    "ParameterSpec",
    "SearchResult",
    "SearchSettings",
    "SearchSpace",
    "TrialFailed",
    "TrialSeededSampler",
    "best_params_record",
    "best_trials",
    "bound_batch_size",
    "build_pruner",
    "build_sampler",
    "check_memory",
    "counted_trials",
    "default_search_space_path",
    "fail_stale_trials",
    "format_summary",
    "open_storage",
    "open_study",
    "parse_objectives",
    "quiet_trial_failure_tracebacks",
    "recover_dead_trials",
    "run_search",
    "spent_seconds",
    "trial_config",
    "write_outputs",
]
