"""Loading ColIntern3.5 models and processors: local folders, Hub ids, embedded aliases and PEFT adapters.

One function per thing a user points at:
    load_model(path_or_id)       a base or merged checkpoint (Hub id, local folder, `embedded:` alias)
    load_processor(path_or_id)   its processor
    load_retriever(path)         any of the above or a PEFT adapter folder (base + adapter, optionally merged)
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from colintern.model.embedded import resolve_embedded
from colintern.utils import ADAPTER_CONFIG_FILE, ColinternError, read_run_config

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
    attention: str | None = None,
    **from_pretrained_kwargs,
):
    """A ColIntern3_5 from a base InternVL3.5 checkpoint (head initialised deterministically) or a saved retriever.

    `attention` ("causal" or "bidirectional", see `ColIntern3_5.set_attention`) overrides what the checkpoint's
    config.json says (None keeps it).
    """
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
    if attention is not None:
        model.set_attention(attention)
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


def saved_attention(path: str | Path) -> str | None:
    """The attention mode a trained retriever was trained with, from its run configuration (colintern_run.json in
    `path`, or in the run folder above a checkpoint-N folder); None when there is no record (then the model's
    config.json decides: causal unless it says `is_causal: false`)."""
    from colintern.model.architecture import ATTENTION_MODES

    path = Path(resolve_embedded(str(path))).expanduser()
    if not path.is_dir():
        return None
    run = read_run_config(path)
    if run is None and re.fullmatch(r"checkpoint-\d+", path.name):
        run = read_run_config(path.parent)
    mode = ((run or {}).get("model") or {}).get("attention")
    if mode is None:
        return None
    if mode not in ATTENTION_MODES:
        raise ColinternError(
            f"{path}: the run configuration says model.attention={mode!r}; expected one of {', '.join(ATTENTION_MODES)}"
        )
    return mode


def load_retriever(
    path: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    merge: bool = True,
    max_num_visual_tokens: int | None = None,
    base_model: str | None = None,
    attention: str | None = None,
):
    """(model, processor) from a base/merged checkpoint, a Hub id, an `embedded:` alias, or a PEFT adapter folder.

    For an adapter, the base model named in adapter_config.json (or `base_model`) is loaded, the adapter applied and,
    with `merge=True`, merged (`merge_and_unload`), so the result is a plain ColIntern3_5. The model attends as it was
    trained (`saved_attention`: an adapter's base model is causal, its run may not have been), unless `attention`
    says otherwise.
    """
    attention = attention or saved_attention(path)
    if not is_adapter_dir(path):
        model = load_model(path, device=device, dtype=dtype, attn_implementation=attn_implementation,
                           attention=attention)
        return model, load_processor(path, max_num_visual_tokens)

    from peft import PeftModel

    info = AdapterInfo.read(path)
    model = load_model(
        base_model or info.base_model, device=device, dtype=dtype, attn_implementation=attn_implementation,
        attention=attention,
    )
    model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    if merge:
        model = model.merge_and_unload()
    model._colintern_source = str(path)
    processor_source = path if has_processor_files(path) else (base_model or info.base_model)
    return model.eval(), load_processor(processor_source, max_num_visual_tokens)


# ---------------------------------------------------------------------------------------------------- resuming
def _list_names(names, limit: int = 6) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read_full_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"), device="cpu")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(folder / shard), device="cpu"))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    kind = "a LoRA adapter (train with --peft to resume it)" if is_adapter_dir(folder) else "no weights"
    raise ColinternError(f"Cannot resume from {folder}: it holds no full-model weights (model.safetensors) but {kind}.")


def load_checkpoint_weights(model, folder: str | Path) -> None:
    """Copy the full-model weights saved in `folder` into `model`, in place (the optimizer keeps its parameters).

    Checkpoint names are mapped to the model's exactly as `ColIntern3_5.from_pretrained` maps them (`save_pretrained`
    writes the legacy `language_model.model.*` layout: a plain `load_state_dict` matches none of the language model's
    tensors). Every tensor of the model must come from the checkpoint and every tensor of the checkpoint must land in
    the model, with its shape; otherwise a ColinternError names them and nothing is loaded.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    from colintern.model.modeling import CHECKPOINT_KEY_MAPPING

    folder = Path(folder)
    saved = _read_full_weights(folder)
    conversions = get_model_conversion_mapping(model, key_mapping=dict(CHECKPOINT_KEY_MAPPING))
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    expected = model.state_dict()
    ignored = [re.compile(pattern) for pattern in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    state, unexpected, mismatched, mismatched_names = {}, [], [], set()
    for key, tensor in saved.items():
        name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if name not in expected and key in expected:  # as from_pretrained: a name that needed no renaming
            name, converter = key, None
        if converter is not None:  # fusing/splitting conversions cannot be copied in place
            raise ColinternError(f"Cannot resume from {folder}: {key} needs a weight conversion ({converter}).")
        if name not in expected:
            if not any(pattern.search(name) for pattern in ignored):
                unexpected.append(key)
        elif tensor.shape != expected[name].shape:
            mismatched.append(f"{key} {tuple(tensor.shape)} (model: {tuple(expected[name].shape)})")
            mismatched_names.add(name)
        else:
            state[name] = tensor
    missing = sorted(set(expected) - set(state) - mismatched_names)
    problems = _tensor_problems("model", len(expected), missing, unexpected, mismatched)
    if problems:
        raise ColinternError(
            f"Cannot resume from {folder}: its weights do not match the model being trained: {'; '.join(problems)}. "
            "The checkpoint is damaged or comes from another model or configuration; resume from another "
            "checkpoint or start without --resume."
        )
    model.load_state_dict(state, strict=True)


def _tensor_problems(owner: str, n_expected: int, missing, unexpected, mismatched: list[str]) -> list[str]:
    """What is wrong with a checkpoint's tensors against the `owner`'s ("model" or "adapter"), one phrase each."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the {owner}'s {n_expected} tensors are missing ({_list_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are not the {owner}'s ({_list_names(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} have another shape ({_list_names(mismatched, 3)})")
    return problems


def check_adapter_checkpoint(model, folder: str | Path) -> None:
    """Refuse an adapter checkpoint whose tensors are not exactly those the PEFT `model` saves (peft would only warn
    and keep its initial values for what is missing)."""
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
            saved = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    elif (folder / "adapter_model.bin").is_file():
        saved = {k: tuple(v.shape) for k, v in torch.load(folder / "adapter_model.bin", weights_only=True).items()}
    else:
        kind = "full-model weights (train without --peft to resume it)" if (folder / "config.json").is_file() else (
            "no weights")
        raise ColinternError(f"Cannot resume from {folder}: it holds no adapter (adapter_model.safetensors) but {kind}.")
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    missing, unexpected = set(expected) - set(saved), set(saved) - set(expected)
    mismatched = [f"{k} {saved[k]} (model: {expected[k]})" for k in set(saved) & set(expected) if saved[k] != expected[k]]
    problems = _tensor_problems("adapter", len(expected), missing, unexpected, mismatched)
    if problems:
        raise ColinternError(
            f"Cannot resume from {folder}: its adapter does not match the one being trained: {'; '.join(problems)}. "
            "The checkpoint is damaged or was trained with other LoRA settings (--lora-rank, target modules, "
            "--train-vision); resume from another checkpoint or start without --resume."
        )
