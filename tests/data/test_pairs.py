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
    assert len(config.data.mixture) == 2 and config.preset is None and config.training.lr == 1e-3
    result = train(config)
    assert result.global_step == 4
    assert (tmp_path / "quick" / "model.safetensors").is_file()
