"""`scoring`: MaxSim of Q queries x D pages with colintern's `max_sim` against colpali-engine's `score_multi_vector`
and mteb's `max_sim`, on the same inputs, in the same run.

Inputs (`ScoringInputsConfig`, deterministic from a seed): ragged multi-vector embeddings as a ColPali-style model
produces them, L2-normalised, 128-dim, stored in 16 bits (bf16 by default). Pages have `page_tokens` tokens drawn
uniformly (800-1,200 by default: InternVL3.5 pages of 3-5 tiles of 256 tokens), queries `query_tokens` (20-30:
prefix, a dozen words, 10 augmentation tokens). Each query is written for one target page: `matched_fraction` of its
tokens are noisy copies (cosine ~0.7) of tokens of that page, the rest random, so every ranking has a clear top page
and then a realistic crowd of near-tied scores, the hard case for ranking agreement.

Protocol. Each implementation runs in its own fresh Python process (`measure.run_worker`), which imports its library,
builds the inputs from the seed, runs a warm-up call on 2 queries x 2 pages (thread pools, lazy initialisation),
then times `repeats` full calls and keeps the fastest as that round's time. The implementations alternate over
`rounds` rounds (`measure.interleaved_rounds`: A B, B A, ...); `seconds`, GFLOP/s and the speed-ups are medians
over the rounds, reported with min, max, spread, the load averages and a quiet / under-load label. Peak memory is the resident-set high-water mark above the
resident set just before the call, the mark being reset first (see `colintern.benchmarks.measure`): it counts every
byte the scorer itself touches (padded copies, casts, similarity blocks, the output) and nothing from building the
inputs or from another implementation. On CUDA it is the allocator's peak above the memory in use before the call.
colpali-engine runs as users get it: `COLPALI_SCORES_BACKEND` is left alone, and without the
`late-interaction-kernels` package or a GPU its dispatcher falls back to the torch einsum (recorded in the JSON).

Figures: time, useful GFLOP/s (2 x query tokens x page tokens x dim / time), peak memory, the largest absolute score
difference to colpali-engine and to an exact float64 brute force on a sample of queries, and the top-10 overlap with
colpali-engine's ranking. colpali-engine computes and returns 16-bit scores for 16-bit inputs (a bf16 score near 10
is a multiple of 1/16), so its own ranking is tied in many places; `top10_overlap` therefore counts one of our top-10
pages as shared when colpali-engine scores it at least as high as its own 10th page (ties resolved in agreement),
and `top10_overlap_strict` compares against `torch.topk` of its scores (ties broken by index).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from colintern.cli import limits

DESCRIPTION = "MaxSim: colintern vs colpali-engine's score_multi_vector and mteb's max_sim (time, memory, rankings)"
IMPLEMENTATIONS = ("colintern", "colpali_engine", "mteb")
TARGET_SPEEDUP = 3.0
TARGET_OVERLAP = 0.99

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringInputsConfig:
    """The synthetic embeddings scored by every implementation (identical in every process, from `seed`)."""

    n_queries: int = 256
    n_pages: int = 1024
    query_tokens: tuple[int, int] = (20, 30)  # inclusive range, uniform
    page_tokens: tuple[int, int] = (800, 1200)
    dim: int = 128
    dtype: str = "bfloat16"
    matched_fraction: float = 0.5  # query tokens that are noisy copies of tokens of the query's target page
    match_noise: float = 1.0  # noise norm relative to the (unit) token: cosine 1/sqrt(1 + noise^2) ~ 0.71
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> ScoringInputsConfig:
        return cls(**{"n_queries": 12, "n_pages": 40, "query_tokens": (5, 12), "page_tokens": (30, 90), **overrides})


def make_inputs(config: ScoringInputsConfig) -> tuple[list, list, list[int]]:
    """(queries, pages, target page of each query): lists of (tokens, dim) L2-normalised `config.dtype` tensors."""
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, config.dtype)
    generator = torch.Generator().manual_seed(config.seed)

    def draw(low_high: tuple[int, int]) -> int:
        return int(torch.randint(low_high[0], low_high[1] + 1, (1,), generator=generator))

    pages_fp32 = []
    pages = []
    for _ in range(config.n_pages):
        page = F.normalize(torch.randn(draw(config.page_tokens), config.dim, generator=generator), dim=-1)
        pages_fp32.append(page)
        pages.append(page.to(dtype))
    targets = torch.randint(0, config.n_pages, (config.n_queries,), generator=generator).tolist()
    queries = []
    for target in targets:
        n_tokens = draw(config.query_tokens)
        tokens = torch.randn(n_tokens, config.dim, generator=generator)
        n_matched = round(config.matched_fraction * n_tokens)
        if n_matched:
            source = pages_fp32[target]
            rows = torch.randint(0, len(source), (n_matched,), generator=generator)
            noise = F.normalize(tokens[:n_matched], dim=-1) * config.match_noise
            tokens[:n_matched] = source[rows] + noise
        queries.append(F.normalize(tokens, dim=-1).to(dtype))
    del pages_fp32  # only the 16-bit inputs stay resident (the workers measure memory after this)
    return queries, pages, targets


# ---------------------------------------------------------------------------------------------- implementations
def load_scorer(name: str):
    """(scorer(queries, pages, device) -> (Q, D) scores, details dict). Imports the library (before the baseline)."""
    if name == "colintern":
        from colintern.model.scoring import lik_available, max_sim

        def score(queries, pages, device):
            return max_sim(queries, pages, device=device)

        def details(device):
            import torch

            lik = lik_available(torch.device(device))
            return {
                "backend": "late-interaction-kernels" if lik else "torch",
                "compute_dtype": "float32" if device == "cpu" else "input dtype (16-bit GEMM, float32 sums)",
            }

        return score, details
    if name == "colpali_engine":
        from colpali_engine.utils import _lik_backend
        from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor

        def score(queries, pages, device):
            return BaseVisualRetrieverProcessor.score_multi_vector(queries, pages, device=device)

        def details(device):
            backend = os.environ.get("COLPALI_SCORES_BACKEND", "auto")
            lik = _lik_backend.is_available() and device.startswith("cuda")
            return {
                "COLPALI_SCORES_BACKEND": backend,
                "backend": "late-interaction-kernels" if lik else "torch einsum",
                "compute_dtype": "input dtype (einsum, amax and sum in 16 bits for 16-bit inputs)",
            }

        return score, details
    if name == "mteb":
        from mteb.similarity_functions import max_sim as mteb_max_sim

        def score(queries, pages, device):
            return mteb_max_sim(queries, pages)  # mteb picks the device itself (the inputs' device here)

        return score, lambda device: {"backend": "torch einsum", "compute_dtype": "float32 (upcasts 16-bit inputs)"}
    raise ValueError(f"unknown implementation {name!r}; known: {IMPLEMENTATIONS}")


def measure_implementation(
    name: str, config: ScoringInputsConfig, device: str, repeats: int, out_dir: Path, profile: bool = False
) -> dict:
    """Import `name`, build the inputs, warm up, time `repeats` calls with their peak memory; save the scores to
    `out_dir/<name>.pt` and return the figures. Normally runs in a fresh worker process (`_worker_main`).
    `profile`: one more call under torch.profiler, recording each operator's share of the time."""
    import torch

    from colintern.benchmarks.measure import PeakMemory, timed

    score, details = load_scorer(name)
    queries, pages, _ = make_inputs(config)
    if device != "cpu":
        queries = [q.to(device) for q in queries]
        pages = [p.to(device) for p in pages]
    score(queries[:2], pages[:2], device)  # warm-up: thread pools, lazy initialisation

    times, peaks, method, scores = [], [], "", None
    for _ in range(max(1, repeats)):
        scores = None
        with PeakMemory(device) as memory:
            scores, seconds = timed(lambda: score(queries, pages, device), device)
        times.append(seconds)
        peaks.append(memory.peak_bytes)
        method = memory.method
    torch.save(scores.float().cpu(), out_dir / f"{name}.pt")
    breakdown = operator_breakdown(lambda: score(queries, pages, device), device) if profile else None
    return {
        "implementation": name,
        "seconds": min(times),
        "seconds_per_repeat": times,
        "peak_memory_bytes": max((p for p in peaks if p is not None), default=None),
        "memory_method": method,
        "threads": torch.get_num_threads(),
        "returned_dtype": str(scores.dtype).removeprefix("torch."),
        **details(device),
        **({"time_by_operator": breakdown} if breakdown else {}),
    }


def operator_breakdown(fn, device: str, top: int = 8) -> dict[str, float]:
    """Share of self time per operator (CPU time, or CUDA kernel time on a GPU) of one call of `fn`, largest first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        fn()
    events = prof.key_averages()

    def own(event) -> float:
        return float(event.self_device_time_total if cuda else event.self_cpu_time_total)

    total = sum(own(e) for e in events) or 1.0
    ranked = sorted(events, key=own, reverse=True)[:top]
    shares = {e.key: own(e) / total for e in ranked}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def _worker_main(argv: list[str]) -> None:
    """Entry point of a worker process: `python -m colintern.benchmarks.scoring --implementation ... --out-dir ...`."""
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--implementation", required=True, choices=IMPLEMENTATIONS)
    parser.add_argument("--config", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = json.loads(args.config)
    config = ScoringInputsConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    out_dir = Path(args.out_dir)
    result = measure_implementation(args.implementation, config, args.device, args.repeats, out_dir, args.profile)
    (out_dir / f"{args.implementation}.json").write_text(json.dumps(result))


def _merge_rounds(previous: dict | None, new: dict) -> dict:
    """Highest peak memory over rounds; every timed call is kept (`seconds` here is the best; medians come later)."""
    if previous is None:
        return new
    merged = {**previous, **{k: v for k, v in new.items() if k == "time_by_operator" and k not in previous}}
    merged["seconds"] = min(previous["seconds"], new["seconds"])
    merged["seconds_per_repeat"] = previous["seconds_per_repeat"] + new["seconds_per_repeat"]
    peaks = [p for p in (previous["peak_memory_bytes"], new["peak_memory_bytes"]) if p is not None]
    merged["peak_memory_bytes"] = max(peaks) if peaks else None
    return merged


# ---------------------------------------------------------------------------------------------- metrics
def top_k_overlap(scores, reference, k: int = 10, tie_aware: bool = True) -> float:
    """Mean fraction of the top-k pages of `scores` that are also in the top-k of `reference` ((Q, D) each).

    tie_aware: a page counts as shared when `reference` scores it at least as high as its own k-th page, so pages
    tied with the reference's k-th score are not counted as disagreements.
    """
    import torch

    k = min(k, scores.shape[1])
    ours = scores.topk(k, dim=1).indices
    if tie_aware:
        kth = reference.topk(k, dim=1).values[:, -1:]
        shared = (reference.gather(1, ours) >= kth).sum(dim=1)
    else:
        theirs = reference.topk(k, dim=1).indices
        shared = (ours[:, :, None] == theirs[:, None, :]).any(dim=2).sum(dim=1)
    return float((shared.to(torch.float64) / k).mean())


def _max_abs_diff(a, b) -> float:
    finite = a.isfinite() & b.isfinite()
    return float((a[finite].double() - b[finite].double()).abs().max()) if finite.any() else 0.0


# ---------------------------------------------------------------------------------------------- the sub-benchmark
@dataclass
class ScoringRun:
    """What `run` was asked to do (recorded in the JSON)."""

    inputs: ScoringInputsConfig
    implementations: tuple[str, ...] = IMPLEMENTATIONS
    device: str = "cpu"
    threads: int | None = None
    repeats: int = 1
    rounds: int = 3  # passes over all implementations (alternating order), each in a fresh process; medians count
    exact_queries: int = 16
    in_process: bool = False  # all implementations in this process: fast, but peak memory is not isolated
    profile: bool = False  # record each implementation's time per operator (one extra call)
    notes: list[str] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = ScoringInputsConfig()
    parser.add_argument("--queries", type=int, default=default.n_queries, help="number of queries (default 256)",
                        **limits(ge=1))
    parser.add_argument("--pages", type=int, default=default.n_pages, help="number of pages (default 1024)",
                        **limits(ge=1))
    parser.add_argument("--query-tokens", type=int, nargs=2, default=default.query_tokens, metavar=("MIN", "MAX"),
                        **limits(ge=1))
    parser.add_argument("--page-tokens", type=int, nargs=2, default=default.page_tokens, metavar=("MIN", "MAX"),
                        **limits(ge=1))
    parser.add_argument("--dim", type=int, default=default.dim, **limits(ge=1))
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=default.dtype)
    parser.add_argument("--seed", type=int, default=default.seed, **limits(ge=0))
    parser.add_argument(
        "--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
        help="which scorers to run (colintern is always run)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (inputs are placed there before timing)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)",
                        **limits(ge=1))
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per round; the round's fastest counts",
                        **limits(ge=1))
    parser.add_argument(
        "--rounds", type=int, default=ScoringRun.rounds,
        help="passes over all implementations (order alternating, a fresh process each); the median counts (default 3)",
        **limits(ge=1),
    )
    parser.add_argument("--exact-queries", type=int, default=16, help="queries checked against float64 brute force")
    parser.add_argument("--quick", action="store_true", help="tiny inputs (12 queries x 40 pages), for tests")
    parser.add_argument(
        "--in-process", action="store_true",
        help="run every implementation in this process instead of one fresh process each (faster start; peak "
        "memory figures are then not isolated)",
    )
    parser.add_argument("--profile", action="store_true", help="also record each scorer's time per operator")
    parser.add_argument("--note", action="append", default=[], help="free text stored in the JSON (repeatable)")
    parser.add_argument("--tag", default=None, help="suffix of the JSON file name: scoring-<tag>.json")


def _config_from_args(args: argparse.Namespace) -> ScoringInputsConfig:
    common = {"dim": args.dim, "dtype": args.dtype, "seed": args.seed}
    if args.quick:
        return ScoringInputsConfig.quick(**common)
    return ScoringInputsConfig(
        n_queries=args.queries,
        n_pages=args.pages,
        query_tokens=tuple(args.query_tokens),
        page_tokens=tuple(args.page_tokens),
        **common,
    )


def run(args: argparse.Namespace) -> int:
    from colintern.benchmarks import record

    implementations = ("colintern", *[i for i in args.implementations if i != "colintern"])
    plan = ScoringRun(
        inputs=_config_from_args(args),
        implementations=implementations,
        device=args.device,
        threads=args.threads,
        repeats=args.repeats,
        rounds=args.rounds,
        exact_queries=args.exact_queries,
        in_process=args.in_process,
        profile=args.profile,
        notes=list(args.note),
    )
    figures = benchmark_scoring(plan)
    path = record("scoring", figures, args.output_dir, tag=args.tag)
    print(scoring_table(figures))
    print(_verdict(figures))
    logger.info("Wrote %s", path)
    return 0


def benchmark_scoring(plan: ScoringRun) -> dict:
    """Run every implementation in its own process on the same inputs; return the figures for the JSON."""
    import torch

    from colintern.benchmarks.measure import interleaved_rounds, run_worker
    from colintern.model.scoring import max_sim_reference

    config = plan.inputs
    load_before = os.getloadavg()
    if plan.in_process and plan.threads:
        torch.set_num_threads(plan.threads)
    results: dict[str, dict] = {}
    scores: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="colintern-scoring-") as tmp:

        def one_round(name: str):
            def call() -> float:
                round_index = len(results.get(name, {}).get("seconds_per_round", [])) + 1
                logger.info(
                    "Scoring %d queries x %d pages with %s (round %d/%d) ...",
                    config.n_queries, config.n_pages, name, round_index, plan.rounds,
                )
                if plan.in_process:
                    result = measure_implementation(name, config, plan.device, plan.repeats, Path(tmp), plan.profile)
                else:
                    worker_args = [
                        "--implementation", name,
                        "--config", json.dumps(asdict(config)),
                        "--device", plan.device,
                        "--repeats", str(plan.repeats),
                        "--out-dir", tmp,
                    ]
                    if plan.threads:
                        worker_args += ["--threads", str(plan.threads)]
                    if plan.profile:
                        worker_args.append("--profile")
                    result = run_worker(__name__, worker_args, Path(tmp) / f"{name}.json")
                scores[name] = torch.load(Path(tmp) / f"{name}.pt")
                logger.info("  %s: %.2f s", name, result["seconds"])
                merged = _merge_rounds(results.get(name), result)
                merged["seconds_per_round"] = [*results.get(name, {}).get("seconds_per_round", []), result["seconds"]]
                results[name] = merged
                return result["seconds"]  # the fastest of `repeats` calls in this round, start-up left out

            return call

        reference_name = "colpali_engine" if "colpali_engine" in plan.implementations else None
        timing = interleaved_rounds(
            {name: one_round(name) for name in plan.implementations}, plan.rounds, reference=reference_name,
            own_load=float(plan.threads or torch.get_num_threads()),
        )
    load_after = os.getloadavg()

    queries, pages, targets = make_inputs(config)
    q_tokens = sum(len(q) for q in queries)
    p_tokens = sum(len(p) for p in pages)
    flops = 2.0 * q_tokens * p_tokens * config.dim
    sample = list(range(min(plan.exact_queries, config.n_queries)))
    exact = max_sim_reference([queries[i] for i in sample], pages)

    reference = scores.get("colpali_engine")
    for name, result in results.items():
        result["seconds_best"] = result["seconds"]
        result.update(timing.stats[name].to_dict())
        result["seconds"] = timing.stats[name].median  # the figure quoted: the median over rounds
        s = scores[name]
        result["gflops_per_second"] = flops / result["seconds"] / 1e9
        result["peak_memory_mib"] = (
            None if result["peak_memory_bytes"] is None else result["peak_memory_bytes"] / 2**20
        )
        result["max_abs_error_vs_float64"] = _max_abs_diff(s[sample], exact)
        result["top10_overlap_vs_float64"] = top_k_overlap(s[sample], exact, tie_aware=False)
        result["target_page_at_rank_1"] = float((s.argmax(dim=1) == torch.tensor(targets)).double().mean())
        if reference is not None:
            result["max_abs_diff_vs_colpali_engine"] = _max_abs_diff(s, reference)
            result["top10_overlap_vs_colpali_engine"] = top_k_overlap(s, reference, tie_aware=True)
            result["top10_overlap_vs_colpali_engine_strict"] = top_k_overlap(s, reference, tie_aware=False)

    ours = results["colintern"]
    figures: dict = {
        "inputs": asdict(config),
        "device": plan.device,
        "repeats": plan.repeats,
        "rounds": plan.rounds,
        "isolated_processes": not plan.in_process,
        "query_tokens_total": q_tokens,
        "page_tokens_total": p_tokens,
        "useful_gflop": flops / 1e9,
        "exact_check_queries": len(sample),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "conditions": timing.conditions,
        "timing": {k: v for k, v in timing.to_dict().items() if k != "implementations"},
        "notes": plan.notes,
        "implementations": results,
    }
    if reference is not None:
        theirs = results["colpali_engine"]
        figures.update(
            speedup_vs_colpali_engine=theirs["seconds"] / ours["seconds"],
            top10_overlap=ours["top10_overlap_vs_colpali_engine"],
            top10_overlap_strict=ours["top10_overlap_vs_colpali_engine_strict"],
            max_abs_score_diff_vs_colpali_engine=ours["max_abs_diff_vs_colpali_engine"],
        )
        if ours["peak_memory_bytes"] is not None and theirs["peak_memory_bytes"]:
            figures["peak_memory_ratio_vs_colpali_engine"] = ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]
        figures["targets"] = {
            "speedup_vs_colpali_engine>=3": figures["speedup_vs_colpali_engine"] >= TARGET_SPEEDUP,
            "peak_memory<=colpali_engine": figures.get("peak_memory_ratio_vs_colpali_engine", float("inf")) <= 1.0,
            "top10_overlap>=0.99": figures["top10_overlap"] >= TARGET_OVERLAP,
            "size>=256x1024": config.n_queries >= 256 and config.n_pages >= 1024,
        }
    if "mteb" in results:
        figures["speedup_vs_mteb"] = results["mteb"]["seconds"] / ours["seconds"]
    return figures


def scoring_table(figures: dict) -> str:
    from colintern.benchmarks.measure import format_table

    rows = []
    for name, r in figures["implementations"].items():
        rows.append([
            name,
            r["seconds"],
            r.get("spread"),
            r["gflops_per_second"],
            r["peak_memory_mib"],
            r["max_abs_error_vs_float64"],
            r.get("max_abs_diff_vs_colpali_engine"),
            r.get("top10_overlap_vs_colpali_engine"),
            r.get("top10_overlap_vs_colpali_engine_strict"),
        ])
    headers = [
        "implementation", "median s", "spread", "GFLOP/s", "peak MiB", "max |err| vs fp64",
        "max |diff| vs colpali", "top-10 overlap", "top-10 strict",
    ]
    inputs = figures["inputs"]
    title = (
        f"MaxSim, {inputs['n_queries']} queries x {inputs['n_pages']} pages, {inputs['page_tokens']} page tokens, "
        f"{inputs['dim']}-dim {inputs['dtype']}, {figures['device']}, {figures['rounds']} rounds, "
        f"{figures.get('conditions', 'load not recorded')}"
    )
    return title + "\n" + format_table(headers, rows)


def _verdict(figures: dict) -> str:
    if "speedup_vs_colpali_engine" not in figures:
        return "(colpali-engine not run: no speedup)"
    memory = figures.get("peak_memory_ratio_vs_colpali_engine")
    return (
        f"colintern is {figures['speedup_vs_colpali_engine']:.1f}x faster than colpali-engine"
        + (f" at {memory:.2f}x its peak memory" if memory is not None else "")
        + f", top-10 overlap {figures['top10_overlap']:.4f} (strict {figures['top10_overlap_strict']:.4f})"
        + (f"; {figures['speedup_vs_mteb']:.1f}x faster than mteb" if "speedup_vs_mteb" in figures else "")
        + f" (medians of {figures['rounds']} rounds, {figures.get('conditions', 'load not recorded')})"
    )


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
