"""Hard-negative mining with the tiny real model on the prepared own-documents folder, and training on the result."""

from __future__ import annotations

import io
import json
import shutil

import datasets
import pytest
import torch
from PIL import Image

from colintern.data.pairs import load_pairs
from colintern.training.negatives import (
    MiningConfig,
    MiningStats,
    distinct_pages,
    mine,
    mine_hard_negatives,
    page_key,
    page_similarity,
    select_negatives,
)
from colintern.utils import ColinternError

from tests.pdf_fixtures import prepared_folder, run_script, run_script_in_process

TOP_K = 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def mined(prepared, colintern_home, tmp_path_factory):
    """A copy of OUT with negatives mined in place by the script; (OUT copy, console output)."""
    out = tmp_path_factory.mktemp("mined") / "out"
    shutil.copytree(prepared.out, out)
    (out / "train" / "README.md").write_text("the data card")  # the split folder's other contents stay
    (out / "train" / "notes").mkdir()
    (out / "train" / "notes" / "sources.txt").write_text("where the PDFs came from")
    done = run_script("scripts/mine_hard_negatives.py", "--model-path", "embedded:tiny-internvl3_5", "--dataset",
                      str(out / "train"), "--top-k", str(TOP_K), "--max-num-visual-tokens", "16")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def stats_for(n_pages: int = 4) -> MiningStats:
    return MiningStats(model="m", rows=n_pages, pages=n_pages, queries=1, top_k=2, duplicate_threshold=0.99,
                       max_positive_ratio=None)


# ---------------------------------------------------------------------------------------------------- the parts
def test_select_negatives_skips_positives_near_duplicates_and_pages_above_the_positive_ratio():
    scores = torch.tensor([5.0, 9.0, 8.0, 7.0, 4.0, 6.0])  # page 1 scores highest; the positive is page 0
    similar = {1: 0.999, 2: 0.5, 3: 0.4, 4: 0.3, 5: 0.2}  # page 1 is a near-duplicate of the positive

    def to_positive(candidates):
        return torch.tensor([similar[c] for c in candidates])

    stats = stats_for(6)
    assert select_negatives(scores, {0}, 2, to_positive, 0.99, None, stats) == [2, 3]
    assert stats.skipped_near_duplicates == 1
    assert select_negatives(scores, {0, 2}, 3, to_positive, 0.99, None, stats_for(6)) == [3, 5, 4]
    stats = stats_for(6)
    # positive-aware: nothing scoring above 1.3 x the positive's 5.0 (pages 1, 2 and 3 at 9, 8 and 7)
    assert select_negatives(scores, {0}, 2, to_positive, 0.99, 1.3, stats) == [5, 4]
    assert stats.skipped_above_positive_ratio == 3
    assert select_negatives(scores, {0}, 10, to_positive, 0.99, None, stats_for(6)) == [2, 3, 5, 4]  # fewer exist


def test_distinct_pages_are_byte_identical_images():
    a, b = {"bytes": b"page-a", "path": None}, {"bytes": b"page-b", "path": None}
    assert distinct_pages([a, b, dict(a), b]) == ([0, 1], [0, 1, 0, 1])
    assert page_key({"bytes": None, "path": "/x.png"}) == "path:/x.png"
    with pytest.raises(ColinternError):
        page_key(42)


def test_page_similarity_is_one_for_a_copy_and_symmetric(tiny_retriever):
    from colintern.model.encoding import encode_pages
    from colintern.data.synthdocs import PageSpec, render_page
    import random

    model, processor = tiny_retriever
    first = render_page(PageSpec("red", "blue", "star", "table"), random.Random(0), 96, 128)
    other = render_page(PageSpec("green", "yellow", "circle", "pie chart"), random.Random(1), 96, 128)
    buffer = io.BytesIO()
    first.save(buffer, format="JPEG", quality=90)
    recompressed = Image.open(buffer).convert("RGB")
    pages = encode_pages(model, processor, [first, other, recompressed], storage_dtype=torch.float32)
    sim = page_similarity(pages, pages)
    assert torch.allclose(sim.diagonal(), torch.ones(3), atol=1e-4)
    assert torch.allclose(sim, sim.T, atol=1e-5)
    threshold = MiningConfig(model_path="m", dataset="d").duplicate_threshold
    assert sim[0, 2] >= threshold > sim[0, 1]  # the re-compressed copy is a near-duplicate; another page is not


# ---------------------------------------------------------------------------------------------------- mining
def test_mined_negatives_are_valid_rows_that_are_not_the_positive(mined):
    out, stdout = mined
    train = load_pairs(str(out / "train"), "train")
    assert "negatives" in train.column_names
    assert train.features["negatives"] == datasets.List(datasets.Value("int64"))
    assert {"document", "page", "image_filename"} <= set(train.column_names)  # the other columns are kept
    keys = [page_key(v) for v in train["image"]]
    for row, negatives in enumerate(train["negatives"]):
        assert len(negatives) == TOP_K and len(set(negatives)) == TOP_K
        assert all(0 <= n < len(train) for n in negatives)
        assert all(keys[n] != keys[row] for n in negatives)  # never the query's own page
    stats = json.loads((out / "train.negatives.json").read_text())
    assert stats["queries"] == stats["rows"] == len(train) and stats["queries_short_of_top_k"] == 0
    assert f'"negatives_per_query_mean": {TOP_K}' in stdout.replace(".0", "")


def test_negatives_are_the_highest_scoring_other_pages(mined, tiny_retriever):
    from colintern.data.pairs import decode_image
    from colintern.model.encoding import encode_pages, encode_queries
    from colintern.model.scoring import max_sim

    out, _ = mined
    train = load_pairs(str(out / "train"), "train")
    model, processor = tiny_retriever
    pages = encode_pages(model, processor, [decode_image(v) for v in train["image"]])
    queries = encode_queries(model, processor, list(train["query"]))
    scores = max_sim(queries, pages)
    for row, negatives in enumerate(train["negatives"]):
        others = [i for i in scores[row].argsort(descending=True).tolist() if i != row]
        assert negatives == others[:TOP_K]  # distinct pages, none a near-duplicate at the default threshold


def test_a_near_duplicate_of_the_positive_is_never_a_negative(prepared, tiny_retriever):
    train = load_pairs(str(prepared.out / "train"), "train").select(range(6))
    page = Image.open(io.BytesIO(train[0]["image"]["bytes"])).convert("RGB")
    buffer = io.BytesIO()
    page.save(buffer, format="JPEG", quality=95)  # the same page, re-compressed: other bytes, same content
    copy_row = {**train[0], "query": "a different question about the copy", "image": {"bytes": buffer.getvalue(),
                                                                                      "path": None}}
    with_copy = datasets.concatenate_datasets(
        [train, datasets.Dataset.from_list([copy_row], features=train.features)]
    )
    model, processor = tiny_retriever
    config = MiningConfig(model_path="tiny", dataset="-", top_k=len(with_copy) - 1)
    negatives, stats = mine(model, processor, with_copy, config)
    copy = len(with_copy) - 1
    assert copy not in negatives[0] and 0 not in negatives[copy]
    assert stats.skipped_near_duplicates >= 2 and stats.queries_short_of_top_k >= 2
    loose = MiningConfig(model_path="tiny", dataset="-", top_k=len(with_copy) - 1, duplicate_threshold=1.0)
    assert copy in mine(model, processor, with_copy, loose)[0][0]  # without the check the copy is a negative


def test_output_dir_and_errors(prepared, colintern_home, tmp_path):
    target, stats = mine_hard_negatives(MiningConfig(
        model_path="embedded:tiny-internvl3_5", dataset=str(prepared.out), top_k=2, output_dir=str(tmp_path / "neg"),
        max_num_visual_tokens=16,
    ))  # fmt: skip
    assert target == tmp_path / "neg" and stats.top_k == 2
    assert len(load_pairs(str(target), "train")[0]["negatives"]) == 2
    assert "negatives" not in load_pairs(str(prepared.out / "train"), "train").column_names  # input untouched
    with pytest.raises(ColinternError, match="--output-dir"):
        mine_hard_negatives(MiningConfig(model_path="x", dataset=str(prepared.out / "eval"), split="train"))
    done = run_script("scripts/mine_hard_negatives.py", "--model-path", "embedded:tiny-internvl3_5", "--dataset",
                      str(prepared.out / "train"), "--top-k", "0")
    assert done.returncode == 2 and "--top-k: must be at least 1" in done.stderr and "Traceback" not in done.stderr


def test_in_place_mining_keeps_everything_else_in_the_split_folder(mined):
    out, _ = mined
    assert (out / "train" / "README.md").read_text() == "the data card"
    assert (out / "train" / "notes" / "sources.txt").read_text() == "where the PDFs came from"
    assert sorted(p.name for p in (out / "train").glob("*.parquet")) == ["data-00000-of-00001.parquet"]


def test_an_output_folder_holding_the_dataset_is_refused_and_left_as_it_was(prepared, tmp_path, capsys):
    # found: `--dataset OUT/train --output-dir OUT` left one parquet file in OUT (train/, eval/ and the reports gone)
    from tests.pdf_fixtures import tree_hashes

    out = tmp_path / "out"
    shutil.copytree(prepared.out, out)
    before = tree_hashes(out)
    for target, extra in ((out, []), (out, ["--overwrite"]), (out / "train", []), (out / "train" / "neg", [])):
        code = run_script_in_process("scripts/mine_hard_negatives.py", "--model-path", "embedded:tiny-internvl3_5",
                                     "--dataset", str(out / "train"), "--output-dir", str(target), *extra)
        err = capsys.readouterr().err
        assert code == 2
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert f"--output-dir {target}" in line and f"--dataset {out / 'train'}" in line
        assert tree_hashes(out) == before


def test_in_place_mining_refuses_a_folder_that_also_holds_another_split(prepared, tmp_path, capsys):
    # a Hub snapshot's data/ holds train-* and test-*: rewriting "train" in place would have deleted the test files
    from tests.pdf_fixtures import tree_hashes

    data = tmp_path / "snapshot" / "data"
    data.mkdir(parents=True)
    rows = load_pairs(str(prepared.out / "train"), "train")
    rows.select(range(4)).to_parquet(str(data / "train-00000-of-00001.parquet"))
    rows.select(range(4, 6)).to_parquet(str(data / "test-00000-of-00001.parquet"))
    before = tree_hashes(data)
    code = run_script_in_process("scripts/mine_hard_negatives.py", "--model-path", "embedded:tiny-internvl3_5",
                                 "--dataset", str(data), "--split", "train")
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and "several splits (test, train)" in line and "--output-dir" in line
    assert tree_hashes(data) == before


def test_a_non_empty_output_folder_needs_overwrite_which_keeps_other_files(prepared, colintern_home, tmp_path):
    target = tmp_path / "neg"
    target.mkdir()
    (target / "README.md").write_text("the user's notes")
    config = {"model_path": "embedded:tiny-internvl3_5", "dataset": str(prepared.out), "top_k": 1,
              "output_dir": str(target), "max_num_visual_tokens": 16}
    with pytest.raises(ColinternError, match=r"neg is not empty .*--overwrite"):
        mine_hard_negatives(MiningConfig(**config))
    mine_hard_negatives(MiningConfig(**config, overwrite=True))
    assert len(load_pairs(str(target), "train")[0]["negatives"]) == 1
    mine_hard_negatives(MiningConfig(**{**config, "top_k": 2}, overwrite=True))  # its own files: replaced
    assert len(load_pairs(str(target), "train")[0]["negatives"]) == 2
    assert (target / "README.md").read_text() == "the user's notes"
    assert sorted(p.name for p in target.iterdir()) == [".colintern-output", "README.md", "data-00000-of-00001.parquet"]


# ---------------------------------------------------------------------------------------------------- training
def test_negative_ce_trains_on_the_mined_negatives_with_ndcg_on_the_held_out_documents(mined, tmp_path):
    out, _ = mined
    run = tmp_path / "run"
    # --dataset OUT: the pairs of OUT/train, and OUT/eval (a retrieval split without negatives) for evaluation
    code = run_script_in_process("scripts/train.py", "--preset", "demo", "--dataset", str(out), "--eval-split", "eval",
                                 "--loss", "negative-ce", "--num-negatives", "2", "--max-steps", "2",
                                 "--eval-steps", "2", "--batch-size", "4", "--num-workers", "0", "--logging-steps",
                                 "1", "--output-dir", str(run))
    assert code == 0
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses and all(0 < loss < float("inf") for loss in losses)
    evaluated = [entry for entry in history if "eval_ndcg_at_5" in entry]
    assert evaluated and 0.0 <= evaluated[-1]["eval_ndcg_at_5"] <= 1.0 and evaluated[-1]["eval_loss"] > 0


def test_negative_rows_point_into_the_whole_split_when_training_on_a_subsample(mined, tiny_retriever, tmp_path):
    from colintern.training.arguments import RunConfig
    from colintern.data.pairs import build_datasets

    out, _ = mined
    full = load_pairs(str(out / "train"), "train")
    config = RunConfig.from_dict({
        "model": {"name_or_path": "embedded:tiny-internvl3_5", "max_num_visual_tokens": 16},
        "data": {"dataset": str(out / "train"), "eval_split": None, "max_train_samples": 8, "num_negatives": 2},
        "training": {"loss": "negative-ce", "output_dir": str(tmp_path)},
    })  # fmt: skip
    data = build_datasets(config, tiny_retriever[1], use_negatives=True)
    assert len(data.train_dataset) == 8
    for row in range(len(full)):
        assert data.collator.page_source[row] == full[row]["image"]
