"""Memory benchmark: the advisor's memory model (colintern.tuning.memory_model) against the measured peak of real training
steps, at several batch sizes.

    python scripts/benchmark.py memory                 # CPU: the embedded tiny model, LoRA and full, +/- checkpointing
    python scripts/benchmark.py memory --full-size     # GPU: InternVL3.5-1B's architecture, random weights, bf16, SDPA

A training step is what colpali-engine's ContrastiveTrainer does: embed B queries, embed B pages, colpali-engine's
ColbertLoss, backward, AdamW step (after one warm-up step, so that the optimizer states exist). How the peak is
measured:
  * CUDA: `torch.cuda.max_memory_allocated()` around the step, i.e. every live tensor (weights, optimizer states,
    inputs, activations, temporaries); the caching allocator's reserve is reported beside it.
  * CPU: torch's own `MemTracker` (torch.distributed._tools.mem_tracker), a TorchDispatchMode that sees every tensor
    every op creates and when its storage dies, so the peak counts tensor memory only - no Python objects, no
    allocator caches, no thread pools. (A process's RSS high-water mark mixes those in and is blurred by glibc's
    allocator; it is no measure of what the model predicts.)
The prediction gets the step's real sequence lengths and precision; the error is (predicted - measured) / measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import time
import weakref

from colintern.benchmarks.full_size import FULL_SIZE_MODEL
from colintern.cli import limits
from colintern.tuning.memory_model import TrainingMemorySetup, estimate_peak_memory

logger = logging.getLogger(__name__)

DESCRIPTION = "Peak training memory: the advisor's memory model against measured training steps (CPU or GPU)."
NARROW_MODEL = "narrow-448"  # InternVL3.5-1B's tiling and sequence lengths at a width a CPU trains in seconds
PAGE_PROMPT_IDS = (1, 2, 3)  # stand-ins for `<|im_start|>`, `user`, `\n`: any ids work, only lengths matter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model (default: embedded tiny model; with --full-size 1B)")
    parser.add_argument(
        "--full-size",
        action="store_true",
        help=f"{FULL_SIZE_MODEL}'s architecture with random weights, bf16 + autocast, SDPA (needs a GPU)",
    )
    parser.add_argument(
        "--narrow-448",
        action="store_true",
        help="InternVL3.5-1B's real 448px tiles, 1536 image tokens per page and 151936-token vocabulary with narrow "
        "layers (2 x 64 vision, 2 x 64 text): the sequence-length-dependent parts (MaxSim scores, masks, vision "
        "working set) at full size, on a CPU",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        help="per-device batch sizes (default: 4 16 64; --full-size: 1 2 4 8 without checkpointing, 4 16 32 64 with)",
        **limits(ge=1),
    )
    parser.add_argument("--modes", nargs="+", choices=("lora", "full"), help="fine-tuning modes (default: lora full)")
    parser.add_argument(
        "--checkpointing", choices=("off", "on", "both"), default="both", help="gradient checkpointing settings"
    )
    parser.add_argument(
        "--query-tokens", type=int, default=None, help="padded query length (default 32; 64 for 448px models)",
        **limits(ge=1)
    )
    parser.add_argument("--max-num-visual-tokens", type=int, default=None, help="image tokens per page budget",
                        **limits(ge=1))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: fp32 CPU, bf16 GPU")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--tag", default=None, help="suffix of the result file (memory-<tag>.json)")


# ---------------------------------------------------------------------------------------------- measuring tensors
def _dispatch_mode_base():
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


class TensorMemoryTracker(_dispatch_mode_base()):
    """Live and peak bytes of all tensor storages: the CPU counterpart of `torch.cuda.max_memory_allocated`.

    A TorchDispatchMode sees the outputs of every op (forward, backward and optimizer ops alike); each new storage is
    counted until Python's weak reference to it reports its release. Tensors that exist before the mode is entered
    (weights, optimizer states, inputs) are registered with `track`. Like the CUDA allocator's statistics, the peak is
    taken when an op's outputs have been allocated and its inputs are still alive; workspaces internal to a kernel
    are not seen. (torch's MemTracker works the same way but refuses a module called twice per step, as a retriever
    is, for queries and pages.)
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    def track(self, *tensors) -> None:
        import torch

        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = id(storage)  # torch keeps one Python object per live storage, so the id is stable while it lives
            if key in self._live:
                continue
            nbytes = storage.nbytes()
            self._live[key] = nbytes
            self.current_bytes += nbytes
            weakref.finalize(storage, self._release, key)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _release(self, key: int) -> None:
        self.current_bytes -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        output = func(*args, **(kwargs or {}))
        self.track(*tree_leaves(output))
        return output


# ---------------------------------------------------------------------------------------------- one training step
def _colbert_loss():
    """The trainer's loss (colintern.training.trainer.build_loss: colpali-engine's ColbertLoss); where colpali-engine is not
    installed (the GPU machines), the same computation (its torch backend: einsum scores, amax, sum, length
    normalisation, cross-entropy at temperature 0.02)."""
    try:
        from colintern.training.trainer import build_loss

        return build_loss("colbert"), "colpali_engine.loss.ColbertLoss (colintern.training.trainer.build_loss)"
    except ImportError:
        import torch
        import torch.nn.functional as F

        def loss(query, doc):
            scores = torch.einsum("bnd,csd->bcns", query, doc).amax(dim=3).sum(dim=2)
            scores = scores / (query[:, :, 0] != 0).sum(dim=1).unsqueeze(1)
            return F.cross_entropy(scores / 0.02, torch.arange(scores.shape[0], device=scores.device))

        return loss, "reference einsum ColBERT loss (colpali-engine not installed)"


def narrow_config():
    """InternVL3.5-1B's config with narrow layers: same tiles (448px, patch 14, 256 tokens), vocabulary, GQA ratio."""
    from colintern.benchmarks.full_size import scaled_config

    return scaled_config(
        vision={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
        text={"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16},
    )


def build_model(config, setup: TrainingMemorySetup, seed: int = 0):
    """ColIntern3_5 with random weights from `config`, on the setup's device and dtype, LoRA'd or fully trainable."""
    import torch

    from colintern.tuning.advisor import LM_LORA_TARGET_REGEX, LORA_MODULES_TO_SAVE
    from colintern.model.modeling import ColIntern3_5

    torch.manual_seed(seed)
    dtype = getattr(torch, setup.dtype)
    with torch.device(setup.device):
        model = ColIntern3_5._from_config(config, attn_implementation=setup.attn_implementation, dtype=dtype)
    if setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setup.finetuning == "lora":
        from peft import LoraConfig, get_peft_model

        rank = setup.lora_rank or 32
        lora = LoraConfig(
            r=rank,
            lora_alpha=rank,
            lora_dropout=setup.lora_dropout,
            target_modules=LM_LORA_TARGET_REGEX,
            modules_to_save=list(LORA_MODULES_TO_SAVE),
        )
        model = get_peft_model(model, lora)
    else:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    from colintern.training.trainer import upcast_trainable_parameters

    upcast_trainable_parameters(model)  # what training does: float32 master weights for whatever trains
    return model.train()


def synthetic_batch(config, setup: TrainingMemorySetup, query_tokens: int, tiles: int):
    """B queries (the first left-padded to half its length) and B pages of `tiles` tiles each, as the processor
    lays them out: prompt ids, `<img>`, image-context tokens, `</img>`; float32 pixel values. Values are random;
    memory depends on shapes only."""
    import torch

    b, device = setup.per_device_batch_size, setup.device
    generator = torch.Generator().manual_seed(0)
    vocab = config.text_config.vocab_size
    image_token = config.image_token_id
    query_ids = torch.randint(10, min(vocab, image_token) - 1, (b, query_tokens), generator=generator)
    query_mask = torch.ones(b, query_tokens, dtype=torch.long)
    query_mask[0, : query_tokens // 2] = 0  # a shorter query: the batch is padded, as real batches are
    image_tokens = tiles * config.image_seq_length
    page_row = [*PAGE_PROMPT_IDS, 4] + [image_token] * image_tokens + [5]
    page_ids = torch.tensor([page_row] * b)
    size = config.vision_config.image_size
    size = size[0] if isinstance(size, list | tuple) else size
    pixel_values = torch.randn(b * tiles, 3, size, size, generator=generator)
    queries = {"input_ids": query_ids.to(device), "attention_mask": query_mask.to(device)}
    pages = {
        "input_ids": page_ids.to(device),
        "attention_mask": torch.ones_like(page_ids).to(device),
        "pixel_values": pixel_values.to(device),
    }
    return queries, pages


def make_training_step(model, loss_fn, queries, pages, setup: TrainingMemorySetup):
    """One optimizer step as colintern's trainer runs it (ColInternTrainer.compute_loss on transformers' Trainer):
    under mixed precision, accelerate wraps the forward in torch.autocast and converts outputs to float32, so the
    loss runs in float32; page embeddings are compacted to their image tokens; fused torch.optim.AdamW."""
    import torch

    from colintern.training.trainer import compact_multivectors

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=5e-5, weight_decay=0.0, fused=True)  # as colintern's trainer
    autocast = (
        torch.autocast(setup.device, dtype=getattr(torch, setup.dtype))
        if setup.uses_autocast
        else contextlib.nullcontext()
    )

    def step() -> float:
        with autocast:
            query_embeddings = model(**queries)
            page_embeddings = model(**pages)
        if setup.uses_autocast:
            query_embeddings, page_embeddings = query_embeddings.float(), page_embeddings.float()
        if setup.compact_pages:
            page_embeddings = compact_multivectors(page_embeddings)
        loss = loss_fn(query_embeddings, page_embeddings)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, optimizer


def measure_step_peak(step, model, optimizer, inputs, device: str) -> dict:
    """Peak tensor memory of one call of `step` (bytes): the CUDA allocator, or a TensorMemoryTracker on the CPU."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return {
            "measured_bytes": torch.cuda.max_memory_allocated(),
            "reserved_bytes": torch.cuda.max_memory_reserved(),
            "step_seconds": time.perf_counter() - start,
            "method": "torch.cuda.max_memory_allocated",
        }
    tracker = TensorMemoryTracker()
    tracker.track(*model.parameters(), *model.buffers(), *inputs)
    for state in optimizer.state.values():
        tracker.track(*(value for value in state.values() if isinstance(value, torch.Tensor)))
    start = time.perf_counter()
    with tracker:
        step()
    return {
        "measured_bytes": tracker.peak_bytes,
        "step_seconds": time.perf_counter() - start,
        "method": "TensorMemoryTracker (every tensor storage, from creation to release)",
    }


def measure_and_predict(model_name: str, setup: TrainingMemorySetup, max_num_visual_tokens: int | None = None) -> dict:
    """Run a warm-up step and a measured step of `model_name` under `setup`; predict the same step's peak."""
    import torch

    from colintern.tuning.advisor import analyze_architecture, load_model_config

    config = narrow_config() if model_name == NARROW_MODEL else load_model_config(model_name)
    arch = analyze_architecture(config, lora_rank=setup.lora_rank or 32, max_num_visual_tokens=max_num_visual_tokens)
    tiles = setup.tiles_per_page or arch.tiles_per_page
    page_tokens = tiles * arch.image_seq_length + len(PAGE_PROMPT_IDS) + 2
    setup = setup.replace(tiles_per_page=tiles, page_tokens=page_tokens, pages_padded=False, queries_padded=True)
    prediction = estimate_peak_memory(arch, setup)
    row = {
        "finetuning": setup.finetuning,
        "gradient_checkpointing": setup.gradient_checkpointing,
        "batch_size": setup.per_device_batch_size,
        "query_tokens": setup.query_tokens,
        "page_tokens": page_tokens,
        "dtype": setup.dtype,
        "autocast": setup.uses_autocast,
        "predicted_bytes": prediction.tensor_peak_bytes,
        "predicted_phase": prediction.peak_phase,
        "predicted_with_headroom_bytes": prediction.peak_bytes,
        "predicted_parts_gib": {part.name: round(part.gib, 6) for part in prediction.parts},
    }
    model = build_model(config, setup)
    loss_fn, row["loss"] = _colbert_loss()
    queries, pages = synthetic_batch(config, setup, setup.query_tokens, tiles)
    step, optimizer = make_training_step(model, loss_fn, queries, pages, setup)
    try:
        step()  # warm-up: AdamW creates its states; CUDA kernels and workspaces get loaded
        row.update(measure_step_peak(step, model, optimizer, [*queries.values(), *pages.values()], setup.device))
        row["error"] = (row["predicted_bytes"] - row["measured_bytes"]) / row["measured_bytes"]
    except torch.OutOfMemoryError as error:
        row.update(measured_bytes=None, error=None, oom=str(error).splitlines()[0])
    finally:
        del model, optimizer, step
        gc.collect()
        if setup.device == "cuda":
            torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------- the benchmark
def run(args: argparse.Namespace) -> dict:
    import torch

    from colintern.benchmarks import record
    from colintern.model.embedded import EMBEDDED_MODEL
    from colintern.utils import ColinternError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ColinternError("--device cuda: no GPU is visible (torch.cuda.is_available() is False).")
    full_size = args.full_size
    if full_size and device != "cuda":
        raise ColinternError("--full-size measures the 1B architecture on a GPU; none is visible here.")
    model_name = args.model or (FULL_SIZE_MODEL if full_size else NARROW_MODEL if args.narrow_448 else EMBEDDED_MODEL)
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    default_batch_sizes = {False: [4, 16, 64], True: [4, 16, 64]}
    if full_size:
        default_batch_sizes = {False: [1, 2, 4, 8], True: [4, 16, 32, 64]}
    elif args.narrow_448:
        default_batch_sizes = {False: [2, 4, 8], True: [2, 4, 8]}
    modes = args.modes or (["lora"] if full_size else ["lora", "full"])
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    query_tokens = args.query_tokens or (64 if full_size or args.narrow_448 else 32)
    rows = []
    for mode in modes:
        for gradient_checkpointing in checkpointing:
            for batch_size in args.batch_sizes or default_batch_sizes[gradient_checkpointing]:
                setup = TrainingMemorySetup(
                    per_device_batch_size=batch_size,
                    query_tokens=query_tokens,
                    finetuning=mode,
                    lora_rank=16 if model_name == EMBEDDED_MODEL else 32,
                    dtype=dtype,
                    gradient_checkpointing=gradient_checkpointing,
                    device=device,
                )
                row = measure_and_predict(model_name, setup, args.max_num_visual_tokens)
                rows.append(row)
                logger.info(_format_row(row))
    figures = {
        "model": model_name,
        "device": device,
        "method": rows[0].get("method") if rows else None,
        "rows": rows,
        "max_abs_error": max((abs(r["error"]) for r in rows if r.get("error") is not None), default=None),
        "target": "within 15%",
    }
    print(format_table(rows))
    default_tag = "full-size" if full_size else f"{device}-narrow-448" if args.narrow_448 else device
    path = record("memory", figures, output_dir=args.output_dir, tag=args.tag or default_tag)
    print(f"\nwritten: {path}")
    return 0


def _format_row(row: dict) -> str:
    measured = "OOM" if row.get("measured_bytes") is None else f"{row['measured_bytes'] / 2**20:10.1f}"
    error = "" if row.get("error") is None else f"{100 * row['error']:+6.1f}%"
    return (
        f"{row['finetuning']:5} {'on ' if row['gradient_checkpointing'] else 'off'} B={row['batch_size']:<4} "
        f"predicted {row['predicted_bytes'] / 2**20:10.1f} MiB  measured {measured} MiB  {error}"
    )


def format_table(rows: list[dict]) -> str:
    """Markdown table of predicted against measured peaks; on a GPU, also the allocator's reserve against the
    prediction with headroom."""
    gpu = any(row.get("reserved_bytes") for row in rows)
    header = "| mode | checkpointing | batch | Lq | Ld | predicted MiB | measured MiB | error | peak at |"
    header += " reserved MiB | predicted + headroom MiB |" if gpu else ""
    lines = [header, "|" + "---|" * (11 if gpu else 9)]
    for row in rows:
        measured = "OOM" if row.get("measured_bytes") is None else f"{row['measured_bytes'] / 2**20:.1f}"
        error = "" if row.get("error") is None else f"{100 * row['error']:+.1f}%"
        line = (
            f"| {row['finetuning']} | {'on' if row['gradient_checkpointing'] else 'off'} | {row['batch_size']} | "
            f"{row['query_tokens']} | {row['page_tokens']} | {row['predicted_bytes'] / 2**20:.1f} | {measured} | "
            f"{error} | {row['predicted_phase']} |"
        )
        if gpu:
            reserved = row.get("reserved_bytes")
            line += f" {reserved / 2**20:.1f} |" if reserved else " |"
            line += f" {row['predicted_with_headroom_bytes'] / 2**20:.1f} |"
        lines.append(line)
    return "\n".join(lines)


__all__ = ["DESCRIPTION", "add_arguments", "run", "measure_and_predict", "TensorMemoryTracker"]
