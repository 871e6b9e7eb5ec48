"""Gradient-cache benchmark: peak memory and samples/s of one optimizer step at in-batch 32 / 128 / 512 with chunks
of 16 (`--cache-chunk-size`), against the plain step at 32 (and at 128 and 512 where it fits).

    python scripts/benchmark.py grad-cache            # CPU: the embedded tiny model, LoRA (dropout 0.1), float32

Each step is `ColInternTrainer.training_step` (the real cached or plain step: embedding, colpali-engine's
ColbertLoss, backward) followed by the fused AdamW step, after one warm-up step. The peak is every tensor storage
from creation to release (`TensorMemoryTracker`, as `scripts/benchmark.py memory`); the memory model's prediction
for the same step is given beside it. Samples/s is in-batch size / step time; on a shared, loaded machine it is
only indicative (the load average is recorded with the figures).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import tempfile
import time

logger = logging.getLogger(__name__)

DESCRIPTION = "Gradient cache: peak memory and samples/s of one step at in-batch 32/128/512 (chunk 16) vs plain steps."
QUERY_TOKENS = 32
MAX_NUM_VISUAL_TOKENS = 16  # the demo's pages: one 128px tile of 16 image tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512], help="in-batch sizes")
    parser.add_argument("--chunk", type=int, default=16, help="--cache-chunk-size of the cached steps")
    parser.add_argument("--plain-sizes", type=int, nargs="*", default=[32, 128, 512],
                        help="in-batch sizes also measured as plain (un-cached) steps")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per row (the fastest is kept)")
    parser.add_argument("--tag", default=None, help="suffix of the result file (grad-cache-<tag>.json)")
    parser.add_argument("--predict-only-sizes", type=int, nargs="*", default=[],
                        help="in-batch sizes given the memory model's prediction only (plain and cached), unmeasured")


def _trainer(model, chunk: int | None, output_dir: str):
    from transformers import TrainingArguments

    from colintern.training.trainer import ColInternTrainer, build_loss

    args = TrainingArguments(output_dir=output_dir, report_to=[], per_device_train_batch_size=1, use_cpu=True,
                             disable_tqdm=True)
    trainer = ColInternTrainer(model=model, args=args, loss_fn=build_loss("colbert"), cache_chunk_size=chunk)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    return trainer


def _memory_setup(model_name: str, batch_size: int, chunk: int | None):
    """The model config, the memory model's setup for one step at in-batch `batch_size` (cached in chunks of `chunk`
    when given) and its predicted peak."""
    from colintern.tuning.advisor import analyze_architecture, load_model_config
    from colintern.tuning.memory_model import TrainingMemorySetup, estimate_peak_memory

    config = load_model_config(model_name)
    arch = analyze_architecture(config, lora_rank=16, max_num_visual_tokens=MAX_NUM_VISUAL_TOKENS)
    tiles = arch.tiles_per_page
    page_tokens = tiles * arch.image_seq_length + arch.page_tokens - arch.image_tokens_per_page
    setup = TrainingMemorySetup(per_device_batch_size=batch_size, query_tokens=QUERY_TOKENS, lora_rank=16,
                                dtype="float32", device="cpu", tiles_per_page=tiles, page_tokens=page_tokens,
                                pages_padded=False, cache_chunk_size=chunk)
    return config, setup, estimate_peak_memory(arch, setup)


def measure(model_name: str, batch_size: int, chunk: int | None, repeats: int) -> dict:
    import torch

    from colintern.benchmarks.memory import TensorMemoryTracker, build_model, synthetic_batch

    config, setup, prediction = _memory_setup(model_name, batch_size, chunk)
    model = build_model(config, setup)
    queries, pages = synthetic_batch(config, setup, QUERY_TOKENS, setup.tiles_per_page)
    inputs = {**{f"query_{k}": v for k, v in queries.items()}, **{f"doc_{k}": v for k, v in pages.items()}}
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _trainer(model, chunk, output_dir)

        def step() -> float:
            loss = trainer.training_step(trainer.model, dict(inputs))
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            return float(loss)

        step()  # warm-up: AdamW creates its states
        best = None  # with repeats=0, the tracked step's time (slowed by the tracker) is reported
        for _ in range(repeats):  # timed without the tracker, whose per-op bookkeeping would dominate
            start = time.perf_counter()
            step()
            seconds = time.perf_counter() - start
            best = seconds if best is None else min(best, seconds)
        tracker = TensorMemoryTracker()
        tracker.track(*model.parameters(), *model.buffers(), *inputs.values())
        for state in trainer.optimizer.state.values():
            tracker.track(*(v for v in state.values() if isinstance(v, torch.Tensor)))
        start = time.perf_counter()
        with tracker:
            step()
        best = best if best is not None else time.perf_counter() - start
        peak = tracker.peak_bytes
        trainer = model = None  # released before the next row
        gc.collect()
    return {
        "in_batch": batch_size,
        "chunk": chunk,
        "step": "cached" if chunk and chunk < batch_size else "plain",
        "measured_peak_bytes": peak,
        "predicted_peak_bytes": prediction.tensor_peak_bytes,
        "predicted_phase": prediction.peak_phase,
        "step_seconds": round(best, 3),
        "samples_per_second_under_load": round(batch_size / best, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "timed": "untracked steps" if repeats else "the tracked step (TensorMemoryTracker overhead included)",
    }


def predict(model_name: str, batch_size: int, chunk: int | None) -> dict:
    """The memory model's peak for a step that is not measured (too slow for the machine)."""
    _, _, prediction = _memory_setup(model_name, batch_size, chunk)
    return {"in_batch": batch_size, "chunk": chunk, "step": "plain" if chunk is None else "cached",
            "measured_peak_bytes": None, "predicted_peak_bytes": prediction.tensor_peak_bytes,
            "predicted_phase": prediction.peak_phase, "note": "predicted only: not measured"}


def run(args: argparse.Namespace) -> int:
    import torch

    from colintern.benchmarks import record
    from colintern.model.embedded import EMBEDDED_MODEL, ensure_embedded_model

    model_name = str(ensure_embedded_model())
    rows = []
    for batch_size in sorted(set(args.batch_sizes) | set(args.plain_sizes)):
        plans = []
        if batch_size in args.plain_sizes:
            plans.append(None)
        if batch_size in args.batch_sizes and args.chunk < batch_size:
            plans.append(args.chunk)
        for chunk in plans:
            try:
                row = measure(model_name, batch_size, chunk, args.repeats)
            except (torch.OutOfMemoryError, MemoryError) as error:
                row = {"in_batch": batch_size, "chunk": chunk, "step": "plain" if chunk is None else "cached",
                       "oom": str(error).splitlines()[0] if str(error) else type(error).__name__}
            rows.append(row)
            logger.info("%s", row)
    for batch_size in args.predict_only_sizes:
        rows += [predict(model_name, batch_size, None), predict(model_name, batch_size, args.chunk)]
    baseline = next(r for r in rows if r["in_batch"] == min(args.plain_sizes) and r["step"] == "plain")
    for row in rows:
        if row.get("measured_peak_bytes"):
            row["peak_vs_plain_32"] = round(row["measured_peak_bytes"] / baseline["measured_peak_bytes"], 3)
        row["predicted_vs_plain_32"] = round(row["predicted_peak_bytes"] / baseline["predicted_peak_bytes"], 3)
    largest = max((r for r in rows if r["step"] == "cached" and r.get("measured_peak_bytes")),
                  key=lambda r: r["in_batch"], default=None)
    largest_predicted = max((r for r in rows if r["step"] == "cached"), key=lambda r: r["in_batch"], default=None)
    figures = {
        "model": EMBEDDED_MODEL,
        "device": "cpu",
        "dtype": "float32",
        "lora": {"rank": 16, "dropout": 0.1},
        "query_tokens": QUERY_TOKENS,
        "max_num_visual_tokens": MAX_NUM_VISUAL_TOKENS,
        "chunk": args.chunk,
        "method": "peak: TensorMemoryTracker (every tensor storage, from creation to release) over one step; time: "
                  f"fastest of {args.repeats} untracked step(s) after a warm-up step",
        "rows": rows,
        "target": "peak at the largest cached in-batch within 1.3x of the plain step at "
                  f"{baseline['in_batch']}",
        "target_met_measured": None if largest is None else
        {"in_batch": largest["in_batch"], "ratio": largest["peak_vs_plain_32"], "met": largest["peak_vs_plain_32"] <= 1.3},
        "target_met_predicted": None if largest_predicted is None else
        {"in_batch": largest_predicted["in_batch"], "ratio": largest_predicted["predicted_vs_plain_32"],
         "met": largest_predicted["predicted_vs_plain_32"] <= 1.3},
        "note": "samples/s measured on a shared machine under load (load average per row): indicative only",
    }
    print(format_table(rows))
    path = record("grad-cache", figures, output_dir=args.output_dir, tag=args.tag)
    print(f"\nwritten: {path}")
    return 0


def format_table(rows: list[dict]) -> str:
    header = (f"{'in-batch':>8} {'step':7} {'chunk':>5} {'measured MiB':>13} {'predicted MiB':>14} {'x plain32':>9} "
              f"{'samples/s':>10} {'load':>5}")
    lines = [header]
    for r in rows:
        if not r.get("measured_peak_bytes") and "oom" not in r:
            lines.append(f"{r['in_batch']:>8} {r['step']:7} {r['chunk'] or '-'!s:>5} {'-':>13} "
                         f"{r['predicted_peak_bytes'] / 2**20:14.1f}  (predicted only)")
            continue
        if "oom" in r:
            lines.append(f"{r['in_batch']:>8} {r['step']:7} {r['chunk'] or '-'!s:>5} out of memory")
            continue
        lines.append(
            f"{r['in_batch']:>8} {r['step']:7} {r['chunk'] or '-'!s:>5} {r['measured_peak_bytes'] / 2**20:13.1f} "
            f"{r['predicted_peak_bytes'] / 2**20:14.1f} {r.get('peak_vs_plain_32', 0):9.2f} "
            f"{r['samples_per_second_under_load']:10.1f} {r['load_average_1min']:5.1f}"
        )
    return "\n".join(lines)
