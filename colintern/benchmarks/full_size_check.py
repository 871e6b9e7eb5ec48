"""`make check-full-size`: the real InternVL3.5-1B architecture, end to end on a CPU, as a first user meets it.

    python scripts/check_full_size.py [--work-dir DIR] [--output results/benchmarks/check-full-size.json]

Checks, each timed, with the process's peak resident memory after it:
  1. checkpoint: the shipped config (`colintern/configs/internvl3_5/InternVL3_5-1B`) built as transformers'
     `InternVLForConditionalGeneration` with random weights (bf16, as on the Hub) and written with its own
     `save_pretrained` (transformers 5.23 writes the legacy names `language_model.model.*`, `vision_tower.*`,
     `multi_modal_projector.*`, `language_model.lm_head.weight`), plus a processor: InternVL's tiling and an offline
     byte-level tokenizer (the Qwen vocabulary cannot be downloaded here; its ids fit the config's 151,936 rows).
  2. load: `colintern.load_retriever` on that folder; every saved tensor is compared with the loaded one (names mapped
     as `ColIntern3_5.from_pretrained` maps them); missing and unexpected names are listed.
  3. load-other-layout: the same with the tensors renamed into the other InternVL key layout (`KEY_LAYOUTS`: the
     `model.language_model.*` names of transformers' module tree since 4.52).
  4. lora-step: one step of colintern's trainer (`--peft`, the seed recipe's LoRA settings) on two A4 pages
     (1240x1754, SynthDocs): finite loss, and the trainable parameter count equal to the formula computed here from
     the config's numbers: r * (in + out) per LoRA linear (q, k, v, o, gate, up, down) per language-model layer,
     plus the head (hidden * 128 + 128).
  5. encode: the trained adapter loaded by the mteb wrapper (`ColIntern3_5Wrapper`, base + adapter merged), one page
     and one query encoded through mteb's dataloaders and scored.

The model folder, data and run are written under a temporary folder removed at the end, or under `--work-dir`
(new subfolders it creates and keeps: model, data, run; existing ones are refused, never replaced).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import logging
import os
import re
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

from transformers import TrainerCallback

from colintern.utils import ARCHITECTURES_DIR, ColinternError, atomic_write_json

logger = logging.getLogger(__name__)

FULL_SIZE_CONFIG = ARCHITECTURES_DIR / "InternVL3_5-1B"
DEFAULT_OUTPUT = Path("results") / "benchmarks" / "check-full-size.json"
A4_PAGE = (1240, 1754)  # A4 at 150 dpi
# The two key layouts of InternVL checkpoints, both read by ColIntern3_5 (colintern.model.modeling): "legacy", the
# original names, which transformers' save_pretrained restores on save (5.23 does), and "prefixed", the names of
# transformers' module tree since 4.52. Same order in both: a name moves between layouts by swapping its prefix.
KEY_LAYOUTS = {
    "legacy": ("language_model.model.", "vision_tower.", "multi_modal_projector.", "language_model.lm_head."),
    "prefixed": ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head."),
}
LM_HEAD_KEYS = {"language_model.lm_head.weight", "lm_head.weight"}  # saved, and unused by a retriever
SNAPSHOT_README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---
Made locally by colintern in the layout of a Hub snapshot of vidore/colpali_train_set (SynthDocs pages).
"""


# ---------------------------------------------------------------------------------------------------- building blocks
def shipped_config(path: str | Path = FULL_SIZE_CONFIG):
    """The `InternVLConfig` colintern ships for OpenGVLab/InternVL3_5-1B-HF (offline; no weights)."""
    from transformers.models.internvl import InternVLConfig

    return InternVLConfig.from_pretrained(str(path))


def offline_processor(config, max_num_visual_tokens: int = 1536):
    """A ColIntern3_5Processor with `config`'s tiles and the embedded byte-level tokenizer (no download)."""
    from colintern.benchmarks.full_size import build_processor

    return build_processor(config, max_num_visual_tokens)


def write_hub_checkpoint(path: str | Path, config=None, dtype=None, seed: int = 0) -> dict:
    """Write `config` (default: the shipped InternVL3.5-1B config) as a random-weight checkpoint in the Hub's layout:
    transformers' `InternVLForConditionalGeneration.save_pretrained` plus a processor. Returns what was written."""
    import torch
    from transformers.models.internvl import InternVLForConditionalGeneration

    from colintern.utils import atomic_directory

    config = config if config is not None else shipped_config()
    dtype = dtype or torch.bfloat16  # the Hub checkpoint's dtype
    processor = offline_processor(config)
    if processor.image_token_id >= config.text_config.vocab_size:
        raise ColinternError(f"image token id {processor.image_token_id} does not fit the vocabulary")
    config.image_token_id = processor.image_token_id  # the offline tokenizer's <IMG_CONTEXT>
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    n_parameters = sum(p.numel() for p in model.parameters())
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    del model
    gc.collect()
    files = sorted(p.name for p in Path(path).iterdir())
    return {
        "path": str(path),
        "parameters_saved": n_parameters,
        "dtype": str(dtype).removeprefix("torch."),
        "files": files,
        "bytes": sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file()),
        "tokenizer_size": len(processor.tokenizer),
        "vocab_size": config.text_config.vocab_size,
    }


def expected_lora_trainable(config, rank: int, embedding_dim: int = 128) -> dict:
    """Trainable parameters of LoRA rank `rank` on every language-model linear plus the head, from the config's
    numbers alone: r * (in + out) per linear per layer, plus hidden * embedding_dim + embedding_dim."""
    text = config.text_config
    hidden, mlp = text.hidden_size, text.intermediate_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    q, kv = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    shapes = {  # (in, out)
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp), "down_proj": (mlp, hidden),
    }  # fmt: skip
    per_layer = sum(rank * (n_in + n_out) for n_in, n_out in shapes.values())
    lora = per_layer * text.num_hidden_layers
    head = hidden * embedding_dim + embedding_dim
    return {"rank": rank, "layers": text.num_hidden_layers, "lora_per_layer": per_layer, "lora": lora, "head": head,
            "total": lora + head}


def _saved_tensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def saved_keys(folder: str | Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for file in _saved_tensor_files(Path(folder)):
        with safe_open(str(file), framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


def key_layout(keys: list[str]) -> str | None:
    """Which of the two InternVL checkpoint layouts `keys` are in (None: neither)."""
    for name, prefixes in KEY_LAYOUTS.items():
        if keys and all(key.startswith(prefixes) for key in keys):
            return name
    return None


def rekey_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Copy the checkpoint in `source` to `target` with its tensors renamed into the other layout of KEY_LAYOUTS."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from colintern.utils import atomic_directory

    source = Path(source)
    layout = key_layout(saved_keys(source))
    if layout is None:
        raise ColinternError(f"{source}: tensor names in neither InternVL checkpoint layout")
    (from_prefixes, to_prefixes) = (KEY_LAYOUTS[layout], next(v for k, v in KEY_LAYOUTS.items() if k != layout))
    with atomic_directory(target) as tmp:
        for path in source.iterdir():
            if path.is_file() and path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
                shutil.copy2(path, tmp / path.name)
        tensors = {}
        for file in _saved_tensor_files(source):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    index = next(i for i, prefix in enumerate(from_prefixes) if key.startswith(prefix))
                    tensors[to_prefixes[index] + key[len(from_prefixes[index]):]] = handle.get_tensor(key)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
    return Path(target)


def map_checkpoint_key(key: str, key_mapping: dict[str, str]) -> str:
    """A saved name as `from_pretrained(key_mapping=...)` renames it: the first pattern that matches applies."""
    for pattern, replacement in key_mapping.items():
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key


def compare_with_checkpoint(model, folder: str | Path) -> dict:
    """Every tensor of the checkpoint in `folder` against `model.state_dict()`: equal after casting the saved tensor
    to the loaded dtype (bf16 -> float32 is exact). Lists mismatched, missing (in the model, not saved) and
    unexpected (saved, not in the model) names. Tensors are read one at a time from the memory-mapped files."""
    import torch
    from safetensors import safe_open

    from colintern.model.modeling import CHECKPOINT_KEY_MAPPING

    state = model.state_dict()
    files = _saved_tensor_files(Path(folder))
    if not files:
        raise ColinternError(f"{folder} holds no .safetensors file")
    compared, mismatched, unexpected, seen = 0, [], [], set()
    saved_dtypes: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                name = map_checkpoint_key(key, CHECKPOINT_KEY_MAPPING)
                if name not in state:
                    unexpected.append(key)
                    continue
                saved = handle.get_tensor(key)
                saved_dtypes.add(str(saved.dtype).removeprefix("torch."))
                loaded = state[name]
                seen.add(name)
                compared += 1
                if loaded.shape != saved.shape or not torch.equal(loaded.detach().cpu(), saved.to(loaded.dtype)):
                    mismatched.append(key)
    missing = sorted(set(state) - seen)
    return {
        "saved_tensors": compared + len(unexpected),
        "compared": compared,
        "equal": compared - len(mismatched),
        "mismatched": mismatched,
        "missing": missing,
        "unexpected": unexpected,
        "saved_dtypes": sorted(saved_dtypes),
        "loaded_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
        "compared_elements": sum(state[n].numel() for n in seen),
    }


def synthdocs_rows(n: int, page_size: tuple[int, int], seed: int = 0) -> list[dict]:
    """`n` query-page pairs in the `vidore/colpali_train_set` columns (query, image, image_filename, answer,
    source), SynthDocs pages rendered at `page_size` (width, height)."""
    from colintern.data.synthdocs import SynthDocsConfig, generate_train_rows

    width, height = page_size
    return generate_train_rows(SynthDocsConfig(seed=seed, n_train=n, page_width=width, page_height=height))


def write_pairs_dataset(folder: str | Path, splits: dict[str, list[dict]], layout: str = "snapshot") -> Path:
    """Write query-page pairs as a local training set (atomically).

    layout "snapshot": the Hub snapshot of vidore/colpali_train_set (`data/<split>-00000-of-00001.parquet`,
    README.md with the `configs` block); "folders": `<split>/data-00000-of-00001.parquet`."""
    import datasets

    from colintern.utils import atomic_directory

    if layout not in ("snapshot", "folders"):
        raise ColinternError(f"--layout must be snapshot or folders, not '{layout}'")
    with atomic_directory(folder) as tmp:
        for split, rows in splits.items():
            table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
            if layout == "snapshot":
                target = tmp / "data" / f"{split}-00000-of-00001.parquet"
            else:
                target = tmp / split / "data-00000-of-00001.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            table.to_parquet(str(target))
        if layout == "snapshot":
            (tmp / "README.md").write_text(SNAPSHOT_README)
    return Path(folder)


def peak_rss_gb() -> float:
    """The process's peak resident set size so far (getrusage; kB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def command_line() -> str:
    return "python " + shlex.join(sys.argv)


class TrainProbe(TrainerCallback):
    """Records what a run did: trainable parameters and their dtypes at the start, every logged loss, step times,
    the attention implementation. Holds no reference to the model."""

    def __init__(self):
        self.trainable = 0
        self.trainable_dtypes: dict[str, list[str]] = {}
        self.attn_implementation: str | None = None
        self.logs: list[dict] = []
        self.step_seconds: list[float] = []
        self._step_start: float | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            dtypes: dict[str, set[str]] = {}
            for name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    self.trainable += parameter.numel()
                    part = "head" if "custom_text_proj" in name else "lora" if "lora_" in name else "other"
                    dtypes.setdefault(part, set()).add(str(parameter.dtype).removeprefix("torch."))
            self.trainable_dtypes = {part: sorted(values) for part, values in dtypes.items()}
            config = getattr(model, "config", None)
            self.attn_implementation = getattr(config, "_attn_implementation", None)

    def on_step_begin(self, args, state, control, **kwargs):
        self._synchronize()
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            self._synchronize()
            self.step_seconds.append(time.perf_counter() - self._step_start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.logs.append({"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}})

    @staticmethod
    def _synchronize():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------- the check
def release_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc keeps freed chunks of a 4 GB model otherwise)."""
    import ctypes

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssSampler:
    """The highest resident set size seen while the `with` block runs (sampled every 0.2 s from /proc), in GB."""

    def __init__(self, interval: float = 0.2):
        import threading

        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        from colintern.benchmarks.measure import rss_bytes

        while True:
            self.peak = max(self.peak, rss_bytes() or 0)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gb(self) -> float:
        return round(self.peak / 2**30, 3)


class Report:
    """Checks run in order; each records passed, seconds, its resident memory (at the start, its sampled peak, after
    freeing) and the process's peak so far (getrusage); a failure stops the rest."""

    def __init__(self):
        self.checks: list[dict] = []
        self.started = time.perf_counter()

    def run(self, name: str, work: Callable[[], dict]) -> dict | None:
        from colintern.benchmarks.measure import rss_bytes

        logger.info("check %s ...", name)
        start = time.perf_counter()
        entry: dict[str, Any] = {"name": name, "rss_start_gb": round((rss_bytes() or 0) / 2**30, 3)}
        with RssSampler() as sampler:
            try:
                details = work()
                entry["passed"] = bool(details.pop("passed"))
                entry.update(details)
            except ColinternError as error:
                entry.update(passed=False, error=str(error))
            except Exception as error:  # recorded in the report, traceback in the log
                logger.exception("check %s failed", name)
                entry.update(passed=False, error=f"{type(error).__name__}: {error}")
        entry["seconds"] = round(time.perf_counter() - start, 1)
        entry["rss_peak_gb"] = sampler.peak_gb
        entry["peak_rss_gb"] = peak_rss_gb()
        release_freed_memory()
        entry["rss_end_gb"] = round((rss_bytes() or 0) / 2**30, 3)
        self.checks.append(entry)
        logger.info("check %s: %s in %.0f s (RSS peak %.2f GB, %.2f GB after)", name,
                    "ok" if entry["passed"] else "FAILED", entry["seconds"], entry["rss_peak_gb"], entry["rss_end_gb"])
        return entry if entry["passed"] else None

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c["passed"] for c in self.checks)


@contextlib.contextmanager
def work_folder(work_dir: str | None) -> Iterator[Path]:
    """`work_dir` (kept; its model/data/run subfolders must not exist) or a temporary folder removed afterwards."""
    if work_dir:
        root = Path(work_dir).expanduser()
        taken = [name for name in ("model", "data", "run") if (root / name).exists()]
        if taken:
            raise ColinternError(
                f"--work-dir {root} already has {', '.join(taken)}: pass an empty or new folder (nothing is replaced)."
            )
        root.mkdir(parents=True, exist_ok=True)
        yield root
        return
    root = Path(tempfile.mkdtemp(prefix="colintern-check-full-size-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)  # created by this run


def check_full_size(work: Path, lora_rank: int = 32, page_size: tuple[int, int] = A4_PAGE,
                    max_num_visual_tokens: int = 1536, config_dir: str | Path = FULL_SIZE_CONFIG) -> dict:
    """Run the four checks under `work` on the architecture in `config_dir` (default: the shipped InternVL3.5-1B;
    tests pass a tiny one); returns the report (see the module docstring)."""
    import torch

    config = shipped_config(config_dir)
    report = Report()
    model_dir, data_dir, run_dir = work / "model", work / "data", work / "run"
    expected = expected_lora_trainable(config, lora_rank)
    state: dict[str, Any] = {}

    def checkpoint() -> dict:
        written = write_hub_checkpoint(model_dir, config)
        keys = saved_keys(model_dir)
        layout = key_layout(keys)
        written.update(saved_tensors=len(keys), layout=layout,
                       keys_outside_known_layouts=[] if layout else sorted(keys)[:20])
        return {"passed": layout is not None, **written}

    def load(folder: Path) -> dict:
        from colintern import load_retriever

        model, processor = load_retriever(str(folder), device="cpu", dtype=torch.float32)
        result = {"layout": key_layout(saved_keys(folder)), **compare_with_checkpoint(model, folder)}
        result["model_parameters"] = sum(p.numel() for p in model.parameters())
        result["processor_image_token_id"] = processor.image_token_id
        del model, processor
        ok = (not result["mismatched"] and set(result["unexpected"]) <= LM_HEAD_KEYS
              and set(result["missing"]) <= {"custom_text_proj.weight", "custom_text_proj.bias"})
        result["note"] = "missing: the retrieval head (not in a base checkpoint); unexpected: the LM head (unused)"
        return {"passed": ok, **result}

    def load_other_layout() -> dict:
        other = work / "model-other-layout"
        try:
            rekey_checkpoint(model_dir, other)
            return load(other)
        finally:
            shutil.rmtree(other, ignore_errors=True)  # made by this check; 2 GB

    def lora_step() -> dict:
        from colintern.training.trainer import train

        write_pairs_dataset(data_dir, {"train": synthdocs_rows(2, page_size)}, layout="folders")
        run_config = lora_run_config(model_dir, data_dir, run_dir, steps=1, batch_size=2, rank=lora_rank,
                                     max_num_visual_tokens=max_num_visual_tokens)
        probe = TrainProbe()
        result = train(run_config, callbacks=[probe])
        losses = [entry["loss"] for entry in probe.logs if "loss" in entry]
        loss = losses[0] if losses else result.metrics.get("train_loss")
        finite = loss is not None and bool(torch.isfinite(torch.tensor(float(loss))))
        state["adapter"] = run_dir
        return {
            "passed": finite and probe.trainable == expected["total"] and result.global_step == 1,
            "loss": loss,
            "trainable_parameters": probe.trainable,
            "expected_by_formula": expected,
            "trainable_dtypes": probe.trainable_dtypes,
            "pages": {"size": list(page_size), "max_num_visual_tokens": max_num_visual_tokens},
            "step_seconds": round(probe.step_seconds[0], 1) if probe.step_seconds else None,
            "global_step": result.global_step,
        }

    def encode() -> dict:
        import datasets
        from mteb._create_dataloaders import create_dataloader
        from mteb.types import PromptType

        from colintern.evaluation import SynthDocsRetrieval
        from mteb_wrappers.colintern3_5_models import ColIntern3_5Wrapper

        wrapper = ColIntern3_5Wrapper(str(state["adapter"]), device="cpu", dtype=torch.float32, show_progress=False)
        meta = SynthDocsRetrieval.metadata
        row = synthdocs_rows(1, page_size, seed=1)[0]
        corpus = datasets.Dataset.from_dict({"id": ["page"], "image": [row["image"]]}).cast_column(
            "image", datasets.Image())
        queries = datasets.Dataset.from_dict({"id": ["query"], "text": [row["query"]]})
        kwargs = {"task_metadata": meta, "hf_split": "test", "hf_subset": "default"}
        pages = wrapper.encode(create_dataloader(corpus, task_metadata=meta, prompt_type=PromptType.document),
                               prompt_type=PromptType.document, **kwargs)
        texts = wrapper.encode(create_dataloader(queries, task_metadata=meta, prompt_type=PromptType.query),
                               prompt_type=PromptType.query, **kwargs)
        score = float(wrapper.similarity(texts, pages)[0, 0])
        page, query = pages[0].float(), texts[0].float()
        n_tiles = wrapper.processor.n_tiles(page_size)
        expected_tokens = n_tiles * config.image_seq_length
        norms = torch.cat([page.norm(dim=-1), query.norm(dim=-1)])
        del wrapper
        ok = (page.shape == (expected_tokens, 128) and query.shape[1] == 128 and bool(torch.isfinite(norms).all())
              and bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-2)) and abs(score) <= query.shape[0])
        return {"passed": ok, "page_embedding": list(page.shape), "page_tiles": n_tiles,
                "query_embedding": list(query.shape), "maxsim_score": round(score, 4)}

    steps = (("checkpoint", checkpoint), ("load", lambda: load(model_dir)), ("load-other-layout", load_other_layout),
             ("lora-step", lora_step), ("encode", encode))
    for name, work_fn in steps:
        if report.run(name, work_fn) is None:
            break
    return {
        "check": "check-full-size",
        "passed": report.passed,
        "wall_seconds": round(time.perf_counter() - report.started, 1),
        "peak_rss_gb": peak_rss_gb(),
        "architecture": {"config": str(config_dir), **architecture_numbers(config)},
        "checks": report.checks,
    }


def lora_run_config(model_dir, data_dir, run_dir, *, steps: int, batch_size: int, rank: int = 32,
                    max_num_visual_tokens: int = 1536, overrides: dict | None = None):
    """The RunConfig of a short LoRA run of colintern's trainer: the seed recipe (colintern3_5-1b preset, LoRA on the
    language model's linears, trained head) on a local model and data set, no evaluation, checkpoint or logging
    service unless `overrides` ({section: {field: value}}) says otherwise."""
    from colintern.training.arguments import RunConfig, apply_overrides, deep_merge, load_yaml_config, preset_path

    preset = "colintern3_5-1b"
    config = RunConfig()
    apply_overrides(config, load_yaml_config(preset_path(preset)), f"preset {preset}")
    config.preset = preset
    settings = {
        "model": {"name_or_path": str(model_dir), "max_num_visual_tokens": max_num_visual_tokens},
        "data": {"dataset": str(data_dir), "eval_split": None},
        "lora": {"enabled": True, "rank": rank, "alpha": rank},
        "training": {
            "output_dir": str(run_dir), "max_steps": steps, "per_device_train_batch_size": batch_size,
            "gradient_accumulation_steps": 1,
            "warmup_steps": 0,  # a 1-step run with warm-up would train at lr 0 and save an untrained head
            "logging_steps": 1, "save_steps": steps + 1, "eval_steps": None, "report_to": "none",
            "dataloader_num_workers": 0, "retrieval_eval": False,
        },
    }
    apply_overrides(config, deep_merge(settings, overrides or {}), "check")
    return config


def architecture_numbers(config) -> dict:
    vision, text = config.vision_config, config.text_config
    return {
        "vision": {"layers": vision.num_hidden_layers, "hidden": vision.hidden_size, "heads": vision.num_attention_heads,
                   "mlp": vision.intermediate_size, "image_size": vision.image_size, "patch_size": vision.patch_size},
        "text": {"layers": text.num_hidden_layers, "hidden": text.hidden_size, "heads": text.num_attention_heads,
                 "kv_heads": text.num_key_value_heads, "head_dim": text.head_dim, "mlp": text.intermediate_size,
                 "vocab": text.vocab_size},
        "image_seq_length": config.image_seq_length,
    }


def format_report(report: dict) -> str:
    load = report["load_average"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    head = (f"check-full-size: {verdict} in {report['wall_seconds']:.0f} s, peak RSS {report['peak_rss_gb']:.2f} GB "
            f"(load average {load['start']} at start, {load['end']} at end)")
    lines = [head]
    for check in report["checks"]:
        status = "ok" if check["passed"] else "FAILED"
        lines.append(f"  {check['name']:<17} {status:<7} {check['seconds']:>7.1f} s  RSS peak {check['rss_peak_gb']:5.2f} GB"
                     f"  {_summary(check)}")
    return "\n".join(lines)


def _summary(check: dict) -> str:
    if "error" in check:
        return check["error"]
    name = check["name"]
    if name == "checkpoint":
        return (f"{check['parameters_saved']:,} parameters ({check['dtype']}), {check['saved_tensors']} tensors, "
                f"{check['layout']} layout")
    if name.startswith("load"):
        return (f"{check['layout']} layout: {check['equal']}/{check['compared']} tensors equal, missing {check['missing']}, "
                f"unexpected {check['unexpected']}")
    if name == "lora-step":
        return (f"loss {check['loss']:.4f}, trainable {check['trainable_parameters']:,} "
                f"(formula {check['expected_by_formula']['total']:,})")
    if name == "encode":
        return f"page {check['page_embedding']}, query {check['query_embedding']}, MaxSim {check['maxsim_score']}"
    return ""


# ---------------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", help="keep the model, data and run here (default: a temporary folder, removed)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help=f"JSON report (default {DEFAULT_OUTPUT})")
    parser.add_argument("--lora-rank", type=int, default=32, help="LoRA rank of the step (default 32, the recipe's)")
    parser.add_argument("--max-num-visual-tokens", type=int, default=1536, help="visual-token budget per page")
    parser.add_argument("--config", default=str(FULL_SIZE_CONFIG),
                        help="folder with the architecture's config.json (default: the shipped InternVL3.5-1B)")
    parser.add_argument("--page-size", default="x".join(map(str, A4_PAGE)), help="WIDTHxHEIGHT of the two pages")
    return parser


def _page_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as error:
        raise ColinternError(f"--page-size must be WIDTHxHEIGHT (e.g. 1240x1754), not '{text}'") from error
    return width, height


def main(args: argparse.Namespace) -> int:
    from colintern.benchmarks import machine_info

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_start = [round(x, 2) for x in os.getloadavg()]
    with work_folder(args.work_dir) as work:
        result = check_full_size(work, lora_rank=args.lora_rank, page_size=_page_size(args.page_size),
                                 max_num_visual_tokens=args.max_num_visual_tokens, config_dir=args.config)
    report = {
        **result,
        "command": command_line(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "machine": machine_info(),
    }
    atomic_write_json(args.output, report)
    print(format_report(report))
    print(f"written: {args.output}")
    return 0 if report["passed"] else 1
