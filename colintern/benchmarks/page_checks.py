"""`page-checks`: how long a training run waits before its first optimizer step on a large training set.

Writes a set of `--rows` query-page pairs in the `vidore/colpali_train_set` schema (query, image, image_filename,
answer, source; small PNG and JPEG pages) in the Hub snapshot layout (`data/train-*.parquet`,
`data/test-*.parquet`), then measures, each in a fresh process:
  * `decode-all`: every page fully decoded (`PIL.Image.load()`), as a hand-written check (and colintern before it
    checked headers) does: rows/s;
  * `checks-cold`: colintern's page checks (`prepare_split`) with no cached result: rows/s;
  * `checks-cached`: the same checks again (what `--resume` and a second run on the same data do): seconds;
  * (`checks-cold`, `checks-cold-1-process` and `decode-all` alternate over `--rounds` rounds,
    `measure.interleaved_rounds`: their rows/s are medians, with the spread and a quiet / under-load label)
  * `first-step`: `scripts/train.py --preset demo --dataset SET --max-steps 1` (the embedded tiny model): seconds
    from the start of the run to the end of its first optimizer step, with a cold and with a warm check cache.

    python scripts/benchmark.py page-checks --rows 100000
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
import time
from pathlib import Path

DESCRIPTION = "Time to the first optimizer step on a 100k-row training set: page checks (cold, cached) vs decoding all"
SCHEMA = ("query", "image", "image_filename", "answer", "source")


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, default=100_000, help="training pairs (default 100000)")
    parser.add_argument("--test-rows", type=int, default=1000, help="rows of the test split (default 1000)")
    parser.add_argument("--page-size", type=int, default=64, help="page side in pixels (default 64)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the compared checks and decoding; the median counts (default 3)")
    parser.add_argument("--workdir", help="where the set is written (default: a temporary folder, removed after)")


def _features():
    import datasets

    return datasets.Features({
        "query": datasets.Value("string"), "image": datasets.Image(), "image_filename": datasets.Value("string"),
        "answer": datasets.Value("string"), "source": datasets.Value("string"),
    })


def page_bytes(rng: random.Random, size: int, image_format: str) -> bytes:
    """A small page: white, a coloured header band and grey 'text' lines, encoded as PNG or JPEG."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, size, size // 6), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    for y in range(size // 4, size - 4, max(3, size // 12)):
        draw.line((4, y, rng.randrange(size // 3, size - 4), y), fill=(90, 90, 90))
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **({"quality": 85} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def write_colpali_split(folder: Path, split: str, n_rows: int, *, page_size: int = 64, seed: int = 0,
                        rows_per_shard: int = 25_000) -> list[Path]:
    """`n_rows` pairs of the colpali_train_set schema as `<folder>/<split>-XXXXX-of-YYYYY.parquet` (the Hub's names);
    every other page PNG, the rest JPEG."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    schema = _features().arrow_schema
    rng = random.Random(f"{seed}-{split}")
    n_shards = max(1, -(-n_rows // rows_per_shard))
    paths = []
    for shard in range(n_shards):
        path = folder / f"{split}-{shard:05d}-of-{n_shards:05d}.parquet"
        with pq.ParquetWriter(str(path), schema) as writer:
            start, stop = shard * rows_per_shard, min(n_rows, (shard + 1) * rows_per_shard)
            for group in range(start, stop, 1000):
                rows = range(group, min(stop, group + 1000))
                formats = ["PNG" if row % 2 == 0 else "JPEG" for row in rows]
                columns = {
                    "query": [f"what is on page {row} of the {split} split?" for row in rows],
                    "image": [{"bytes": page_bytes(rng, page_size, f), "path": None} for f in formats],
                    "image_filename": [f"pages/{split}/{row}.{f.lower()}" for row, f in zip(rows, formats)],
                    "answer": [f"answer {row}" for row in rows],
                    "source": ["benchmark"] * len(rows),
                }
                writer.write_table(pa.Table.from_pydict(columns, schema=schema))
        paths.append(path)
    return paths


def write_hub_snapshot(folder: Path, n_train: int, n_test: int, *, page_size: int = 64, seed: int = 0) -> Path:
    """The layout `hf download --repo-type dataset vidore/colpali_train_set --local-dir FOLDER` leaves: data/ holding
    train-*.parquet and test-*.parquet shards, and a README.md whose YAML header names the splits' files."""
    write_colpali_split(folder / "data", "train", n_train, page_size=page_size, seed=seed)
    write_colpali_split(folder / "data", "test", n_test, page_size=page_size, seed=seed)
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: test\n    path: data/test-*\n---\n# colpali_train_set (benchmark copy)\n"
    )
    return folder


# ------------------------------------------------------------------------------------------------ orchestration
def run(args) -> int:
    from colintern.benchmarks import record

    with tempfile.TemporaryDirectory(prefix="colintern-page-checks-") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        figures = benchmark_page_checks(root, args.rows, args.test_rows, args.page_size, getattr(args, "rounds", 3))
    path = record("page-checks", figures, getattr(args, "output_dir", None))
    print(summary(figures))
    print(f"-> {path}")
    return 0


def benchmark_page_checks(root: Path, rows: int, test_rows: int, page_size: int, rounds: int = 3) -> dict:
    """Write the set under `root`, then run every measurement in its own process (caches under `root`); the compared
    rows/s (cold checks, one process, decoding all) are medians of `rounds` interleaved rounds."""
    from colintern.benchmarks.measure import interleaved_rounds, run_worker

    started = time.perf_counter()
    snapshot = write_hub_snapshot(root / "colpali_train_set", rows, test_rows, page_size=page_size)
    write_seconds = time.perf_counter() - started
    saved_env = {k: os.environ.get(k) for k in ("COLINTERN_HOME", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE")}
    os.environ.update(COLINTERN_HOME=str(root / "home"), HF_DATASETS_CACHE=str(root / "hf-datasets"),
                      HF_HUB_OFFLINE="1")
    results: dict[str, dict] = {}
    try:
        def worker(name: str, *extra: str) -> dict:
            out = root / f"{name}.json"
            load = os.getloadavg()
            launched = time.time()
            result = run_worker(__name__, ["--task", extra[0], "--dataset", str(snapshot), "--out", str(out),
                                           "--run-dir", str(root / name), *extra[1:]], out)
            if "first_step_at" in result:
                result["seconds_to_first_step"] = round(result.pop("first_step_at") - launched, 2)
            result["load_average_before"] = [round(x, 2) for x in load]
            results[name] = result
            return result

        worker("embedded-model", "model")  # built once, so the first-step figures do not include it
        worker("first-step-cold", "first-step")  # datasets converts the parquet files, pages checked afresh
        worker("first-step-warm", "first-step")  # a second run / --resume on the same data
        worker("checks-cached", "checks")
        # the compared rows/s: interleaved over `rounds` (each round's own seconds), medians with the conditions
        compared = {
            "checks-cold": ("checks", "--no-cache"),
            "checks-cold-1-process": ("checks", "--no-cache", "--processes", "1"),
            "decode-all": ("decode", "--limit", str(min(rows, 20_000))),
        }
        per_round: dict[str, list[dict]] = {name: [] for name in compared}

        def one_round(name: str):
            def call() -> float:
                per_round[name].append(worker(name, *compared[name]))
                return per_round[name][-1]["seconds"]

            return call

        timing = interleaved_rounds({name: one_round(name) for name in compared}, rounds)
        for name, stats in timing.stats.items():
            result = results[name]
            result.update(stats.to_dict())
            result["seconds"] = round(stats.median, 2)
            result["rows_per_second"] = round(result["rows"] / stats.median, 1)
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {
        "rows": rows, "test_rows": test_rows, "page_size": page_size, "write_seconds": round(write_seconds, 1),
        "cpus": len(os.sched_getaffinity(0)), "rounds": rounds, "conditions": timing.conditions,
        "timing": {k: v for k, v in timing.to_dict().items() if k != "implementations"}, "runs": results,
    }


def summary(figures: dict) -> str:
    runs = figures["runs"]
    lines = [f"{figures['rows']} training pairs, {figures['page_size']}px PNG/JPEG pages, {figures['cpus']} CPUs"
             + (f"; rows/s are medians of {figures['rounds']} rounds, {figures['conditions']}" if "conditions" in figures
                else "")]
    for name in ("first-step-cold", "first-step-warm"):
        lines.append(f"  {name:24s} {runs[name]['seconds_to_first_step']:8.1f} s from start to the first step's end")
    for name in ("checks-cold", "checks-cold-1-process", "decode-all"):
        lines.append(f"  {name:24s} {runs[name]['rows_per_second']:8.0f} rows/s")
    lines.append(f"  {'checks-cached':24s} {runs['checks-cached']['seconds']:8.2f} s for every row")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ one run (worker)
def _worker_main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--task", required=True, choices=("model", "first-step", "checks", "decode"))
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    result = {"first-step": _first_step, "checks": _checks, "decode": _decode_all, "model": _model}[args.task](args)
    Path(args.out).write_text(json.dumps(result))


def _model(args) -> dict:
    from colintern.model.embedded import ensure_embedded_model

    ensure_embedded_model()
    return {}


def _first_step(args) -> dict:
    """`scripts/train.py --preset demo --dataset SET --max-steps 1`, noting when its first optimizer step ends."""
    import argparse

    from transformers import TrainerCallback

    from colintern.training.arguments import add_config_arguments, config_from_args
    from colintern.training.trainer import train

    marks: dict = {}

    class FirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.setdefault("train_begin_at", time.time())

        def on_step_end(self, args, state, control, **kwargs):
            marks.setdefault("first_step_at", time.time())

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = config_from_args(parser.parse_args([
        "--preset", "demo", "--dataset", args.dataset, "--output-dir", args.run_dir, "--max-steps", "1",
        "--report-to", "none",
    ]))
    train(config, callbacks=[FirstStep()])
    return {"first_step_at": marks["first_step_at"],
            "first_step_seconds": round(marks["first_step_at"] - marks["train_begin_at"], 2)}


def _checks(args) -> dict:
    from colintern.data.pairs import load_pairs, prepare_split

    dataset = load_pairs(args.dataset, "train")
    started = time.perf_counter()
    prepare_split(dataset, query_column="query", image_column="image", split="train", negatives_column=None,
                  validate=True, skip_bad_rows=False, cache=not args.no_cache)
    seconds = time.perf_counter() - started
    return {"rows": len(dataset), "seconds": seconds, "rows_per_second": round(len(dataset) / seconds, 1)}


def _decode_all(args) -> dict:
    """The reference: every page fully decoded (`PIL.Image.load()`), one process, rows read in batches."""
    from colintern.data.pairs import decode_image, load_pairs

    dataset = load_pairs(args.dataset, "train").select_columns(["image"])
    n_rows = min(len(dataset), args.limit or len(dataset))
    started = time.perf_counter()
    for start in range(0, n_rows, 512):
        for value in dataset[start : min(n_rows, start + 512)]["image"]:
            decode_image(value)
    seconds = time.perf_counter() - started
    return {"rows": n_rows, "seconds": seconds, "rows_per_second": round(n_rows / seconds, 1)}


if __name__ == "__main__":
    import sys

    from colintern.utils import setup_logging

    setup_logging()
    _worker_main(sys.argv[1:])
