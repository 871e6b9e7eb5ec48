"""The protocol record of an evaluation: everything that determines the scores, written beside mteb's result files.

Leaderboard numbers are disputed over protocol (a wrong query prefix, embeddings that change with the batch size,
flash-attention vs SDPA, OCR text used or not), so every task `evaluate()` computes gets
`{results_dir}/protocol/{Task}.json` (a subfolder: mteb and the reports read `{results_dir}/*.json` as task results):

    colintern version and git commit, mteb/torch/transformers versions, the model (kind, source, revision) and the
    hash of every weight file (adapter and base), dtype, device, attention backend, causal or bidirectional attention,
    query prefix and augmentation tokens, visual-token budget, corpus-text mode, batch size, and the batch-invariance
    check when one was run.

A later run that resumes into the same folder with settings that change scores (`SCORE_KEYS`) is refused instead of
mixing results of two protocols in one table.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import subprocess
from pathlib import Path
from typing import Any

from colintern.model.checkpoints import ADAPTER_WEIGHT_FILES, CheckpointInfo
from colintern.utils import ColinternError, atomic_write_json, safe_name

logger = logging.getLogger(__name__)

PROTOCOL_DIR = "protocol"
FORMAT_VERSION = 1
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# Settings that change the embeddings, hence the scores: results under other values are not the same measurement.
SCORE_KEYS = (
    "dtype",
    "attention",
    "query_prefix",
    "query_augmentation_token",
    "n_augmentation_tokens",
    "max_num_visual_tokens",
    "corpus_text",
    "corpus_text_max_tokens",
)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(path: str | Path | None = None) -> dict[str, Any] | None:
    """{"commit", "dirty"} of the git checkout holding `path` (default: this package), None outside one."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())} if commit else None


def weight_hashes(folder: str | Path | None) -> dict[str, str] | None:
    """{file name: blake2b-128 hex} of the weight files (*.safetensors, *.bin) at the top of `folder`."""
    if folder is None or not Path(folder).is_dir():
        return None
    hashes = {}
    for path in sorted({p for pattern in WEIGHT_PATTERNS for p in Path(folder).glob(pattern) if p.is_file()}):
        hasher = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(chunk)
        hashes[path.name] = hasher.hexdigest()
    return hashes


def _model_record(info: CheckpointInfo) -> dict[str, Any]:
    from colintern.model.checkpoints import hub_revision
    from colintern.model.embedded import resolve_embedded

    record: dict[str, Any] = {
        "name": info.name,
        "revision": info.revision,
        "kind": info.kind,
        "source": info.source,
        "weights": weight_hashes(info.path),
    }
    if info.kind == "adapter" and info.base_model:
        base = Path(resolve_embedded(info.base_model)).expanduser()
        record["adapter_weights"] = {k: v for k, v in (record.pop("weights") or {}).items()
                                     if k in ADAPTER_WEIGHT_FILES}  # fmt: skip
        record["base_model"] = {
            "source": info.base_model,
            "weights": weight_hashes(base) if base.is_dir() else None,
            "revision": None if base.is_dir() else hub_revision(info.base_model),
        }
    return record


def _attention_mode(model, info: CheckpointInfo) -> str:
    """"causal" or "bidirectional": the model config's `attention` option (default causal)."""
    config = getattr(model, "config", None)
    value = getattr(config, "attention", None)
    if value is None:
        model_config = (info.run_config or {}).get("model")
        value = model_config.get("attention") if isinstance(model_config, dict) else None
    return str(value or "causal")


def build_protocol(wrapper, *, batch_size: int) -> dict[str, Any]:
    """What determines the scores of `wrapper` (a `ColIntern3_5Wrapper`) evaluated at `batch_size`."""
    model, processor, info = wrapper.mdl, wrapper.processor, wrapper.checkpoint
    parameter = next(model.parameters())
    config = getattr(model, "config", None)
    return {
        "format_version": FORMAT_VERSION,
        "colintern": {"version": _version("colintern"), "git": git_commit()},
        "versions": {name: _version(name) for name in ("mteb", "torch", "transformers", "peft")},
        "model": _model_record(info),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "device": str(parameter.device),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "attention": _attention_mode(model, info),
        "query_prefix": processor.query_prefix,
        "query_augmentation_token": processor.query_augmentation_token,
        "n_augmentation_tokens": int(processor.n_augmentation_tokens),
        "max_num_visual_tokens": int(processor.max_num_visual_tokens),
        "max_tiles": int(processor.max_patches),
        "corpus_text": wrapper.corpus_text,
        "corpus_text_max_tokens": wrapper.corpus_text_max_tokens,
        "batch_size": int(batch_size),
        "storage_dtype": str(wrapper.storage_dtype).removeprefix("torch."),
    }


def protocol_path(results_dir: str | Path, task_name: str) -> Path:
    return Path(results_dir) / PROTOCOL_DIR / f"{safe_name(task_name, fallback='task')}.json"


def write_protocol(results_dir: str | Path, task_name: str, protocol: dict[str, Any]) -> Path:
    """Write the protocol of `task_name`'s results atomically; returns its path."""
    path = protocol_path(results_dir, task_name)
    atomic_write_json(path, {"task": task_name, **protocol})
    return path


def read_protocol(results_dir: str | Path, task_name: str) -> dict[str, Any] | None:
    """The recorded protocol of `task_name`'s results, None when there is none (or it is unreadable)."""
    import json

    path = protocol_path(results_dir, task_name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("%s is unreadable (%s): the protocol of %s's results is unknown.", path, error, task_name)
        return None


def score_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: settings.get(key) for key in SCORE_KEYS if key in settings}


def check_same_protocol(results_dir: str | Path, task_name: str, settings: dict[str, Any]) -> None:
    """Refuse to resume into results computed under other score-changing settings (see `SCORE_KEYS`)."""
    recorded = read_protocol(results_dir, task_name)
    if recorded is None:
        return
    differ = {
        key: (recorded[key], value)
        for key, value in score_settings(settings).items()
        if key in recorded and recorded[key] != value
    }
    if differ:
        described = ", ".join(f"{key} {old!r} there, {new!r} now" for key, (old, new) in sorted(differ.items()))
        raise ColinternError(
            f"the results of {task_name} in {results_dir} were computed with other settings ({described}): use "
            "another --output-dir for this protocol, or --overwrite to replace them."
        )
