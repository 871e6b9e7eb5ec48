"""What only a GPU can show, run by scripts/gpu_check.sh: each subcommand writes one JSON file (atomically) with the
command that made it, the machine and the figures, and exits 1 when its check fails.

    python -m colintern.benchmarks.gpu_check environment --output results/benchmarks/gpu-environment.json
    python -m colintern.benchmarks.gpu_check bf16-step   --output results/benchmarks/gpu-bf16-step.json
    python -m colintern.benchmarks.gpu_check lora-curve  --steps 100 --output results/benchmarks/gpu-lora-curve.json

environment  the GPU (name, memory), torch / transformers / peft / accelerate / flash-attn versions, whether
             `flash_attn` imports, and the tiny embedded model's embeddings with flash_attention_2 against SDPA in bf16
             (max abs difference), next to bf16 SDPA against float32 SDPA: the rounding noise flash-attention must stay
             within. On a CPU only the versions and the bf16 noise are recorded (nothing to fail).
bf16-step    the tiny embedded model loaded in bf16, built and optimised as colintern's trainer does
             (`build_model` / `build_optimizer`, the demo preset with --peft and --dtype bfloat16), one step per
             learning rate: the dtype of every optimizer group's parameters and the fraction of each group's weights
             (the head's in particular) the step changed. Passes when every trained parameter is float32 and every head
             weight moved. Runs on a CPU too.
lora-curve   the full-size InternVL3.5-1B architecture (random weights, Hub layout, as `make check-full-size` writes
             it) trained with colintern's trainer (--peft, bf16 on a GPU, gradient checkpointing, flash-attention when
             installed) for --steps steps on a real-format data set made locally: SynthDocs pages in the Hub snapshot
             layout of vidore/colpali_train_set (data/train-*.parquet, data/test-*.parquet; query, image,
             image_filename, answer, source). Records the loss curve, the evaluation loss, samples/s and peak memory.
             `--tiny` uses the embedded tiny model (CPU, seconds).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import logging
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from colintern.benchmarks.full_size_check import (
    TrainProbe,
    command_line,
    expected_lora_trainable,
    lora_run_config,
    peak_rss_gb,
    shipped_config,
    synthdocs_rows,
    work_folder,
    write_hub_checkpoint,
    write_pairs_dataset,
)
from colintern.utils import ColinternError, atomic_write_json

logger = logging.getLogger(__name__)

DEMO_PAGE = (128, 176)  # SynthDocs' default page, one tile of the tiny model
CURVE_PAGE = (620, 877)  # A4 at 75 dpi: 2 x 2 tiles + thumbnail at full size


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------- environment
def _tiny_inputs(processor, n_pages: int = 2) -> list[dict]:
    """Two SynthDocs pages and two queries of different lengths (so the query batch is padded)."""
    from colintern.data.pairs import decode_image

    rows = synthdocs_rows(n_pages, DEMO_PAGE, seed=3)
    pages = processor.process_images([decode_image(row["image"]) for row in rows])
    queries = processor.process_queries([rows[0]["query"], "pie chart"])
    return [dict(pages), dict(queries)]


def _embeddings(model_dir: str, device: str, dtype: torch.dtype, attn_implementation: str, inputs: list[dict]):
    from colintern.model.loading import load_model

    model = load_model(model_dir, device=device, dtype=dtype, attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        outputs = [model(**{k: v.to(device) for k, v in batch.items()}).float().cpu() for batch in inputs]
    del model
    return outputs


def _max_abs_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def attention_agreement(device: str, compare: tuple[str, str] = ("sdpa", "flash_attention_2")) -> dict:
    """Max abs difference of the tiny embedded model's embeddings (two pages, two padded queries) between two
    attention implementations in bf16, and between bf16 and float32 under the first (the rounding-noise scale)."""
    from colintern.model.embedded import ensure_embedded_model
    from colintern.model.loading import load_processor

    model_dir = str(ensure_embedded_model())
    inputs = _tiny_inputs(load_processor(model_dir))
    reference, other = compare
    bf16 = _embeddings(model_dir, device, torch.bfloat16, reference, inputs)
    fp32 = _embeddings(model_dir, device, torch.float32, reference, inputs)
    result = {"device": device, "reference": reference, "bf16_vs_float32": _max_abs_difference(bf16, fp32)}
    compared = _embeddings(model_dir, device, torch.bfloat16, other, inputs)
    result[f"{other}_vs_{reference}_bf16"] = _max_abs_difference(compared, bf16)
    return result


def environment() -> dict:
    from transformers.utils import is_flash_attn_2_available

    from colintern.model.loading import default_attn_implementation

    cuda = torch.cuda.is_available()
    info: dict = {
        "cuda_available": cuda,
        "versions": {name: _version(name) for name in ("torch", "transformers", "peft", "accelerate", "flash-attn",
                                                       "mteb", "colpali-engine")},
        "torch_cuda": torch.version.cuda,
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                       "bf16_supported": torch.cuda.is_bf16_supported()}
    try:
        import flash_attn

        info["flash_attn_import"] = {"ok": True, "version": getattr(flash_attn, "__version__", None)}
    except Exception as error:  # noqa: BLE001 - ImportError, or an ABI mismatch raising anything: recorded
        info["flash_attn_import"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    info["transformers_flash_attn_2_available"] = bool(is_flash_attn_2_available())
    info["colintern_attn_implementation"] = default_attn_implementation(_device())

    if cuda and info["flash_attn_import"]["ok"]:
        try:
            agreement = attention_agreement("cuda")
        except Exception as error:  # e.g. no kernel for this GPU generation: recorded
            logger.exception("flash_attention_2 forward failed")
            info["flash_attention_forward"] = {"error": f"{type(error).__name__}: {error}"}
            info["passed"] = False
            return info
        diff, noise = agreement["flash_attention_2_vs_sdpa_bf16"], agreement["bf16_vs_float32"]
        # flash-attention and SDPA differ only in the order of bf16 operations: within the bf16 rounding noise
        agreement["within_bf16_noise"] = bool(math.isfinite(diff) and diff <= 2 * noise + 1e-3)
        info["flash_attention_forward"] = agreement
        info["passed"] = agreement["within_bf16_noise"]
    else:
        reason = "no CUDA device" if not cuda else "flash_attn does not import"
        info["flash_attention_forward"] = {"skipped": reason, "bf16_vs_float32": attention_agreement(
            _device(), compare=("sdpa", "eager"))}
        info["passed"] = None if not cuda else False  # on a CPU there is nothing to pass or fail
    return info


# ---------------------------------------------------------------------------------------------------- bf16 step
def bf16_run_config(lr: float):
    """The demo preset with --peft and --dtype bfloat16 (what a GPU user gets: the model loads in bf16)."""
    from colintern.training.arguments import RunConfig, apply_overrides, load_yaml_config, preset_path

    config = RunConfig()
    apply_overrides(config, load_yaml_config(preset_path("demo")), "preset demo")
    config.preset = "demo"
    apply_overrides(config, {"model": {"dtype": "bfloat16"}, "lora": {"enabled": True}, "training": {"learning_rate": lr}},
                    "bf16-step")
    return config


def bf16_step(lr: float, device: str | None = None, batch_size: int = 8) -> dict:
    """One optimizer step of the tiny model loaded in bf16, built and optimised by colintern's trainer functions."""
    from colintern.data.pairs import RetrievalCollator
    from colintern.training.trainer import build_loss, build_model, build_optimizer, compact_multivectors

    device = device or _device()
    config = bf16_run_config(lr)
    torch.manual_seed(config.training.seed)
    model, processor = build_model(config, device=device)
    optimizer = build_optimizer(model, config)
    model.train()
    before = {id(p): p.detach().clone() for group in optimizer.param_groups for p in group["params"]}
    batch = RetrievalCollator(processor)(synthdocs_rows(batch_size, DEMO_PAGE, seed=5))
    batch = {k: v.to(device) for k, v in batch.items()}
    queries = model(**{k[len("query_"):]: v for k, v in batch.items() if k.startswith("query_")})
    pages = compact_multivectors(model(**{k[len("doc_"):]: v for k, v in batch.items() if k.startswith("doc_")}))
    loss = build_loss(config.training.loss, config.training.temperature)(queries, pages)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, config.training.max_grad_norm)  # as the Trainer does
    optimizer.step()

    groups = {}
    for group in optimizer.param_groups:
        changed = sum(int((p.detach() != before[id(p)]).sum()) for p in group["params"])
        total = sum(p.numel() for p in group["params"])
        groups[group.get("name", f"group{len(groups)}")] = {
            "lr": group["lr"],
            "parameters": total,
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in group["params"]}),
            "fraction_changed": round(changed / max(1, total), 6),
        }
    head_weights = [p for name, p in model.named_parameters() if p.requires_grad and "custom_text_proj" in name
                    and name.endswith("weight")]
    head_changed = sum(int((p.detach() != before[id(p)]).sum()) for p in head_weights)
    head_total = sum(p.numel() for p in head_weights)
    all_float32 = all(p.dtype == torch.float32 for p in params)
    result = {
        "lr": lr,
        "loss": float(loss.detach()),
        "groups": groups,
        "head_weight_fraction_changed": round(head_changed / max(1, head_total), 6),
        "head_weight_dtype": sorted({str(p.dtype).removeprefix("torch.") for p in head_weights}),
        "every_trained_parameter_float32": all_float32,
    }
    result["passed"] = bool(all_float32 and head_total and head_changed == head_total and math.isfinite(result["loss"]))
    del model, optimizer, before
    gc.collect()
    return result


def bf16_steps(lrs: list[float], device: str | None = None) -> dict:
    device = device or _device()
    steps = [bf16_step(lr, device) for lr in lrs]
    return {
        "device": device,
        "model": "embedded:tiny-internvl3_5, loaded in bfloat16",
        "recipe": "demo preset + --peft + --dtype bfloat16; colintern.training.trainer.build_model / build_optimizer",
        "steps": steps,
        "passed": all(step["passed"] for step in steps),
    }


# ---------------------------------------------------------------------------------------------------- LoRA curve
def lora_curve(work: Path, steps: int, *, tiny: bool = False, layout: str = "snapshot", batch_size: int | None = None,
               train_rows: int | None = None, test_rows: int | None = None, page_size: tuple[int, int] | None = None,
               lr: float = 5e-5, eval_steps: int | None = None) -> dict:
    """A `steps`-step LoRA run of colintern's trainer on a real-format local data set (see the module docstring)."""
    from colintern.model.embedded import ensure_embedded_model
    from colintern.training.trainer import train

    device = _device()
    cuda = device == "cuda"
    batch_size = batch_size or (16 if not tiny else 4)
    train_rows = train_rows or (512 if not tiny else 16)
    test_rows = test_rows or (64 if not tiny else 8)
    page_size = page_size or (CURVE_PAGE if not tiny else DEMO_PAGE)
    eval_steps = eval_steps or max(1, steps // 4)
    started = time.perf_counter()

    if tiny:
        model_dir, max_visual = ensure_embedded_model(), 16
        config = shipped_config(model_dir)
        model_info = {"name": "embedded:tiny-internvl3_5"}
    else:
        model_dir, max_visual = work / "model", 1536
        config = shipped_config()
        model_info = {"name": "InternVL3.5-1B architecture, random weights", **write_hub_checkpoint(model_dir, config)}
    expected = expected_lora_trainable(config, 32)["total"]
    build_model_seconds = time.perf_counter() - started

    rows = synthdocs_rows(train_rows + test_rows, page_size)
    splits = {"train": rows[test_rows:], "test": rows[:test_rows]}
    data_dir = write_pairs_dataset(work / "data", splits, layout)
    data_check = check_splits(data_dir, {name: len(split) for name, split in splits.items()})
    if not data_check["ok"] and layout != "folders":
        # recorded as what a user with a downloaded copy meets; the curve is still measured on the plain layout
        data_dir = write_pairs_dataset(work / "data-folders", splits, "folders")
        data_check["fell_back_to"] = "folders"
    del rows, splits
    data_seconds = time.perf_counter() - started - build_model_seconds

    run_config = lora_run_config(model_dir, data_dir, work / "run", steps=steps, batch_size=batch_size,
                                 max_num_visual_tokens=max_visual, overrides={
        "model": {"dtype": "bfloat16" if cuda else "float32", "attn_implementation": "auto"},
        "data": {"eval_split": "test", "max_eval_samples": test_rows},
        "training": {"learning_rate": lr, "warmup_steps": max(1, steps // 10), "eval_steps": eval_steps,
                     "gradient_checkpointing": True, "bf16": "true" if cuda else "false",
                     "dataloader_num_workers": 2 if cuda else 0},
    })  # fmt: skip
    result: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "model": model_info,
        "data": {"layout": layout, "loader": data_check, "train_rows": train_rows, "test_rows": test_rows,
                 "page_size": list(page_size), "columns": ["query", "image", "image_filename", "answer", "source"]},
        "recipe": {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": run_config.training.warmup_steps,
                   "lora_rank": run_config.lora.rank, "dtype": run_config.model.dtype, "bf16": run_config.training.bf16,
                   "gradient_checkpointing": True, "max_num_visual_tokens": max_visual},
        "setup_seconds": {"model": round(build_model_seconds, 1), "data": round(data_seconds, 1)},
    }
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    probe = TrainProbe()
    train_start = time.perf_counter()
    try:
        trained = train(run_config, callbacks=[probe])
    except ColinternError as error:  # e.g. a data layout the loader does not read: recorded as what a user sees
        result.update(passed=False, error=str(error), train_seconds=round(time.perf_counter() - train_start, 1))
        return result
    losses = [{"step": e["step"], "loss": e["loss"], "lr": e.get("learning_rate"), "grad_norm": e.get("grad_norm")}
              for e in probe.logs if "loss" in e]
    eval_losses = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in probe.logs if "eval_loss" in e]
    steady = probe.step_seconds[1:] or probe.step_seconds
    result.update(
        attn_implementation=probe.attn_implementation,
        trainable_parameters=probe.trainable,
        trainable_expected_by_formula=expected,
        trainable_dtypes=probe.trainable_dtypes,
        losses=losses,
        eval_losses=eval_losses,
        global_step=trained.global_step,
        train_seconds=round(time.perf_counter() - train_start, 1),
        train_samples_per_second=trained.metrics.get("train_samples_per_second"),
        steady_samples_per_second=round(batch_size / statistics.median(steady), 3) if steady else None,
        median_step_seconds=round(statistics.median(steady), 4) if steady else None,
        peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        peak_rss_gb=peak_rss_gb(),
    )
    finite = bool(losses) and all(math.isfinite(float(e["loss"])) for e in losses)
    result["passed"] = bool(finite and trained.global_step == steps and probe.trainable == expected and data_check["ok"])
    return result


def check_splits(folder: Path, rows: dict[str, int]) -> dict:
    """Whether colintern's loader reads each split of `folder` with its own rows (`rows`: split -> count)."""
    from colintern.data.pairs import load_pairs

    found: dict[str, int] = {}
    for split in rows:
        try:
            found[split] = len(load_pairs(str(folder), split))
        except ColinternError as error:
            return {"ok": False, "split": split, "error": str(error), "rows_found": found}
    return {"ok": found == rows, "rows_found": found, "rows_written": rows}


# ---------------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m colintern.benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="check", required=True)
    env = sub.add_parser("environment", help="GPU, versions, flash-attention import and forward")
    env.add_argument("--output", default="results/benchmarks/gpu-environment.json", help="JSON to write")
    step = sub.add_parser("bf16-step", help="one LoRA step of the tiny model loaded in bf16")
    step.add_argument("--output", default="results/benchmarks/gpu-bf16-step.json", help="JSON to write")
    step.add_argument("--lr", default="5e-5,5e-6,5e-7", help="learning rates, one step each (comma-separated)")
    step.add_argument("--device", help="default: cuda when available, else cpu")
    curve = sub.add_parser("lora-curve", help="LoRA loss curve at full size on a real-format local data set")
    curve.add_argument("--output", default="results/benchmarks/gpu-lora-curve.json", help="JSON to write")
    curve.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    curve.add_argument("--tiny", action="store_true", help="the embedded tiny model instead of the full size (CPU)")
    curve.add_argument("--layout", default="snapshot", choices=["snapshot", "folders"],
                       help="snapshot: data/train-*.parquet as a Hub download; folders: train/, test/")
    curve.add_argument("--batch-size", type=int, help="per-step batch (default 16; 4 with --tiny)")
    curve.add_argument("--train-rows", type=int, help="training pairs to render (default 512; 16 with --tiny)")
    curve.add_argument("--test-rows", type=int, help="evaluation pairs (default 64; 8 with --tiny)")
    curve.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    curve.add_argument("--eval-steps", type=int, help="evaluate every N steps (default steps / 4)")
    curve.add_argument("--work-dir", help="keep model, data and run here (default: a temporary folder, removed)")
    return parser


def main(args: argparse.Namespace) -> int:
    from colintern.benchmarks import machine_info

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()

    def write(figures: dict) -> dict:
        payload = {
            "check": f"gpu-{args.check}",
            "command": command_line(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "machine": machine_info(),
            **figures,
        }
        atomic_write_json(args.output, payload)
        return payload

    try:
        if args.check == "environment":
            figures = environment()
        elif args.check == "bf16-step":
            try:
                lrs = [float(v) for v in args.lr.split(",") if v.strip()]
            except ValueError as error:
                raise ColinternError(f"--lr must be comma-separated numbers, not '{args.lr}'") from error
            figures = bf16_steps(lrs, args.device)
        else:
            with work_folder(args.work_dir) as work:
                figures = lora_curve(work, args.steps, tiny=args.tiny, layout=args.layout, batch_size=args.batch_size,
                                     train_rows=args.train_rows, test_rows=args.test_rows, lr=args.lr,
                                     eval_steps=args.eval_steps)
    except Exception as error:  # e.g. out of GPU memory: the JSON says so too; the traceback goes on as usual
        write({"passed": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
        raise
    payload = write(figures)
    verdict = {True: "passed", False: "FAILED", None: "recorded (nothing to check on this machine)"}[payload["passed"]]
    print(f"{args.check}: {verdict}; written {args.output}")
    if payload.get("error"):
        print(f"  error: {payload['error']}")
    return 1 if payload["passed"] is False else 0


if __name__ == "__main__":
    from colintern.cli import run

    sys.exit(run(main, build_parser()))
