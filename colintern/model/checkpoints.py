"""What a checkpoint folder is, before and after loading it: identity for result files, and the trained-head check.

A retriever to evaluate is one of
    an adapter folder      adapter_config.json + adapter_model.safetensors (LoRA on the language model and the full
                           `custom_text_proj` through peft's `modules_to_save`), processor files, colintern_run.json
    a full checkpoint      config.json + model.safetensors (custom_text_proj included) + processor files
    a Hub id or an `embedded:` alias of a base model

`describe_checkpoint` gives it a stable mteb identity without loading it: a model name (`colintern/<folder>` for local
folders, the id for Hub models) and a revision (a content hash of the weights and configs for local folders, so a
retrained model never reuses the results of an earlier one; the commit for Hub models). `check_trained_head` refuses
a model whose projection head was never trained: the upstream failure where LoRA weights are evaluated on a freshly
initialised head and score at chance.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colintern.model.embedded import resolve_embedded
from colintern.utils import ColinternError, read_run_config, safe_name

logger = logging.getLogger(__name__)

HEAD_PREFIX = "custom_text_proj"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# Files whose content defines what a local checkpoint computes (weights, architecture, processor).
IDENTITY_FILE_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "adapter_config.json",
    "config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
NO_REVISION = "no_revision_available"  # mteb's name for an unknown revision
UNTRAINED_HEAD_HELP = (
    "Evaluate a trained adapter or checkpoint (scripts/train.py saves the head with the adapter), or pass "
    "--allow-untrained-head (allow_untrained_head=True) to score the untrained model on purpose, e.g. as the "
    "chance-level baseline."
)

WARMUP_HELP = (
    "Train longer than the warm-up (scripts/train.py --max-steps above {warmup}, or a smaller --warmup-steps), or "
    "pass --allow-untrained-head (allow_untrained_head=True) to evaluate it anyway."
)


@dataclass(frozen=True)
class CheckpointInfo:
    """A model to evaluate, as found on disk or on the Hub, not loaded.

    Attributes:
        source: what the user gave (path, Hub id or `embedded:` alias).
        kind: "adapter", "checkpoint" (a local full model) or "hub".
        path: the local folder (None for a Hub id that is not a local folder).
        base_model: for adapters, the base model named in adapter_config.json.
        name: mteb model name, "organization/model".
        revision: content hash (local) or commit (Hub), `NO_REVISION` when unknown.
        run_config: the trainer's resolved configuration (colintern_run.json), if present.
    """

    source: str
    kind: str
    path: Path | None
    base_model: str | None
    name: str
    revision: str
    run_config: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def head_in_weights(self) -> bool | None:
        """Whether the saved weights contain custom_text_proj (None when they cannot be inspected)."""
        if self.path is None:
            return None
        return head_weights_saved(self.path, adapter=self.kind == "adapter")

    def release_date(self) -> str | None:
        """Date (YYYY-MM-DD) the weights were written, for a local checkpoint."""
        if self.path is None:
            return None
        files = [p for name in (*ADAPTER_WEIGHT_FILES, *MODEL_WEIGHT_FILES) if (p := self.path / name).is_file()]
        if not files:
            return None
        stamp = max(p.stat().st_mtime for p in files)
        return _dt.datetime.fromtimestamp(stamp, tz=_dt.timezone.utc).date().isoformat()


def _hash_files(folder: Path, hasher) -> int:
    """Feed every identity file under `folder` (sorted, top level only) into `hasher`; returns how many."""
    files = sorted({p for pattern in IDENTITY_FILE_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    for path in files:
        hasher.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(chunk)
    return len(files)


def content_revision(folder: Path, extra: str = "") -> str:
    """12 hex digits identifying the weights and configs in `folder` (and `extra`, e.g. the base model's revision)."""
    hasher = hashlib.blake2b(digest_size=16)
    if _hash_files(folder, hasher) == 0:
        raise ColinternError(f"{folder} holds no model files (config.json, *.safetensors, adapter_config.json).")
    hasher.update(extra.encode())
    return hasher.hexdigest()[:12]


def hub_revision(repo_id: str) -> str:
    """The commit of a Hub model: from the local cache, else from the Hub, else `NO_REVISION`."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
        if isinstance(cached, str):
            parts = Path(cached).parts
            if "snapshots" in parts:
                return parts[parts.index("snapshots") + 1]
    except Exception:  # noqa: BLE001 - a revision is an annotation; never block loading for it
        pass
    try:
        from huggingface_hub import HfApi, constants

        if not constants.HF_HUB_OFFLINE:
            return HfApi().model_info(repo_id).sha or NO_REVISION
    except Exception:  # noqa: BLE001
        pass
    return NO_REVISION


def _base_identity(base_model: str) -> str:
    resolved = resolve_embedded(base_model)
    local = Path(resolved).expanduser()
    if local.is_dir():
        return content_revision(local)
    return hub_revision(base_model)


def describe_checkpoint(source: str, model_name: str | None = None) -> CheckpointInfo:
    """Identify `source` (adapter folder, checkpoint folder, `embedded:` alias or Hub id) without loading it."""
    from colintern.model.loading import AdapterInfo, is_adapter_dir

    source = str(source)
    resolved = Path(resolve_embedded(source)).expanduser()
    if resolved.is_dir():
        display = source.split(":", 1)[1] if source.startswith("embedded:") else resolved.resolve().name
        name = model_name or f"colintern/{safe_name(display, fallback='model')}"
        if is_adapter_dir(resolved):
            adapter = AdapterInfo.read(resolved)
            revision = content_revision(resolved, extra=_base_identity(adapter.base_model))
            return CheckpointInfo(
                source, "adapter", resolved, adapter.base_model, name, revision, read_run_config(resolved)
            )
        if not (resolved / "config.json").is_file():
            raise ColinternError(
                f"{source} is neither an adapter folder (adapter_config.json) nor a model folder (config.json)."
            )
        return CheckpointInfo(
            source, "checkpoint", resolved, None, name, content_revision(resolved), read_run_config(resolved)
        )
    if source.startswith(("/", ".", "~")) or source.count("/") != 1:
        raise ColinternError(f"{source}: no such folder, and not a Hugging Face Hub id (organization/model).")
    return CheckpointInfo(source, "hub", None, None, model_name or source, hub_revision(source), None)


# ---------------------------------------------------------------------------------------------------- head check
def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def saved_weight_names(folder: Path, adapter: bool) -> list[str] | None:
    """Names of the tensors saved in `folder`'s adapter or model weights (None when there are none to read)."""
    if adapter:
        if (folder / "adapter_model.safetensors").is_file():
            return _safetensors_keys(folder / "adapter_model.safetensors")
        if (folder / "adapter_model.bin").is_file():
            import torch

            return list(torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True))
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text()).get("weight_map", {}))
    if (folder / "model.safetensors").is_file():
        return _safetensors_keys(folder / "model.safetensors")
    return None


def head_weights_saved(folder: Path, adapter: bool) -> bool | None:
    """Whether the adapter / checkpoint in `folder` stores custom_text_proj.weight and .bias (None: no weights)."""
    names = saved_weight_names(folder, adapter)
    if names is None:
        return None
    found = {name.rsplit(".", 1)[-1] for name in names if f"{HEAD_PREFIX}." in name}
    return {"weight", "bias"} <= found


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def stopped_in_warmup(info: CheckpointInfo) -> tuple[int, int] | None:
    """(optimizer steps taken, warm-up steps) when the training run that saved `info` stopped before its warm-up
    finished, read from the run record (trainer_state.json, and colintern_run.json beside it or, for a checkpoint-N
    folder, in the run folder above); None when it did not or the record is absent."""
    if info.path is None:
        return None
    state = _read_json(info.path / "trainer_state.json")
    run = info.run_config or read_run_config(info.path.parent)
    try:
        steps, warmup = int(state["global_step"]), int(run["training"]["warmup_steps"])
    except (KeyError, TypeError, ValueError):
        return None
    return (steps, warmup) if steps <= warmup else None


def untrained_head_problem(model, info: CheckpointInfo) -> str | None:
    """Why the projection head of `info` is untrained, or None when it is trained (or cannot be told yet).

    With `model=None` only the saved files are inspected (no loading needed); with the loaded model, its head is
    also compared with the documented deterministic initialisation (`ColIntern3_5.head_is_untrained`).
    """
    diagnosis = _diagnose_head(model, info)
    return None if diagnosis is None else diagnosis[0]


def _diagnose_head(model, info: CheckpointInfo) -> tuple[str, str] | None:
    """(why the head is untrained, what to do), or None when it is trained (or cannot be told yet)."""
    saved = info.head_in_weights
    if info.kind == "adapter" and saved is False:
        return (
            f"the adapter {info.path} has no custom_text_proj weights in its adapter file, so the projection head "
            "would be the untrained initialisation (the adapter was saved without "
            "modules_to_save=['custom_text_proj'])"
        ), UNTRAINED_HEAD_HELP
    if info.kind != "adapter" and saved is False:
        problem = f"{info.source} has no custom_text_proj weights: it is a base model, not a trained retriever"
        return problem, UNTRAINED_HEAD_HELP
    if model is None or not model.head_is_untrained():
        return None
    warmup = stopped_in_warmup(info)
    if warmup is not None:
        steps, warmup_steps = warmup
        mid_run = re.fullmatch(r"checkpoint-\d+", info.path.name)
        ended = "this checkpoint was saved before the run's" if mid_run else "the run ended before its"
        return (
            f"{ended} warm-up finished ({steps} step{'s' if steps != 1 else ''}, warm-up "
            f"{warmup_steps}): the learning rate rises from 0 during warm-up, so the projection head "
            "(custom_text_proj) has not moved from its initialisation"
        ), WARMUP_HELP.format(warmup=warmup_steps)
    if info.kind == "adapter":
        return (
            f"the custom_text_proj weights saved in the adapter {info.path} are still the deterministic "
            f"initialisation (head_init_seed={model.config.head_init_seed}): the head was never trained"
        ), UNTRAINED_HEAD_HELP
    return (
        f"the projection head (custom_text_proj) of {info.source} equals the deterministic initialisation "
        f"(head_init_seed={model.config.head_init_seed}): it is a base model, not a trained retriever"
    ), UNTRAINED_HEAD_HELP


def check_trained_head(model, info: CheckpointInfo, allow_untrained_head: bool = False) -> None:
    """Raise a ColinternError naming the cause when the head is untrained, unless `allow_untrained_head`.

    Call it with `model=None` before loading (refuses at once what the files show) and again with the model.
    """
    diagnosis = _diagnose_head(model, info)
    if diagnosis is None:
        return
    problem, help_text = diagnosis
    if allow_untrained_head:
        if model is not None:  # warn once, after loading
            logger.warning("Evaluating an untrained projection head on purpose: %s.", problem)
        return
    raise ColinternError(f"Refusing to evaluate: {problem}. Its scores would be meaningless. {help_text}")


# ---------------------------------------------------------------------------------------------------- training data
def _find_dataset_names(config: Any) -> list[str]:
    """Every string value under a key named like a dataset in the run configuration."""
    found: list[str] = []
    if isinstance(config, dict):
        for key, value in config.items():
            if isinstance(value, str) and re.search(r"(^|_)(dataset|datasets|train_dataset|data)(_name|_path)?$", key):
                found.append(value)
            elif isinstance(value, list) and "dataset" in key:
                found.extend(v for v in value if isinstance(v, str))
            else:
                found.extend(_find_dataset_names(value))
    elif isinstance(config, list):
        for item in config:
            found.extend(_find_dataset_names(item))
    return found


def training_datasets(info: CheckpointInfo) -> set[str] | None:
    """mteb task names whose training data the model saw (so they are not counted as zero-shot), None if unknown.

    vidore/colpali_train_set contains the train splits of DocVQA, InfoVQA, TAT-DQA and ArxivQA (mteb's own
    declaration for ColPali models); SynthDocs training pairs come from the SynthDocs train split.
    """
    if info.run_config is None:
        return None
    names = _find_dataset_names(info.run_config)
    if not names:
        return None
    tasks: set[str] = set()
    for name in names:
        lowered = name.lower()
        if "colpali_train_set" in lowered:
            from mteb.models.model_implementations.colpali_models import COLPALI_TRAINING_DATA

            tasks |= set(COLPALI_TRAINING_DATA)
        elif "synthdocs" in lowered or (
            not name.startswith("embedded:") and (Path(name).expanduser() / "synthdocs.json").is_file()
        ):
            tasks.add("SynthDocsRetrieval")
    return tasks
