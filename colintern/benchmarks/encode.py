"""`encode`: pages/s and queries/s of the evaluation path (`colintern.model.encoding.encode_pages` / `encode_queries`: pages
batched by tile count, queries by token count, image tokens kept in 16 bits) at several batch sizes, against mteb's
`ColPaliEngineWrapper` (the loop mteb runs for colpali-engine models: batches in input order, padded, float32)
driving the very same model and processor object.

Default: the embedded tiny checkpoint (`embedded:tiny-internvl3_5`, one 128px tile per page) on SynthDocs test pages
and queries, on the CPU. Per batch size it reports end-to-end throughput of both paths (the median of `--repeats`
rounds in alternating order, `measure.interleaved_rounds`, with the spread and a quiet / under-load label), the split of colintern's time into preprocessing (`processor.process_images` / `process_queries`) and
model (forward, device transfers), its peak memory (see `colintern.benchmarks.measure`; on the CPU measured in this
process in ascending batch order, so a later batch size may reuse memory an earlier one left cached: a lower bound),
and model FLOPs utilisation where the accelerator's peak is known.

`--full-size` builds the real InternVL3.5-1B architecture from the config colintern ships, with random weights
(`colintern.benchmarks.full_size`, no download), 448px tiles, bf16 with flash-attention 2 when installed (else SDPA)
on CUDA, and encodes SynthDocs-style pages rendered at `--page-size` (A4 portrait at 150 dpi by default: a 1 x 2
grid + thumbnail = 3 tiles, 768 image tokens, ~2.9 TFLOP per page under the default 1,536-token budget). FLOPs per
input follow the formula in `full_size.py`; MFU = model FLOPs/s over the model-only time divided by the bf16 peak
(end-to-end MFU, preprocessing included, is reported too).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from colintern.cli import limits

DESCRIPTION = "Encoding throughput: pages/s and queries/s of the evaluation path at several batch sizes (+ --full-size)"

logger = logging.getLogger(__name__)
REFERENCE = "mteb_colpali_wrapper"


@dataclass
class EncodeRun:
    """What to measure (recorded in the JSON)."""

    model: str = "embedded:tiny-internvl3_5"
    dataset: str = "embedded:synthdocs"
    n_pages: int = 128
    n_queries: int = 256
    page_batch_sizes: tuple[int, ...] = (1, 8, 32)
    query_batch_sizes: tuple[int, ...] = (1, 32, 128)
    device: str | None = None
    threads: int | None = None  # torch intra-op threads (default: torch's choice)
    max_num_visual_tokens: int | None = None
    repeats: int = 3  # interleaved rounds per setting (colintern, reference, reference, colintern, ...); median counts
    reference: bool = True  # also time mteb's ColPaliEngineWrapper on the same model
    full_size: bool = False
    page_size: tuple[int, int] = (1240, 1754)
    attn_implementation: str | None = None
    peak_tflops: float | None = None
    model_config: Any = None  # --full-size: an InternVLConfig; None: InternVL3.5-1B's (tests: full_size.tiny_config())
    notes: list[str] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = EncodeRun()
    parser.add_argument("--model", default=default.model, help="checkpoint (ignored with --full-size)")
    parser.add_argument("--dataset", default=default.dataset, help="SynthDocs folder or alias for pages and queries")
    parser.add_argument("--pages", type=int, default=None, help="pages to encode (default 128; 64 with --full-size)",
                        **limits(ge=1))
    parser.add_argument("--queries", type=int, default=None, help="queries to encode (default 256)", **limits(ge=1))
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="page batch sizes (default 1 8 32; 1 4 8 16 32 full)",
        **limits(ge=1)
    )
    parser.add_argument(
        "--query-batch-sizes", type=int, nargs="+", default=None, help="query batch sizes (default 1 32 128)",
        **limits(ge=1)
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)",
                        **limits(ge=1))
    parser.add_argument("--max-num-visual-tokens", type=int, default=None, help="page token budget (tiling)",
                        **limits(ge=1))
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved timed rounds per setting; the median counts (default 3; 1 with --quick)",
                        **limits(ge=1))
    parser.add_argument("--no-reference", action="store_true", help="skip mteb's ColPaliEngineWrapper")
    parser.add_argument(
        "--full-size", action="store_true",
        help="InternVL3.5-1B architecture, random weights, 448px tiles, bf16 + flash/SDPA attention (needs a GPU)",
    )
    parser.add_argument("--page-size", type=int, nargs=2, default=default.page_size, metavar=("W", "H"), **limits(ge=1))
    parser.add_argument("--attn-implementation", default=None, help="override (default: flash_attention_2 or sdpa)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator bf16 peak for MFU if unknown",
                        **limits(gt=0))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--note", action="append", default=[], help="free text stored in the JSON (repeatable)")
    parser.add_argument("--tag", default=None, help="suffix of the JSON file name")


def _plan_from_args(args: argparse.Namespace) -> EncodeRun:
    plan = EncodeRun(
        model=args.model,
        dataset=args.dataset,
        device=args.device,
        threads=args.threads,
        max_num_visual_tokens=args.max_num_visual_tokens,
        repeats=args.repeats or (1 if args.quick else EncodeRun.repeats),
        reference=not args.no_reference and not args.full_size,
        full_size=args.full_size,
        page_size=tuple(args.page_size),
        attn_implementation=args.attn_implementation,
        peak_tflops=args.peak_tflops,
        notes=list(args.note),
    )
    if args.full_size:
        plan.n_pages, plan.page_batch_sizes, plan.query_batch_sizes = 64, (1, 4, 8, 16, 32), (1, 32, 128)
    if args.quick:
        plan.n_pages, plan.n_queries, plan.page_batch_sizes, plan.query_batch_sizes = 8, 8, (1, 4), (1, 8)
    plan.n_pages = args.pages or plan.n_pages
    plan.n_queries = args.queries or plan.n_queries
    plan.page_batch_sizes = tuple(args.batch_sizes or plan.page_batch_sizes)
    plan.query_batch_sizes = tuple(args.query_batch_sizes or plan.query_batch_sizes)
    return plan


def run(args: argparse.Namespace) -> int:
    from colintern.benchmarks import record

    plan = _plan_from_args(args)
    figures = benchmark_encode(plan)
    tag = "-".join(t for t in ("full-size" if plan.full_size else None, args.tag) if t) or None
    path = record("encode", figures, args.output_dir, tag=tag)
    print(encode_table(figures))
    logger.info("Wrote %s", path)
    return 0


# ---------------------------------------------------------------------------------------------- inputs
def _cycle(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def synthdocs_pages_and_queries(dataset: str, n_pages: int, n_queries: int) -> tuple[list, list[str]]:
    """Decoded RGB test pages and query texts of a SynthDocs folder (cycled when more are asked for than exist)."""
    from pathlib import Path

    import datasets

    from colintern.model.embedded import resolve_embedded

    root = Path(resolve_embedded(dataset))
    corpus = datasets.Dataset.from_parquet(str(root / "test" / "corpus.parquet"))
    queries = datasets.Dataset.from_parquet(str(root / "test" / "queries.parquet"))
    pages = [image.convert("RGB") for image in corpus.select(range(min(n_pages, len(corpus))))["image"]]
    return _cycle(pages, n_pages), _cycle(list(queries["text"]), n_queries)


def rendered_pages_and_queries(page_size: tuple[int, int], n_pages: int, n_queries: int, seed: int = 0):
    """SynthDocs-style pages rendered at `page_size` (e.g. A4 at 150 dpi) and matching queries, deterministic."""
    from colintern.data.synthdocs import all_combinations, make_query, render_page

    rng = random.Random(f"encode-benchmark-{seed}")
    combos = all_combinations()
    pages = [render_page(rng.choice(combos), rng, *page_size) for _ in range(min(n_pages, 16))]
    queries = [make_query(rng.choice(combos), rng) for _ in range(n_queries)]
    return _cycle(pages, n_pages), queries


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device) -> float:
    import time

    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _model_only_seconds(model, batches: list, device) -> float:
    """Forward passes (with the host-to-device copies and the copy of the embeddings back) over ready batches."""
    import torch

    def forward_all():
        with torch.no_grad():
            for batch in batches:
                model(**batch.to(device)).to("cpu")

    return _time(forward_all, device)


def mteb_colpali_wrapper(model, processor, device):
    """mteb's ColPaliEngineWrapper around an already loaded model and processor (its __init__ would load them from
    a name): the reference runs mteb's encoding loop on the very same model object."""
    from mteb.models.model_implementations.colpali_models import ColPaliEngineWrapper

    class SameModelWrapper(ColPaliEngineWrapper):
        def __init__(self):  # the attributes ColPaliEngineWrapper.__init__ sets, without loading anything
            self.mdl, self.processor, self.device = model, processor, str(device)

    return SameModelWrapper()


def benchmark_encode(plan: EncodeRun) -> dict:
    """Measure the evaluation path (and the reference) at each batch size; return the figures for the JSON."""
    import torch

    from colintern.benchmarks.full_size import forward_flops, peak_bf16_tflops
    from colintern.benchmarks.measure import PeakMemory, conditions, interleaved_rounds
    from colintern.model.architecture import DEFAULT_MAX_NUM_VISUAL_TOKENS, InternVLArchitecture
    from colintern.model.loading import default_attn_implementation, default_device, default_dtype
    from colintern.model.encoding import encode_pages, encode_queries

    device = torch.device(plan.device or default_device())
    if plan.threads:
        torch.set_num_threads(plan.threads)
    if plan.full_size:
        from colintern.benchmarks.full_size import FULL_SIZE_MODEL, build_full_size, full_size_config

        if device.type != "cuda":
            logger.warning("--full-size on %s: the 1B model runs, but slowly; figures are for GPUs", device)
        config = plan.model_config or full_size_config()  # the shipped InternVL3.5-1B config
        architecture = InternVLArchitecture.from_config(config)
        attn = plan.attn_implementation or default_attn_implementation(device)
        dtype = default_dtype(device)
        budget = plan.max_num_visual_tokens or DEFAULT_MAX_NUM_VISUAL_TOKENS
        model, processor = build_full_size(
            config, device=device, dtype=dtype, attn_implementation=attn, max_num_visual_tokens=budget
        )
        pages, queries = rendered_pages_and_queries(plan.page_size, plan.n_pages, plan.n_queries)
        model_info = {
            "architecture": f"{FULL_SIZE_MODEL} (shipped config, random weights)"
            if plan.model_config is None
            else "scaled-down InternVL3.5-1B config (random weights)",
            "spec": architecture.to_dict(),
        }
    else:
        from colintern.model.embedded import TinyModelConfig
        from colintern.model.loading import load_retriever

        budget = plan.max_num_visual_tokens or TinyModelConfig().max_num_visual_tokens
        model, processor = load_retriever(
            plan.model, device=device, max_num_visual_tokens=budget, attn_implementation=plan.attn_implementation
        )
        attn, dtype = model.config._attn_implementation, model.dtype
        pages, queries = synthdocs_pages_and_queries(plan.dataset, plan.n_pages, plan.n_queries)
        model_info = {"checkpoint": plan.model}
        architecture = InternVLArchitecture.from_config(model.config, model.dim)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak_tflops = plan.peak_tflops or peak_bf16_tflops(device_name)

    # FLOPs per page and per query from each input's real (unpadded) length
    sample = processor.process_images(pages[:1])
    page_tiles, page_seq = int(sample["pixel_values"].shape[0]), int(sample["attention_mask"].sum())
    flops_per_page = forward_flops(architecture, page_tiles, page_seq)["total"]
    query_lengths = [int(n) for n in processor.process_queries(queries)["attention_mask"].sum(dim=1)]
    flops_queries = sum(forward_flops(architecture, 0, n)["total"] for n in query_lengths)
    distinct_sizes = {page.size for page in pages}

    reference = mteb_colpali_wrapper(model, processor, device) if plan.reference else None

    def measure(kind: str, items: list, batch_sizes: tuple[int, ...], flops_total: float) -> list[dict]:
        ours_fn = encode_pages if kind == "pages" else encode_queries
        prepare = processor.process_images if kind == "pages" else processor.process_queries
        rows = []
        for batch_size in batch_sizes:

            def ours():
                ours_fn(model, processor, items, batch_size=batch_size)

            def theirs():
                _reference_pass(reference, kind, items, batch_size)

            ours_fn(model, processor, items[:batch_size], batch_size=batch_size)  # warm-up
            if reference is not None:
                _reference_pass(reference, kind, items[:batch_size], batch_size)
            with PeakMemory(device.type) as memory:  # one untimed pass for the peak memory (gc runs on entry)
                ours()

            implementations = {"colintern": ours}
            if reference is not None:
                implementations[REFERENCE] = theirs
            timing = interleaved_rounds(
                implementations, plan.repeats, reference=REFERENCE if reference is not None else None,
                own_load=float(torch.get_num_threads()), device=str(device),
            )
            timings.append(timing)
            best = timing.stats["colintern"].median  # the figure quoted: the median round
            batches: list = []
            starts = range(0, len(items), batch_size)
            prep = _time(lambda: batches.extend(prepare(list(items[i : i + batch_size])) for i in starts), device)
            model_seconds = statistics.median(
                _model_only_seconds(model, batches, device) for _ in range(max(1, plan.repeats))
            )
            row = {
                "batch_size": batch_size,
                f"{kind}_per_second": len(items) / best,
                "seconds": best,
                "spread": timing.stats["colintern"].spread,
                "seconds_per_round": timing.stats["colintern"].seconds,
                "conditions": timing.conditions,
                "preprocess_seconds": prep,
                "model_seconds": model_seconds,
                "peak_memory_mib": None if memory.peak_bytes is None else memory.peak_bytes / 2**20,
                "model_tflops_per_second": flops_total / model_seconds / 1e12,
            }
            if peak_tflops:
                row["mfu"] = flops_total / model_seconds / 1e12 / peak_tflops
                row["mfu_end_to_end"] = flops_total / best / 1e12 / peak_tflops
            if reference is not None:
                best_ref = timing.stats[REFERENCE].median
                row["reference_spread"] = timing.stats[REFERENCE].spread
                row["reference_seconds_per_round"] = timing.stats[REFERENCE].seconds
                row["reference_per_second"] = len(items) / best_ref
                row["speedup_vs_mteb_colpali_wrapper"] = best_ref / best
            rows.append(row)
            logger.info("%s, batch %d: %.1f/s%s", kind, batch_size, len(items) / best,
                        f" (mteb wrapper {len(items) / best_ref:.1f}/s)" if reference is not None else "")
        return rows

    figures: dict = {
        "model": model_info,
        "parameters": n_params,
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": attn,
        "n_pages": len(pages),
        "n_queries": len(queries),
        "page_sizes": sorted(distinct_sizes),
        "tiles_per_page": page_tiles,
        "tokens_per_page": page_seq,
        "forward_gflop_per_page": flops_per_page / 1e9,
        "forward_gflop_per_query_mean": flops_queries / len(queries) / 1e9,
        "peak_bf16_tflops": peak_tflops,
        "repeats": plan.repeats,
        "reference": "mteb ColPaliEngineWrapper (same model and processor object)" if reference is not None else None,
        "memory_method": _memory_method(device),
        "notes": plan.notes,
        "plan": {k: v for k, v in asdict(plan).items() if k not in ("notes", "model_config")},
    }
    timings: list = []
    figures["pages"] = measure("pages", pages, plan.page_batch_sizes, flops_per_page * len(pages))
    figures["queries"] = measure("queries", queries, plan.query_batch_sizes, flops_queries)
    readings = [load[0] for t in timings for st in t.stats.values() for load in st.load_before + st.load_after]
    figures["conditions"] = conditions(readings, timings[0].cores, float(torch.get_num_threads()))
    best_pages = max(figures["pages"], key=lambda r: r["pages_per_second"])
    best_queries = max(figures["queries"], key=lambda r: r["queries_per_second"])
    figures["best_pages_per_second"] = best_pages["pages_per_second"]
    figures["best_queries_per_second"] = best_queries["queries_per_second"]
    if "mfu" in best_pages:
        figures["mfu_pages"] = best_pages["mfu"]
    return figures


def _memory_method(device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the allocation at start, per batch size"
    return "VmHWM above VmRSS at start, per batch size in one process (ascending; a lower bound after the first)"


def _reference_pass(wrapper, kind: str, items: list, batch_size: int) -> None:
    """One pass of mteb's loop (its per-batch progress bar silenced: it would flood the log at batch size 1)."""
    import functools
    from unittest import mock

    from mteb.models.model_implementations import colpali_models

    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with mock.patch.object(colpali_models, "tqdm", functools.partial(colpali_models.tqdm, disable=True)):
        if kind == "pages":
            wrapper.get_image_embeddings([{"image": batch} for batch in batches])
        else:
            wrapper.get_text_embeddings([{"text": batch} for batch in batches])


def encode_table(figures: dict) -> str:
    from colintern.benchmarks.measure import format_table

    out = [
        f"Encoding on {figures['device_name'] or figures['device']} ({figures['dtype']}, "
        f"{figures['attn_implementation']}), {figures['parameters'] / 1e6:.1f}M parameters, "
        f"{figures['tiles_per_page']} tiles / {figures['tokens_per_page']} tokens per page; medians of "
        f"{figures['repeats']} rounds, {figures.get('conditions', 'load not recorded')}"
    ]
    for kind in ("pages", "queries"):
        rows = figures[kind]
        headers = ["batch", f"{kind}/s", "preprocess s", "model s", "peak MiB", "model TFLOP/s"]
        keys = ["batch_size", f"{kind}_per_second", "preprocess_seconds", "model_seconds", "peak_memory_mib",
                "model_tflops_per_second"]
        if any("mfu" in r for r in rows):
            headers.append("MFU")
            keys.append("mfu")
        if any("reference_per_second" in r for r in rows):
            headers += ["mteb wrapper /s", "speedup"]
            keys += ["reference_per_second", "speedup_vs_mteb_colpali_wrapper"]
        out.append(format_table(headers, [[r.get(k) for k in keys] for r in rows]))
    return "\n".join(out)
