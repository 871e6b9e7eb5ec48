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
    training: {lr: 5e-5, epochs: 5, batch_size: 16, grad_accum: 4, ...}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from colintern.cli import Limits, limits, read_text
from colintern.model.architecture import DEFAULT_MAX_NUM_VISUAL_TOKENS
from colintern.utils import PRESETS_DIR, ColinternError

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
LOSSES = ("colbert", "pairwise", "negative-ce", "pairwise-negative-ce")  # colintern.training.trainer.build_loss


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
        default="OpenGVLab/InternVL3_5-1B-HF",
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


@dataclass
class TrainingConfig:
    output_dir: str = field(
        default="experiments/runs/colintern3_5-1b", metadata=_flag("--output-dir", "run directory")
    )
    epochs: float = field(default=5.0, metadata=_flag("--epochs", "training epochs", gt=0))
    max_steps: int = field(
        default=-1, metadata=_flag("--max-steps", "stop after N optimizer steps (-1: epochs)", ge=1, also=(-1,))
    )
    batch_size: int = field(default=16, metadata=_flag("--batch-size", "per-device batch (queries = pages)", ge=1))
    grad_accum: int = field(default=4, metadata=_flag("--grad-accum", "gradient accumulation steps", ge=1))
    lr: float = field(default=5e-5, metadata=_flag("--lr", "peak learning rate (LoRA / trained weights)", gt=0))
    lr_head: float | None = field(
        default=None, metadata=_flag("--lr-head", "learning rate of custom_text_proj", gt=0)
    )
    lr_vision: float | None = field(
        default=None,
        metadata=_flag("--lr-vision", "learning rate of vision tower + projector (with --train-vision)", gt=0),
    )
    warmup_steps: int = field(default=100, metadata=_flag("--warmup-steps", "linear warm-up steps", ge=0))
    scheduler: str = field(
        default="linear", metadata=_flag("--scheduler", "linear, cosine or constant_with_warmup", choices=SCHEDULERS)
    )
    weight_decay: float = field(default=0.0, metadata=_flag("--weight-decay", "AdamW weight decay", ge=0))
    max_grad_norm: float = field(
        default=1.0, metadata=_flag("--max-grad-norm", "gradient clipping norm (0: none)", ge=0)
    )
    loss: str = field(
        default="colbert",
        metadata=_flag("--loss", "colbert, pairwise, negative-ce or pairwise-negative-ce", choices=LOSSES),
    )
    temperature: float | None = field(
        default=None, metadata=_flag("--temperature", "loss temperature (loss default)", gt=0)
    )
    train_vision: bool = field(
        default=False, metadata=_flag("--train-vision", "also train the vision tower and projector")
    )
    gradient_checkpointing: bool = field(
        default=True, metadata=_flag("--gradient-checkpointing", "recompute LM activations in the backward pass")
    )
    bf16: str = field(
        default="auto",
        metadata=_flag("--bf16", "auto (on CUDA with bf16 support), true, false",
                       choices=("auto", "true", "false", "yes", "no", "1", "0")),
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
    report_to: str = field(default="wandb", metadata=_flag("--report-to", "wandb, tensorboard or none"))
    run_name: str | None = field(default=None, metadata=_flag("--run-name", "name of the run in W&B/TensorBoard"))
    dataloader_num_workers: int = field(
        default=2, metadata=_flag("--num-workers", "data-loading worker processes (image decoding, tiling)", ge=0)
    )
    augment: dict = field(
        default_factory=dict, metadata={"flag": None, "help": "training-page augmentation settings (off when empty)"}
    )
    resume: str | None = field(
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


@dataclass
class RunConfig:
    """Everything a training run needs; saved resolved as `colintern_run.json` in the run directory."""

    preset: str | None = None
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("experiment", "model", "data", "lora", "training")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        from colintern.utils import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        config = cls()
        apply_overrides(config, data)
        return config


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
        known = _section_fields(section)
        for name, item in value.items():
            if name not in known:
                import difflib

                close = difflib.get_close_matches(name, list(known), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ColinternError(f"{source}: unknown field '{key}.{name}'{hint}")
            tp = _field_type(type(section), name)
            value = coerce(item, tp, f"{source}: {key}.{name}")
            check_field(key, known[name], value, source)
            setattr(section, name, value)


def field_bounds(path: str) -> Limits:
    """The values the configuration field `path` ("section.field") accepts."""
    section, name = path.split(".")
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
    base = data.get("base")
    if not base:
        return data
    base_path = (path.parent / base) if (path.parent / base).is_file() else preset_path(str(base))
    return deep_merge(load_yaml_config(base_path, (*_seen, path.resolve())), data)


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    merged.pop("base", None)
    return merged


# ------------------------------------------------------------------------------------------------ advisor output
ADVISOR_KEYS = {
    "learning_rate": ("training", "lr"),
    "per_device_train_batch_size": ("training", "batch_size"),
    "gradient_accumulation_steps": ("training", "grad_accum"),
    "num_train_epochs": ("training", "epochs"),
    "warmup_steps": ("training", "warmup_steps"),
    "lora_rank": ("lora", "rank"),
    "lora_alpha": ("lora", "alpha"),
    # the advisor's batch assumes these choices, so they travel with it
    "lora_dropout": ("lora", "dropout"),
    "gradient_checkpointing": ("training", "gradient_checkpointing"),
    "max_num_visual_tokens": ("model", "max_num_visual_tokens"),
    "quantize": ("model", "quantize"),
}


def advisor_overrides(path: str | Path) -> dict:
    """Turn scripts/hyperparameter_optimizer.py's --json output (or optuna_best_params.json) into config sections."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ColinternError(f"--config-from {path}: unreadable JSON ({error})") from error
    if isinstance(data.get("hyperparameters"), dict):
        data = data["hyperparameters"]
    out: dict[str, dict] = {}
    for key, (section, name) in ADVISOR_KEYS.items():
        if key in data:
            out.setdefault(section, {})[name] = data[key]
    for section in RunConfig.SECTIONS:  # also accept our own section layout
        if isinstance(data.get(section), dict):
            out.setdefault(section, {}).update(data[section])
    if not out:
        raise ColinternError(f"--config-from {path}: no known hyperparameters (expected keys {', '.join(ADVISOR_KEYS)})")
    return out


# ------------------------------------------------------------------------------------------------ command line
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per configuration field (flag names in each field's metadata), plus --preset/--config/--config-from."""
    parser.add_argument("--preset", help=f"experiments/configs/<preset>.yaml (default {DEFAULT_PRESET}; demo for CPU)")
    parser.add_argument("--config", help="a YAML/JSON configuration file (may use `base:`)")
    parser.add_argument("--config-from", help="hyperparameters JSON from scripts/hyperparameter_optimizer.py --json")
    for section_name in RunConfig.SECTIONS:
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
    apply_overrides(config, flags, "command line")
    return config
