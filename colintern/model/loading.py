"""Loading ColIntern3.5 models and processors: local folders, Hub ids, embedded aliases and PEFT adapters.

One function per thing a user points at:
    load_model(path_or_id)       a base or merged checkpoint (Hub id, local folder, `embedded:` alias)
    load_processor(path_or_id)   its processor
    load_retriever(path)         any of the above or a PEFT adapter folder (base + adapter, optionally merged)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from colintern.model.embedded import resolve_embedded
from colintern.utils import ADAPTER_CONFIG_FILE, ColinternError

logger = logging.getLogger(__name__)

HUB_HELP = (
    "If it is a Hugging Face Hub id, this machine cannot fetch it (offline, HF_HUB_OFFLINE=1, or not cached): "
    "download it where the Hub is reachable (`huggingface-cli download {name}`) and pass the local folder, "
    "or use the embedded default (`--preset demo`)."
)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (InternVL3.5's training precision), float32 on the CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.float32


def flash_attention_available() -> bool:
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available() and is_flash_attn_2_available()


def default_attn_implementation(device: str | torch.device) -> str:
    """flash_attention_2 on CUDA when the flash-attn package is installed, else PyTorch SDPA."""
    return "flash_attention_2" if torch.device(device).type == "cuda" and flash_attention_available() else "sdpa"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def _explain_load_error(name: str, error: Exception) -> ColinternError:
    local = Path(name).expanduser()
    if local.exists():
        return ColinternError(f"Cannot load '{name}': {error}")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return ColinternError(f"Cannot load '{name}': no such folder. Check the path.")
    return ColinternError(f"Cannot load '{name}': it is not a local folder. " + HUB_HELP.format(name=name))


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    mask_non_image_embeddings: bool = True,
    **from_pretrained_kwargs,
):
    """A ColIntern3_5 from a base InternVL3.5 checkpoint (head initialised deterministically) or a saved retriever."""
    from colintern.model.modeling import ColIntern3_5

    device = torch.device(device or default_device())
    resolved = resolve_embedded(str(name_or_path))
    try:
        model = ColIntern3_5.from_pretrained(
            resolved,
            dtype=dtype or default_dtype(device),
            attn_implementation=attn_implementation or default_attn_implementation(device),
            mask_non_image_embeddings=mask_non_image_embeddings,
            **from_pretrained_kwargs,
        )
    except OSError as error:
        raise _explain_load_error(str(name_or_path), error) from error
    model._colintern_source = str(name_or_path)
    return model.to(device)


def load_processor(name_or_path: str, max_num_visual_tokens: int | None = None, **kwargs):
    """The ColIntern3_5Processor of a checkpoint, optionally with a different visual-token budget."""
    from colintern.model.processing import ColIntern3_5Processor

    resolved = resolve_embedded(str(name_or_path))
    try:
        processor = ColIntern3_5Processor.from_pretrained(resolved, **kwargs)
    except OSError as error:
        raise _explain_load_error(str(name_or_path), error) from error
    if max_num_visual_tokens is not None:
        try:
            processor.set_max_num_visual_tokens(max_num_visual_tokens)
        except ValueError as error:  # below one tile of this model
            raise ColinternError(f"--max-num-visual-tokens {max_num_visual_tokens}: {error}") from error
    return processor


def has_processor_files(path: str | Path) -> bool:
    return (Path(path) / "processor_config.json").is_file() or (Path(path) / "tokenizer_config.json").is_file()


@dataclass
class AdapterInfo:
    """What an adapter folder says about itself: its `peft.PeftConfig` (adapter_config.json) and its base model."""

    path: Path
    base_model: str
    config: Any  # peft.PeftConfig (a LoraConfig for colintern's adapters)

    @classmethod
    def read(cls, path: str | Path) -> AdapterInfo:
        """Read `path`/adapter_config.json with peft; an unreadable file or a missing base model is an error."""
        from peft import PeftConfig

        path = Path(path)
        try:
            config = PeftConfig.from_pretrained(str(path))
        except (OSError, ValueError, TypeError) as error:
            raise ColinternError(f"{path}/{ADAPTER_CONFIG_FILE} is unreadable: {error}") from error
        if not config.base_model_name_or_path:
            raise ColinternError(f"{path}/{ADAPTER_CONFIG_FILE} names no base model (base_model_name_or_path).")
        return cls(path=path, base_model=config.base_model_name_or_path, config=config)


def load_retriever(
    path: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    merge: bool = True,
    max_num_visual_tokens: int | None = None,
    base_model: str | None = None,
):
    """(model, processor) from a base/merged checkpoint, a Hub id, an `embedded:` alias, or a PEFT adapter folder.

    For an adapter, the base model named in adapter_config.json (or `base_model`) is loaded, the adapter applied and,
    with `merge=True`, merged (`merge_and_unload`), so the result is a plain ColIntern3_5.
    """
    if not is_adapter_dir(path):
        model = load_model(path, device=device, dtype=dtype, attn_implementation=attn_implementation)
        return model, load_processor(path, max_num_visual_tokens)

    from peft import PeftModel

    info = AdapterInfo.read(path)
    model = load_model(
        base_model or info.base_model, device=device, dtype=dtype, attn_implementation=attn_implementation
    )
    model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    if merge:
        model = model.merge_and_unload()
    model._colintern_source = str(path)
    processor_source = path if has_processor_files(path) else (base_model or info.base_model)
    return model.eval(), load_processor(processor_source, max_num_visual_tokens)
