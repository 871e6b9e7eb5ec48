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

Training checkpoints (checkpoint-N/ in a run directory) count only once their completion marker is written, last:
`inspect_checkpoint`, `latest_complete_checkpoint` (what `--resume latest` takes) and `last_healthy_checkpoint` (what a
NaN stop and the training report name).
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


# ---------------------------------------------------------------------------------------------------- completeness
# A training checkpoint (checkpoint-N/ in a run directory) counts only once this marker exists: the trainer writes it
# last, after every file of the checkpoint is written and flushed to disk, with the size of each file and the health
# of the weights. A kill during a save therefore leaves a folder without a marker, which resume and the reports skip.
CHECKPOINT_MARKER = "colintern_checkpoint.json"
MARKER_FORMAT = 1
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"
# What transformers' Trainer writes into every checkpoint besides the weights (save_only_model is never set here).
TRAINER_CHECKPOINT_FILES = ("optimizer.pt", "scheduler.pt", TRAINER_STATE_FILE)


@dataclass(frozen=True)
class CheckpointStatus:
    """A training checkpoint folder as found on disk.

    Attributes:
        path: the checkpoint-N folder.
        step: N.
        complete: its marker is there and every file it lists has the recorded size, or (a checkpoint written before
            markers existed) every expected file is present and whole.
        problem: why it is incomplete (None when complete).
        marked: whether it has a completion marker.
        healthy: what the marker recorded about the weights (finite, finite gradient norms since the previous save,
            no runaway growth); None when unknown (no marker).
        health: the marker's health record ({} without a marker).
    """

    path: Path
    step: int
    complete: bool
    problem: str | None
    marked: bool
    healthy: bool | None
    health: dict = field(default_factory=dict, compare=False)


def checkpoint_step(folder: Path) -> int | None:
    match = CHECKPOINT_DIR.match(Path(folder).name)
    return int(match.group(1)) if match else None


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKPOINT_MARKER)


def remove_checkpoint_marker(folder: Path) -> None:
    """Before saving into `folder` again: an old marker must not vouch for files being replaced."""
    (Path(folder) / CHECKPOINT_MARKER).unlink(missing_ok=True)


def write_checkpoint_marker(folder: Path, step: int, health: dict) -> None:
    """Mark `folder` complete: flush every file in it to disk, then write the marker (atomically, last)."""
    import os

    from colintern.utils import atomic_write_json

    folder = Path(folder)
    files = {}
    for path in _checkpoint_files(folder):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[path.relative_to(folder).as_posix()] = path.stat().st_size
    atomic_write_json(folder / CHECKPOINT_MARKER, {"format": MARKER_FORMAT, "step": step, "files": files,
                                                   "health": health})


def read_checkpoint_marker(folder: Path) -> dict | None:
    """The marker of `folder` (None without one); raises ValueError or TypeError when it is unreadable."""
    path = Path(folder) / CHECKPOINT_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"unreadable {CHECKPOINT_MARKER}: {error}") from error
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        raise TypeError(f"{CHECKPOINT_MARKER} is not a colintern checkpoint marker")
    return marker


def _zip_problem(path: Path) -> str | None:
    """torch.save writes zip archives whose central directory comes last: a cut file has none."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (OSError, zipfile.BadZipFile) as error:
        return f"{path.name} is cut short or damaged ({error})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors header names the byte range of every tensor: the file must reach the last one."""
    import struct

    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size < 8 + length + end:
            return f"{path.name} is cut short ({path.stat().st_size} bytes, its header needs {8 + length + end})"
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError) as error:
        return f"{path.name} is cut short or damaged ({error})"
    return None


def _unmarked_checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint without a marker is not whole (None: every file the Trainer writes is present and whole).

    Checkpoints of runs from before the marker existed are accepted this way; the Trainer writes trainer_state.json
    after the weights, optimizer, scheduler and RNG state, so a save cut short lacks it or leaves a file cut short.
    """
    weights = [folder / name for name in (*MODEL_WEIGHT_FILES, *ADAPTER_WEIGHT_FILES) if (folder / name).is_file()]
    if not weights:
        return "no model or adapter weights"
    missing = [name for name in TRAINER_CHECKPOINT_FILES if not (folder / name).is_file()]
    if not list(folder.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        json.loads((folder / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{TRAINER_STATE_FILE} is cut short or damaged ({error})"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            return f"{index.name} is cut short or damaged ({error})"
        weights += [folder / shard for shard in sorted(shards)]
    for path in [*weights, *folder.glob("*.pt"), *folder.glob("*.pth"), *folder.glob("*.bin")]:
        if not path.is_file():
            return f"{path.name} missing"
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            problem = _zip_problem(path)
        else:
            problem = None
        if problem:
            return problem
    return None


def inspect_checkpoint(folder: str | Path) -> CheckpointStatus:
    """Whether the training checkpoint `folder` is complete (and what its marker says about its health).

    A checkpoint without a marker is judged by its files only when no earlier checkpoint of the same run has a
    marker: it was written before colintern wrote markers. Otherwise the run was writing markers, and the missing
    one means the save never finished.
    """
    folder = Path(folder)
    step = checkpoint_step(folder)
    step = -1 if step is None else step
    try:
        marker = read_checkpoint_marker(folder)
    except (ValueError, TypeError) as error:
        return CheckpointStatus(folder, step, False, str(error), True, None)
    if marker is None:
        earlier_marked = [
            p.name for p in folder.parent.glob("checkpoint-*")
            if (s := checkpoint_step(p)) is not None and s < step and (p / CHECKPOINT_MARKER).is_file()
        ]
        if earlier_marked:
            problem = f"no {CHECKPOINT_MARKER}: the save did not finish"
        else:
            problem = _unmarked_checkpoint_problem(folder)
        return CheckpointStatus(folder, step, problem is None, problem, False, None)
    for name, size in marker["files"].items():
        path = folder / name
        if not path.is_file():
            return CheckpointStatus(folder, step, False, f"{name} missing", True, None)
        if path.stat().st_size != size:
            return CheckpointStatus(
                folder, step, False, f"{name} has {path.stat().st_size} bytes, {size} were saved", True, None
            )
    health = marker.get("health") if isinstance(marker.get("health"), dict) else {}
    healthy = health.get("healthy")
    return CheckpointStatus(folder, step, True, None, True, healthy if isinstance(healthy, bool) else None, health)


def list_checkpoints(run_dir: str | Path) -> list[CheckpointStatus]:
    """Every checkpoint-N folder of `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    folders = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return [inspect_checkpoint(p) for p in sorted(folders, key=checkpoint_step)]


def latest_complete_checkpoint(run_dir: str | Path) -> tuple[CheckpointStatus | None, list[CheckpointStatus]]:
    """The newest complete checkpoint of `run_dir` (None if none) and the newer incomplete ones passed over."""
    skipped: list[CheckpointStatus] = []
    for status in reversed(list_checkpoints(run_dir)):
        if status.complete:
            return status, skipped
        skipped.append(status)
    return None, skipped


def last_healthy_checkpoint(run_dir: str | Path, before_step: int | None = None) -> CheckpointStatus | None:
    """The newest complete checkpoint whose weights were healthy when saved (unknown health, from before markers
    existed, counts as healthy), optionally only those before `before_step`."""
    for status in reversed(list_checkpoints(run_dir)):
        if before_step is not None and status.step >= before_step:
            continue
        if status.complete and status.healthy is not False:
            return status
    return None
