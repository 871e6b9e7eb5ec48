"""Own documents: real PDFs (multi-page, encrypted, corrupt, empty) and page images -> training pairs + an mteb task.

The prepared folder is built once per session (tests/pdf_fixtures.py) with the real script; training and evaluation
run on it through scripts/train.py and scripts/evaluate.py with the tiny real model.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil

import datasets
import pytest
from PIL import Image

from colintern.data.documents import (
    Document,
    PageRenderer,
    PrepareConfig,
    normalize_query,
    prepare_dataset,
    split_documents,
)
from colintern.utils import ColinternError

from tests.conftest import REPO_ROOT
from tests.pdf_fixtures import (
    EXPECTED_BAD,
    GOOD_PDFS,
    IMAGE_FOLDER,
    _page,
    build_documents,
    prepared_folder,
    run_script,
    run_script_in_process,
    tree_hashes,
    write_pdf,
    write_queries,
)


def read_table(path):
    return datasets.Dataset.from_parquet(str(path))


# ---------------------------------------------------------------------------------------------------- the report
def test_every_bad_input_is_one_report_line_and_the_rest_is_processed(prepared):
    report = json.loads((prepared.out / "report.json").read_text())
    assert report["problem_counts"] == EXPECTED_BAD
    assert len(report["problems"]) == sum(EXPECTED_BAD.values())
    by_kind = {p["kind"]: p for p in report["problems"]}
    assert by_kind["encrypted_pdf"]["file"] == "locked.pdf" and "password" in by_kind["encrypted_pdf"]["message"]
    assert by_kind["corrupt_pdf"]["file"] == "broken.pdf"
    assert by_kind["empty_pdf"]["file"] == "empty.pdf"
    assert by_kind["missing_file"]["line"] == 6
    # the console has one line per problem, in the same words
    console = prepared.console
    for problem in report["problems"]:
        assert sum(problem["message"] in line for line in console.splitlines()) >= 1, problem
    assert "Traceback" not in console
    # everything else was processed
    good = len(prepared.records)
    assert report["counts"]["queries"] == good
    assert report["counts"]["train_pairs"] + report["counts"]["eval_queries"] == good


def test_strict_makes_any_problem_fatal(prepared, tmp_path):
    out = tmp_path / "strict"
    done = run_script("scripts/prepare_dataset.py", "--pdfs", str(prepared.documents), "--queries",
                      str(prepared.queries), "--output-dir", str(out), "--dpi", "72", "--strict")
    assert done.returncode == 2
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "--strict" in error_lines[0] and "Traceback" not in done.stderr
    assert json.loads((out / "report.json").read_text())["problems"]
    assert not (out / "train").exists() and not (out / "eval").exists()


def test_missing_query_columns_and_unknown_formats_are_clear_errors(prepared, tmp_path):
    bad = tmp_path / "q.csv"
    bad.write_text("question,file,page\nhello,gamma.pdf,1\n")
    with pytest.raises(ColinternError, match="no 'query' column"):
        prepare_dataset(PrepareConfig(prepared.documents, bad, tmp_path / "o1"))
    (tmp_path / "q.xlsx").write_bytes(b"PK")
    with pytest.raises(ColinternError, match="unknown format"):
        prepare_dataset(PrepareConfig(prepared.documents, tmp_path / "q.xlsx", tmp_path / "o2"))
    with pytest.raises(ColinternError, match="Documents folder not found"):
        prepare_dataset(PrepareConfig(tmp_path / "nowhere", prepared.queries, tmp_path / "o3"))


# ---------------------------------------------------------------------------------------------------- the split
def test_split_is_by_document_and_covers_every_page_of_eval_documents(prepared):
    manifest = json.loads((prepared.out / "manifest.json").read_text())
    train_docs, eval_docs = set(manifest["train_documents"]), set(manifest["eval_documents"])
    assert train_docs and eval_docs and not train_docs & eval_docs
    train = read_table(prepared.out / "train" / "data-00000-of-00001.parquet")
    assert set(train["document"]) <= train_docs

    corpus = read_table(prepared.out / "eval" / "corpus.parquet")
    queries = read_table(prepared.out / "eval" / "queries.parquet")
    qrels = read_table(prepared.out / "eval" / "qrels.parquet")
    pages_of = {doc_id: n for doc_id, n in GOOD_PDFS.items()} | {IMAGE_FOLDER[0]: IMAGE_FOLDER[1], "poster.png": 1}
    assert len(corpus) == sum(pages_of[d] for d in eval_docs)  # every page, not only the queried ones
    assert set(manifest["eval_corpus_pages"]) == set(corpus["id"])
    placed = {page.split("#")[0] for pages in manifest["eval_corpus_pages"].values() for page in pages}
    assert placed == eval_docs
    assert len(queries) == len(qrels) and set(qrels["query-id"]) == set(queries["id"])
    assert set(qrels["corpus-id"]) <= set(corpus["id"]) and set(qrels["score"]) == {1}
    # each eval query's relevant page is the page its line named
    page_of_id = manifest["eval_corpus_pages"]
    expected = {normalize_query(r["query"]): f"{r['file']}#page={r.get('page', 1)}" for r in prepared.records}
    text_of = dict(zip(queries["id"], queries["text"]))
    for qid, cid in zip(qrels["query-id"], qrels["corpus-id"]):
        assert expected[normalize_query(text_of[qid])] in page_of_id[cid]
    # ids are content hashes: nothing in them relates to relevance
    assert all(cid.startswith("p-") and len(cid) == 18 for cid in corpus["id"])


def doc(doc_id: str, sha: str | None = None) -> Document:
    return Document(doc_id, "pdf", REPO_ROOT, 1, sha or hashlib.sha256(doc_id.encode()).hexdigest())


def test_split_is_deterministic_order_independent_and_keeps_identical_files_together():
    documents = [doc(f"doc{i}.pdf") for i in range(20)] + [doc("copy-a.pdf", "same"), doc("copy-b.pdf", "same")]
    queried = {d.id for d in documents}
    train, held_out = split_documents(documents, queried, 0.25, seed=0)
    assert len(held_out) in (5, 6) and not train & held_out and train | held_out == queried
    shuffled = documents[:]
    random.Random(1).shuffle(shuffled)
    assert split_documents(shuffled, queried, 0.25, seed=0) == (train, held_out)
    assert split_documents(documents, queried, 0.25, seed=1) != (train, held_out)
    assert ({"copy-a.pdf", "copy-b.pdf"} <= train) or ({"copy-a.pdf", "copy-b.pdf"} <= held_out)
    assert split_documents(documents, queried, 1.0, seed=0)[0] == set()
    assert split_documents(documents, queried, 0.0, seed=0)[1] == set()
    two = documents[:2]
    assert [len(s) for s in split_documents(two, {d.id for d in two}, 0.01, seed=0)] == [1, 1]  # never an empty eval


# ---------------------------------------------------------------------------------------------------- pages
def test_training_pairs_have_the_colpali_train_set_columns_and_the_named_pages(prepared):
    train = read_table(prepared.out / "train" / "data-00000-of-00001.parquet")
    assert {"query", "image", "image_filename", "answer", "source"} <= set(train.column_names)
    assert isinstance(train.features["image"], datasets.Image)
    row = train[0]
    assert row["image_filename"] == f"{row['document']}#page={row['page']}"
    assert row["image"].size == (96, 128)  # 96x128 pt at 72 dpi
    assert set(train["source"]) == {"documents"}
    # an image-folder document's pages are in natural order: page 1 is page-5.png, page 2 is page-10.png
    memo = [r for r in train if r["document"] == IMAGE_FOLDER[0]]
    for r in memo:
        original = Image.open(prepared.documents / IMAGE_FOLDER[0] / f"page-{r['page'] * 5}.png").convert("RGB")
        assert list(r["image"].convert("RGB").getdata()) == list(original.getdata())


def test_dpi_scales_the_rendering_and_jpeg_is_smaller(prepared, tmp_path):
    config = PrepareConfig(prepared.documents, prepared.queries, tmp_path / "o", dpi=144, image_format="jpeg",
                           jpeg_quality=70)
    renderer = PageRenderer(config)
    documents = {"gamma.pdf": Document("gamma.pdf", "pdf", prepared.documents / "gamma.pdf", 3,
                                       hashlib.sha256((prepared.documents / "gamma.pdf").read_bytes()).hexdigest())}
    from colintern.data.documents import ProblemLog

    pages = renderer.render(documents["gamma.pdf"], [1, 2], ProblemLog())
    assert all(path.is_relative_to(tmp_path / "o" / ".page-cache") for path in pages.values())
    image = Image.open(pages[1])
    assert image.format == "JPEG" and image.size == (192, 256)
    png = PageRenderer(PrepareConfig(prepared.documents, prepared.queries, tmp_path / "p", dpi=144))
    assert pages[1].stat().st_size < png.render(documents["gamma.pdf"], [1], ProblemLog())[1].stat().st_size
    capped = PageRenderer(PrepareConfig(prepared.documents, prepared.queries, tmp_path / "q", dpi=600, max_side=200))
    assert max(Image.open(capped.render(documents["gamma.pdf"], [1], ProblemLog())[1]).size) == 200


def test_pages_without_colour_are_stored_as_greyscale_losslessly(tmp_path):
    from PIL import ImageDraw

    page = Image.new("RGB", (64, 80), "white")
    ImageDraw.Draw(page).text((4, 4), "grey text", fill=(40, 40, 40))
    renderer = PageRenderer(PrepareConfig(tmp_path, tmp_path / "q.jsonl", tmp_path / "o"))
    stored = Image.open(io.BytesIO(renderer._encode(page)))
    assert stored.mode == "L" and list(stored.convert("RGB").getdata()) == list(page.getdata())
    page.putpixel((0, 0), (255, 0, 0))
    assert Image.open(io.BytesIO(renderer._encode(page))).mode == "RGB"


def test_rerun_reuses_rendered_pages_and_writes_identical_files(prepared, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(prepared.out, out)  # same inputs, same cache
    before = tree_hashes(out)
    result = prepare_dataset(PrepareConfig(prepared.documents, prepared.queries, out, dpi=72, eval_fraction=0.3,
                                           overwrite=True))  # a re-run into its own output folder
    assert result.counts["pages_from_cache"] == result.counts["pages_rendered"] > 0
    assert tree_hashes(out) == before
    # and from an empty cache the files are the same too
    fresh = prepare_dataset(PrepareConfig(prepared.documents, prepared.queries, tmp_path / "fresh", dpi=72,
                                          eval_fraction=0.3))
    assert fresh.counts["pages_from_cache"] == 0
    assert tree_hashes(tmp_path / "fresh") == before


def test_summary_prints_the_dataset_size(prepared):
    assert "train/" in prepared.stdout and "eval/" in prepared.stdout and "KB" in prepared.stdout


def test_csv_queries_and_eval_only(prepared, tmp_path):
    csv_file = tmp_path / "queries.csv"
    csv_file.write_text('\ufeffquery,file,page,answer\n"first, with a comma",gamma.pdf,1.0,x\nsecond,delta.pdf,2,\n',
                        encoding="utf-8")
    result = prepare_dataset(PrepareConfig(prepared.documents, csv_file, tmp_path / "o", dpi=72, eval_fraction=1.0))
    assert result.train_dir is None and result.counts["eval_queries"] == 2
    queries = read_table(tmp_path / "o" / "eval" / "queries.parquet")
    assert sorted(queries["text"]) == ["first, with a comma", "second"]
    assert json.loads((tmp_path / "o" / "eval" / "task.json").read_text())["name"] == "DocumentsRetrieval"


# ---------------------------------------------------------------------------------------------------- downstream
def test_demo_preset_trains_on_the_prepared_pairs(prepared, trained_on_prepared):
    assert (trained_on_prepared / "model.safetensors").is_file()
    run_record = json.loads((trained_on_prepared / "colintern_run.json").read_text())
    assert run_record["data"]["dataset"] == str(prepared.out / "train")
    data_report = json.loads((trained_on_prepared / "data_report.json").read_text())
    assert data_report["rows"] == prepared.counts["train_pairs"] and data_report["bad_rows"] == 0


def test_evaluate_script_scores_the_prepared_task(prepared, trained_on_prepared, tmp_path):
    done = run_script("scripts/evaluate.py", "--model-path", str(trained_on_prepared), "--benchmarks",
                      str(prepared.out / "eval"), "--output-dir", str(tmp_path), "--batch-size", "8", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    (result_file,) = tmp_path.glob("results/*/*/DocumentsRetrieval.json")
    scores = json.loads(result_file.read_text())["scores"]["test"][0]
    assert 0.0 <= scores["ndcg_at_5"] <= 1.0 and 0.0 <= scores["recall_at_100"] <= 1.0
    assert scores["recall_at_100"] == pytest.approx(1.0)  # the corpus has fewer than 100 pages
    assert "DocumentsRetrieval" in done.stdout


@pytest.fixture(scope="module")
def trained_on_prepared(prepared, colintern_home, tmp_path_factory):
    """The demo preset on OUT/train, 2 steps, through scripts/train.py."""
    out = tmp_path_factory.mktemp("trained") / "run"
    code = run_script_in_process("scripts/train.py", "--preset", "demo", "--dataset", str(prepared.out / "train"),
                                 "--max-steps", "2", "--batch-size", "4", "--num-workers", "0",
                                 "--output-dir", str(out))
    assert code == 0
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_folder(tmp_path_factory)


def test_fixture_documents_are_what_the_tests_expect(tmp_path):
    folder, records = build_documents(tmp_path)
    assert len(records) == sum(GOOD_PDFS.values()) + IMAGE_FOLDER[1] + 1
    queries = write_queries(tmp_path / "q.jsonl", records)
    assert len(queries.read_text().splitlines()) == len(records) + 6 + 2


def test_an_unreadable_image_keeps_page_numbers_and_distractors_join_the_eval_corpus(tmp_path):
    folder = tmp_path / "docs"
    (folder / "scan").mkdir(parents=True)
    colours = ["red", "green", "blue"]
    for page, colour in enumerate(colours, start=1):
        Image.new("RGB", (40, 50), colour).save(folder / "scan" / f"{page}.png")
    (folder / "scan" / "2.png").write_bytes(b"\x89PNG broken")
    Image.new("RGB", (40, 50), "yellow").save(folder / "cover.png")  # a document nobody asks about
    Image.new("RGB", (40, 50), "purple").save(folder / "asked.png")
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in [
        {"query": "the blue page", "file": "scan", "page": 3},
        {"query": "the broken page", "file": "scan", "page": 2},
        {"query": "the purple page", "file": "asked.png"},
    ]))  # fmt: skip
    result = prepare_dataset(PrepareConfig(folder, queries, tmp_path / "out", eval_fraction=0.5, distractors=True,
                                           seed=0))
    assert (result.train_documents, result.eval_documents) == (["scan"], ["asked.png"])  # seed 0 puts them so
    assert sorted(p.kind for p in result.problems) == ["unreadable_image", "unusable_page"]
    assert result.counts["distractor_documents"] == 1 and result.counts["queries"] == 2
    (blue,) = read_table(tmp_path / "out" / "train" / "data-00000-of-00001.parquet")
    assert blue["page"] == 3 and blue["image"].convert("RGB").getpixel((0, 0)) == (0, 0, 255)  # 3.png, not the 3rd
    corpus = read_table(tmp_path / "out" / "eval" / "corpus.parquet")  # the asked page and the distractor
    assert sorted(row["image"].convert("RGB").getpixel((0, 0)) for row in corpus) == [(128, 0, 128), (255, 255, 0)]


# ---------------------------------------------------------------------------------------------------- output folder
def _small_collection(root):
    """Two one-document sub-folders (the user's own train/ and eval/ split) and a queries file."""
    docs = root / "docs"
    write_pdf(docs / "train" / "a.pdf", [_page(0, 1), _page(0, 2)])
    write_pdf(docs / "eval" / "b.pdf", [_page(1, 1)])
    queries = root / "queries.jsonl"
    queries.write_text(json.dumps({"query": "first", "file": "train/a.pdf", "page": 1}) + "\n"
                       + json.dumps({"query": "second", "file": "eval/b.pdf", "page": 1}) + "\n")
    return docs, queries


@pytest.mark.parametrize("where", ["same", "inside", "inside-overwrite"])
def test_an_output_folder_on_the_documents_is_refused_and_nothing_is_deleted(tmp_path, capsys, where):
    # found: `--pdfs docs --output-dir docs` replaced docs/train and docs/eval (the user's PDFs) and exited 0
    docs, queries = _small_collection(tmp_path)
    before = tree_hashes(docs)
    out = docs if where == "same" else docs / "prepared"
    extra = ["--overwrite"] if where.endswith("overwrite") else []
    code = run_script_in_process("scripts/prepare_dataset.py", "--pdfs", str(docs), "--queries", str(queries),
                                 "--output-dir", str(out), "--dpi", "72", *extra)
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"--output-dir {out}" in line and f"--pdfs {docs}" in line and "Traceback" not in err
    assert tree_hashes(docs) == before and sorted(p.name for p in docs.iterdir()) == ["eval", "train"]


def test_an_output_folder_holding_the_queries_file_is_refused(tmp_path):
    docs, queries = _small_collection(tmp_path)
    out = tmp_path / "project"
    out.mkdir()
    queries = queries.rename(out / "queries.jsonl")
    with pytest.raises(ColinternError, match=r"project contains the input --queries .*queries.jsonl"):
        prepare_dataset(PrepareConfig(docs, queries, out, dpi=72, overwrite=True))
    assert [p.name for p in out.iterdir()] == ["queries.jsonl"]


def test_a_non_empty_output_folder_needs_overwrite_which_replaces_only_prepare_datasets_own_files(tmp_path):
    docs, queries = _small_collection(tmp_path)
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "mine.pdf").write_bytes(b"%PDF- the user's")
    (out / "notes.txt").write_text("the user's notes")
    with pytest.raises(ColinternError, match=r"is not empty .*--overwrite"):
        prepare_dataset(PrepareConfig(docs, queries, out, dpi=72, eval_fraction=0.5))
    with pytest.raises(ColinternError, match=r"out/train was not written by prepare_dataset"):
        prepare_dataset(PrepareConfig(docs, queries, out, dpi=72, eval_fraction=0.5, overwrite=True))
    assert (out / "train" / "mine.pdf").read_bytes() == b"%PDF- the user's"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train"]

    (out / "train" / "mine.pdf").unlink()
    (out / "train").rmdir()
    first = prepare_dataset(PrepareConfig(docs, queries, out, dpi=72, eval_fraction=0.5, overwrite=True))
    assert first.counts["train_pairs"] == 1 and first.counts["eval_queries"] == 1
    again = prepare_dataset(PrepareConfig(docs, queries, out, dpi=72, eval_fraction=0.5, overwrite=True, seed=1))
    assert again.counts["train_pairs"] + again.counts["eval_queries"] == 2  # its own output: replaced
    assert (out / "notes.txt").read_text() == "the user's notes"
    with pytest.raises(ColinternError, match="is not empty"):  # and never without being asked
        prepare_dataset(PrepareConfig(docs, queries, out, dpi=72))


def test_an_empty_pdf_read_after_an_encrypted_one_is_reported_as_empty(tmp_path):
    # found: pdfium's error code is process-wide, so the 0-page PDF inherited the encrypted one's "password" error
    import pypdf

    from colintern.data.documents import ProblemLog, open_documents

    folder = tmp_path / "docs"
    write_pdf(folder / "a-locked.pdf", [_page(0, 1)])
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(folder / "a-locked.pdf"))
    writer.encrypt("secret", algorithm="RC4-128")
    with open(folder / "a-locked.pdf", "wb") as handle:
        writer.write(handle)
    with open(folder / "b-empty.pdf", "wb") as handle:
        pypdf.PdfWriter().write(handle)
    write_pdf(folder / "d-good.pdf", [_page(1, 1)])
    (folder / "c-broken.pdf").write_bytes((folder / "d-good.pdf").read_bytes()[:40])
    problems = ProblemLog()
    documents, unusable = open_documents(folder, problems)
    assert [d.id for d in documents] == ["d-good.pdf"]
    assert [(p.file, p.kind) for p in problems.problems] == [
        ("a-locked.pdf", "encrypted_pdf"), ("b-empty.pdf", "empty_pdf"), ("c-broken.pdf", "corrupt_pdf"),
    ]  # fmt: skip
    assert "password" not in problems.problems[2].message
    assert unusable == {"a-locked.pdf", "b-empty.pdf", "c-broken.pdf"}
