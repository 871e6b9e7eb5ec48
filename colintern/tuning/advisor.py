"""Hyperparameter advisor: from a model's config and a GPU, a training configuration that fits and follows the field.

Three layers, each usable on its own:
    analyze_architecture(model)          parameter counts, shapes and tokens per page, from the config alone (meta
                                         device, no weights)
    colintern.tuning.memory_model               peak training memory as a sum of named parts
    recommend(model, vram_gib=...)       the rules: learning rate, batch size, accumulation, LoRA rank, epochs, warmup
    largest_fitting_batch(model, ...)    the batch bound for a given configuration (e.g. for a hyperparameter search)

`model` is a local folder, an `embedded:` alias, a Hub id or a preset: the InternVL3.5 configs ship in
`colintern/configs/internvl3_5/`, so `OpenGVLab/InternVL3_5-1B-HF` (and 2B, 4B, 8B, 14B) resolve offline.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path

from colintern.model.architecture import (
    DEFAULT_MAX_NUM_VISUAL_TOKENS,
    InternVLArchitecture,
    tiles_per_page,
)
from colintern.cli import check_option
from colintern.training.arguments import LM_LINEAR_TARGETS, field_bounds
from colintern.utils import ARCHITECTURES_DIR, ColinternError

logger = logging.getLogger(__name__)

# Hub id -> shipped config folder. Shapes: Qwen3 configs as published by Qwen (Qwen/Qwen3-0.6B ... -14B config.json)
# and InternViT-300M-448px-V2_5; see configs/internvl3_5/README.md for the sources and the parameter-count check.
PRESETS: dict[str, str] = {
    "OpenGVLab/InternVL3_5-1B-HF": "InternVL3_5-1B",
    "OpenGVLab/InternVL3_5-2B-HF": "InternVL3_5-2B",
    "OpenGVLab/InternVL3_5-4B-HF": "InternVL3_5-4B",
    "OpenGVLab/InternVL3_5-8B-HF": "InternVL3_5-8B",
    "OpenGVLab/InternVL3_5-14B-HF": "InternVL3_5-14B",
}

# LoRA on the language model's linear layers only (the vision tower has q/k/v_proj too; a suffix list would adapt it
# as well), plus a trainable copy of the projection head - colpali-engine's recipe, and the trainer's default.
LM_LORA_TARGET_REGEX = LM_LINEAR_TARGETS
LORA_MODULES_TO_SAVE = ("custom_text_proj",)
# A page prompt is `<|im_start|>user\n<img>` + image-context tokens + `</img>`: 5 tokens besides the image's.
PAGE_PROMPT_TOKENS = 5


# ---------------------------------------------------------------------------------------------- model configs
def _preset_key(name: str) -> str:
    return name.lower().removeprefix("opengvlab/").removesuffix("-hf")


_PRESET_LOOKUP = {_preset_key(hub_id): folder for hub_id, folder in PRESETS.items()}


def preset_config_dir(name: str) -> Path | None:
    """The shipped config folder for a preset name or Hub id (`OpenGVLab/InternVL3_5-1B-HF`, `InternVL3_5-1B`)."""
    folder = _PRESET_LOOKUP.get(_preset_key(name))
    return ARCHITECTURES_DIR / folder if folder else None


def load_model_config(model):
    """The `InternVLConfig` of a local folder, `embedded:` alias, adapter folder, preset or (reachable) Hub id.

    Nothing but the config is read: no weights are loaded or downloaded.
    """
    from transformers.models.internvl import InternVLConfig

    from colintern.model.embedded import resolve_embedded
    from colintern.model.loading import AdapterInfo, is_adapter_dir

    if isinstance(model, InternVLConfig):
        return model
    name = str(model)
    try:
        resolved = resolve_embedded(name)
    except ValueError as error:
        raise ColinternError(str(error)) from error
    path = Path(resolved).expanduser()
    if path.is_dir() and is_adapter_dir(path) and not (path / "config.json").is_file():
        return load_model_config(AdapterInfo.read(path).base_model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ColinternError(f"'{name}' is a folder without config.json: point --model at a model checkpoint.")
        config = InternVLConfig.from_pretrained(str(path))
    elif path.is_file() and path.suffix == ".json":
        config = InternVLConfig.from_json_file(str(path))
    elif (preset := preset_config_dir(name)) is not None:
        config = InternVLConfig.from_pretrained(str(preset))
    else:
        config = _config_from_hub(name)
    if getattr(config, "model_type", None) != "internvl":
        raise ColinternError(
            f"'{name}' is a {getattr(config, 'model_type', 'unknown')!r} model; the advisor needs an InternVL "
            "(InternVL3.5) checkpoint."
        )
    return config


def _config_from_hub(name: str):
    from transformers.models.internvl import InternVLConfig

    from colintern.hub import prefer_offline_when_unreachable

    known = ", ".join(PRESETS)
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise ColinternError(
            f"No model config at '{name}': not a folder, a config.json, a preset ({known}) or a Hub id."
        )
    prefer_offline_when_unreachable()
    try:
        return InternVLConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ColinternError(
            f"Cannot read the config of '{name}': it is not a local folder or a shipped preset, and the Hub cannot "
            f"provide it ({reason}). Shipped presets: {known}; or pass a local checkpoint folder."
        ) from error


# ---------------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class ArchitectureSummary(InternVLArchitecture):
    """The architecture (`colintern.model.architecture.InternVLArchitecture`) with what the advisor and the memory
    model add to it: exact parameter counts, the LoRA size at a rank and the page budget.

    Parameter counts are exact: the model is built on the meta device (no memory, no weights).
    `backbone_params` is the published InternVL model (with its LM head, as model cards count it);
    `total_params` is the retriever ColIntern3_5 (no LM head, plus `custom_text_proj`).
    """

    source: str
    backbone_params: int
    total_params: int
    vision_params: int
    projector_params: int
    language_params: int
    head_params: int
    lm_head_params: int
    lora_rank: int
    lora_params: int  # LoRA A/B matrices on the LM linears at `lora_rank`
    max_num_visual_tokens: int
    tiles_per_page: int  # at most, thumbnail included
    checkpoint_dtype: str | None = None

    @property
    def image_tokens_per_page(self) -> int:
        return self.tiles_per_page * self.image_seq_length

    @property
    def page_tokens(self) -> int:
        """Sequence length of a page in the language model: image tokens + the prompt around them."""
        return self.image_tokens_per_page + PAGE_PROMPT_TOKENS

    @property
    def lora_trainable_params(self) -> int:
        """Trainable parameters under the LM-LoRA recipe: LoRA matrices + the trainable copy of the head."""
        return self.lora_params + self.head_params

    def lora_params_at(self, rank: int) -> int:
        """LoRA parameters scale linearly with the rank: r * (in + out) per adapted linear."""
        return self.lora_params * rank // self.lora_rank

    def to_dict(self) -> dict:
        data = super().to_dict()
        data.update(
            image_tokens_per_page=self.image_tokens_per_page,
            page_tokens=self.page_tokens,
            lora_trainable_params=self.lora_trainable_params,
        )
        return data


def count_lora_parameters(model, rank: int, target_regex: str = LM_LORA_TARGET_REGEX) -> int:
    """Parameters peft's LoRA adds at `rank`: r * (in_features + out_features) per linear matching `target_regex`
    (peft matches a string target with `re.fullmatch` on the module name)."""
    from torch import nn

    pattern = re.compile(target_regex)
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and pattern.fullmatch(name)
    )


@lru_cache(maxsize=32)
def _parameter_counts(config_json: str) -> dict[str, int]:
    """Exact parameter counts of ColIntern3_5 and of the published InternVL model, built on the meta device (no
    memory, no weights). Cached by the config's JSON: recommending for many GPU sizes builds each model once."""
    import torch
    from transformers.models.internvl import InternVLConfig, InternVLForConditionalGeneration

    from colintern.model.modeling import ColIntern3_5

    config = InternVLConfig.from_dict(json.loads(config_json))
    with torch.device("meta"):
        retriever = ColIntern3_5(config)
        published = InternVLForConditionalGeneration(config)

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {
        "backbone": count(published),
        "lm_head": count(published) - count(published.model),
        "total": count(retriever),
        "vision": count(retriever.vision_tower),
        "projector": count(retriever.multi_modal_projector),
        "language": count(retriever.language_model),
        "head": count(retriever.custom_text_proj),
        "lora_per_rank": count_lora_parameters(retriever, 1),
        "embedding_dim": retriever.embedding_dim,
    }


def analyze_architecture(
    model,
    *,
    lora_rank: int = 32,
    max_num_visual_tokens: int | None = None,
) -> ArchitectureSummary:
    """Shapes and exact parameter counts of `model` (path, alias, preset, Hub id or `InternVLConfig`).

    `max_num_visual_tokens` defaults to the processor's default budget (1536) for full-size models and to one tile
    for models whose tiles are smaller than 448 px (the embedded tiny checkpoint).
    """
    config = load_model_config(model)
    counts = _parameter_counts(config.to_json_string(use_diff=False))
    architecture = InternVLArchitecture.from_config(config, embedding_dim=counts["embedding_dim"])
    if max_num_visual_tokens is None:
        large_tiles = architecture.vision.image_size >= 448
        max_num_visual_tokens = DEFAULT_MAX_NUM_VISUAL_TOKENS if large_tiles else architecture.image_seq_length
    return ArchitectureSummary(
        **{f.name: getattr(architecture, f.name) for f in fields(InternVLArchitecture)},
        source=str(model) if not hasattr(model, "to_dict") else getattr(model, "_name_or_path", "config"),
        backbone_params=counts["backbone"],
        total_params=counts["total"],
        vision_params=counts["vision"],
        projector_params=counts["projector"],
        language_params=counts["language"],
        head_params=counts["head"],
        lm_head_params=counts["lm_head"],
        lora_rank=lora_rank,
        lora_params=counts["lora_per_rank"] * lora_rank,
        max_num_visual_tokens=int(max_num_visual_tokens),
        tiles_per_page=tiles_per_page(int(max_num_visual_tokens), architecture.image_seq_length),
        checkpoint_dtype=str(getattr(config, "dtype", None) or "").replace("torch.", "") or None,
    )


# ---------------------------------------------------------------------------------------------- rules
REFERENCE_EFFECTIVE_BATCH = 64  # the reference the learning-rate table is stated for
DEFAULT_EPOCHS = 5  # ColQwen2's recipe (colpali-engine): 5 epochs
# vidore/colpali_train_set, train split: 118,695 query-page pairs (ColPali paper, Faysse et al. 2024,
# arXiv:2407.01449, section 4.1 "Training dataset"; the dataset card lists the same 118,695 train rows, 500 test).
COLPALI_TRAIN_SET_PAIRS = 118_695
DEFAULT_VRAM_GIB = 16.0  # assumed when no GPU is visible (a common 16 GB card)
SAFETY_MARGIN = 0.10  # keep 10% of the GPU free: the memory model's error target is 15% at worst, ~1-5% measured
DEFAULT_QUERY_TOKENS = 64  # "Query: " + a question + 10 augmentation tokens, padded to the batch's longest
WARMUP_FRACTION = 0.03  # within the field's 2.5-5%
MIN_WARMUP_STEPS = 100  # ColQwen2's 100 warmup steps, kept while it stays <= 5% of the run

# Learning rate by model size (published parameter count), for LoRA at the reference effective batch of 64.
# < 0.5B 7e-5, ~1B 5e-5, 3B+ 3e-5 is the seed table (ColPali/ColQwen recipes: 5e-5 for 2-3B with LoRA r=32).
# Beyond ~7B it keeps falling with the width: Adam's best learning rate scales about as 1/width (muP, Yang et al.
# 2022, arXiv:2203.03466), and Qwen3's hidden size grows 2560 (4B) -> 4096 (8B) -> 5120 (14B, 32B):
# 3e-5 * 2560/4096 ~ 2e-5, 3e-5 * 2560/5120 = 1.5e-5. The table is non-increasing, so a larger model never gets a
# larger learning rate.
LEARNING_RATE_BY_SIZE: tuple[tuple[float, float], ...] = (
    (0.5e9, 7e-5),
    (3e9, 5e-5),
    (7e9, 3e-5),
    (12e9, 2e-5),
    (30e9, 1.5e-5),
    (math.inf, 1e-5),
)
# LoRA rank by model size: 16 below 1B, 32 around 1B (ColPali/ColQwen2: r = alpha = 32), 64 from 3B on.
LORA_RANK_BY_SIZE: tuple[tuple[float, int], ...] = ((0.75e9, 16), (3e9, 32), (math.inf, 64))


# Language models narrower than InternVL3.5-1B's (Qwen3-0.6B, 1024 wide) get the published small-model recipe scaled
# as 1/width (the muP law the table follows above 7B; Yang et al. 2022): colpali-engine's ColSmolVLM recipe
# (scripts/configs/idefics/train_colsmolvlm_model.yaml: SmolVLM2-256M, whose SmolLM2-135M is 576 wide) trains LoRA
# r = alpha = 32 at 5e-4, 10x the 2-3B recipes' 5e-5; so 5e-4 x 576 / width, when larger than the table's rate.
# The embedded tiny backbone (128 wide) gets 2.25e-3, a factor 3 below the best rate measured on the demo's LoRA stage
# (results/ablations/demo-lora-lr.md: 6.75e-3); the former anchor (5e-5 x 1024/width = 4e-4) was 17x below it.
# Models 1024 wide or wider keep the table: the published recipes jump between the two sizes (ColSmol 256M/500M at
# 5e-4; ColPali/ColQwen2 at 5e-5, ColQwen2.5-3B's current script at 2e-4) and InternVL3.5-1B stays at 5e-5.
WIDTH_REFERENCE = (576, 5e-4)
NARROW_BELOW = 1024  # InternVL3.5-1B's language model width: narrower ones get the width-scaled small-model rate


def base_learning_rate(params: int) -> float:
    """The table's learning rate for a model of `params` parameters (at effective batch 64)."""
    return next(lr for bound, lr in LEARNING_RATE_BY_SIZE if params < bound)


def learning_rate_for(params: int, text_hidden: int) -> float:
    """The table's rate, or 5e-4 x 576 / width for language models narrower than InternVL3.5-1B's, if larger."""
    width, rate = WIDTH_REFERENCE
    if text_hidden >= NARROW_BELOW:
        return base_learning_rate(params)
    return max(base_learning_rate(params), rate * width / text_hidden)


def scale_learning_rate(
    learning_rate: float, effective_batch: int, reference: int = REFERENCE_EFFECTIVE_BATCH
) -> float:
    """Square-root scaling: lr * sqrt(effective_batch / reference).

    For Adam-type optimizers the linear rule (Goyal et al. 2017) overshoots: Adam normalises the update by the
    gradient's second moment, and keeping the optimizer's SDE unchanged requires lr to scale with the square root of
    the batch (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms",
    arXiv:2205.10287; also Hoffer et al. 2017).
    """
    return learning_rate * math.sqrt(effective_batch / reference)


def lora_rank_for_size(params: int) -> int:
    return next(rank for bound, rank in LORA_RANK_BY_SIZE if params < bound)


def warmup_steps_for(total_steps: int) -> int:
    """3% of the optimizer steps, at least 100 when 100 is still <= 5% of the run (so short runs are not all warmup)."""
    return max(round(WARMUP_FRACTION * total_steps), min(MIN_WARMUP_STEPS, round(0.05 * total_steps)))


def _power_of_two_floor(value: int) -> int:
    return 1 << (value.bit_length() - 1) if value >= 1 else 0


@dataclass
class GpuInfo:
    """The memory the advisor plans for."""

    vram_bytes: int
    name: str
    count: int
    detected: bool

    @property
    def vram_gib(self) -> float:
        return self.vram_bytes / 1024**3


def detect_gpu(vram_gib: float | None = None, num_gpus: int | None = None) -> GpuInfo:
    """The visible GPU (device 0), or `vram_gib` when given; without a GPU, DEFAULT_VRAM_GIB."""
    import torch

    available = torch.cuda.is_available()
    count = num_gpus if num_gpus is not None else (torch.cuda.device_count() if available else 1)
    if vram_gib is not None:
        name = torch.cuda.get_device_name(0) if available else "as stated (--vram-gb)"
        return GpuInfo(int(vram_gib * 1024**3), name, count, detected=False)
    if available:
        properties = torch.cuda.get_device_properties(0)
        return GpuInfo(int(properties.total_memory), properties.name, count, detected=True)
    return GpuInfo(int(DEFAULT_VRAM_GIB * 1024**3), f"none visible: {DEFAULT_VRAM_GIB:g} GB assumed", count, False)


def largest_fitting_batch(
    model,
    vram_gib: float,
    *,
    lora_rank: int = 32,
    gradient_checkpointing: bool = True,
    max_num_visual_tokens: int | None = None,
    safety_margin: float = SAFETY_MARGIN,
    limit: int = 1024,
    **setup_fields,
) -> int:
    """The largest per-device batch of `model` whose estimated peak fits `vram_gib` less the safety margin (0 if
    none). `setup_fields` are further `TrainingMemorySetup` fields (query_tokens, dtype, lora_dropout, ...)."""
    from colintern.tuning.memory_model import TrainingMemorySetup, max_batch_size

    arch = analyze_architecture(model, lora_rank=lora_rank, max_num_visual_tokens=max_num_visual_tokens)
    setup = TrainingMemorySetup(lora_rank=lora_rank, gradient_checkpointing=gradient_checkpointing, **setup_fields)
    return max_batch_size(arch, setup, int(vram_gib * 1024**3 * (1 - safety_margin)), limit=limit)


@dataclass
class Recommendation:
    """The advisor's training configuration, the estimate behind it and the reasoning, in order."""

    model: str
    arch: ArchitectureSummary
    gpu: GpuInfo
    dataset_size: int
    learning_rate: float
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    num_train_epochs: int
    warmup_steps: int
    total_steps: int
    lora_rank: int
    lora_alpha: int
    lora_dropout: float
    gradient_checkpointing: bool
    memory: object  # colintern.tuning.memory_model.MemoryEstimate at the chosen configuration
    quantize: str | None = None
    reasoning: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # gradient cache (--batch-size cache_in_batch_size --cache-chunk-size cache_chunk_size): None when none helps
    cache_in_batch_size: int | None = None
    cache_chunk_size: int | None = None
    cache_memory: object = None  # its MemoryEstimate

    def to_json(self) -> dict:
        """The keys `scripts/train.py --config-from` reads (TrainingArguments / LoraConfig names), then context."""
        return {
            "learning_rate": self.learning_rate,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "effective_batch_size": self.effective_batch_size,
            "num_train_epochs": self.num_train_epochs,
            "warmup_steps": self.warmup_steps,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "estimated_peak_memory_gb": round(self.memory.peak_gib, 2),
            "lora_dropout": self.lora_dropout,
            "gradient_checkpointing": self.gradient_checkpointing,
            "max_num_visual_tokens": self.arch.max_num_visual_tokens,
            **({"quantize": self.quantize} if self.quantize else {}),
            **({"gradient_cache": {"per_device_train_batch_size": self.cache_in_batch_size,
                                   "cache_chunk_size": self.cache_chunk_size,
                                   "estimated_peak_memory_gb": round(self.cache_memory.peak_gib, 2)}}
               if self.cache_in_batch_size else {}),
            "advisor": {
                "model": self.model,
                "gpu": self.gpu.name,
                "vram_gb": round(self.gpu.vram_gib, 2),
                "num_gpus": self.gpu.count,
                "dataset_size": self.dataset_size,
                "total_steps": self.total_steps,
                "memory": self.memory.to_dict(),
                "architecture": self.arch.to_dict(),
                "reasoning": self.reasoning,
                "notes": self.notes,
            },
        }


def recommend(
    model,
    *,
    vram_gib: float | None = None,
    num_gpus: int | None = None,
    dataset_size: int = COLPALI_TRAIN_SET_PAIRS,
    max_num_visual_tokens: int | None = None,
    query_tokens: int = DEFAULT_QUERY_TOKENS,
    dtype: str = "bfloat16",
    gradient_checkpointing: bool | None = None,
    lora_dropout: float = 0.1,
    epochs: int = DEFAULT_EPOCHS,
    quantize: str | None = None,
) -> Recommendation:
    """A LoRA training configuration for `model` on the visible (or stated) GPU, following the rules above.

    Args:
        model: path, `embedded:` alias, preset, Hub id or InternVLConfig.
        vram_gib: GPU memory per device in GiB (as torch and nvidia-smi report it); None: the visible GPU.
        gradient_checkpointing: None decides: on exactly when it lets a larger per-device batch fit.
        quantize: "4bit" / "8bit": QLoRA (`--quantize`), the language model's linears stored quantised.
    """
    from colintern.tuning.memory_model import TrainingMemorySetup, estimate_peak_memory, max_batch_size

    check_option(vram_gib, "--vram-gb", gt=0)
    check_option(num_gpus, "--num-gpus", kind=int, ge=1)
    check_option(dataset_size, "--dataset-size", kind=int, ge=1)
    field_bounds("model.max_num_visual_tokens").check(max_num_visual_tokens, "--max-num-visual-tokens", None, int)
    check_option(query_tokens, "--query-tokens", kind=int, ge=1)
    field_bounds("lora.dropout").check(lora_dropout, "--lora-dropout", None)
    check_option(epochs, "--epochs", kind=int, ge=1)
    gpu = detect_gpu(vram_gib, num_gpus)
    if gpu.vram_bytes <= 0 or gpu.count < 1:  # a visible GPU reported no memory, or none is visible
        raise ColinternError("--vram-gb and --num-gpus must be positive.")
    probe = analyze_architecture(model, max_num_visual_tokens=max_num_visual_tokens)
    size = probe.backbone_params
    rank = lora_rank_for_size(size)
    arch = probe if rank == probe.lora_rank else _at_rank(probe, rank)
    reasoning, notes = [], []
    if not gpu.detected and vram_gib is None:
        notes.append(f"No GPU is visible: planning for {DEFAULT_VRAM_GIB:g} GB (set --vram-gb for your GPU).")
    if _is_embedded_tiny(model):
        notes.append(
            "This is the embedded tiny checkpoint with random weights: the rules below are for fine-tuning a "
            "pretrained backbone. The demo trains it from scratch instead (full training, lr ~1e-3)."
        )

    # Batch: the largest per-device batch that fits with the safety margin. In-batch negatives are the other pages
    # of the same micro-batch (gradient accumulation adds none), so a larger per-device batch is preferred, with
    # gradient checkpointing when only it makes that batch fit. Powers of two divide the effective batch exactly.
    budget = int(gpu.vram_bytes * (1 - SAFETY_MARGIN))
    cap = _power_of_two_floor(max(1, REFERENCE_EFFECTIVE_BATCH // gpu.count))
    device = "cuda"
    setup = TrainingMemorySetup(
        query_tokens=query_tokens,
        finetuning="lora",
        lora_rank=rank,
        lora_dropout=lora_dropout,
        dtype=dtype,
        autocast=dtype != "float32",
        device=device,
        world_size=gpu.count,
        quantize=quantize,
    )
    fits_plain = max_batch_size(arch, setup.replace(gradient_checkpointing=False), budget, limit=cap)
    fits_checkpointed = max_batch_size(arch, setup.replace(gradient_checkpointing=True), budget, limit=cap)
    if gradient_checkpointing is None:
        batch = _power_of_two_floor(max(fits_plain, fits_checkpointed))
        use_checkpointing = fits_plain < batch
    else:
        use_checkpointing = gradient_checkpointing
        batch = _power_of_two_floor(fits_checkpointed if use_checkpointing else fits_plain)
    if batch < 1:
        smallest = estimate_peak_memory(arch, setup.replace(per_device_batch_size=1, gradient_checkpointing=True))
        hint = "" if gradient_checkpointing is not False else "enable gradient checkpointing, "
        raise ColinternError(
            f"{model} does not fit in {gpu.vram_gib:.1f} GiB at batch 1: about {smallest.peak_gib:.1f} GiB are "
            f"needed even with gradient checkpointing ({smallest.part('frozen weights').gib:.1f} GiB of them frozen "
            f"weights), and {100 * SAFETY_MARGIN:.0f}% is kept free. {hint}Use a larger GPU or fewer visual tokens "
            f"(--max-num-visual-tokens, now {arch.max_num_visual_tokens})"
            + ("." if quantize == "4bit" else "; or quantise the language model (--quantize 4bit).")
        )
    estimate = estimate_peak_memory(
        arch, setup.replace(per_device_batch_size=batch, gradient_checkpointing=use_checkpointing)
    )
    accumulation = max(1, round(REFERENCE_EFFECTIVE_BATCH / (batch * gpu.count)))
    effective = batch * accumulation * gpu.count
    reasoning.append(
        f"Batch size {batch}: the largest power of two whose estimated peak fits {100 * (1 - SAFETY_MARGIN):.0f}% of "
        f"{gpu.vram_gib:.1f} GiB ({estimate.peak_gib:.1f} GiB; up to {fits_plain} fit without gradient "
        f"checkpointing, {fits_checkpointed} with it, capped at {cap}). A larger micro-batch gives each query more "
        "in-batch negatives; gradient accumulation adds none."
    )
    reasoning.append(
        "Gradient checkpointing "
        + (
            f"on: without it only {fits_plain} pairs fit per device (it costs ~30% more compute per step)."
            if use_checkpointing
            else "off: the batch fits without recomputation."
        )
    )
    reasoning.append(
        f"Gradient accumulation {accumulation}: {batch} x {accumulation} x {gpu.count} GPU(s) = effective batch "
        f"{effective}, the reference batch of {REFERENCE_EFFECTIVE_BATCH} the learning-rate table is stated for."
    )

    cache_in_batch, cache_chunk, cache_estimate = _gradient_cache_batch(
        arch, setup.replace(gradient_checkpointing=use_checkpointing), batch, budget
    )
    if cache_in_batch:
        reasoning.append(
            f"Gradient cache: in-batch {cache_in_batch} in chunks of {cache_chunk} (--batch-size {cache_in_batch} "
            f"--cache-chunk-size {cache_chunk}) fits too ({cache_estimate.peak_gib:.1f} GiB: activations of "
            f"{cache_chunk} rows at a time, the loss over all {cache_in_batch}): {cache_in_batch // batch}x the "
            "in-batch negatives for one extra forward pass of compute. The largest of 1024/512/256/128 that fits; "
            "the MaxSim score tensor, quadratic in the in-batch size, is what limits it."
        )

    base = learning_rate_for(size, arch.text.hidden)
    learning_rate = scale_learning_rate(base, effective)
    narrow = base > base_learning_rate(size)
    reasoning.append(
        f"Learning rate {learning_rate:.3g}: {base:.3g} for a {_short(size)}-parameter model (< 0.5B 7e-5, ~1B "
        f"5e-5, 3B+ 3e-5, lower beyond as 1/width"
        + (f"; its language model is {arch.text.hidden} wide, narrower than InternVL3.5-1B's 1024, so the "
           f"published small-model recipe (ColSmolVLM, 576 wide: 5e-4) x 576/{arch.text.hidden}, the 1/width law "
           "of muP)" if narrow else ")")
        + (
            f", x sqrt({effective}/{REFERENCE_EFFECTIVE_BATCH}) for the effective batch (square-root scaling for "
            "Adam, Malladi et al. 2022)."
            if effective != REFERENCE_EFFECTIVE_BATCH
            else " at the reference effective batch (no scaling)."
        )
    )
    reasoning.append(
        f"LoRA rank {rank}, alpha {rank}: 16 below 1B, 32 around 1B, 64 from 3B parameters; alpha = rank keeps the "
        f"update scale alpha/r = 1. Targets: the language model's attention and MLP linears ({arch.lora_params:,} "
        f"parameters) + a trainable copy of the projection head ({arch.head_params:,})."
    )
    steps_per_epoch = math.ceil(dataset_size / effective)
    total_steps = steps_per_epoch * epochs
    warmup = warmup_steps_for(total_steps)
    reasoning.append(
        f"{epochs} epochs (ColQwen2's recipe): {dataset_size:,} pairs / {effective} = {steps_per_epoch:,} optimizer "
        f"steps per epoch, {total_steps:,} in all."
    )
    reasoning.append(
        f"Warmup {warmup} steps: {100 * warmup / total_steps:.1f}% of the run ({100 * WARMUP_FRACTION:.0f}% of the "
        f"steps, at least {MIN_WARMUP_STEPS} while that stays within 5%)."
    )
    return Recommendation(
        model=str(model),
        arch=arch,
        gpu=gpu,
        dataset_size=dataset_size,
        learning_rate=float(f"{learning_rate:.3g}"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=effective,
        num_train_epochs=epochs,
        warmup_steps=warmup,
        total_steps=total_steps,
        lora_rank=rank,
        lora_alpha=rank,
        lora_dropout=lora_dropout,
        gradient_checkpointing=use_checkpointing,
        memory=estimate,
        quantize=quantize,
        reasoning=reasoning,
        notes=notes,
        cache_in_batch_size=cache_in_batch or None,
        cache_chunk_size=cache_chunk or None,
        cache_memory=cache_estimate,
    )


def _gradient_cache_batch(arch, setup, batch: int, budget: int, sizes=(1024, 512, 256, 128)):
    """(in-batch size, chunk, estimate) of the gradient-cache step with the most in-batch negatives that fits
    `budget`: the largest of `sizes` above `batch`, with the largest power-of-two chunk up to `batch` (down to 4)
    that fits beside its loss; (0, 0, None) when none does."""
    from colintern.tuning.memory_model import estimate_peak_memory

    for size in sizes:
        if size <= batch:
            break
        chunk = batch
        while chunk >= min(4, batch):
            estimate = estimate_peak_memory(arch, setup.replace(per_device_batch_size=size, cache_chunk_size=chunk))
            if estimate.peak_bytes <= budget:
                return size, chunk, estimate
            chunk //= 2
    return 0, 0, None


def _at_rank(arch: ArchitectureSummary, rank: int) -> ArchitectureSummary:
    """The summary at another LoRA rank (LoRA parameters scale linearly with it)."""
    return replace(arch, lora_rank=rank, lora_params=arch.lora_params_at(rank))


def _is_embedded_tiny(model) -> bool:
    from colintern.model.embedded import EMBEDDED_MODEL

    if str(model) == EMBEDDED_MODEL:
        return True
    return (Path(str(model)).expanduser() / "colintern_embedded.json").is_file()


# ---------------------------------------------------------------------------------------------- report
def _short(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def format_architecture(arch: ArchitectureSummary) -> str:
    text, vision = arch.text, arch.vision
    rows = [
        ("Model", arch.source),
        ("Parameters (published model)", f"{arch.backbone_params:,}  ({_short(arch.backbone_params)}, with LM head)"),
        ("Parameters (ColIntern3.5)", f"{arch.total_params:,}  (no LM head, + projection head)"),
        (
            "  vision tower",
            f"{arch.vision_params:,}  ({vision.layers} layers, hidden {vision.hidden}, "
            f"{vision.heads} heads, MLP {vision.intermediate})",
        ),
        ("  projector", f"{arch.projector_params:,}"),
        (
            "  language model",
            f"{arch.language_params:,}  ({text.layers} layers, hidden {text.hidden}, "
            f"{text.heads}/{text.kv_heads} heads, head_dim {text.head_dim}, MLP {text.intermediate}, "
            f"vocab {text.vocab})",
        ),
        ("  projection head", f"{arch.head_params:,}  (hidden -> {arch.embedding_dim})"),
        (
            f"Trainable (LoRA r={arch.lora_rank})",
            f"{arch.lora_trainable_params:,}  (LoRA {arch.lora_params:,} + head {arch.head_params:,})",
        ),
        (
            "Image tokens per tile",
            f"{arch.image_seq_length}  ({vision.image_size}px tile, patch {vision.patch_size}, pixel shuffle 0.5)",
        ),
        (
            "Tiles per page",
            f"up to {arch.tiles_per_page}  (max_num_visual_tokens {arch.max_num_visual_tokens}"
            + (", thumbnail included)" if arch.tiles_per_page > 1 else ")"),
        ),
        (
            "Tokens per page",
            f"{arch.image_tokens_per_page} image + {arch.page_tokens - arch.image_tokens_per_page} "
            f"prompt = {arch.page_tokens}",
        ),
    ]
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows)


def format_recommendation(rec: Recommendation) -> str:
    """The full report: architecture, memory breakdown, the OPTIMAL HYPERPARAMETERS block, reasoning."""
    bar = "=" * 72
    memory = rec.memory
    lines = [bar, "ARCHITECTURE", bar, format_architecture(rec.arch), ""]
    lines += [
        bar,
        f"MEMORY BREAKDOWN (per device, batch {rec.per_device_train_batch_size}, {memory.setup.dtype}"
        f"{' + autocast' if memory.setup.uses_autocast else ''}, gradient checkpointing "
        f"{'on' if rec.gradient_checkpointing else 'off'})",
        bar,
        memory.format_table(),
        f"GPU: {rec.gpu.name}, {rec.gpu.vram_gib:.1f} GiB x {rec.gpu.count}",
        "",
    ]
    lines += [
        bar,
        "OPTIMAL HYPERPARAMETERS",
        bar,
        f"Learning Rate: {rec.learning_rate:.2e}",
        f"Batch Size: {rec.per_device_train_batch_size}",
        f"Gradient Accumulation: {rec.gradient_accumulation_steps}",
        f"Effective Batch Size: {rec.effective_batch_size}",
        f"Number of Epochs: {rec.num_train_epochs}",
        f"Warmup Steps: {rec.warmup_steps}",
        f"LoRA Rank: {rec.lora_rank} (alpha {rec.lora_alpha}, dropout {rec.lora_dropout:g})",
        f"Gradient Checkpointing: {'on' if rec.gradient_checkpointing else 'off'}",
        f"Estimated Peak Memory: {rec.memory.peak_gib:.1f} GiB of {rec.gpu.vram_gib:.1f} GiB",
        (f"Gradient Cache: in-batch {rec.cache_in_batch_size}, chunk {rec.cache_chunk_size} (--batch-size "
         f"{rec.cache_in_batch_size} --cache-chunk-size {rec.cache_chunk_size}; {rec.cache_memory.peak_gib:.1f} GiB)"
         if rec.cache_in_batch_size else "Gradient Cache: no in-batch above the batch size fits"),
        "",
        "Why:",
    ]
    lines += [f"  - {line}" for line in rec.reasoning]
    if rec.notes:
        lines += ["", "Notes:"] + [f"  - {note}" for note in rec.notes]
    return "\n".join(lines)
