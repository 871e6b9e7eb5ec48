import io
import json

import datasets
from PIL import Image

from colintern.data.synthdocs import (
    SynthDocsConfig,
    all_combinations,
    generate_retrieval_split,
    generate_train_rows,
    split_combinations,
)

SMALL = SynthDocsConfig(n_train=24, max_eval_pages=12)


def test_generation_is_deterministic_from_the_seed():
    assert generate_train_rows(SMALL) == generate_train_rows(SMALL)
    assert generate_retrieval_split(SMALL, "test") == generate_retrieval_split(SMALL, "test")
    other = generate_train_rows(SynthDocsConfig(seed=1, n_train=24))
    assert [r["image"]["bytes"] for r in other] != [r["image"]["bytes"] for r in generate_train_rows(SMALL)]


def test_splits_partition_the_attribute_combinations():
    splits = split_combinations(SynthDocsConfig())
    sets = {name: set(combos) for name, combos in splits.items()}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["validation"])
    assert not (sets["test"] & sets["validation"])
    assert set().union(*sets.values()) == set(all_combinations())
    assert len(sets["test"]) == round(0.15 * len(all_combinations()))


def test_training_rows_only_show_training_combinations():
    train_answers = {r["answer"] for r in generate_train_rows(SMALL)}
    held_out = {spec.describe() for name in ("test", "validation") for spec in split_combinations(SMALL)[name]}
    assert train_answers and not (train_answers & held_out)


def test_document_ids_carry_no_hint_of_relevance():
    split = generate_retrieval_split(SynthDocsConfig(max_eval_pages=40), "test")
    ids = [row["id"] for row in split["corpus"]]
    assert len(set(ids)) == len(ids) and all(len(i) == 12 for i in ids)
    # the corpus is sorted by id; the relevant page's position is unrelated to the query's position
    query_order = [row["id"] for row in split["queries"]]
    relevant = {row["query-id"]: row["corpus-id"] for row in split["qrels"]}
    positions = [ids.index(relevant[q]) for q in query_order]
    assert positions != sorted(positions)


def test_written_dataset_has_the_colpali_train_set_layout(small_synthdocs_dir):
    train = datasets.load_dataset(str(small_synthdocs_dir / "train"), split="train")
    assert {"query", "image", "image_filename", "answer", "source"} <= set(train.column_names)
    assert isinstance(train.features["image"], datasets.Image)
    assert isinstance(train[0]["image"], Image.Image) and train[0]["image"].mode == "RGB"
    for name, columns in {"corpus": {"id", "image"}, "queries": {"id", "text"}, "qrels": {"query-id", "corpus-id", "score"}}.items():
        table = datasets.load_dataset("parquet", data_files=str(small_synthdocs_dir / "test" / f"{name}.parquet"), split="train")
        assert columns <= set(table.column_names)
    manifest = json.loads((small_synthdocs_dir / "synthdocs.json").read_text())
    assert manifest["counts"]["train"] == 64 and manifest["counts"]["test"]["corpus"] == 24


def test_pages_look_like_documents():
    row = generate_train_rows(SMALL)[0]
    page = Image.open(io.BytesIO(row["image"]["bytes"]))
    assert page.size == (SMALL.page_width, SMALL.page_height)
    # mostly white paper
    white = sum(1 for p in page.getdata() if p == (255, 255, 255))
    assert white > 0.5 * page.width * page.height


def test_prepare_demo_never_replaces_a_synthdocs_folder_it_did_not_write(tmp_path, capsys):
    from tests.pdf_fixtures import run_script_in_process

    (tmp_path / "synthdocs").mkdir()
    (tmp_path / "synthdocs" / "my-data.parquet").write_bytes(b"the user's data")
    for extra in ([], ["--force"], ["--overwrite"]):
        code = run_script_in_process("scripts/prepare_demo.py", "--output-dir", str(tmp_path), *extra)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert "not empty" in err if not extra else "synthdocs was not written by prepare_demo" in err
        assert (tmp_path / "synthdocs" / "my-data.parquet").read_bytes() == b"the user's data"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["synthdocs"]


def test_domains_split_the_corpus_by_colour_and_leave_the_whole_corpus_as_it_was():
    from colintern.data.synthdocs import DOMAIN_B_COLOURS
    from colintern.evaluation.tasks import synthdocs_revision

    by_domain = {d: split_combinations(SynthDocsConfig(domain=d)) for d in ("a", "b")}
    combos = {d: {spec for split in splits.values() for spec in split} for d, splits in by_domain.items()}
    assert not (combos["a"] & combos["b"]) and combos["a"] | combos["b"] == set(all_combinations())
    assert all(s.band not in DOMAIN_B_COLOURS and s.logo_colour not in DOMAIN_B_COLOURS for s in combos["a"])
    assert all(s.band in DOMAIN_B_COLOURS or s.logo_colour in DOMAIN_B_COLOURS for s in combos["b"])
    # domain B's held-out combinations are unseen in its own training split too
    b = {name: set(split) for name, split in by_domain["b"].items()}
    assert not (b["train"] & b["test"]) and len(b["test"]) == round(0.15 * len(combos["b"]))
    a_words = " ".join(r["query"] for r in generate_train_rows(SynthDocsConfig(domain="a", n_train=200)))
    assert not any(colour in a_words for colour in DOMAIN_B_COLOURS)  # the words are new to a domain-A model too
    # the whole corpus: same manifest config (no `domain` key) and the mteb revision it had before domains existed
    assert "domain" not in SynthDocsConfig().to_dict() and SynthDocsConfig(domain="b").to_dict()["domain"] == "b"
    assert synthdocs_revision() == "v1-0386f4a0691c"
    import hashlib

    whole = split_combinations(SynthDocsConfig())
    listing = repr([(name, [spec.describe() for spec in specs]) for name, specs in sorted(whole.items())])
    assert hashlib.sha1(listing.encode()).hexdigest() == "6eb66ee5e26e762008647b7a24761bd676287e7e"  # as before


def test_a_domain_folder_records_its_domain_and_resolves_by_alias(tmp_path):
    import pytest

    from colintern.data.synthdocs import read_manifest, resolve_dataset, write_synthdocs

    folder = write_synthdocs(tmp_path / "b", SynthDocsConfig(domain="b", n_train=8, max_eval_pages=4))
    assert read_manifest(folder)["config"]["domain"] == "b"
    test_queries = datasets.Dataset.from_parquet(str(folder / "test" / "queries.parquet"))
    assert all(any(c in q for c in ("purple", "brown")) for q in test_queries["text"])
    with pytest.raises(ValueError, match="domain"):
        SynthDocsConfig(domain="c")
    assert resolve_dataset("embedded:synthdocs-x") == "embedded:synthdocs-x"  # not an alias: passes through
