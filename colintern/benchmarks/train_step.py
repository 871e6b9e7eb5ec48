"""`train-step`: samples/s and peak memory of optimizer steps taken by colintern's trainer against the same steps taken
the way colpali-engine's `ContrastiveTrainer` takes them: same model (built by `colintern.training.trainer.build_model` from
the same seed), same rows, same batch size, same learning rate and schedule, same loss (colpali-engine's ColbertLoss).

    python scripts/benchmark.py train-step                       # CPU: the demo preset (embedded tiny model)
    python scripts/benchmark.py train-step --full-size           # GPU: InternVL3.5-1B architecture, LoRA, bf16

The two ways:
  * `colintern`: `colintern.training.trainer.build_trainer` as `scripts/train.py` runs it (ColInternTrainer,
    RetrievalCollator decoding pages in the collator, the preset's DataLoader workers, pages compacted to their image
    tokens before the loss, length-grouped batches where page sizes vary, AdamW over parameter groups).
  * `colpali_engine`: `ContrastiveTrainer` + `VisualRetrieverCollator` + `ColPaliEngineDataset` over the same rows
    with the page column decoded by `datasets` (as `load_dataset("vidore/colpali_train_set")` gives it), with
    `TrainingArguments` as colpali-engine's training configs set them (the shared hyperparameters above; everything
    else, such as the optimizer and `dataloader_num_workers`, at the transformers default). `--reference-workers`
    adds runs with DataLoader workers, so the effect of the data pipeline can be told apart from the rest.

Each way runs in its own fresh process (`measure.run_worker`). A run takes `--warmup` untimed steps, then `--steps`
timed ones; time is wall clock from the end of the last warm-up step to the end of the last step, so data loading,
forward, backward and optimizer step all count. The runs alternate over `--rounds` rounds (A B, B A, ...); samples/s
is the median round's, reported with the spread, the load averages and a quiet / under-load label. Peak memory: CUDA allocator peak on a GPU; on the CPU the main
process's resident-set high-water mark above its size before training (DataLoader worker processes not included;
their page decoding is the same in both ways). Losses of the timed steps are recorded so the two ways can be seen to
optimise the same objective.

`--full-size` (GPU): the real InternVL3.5-1B architecture with random weights (`full_size.py`, no download), saved
once and loaded by both ways as a checkpoint, the `colintern3_5-1b` preset's recipe (LoRA r=32 on the language model,
bf16, gradient checkpointing, flash-attention 2 when installed, else SDPA) and SynthDocs pages resized to
`--page-size` (A4 at 150 dpi: 3 tiles of 448px, 768 image tokens). Model FLOPs per sample: the forward passes of the
query and the page (`full_size.forward_flops`) plus the backward through the language model and head (2x their
forward for input and weight gradients when fully fine-tuned; 1x with LoRA, where frozen weights get no weight
gradients; recomputation by gradient checkpointing is not counted, as is usual for MFU). The vision tower is frozen
and runs without a graph, so it has no backward.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from colintern.cli import limits

logger = logging.getLogger(__name__)

DESCRIPTION = "Training throughput: samples/s and peak memory of colintern's trainer vs colpali-engine's way"
TARGET_SPEEDUP = 1.5
COLINTERN, COLPALI = "colintern", "colpali_engine"


@dataclass
class TrainStepRun:
    """What to measure (recorded in the JSON)."""

    preset: str = "demo"
    dataset: str | None = None  # default: the preset's (embedded:synthdocs with --full-size)
    batch_size: int | None = None  # default: the preset's per-device batch
    steps: int = 20
    warmup: int = 3
    reference_workers: tuple[int, ...] = (0,)  # colpali-engine runs: DataLoader workers (0 = transformers default)
    colintern_workers: int | None = None  # default: the preset's dataloader_num_workers
    threads: int | None = None
    device: str | None = None
    rounds: int = 3  # every run repeated, order alternating; the median counts
    full_size: bool = False
    page_size: tuple[int, int] = (1240, 1754)
    peak_tflops: float | None = None
    tiny_full_size: bool = False  # tests: --full-size code path with full_size.tiny_config() on a CPU
    notes: list[str] = field(default_factory=list)

    def implementations(self) -> list[tuple[str, int | None]]:
        """(label, DataLoader workers) of every run; workers None = the preset's."""
        runs: list[tuple[str, int | None]] = [(COLINTERN, self.colintern_workers)]
        for i, workers in enumerate(self.reference_workers):
            runs.append((COLPALI if i == 0 else f"{COLPALI}[workers={workers}]", workers))
        return runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = TrainStepRun()
    parser.add_argument("--preset", default=None, help="training preset (default: demo; colintern3_5-1b with --full-size)")
    parser.add_argument("--dataset", default=None, help="training set (default: the preset's; SynthDocs with --full-size)")
    parser.add_argument("--batch-size", type=int, default=None, help="per-device batch (default: the preset's)",
                        **limits(ge=1))
    parser.add_argument("--steps", type=int, default=default.steps, help="timed optimizer steps", **limits(ge=1))
    parser.add_argument("--warmup", type=int, default=default.warmup, help="untimed steps before timing",
                        **limits(ge=0))
    parser.add_argument(
        "--reference-workers", type=int, nargs="+", default=list(default.reference_workers),
        help="DataLoader workers of the colpali-engine runs, one run each (default 0, the transformers default)",
        **limits(ge=0),
    )
    parser.add_argument("--workers", type=int, default=None, help="colintern's DataLoader workers (default: preset's)",
                        **limits(ge=0))
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's choice)",
                        **limits(ge=1))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--rounds", type=int, default=default.rounds,
                        help="repeat every run, order alternating; the median counts (default 3)",
                        **limits(ge=1))
    parser.add_argument(
        "--full-size", action="store_true",
        help="InternVL3.5-1B architecture, random weights, LoRA + bf16 + checkpointing, 448px tiles (needs a GPU)",
    )
    parser.add_argument("--page-size", type=int, nargs=2, default=list(default.page_size), metavar=("W", "H"),
                        help="--full-size: pages resized to this many pixels (default A4 at 150 dpi)", **limits(ge=1))
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator bf16 peak for MFU", **limits(gt=0))
    parser.add_argument("--tag", default=None, help="suffix of the JSON file name")
    parser.add_argument("--note", action="append", default=[], help="free text recorded in the JSON")


def run(args: argparse.Namespace) -> int:
    from colintern.benchmarks import record
    from colintern.utils import ColinternError

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.full_size and not device.startswith("cuda"):
        raise ColinternError(
            "--full-size trains InternVL3.5-1B's architecture (0.9B parameters, bf16) and needs a CUDA GPU; "
            "on this machine run `python scripts/benchmark.py train-step` (the demo model)."
        )
    plan = TrainStepRun(
        preset=args.preset or ("colintern3_5-1b" if args.full_size else "demo"),
        dataset=args.dataset,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        reference_workers=tuple(args.reference_workers),
        colintern_workers=args.workers,
        threads=args.threads,
        device=device,
        rounds=args.rounds,
        full_size=args.full_size,
        page_size=tuple(args.page_size),
        peak_tflops=args.peak_tflops,
        notes=list(args.note),
    )
    figures = benchmark_train_step(plan)
    tag = "-".join(t for t in ("full-size" if plan.full_size else None, args.tag) if t) or None
    path = record("train-step", figures, args.output_dir, tag=tag)
    print(train_step_table(figures))
    print(_verdict(figures))
    logger.info("Wrote %s", path)
    return 0


# ------------------------------------------------------------------------------------------------ orchestration
def benchmark_train_step(plan: TrainStepRun) -> dict:
    """Every run in its own process, `plan.rounds` times in alternating order (`measure.interleaved_rounds`); the
    figures for the JSON are the median rounds, with the spread, the load averages and a quiet / under-load label."""
    import torch

    from colintern.benchmarks.measure import interleaved_rounds, run_worker

    load_before = os.getloadavg()
    results: dict[str, dict] = {}  # the latest round of each run; its speed is replaced by the median below
    rounds: dict[str, list[float]] = {}  # samples/s of every round
    with tempfile.TemporaryDirectory(prefix="colintern-train-step-") as tmp:
        if plan.full_size:
            _save_full_size_model(plan, Path(tmp) / "model")

        def one_round(label: str, workers: int | None):
            def call() -> float:
                round_index = len(rounds.get(label, []))
                logger.info("Training %d + %d steps the %s way (round %d/%d) ...",
                            plan.warmup, plan.steps, label, round_index + 1, plan.rounds)
                out = Path(tmp) / f"{label}-{round_index}.json"
                worker_args = ["--plan", json.dumps(asdict(plan)), "--way", label.split("[")[0],
                               "--workers", "none" if workers is None else str(workers),
                               "--tmp", tmp, "--out", str(out)]
                result = run_worker(__name__, worker_args, out)
                logger.info("  %s: %.2f samples/s", label, result["samples_per_second"])
                rounds[label] = [*rounds.get(label, []), result["samples_per_second"]]
                peaks = [p for p in (result["peak_memory_bytes"], results.get(label, {}).get("peak_memory_bytes")) if p]
                result["peak_memory_bytes"] = max(peaks) if peaks else result["peak_memory_bytes"]  # over rounds
                results[label] = result
                return result["seconds"]  # the timed steps only, the process's start-up and warm-up left out

            return call

        timing = interleaved_rounds(
            {label: one_round(label, workers) for label, workers in plan.implementations()}, plan.rounds,
            reference=COLPALI if plan.reference_workers else None,
            own_load=float(plan.threads or torch.get_num_threads()),
        )
    load_after = os.getloadavg()
    for label, result in results.items():
        stats = timing.stats[label]
        result["rounds_samples_per_second"] = rounds[label]
        result.update(stats.to_dict())
        # the figure quoted: the median round (samples/s of the median time; the timed steps are the same each round)
        result["seconds"] = stats.median
        result["seconds_per_step"] = stats.median / result["timed_steps"]
        result["samples_per_second"] = result["batch_size"] * result["timed_steps"] / stats.median
        result["samples_per_second_best"] = max(rounds[label])
        if "model_flops_per_sample" in result:
            result["achieved_tflops"] = result["model_flops_per_sample"] * result["samples_per_second"] / 1e12
            peak = result["peak_bf16_tflops"]
            result["mfu"] = result["achieved_tflops"] / peak if peak else None

    ours, theirs = results[COLINTERN], results.get(COLPALI)
    figures: dict = {
        "plan": asdict(plan),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "conditions": timing.conditions,
        "timing": {k: v for k, v in timing.to_dict().items() if k != "implementations"},
        "implementations": results,
    }
    if theirs is not None:
        figures["speedup_vs_colpali_engine"] = ours["samples_per_second"] / theirs["samples_per_second"]
        if ours["peak_memory_bytes"] and theirs["peak_memory_bytes"]:
            figures["peak_memory_ratio_vs_colpali_engine"] = ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]
        figures["targets"] = {f"speedup_vs_colpali_engine>={TARGET_SPEEDUP}":
                              figures["speedup_vs_colpali_engine"] >= TARGET_SPEEDUP}
    for label, result in results.items():
        if label != COLINTERN and label != COLPALI:
            figures[f"speedup_vs_{label}"] = ours["samples_per_second"] / result["samples_per_second"]
    return figures


def _save_full_size_model(plan: TrainStepRun, path: Path) -> None:
    """The random-weight InternVL3.5-1B (or, for tests, its scaled-down copy) saved as a checkpoint both ways load."""
    import torch

    from colintern.benchmarks import full_size

    dtype = torch.bfloat16 if plan.device.startswith("cuda") else torch.float32
    model, processor = full_size.build_full_size(full_size.tiny_config() if plan.tiny_full_size else None, dtype=dtype)
    model.save_pretrained(path)
    processor.save_pretrained(path)


# ------------------------------------------------------------------------------------------------ one run (worker)
def _worker_main(argv: list[str]) -> None:
    """`python -m colintern.benchmarks.train_step --plan JSON --way colintern|colpali_engine --workers N --out F`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--way", required=True, choices=(COLINTERN, COLPALI))
    parser.add_argument("--workers", required=True)
    parser.add_argument("--tmp", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    raw = json.loads(args.plan)
    plan = TrainStepRun(**{k: tuple(v) if isinstance(v, list) and k != "notes" else v for k, v in raw.items()})
    workers = None if args.workers == "none" else int(args.workers)
    result = measure_way(plan, args.way, workers, Path(args.tmp))
    Path(args.out).write_text(json.dumps(result))


def run_config(plan: TrainStepRun, workers: int | None, output_dir: Path, model_dir: Path | None = None):
    """The preset's configuration for a short timed run: no evaluation, no checkpoints, no loggers. `model_dir`:
    the saved random-weight checkpoint of --full-size."""
    from colintern.model.architecture import DEFAULT_MAX_NUM_VISUAL_TOKENS
    from colintern.training.arguments import RunConfig, apply_overrides, load_yaml_config, preset_path

    config = RunConfig()
    apply_overrides(config, load_yaml_config(preset_path(plan.preset)), f"preset {plan.preset}")
    training = config.training
    training.max_steps = plan.warmup + plan.steps
    training.eval_steps = 0
    training.retrieval_eval = False
    training.report_to = "none"
    training.logging_steps = 1
    training.output_dir = str(output_dir)
    training.resume_from_checkpoint = None
    if plan.batch_size:
        training.per_device_train_batch_size = plan.batch_size
    training.gradient_accumulation_steps = 1  # one optimizer step = one batch, in both ways
    if workers is not None:
        training.dataloader_num_workers = workers
    config.data.eval_split = None
    if plan.full_size:
        config.model.name_or_path = str(model_dir)
        config.data.dataset = "embedded:synthdocs"
        config.model.max_num_visual_tokens = DEFAULT_MAX_NUM_VISUAL_TOKENS
    if plan.dataset:
        config.data.dataset = plan.dataset
    return config


def step_clock(device: str):
    """A TrainerCallback recording the wall-clock time at the end of every optimizer step (in `.ends`)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    return StepClock()


def measure_way(plan: TrainStepRun, way: str, workers: int | None, tmp: Path) -> dict:
    """Train `plan.warmup + plan.steps` steps one way in this process; time and memory of the timed steps."""
    import torch

    from colintern.benchmarks.measure import PeakMemory

    if plan.threads:
        torch.set_num_threads(plan.threads)
    if plan.warmup < 1:
        raise ValueError("--warmup must be at least 1 (the first step builds the optimizer states)")
    run_dir = Path(tempfile.mkdtemp(prefix=f"{way}-", dir=tmp))
    config = run_config(plan, workers, run_dir / "run", model_dir=tmp / "model")
    clock = step_clock(plan.device)
    trainer = _colintern_trainer(config, clock, plan) if way == COLINTERN else _colpali_trainer(config, clock, plan)
    with PeakMemory(plan.device) as peak:
        trainer.train()
    timed_steps = len(clock.ends) - plan.warmup
    if timed_steps < 1:
        raise RuntimeError(f"only {len(clock.ends)} steps ran; the dataset is too small for --warmup + --steps")
    seconds = clock.ends[-1] - clock.ends[plan.warmup - 1]
    batch = config.training.per_device_train_batch_size
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "way": way,
        "dataloader_num_workers": config.training.dataloader_num_workers,
        "batch_size": batch,
        "timed_steps": timed_steps,
        "seconds": seconds,
        "seconds_per_step": seconds / timed_steps,
        "samples_per_second": batch * timed_steps / seconds,
        "peak_memory_bytes": peak.peak_bytes,
        "peak_memory_method": peak.method,
        "losses": losses,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                          else trainer.optimizer).__name__,
        "torch_threads": torch.get_num_threads(),
    }
    if plan.full_size:
        result.update(_model_flops(plan, tmp, trainer, result))
    return result


def _colintern_trainer(config, clock, plan: TrainStepRun):
    from colintern.training.trainer import build_trainer

    prepared = build_trainer(config, callbacks=[clock], save_checkpoints=False, validate_resume=False)
    if plan.full_size:
        prepared.trainer.train_dataset = _resized(prepared.trainer.train_dataset, config, plan)
    return prepared.trainer


def _colpali_trainer(config, clock, plan: TrainStepRun):
    """colpali-engine's way over the same model and rows: ContrastiveTrainer, VisualRetrieverCollator, ColbertLoss."""
    import datasets
    import torch
    from colpali_engine.collators import VisualRetrieverCollator
    from colpali_engine.data.dataset import ColPaliEngineDataset
    from colpali_engine.loss import ColbertLoss
    from colpali_engine.trainer.contrastive_trainer import ContrastiveTrainer
    from transformers import TrainingArguments

    from colintern.data.pairs import build_datasets
    from colintern.training.trainer import NEGATIVE_LOSSES, build_model, recipe_arguments

    training = config.training
    torch.manual_seed(training.seed)
    model, processor = build_model(config)
    rows = build_datasets(config, processor, use_negatives=training.loss in NEGATIVE_LOSSES).train_dataset  # the same validated rows colintern trains on
    if plan.full_size:
        rows = _resized(rows, config, plan)
    rows = rows.cast_column(config.data.image_column, datasets.Image(decode=True))
    dataset = ColPaliEngineDataset(rows, query_column_name=config.data.query_column,
                                   pos_target_column_name=config.data.image_column)
    args = TrainingArguments(  # the recipe as colintern's trainer gets it; everything else at transformers' defaults
        **recipe_arguments(config),
        gradient_checkpointing=False,  # already enabled on the model by build_model when the preset asks for it
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=training.dataloader_num_workers,
    )
    return ContrastiveTrainer(
        loss_func=ColbertLoss(), is_vision_model=True, model=model, args=args, train_dataset=dataset,
        eval_dataset=None, data_collator=VisualRetrieverCollator(processor), callbacks=[clock],
    )


def _resized(rows, config, plan: TrainStepRun):
    """--full-size: pages resized to `plan.page_size` (stored as PNG, as prepared datasets hold them)."""
    import io

    import datasets
    from PIL import Image

    column = config.data.image_column
    rows = rows.select(range(min(len(rows), config.training.per_device_train_batch_size * (plan.warmup + plan.steps))))

    def resize(example):
        value = example[column]
        image = Image.open(io.BytesIO(value["bytes"])) if isinstance(value, dict) else value
        buffer = io.BytesIO()
        image.convert("RGB").resize(tuple(plan.page_size)).save(buffer, format="PNG")
        example[column] = {"bytes": buffer.getvalue(), "path": None}
        return example

    return rows.cast_column(column, datasets.Image(decode=False)).map(resize, desc="resizing pages")


def _model_flops(plan: TrainStepRun, tmp: Path, trainer, result: dict) -> dict:
    """Model FLOPs per sample and MFU of the timed steps (see the module docstring)."""
    import torch
    from transformers.models.internvl import InternVLConfig

    from colintern.benchmarks import full_size
    from colintern.model.architecture import InternVLArchitecture

    architecture = InternVLArchitecture.from_config(InternVLConfig.from_pretrained(tmp / "model"))
    batch = next(iter(trainer.get_train_dataloader()))
    n_tiles = int(batch["doc_pixel_values"].shape[0]) / batch["doc_input_ids"].shape[0]
    page_len = int(batch["doc_attention_mask"].sum(dim=1).float().mean())
    query_len = int(batch["query_attention_mask"].sum(dim=1).float().mean())
    page = full_size.forward_flops(architecture, round(n_tiles), page_len)
    query = full_size.forward_flops(architecture, 0, query_len)
    lora = any("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    backward_factor = 1.0 if lora else 2.0
    backward = backward_factor * (page["language"] + page["head"] + query["language"] + query["head"])
    per_sample = page["total"] + query["total"] + backward
    achieved = per_sample * result["samples_per_second"]
    peak = plan.peak_tflops or full_size.peak_bf16_tflops(
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return {
        "tiles_per_page": n_tiles,
        "page_tokens": page_len,
        "query_tokens": query_len,
        "model_flops_per_sample": per_sample,
        "backward_factor_language_model": backward_factor,
        "achieved_tflops": achieved / 1e12,
        "peak_bf16_tflops": peak,
        "mfu": achieved / (peak * 1e12) if peak else None,
    }


# ------------------------------------------------------------------------------------------------ report
def train_step_table(figures: dict) -> str:
    from colintern.benchmarks.measure import format_table

    rows = []
    ours = figures["implementations"][COLINTERN]
    for label, result in figures["implementations"].items():
        peak = result["peak_memory_bytes"]
        rows.append([
            label, result["dataloader_num_workers"], result["batch_size"], result["samples_per_second"],
            result["seconds_per_step"], None if peak is None else peak / 2**20,
            ours["samples_per_second"] / result["samples_per_second"], result.get("mfu"),
            f"{result['losses'][plan_warmup(figures)]:.3f} -> {result['losses'][-1]:.3f}" if result["losses"] else None,
        ])
    return format_table(
        ["way", "workers", "batch", "samples/s", "s/step", "peak MiB", "colintern speed-up", "MFU", "loss (timed)"],
        rows,
    )


def plan_warmup(figures: dict) -> int:
    return min(figures["plan"]["warmup"], len(figures["implementations"][COLINTERN]["losses"]) - 1)


def _verdict(figures: dict) -> str:
    if "speedup_vs_colpali_engine" not in figures:
        return "No colpali-engine run to compare with."
    speedup = figures["speedup_vs_colpali_engine"]
    status = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
    return f"colintern trains at {speedup:.2f}x the samples/s of colpali-engine's way (target {TARGET_SPEEDUP}x: {status})."


if __name__ == "__main__":
    import sys

    from colintern.utils import setup_logging

    setup_logging()
    _worker_main(sys.argv[1:])
