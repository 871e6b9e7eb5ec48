"""Checkpoint merging ("model soups", Wortsman et al. 2022): average the weights of several checkpoints of one run,
or of runs that differ only in seed or learning rate, into one model that evaluates like any other.

    candidates = find_candidates(["runs/a", "runs/b"], last=4)        # checkpoint-* folders (or each run's final model)
    result = merge_checkpoints(candidates, "runs/soup", method="greedy")

`uniform` averages every candidate. `greedy` scores each candidate on the validation split (NDCG@5), walks them from
best to worst and keeps one only when the NDCG@5 of the average does not drop (the greedy soup of the paper).

What is averaged is the model each checkpoint computes, exactly:
  * full weights (a run without --peft): every tensor is averaged;
  * LoRA adapters: the merged weight of an adapter is W0 + s * B A, so the average of n adapters is
    W0 + s * mean_i(B_i A_i), which is itself a LoRA of rank n * r: A = [A_1; ...; A_n] and B = [B_1, ..., B_n] / n
    (peft's "cat" combination; `add_weighted_adapter` itself refuses adapters that train the head through
    `modules_to_save`). Averaging A and B separately would give mean(B) mean(A), another model. The head
    (`custom_text_proj`, in `modules_to_save`) is averaged like full weights.
The output is a normal adapter folder (or model folder) with its processor and the run configuration of the first
ingredient (so it attends as the runs did); `colintern_merge.json` records the ingredients and their scores.
Candidates must be compatible: the same base model, LoRA rank, alpha, targets and saved tensors, the same attention
mode; otherwise nothing is written and the message says which setting differs.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from colintern.model.checkpoints import list_checkpoints
from colintern.utils import ADAPTER_CONFIG_FILE, RUN_CONFIG_FILE, ColinternError, prepare_output_dir, read_run_config

logger = logging.getLogger(__name__)

METHODS = ("uniform", "greedy")
MERGE_RECORD_FILE = "colintern_merge.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = "model.safetensors"
# adapter_config.json settings that must agree for two adapters to be averaged
ADAPTER_SETTINGS = ("base_model_name_or_path", "r", "lora_alpha", "target_modules", "modules_to_save",
                    "use_rslora", "use_dora", "bias", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
LORA_A, LORA_B = re.compile(r"\.lora_A\.(weight)$"), re.compile(r"\.lora_B\.(weight)$")


@dataclass(frozen=True)
class Candidate:
    """One checkpoint to merge: the folder with its weights and the run folder with its colintern_run.json."""

    path: Path
    run_dir: Path
    kind: str  # "adapter" or "full"

    @property
    def label(self) -> str:
        return self.path.name if self.path == self.run_dir else f"{self.run_dir.name}/{self.path.name}"

    @property
    def run_config(self) -> dict:
        return read_run_config(self.path) or read_run_config(self.run_dir) or {}

    @property
    def attention(self) -> str:
        return (self.run_config.get("model") or {}).get("attention") or "causal"


@dataclass
class MergeResult:
    output_dir: Path
    method: str
    ingredients: list[str]
    scores: dict[str, float] = field(default_factory=dict)  # validation NDCG@5 of each candidate (greedy)
    history: list[dict] = field(default_factory=list)  # greedy steps: candidate, soup score, kept


def _kind(folder: Path) -> str | None:
    if (folder / ADAPTER_CONFIG_FILE).is_file() and (folder / ADAPTER_WEIGHTS).is_file():
        return "adapter"
    if (folder / "config.json").is_file() and (folder / MODEL_WEIGHTS).is_file():
        return "full"
    return None


def find_candidates(sources: Sequence[str | Path], *, last: int | None = None, final: bool = False) -> list[Candidate]:
    """The checkpoints named by `sources`: a checkpoint-N folder is taken as it is; a run folder gives its complete
    checkpoint-* folders (the `last` newest of them, default all) or, with `final`, its final model (the adapter or
    model at its top)."""
    candidates: list[Candidate] = []
    for source in sources:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ColinternError(f"{source}: no such folder (give run folders or checkpoint-N folders).")
        if re.fullmatch(r"checkpoint-\d+", folder.name):
            chosen = [folder]
            run_dir = folder.parent
        elif final:
            chosen, run_dir = [folder], folder
        else:
            statuses = list_checkpoints(folder)
            complete = [s.path for s in statuses if s.complete]
            if not complete:
                hint = " (pass --final to merge the run's final model)" if _kind(folder) else ""
                raise ColinternError(f"{source} has no complete checkpoint-* folders{hint}.")
            chosen = complete[-last:] if last else complete
            run_dir = folder
        for path in chosen:
            kind = _kind(path)
            if kind is None:
                raise ColinternError(
                    f"{path} holds neither an adapter ({ADAPTER_CONFIG_FILE} + {ADAPTER_WEIGHTS}) nor full weights "
                    f"(config.json + {MODEL_WEIGHTS}) to merge."
                )
            candidates.append(Candidate(path, run_dir, kind))
    if len({c.path.resolve() for c in candidates}) != len(candidates):
        raise ColinternError("The same checkpoint is given twice: each ingredient counts once.")
    if len(candidates) < 2:
        raise ColinternError(f"Merging needs at least 2 checkpoints; found {len(candidates)} "
                             f"({', '.join(c.label for c in candidates) or 'none'}).")
    return candidates


# ------------------------------------------------------------------------------------------------ compatibility
def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


def _adapter_settings(folder: Path) -> dict:
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    settings = {key: config.get(key) for key in ADAPTER_SETTINGS}
    for key in ("target_modules", "modules_to_save"):
        if isinstance(settings[key], list):
            settings[key] = sorted(settings[key])
    return settings


def _model_settings(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    config.pop("_name_or_path", None)
    return config


def check_compatible(candidates: Sequence[Candidate]) -> None:
    """Raise a ColinternError naming the first setting on which a candidate differs from the first one."""
    first = candidates[0]
    kinds = {c.kind for c in candidates}
    if len(kinds) > 1:
        adapters = [c.label for c in candidates if c.kind == "adapter"]
        raise ColinternError(f"Cannot merge LoRA adapters ({', '.join(adapters)}) with full-weight checkpoints: "
                             "merge runs trained the same way (all --peft or none).")
    weights = ADAPTER_WEIGHTS if first.kind == "adapter" else MODEL_WEIGHTS
    settings = _adapter_settings if first.kind == "adapter" else _model_settings
    reference, reference_shapes = settings(first.path), _tensor_shapes(first.path / weights)
    for other in candidates[1:]:
        if other.attention != first.attention:
            raise ColinternError(f"Cannot merge {other.label} (attention {other.attention}) with {first.label} "
                                 f"(attention {first.attention}): they compute different functions.")
        mine = settings(other.path)
        for key in sorted(set(reference) | set(mine)):
            if reference.get(key) != mine.get(key):
                raise ColinternError(
                    f"Cannot merge {other.label} with {first.label}: {key} differs ({mine.get(key)!r} vs "
                    f"{reference.get(key)!r} in {first.path / (ADAPTER_CONFIG_FILE if first.kind == 'adapter' else 'config.json')}). "
                    "Merge checkpoints of runs with the same base model and LoRA settings (rank, alpha, targets)."
                )
        shapes = _tensor_shapes(other.path / weights)
        if shapes != reference_shapes:
            differing = sorted(set(shapes) ^ set(reference_shapes)) or sorted(
                k for k in shapes if shapes[k] != reference_shapes[k])
            raise ColinternError(f"Cannot merge {other.label} with {first.label}: their saved tensors differ "
                                 f"({', '.join(differing[:3])}{' ...' if len(differing) > 3 else ''}).")


# ------------------------------------------------------------------------------------------------ averaging
def _lora_scale(settings: dict) -> float:
    rank, alpha = int(settings["r"]), float(settings["lora_alpha"])
    return alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank


def average_adapters(folders: Sequence[Path]) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, adapter_config) of the exact average of the adapters in `folders` (see the module docstring).

    The result has rank n * r and alpha chosen so that its LoRA scale is 1; B carries each ingredient's scale / n.
    """
    from safetensors.torch import load_file

    config = json.loads((folders[0] / ADAPTER_CONFIG_FILE).read_text())
    if config.get("use_dora"):
        raise ColinternError(f"{folders[0]}: DoRA adapters (use_dora) cannot be averaged exactly; merge LoRA adapters.")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ColinternError(f"{folders[0]}: adapters with a rank_pattern/alpha_pattern are not supported by merging.")
    n, scale = len(folders), _lora_scale(config)
    states = [load_file(str(folder / ADAPTER_WEIGHTS)) for folder in folders]
    merged: dict[str, torch.Tensor] = {}
    for key, tensor in states[0].items():
        parts = [state[key].float() for state in states]
        if LORA_A.search(key):  # (r, in) each: stack the ranks
            merged[key] = torch.cat(parts, dim=0)
        elif LORA_B.search(key):  # (out, r) each: side by side, each carrying its scale and 1/n
            merged[key] = torch.cat([part * (scale / n) for part in parts], dim=1)
        else:  # the head (modules_to_save) and anything else saved in full
            merged[key] = torch.stack(parts).mean(dim=0)
        merged[key] = merged[key].to(tensor.dtype).contiguous()
    rank = int(config["r"]) * n
    config["r"] = rank
    config["lora_alpha"] = math.sqrt(rank) if config.get("use_rslora") else rank  # scale 1
    return merged, config


def average_full_weights(folders: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the full weights in `folders`, summed in float32 one checkpoint at a time (integer
    tensors, if any, are the first's)."""
    from safetensors.torch import load_file

    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for folder in folders:
        for key, tensor in load_file(str(folder / MODEL_WEIGHTS)).items():
            dtypes.setdefault(key, tensor.dtype)
            if not tensor.is_floating_point():
                total.setdefault(key, tensor)
            elif key in total:
                total[key] += tensor.float()
            else:
                total[key] = tensor.float().clone()
    return {key: (value / len(folders)).to(dtypes[key]).contiguous() if value.is_floating_point() else value
            for key, value in total.items()}


def _processor_source(candidate: Candidate) -> str:
    from colintern.model.loading import AdapterInfo, has_processor_files

    for folder in (candidate.path, candidate.run_dir):
        if has_processor_files(folder):
            return str(folder)
    return AdapterInfo.read(candidate.path).base_model


def write_average(candidates: Sequence[Candidate], folder: Path, record: dict | None = None) -> Path:
    """Write the average of `candidates` into the (existing, empty) `folder`: weights, their config, the processor,
    the first ingredient's run configuration and, when given, the merge record."""
    from safetensors.torch import save_file

    from colintern.model.loading import load_processor
    from colintern.utils import atomic_write_json

    folders = [c.path for c in candidates]
    if candidates[0].kind == "adapter":
        state, config = average_adapters(folders)
        save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(folder / ADAPTER_CONFIG_FILE, config)
    else:
        save_file(average_full_weights(folders), str(folder / MODEL_WEIGHTS), metadata={"format": "pt"})
        (folder / "config.json").write_text((folders[0] / "config.json").read_text())
    load_processor(_processor_source(candidates[0])).save_pretrained(str(folder))
    run_config = candidates[0].run_config
    if run_config:
        atomic_write_json(folder / RUN_CONFIG_FILE, run_config)
    if record is not None:
        atomic_write_json(folder / MERGE_RECORD_FILE, record)
    return folder


# ------------------------------------------------------------------------------------------------ scoring
def validation_split(candidate: Candidate) -> Path:
    """The retrieval split (corpus/queries/qrels) the run validated on: its dataset's `eval_split`."""
    from colintern.data.synthdocs import resolve_dataset

    data = candidate.run_config.get("data") or {}
    if not data.get("dataset") or not data.get("eval_split"):
        raise ColinternError(f"{candidate.run_dir}/{RUN_CONFIG_FILE} names no dataset and eval_split to validate on: "
                             "pass --validation FOLDER (a split folder with corpus/queries/qrels parquet files).")
    folder = Path(resolve_dataset(data["dataset"])) / data["eval_split"]
    if not (folder / "qrels.parquet").is_file():
        raise ColinternError(f"{folder} (the run's eval_split) is not a retrieval split (corpus/queries/qrels): "
                             "pass --validation FOLDER.")
    return folder


def ndcg_scorer(split_folder: Path, batch_size: int = 16, device: str | None = None) -> Callable[[Path], float]:
    """A function giving the validation NDCG@5 of the model in a folder, computed by mteb as evaluation does."""
    from colintern.evaluation import evaluate_in_memory
    from colintern.model.loading import load_retriever

    split_folder = Path(split_folder)

    def score(folder: Path) -> float:
        model, processor = load_retriever(str(folder), device=device)
        scores = evaluate_in_memory(model, processor, split_folder.parent, split=split_folder.name,
                                    batch_size=batch_size)
        return round(float(scores["ndcg_at_5"]), 5)

    return score


def greedy_soup(candidates: Sequence[Candidate], score_folder: Callable[[Path], float],
                scratch: Path) -> tuple[list[Candidate], dict[str, float], list[dict]]:
    """Wortsman et al.'s greedy soup: candidates by validation NDCG@5, best first; each joins the soup only when the
    soup's NDCG@5 does not drop. Returns (ingredients, each candidate's score, the steps taken)."""
    scores = {c.label: score_folder(c.path) for c in candidates}
    ranked = sorted(candidates, key=lambda c: -scores[c.label])
    soup, best = [ranked[0]], scores[ranked[0].label]
    history = [{"candidate": ranked[0].label, "soup_ndcg_at_5": best, "kept": True}]
    for index, candidate in enumerate(ranked[1:], 1):
        trial = scratch / f"trial-{index}"
        trial.mkdir()
        write_average([*soup, candidate], trial)
        value = score_folder(trial)
        kept = value >= best
        history.append({"candidate": candidate.label, "soup_ndcg_at_5": value, "kept": kept})
        logger.info("greedy soup: + %s -> NDCG@5 %.4f (%s)", candidate.label, value,
                    f"kept, was {best:.4f}" if kept else f"dropped, stays {best:.4f}")
        if kept:
            soup, best = [*soup, candidate], value
    return soup, scores, history


def merge_checkpoints(
    candidates: Sequence[Candidate],
    output_dir: str | Path,
    *,
    method: str = "uniform",
    score_folder: Callable[[Path], float] | None = None,
) -> MergeResult:
    """Average `candidates` (uniformly, or by greedy soup with `score_folder` giving a folder's validation NDCG@5)
    into the new folder `output_dir` (never an existing non-empty one; written in a hidden folder, moved into place
    once whole)."""
    if method not in METHODS:
        raise ColinternError(f"--method {method}: choose one of {', '.join(METHODS)}")
    check_compatible(candidates)
    inputs = {f"RUN_DIR {c.run_dir.name}": c.run_dir for c in candidates}  # the runs, their checkpoints included
    inputs.update({f"RUN_DIR {c.label}": c.path for c in candidates})
    output = prepare_output_dir(output_dir, command="merge_checkpoints", inputs=inputs)
    try:
        scores: dict[str, float] = {}
        history: list[dict] = []
        ingredients = list(candidates)
        if method == "greedy":
            if score_folder is None:
                raise ValueError("greedy merging needs score_folder")
            with tempfile.TemporaryDirectory(prefix=".merge-trials-", dir=output.path) as scratch:
                ingredients, scores, history = greedy_soup(candidates, score_folder, Path(scratch))
        record = {
            "method": method,
            "kind": candidates[0].kind,
            "candidates": [str(c.path) for c in candidates],
            "ingredients": [str(c.path) for c in ingredients],
            "validation_ndcg_at_5": scores,
            "greedy_steps": history,
        }
        with output.staged() as stage:
            write_average(ingredients, stage, record)
    except BaseException:
        output.discard_if_unused()
        raise
    logger.info("Merged %d of %d checkpoints (%s) into %s", len(ingredients), len(candidates), method, output_dir)
    return MergeResult(Path(output_dir), method, [c.label for c in ingredients], scores, history)
