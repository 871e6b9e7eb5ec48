"""The memory constraint: the memory model's peak for a configuration against the GPU budget, and the batch sizes
that cannot fit anywhere in the space."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from colintern.training.arguments import RunConfig
from colintern.tuning.search.space import ParameterSpec, SearchSpace, trial_config
from colintern.utils import ColinternError

logger = logging.getLogger(__name__)

MEMORY_CONSTRAINT = "peak_memory_over_budget_gib"


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
        per_device_batch_size=config.training.per_device_train_batch_size,
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
    spec = space.get("training.per_device_train_batch_size")
    largest = max(spec.values()) if spec is not None else corner.training.per_device_train_batch_size
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


