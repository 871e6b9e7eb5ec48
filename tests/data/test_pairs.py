import io
import os
import subprocess
import sys

import datasets
import pytest
from PIL import Image

from colintern.data.pairs import load_pairs, prepare_split, validate_pairs
from colintern.utils import ColinternError

from tests.conftest import REPO_ROOT


def png(colour="red", size=(64, 88)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pairs(folder, rows, split="train"):
    (folder / split).mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image()})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / split / "data.parquet"))
    return folder


@pytest.fixture
def bad_dataset(tmp_path):
    good = [{"query": f"page {i} with a red header", "image": {"bytes": png(), "path": None}} for i in range(6)]
    rows = list(good)
    rows[2] = {"query": "corrupt page", "image": {"bytes": png()[:70], "path": None}}
    rows[4] = {"query": "   ", "image": {"bytes": png("blue"), "path": None}}
    return write_pairs(tmp_path / "bad", rows)


def test_validation_names_each_bad_row(bad_dataset):
    dataset = load_pairs(str(bad_dataset), "train")
    report, tiles = validate_pairs(dataset, "query", "image", "train")
    assert report.bad_rows == [2, 4]
    problems = dict(report.problems)
    assert "unreadable image" in problems[2] and problems[4] == "empty query"
    assert tiles == [1] * 6


def test_bad_rows_stop_training_unless_skipped(bad_dataset, tmp_path):
    dataset = load_pairs(str(bad_dataset), "train")
    kwargs = dict(query_column="query", image_column="image", split="train", negatives_column=None, validate=True)
    with pytest.raises(ColinternError, match=r"2 bad row\(s\) of 6.*row 2: unreadable image.*row 4: empty query.*--skip-bad-rows"):
        prepare_split(dataset, skip_bad_rows=False, report_path=tmp_path / "report.json", **kwargs)
    assert (tmp_path / "report.json").is_file()
    kept = prepare_split(dataset, skip_bad_rows=True, **kwargs)
    assert kept["__row__"] == [0, 1, 3, 5]


def test_missing_column_is_a_clear_error(tmp_path):
    folder = tmp_path / "nocol"
    (folder / "train").mkdir(parents=True)
    datasets.Dataset.from_list([{"question": "q", "image": {"bytes": png(), "path": None}}],
                               features=datasets.Features({"question": datasets.Value("string"), "image": datasets.Image()})
                               ).to_parquet(str(folder / "train" / "data.parquet"))
    dataset = load_pairs(str(folder), "train")
    with pytest.raises(ColinternError, match="no column 'query'.*question.*--query-column"):
        validate_pairs(dataset, "query", "image", "train")


def test_missing_split_and_folder_are_clear_errors(tmp_path, small_synthdocs_dir):
    with pytest.raises(ColinternError, match="no split 'dev'.*train"):
        load_pairs(str(small_synthdocs_dir), "dev")
    with pytest.raises(ColinternError, match="not found"):
        load_pairs(str(tmp_path / "missing"), "train")


def test_retrieval_split_becomes_pairs(small_synthdocs_dir):
    pairs = load_pairs(str(small_synthdocs_dir), "test")
    assert len(pairs) == 24 and set(pairs.column_names) == {"query", "image"}


def test_train_script_reports_bad_data_in_one_line(bad_dataset, colintern_home, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "scripts/train.py", "--preset", "demo", "--dataset", str(bad_dataset), "--max-steps", "1",
         "--output-dir", str(tmp_path / "out"), "--eval-split", "none"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "row 2: unreadable image" in done.stderr and "row 4: empty query" in done.stderr
    assert (tmp_path / "out" / "data_report.json").is_file()


def test_mixture_respects_max_samples_and_weights(tmp_path):
    from colintern.data.pairs import load_mixture

    a = write_pairs(tmp_path / "a", [{"query": f"a{i}", "image": {"bytes": png(), "path": None}} for i in range(30)])
    b = tmp_path / "b"
    (b / "train").mkdir(parents=True)
    # source b uses other column names; it is renamed into the common layout
    features = datasets.Features({"question": datasets.Value("string"), "page": datasets.Image()})
    datasets.Dataset.from_list([{"question": f"b{i}", "page": {"bytes": png("blue"), "path": None}} for i in range(5)],
                               features=features).to_parquet(str(b / "train" / "data.parquet"))
    mixture = [
        {"dataset": str(a), "max_samples": 20, "weight": 2.0},
        {"dataset": str(b), "weight": 1.0, "query_column": "question", "image_column": "page"},
    ]
    mixed = load_mixture(mixture, "train", "query", "image", seed=0)
    sources = [q[0] for q in mixed["query"]]
    assert sources.count("a") == 20 and sources.count("b") == 10  # b resampled up to half of a's share
    assert set(mixed.column_names) == {"query", "image"}
    assert load_mixture(mixture, "train", "query", "image", seed=0)["query"] == mixed["query"]


def test_quick_test_config_trains_end_to_end(colintern_home, tmp_path):
    import argparse

    from colintern.training.arguments import add_config_arguments, config_from_args
    from colintern.training.trainer import train

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(REPO_ROOT / "experiments/configs/demo_test.yaml"), "--output-dir",
                              str(tmp_path / "quick"), "--max-steps", "4", "--eval-steps", "4", "--num-workers", "0",
                              "--batch-size", "8"])
    config = config_from_args(args)
    assert len(config.data.mixture) == 2 and config.preset is None and config.training.learning_rate == 1e-3
    result = train(config)
    assert result.global_step == 4
    assert (tmp_path / "quick" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------- folder layouts
COLPALI_FEATURES = datasets.Features({
    "query": datasets.Value("string"), "image": datasets.Image(), "image_filename": datasets.Value("string"),
    "answer": datasets.Value("string"), "source": datasets.Value("string"),
})


@pytest.fixture(autouse=True)
def _isolated_home(colintern_home):
    """Page checks are cached under $COLINTERN_HOME: the session's, not the user's."""
    return colintern_home


def colpali_rows(n, split, colour="red"):
    """Rows of the vidore/colpali_train_set schema, pages as PNG bytes."""
    return [{"query": f"{split} question {i}?", "image": {"bytes": png(colour), "path": None},
             "image_filename": f"{split}/{i}.png", "answer": f"answer {i}", "source": "test"} for i in range(n)]


def colpali_parquet(path, n, split, colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(colpali_rows(n, split, colour), features=COLPALI_FEATURES).to_parquet(str(path))


def hub_snapshot(folder, n_train, n_test, colour="red"):
    """What `hf download --repo-type dataset vidore/colpali_train_set --local-dir folder` leaves (sharded)."""
    colpali_parquet(folder / "data" / "train-00000-of-00002.parquet", n_train - n_train // 2, "train", colour)
    colpali_parquet(folder / "data" / "train-00001-of-00002.parquet", n_train // 2, "train", colour)
    colpali_parquet(folder / "data" / "test-00000-of-00001.parquet", n_test, "test", colour)
    (folder / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: query\n    dtype: string\n  - name: image\n    dtype: image\n"
        "  - name: image_filename\n    dtype: string\n  - name: answer\n    dtype: string\n  - name: source\n"
        "    dtype: string\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: data/train-*\n  - split: test\n    path: data/test-*\n---\n# colpali_train_set\n"
    )
    return folder


def split_sizes(folder, splits=("train", "test")):
    return {split: len(load_pairs(str(folder), split)) for split in splits}


def test_hub_snapshot_layout_keeps_its_splits(tmp_path):
    snapshot = hub_snapshot(tmp_path / "colpali_train_set", 7, 3)
    assert split_sizes(snapshot) == {"train": 7, "test": 3}
    assert split_sizes(snapshot / "data") == {"train": 7, "test": 3}  # the data folder alone: not merged
    train = load_pairs(str(snapshot), "train")
    assert set(train.column_names) == {"query", "image", "image_filename", "answer", "source"}
    assert train.features["image"] == datasets.Image(decode=False)
    assert train[0]["query"].startswith("train question")


def test_two_snapshots_of_the_same_name_are_not_confused(tmp_path):
    # datasets 5.2 keys its cache for a folder with README configs on the folder's name and the README's patterns
    # only: given just the folder, the second snapshot would be read from the first one's cache
    assert split_sizes(hub_snapshot(tmp_path / "a" / "colpali_train_set", 5, 2)) == {"train": 5, "test": 2}
    assert split_sizes(hub_snapshot(tmp_path / "b" / "colpali_train_set", 9, 4)) == {"train": 9, "test": 4}


def test_save_to_disk_split_folders_and_split_file_names(tmp_path):
    dataset_dict = datasets.DatasetDict({
        "train": datasets.Dataset.from_list(colpali_rows(6, "train"), features=COLPALI_FEATURES),
        "test": datasets.Dataset.from_list(colpali_rows(2, "test"), features=COLPALI_FEATURES),
    })
    dataset_dict.save_to_disk(str(tmp_path / "saved"))
    assert split_sizes(tmp_path / "saved") == {"train": 6, "test": 2}

    colpali_parquet(tmp_path / "folders" / "train" / "part-0.parquet", 4, "train")
    colpali_parquet(tmp_path / "folders" / "train" / "part-1.parquet", 4, "train")
    colpali_parquet(tmp_path / "folders" / "test" / "part-0.parquet", 3, "test")
    assert split_sizes(tmp_path / "folders") == {"train": 8, "test": 3}

    colpali_parquet(tmp_path / "names" / "train.parquet", 5, "train")
    colpali_parquet(tmp_path / "names" / "validation.parquet", 2, "validation")
    assert split_sizes(tmp_path / "names", ("train", "validation")) == {"train": 5, "validation": 2}
    with pytest.raises(ColinternError, match=r"no split 'test' \(it has: train, validation\)"):
        load_pairs(str(tmp_path / "names"), "test")

    colpali_parquet(tmp_path / "plain" / "pairs.parquet", 5, "train")  # no split names: all of it is 'train'
    assert len(load_pairs(str(tmp_path / "plain"), "train")) == 5


def test_image_folder_with_metadata(tmp_path):
    import json

    for split, n in (("train", 5), ("test", 2)):
        folder = tmp_path / "pages" / split
        folder.mkdir(parents=True)
        with open(folder / "metadata.jsonl", "w") as handle:
            for i in range(n):
                (folder / f"page{i}.png").write_bytes(png())
                handle.write(json.dumps({"file_name": f"page{i}.png", "query": f"what is on page {i}?"}) + "\n")
    assert split_sizes(tmp_path / "pages") == {"train": 5, "test": 2}
    report, _ = validate_pairs(load_pairs(str(tmp_path / "pages"), "train"), "query", "image", "train")
    assert report.problems == []


def test_files_mixing_splits_are_refused_by_name(tmp_path):
    colpali_parquet(tmp_path / "joined" / "trainset.parquet", 5, "train")
    colpali_parquet(tmp_path / "joined" / "testset.parquet", 2, "test")
    with pytest.raises(ColinternError, match=r"look like 2 different splits \(test: 1 file.*testset.*train: 1 file.*"
                                             r"trainset.*Pick one.*train-\*\.parquet and test-\*\.parquet"):
        load_pairs(str(tmp_path / "joined"), "train")

    colpali_parquet(tmp_path / "folders" / "pairs" / "data.parquet", 5, "train")
    colpali_parquet(tmp_path / "folders" / "holdout" / "data.parquet", 2, "test")
    with pytest.raises(ColinternError, match=r"2 different splits \(holdout/: 1 file.*pairs/: 1 file.*--dataset"):
        load_pairs(str(tmp_path / "folders"), "train")
    assert len(load_pairs(str(tmp_path / "folders"), "pairs")) == 5  # a split folder by any name, on its own
    assert len(load_pairs(str(tmp_path / "folders" / "holdout"), "train")) == 2


def test_retrieval_split_layout_keeps_working(small_synthdocs_dir):
    assert len(load_pairs(str(small_synthdocs_dir), "train")) == 64
    assert len(load_pairs(str(small_synthdocs_dir), "test")) == 24
    assert len(load_pairs(str(small_synthdocs_dir / "test"), "train")) == 24  # a retrieval split given directly


def test_offline_hub_name_points_to_a_download_that_works(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ColinternError) as error:
        load_pairs("vidore/colpali_train_set", "train")
    message = str(error.value)
    assert "hf download --repo-type dataset vidore/colpali_train_set --local-dir DIR" in message
    assert "--dataset DIR" in message and "not DIR/data" in message


# ---------------------------------------------------------------------------------------------------- page checks
def jpeg(colour="red", size=(64, 88)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_with_valid_crc_but_corrupt_pixels() -> bytes:
    """A PNG whose chunks are all intact (CRCs match) but whose compressed pixel data is not a zlib stream: only
    decoding finds it."""
    import struct
    import zlib

    data = png("green")
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    garbage = b"\x78\x9c" + b"\xff" * max(8, length - 2)
    chunk = struct.pack(">I", len(garbage)) + b"IDAT" + garbage + struct.pack(">I", zlib.crc32(b"IDAT" + garbage))
    return data[:start] + chunk + data[start + 12 + length :]


def pages_dataset(pages):
    features = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image(decode=False)})
    return datasets.Dataset.from_list([{"query": f"q{i}", "image": {"bytes": page, "path": None}}
                                       for i, page in enumerate(pages)], features=features)


def test_page_checks_find_broken_pages_without_decoding():
    from colintern.data.pairs import check_pages

    good_png, good_jpeg = png(), jpeg()
    flipped = bytearray(good_png)
    flipped[good_png.index(b"IDAT") + 6] ^= 0xFF
    pages = [good_png, good_png[:70], good_jpeg, good_jpeg[:-2], good_png[:-5], bytes(flipped), b"not an image",
             good_jpeg[: len(good_jpeg) // 2], png(size=(300, 200))]
    checks = check_pages(pages_dataset(pages), "image", num_workers=1, cache=False)
    assert sorted(checks.problems) == [1, 3, 4, 5, 6, 7]
    assert all(problem.startswith("unreadable image (") for problem in checks.problems.values())
    assert "truncated" in checks.problems[3] and "checksum" in checks.problems[5]
    assert [checks.sizes[row] for row in (0, 2, 8)] == [(64, 88), (64, 88), (300, 200)]


def test_page_checks_refuse_decompression_bombs(monkeypatch):
    from colintern.data.pairs import check_pages

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x88 = 5632 pixels: over twice the limit (PIL: a bomb)
    checks = check_pages(pages_dataset([png()]), "image", num_workers=1, cache=False)
    # named as a decompression bomb, with the fix (colintern.data.pages turns PIL's DecompressionBombError into it)
    assert "exceeds limit of 2000 pixels" in checks.problems[0] and "MAX_IMAGE_PIXELS" in checks.problems[0]


def test_page_checks_in_processes_match_one_process(monkeypatch):
    from colintern.data import pairs

    monkeypatch.setattr(pairs, "CHECK_BATCH_ROWS", 4)
    pages = [png() if i % 5 else png()[:60] for i in range(23)]
    serial = pairs.check_pages(pages_dataset(pages), "image", num_workers=1, cache=False)
    parallel = pairs.check_pages(pages_dataset(pages), "image", num_workers=3, cache=False)
    assert parallel.sizes == serial.sizes and parallel.problems == serial.problems
    assert sorted(parallel.problems) == [0, 5, 10, 15, 20]


def test_page_checks_are_cached_on_the_data_files(tmp_path, caplog):
    import logging

    from colintern.data.pairs import check_pages

    folder = tmp_path / "cached"
    write_pairs(folder, [{"query": f"q{i}", "image": {"bytes": png() if i != 3 else png()[:70], "path": None}}
                         for i in range(8)])
    first = check_pages(load_pairs(str(folder), "train"), "image")
    second = check_pages(load_pairs(str(folder), "train"), "image")  # a second run, or --resume
    assert not first.cached and second.cached
    assert (second.sizes, second.problems) == (first.sizes, first.problems) and list(second.problems) == [3]
    # prepare_split (what a run calls) reads the cached result, and reports the bad row as before
    kwargs = {"query_column": "query", "image_column": "image", "split": "train", "negatives_column": None,
              "validate": True}
    with caplog.at_level(logging.INFO, logger="colintern.data.pairs"), pytest.raises(ColinternError,
                                                                                      match="row 3: unreadable image"):
        prepare_split(load_pairs(str(folder), "train"), skip_bad_rows=False, **kwargs)
    assert "Page checks of 8 rows read from" in caplog.text
    # other data in the same place is checked afresh
    write_pairs(folder, [{"query": f"q{i}", "image": {"bytes": png(), "path": None}} for i in range(8)])
    third = check_pages(load_pairs(str(folder), "train"), "image")
    assert not third.cached and third.problems == {}


def test_collator_reports_or_skips_a_page_only_decoding_finds(tiny_retriever):
    from colintern.data.pairs import RetrievalCollator, check_pages

    processor = tiny_retriever[1]
    pages = [png(), png_with_valid_crc_but_corrupt_pixels(), png("blue")]
    dataset = prepare_split(pages_dataset(pages), query_column="query", image_column="image", split="train",
                            negatives_column=None, validate=True, skip_bad_rows=False, cache=False)
    assert check_pages(dataset, "image", cache=False).problems == {}  # header and chunks are intact
    rows = [dataset[i] for i in range(3)]
    with pytest.raises(ColinternError, match=r"Row 1: unreadable page \(OSError.*--skip-bad-rows"):
        RetrievalCollator(processor)(rows)
    batch = RetrievalCollator(processor, skip_bad_rows=True)(rows)
    assert batch["query_input_ids"].shape[0] == 2 and batch["doc_pixel_values"].shape[0] == 2


def test_page_checks_run_without_a_writable_cache(tmp_path, monkeypatch):
    from colintern.data.pairs import check_pages

    (tmp_path / "home").write_text("a file where the cache folder would go")
    monkeypatch.setenv("COLINTERN_HOME", str(tmp_path / "home"))
    checks = check_pages(pages_dataset([png(), b"broken"]), "image")
    assert not checks.cached and list(checks.problems) == [1]


def test_a_run_on_a_hub_snapshot_trains_on_train_and_evaluates_on_test(tmp_path, tiny_retriever):
    from colintern.data.pairs import build_datasets
    from colintern.training.arguments import RunConfig

    snapshot = hub_snapshot(tmp_path / "colpali_train_set", 10, 4)
    config = RunConfig.from_dict({
        "model": {"name_or_path": "embedded:tiny-internvl3_5", "max_num_visual_tokens": 16},
        "data": {"dataset": str(snapshot), "eval_split": "test"},
        "training": {"output_dir": str(tmp_path / "run")},
    })  # fmt: skip
    data = build_datasets(config, tiny_retriever[1], report_dir=tmp_path)
    assert len(data.train_dataset) == 10 and len(data.eval_dataset) == 4
    assert all(q.startswith("train ") for q in data.train_dataset["query"])
    assert all(q.startswith("test ") for q in data.eval_dataset["query"])
