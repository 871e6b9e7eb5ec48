"""`page-checks`: how long a training run waits before its first optimizer step on a large training set.

Writes a set of `--rows` query-page pairs in the `vidore/colpali_train_set` schema (query, image, image_filename,
answer, source; small PNG and JPEG pages) in the Hub snapshot layout (`data/train-*.parquet`,
`data/test-*.parquet`), then measures, each in a fresh process:
  * `decode-all`: every page fully decoded (`PIL.Image.load()`), as a hand-written check (and colintern before it
    checked headers) does: rows/s;
  * `checks-cold`: colintern's page checks (`prepare_split`) with no cached result: rows/s;
  * `checks-cached`: the same checks again (what `--resume` and a second run on the same data do): seconds;
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
