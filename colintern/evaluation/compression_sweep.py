"""Retrieval quality against storage for a grid of compression settings, on one mteb task.

    result = compression_sweep("experiments/demo", "SynthDocsRetrieval", output_dir="results/compression/demo")

The model encodes the task's pages and queries once; every setting (`colintern.model.compression`) is then applied to
those vectors and scored through `mteb.evaluate`, so NDCG@5/10 are mteb's own, exactly what
`scripts/evaluate.py --compression SETTING` reports. Bytes per page are counted from the compressed tensors. The
output folder (new: an existing one is refused, never overwritten) is built under a temporary name and renamed into
place when complete:

    table.md                 one row per setting: vectors and bytes per page, the fraction of float16, NDCG@5/10,
                             the share of the float16 NDCG@5 kept, Pareto membership; the target check below
    sweep.json               the same, with the full configs, storage counts and the command
    quality_vs_storage.png   NDCG@5 against bytes per page in the index (left) and in total with the float copies
                             that re-scoring reads (right), Pareto fronts marked
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colintern.evaluation.tasks import resolve_benchmarks
from colintern.model.checkpoints import describe_checkpoint
from colintern.model.compression import CompressionConfig
from colintern.mteb_results import task_scores
from colintern.utils import ColinternError, atomic_directory, atomic_write_json, atomic_write_text, safe_name
from mteb_wrappers.colintern3_5_models import ColIntern3_5Wrapper

logger = logging.getLogger(__name__)

# The default grid: each step alone, then the combinations that reach 1/8 of float16 and below.
DEFAULT_SETTINGS = (
    "none",
    "pool=2",
    "pool=3",
    "pool=4",
    "dim=64",
    "dim=32",
    "dim=16",
    "quant=int8",
    "dim=64,quant=int8",
    "dim=32,quant=int8",
    "pool=2,quant=int8",
    "pool=4,quant=int8",
    "quant=binary",
    "quant=binary,scoring=hamming",
    "pool=2,quant=binary",
    "dim=64,quant=binary",
    "quant=binary,rescore=16",
    "pool=2,quant=binary,rescore=16",
    "dim=64,quant=binary,rescore=16",
)
TARGET_KEPT = 0.97  # keep at least 97% of the float16 NDCG@5 ...
TARGET_FRACTION = 1 / 8  # ... at no more than 1/8 of the float16 bytes
FILES = ("table.md", "sweep.json", "quality_vs_storage.png")


class _EncodeOnceWrapper(ColIntern3_5Wrapper):
    """The mteb wrapper, encoding each (task, split, subset, inputs) once; later calls compress the vectors kept
    from the first (the model's output does not depend on the compression setting)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._raw: dict[tuple, tuple[str, list]] = {}
        self._kind: str | None = None  # set while encoding raw vectors

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        dataset = inputs.dataset
        ids = list(dataset["id"]) if "id" in (getattr(dataset, "column_names", None) or []) else None
        digest = hashlib.blake2b(repr(ids).encode(), digest_size=16).hexdigest() if ids is not None else None
        key = (task_metadata.name, hf_split, hf_subset, str(prompt_type), len(dataset), digest)
        if digest is None or key not in self._raw:
            self._kind = "raw"
            try:
                vectors = super().encode(
                    inputs, task_metadata=task_metadata, hf_split=hf_split, hf_subset=hf_subset,
                    prompt_type=prompt_type, **kwargs,
                )
                kind, self._kind = self._kind, None
            finally:
                self._kind = None
            if digest is None:  # no ids to recognise the inputs by: nothing kept
                return super()._compressed(vectors, kind, task_metadata.name, hf_split)
            self._raw[key] = (kind, vectors)
        kind, vectors = self._raw[key]
        return super()._compressed(vectors, kind, task_metadata.name, hf_split)

    def _compressed(self, embeddings, kind, task, split):
        if self._kind == "raw":  # called by the parent's encode: keep the raw vectors, note their kind
            self._kind = kind
            return embeddings
        return super()._compressed(embeddings, kind, task, split)


@dataclass
class SweepRow:
    setting: str
    config: dict[str, Any]
    scores: dict[str, float]
    storage: dict[str, Any]
    seconds: float
    kept: float | None = None  # NDCG@5 / the float16 NDCG@5
    pareto_index: bool = False
    pareto_total: bool = False

    @property
    def ndcg_at_5(self) -> float:
        return self.scores["ndcg_at_5"]

    @property
    def index_bytes(self) -> float:
        return self.storage["bytes_per_page"]

    @property
    def total_bytes(self) -> float:
        return self.storage["bytes_per_page"] + self.storage["rescore_bytes_per_page"]


@dataclass
class SweepResult:
    model: str
    model_name: str
    revision: str
    task: str
    split: str
    rows: list[SweepRow]
    command: str | None = None
    output_dir: Path | None = None
    seconds: float = 0.0
    target: dict[str, Any] = field(default_factory=dict)
    encoded: dict[str, int] = field(default_factory=dict)  # pages and queries the model encoded (once)

    @property
    def baseline(self) -> SweepRow:
        return next(row for row in self.rows if row.setting == "none")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_name": self.model_name,
            "revision": self.revision,
            "task": self.task,
            "split": self.split,
            "command": self.command,
            "seconds": round(self.seconds, 1),
            "target": self.target,
            "encoded": self.encoded,
            "settings": [
                {
                    "setting": row.setting,
                    "config": row.config,
                    "ndcg_at_5": row.scores.get("ndcg_at_5"),
                    "ndcg_at_10": row.scores.get("ndcg_at_10"),
                    "recall_at_10": row.scores.get("recall_at_10"),
                    "kept_ndcg_at_5": row.kept,
                    **row.storage,
                    "pareto_index": row.pareto_index,
                    "pareto_total": row.pareto_total,
                    "seconds": round(row.seconds, 2),
                }
                for row in self.rows
            ],
        }


# ---------------------------------------------------------------------------------------------------- analysis
def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, quality) points: True where no other point costs no more and scores at least as well, one of the
    two strictly."""
    flags = []
    for i, (cost, quality) in enumerate(points):
        dominated = any(
            j != i and c <= cost and q >= quality and (c < cost or q > quality) for j, (c, q) in enumerate(points)
        )
        flags.append(not dominated)
    return flags


def target_check(rows: Sequence[SweepRow], baseline: SweepRow) -> dict[str, Any]:
    """The smallest setting that keeps TARGET_KEPT of the float16 NDCG@5 within TARGET_FRACTION of its bytes,
    counting the index alone and the index plus re-scoring's float copies."""
    out: dict[str, Any] = {"kept": TARGET_KEPT, "fraction": TARGET_FRACTION}
    base_bytes = baseline.storage["float16_bytes_per_page"]
    for key, cost in (("index", lambda r: r.index_bytes), ("total", lambda r: r.total_bytes)):
        meeting = [r for r in rows if (r.kept or 0) >= TARGET_KEPT and cost(r) <= TARGET_FRACTION * base_bytes]
        best = min(meeting, key=lambda r: (cost(r), -r.ndcg_at_5), default=None)
        out[key] = (
            {"setting": best.setting, "bytes_per_page": cost(best), "fraction": cost(best) / base_bytes,
             "kept_ndcg_at_5": best.kept}
            if best
            else None
        )
    return out


# ---------------------------------------------------------------------------------------------------- output
def format_table(result: SweepResult) -> str:
    base = result.baseline
    dims = base.storage["float16_bytes_per_page"] / 2 / max(base.storage["vectors_per_page_before"], 1e-9)
    lines = [
        f"# Compression sweep: {result.model_name} on {result.task} ({result.split})",
        "",
        (
            f"Model `{result.model}` (revision {result.revision}); float16 baseline "
            f"{base.storage['vectors_per_page_before']:.1f} vectors x {dims:.0f} dims x 2 = "
            f"{base.storage['float16_bytes_per_page']:.0f} bytes per page; {base.storage['pages']} pages."
        ),
        "",
        "| setting | vectors/page | bytes/page | x float16 | re-score bytes/page | NDCG@5 | kept | NDCG@10 | front |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in result.rows:
        s = row.storage
        front = "/".join(name for name, on in (("index", row.pareto_index), ("total", row.pareto_total)) if on) or ""
        lines.append(
            f"| `{row.setting}` | {s['vectors_per_page']:.1f} | {s['bytes_per_page']:.1f} | "
            f"{s['fraction_of_float16']:.4f} | {s['rescore_bytes_per_page']:.0f} | {row.ndcg_at_5:.4f} | "
            f"{100 * (row.kept or 0):.1f}% | {row.scores.get('ndcg_at_10', float('nan')):.4f} | {front} |"
        )
    lines += ["", _target_sentence(result), ""]
    lines += [
        "bytes/page: what the index holds and scans per query (codes and scales); re-score bytes/page: the float16",
        "vectors that re-scoring reads for the top candidates (kept apart, e.g. on disk). front: on the Pareto front",
        "of NDCG@5 against the index bytes (index) or index + re-score bytes (total).",
    ]
    if result.command:
        lines += ["", "Command:", "", "```", result.command, "```"]
    return "\n".join(lines) + "\n"


def _target_sentence(result: SweepResult) -> str:
    goal = f">= {100 * TARGET_KEPT:.0f}% of the float16 NDCG@5 at <= 1/{round(1 / TARGET_FRACTION)} of its bytes"
    parts = []
    for key, what in (("index", "counting the index alone"), ("total", "counting the re-scoring copies too")):
        hit = result.target.get(key)
        if hit:
            parts.append(
                f"{what}: `{hit['setting']}` ({hit['bytes_per_page']:.1f} bytes/page, {hit['fraction']:.4f} of "
                f"float16, {100 * hit['kept_ndcg_at_5']:.1f}% of NDCG@5)"
            )
        else:
            parts.append(f"{what}: no setting of the grid")
    return f"Target ({goal}): " + "; ".join(parts) + "."


def plot(result: SweepResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    base = result.baseline
    figure, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    for axis, (title, cost, flag) in zip(
        axes,
        (
            ("bytes per page in the index", lambda r: r.index_bytes, "pareto_index"),
            ("bytes per page incl. re-scoring's float16 copies", lambda r: r.total_bytes, "pareto_total"),
        ),
    ):
        for row in result.rows:
            marker = "^" if row.config["rescore"] else "o"
            on_front = getattr(row, flag)
            axis.scatter(cost(row), row.ndcg_at_5, marker=marker, s=46 if on_front else 26,
                         color="tab:red" if on_front else "tab:blue", zorder=3)
            axis.annotate(row.setting, (cost(row), row.ndcg_at_5), fontsize=6.5, xytext=(3, 3),
                          textcoords="offset points")
        front = sorted((r for r in result.rows if getattr(r, flag)), key=cost)
        axis.plot([cost(r) for r in front], [r.ndcg_at_5 for r in front], color="tab:red", lw=1.2,
                  drawstyle="steps-post", label="Pareto front", zorder=2)
        axis.axhline(TARGET_KEPT * base.ndcg_at_5, color="grey", ls="--", lw=0.8,
                     label=f"{100 * TARGET_KEPT:.0f}% of float16 NDCG@5")
        axis.axvline(TARGET_FRACTION * base.storage["float16_bytes_per_page"], color="grey", ls=":", lw=0.8,
                     label="1/8 of float16 bytes")
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(LogLocator(base=2))  # bytes: 128, 256, 512, ...
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel(title)
        axis.grid(alpha=0.3, which="both")
    qualities = [row.ndcg_at_5 for row in result.rows] + [TARGET_KEPT * base.ndcg_at_5]
    margin = 0.05 * (max(qualities) - min(qualities)) + 1e-3
    axes[0].set_ylim(min(qualities) - margin, max(qualities) + 2 * margin)
    axes[0].set_ylabel(f"NDCG@5 ({result.task}, {result.split})")
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].scatter([], [], marker="^", color="tab:blue", label="re-scored top candidates")
    axes[1].legend(fontsize=8, loc="lower right")
    figure.suptitle(f"{result.model_name}: retrieval quality against storage")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------- sweep
def compression_sweep(
    model_path: str,
    task: str,
    output_dir: str | Path,
    *,
    settings: Sequence[str] = DEFAULT_SETTINGS,
    split: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str | None = None,
    model_name: str | None = None,
    max_num_visual_tokens: int | None = None,
    allow_untrained_head: bool = False,
    show_progress: bool = True,
    command: str | None = None,
) -> SweepResult:
    """Score `task` under every setting and write table.md, sweep.json and quality_vs_storage.png to `output_dir`.

    Args:
        model_path: adapter folder, checkpoint folder, Hub id or `embedded:` alias.
        task: one mteb task name, SynthDocsRetrieval, or a local task folder.
        output_dir: a folder that does not exist yet (refused otherwise: results are never overwritten).
        settings: compression specs (`CompressionConfig.parse`); the float16 baseline is always scored first.

    Raises:
        ColinternError for an existing output folder, a bad setting, or a task that is not exactly one task.
    """
    import mteb

    start = time.perf_counter()
    output_dir = Path(output_dir)
    _refuse_existing(output_dir)
    configs = [CompressionConfig()] + [CompressionConfig.parse(s) for s in settings]
    configs = list(dict.fromkeys(configs))  # the baseline first, each setting once
    selections = resolve_benchmarks([task], [split] if split else None)
    tasks = [t for selection in selections for t in selection.tasks]
    if len(tasks) != 1:
        raise ColinternError(f"--task {task!r} is {len(tasks)} tasks: the sweep takes one task (a task name or folder).")
    mteb_task = tasks[0]
    eval_split = mteb_task.eval_splits[0]
    if len(mteb_task.eval_splits) > 1:
        mteb_task.filter_eval_splits([eval_split])
    info = describe_checkpoint(str(model_path), model_name=model_name)
    wrapper = _EncodeOnceWrapper(
        info.source, device=device, dtype=dtype, allow_untrained_head=allow_untrained_head, model_name=info.name,
        max_num_visual_tokens=max_num_visual_tokens, show_progress=show_progress, checkpoint=info,
    )
    name = mteb_task.metadata.name
    mteb_task.load_data()
    rows: list[SweepRow] = []
    try:
        for config in configs:
            begin = time.perf_counter()
            wrapper.set_compression(config)
            wrapper.storage_stats.clear()
            result = mteb.evaluate(
                wrapper,
                mteb_task,
                cache=None,
                encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress},
                co2_tracker=False,
                show_progress_bar=False,
            )
            scores = task_scores(result.task_results[0], eval_split, main_metric=mteb_task.metadata.main_score).scores
            row = SweepRow(config.label(), config.to_dict(), scores, wrapper.storage(name), time.perf_counter() - begin)
            rows.append(row)
            logger.info(
                "%-34s NDCG@5 %.4f  %8.1f bytes/page (%.4f of float16)  %.1f s",
                row.setting, row.ndcg_at_5, row.index_bytes, row.storage["fraction_of_float16"], row.seconds,
            )
    finally:
        mteb_task.unload_data()
    baseline = rows[0]
    for row in rows:
        row.kept = row.ndcg_at_5 / baseline.ndcg_at_5 if baseline.ndcg_at_5 > 0 else None
    for flag, cost in (("pareto_index", lambda r: r.index_bytes), ("pareto_total", lambda r: r.total_bytes)):
        for row, on in zip(rows, pareto_front([(cost(r), r.ndcg_at_5) for r in rows])):
            setattr(row, flag, on)
    sweep = SweepResult(
        model=str(model_path), model_name=info.name, revision=info.revision, task=name, split=eval_split, rows=rows,
        command=command, output_dir=output_dir, target=target_check(rows, baseline),
        encoded={kind: wrapper.throughput(name)[kind] for kind in ("pages", "queries")},
    )
    sweep.seconds = time.perf_counter() - start
    write_outputs(sweep, output_dir)
    return sweep


def _refuse_existing(output_dir: Path) -> None:
    if output_dir.exists():
        raise ColinternError(
            f"{output_dir} already exists: the sweep never overwrites results; choose a new --output-dir."
        )


def write_outputs(result: SweepResult, output_dir: Path) -> None:
    """table.md, sweep.json and the PNG, built in a temporary folder and renamed to `output_dir` when complete."""
    _refuse_existing(output_dir)
    with atomic_directory(output_dir) as tmp:
        atomic_write_text(tmp / "table.md", format_table(result))
        atomic_write_json(tmp / "sweep.json", result.to_dict())
        plot(result, tmp / "quality_vs_storage.png")
        _refuse_existing(output_dir)  # created meanwhile by someone else: keep theirs
    logger.info("Wrote %s", ", ".join(str(output_dir / f) for f in FILES))


def default_output_dir(model_path: str, task: str, split: str | None = None) -> Path:
    """results/compression/<model>_<task>[_<split>], names made plain file names."""
    parts = [safe_name(Path(str(model_path).rstrip("/")).name or str(model_path), fallback="model"),
             safe_name(Path(task.rstrip("/")).name or task, fallback="task")]
    if split:
        parts.append(safe_name(split, fallback="split"))
    return Path("results/compression") / "_".join(parts)
