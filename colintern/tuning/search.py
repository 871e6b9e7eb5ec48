"""Hyperparameter search with Optuna over the trainer: a YAML search space, seeded TPE, pruning on the evaluations,
a memory constraint from the advisor, and a study that survives interruption.

    from colintern.tuning.search import SearchSettings, SearchSpace, run_search

    space = SearchSpace.from_yaml("experiments/configs/optuna_search_space_demo.yaml")
    settings = SearchSettings(output_dir="experiments/optuna/demo", study_name="demo", n_trials=4)
    result = run_search(base_config, space, settings)   # base_config: a colintern.training.arguments.RunConfig
    result.best_params_path                              # optuna_best_params.json (scripts/train.py --config-from)

One trial: the sampler draws the searched fields, they are applied to a copy of the base configuration, the memory
model predicts the trial's peak GPU memory and a configuration over the budget is rejected before it trains (pruned,
with an Optuna constraint so that TPE learns where the infeasible region is). Otherwise the run trains in this process
through `colintern.training.trainer.build_trainer` (no checkpoints), reports the objective at every evaluation to the pruner,
and is scored on the final model. A NaN loss or any other error fails that trial and the study goes on; a configuration
error (the same for every trial) stops the study.

The study lives in a storage (SQLite in the output folder by default; a journal file or a database URL lets several
workers share it). `n_trials` is the study's total, so re-running the same command finishes an interrupted study and a
larger `n_trials` extends it; the time budget likewise counts the time already spent by the study's trials.
"""

from __future__ import annotations

import copy
import datetime as dt
import gc
import json
import logging
import math
import os
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from transformers import TrainerCallback

from colintern.training.arguments import ADVISOR_KEYS, RunConfig, apply_overrides
from colintern.utils import RUN_CONFIG_FILE, ColinternError, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

BEST_PARAMS_FILE = "optuna_best_params.json"
TRIALS_CSV = "trials.csv"
TRIAL_RECORD_FILE = "trial.json"
DEFAULT_STORAGE_FILE = "optuna.db"
PARAMETER_TYPES = ("float", "int", "categorical")
PRUNERS = ("median", "hyperband", "none")
MEMORY_CONSTRAINT = "peak_memory_over_budget_gib"
# Fields that change where or how a run is logged, not what it learns: ignored when a resumed study's base
# configuration is compared with the one it was created with.
BOOKKEEPING_FIELDS = {
    "training.output_dir", "training.run_name", "training.resume", "training.report_to", "training.logging_steps",
    "training.save_steps", "training.save_total_limit", "training.dataloader_num_workers",
}


# ------------------------------------------------------------------------------------------------ objectives
@dataclass(frozen=True)
class Objective:
    """One thing the study optimises: an evaluation metric of the final model or a cost of the trial."""

    name: str
    direction: str  # "maximize" or "minimize"
    metric: str | None  # the Trainer's evaluation metric, None for costs measured around training
    description: str


OBJECTIVES: dict[str, Objective] = {
    "ndcg": Objective("ndcg_at_5", "maximize", "eval_ndcg_at_5", "NDCG@5 on the validation split"),
    "eval_loss": Objective("eval_loss", "minimize", "eval_loss", "loss on the evaluation split"),
    "memory": Objective("peak_memory_gib", "minimize", None,
                        "peak memory per device in GiB (measured on CUDA, the memory model's estimate elsewhere)"),
    "time": Objective("train_seconds", "minimize", None, "training time of the trial in seconds"),
}
OBJECTIVE_ALIASES = {"ndcg_at_5": "ndcg", "loss": "eval_loss", "peak_memory": "memory", "train_time": "time"}


def parse_objectives(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """"ndcg" or "ndcg,memory" -> ("ndcg", "memory"); two or more make a multi-objective (Pareto) study."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out = []
    for name in names:
        name = OBJECTIVE_ALIASES.get(name, name)
        if name not in OBJECTIVES:
            raise ColinternError(f"--objective {name!r}: choose from {', '.join(OBJECTIVES)} (comma-separated for a "
                                 "multi-objective study, e.g. ndcg,memory)")
        if name in out:
            raise ColinternError(f"--objective names {name} twice")
        out.append(name)
    if not out:
        raise ColinternError("--objective is empty; use e.g. ndcg or ndcg,memory")
    if OBJECTIVES[out[0]].metric is None:
        raise ColinternError(f"--objective {','.join(out)}: the first objective must be an evaluation metric "
                             "(ndcg or eval_loss); memory and time only make sense next to one")
    return tuple(out)


# ------------------------------------------------------------------------------------------------ search space
@dataclass(frozen=True)
class ParameterSpec:
    """One searched field (`section.field` of the run configuration) and its distribution."""

    path: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    @classmethod
    def from_dict(cls, path: str, data: dict, source: str = "search space") -> ParameterSpec:
        where = f"{source}: {path}"
        if not isinstance(data, dict):
            raise ColinternError(f"{where} must be a mapping like {{type: float, low: 1e-5, high: 1e-3, log: true}}")
        unknown = set(data) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise ColinternError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        kind = data.get("type") or ("categorical" if "choices" in data else None)
        if kind not in PARAMETER_TYPES:
            raise ColinternError(f"{where}: type must be one of {', '.join(PARAMETER_TYPES)} (got {kind!r})")
        if kind == "categorical":
            choices = data.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ColinternError(f"{where}: a categorical parameter needs a non-empty list of choices")
            return cls(path, kind, choices=tuple(choices))
        if "low" not in data or "high" not in data:
            raise ColinternError(f"{where}: a {kind} parameter needs low and high")
        cast = float if kind == "float" else int
        try:
            low, high = cast(float(data["low"])), cast(float(data["high"]))
            step = None if data.get("step") is None else cast(float(data["step"]))
        except (TypeError, ValueError) as error:
            raise ColinternError(f"{where}: low/high/step must be numbers ({error})") from error
        if low > high:
            raise ColinternError(f"{where}: low {low} is above high {high}")
        log = bool(data.get("log", False))
        if log and (low <= 0 or step is not None):
            raise ColinternError(f"{where}: a log-scaled range needs low > 0 and no step")
        return cls(path, kind, low=low, high=high, log=log, step=step)

    @property
    def section(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def field_name(self) -> str:
        return self.path.split(".", 1)[1]

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> list:
        """The candidate values, for a categorical parameter or a stepped range (used for the memory corner)."""
        if self.type == "categorical":
            return list(self.choices)
        return [self.low, self.high]

    def to_dict(self) -> dict:
        if self.type == "categorical":
            return {"type": self.type, "choices": list(self.choices)}
        out: dict = {"type": self.type, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass
class SearchSpace:
    """The searched fields of the run configuration, in the order they are sampled."""

    parameters: list[ParameterSpec]
    source: str = "search space"

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        path = Path(path)
        if not path.is_file():
            raise ColinternError(f"Search space not found: {path} (see experiments/configs/optuna_search_space.yaml)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ColinternError(f"{path} is not valid YAML: {error}") from error
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "search space") -> SearchSpace:
        if not isinstance(data, dict) or not isinstance(data.get("parameters"), dict) or not data["parameters"]:
            raise ColinternError(f"{source}: expected a mapping `parameters: {{section.field: {{type: ...}}}}`")
        unknown = set(data) - {"parameters"}
        if unknown:
            raise ColinternError(f"{source}: unknown top-level keys {', '.join(sorted(unknown))} (only `parameters`)")
        parameters = [ParameterSpec.from_dict(path, spec, source) for path, spec in data["parameters"].items()]
        space = cls(parameters, source)
        space.check_fields()
        return space

    def check_fields(self) -> None:
        """Every searched path must name a configuration field, and a value of the right type."""
        for spec in self.parameters:
            if "." not in spec.path:
                raise ColinternError(f"{self.source}: '{spec.path}' must be section.field (e.g. training.lr)")
            for value in spec.values():
                apply_overrides(RunConfig(), {spec.section: {spec.field_name: value}}, self.source)

    def get(self, path: str) -> ParameterSpec | None:
        return next((p for p in self.parameters if p.path == path), None)

    def without(self, paths: set[str]) -> SearchSpace:
        return SearchSpace([p for p in self.parameters if p.path not in paths], self.source)

    def replace(self, spec: ParameterSpec) -> SearchSpace:
        return SearchSpace([spec if p.path == spec.path else p for p in self.parameters], self.source)

    def to_dict(self) -> dict:
        return {"parameters": {p.path: p.to_dict() for p in self.parameters}}

    def sample(self, trial) -> dict[str, Any]:
        return {spec.path: spec.suggest(trial) for spec in self.parameters}


def default_search_space_path(preset: str | None) -> Path:
    """experiments/configs/optuna_search_space_<preset>.yaml when it exists, else optuna_search_space.yaml."""
    from colintern.utils import PRESETS_DIR

    if preset:
        specific = PRESETS_DIR / f"optuna_search_space_{Path(preset).stem}.yaml"
        if specific.is_file():
            return specific
    return PRESETS_DIR / "optuna_search_space.yaml"


def nested(values: dict[str, Any]) -> dict[str, dict]:
    """{"training.lr": 1e-3} -> {"training": {"lr": 1e-3}}."""
    out: dict[str, dict] = {}
    for path, value in values.items():
        section, name = path.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def trial_config(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """The base configuration with a trial's sampled values; alpha follows a searched rank when it is not searched."""
    config = copy.deepcopy(base)
    apply_overrides(config, nested(params), "trial parameters")
    if "lora.rank" in params and "lora.alpha" not in params:
        config.lora.alpha = config.lora.rank
    return config


# ------------------------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class MemoryCheck:
    """The memory model's peak for one configuration against the GPU budget (less the advisor's safety margin)."""

    estimated_gib: float
    vram_gib: float
    budget_gib: float

    @property
    def fits(self) -> bool:
        return self.estimated_gib <= self.budget_gib

    @property
    def excess_gib(self) -> float:
        """Optuna constraint value: <= 0 when the configuration fits."""
        return round(self.estimated_gib - self.budget_gib, 4)


def memory_setup(config: RunConfig, device: str = "cuda"):
    """The memory model's description of a configuration's training step on `device` (a GPU by default: the budget
    is GPU memory, wherever the search runs)."""
    from colintern.tuning.advisor import DEFAULT_QUERY_TOKENS
    from colintern.tuning.memory_model import TrainingMemorySetup

    dtype = config.model.dtype
    if dtype in (None, "auto"):
        dtype = "bfloat16" if device == "cuda" else "float32"
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
    attention = config.model.attn_implementation
    return TrainingMemorySetup(
        per_device_batch_size=config.training.batch_size,
        query_tokens=DEFAULT_QUERY_TOKENS,
        # full training of the language model counts as "full" (the vision tower too: an upper bound without it)
        finetuning="lora" if config.lora.enabled else "full",
        lora_rank=config.lora.rank if config.lora.enabled else None,
        lora_dropout=config.lora.dropout if config.lora.enabled else 0.0,
        dtype=dtype,
        autocast=str(config.training.bf16).lower() != "false",
        gradient_checkpointing=config.training.gradient_checkpointing,
        attn_implementation=attention if attention in ("sdpa", "flash_attention_2", "eager") else "sdpa",
        device=device,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        quantize=config.model.quantize if config.lora.enabled else None,
    )


def _architecture(config: RunConfig):
    from colintern.tuning.advisor import analyze_architecture

    return analyze_architecture(config.model.name_or_path, lora_rank=config.lora.rank if config.lora.enabled else 32,
                                max_num_visual_tokens=config.model.max_num_visual_tokens)


def check_memory(config: RunConfig, vram_gib: float) -> MemoryCheck:
    """Predicted peak memory of `config` against `vram_gib` less the advisor's safety margin."""
    from colintern.tuning.advisor import SAFETY_MARGIN
    from colintern.tuning.memory_model import estimate_peak_memory

    estimate = estimate_peak_memory(_architecture(config), memory_setup(config))
    return MemoryCheck(round(estimate.peak_gib, 4), vram_gib, round(vram_gib * (1 - SAFETY_MARGIN), 4))


def cheapest_corner(base: RunConfig, space: SearchSpace) -> RunConfig:
    """The base configuration with every searched memory-relevant field at its least-memory value (smallest rank,
    dropout and token budget, gradient checkpointing on when searched): no larger batch fits anywhere in the space."""
    values: dict[str, Any] = {}
    for path, pick in (("lora.rank", min), ("lora.dropout", min), ("model.max_num_visual_tokens", min)):
        if (spec := space.get(path)) is not None:
            values[path] = pick(spec.values())
    if (spec := space.get("training.gradient_checkpointing")) is not None and True in spec.values():
        values["training.gradient_checkpointing"] = True
    return trial_config(base, values)


def bound_batch_size(base: RunConfig, space: SearchSpace, vram_gib: float) -> tuple[SearchSpace, int]:
    """Drop the batch sizes the advisor says cannot fit `vram_gib` anywhere in the space. Returns (space, bound)."""
    from colintern.tuning.advisor import SAFETY_MARGIN
    from colintern.tuning.memory_model import max_batch_size

    corner = cheapest_corner(base, space)
    spec = space.get("training.batch_size")
    largest = max(spec.values()) if spec is not None else corner.training.batch_size
    budget_bytes = int(vram_gib * 1024**3 * (1 - SAFETY_MARGIN))
    bound = max_batch_size(_architecture(corner), memory_setup(corner), budget_bytes, limit=max(1, int(largest)))
    if spec is None:
        return space, bound
    if spec.type == "categorical":
        kept = tuple(c for c in spec.choices if int(c) <= bound)
        if not kept:
            raise _nothing_fits(corner, spec, vram_gib)
        if len(kept) < len(spec.choices):
            logger.info("Batch sizes %s cannot fit %.1f GiB (advisor's bound: %d at the space's cheapest corner); "
                        "searching %s.", [c for c in spec.choices if c not in kept], vram_gib, bound, list(kept))
        return space.replace(ParameterSpec(spec.path, "categorical", choices=kept)), bound
    if bound < spec.low:
        raise _nothing_fits(corner, spec, vram_gib)
    if bound < spec.high:
        logger.info("Batch size limited to %d (advisor's bound for %.1f GiB).", bound, vram_gib)
        return space.replace(ParameterSpec(spec.path, spec.type, spec.low, bound, spec.log, spec.step)), bound
    return space, bound


def _nothing_fits(corner: RunConfig, spec: ParameterSpec, vram_gib: float) -> ColinternError:
    smallest = trial_config(corner, {spec.path: min(spec.values())})
    check = check_memory(smallest, vram_gib)
    return ColinternError(
        f"No batch size in the search space fits {vram_gib:g} GiB: even batch {min(spec.values())} needs about "
        f"{check.estimated_gib:.1f} GiB by the memory model ({check.budget_gib:.1f} GiB usable after the safety "
        "margin). Raise --vram-gb, add smaller batch sizes, turn on --gradient-checkpointing or lower "
        "--max-num-visual-tokens."
    )


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class SearchSettings:
    """How the study runs (the search space and the base training configuration are separate objects).

    Args:
        output_dir: where the study writes (trials/, optuna_best_params.json, trials.csv, PNG plots, the default
            SQLite storage).
        study_name: the study's name in the storage.
        storage: None (SQLite in output_dir), a database URL (sqlite:///..., postgresql://...), a .db/.sqlite file,
            or any other path: an Optuna journal file (safe for several workers on one file system).
        objectives: keys of OBJECTIVES; two or more make a multi-objective study.
        pruner: "median", "hyperband" or "none" (multi-objective studies cannot prune on intermediate values).
        n_trials: the study's total number of finished trials (those already in the storage count).
        time_budget_hours: the study's total trial time (also counting earlier invocations).
        vram_gib: GPU memory per device for the batch bound and the memory constraint; None: the visible GPU, else
            the advisor's default (16 GiB).
        seed: seeds the sampler (trial n draws with seed + n) and is the training seed of the base configuration.
        startup_trials: random trials before TPE models the results.
        pruner_startup_trials / pruner_warmup_steps: the median pruner waits for this many finished trials, and
            never prunes before this training step.
    """

    output_dir: str | Path
    study_name: str = "colintern"
    storage: str | None = None
    objectives: tuple[str, ...] = ("ndcg",)
    pruner: str = "median"
    n_trials: int = 20
    time_budget_hours: float | None = None
    vram_gib: float | None = None
    seed: int = 42
    startup_trials: int = 10
    pruner_startup_trials: int = 2
    pruner_warmup_steps: int = 0

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)
        self.objectives = parse_objectives(self.objectives)
        if self.pruner not in PRUNERS:
            raise ColinternError(f"--pruner must be one of {', '.join(PRUNERS)}, not {self.pruner!r}")
        if self.n_trials < 1:
            raise ColinternError("--trials must be at least 1")
        if self.time_budget_hours is not None and self.time_budget_hours <= 0:
            raise ColinternError("--time-budget-hours must be positive")
        if self.vram_gib is not None and self.vram_gib <= 0:
            raise ColinternError("--vram-gb must be positive")

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[name].direction for name in self.objectives]

    @property
    def metric_names(self) -> list[str]:
        return [OBJECTIVES[name].name for name in self.objectives]


# ------------------------------------------------------------------------------------------------ optuna parts
def open_storage(spec: str | None, output_dir: str | Path):
    """An Optuna storage from --storage: SQLite in output_dir by default, a database URL, or a journal file."""
    import sqlalchemy.exc
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if spec is None:
        path = Path(output_dir) / DEFAULT_STORAGE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        spec = f"sqlite:///{path}"
    elif "://" not in spec:
        path = Path(spec).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix not in (".db", ".sqlite", ".sqlite3"):
            logger.info("Storage: Optuna journal file %s", path)
            return JournalStorage(JournalFileBackend(str(path)))
        spec = f"sqlite:///{path}"
    elif spec.startswith("sqlite:///"):
        Path(spec.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    logger.info("Storage: %s", spec)
    try:
        # The heartbeat marks the trials of a killed worker as failed (after the grace period) and enqueues them
        # once more, so a crash never leaves a trial "running" forever.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(spec, heartbeat_interval=60, grace_period=180,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.ArgumentError) as error:
        raise ColinternError(
            f"--storage {spec}: cannot open it ({error}). Use a database URL (sqlite:///study.db, "
            "postgresql://user@host/db with its driver installed) or a file path (.db: SQLite; other: a journal)."
        ) from error


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's TPE with its randomness seeded per trial (seed + trial number).

    A plain `TPESampler(seed=s)` restarts its random stream in every process: a resumed study would draw its first new
    startup trials exactly as the first invocation did (duplicates), and parallel workers would all draw the same ones.
    Seeding by the trial number, unique in a study, keeps the search reproducible and never repeats itself.
    """

    def __init__(self, seed: int, **tpe_kwargs):
        self.seed, self.tpe_kwargs = seed, tpe_kwargs
        self._samplers: dict[int, optuna.samplers.TPESampler] = {}

    def _for(self, trial) -> optuna.samplers.TPESampler:
        if trial.number not in self._samplers:
            self._samplers[trial.number] = optuna.samplers.TPESampler(seed=self.seed + trial.number, **self.tpe_kwargs)
        return self._samplers[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._samplers.pop(trial.number, None)

    def reseed_rng(self) -> None:  # Optuna calls this on copies for n_jobs > 1; the per-trial seeds stay distinct
        pass


def build_sampler(settings: SearchSettings):

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # multivariate: models the parameters jointly (lr and batch interact); constant_liar: parallel workers do not
        # all sample the same point while the others' trials are running
        return TrialSeededSampler(settings.seed, n_startup_trials=settings.startup_trials, multivariate=True,
                                  constant_liar=True)


def build_pruner(settings: SearchSettings, config: RunConfig):

    if settings.pruner == "none" or settings.multi_objective:
        if settings.multi_objective and settings.pruner != "none":
            logger.info("Multi-objective study: Optuna cannot prune on intermediate values; trials run to the end "
                        "(the memory constraint still rejects configurations before training).")
        return optuna.pruners.NopPruner()
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials,
                                           n_warmup_steps=settings.pruner_warmup_steps)
    # Hyperband over training steps: the first rung at the first evaluation, the last at the end of the run
    steps = config.training.max_steps
    min_resource = config.training.eval_steps or 1
    return optuna.pruners.HyperbandPruner(min_resource=min_resource,
                                          max_resource=steps if steps and steps > 0 else "auto", reduction_factor=3)


def counted_trials(study) -> int:
    """Finished trials that count towards n_trials: complete, pruned (infeasible included) and failed, except those
    interrupted by the user or retried after a crashed worker (their rerun counts instead)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} | {t.user_attrs.get("retry_of") for t in trials}
    return sum(
        1 for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        and not t.user_attrs.get("interrupted") and t.number not in retried
    )


def spent_seconds(study) -> float:
    """Time the study's trials have run, over all invocations and workers (finished trials)."""
    total = 0.0
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start and t.datetime_complete:
            total += (t.datetime_complete - t.datetime_start).total_seconds()
    return total


# ------------------------------------------------------------------------------------------------ one trial
class TrialFailed(ColinternError):
    """A trial's training failed (NaN loss, out of memory, ...): recorded as failed, the study goes on."""


class OptunaReporter(TrainerCallback):
    """Records each evaluation's metrics, reports the objective to the trial and raises `optuna.TrialPruned` when the
    pruner says so (never at the last step: a finished run is scored, not pruned)."""

    def __init__(self, trial, metric: str, prune: bool):
        self.trial, self.metric, self.prune = trial, metric, prune
        self.last_step: int | None = None
        self.last_metrics: dict = {}
        self.history: list[tuple[int, float]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = dict(metrics or {})
        if self.metric not in metrics:
            hint = ("NDCG@5 needs --retrieval-eval and a retrieval-format --eval-split (corpus/queries/qrels, as "
                    "SynthDocs' validation split); or search on --objective eval_loss." if "ndcg" in self.metric
                    else "Set --eval-split to a held-out split.")
            raise ColinternError(f"The evaluation reported no {self.metric} (got "
                                 f"{', '.join(sorted(metrics)) or 'nothing'}). {hint}")
        value = float(metrics[self.metric])
        self.last_step, self.last_metrics = state.global_step, metrics
        self.history.append((state.global_step, value))
        if not self.prune or not math.isfinite(value):
            return
        self.trial.report(value, state.global_step)
        if state.global_step < state.max_steps and self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric} {value:.4g} at step {state.global_step}")


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_trial(config: RunConfig, reporter: OptunaReporter, callbacks: list | None = None) -> dict:
    """Train one trial's configuration in this process (no checkpoints), evaluate the final model, return its
    metrics plus train_seconds and measured_peak_gib (CUDA). Raises what training raises (TrialPruned included)."""
    import torch

    from colintern.training.trainer import build_trainer

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(config, [reporter, *(callbacks or [])], save_checkpoints=False,
                            validate_resume=False).trainer
    started = time.perf_counter()
    try:
        trainer.train()
        seconds = time.perf_counter() - started
        if reporter.last_step != trainer.state.global_step:
            trainer.evaluate()  # score the final model (the reporter never prunes at the last step)
        metrics = dict(reporter.last_metrics)
        metrics["train_seconds"] = round(seconds, 2)
        if torch.cuda.is_available():
            metrics["measured_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 4)
        return metrics
    finally:
        trainer.save_state()  # trainer_state.json: the trial's curves, also for pruned or failed trials
        del trainer
        _release_memory()


@dataclass
class TrialRunner:
    """The objective function: one trial from sampling to its values."""

    base: RunConfig
    space: SearchSpace
    settings: SearchSettings
    vram_gib: float
    callbacks: list = field(default_factory=list)  # further TrainerCallbacks for every trial
    fatal: ColinternError | None = field(default=None, init=False)  # the configuration error that stopped the study

    def __call__(self, trial):
        settings = self.settings
        params = self.space.sample(trial)
        config = trial_config(self.base, params)
        trial_dir = settings.output_dir / "trials" / f"trial-{trial.number:04d}"
        config.training.output_dir = str(trial_dir)
        config.training.run_name = f"{settings.study_name}-trial-{trial.number:04d}"
        config.training.resume = None

        check = check_memory(config, self.vram_gib)
        trial.set_user_attr("estimated_peak_gib", check.estimated_gib)
        trial.set_user_attr("vram_budget_gib", check.budget_gib)
        trial.set_constraint(MEMORY_CONSTRAINT, check.excess_gib)
        if not check.fits:
            reason = (f"infeasible: the memory model predicts {check.estimated_gib:.2f} GiB, over the "
                      f"{check.budget_gib:.2f} GiB usable of {check.vram_gib:g} GiB")
            trial.set_user_attr("infeasible", reason)
            logger.info("Trial %d rejected before training (%s): %s", trial.number, _describe(params), reason)
            raise optuna.TrialPruned(reason)

        objective = OBJECTIVES[settings.objectives[0]]
        reporter = OptunaReporter(trial, objective.metric, prune=not settings.multi_objective)
        logger.info("Trial %d: %s -> %s", trial.number, _describe(params), trial_dir)
        record = {"number": trial.number, "params": params, "estimated_peak_gib": check.estimated_gib}
        failure: TrialFailed | None = None
        try:
            metrics = train_trial(config, reporter, self.callbacks)
        except optuna.TrialPruned as pruned:
            self._finish(trial, trial_dir, record, "pruned", reporter, reason=str(pruned))
            raise
        except (KeyboardInterrupt, ColinternError) as error:
            from colintern.training.trainer import NonFiniteLossError

            if isinstance(error, NonFiniteLossError):
                failure = self._failed(trial, trial_dir, record, reporter, "nan", error)
            else:
                # Ctrl-C, or a configuration problem that would stop every trial: not this trial's result. It runs
                # again first when the study is resumed, and does not count towards --trials meanwhile.
                reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"stopped: {error}"[:500]
                trial.set_user_attr("interrupted", reason)
                trial.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                self._finish(trial, trial_dir, record, "interrupted", reporter, reason=reason)
                if isinstance(error, KeyboardInterrupt):
                    raise
                # the study stops after this trial and run_search raises the error itself (one line, no traceback)
                self.fatal = error
                trial.study.stop()
                failure = TrialFailed(f"trial {trial.number} stopped the study: {error}")
        except Exception as error:  # noqa: BLE001 - any training failure fails this trial only
            kind = "out of memory" if "out of memory" in str(error).lower() else "error"
            logger.debug("Trial %d traceback:\n%s", trial.number, traceback.format_exc())
            failure = self._failed(trial, trial_dir, record, reporter, kind, error)
        if failure is not None:  # raised outside the handler: no reference to the failed run's frames remains
            raise failure

        values = [self._value(name, metrics, check) for name in settings.objectives]
        trial.set_user_attr("eval_metrics", {k: v for k, v in metrics.items() if k.startswith("eval_")})
        if "measured_peak_gib" in metrics:
            trial.set_user_attr("measured_peak_gib", metrics["measured_peak_gib"])
        trial.set_user_attr("train_seconds", metrics["train_seconds"])
        if not all(math.isfinite(v) for v in values):
            raise self._failed(trial, trial_dir, record, reporter, "nan", ValueError(f"non-finite objective {values}"))
        self._finish(trial, trial_dir, {**record, "values": values, "metrics": metrics}, "complete", reporter)
        return values[0] if len(values) == 1 else values

    @staticmethod
    def _value(name: str, metrics: dict, check: MemoryCheck) -> float:
        objective = OBJECTIVES[name]
        if objective.metric is not None:
            return float(metrics.get(objective.metric, math.nan))
        if name == "memory":
            return float(metrics.get("measured_peak_gib", check.estimated_gib))
        return float(metrics["train_seconds"])

    def _failed(self, trial, trial_dir: Path, record: dict, reporter, kind: str, error: BaseException) -> TrialFailed:
        message = f"{type(error).__name__}: {error}".strip()[:500]
        trial.set_user_attr("failure", kind)
        trial.set_user_attr("error", message)
        self._finish(trial, trial_dir, record, f"failed ({kind})", reporter, reason=message)
        return TrialFailed(f"trial {trial.number} failed ({kind}): {message}")

    @staticmethod
    def _finish(trial, trial_dir: Path, record: dict, status: str, reporter, reason: str | None = None) -> None:
        """trial.json: how the trial ended, written once at its end (a trial folder without it was cut short)."""
        if not trial_dir.is_dir():
            return
        record = {**record, "status": status, "evaluations": reporter.history,
                  "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        if reason:
            record["reason"] = reason
        atomic_write_json(trial_dir / TRIAL_RECORD_FILE, record)


def _describe(params: dict) -> str:
    return ", ".join(f"{k.split('.', 1)[1]}={_short(v)}" for k, v in params.items())


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class _ShortTrialFailures(logging.Filter):
    """Optuna logs every failed trial with its traceback; a TrialFailed (whose message says everything) or a Ctrl-C
    needs none."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (TrialFailed, KeyboardInterrupt)):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_trial_failure_tracebacks() -> None:
    """Log failed trials in one line (used by scripts/optuna_optimizer.py)."""
    target = logging.getLogger("optuna.study._optimize")  # the logger optuna reports failed trials on
    if not any(isinstance(f, _ShortTrialFailures) for f in target.filters):
        target.addFilter(_ShortTrialFailures())


# ------------------------------------------------------------------------------------------------ the study
@dataclass
class SearchResult:
    study: Any
    output_dir: Path
    best_params_path: Path
    trials_csv: Path
    plots: list[Path] = field(default_factory=list)
    ran_trials: int = 0


def prepare_base(base: RunConfig, settings: SearchSettings, space: SearchSpace) -> tuple[RunConfig, SearchSpace]:
    """The base configuration as every trial starts from it, and the space as it applies to it."""
    base = copy.deepcopy(base)
    base.training.seed = settings.seed
    base.training.resume = None
    metrics = {OBJECTIVES[name].metric for name in settings.objectives}
    if "eval_ndcg_at_5" in metrics and not base.training.retrieval_eval:
        logger.info("Objective NDCG@5: turning on --retrieval-eval.")
        base.training.retrieval_eval = True
    if not base.data.eval_split or not base.training.eval_steps:
        raise ColinternError("The search scores each trial on an evaluation: set --eval-split and --eval-steps "
                             "(the steps between the evaluations the pruner sees).")
    if not base.lora.enabled:
        skipped = {p.path for p in space.parameters if p.section == "lora"}
        if skipped:
            logger.info("LoRA is off in the base configuration: not searching %s (add --peft to search them).",
                        ", ".join(sorted(skipped)))
            space = space.without(skipped)
    if not space.parameters:
        raise ColinternError(f"{space.source}: nothing left to search for this configuration")
    return base, space


def _comparable(config: RunConfig, space: SearchSpace) -> dict:
    """The base configuration as far as it decides results: bookkeeping and the searched fields left out."""
    data = config.to_dict()
    data.pop("experiment", None)
    for path in BOOKKEEPING_FIELDS | {p.path for p in space.parameters}:
        section, name = path.split(".", 1)
        data.get(section, {}).pop(name, None)
    return json.loads(json.dumps(data, default=str))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def open_study(settings: SearchSettings, base: RunConfig, space: SearchSpace):
    """Create the study, or load it and check it is the same search (configuration, space, objectives)."""

    storage = open_storage(settings.storage, settings.output_dir)
    identity = {
        "objectives": list(settings.objectives),
        "base_config": _comparable(base, space),
        "search_space": space.to_dict(),
    }
    study = optuna.create_study(
        study_name=settings.study_name, storage=storage, sampler=build_sampler(settings),
        pruner=build_pruner(settings, base), directions=settings.directions, load_if_exists=True,
    )
    stored = study.user_attrs
    if "search" not in stored:
        study.set_user_attr("search", identity)
        study.set_user_attr("created_at", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(settings.metric_names)
        return study
    previous = stored["search"]
    problems = _differences(json.loads(json.dumps(previous)), json.loads(json.dumps(identity)))
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ColinternError(
            f"Study '{settings.study_name}' in this storage was created for another search ({shown}). Continue it "
            "with the same configuration, search space and --objective, or start a new one with --study-name."
        )
    return study


def run_search(base: RunConfig, space: SearchSpace, settings: SearchSettings,
               enqueue: list[dict[str, Any]] | None = None, callbacks: list | None = None) -> SearchResult:
    """Run (or continue) the study until it has `settings.n_trials` finished trials or its time budget is spent,
    then write the best parameters, the trials CSV and the plots.

    `enqueue`: parameter sets ({"training.lr": 1e-3, ...}) to run before the sampler's own, e.g. a known baseline
    (skipped when the study already has a trial with exactly those values). `callbacks`: further TrainerCallbacks
    for every trial's Trainer.
    """

    from colintern.tuning.advisor import detect_gpu

    base, space = prepare_base(base, settings, space)
    gpu = detect_gpu(settings.vram_gib)
    if not gpu.detected and settings.vram_gib is None:
        logger.info("No GPU is visible: the batch bound and the memory constraint plan for %.0f GiB (set --vram-gb "
                    "for your GPU).", gpu.vram_gib)
    space, _ = bound_batch_size(base, space, gpu.vram_gib)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(settings, base, space)
    for params in enqueue or []:
        study.enqueue_trial(params, skip_if_exists=True)

    done = counted_trials(study)
    budget = settings.time_budget_hours * 3600 if settings.time_budget_hours else None
    timeout = None if budget is None else budget - spent_seconds(study)
    before = len(study.trials)
    if done:
        logger.info("Study '%s': %d trial(s) already finished; continuing to %d.", settings.study_name, done,
                    settings.n_trials)
    try:
        if done >= settings.n_trials:
            logger.info("Study '%s' already has %d finished trials (--trials %d): nothing to run; raise --trials to "
                        "continue it.", settings.study_name, done, settings.n_trials)
        elif timeout is not None and timeout <= 0:
            logger.info("Study '%s' has used its time budget (%.2f of %.2f h of trial time).", settings.study_name,
                        spent_seconds(study) / 3600, settings.time_budget_hours)
        else:
            def stop_when_done(study, trial) -> None:  # counts the trials of other workers too
                if counted_trials(study) >= settings.n_trials:
                    study.stop()
                elif budget is not None and spent_seconds(study) >= budget:
                    logger.info("Time budget of %.2f h spent: stopping.", settings.time_budget_hours)
                    study.stop()

            runner = TrialRunner(base, space, settings, gpu.vram_gib, list(callbacks or []))
            study.optimize(runner, n_trials=settings.n_trials - done,
                           timeout=timeout, catch=(TrialFailed,), callbacks=[stop_when_done], gc_after_trial=True)
            if runner.fatal is not None:
                raise runner.fatal
    except BaseException:  # Ctrl-C or a configuration error: the outputs still show what the storage holds
        try:
            write_outputs(study, settings, base)
        except Exception as error:  # noqa: BLE001 - never hide the original error
            logger.warning("Could not write the study's outputs: %s", error)
        raise
    outputs = write_outputs(study, settings, base)
    return SearchResult(study, settings.output_dir, *outputs, ran_trials=len(study.trials) - before)


# ------------------------------------------------------------------------------------------------ outputs
def _feasible_complete(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if all(v <= 0 for v in t.constraints.values())]


def best_trials(study) -> list:
    """The best trial (single objective) or the Pareto front (multi-objective), feasible complete trials only."""
    if not _feasible_complete(study):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.number)


def best_params_record(study, settings: SearchSettings, base: RunConfig) -> dict:
    """optuna_best_params.json: the advisor keys `scripts/train.py --config-from` reads (learning_rate,
    per_device_train_batch_size, lora_rank, ...), other searched fields in the configuration's sections, then the
    objective values and the study's bookkeeping. Multi-objective: the Pareto trial best at the first objective,
    and the whole front under `optuna.pareto_front`."""
    from optuna.trial import TrialState

    front = best_trials(study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    summary = {
        "study_name": settings.study_name,
        "storage": settings.storage or str(settings.output_dir / DEFAULT_STORAGE_FILE),
        "objectives": dict(zip(settings.metric_names, settings.directions)),
        "trials": {"complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
                   "failed": states.count(TrialState.FAIL), "running": states.count(TrialState.RUNNING),
                   "infeasible": sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("infeasible"))},
        "spent_hours": round(spent_seconds(study) / 3600, 4),
        "base": {"preset": base.preset, "model": base.model.name_or_path, "dataset": base.data.dataset,
                 "max_steps": base.training.max_steps, "epochs": base.training.epochs, "seed": base.training.seed},
    }
    if not front:
        return {"optuna": {**summary, "best_trial": None, "note": "no feasible trial has completed yet"}}
    direction = 1 if study.directions[0].name == "MAXIMIZE" else -1
    best = max(front, key=lambda t: direction * t.values[0])
    record: dict = {}
    reverse = {target: key for key, target in ADVISOR_KEYS.items()}
    values = dict(best.params)
    if "lora.rank" in values and "lora.alpha" not in values:
        values["lora.alpha"] = values["lora.rank"]  # the rule the trial ran with
    for path, value in values.items():  # the advisor's names first, then the other fields by section
        if tuple(path.split(".", 1)) in reverse:
            record[reverse[tuple(path.split(".", 1))]] = value
    for path, value in values.items():
        if tuple(path.split(".", 1)) not in reverse:
            section, name = path.split(".", 1)
            record.setdefault(section, {})[name] = value
    record["objective"] = dict(zip(settings.metric_names, best.values))
    preset = f"--preset {base.preset} " if base.preset else ""
    summary.update(
        best_trial=best.number,
        params=best.params,
        eval_metrics=best.user_attrs.get("eval_metrics", {}),
        trial_config=str(Path(settings.output_dir) / "trials" / f"trial-{best.number:04d}" / RUN_CONFIG_FILE),
        train_command=f"python scripts/train.py {preset}--config-from {Path(settings.output_dir) / BEST_PARAMS_FILE}",
    )
    if len(study.directions) > 1:
        summary["pareto_front"] = [
            {"trial": t.number, "values": dict(zip(settings.metric_names, t.values)), "params": t.params}
            for t in front
        ]
    record["optuna"] = summary
    return record


def trials_table(study):
    """The trials as a DataFrame: Optuna's columns (values, params, user attributes, the memory constraint among the
    system attributes, state, durations)."""
    return study.trials_dataframe()


def write_outputs(study, settings: SearchSettings, base: RunConfig) -> tuple[Path, Path, list[Path]]:
    out = Path(settings.output_dir)
    best_path, csv_path = out / BEST_PARAMS_FILE, out / TRIALS_CSV
    atomic_write_json(best_path, best_params_record(study, settings, base))
    atomic_write_text(csv_path, trials_table(study).to_csv(index=False))
    plots = write_plots(study, settings, out)
    logger.info("Wrote %s, %s and %d plot(s) in %s", best_path.name, csv_path.name, len(plots), out)
    return best_path, csv_path, plots


def write_plots(study, settings: SearchSettings, output_dir: Path) -> list[Path]:
    """PNG plots: optimisation history, parameter importances, learning curves (pruning), Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    first = settings.metric_names[0]
    multi = settings.multi_objective
    target = (lambda t: t.values[0]) if multi else None
    plots: dict[str, Any] = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study, target=target, target_name=first),
        "param_importances.png": lambda: ovm.plot_param_importances(study, target=target, target_name=first),
    }
    if not multi:
        plots["intermediate_values.png"] = lambda: ovm.plot_intermediate_values(study)
    else:
        plots["pareto_front.png"] = lambda: ovm.plot_pareto_front(study, target_names=settings.metric_names)
    written = []
    n_complete = len(_feasible_complete(study))
    if n_complete == 0:
        logger.info("No trial has completed yet: no plots.")
        return written
    for name, draw in plots.items():
        if name == "param_importances.png" and n_complete < 2:
            logger.info("%s: needs 2 completed trials.", name)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw()
            figure = _figure_of(axes)
            figure.set_size_inches(9, 5.5)
            figure.suptitle(f"{settings.study_name}: {name.removesuffix('.png').replace('_', ' ')}", fontsize=10)
            figure.tight_layout()
            _save_figure(figure, output_dir / name)
            plt.close(figure)
            written.append(output_dir / name)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:  # e.g. importances of a constant parameter
            logger.warning("%s not drawn: %s", name, error)
            plt.close("all")
    return written


def _figure_of(axes):
    import numpy as np

    if isinstance(axes, np.ndarray):
        return axes.flat[0].figure
    return axes.figure


def _save_figure(figure, path: Path) -> None:
    """Save atomically: a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        figure.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def format_summary(result: SearchResult, settings: SearchSettings) -> str:
    """The closing table: the best trial (or the Pareto front) and where the outputs are."""
    from optuna.trial import TrialState

    study = result.study
    trials = study.get_trials(deepcopy=False)
    count = {state: sum(1 for t in trials if t.state == state) for state in TrialState}
    infeasible = sum(1 for t in trials if t.user_attrs.get("infeasible"))
    lines = [
        f"Study {settings.study_name}: {len(trials)} trials ({count[TrialState.COMPLETE]} complete, "
        f"{count[TrialState.PRUNED] - infeasible} pruned, {infeasible} rejected by the memory constraint, "
        f"{count[TrialState.FAIL]} failed); {result.ran_trials} run now; {spent_seconds(study) / 60:.1f} min of "
        "trial time in all.",
    ]
    front = best_trials(study)
    if not front:
        lines.append("No feasible trial has completed yet.")
    else:
        header = "Pareto front" if settings.multi_objective else "Best trial"
        lines.append(f"{header}:")
        for t in front:
            values = ", ".join(f"{n} {v:.4g}" for n, v in zip(settings.metric_names, t.values))
            lines.append(f"  trial {t.number}: {values}  |  {_describe(t.params)}")
    lines += [f"Best parameters: {result.best_params_path}", f"Trials: {result.trials_csv}"]
    lines += [f"Plot: {path}" for path in result.plots]
    return "\n".join(lines)


__all__ = [
    "OBJECTIVES",
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
    "format_summary",
    "open_storage",
    "open_study",
    "parse_objectives",
    "quiet_trial_failure_tracebacks",
    "run_search",
    "trial_config",
    "write_outputs",
]
