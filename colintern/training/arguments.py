"""The training run's configuration: one dataclass per concern, loadable from YAML, every field a CLI flag.

Precedence, lowest first: dataclass defaults < preset (`experiments/configs/<preset>.yaml`) < `--config FILE`
< `--config-from advisor.json` (scripts/hyperparameter_optimizer.py output) < command-line flags.

YAML layout (any section may be left out; `base:` inherits from another YAML file, resolved relative to this one or
to experiments/configs/):

    base: colintern3_5-1b.yaml
    experiment: {name: ..., description: ..., hyperparameters_under_test: [...]}
    model: {name_or_path: ..., max_num_visual_tokens: ...}
    data: {dataset: ..., eval_split: ...}
    lora: {enabled: true, rank: 32, alpha: 32, dropout: 0.1}
    training: {learning_rate: 5e-5, num_train_epochs: 5, per_device_train_batch_size: 16, ...}

`training` is `transformers.TrainingArguments` (ColinternTrainingArguments: colintern's defaults and added options),
and the command line is `transformers.HfArgumentParser` (ConfigArgumentParser): `--learning_rate`,
`--learning-rate` and colintern's short `--lr` are the same option. Files with the older names of the training
options (`lr`, `epochs`, `batch_size`, `grad_accum`, `scheduler`, `resume`: RENAMED_FIELDS) still load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import logging
import sys
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from colintern.cli import Limits, limits, read_text
from colintern.model.architecture import DEFAULT_MAX_NUM_VISUAL_TOKENS, INTERNVL3_5_1B
from colintern.utils import PRESETS_DIR, ColinternError

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "colintern3_5-1b"

# LoRA on the language model's attention and MLP linears only. peft `re.fullmatch`es a string `target_modules`;
# the vision tower also has q/k/v projections, so plain suffixes would put LoRA there too.
LM_LINEAR_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def _flag(name: str, help: str, **extra) -> dict:
    """A field's metadata: its flag, help and the values it accepts (`colintern.cli.Limits` keys: ge, gt, le, lt,
    finite, choices, also), checked wherever a value comes from (preset, file, advisor JSON, flag)."""
    return {"flag": name, "help": help, **extra}


SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")  # transformers' schedulers that need no extra arguments


@dataclass
class ExperimentConfig:
    """Bookkeeping for ablations (issue: experiments); not used by training itself."""

    name: str | None = field(default=None, metadata=_flag("--experiment-name", "experiment name"))
    description: str | None = field(default=None, metadata=_flag("--experiment-description", "what it tests"))
    hyperparameters_under_test: list[str] = field(
        default_factory=list, metadata={"flag": None, "help": "names of the fields this experiment varies"}
    )


@dataclass
class ModelConfig:
    name_or_path: str = field(
        default=INTERNVL3_5_1B,
        metadata=_flag("--model", "base model: Hub id, local folder, or embedded:tiny-internvl3_5"),
    )
    max_num_visual_tokens: int = field(
        default=DEFAULT_MAX_NUM_VISUAL_TOKENS, metadata=_flag("--max-num-visual-tokens", "image tokens per page at most (tiling limit)", ge=1)
    )
    dtype: str = field(
        default="auto",
        metadata=_flag("--dtype", "auto (bf16 on GPU, fp32 on CPU), bfloat16, float32",
                       choices=("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")),
    )
    attn_implementation: str = field(
        default="auto", metadata=_flag("--attn-implementation", "auto (flash_attention_2 if installed, else sdpa)")
    )
    attention: str = field(
        default="causal", metadata=_flag("--attention", "causal (the published recipe) or bidirectional: the language "
                                         "model encodes queries and pages without the causal mask",
                                         choices=("causal", "bidirectional"))
    )
    quantize: str | None = field(
        default=None, metadata=_flag("--quantize", "4bit or 8bit base weights (QLoRA, CUDA + bitsandbytes)",
                                      choices=("4bit", "8bit"))
    )


@dataclass
class DataConfig:
    dataset: str = field(
        default="vidore/colpali_train_set",
        metadata=_flag("--dataset", "training set: Hub id, local folder (parquet/arrow), or embedded:synthdocs"),
    )
    train_split: str = field(default="train", metadata=_flag("--train-split", "split to train on"))
    eval_split: str | None = field(
        default="test", metadata=_flag("--eval-split", "held-out split for the evaluation loss ('none' to skip)")
    )
    max_train_samples: int | None = field(
        default=None, metadata=_flag("--max-train-samples", "use at most N pairs", ge=1)
    )
    max_eval_samples: int | None = field(
        default=512, metadata=_flag("--max-eval-samples", "evaluate on at most N", ge=1)
    )
    query_column: str = field(default="query", metadata=_flag("--query-column", "column holding the query text"))
    image_column: str = field(default="image", metadata=_flag("--image-column", "column holding the page image"))
    negatives_column: str | None = field(
        default="negatives", metadata=_flag("--negatives-column", "column of hard-negative pages, used if present")
    )
    num_negatives: int = field(default=1, metadata=_flag("--num-negatives", "hard negatives per query", ge=1))
    skip_bad_rows: bool = field(
        default=False, metadata=_flag("--skip-bad-rows", "drop invalid rows (reported) instead of stopping")
    )
    validate: bool = field(default=True, metadata=_flag("--validate", "check every row before the first step"))
    mixture: list[dict] = field(
        default_factory=list,
        metadata={"flag": None, "help": "several training sets: [{dataset, max_samples, weight, split}, ...]"},
    )


@dataclass
class LoraSettings:
    enabled: bool = field(default=True, metadata=_flag("--peft", "LoRA on the language model + trained head"))
    rank: int = field(default=32, metadata=_flag("--lora-rank", "LoRA rank r", ge=1))
    alpha: int = field(default=32, metadata=_flag("--lora-alpha", "LoRA alpha (scale = alpha / r)", gt=0))
    dropout: float = field(default=0.1, metadata=_flag("--lora-dropout", "LoRA dropout", ge=0, lt=1))
    target_modules: str = field(
        default=LM_LINEAR_TARGETS, metadata=_flag("--lora-target-modules", "regex of modules to adapt (fullmatch)")
    )


# colpali-engine's late-interaction losses (`colpali_engine.loss` class names) by their `--loss` name: the one list of
# losses, for the flag's choices here and for colintern.training.trainer.build_loss.
LOSSES = {
    "colbert": "ColbertLoss",
    "pairwise": "ColbertPairwiseCELoss",
    "negative-ce": "ColbertNegativeCELoss",
    "pairwise-negative-ce": "ColbertPairwiseNegativeCELoss",
}
BF16_CHOICES = ("auto", "true", "false", "yes", "no", "1", "0")


@dataclass
class ColinternTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with the recipe's defaults, colintern's short flags as aliases (`--lr` for
    `--learning_rate`, ...; see RENAMED_FIELDS for the names of older configuration files), and the options colintern
    adds: per-part learning rates, loss, vision training, retrieval evaluation, augmentation, gradient cache.

    The Trainer gets a fresh `TrainingArguments` built from these (colintern.training.trainer.recipe_arguments):
    `bf16` left unset means auto (bf16 on a CUDA device that supports it) and is resolved there.
    """

    output_dir: str = field(default="experiments/runs/colintern3_5-1b", metadata=_flag("--output-dir", "run directory"))
    num_train_epochs: float = field(default=5.0, metadata=_flag("--epochs", "training epochs", gt=0))
    max_steps: int = field(
        default=-1, metadata=_flag("--max-steps", "stop after N optimizer steps (-1: epochs)", ge=1, also=(-1,))
    )
    per_device_train_batch_size: int = field(
        default=16, metadata=_flag("--batch-size", "per-device batch (queries = pages)", ge=1)
    )
    gradient_accumulation_steps: int = field(default=4, metadata=_flag("--grad-accum", "gradient accumulation steps", ge=1))
    learning_rate: float = field(default=5e-5, metadata=_flag("--lr", "peak learning rate (LoRA / trained weights)", gt=0))
    lr_head: float | None = field(
        default=None, metadata=_flag("--lr-head", "learning rate of custom_text_proj", gt=0)
    )
    lr_vision: float | None = field(
        default=None,
        metadata=_flag("--lr-vision", "learning rate of vision tower + projector (with --train-vision)", gt=0),
    )
    warmup_steps: float = field(
        default=100, metadata=_flag("--warmup-steps", "linear warm-up steps (below 1: a fraction of the run)", ge=0)
    )
    lr_scheduler_type: str = field(
        default="linear", metadata=_flag("--scheduler", "linear, cosine or constant_with_warmup", choices=SCHEDULERS)
    )
    weight_decay: float = field(default=0.0, metadata=_flag("--weight-decay", "AdamW weight decay", ge=0))
    max_grad_norm: float = field(
        default=1.0, metadata=_flag("--max-grad-norm", "gradient clipping norm (0: none)", ge=0)
    )
    loss: str = field(
        default="colbert",
        metadata=_flag("--loss", "colbert, pairwise, negative-ce or pairwise-negative-ce", choices=tuple(LOSSES)),
    )
    temperature: float | None = field(
        default=None, metadata=_flag("--temperature", "loss temperature (loss default)", gt=0)
    )
    train_vision: bool = field(
        default=False, metadata=_flag("--train-vision", "also train the vision tower and projector")
    )
    gradient_checkpointing: bool | None = field(
        default=True, metadata=_flag("--gradient-checkpointing", "recompute LM activations in the backward pass")
    )
    bf16: bool | None = field(
        default=None,
        metadata=_flag("--bf16", "auto (unset: on CUDA with bf16 support), true, false", choices=BF16_CHOICES),
    )
    seed: int = field(default=42, metadata=_flag("--seed", "random seed", ge=0, le=2**32 - 1))
    logging_steps: int = field(default=10, metadata=_flag("--logging-steps", "log every N steps", ge=1))
    eval_steps: int | None = field(
        default=200, metadata=_flag("--eval-steps", "evaluate every N steps ('none': never)", ge=1)
    )
    save_steps: int = field(default=500, metadata=_flag("--save-steps", "checkpoint every N steps", ge=1))
    save_total_limit: int | None = field(default=3, metadata=_flag("--save-total-limit", "checkpoints to keep", ge=1))
    early_stopping_patience: int | None = field(
        default=None, metadata=_flag("--early-stopping-patience", "stop after N evaluations without improvement", ge=1)
    )
    retrieval_eval: bool = field(
        default=False, metadata=_flag("--retrieval-eval", "also report NDCG@5 on the retrieval validation split")
    )
    report_to: None | str | list[str] = field(
        default="wandb", metadata=_flag("--report-to", "wandb, tensorboard or none")
    )
    dataloader_num_workers: int = field(
        default=2, metadata=_flag("--num-workers", "data-loading worker processes (image decoding, tiling)", ge=0)
    )
    augment: dict = field(
        default_factory=dict, metadata={"flag": None, "help": "training-page augmentation settings (off when empty)"}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata=_flag("--resume", "checkpoint folder, or 'latest' in --output-dir")
    )
    overwrite: bool = field(
        default=False,
        metadata=_flag("--overwrite", "start a new run in an --output-dir that holds another run's checkpoints "
                       "(they are moved to OUTPUT/previous-<time>/, not deleted)"),
    )
    cache_chunk_size: int | None = field(
        default=None,
        metadata=_flag("--cache-chunk-size", "gradient cache: embed the in-batch of --batch-size in chunks of N "
                       "(memory of N, negatives of the whole batch, same gradients)", ge=1),
    )

    def __post_init__(self):
        # bf16 is resolved when the Trainer's arguments are built (auto; CPU autocast with `use_cpu`): transformers
        # would refuse `bf16=True` here on a machine without a bf16 GPU. `gradient_checkpointing` is transformers'
        # older name of `activation_checkpointing`; colintern keeps it (the recipe applies it to the language model).
        # transformers prints a WANDB_MODE notice on stdout when its integrations load (here, the first time):
        # stdout is a script's output (--print-config), so the notice goes to stderr.
        # Nor does reading a configuration set up devices (under torchrun that starts the process group before the
        # model is loaded): the Trainer's own TrainingArguments do that.
        bf16, self.bf16 = self.bf16, False
        self._configuring = True
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
                warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
                super().__post_init__()
        finally:
            self.bf16, self._configuring = bf16, False

    @property
    def device(self):
        return None if getattr(self, "_configuring", False) else super().device


TrainingConfig = ColinternTrainingArguments  # the name before the options were transformers.TrainingArguments

# Names of training options in configuration files before they were TrainingArguments' (old -> new); old files,
# advisor JSON, saved runs (colintern_run.json) and search spaces keep working with them.
RENAMED_FIELDS = {
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "scheduler": "lr_scheduler_type",
    "resume": "resume_from_checkpoint",
}


@dataclass
class RunConfig:
    """Everything a training run needs; saved resolved as `colintern_run.json` in the run directory."""

    preset: str | None = None
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: ColinternTrainingArguments = field(default_factory=ColinternTrainingArguments)

    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("experiment", "model", "data", "lora", "training")

    def to_dict(self) -> dict:
        data = {"preset": self.preset}
        data.update({name: asdict(getattr(self, name)) for name in self.SECTIONS if name != "training"})
        data["training"] = training_dict(self.training)
        return data

    def save(self, path: str | Path) -> None:
        from colintern.utils import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        config = cls()
        apply_overrides(config, data)
        return config


def training_dict(training: ColinternTrainingArguments) -> dict:
    """The training options worth saving: every option colintern declares, and any other TrainingArguments field
    that differs from its default (the rest is transformers' defaults). Plain JSON values."""
    default = _default_training()
    own = ColinternTrainingArguments.__annotations__
    out = {}
    for f in fields(training):
        if not f.init or f.name in _NOT_SAVED:
            continue
        value = getattr(training, f.name)
        if f.name in own or value != getattr(default, f.name):
            out[f.name] = _plain(value)
    return out


# derived or secret: `activation_checkpointing` mirrors `gradient_checkpointing`; tokens are never written to disk
_NOT_SAVED = {"activation_checkpointing", "activation_checkpointing_kwargs", "hub_token", "local_rank", "disable_tqdm"}


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    return value


@functools.lru_cache(maxsize=1)
def _default_training() -> ColinternTrainingArguments:
    return ColinternTrainingArguments()


# TrainingArguments fields the recipe sets itself (colintern.training.trainer.build_trainer), with the option that
# decides them; a value given for one would be ignored, so it is refused instead.
DECIDED_BY_COLINTERN = {
    "eval_strategy": "--eval-steps and --eval-split", "do_eval": "--eval-steps and --eval-split",
    "save_strategy": "--save-steps", "per_device_eval_batch_size": "--batch-size",
    "load_best_model_at_end": "--early-stopping-patience", "metric_for_best_model": "the evaluation",
    "greater_is_better": "the evaluation", "data_seed": "--seed", "remove_unused_columns": "the collator",
    "dataloader_pin_memory": "the device", "dataloader_persistent_workers": "--num-workers",
    "train_sampling_strategy": "the data's page lengths", "length_column_name": "the data's page lengths",
    "ddp_find_unused_parameters": "the model", "use_cpu": "--bf16 and the device",
    "optim": "colintern's AdamW (per-part learning rates: --lr, --lr-head, --lr-vision)",
    "optim_args": "colintern's AdamW", "optim_target_modules": "colintern's AdamW", "adam_beta1": "colintern's AdamW",
    "adam_beta2": "colintern's AdamW", "adam_epsilon": "colintern's AdamW",
}


def trainer_options(training: ColinternTrainingArguments) -> dict:
    """The TrainingArguments fields given beyond those colintern declares (e.g. --lr_scheduler_kwargs,
    --torch_compile, --ddp_timeout): passed on to the Trainer as they are."""
    default = _default_training()
    own = ColinternTrainingArguments.__annotations__
    return {f.name: getattr(training, f.name) for f in fields(training)
            if f.init and f.name not in own and f.name not in _NOT_SAVED and f.name not in DECIDED_BY_COLINTERN
            and f.name != "run_name" and getattr(training, f.name) != getattr(default, f.name)}


def upgrade_training_keys(values: dict, source: str | None = None) -> dict:
    """A `training:` mapping with the names of older configuration files (RENAMED_FIELDS) under their
    TrainingArguments names; a name given both ways keeps the new one's value."""
    old = [name for name in values if name in RENAMED_FIELDS]
    if not old:
        return dict(values)
    if source is not None and (source, tuple(old)) not in _TOLD:
        _TOLD.add((source, tuple(old)))
        logger.info("%s: training option%s %s now named as in transformers.TrainingArguments (%s); the old names "
                    "keep working", source, "s" if len(old) > 1 else "", ", ".join(old),
                    ", ".join(RENAMED_FIELDS[name] for name in old))
    out = {RENAMED_FIELDS.get(name, name): value for name, value in values.items() if name not in RENAMED_FIELDS}
    for name in old:
        out.setdefault(RENAMED_FIELDS[name], values[name])
    return out


_TOLD: set = set()


def canonical_path(path: str) -> str:
    """"training.lr" -> "training.learning_rate"; other "section.field" paths unchanged."""
    section, _, name = path.partition(".")
    return f"{section}.{RENAMED_FIELDS[name]}" if section == "training" and name in RENAMED_FIELDS else path


# ------------------------------------------------------------------------------------------------ field plumbing
def _section_fields(section) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(section)}


def _field_type(section_cls: type, name: str) -> Any:
    return typing.get_type_hints(section_cls)[name]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, with an error that names the field."""
    inner, optional = _unwrap_optional(tp)
    if inner is bool and optional and isinstance(value, str) and value.strip().lower() == "auto":
        return None  # an optional switch left to colintern (bf16)
    if typing.get_origin(inner) in (typing.Union, types.UnionType) and str in typing.get_args(inner):
        return value if isinstance(value, (str, list)) or value is None else str(value)  # e.g. report_to: "none"
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in {"none", "null", ""}):
        if optional:
            return None
        raise ColinternError(f"{where} cannot be empty")
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if inner is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if inner is float:
            return float(value)
        if inner is str:
            return str(value)
        if typing.get_origin(inner) in (list, dict) or inner in (list, dict):
            expected = typing.get_origin(inner) or inner
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, expected):
                raise ValueError(value)
            return value
    except (TypeError, ValueError) as error:
        raise ColinternError(f"{where}: cannot use {value!r} (expected {getattr(inner, '__name__', inner)})") from error
    return value


def apply_overrides(config: RunConfig, data: dict, source: str = "configuration") -> None:
    """Set fields from a nested dict {section: {field: value}}; unknown names are errors, not silently ignored."""
    for key, value in data.items():
        if key in ("base", "runtime"):  # runtime: where a saved run ran (colintern_run.json), not configuration
            continue
        if key == "preset":
            config.preset = value
            continue
        if key not in RunConfig.SECTIONS:
            raise ColinternError(f"{source}: unknown section '{key}'; valid: {', '.join(RunConfig.SECTIONS)}")
        if not isinstance(value, dict):
            raise ColinternError(f"{source}: section '{key}' must be a mapping")
        section = getattr(config, key)
        known = {name: f for name, f in _section_fields(section).items() if f.init}
        if key == "training":
            value = upgrade_training_keys(value, source)
        changed = {}
        for name, item in value.items():
            if key == "training" and name in DECIDED_BY_COLINTERN and item != getattr(_default_training(), name):
                raise ColinternError(f"{source}: training.{name} (--{name}) is set by colintern from "
                                     f"{DECIDED_BY_COLINTERN[name]}; leave it out")
            if name not in known:
                import difflib

                close = difflib.get_close_matches(name, [*known, *RENAMED_FIELDS] if key == "training" else list(known),
                                                  n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ColinternError(f"{source}: unknown field '{key}.{name}'{hint}")
            tp = _field_type(type(section), name)
            if isinstance(item, str) and (bounds := Limits.from_metadata(known[name].metadata)) and bounds.choices:
                check_field(key, known[name], item, source)  # a word outside the choices, before it is converted
            value = coerce(item, tp, f"{source}: {key}.{name}")
            check_field(key, known[name], value, source)
            changed[name] = value
        if key == "training":
            config.training = rebuild_training(config.training, changed, source)
        else:
            for name, item in changed.items():
                setattr(section, name, item)


def rebuild_training(training: ColinternTrainingArguments, changes: dict, source: str) -> ColinternTrainingArguments:
    """`training` with `changes`, checked again by TrainingArguments itself (its errors become one line naming the
    source). `activation_checkpointing` follows `gradient_checkpointing` unless it is set itself."""
    try:
        return dataclasses.replace(training, **{"activation_checkpointing": None, **changes})
    except (ValueError, TypeError) as error:
        raise ColinternError(f"{source}: training options rejected by transformers.TrainingArguments: "
                             f"{' '.join(str(error).split())}") from error


def field_bounds(path: str) -> Limits:
    """The values the configuration field `path` ("section.field") accepts."""
    section, name = canonical_path(path).split(".")
    return Limits.from_metadata(_section_fields(getattr(RunConfig(), section))[name].metadata) or Limits()


def field_limits(path: str) -> dict:
    """`add_argument` keywords that check a script's own flag exactly like the configuration field `path` (e.g. the
    advisor's --lora-dropout like `lora.dropout`): one declaration of the range."""
    return limits(**dataclasses.asdict(field_bounds(path)))


def check_field(section: str, spec: dataclasses.Field, value: Any, source: str) -> None:
    """A ColinternError naming the option, the value, the allowed range and the source when `value` is out of range."""
    bounds = Limits.from_metadata(spec.metadata)
    if bounds is None:
        return
    flag = spec.metadata.get("flag")
    option = flag if source == "command line" and flag else f"{section}.{spec.name}" + (f" ({flag})" if flag else "")
    kind = int if isinstance(value, int) and not isinstance(value, bool) else float
    bounds.check(value, option, source, kind)


# ------------------------------------------------------------------------------------------------ YAML files
def preset_path(name: str) -> Path:
    path = PRESETS_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if not path.is_file():
        available = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml") if "search_space" not in p.stem)
        raise ColinternError(f"Unknown preset '{name}'. Available: {', '.join(available)}")
    return path


def load_yaml_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML (or JSON) config, merging `base:` chains (the child's values win)."""
    path = Path(path)
    if not path.is_file():
        raise ColinternError(f"Configuration file not found: {path}")
    if path.resolve() in _seen:
        raise ColinternError(f"Circular `base:` chain at {path}")
    try:
        data = yaml.safe_load(read_text(path, "configuration file")) or {}
    except yaml.YAMLError as error:
        raise ColinternError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ColinternError(f"{path} must contain a mapping of sections")
    if isinstance(data.get("training"), dict):  # before merging: an old name in a child overrides its base's new one
        data["training"] = upgrade_training_keys(data["training"], str(path))
    base = data.get("base")
    if not base:
        return data
    base_path = (path.parent / base) if (path.parent / base).is_file() else preset_path(str(base))
    return deep_merge(load_yaml_config(base_path, (*_seen, path.resolve())), data)


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if key == "training" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(upgrade_training_keys(merged[key]), upgrade_training_keys(value))
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    merged.pop("base", None)
    return merged


# ------------------------------------------------------------------------------------------------ advisor output
# The advisor's keys outside the training options (which it names as TrainingArguments does: learning_rate,
# per_device_train_batch_size, gradient_accumulation_steps, num_train_epochs, warmup_steps, gradient_checkpointing).
ADVISOR_KEYS = {
    "lora_rank": ("lora", "rank"),
    "lora_alpha": ("lora", "alpha"),
    # the advisor's batch assumes these choices, so they travel with it
    "lora_dropout": ("lora", "dropout"),
    "max_num_visual_tokens": ("model", "max_num_visual_tokens"),
    "quantize": ("model", "quantize"),
}
# the training options the advisor recommends (its JSON's top-level keys)
ADVISOR_TRAINING_KEYS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                         "num_train_epochs", "warmup_steps", "gradient_checkpointing")


def advisor_key(path: str) -> str | None:
    """The advisor JSON's top-level key for the configuration field `path` ("training.lr" -> "learning_rate"),
    or None when the advisor has none."""
    path = canonical_path(path)
    section, _, name = path.partition(".")
    if section == "training" and name in ADVISOR_TRAINING_KEYS:
        return name
    return next((key for key, target in ADVISOR_KEYS.items() if target == (section, name)), None)


def advisor_overrides(path: str | Path) -> dict:
    """Turn scripts/hyperparameter_optimizer.py's --json output (or optuna_best_params.json) into config sections."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ColinternError(f"--config-from {path}: unreadable JSON ({error})") from error
    if isinstance(data.get("hyperparameters"), dict):
        data = data["hyperparameters"]
    out: dict[str, dict] = {}
    for key in ADVISOR_TRAINING_KEYS:
        if key in data:
            out.setdefault("training", {})[key] = data[key]
    for key, (section, name) in ADVISOR_KEYS.items():
        if key in data:
            out.setdefault(section, {})[name] = data[key]
    for section in RunConfig.SECTIONS:  # also accept our own section layout (old training names too)
        if isinstance(data.get(section), dict):
            out.setdefault(section, {}).update(data[section])
    if not out:
        raise ColinternError(f"--config-from {path}: no known hyperparameters (expected keys "
                             f"{', '.join([*ADVISOR_TRAINING_KEYS, *ADVISOR_KEYS])})")
    return out


# ------------------------------------------------------------------------------------------------ command line
class ConfigArgumentParser(HfArgumentParser):
    """transformers' HfArgumentParser for the training options (every TrainingArguments field is a flag, spelled
    `--learning_rate` or `--learning-rate`, colintern's short flag such as `--lr` an alias), plus colintern's flags
    for the model, data, LoRA and experiment sections and --preset/--config/--config-from (`add_config_arguments`).

    Values are not converted here but where every source's are (`apply_overrides`: type, range, one-line error), and
    an option left out stays out of the namespace, so a flag overrides only what it names."""

    def __init__(self, **kwargs):
        super().__init__([], **kwargs)
        add_config_arguments(self)
        self.dataclass_types = [ColinternTrainingArguments]  # for HfArgumentParser.parse_dict / parse_yaml_file

    @staticmethod
    def _parse_dataclass_field(parser, field):
        metadata = {key: value for key, value in field.metadata.items() if key not in (*Limits.KEYS, "flag")}
        automatic = {f"--{field.name}", f"--{field.name.replace('_', '-')}"}
        flag = field.metadata.get("flag")
        metadata["aliases"] = [flag] if flag and flag not in automatic else []
        field = copy.copy(field)
        field.metadata = types.MappingProxyType(metadata)
        HfArgumentParser._parse_dataclass_field(parser, field)
        if field.default is False and field.type in (bool, bool | None):  # HF adds --no-X only for default-True
            parser.add_argument(f"--no_{field.name}", f"--no-{field.name.replace('_', '-')}", action="store_false",
                                dest=field.name, help=f"turn {flag} off" if flag else argparse.SUPPRESS)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per configuration field, plus --preset/--config/--config-from. The training options are
    TrainingArguments' fields as HfArgumentParser makes them (colintern's short flags as aliases); the other
    sections' flags are named in each field's metadata."""
    parser.add_argument("--preset", help=f"experiments/configs/<preset>.yaml (default {DEFAULT_PRESET}; demo for CPU)")
    parser.add_argument("--config", help="a YAML/JSON configuration file (may use `base:`)")
    parser.add_argument("--config-from", help="hyperparameters JSON from scripts/hyperparameter_optimizer.py --json")
    for section_name in RunConfig.SECTIONS:
        if section_name == "training":
            continue
        group = parser.add_argument_group(section_name)
        section_cls = type(getattr(RunConfig(), section_name))
        for f in fields(section_cls):
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            if flag is None:
                continue
            dest = f"cfg__{section_name}__{f.name}"
            tp, _ = _unwrap_optional(_field_type(section_cls, f.name))
            if tp is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
            else:
                group.add_argument(flag, dest=dest, default=None, metavar=f.name.upper(), help=f.metadata["help"])
    group = parser.add_argument_group(
        "training", "transformers.TrainingArguments (https://huggingface.co/docs/transformers/main_classes/trainer"
        "#transformers.TrainingArguments) with colintern's defaults and options")
    before = len(parser._actions)
    hints = typing.get_type_hints(ColinternTrainingArguments)
    for f in fields(ColinternTrainingArguments):
        if f.init:
            f = copy.copy(f)
            f.type = hints[f.name]
            ConfigArgumentParser._parse_dataclass_field(group, f)
    for action in parser._actions[before:]:
        action.default = argparse.SUPPRESS  # only what was given reaches the namespace
        if not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            action.type, action.choices = None, None  # converted and checked with the other sources' values


def training_flags(args: argparse.Namespace) -> dict:
    """The training options given on the command line (HfArgumentParser's dests: the field names)."""
    names = {f.name for f in fields(ColinternTrainingArguments) if f.init}
    return {name: value for name, value in vars(args).items() if name in names}


def config_parser(**kwargs) -> ConfigArgumentParser:
    """The command line of a training run (scripts/train.py)."""
    return ConfigArgumentParser(**kwargs)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Resolve the configuration from preset, files, advisor JSON and flags (in that order of precedence)."""
    config = RunConfig()
    file_data = load_yaml_config(args.config) if args.config else {}
    preset = args.preset or file_data.get("preset") or (None if args.config else DEFAULT_PRESET)
    if preset:
        apply_overrides(config, load_yaml_config(preset_path(preset)), f"preset {preset}")
        config.preset = preset
    if file_data:
        apply_overrides(config, {k: v for k, v in file_data.items() if k != "preset"}, str(args.config))
    if getattr(args, "config_from", None):
        apply_overrides(config, advisor_overrides(args.config_from), f"--config-from {args.config_from}")
    flags: dict[str, dict] = {}
    for key, value in vars(args).items():
        if key.startswith("cfg__") and value is not None:
            _, section, name = key.split("__", 2)
            flags.setdefault(section, {})[name] = value
    if given := training_flags(args):
        flags["training"] = given
    apply_overrides(config, flags, "command line")
    return config
