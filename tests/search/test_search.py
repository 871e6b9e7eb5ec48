"""Searching own documents: index (corrupt files skipped, resumable, incremental), query, similarity maps, web page.

The model is the shipped pretrained tiny retriever (trained on SynthDocs domain A); the PDFs hold held-out pages of
that domain, and each query is the one SynthDocs wrote for its page.
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from PIL import Image

from colintern.search import Searcher, build_index
from colintern.search.explain import query_token_labels, similarity_maps
from colintern.utils import ColinternError
from tests.pdf_fixtures import run_script_in_process
from tests.search.cdp import Browser, find_browser
from tests.search.synthdocs_pdfs import PRETRAINED, synthdocs_pdfs

N_PAGES, PAGES_PER_PDF = 24, 4  # 6 PDFs, plus broken.pdf


@pytest.fixture(scope="module")
def pretrained():
    from colintern.model.loading import load_retriever

    model, processor = load_retriever(PRETRAINED, device="cpu")
    return model.eval(), processor


@pytest.fixture(scope="module")
def built(tmp_path_factory, pretrained):
    """(pdf folder, index folder, (query, file, page) records, build stats) of a first build."""
    root = tmp_path_factory.mktemp("search")
    records = synthdocs_pdfs(root / "pdfs", N_PAGES, PAGES_PER_PDF)
    stats = build_index(root / "pdfs", root / "index", PRETRAINED, loaded=pretrained, progress=False)
    return root / "pdfs", root / "index", records, stats


def copy_of(built, tmp_path):
    pdfs, index, records, _ = built
    shutil.copytree(pdfs, tmp_path / "pdfs")
    shutil.copytree(index, tmp_path / "index")
    return tmp_path / "pdfs", tmp_path / "index", records


def hit_rate(searcher: Searcher, records, k: int = 5) -> float:
    found = 0
    for text, file, page in records:
        found += (file, page) in [(hit.document, hit.page) for hit in searcher.search(text, k)]
    return found / len(records)


def test_index_reports_the_corrupt_pdf_and_finds_the_right_pages(built, pretrained):
    _, index, records, stats = built
    assert stats.pages_encoded == stats.pages_indexed == N_PAGES
    assert stats.documents_encoded == N_PAGES // PAGES_PER_PDF
    assert len(stats.problems) == 1 and stats.problems[0].startswith("broken.pdf: not a readable PDF (pdfium:")
    manifest = json.loads((index / "index.json").read_text())
    assert [p["file"] for p in manifest["problems"]] == ["broken.pdf"] and "broken.pdf" not in manifest["documents"]

    searcher = Searcher(index, loaded=pretrained)
    hits = searcher.search(records[0][0], k=5)
    assert [hit.rank for hit in hits] == [1, 2, 3, 4, 5]
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    # the pretrained model answers held-out domain-A queries (NDCG@5 0.90); chance of top 5 of 24 pages: 0.21
    assert hit_rate(searcher, records) >= 0.9


def test_adding_a_pdf_encodes_only_that_pdf(built, pretrained, tmp_path, capsys):
    pdfs, index, records = copy_of(built, tmp_path)
    new = synthdocs_pdfs(tmp_path / "more", 3, pages_per_pdf=3, split="validation", name="added")
    shutil.copy(tmp_path / "more" / "added-000.pdf", pdfs / "added-000.pdf")

    stats = build_index(pdfs, index, loaded=pretrained, progress=False)  # the model recorded in the index
    assert (stats.pages_encoded, stats.documents_encoded, stats.documents_reused) == (3, 1, N_PAGES // PAGES_PER_PDF)
    assert stats.pages_indexed == N_PAGES + 3
    searcher = Searcher(index, loaded=pretrained)
    assert hit_rate(searcher, new) == 1.0  # 3 of 27 pages
    assert hit_rate(searcher, records) >= 0.9

    assert run_script_in_process("scripts/search.py", "index", str(pdfs), "--index", str(index)) == 0  # no --model
    summary = capsys.readouterr().out
    assert summary.startswith(f"{N_PAGES + 3} pages of 7 documents indexed: 0 pages of 0 documents encoded now, 7 "
                              "documents already indexed")
    assert "1 problem(s), skipped:\n  broken.pdf: not a readable PDF" in summary

    (pdfs / "added-000.pdf").unlink()
    removed = build_index(pdfs, index, loaded=pretrained, progress=False)
    assert (removed.pages_encoded, removed.documents_removed, removed.pages_indexed) == (0, 1, N_PAGES)
    assert len(list((index / "shards").glob("*.safetensors"))) == N_PAGES // PAGES_PER_PDF
    assert len([p for p in (index / "pages").rglob("*") if p.is_file()]) == N_PAGES


def test_an_interrupted_index_keeps_what_was_encoded(built, pretrained, tmp_path):
    pdfs, _, records, _ = built

    def interrupt_after_two_documents(stats):
        if stats.documents_encoded == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(pdfs, tmp_path / "index", PRETRAINED, loaded=pretrained, progress=False,
                    chunk_pages=PAGES_PER_PDF, on_chunk=interrupt_after_two_documents)
    assert len(list((tmp_path / "index" / "shards").glob("*.safetensors"))) == 2
    resumed = build_index(pdfs, tmp_path / "index", PRETRAINED, loaded=pretrained, progress=False)
    assert (resumed.documents_reused, resumed.pages_encoded) == (2, N_PAGES - 2 * PAGES_PER_PDF)
    # the resumed index ranks as the uninterrupted one
    whole, resumed_searcher = Searcher(built[1], loaded=pretrained), Searcher(tmp_path / "index", loaded=pretrained)
    for text, _, _ in records[:6]:
        assert [(h.document, h.page) for h in whole.search(text)] == [
            (h.document, h.page) for h in resumed_searcher.search(text)]


def test_an_index_is_only_searched_with_its_own_model(pretrained, tmp_path):
    from colintern.model.embedded import pretrained_model_path

    model_dir = tmp_path / "model"
    shutil.copytree(pretrained_model_path(), model_dir)
    synthdocs_pdfs(tmp_path / "pdfs", 4, PAGES_PER_PDF)
    build_index(tmp_path / "pdfs", tmp_path / "index", str(model_dir), loaded=pretrained, progress=False, dpi=100)
    # settings left out are the index's own; others are refused
    again = build_index(tmp_path / "pdfs", tmp_path / "index", loaded=pretrained, progress=False)
    assert again.pages_encoded == 0 and again.pages_indexed == 4
    with pytest.raises(ColinternError, match="was built with .'dpi': 100"):
        build_index(tmp_path / "pdfs", tmp_path / "index", loaded=pretrained, progress=False, dpi=150)
    config = json.loads((model_dir / "config.json").read_text())
    config["retrained"] = True  # same folder, another model
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ColinternError, match="built with another model"):
        build_index(tmp_path / "pdfs", tmp_path / "index", str(model_dir), loaded=pretrained, progress=False)
    with pytest.raises(ColinternError, match="has changed since the index was built"):
        Searcher(tmp_path / "index")
    with pytest.raises(ColinternError, match="no search index there"):
        Searcher(tmp_path / "pdfs")


def test_an_index_never_takes_over_a_folder_of_other_files(pretrained, tmp_path):
    synthdocs_pdfs(tmp_path / "pdfs", 4, PAGES_PER_PDF)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ColinternError, match="is not empty"):
        build_index(tmp_path / "pdfs", tmp_path / "mine", PRETRAINED, loaded=pretrained, progress=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_similarity_maps_put_each_tile_token_at_its_place_on_the_page(pretrained):
    import copy

    processor = copy.deepcopy(pretrained[1])
    processor.set_max_num_visual_tokens(7 * processor.image_seq_length)  # up to 6 tiles + thumbnail
    size = (256, 384)  # a portrait page: 2 columns x 3 rows of 128 px tiles
    columns, rows = processor.tile_grid(size)
    assert (columns, rows) == (2, 3)
    side = 4  # 16 tokens per tile
    n_tokens = processor.n_tiles(size) * processor.image_seq_length  # 6 tiles + thumbnail = 112 <= 128 dims
    page = torch.eye(128)[:n_tokens]  # token t is the unit vector e_t
    query = torch.eye(128)[: columns * rows * 16]  # query token t matches page token t only
    maps = similarity_maps(query, page, processor, size)
    assert maps.shape == (columns * rows * 16, rows * side, columns * side)
    for t in range(columns * rows * 16):
        tile, within = divmod(t, 16)
        expected = (tile // columns * side + within // side, tile % columns * side + within % side)
        assert torch.nonzero(maps[t]).tolist() == [list(expected)]
    with pytest.raises(ColinternError, match="other tiling settings"):
        similarity_maps(query, page[:-1], processor, size)


def test_query_token_labels_are_the_words_of_the_query(pretrained):
    processor = pretrained[1]
    text = "green header, red star logo and a pie chart"
    labels, positions = query_token_labels(processor, text)
    assert "".join(labels).replace(" ", "") == text.replace(" ", "")
    formatted = processor.format_query(text)
    n_tokens = len(processor.tokenizer(formatted)["input_ids"])
    assert 0 < positions[0] and positions[-1] < n_tokens - processor.n_augmentation_tokens


def test_query_command_prints_ranked_pages_and_writes_explanations(built, capsys, tmp_path):
    _, index, records, _ = built
    text, file, page = records[5]
    out = tmp_path / "explain"
    assert run_script_in_process("scripts/search.py", "query", "--index", str(index), text, "-k", "3",
                                 "--explain", str(out)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "file", "page"]
    first = lines[1].split()
    assert first[0] == "1" and float(first[1]) > float(lines[2].split()[1]) and (first[2], first[3]) == (file, str(page))
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 3 and pngs[0] == f"01-{file}-page{page}.png"
    with Image.open(out / pngs[0]) as image:
        assert image.width > 500  # the page and a panel per query token
    # a second query replaces the earlier explanations, never a file of the user's
    (out / "mine.png").write_bytes(b"mine")
    assert run_script_in_process("scripts/search.py", "query", "--index", str(index), records[0][0], "-k", "1",
                                 "--explain", str(out)) == 0
    assert sorted(p.name for p in out.glob("*.png")) == sorted([f"01-{records[0][1]}-page{records[0][2]}.png",
                                                                "mine.png"])


def test_search_page_in_a_headless_browser(built, pretrained, tmp_path):
    browser_path = find_browser()
    if browser_path is None:
        pytest.skip("no Chromium or Chrome installed (Debian: apt-get install chromium), so the page is not tested")
    from colintern.search.server import make_server

    _, index, records, _ = built
    searcher = Searcher(index, loaded=pretrained)
    server = make_server(searcher, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    browser = Browser(browser_path)
    try:
        text, file, page = records[7]
        browser.navigate(f"http://127.0.0.1:{server.server_address[1]}/")
        browser.wait_for("document.activeElement && document.activeElement.id === 'query'")
        browser.type_text(text)
        browser.press_enter()
        shown = browser.wait_for("(() => { const r = [...document.querySelectorAll('.result')]; return r.length === 5 "
                                 "&& r.map(e => [e.dataset.file, Number(e.dataset.page)]); })()")
        expected = [[hit.document, hit.page] for hit in searcher.search(text, 5)]
        assert shown == expected and [file, page] in shown
        assert browser.evaluate("document.querySelector('.result img').naturalWidth") > 0
        browser.click(".result")
        assert browser.wait_for("(() => { const e = document.getElementById('explain'); "
                                "return !e.hidden && e.complete && e.naturalWidth; })()") > 500
        assert "query=" not in browser.evaluate("location.search") and text.split()[0] in browser.evaluate(
            "decodeURIComponent(location.search)")
        shot = browser.screenshot(tmp_path / "search-page.png")
        with Image.open(shot) as image:
            assert image.format == "PNG" and image.width >= 800 and image.height >= 600
    finally:
        browser.close()
        server.shutdown()
        server.server_close()


def test_search_api_answers_json_pages_and_maps(built, pretrained):
    """The server's routes without a browser (so they are tested where no Chromium is installed)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from colintern.search.server import make_server

    _, index, records, _ = built
    searcher = Searcher(index, loaded=pretrained)
    server = make_server(searcher, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def get(path):
        try:
            with urllib.request.urlopen(base + path, timeout=120) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers["Content-Type"], error.read()

    try:
        text = records[3][0]
        status, kind, body = get("/api/search?" + urllib.parse.urlencode({"q": text, "k": 3}))
        assert (status, kind) == (200, "application/json")
        results = json.loads(body)["results"]
        assert [(r["file"], r["page"], r["rank"]) for r in results] == [
            (h.document, h.page, h.rank) for h in searcher.search(text, 3)]
        status, kind, body = get(results[0]["image"])
        assert (status, kind, body[:8]) == (200, "image/png", b"\x89PNG\r\n\x1a\n")
        status, kind, body = get(results[0]["explain"])
        assert (status, kind, body[:8]) == (200, "image/png", b"\x89PNG\r\n\x1a\n")
        assert get("/api/search?q=x&k=0")[0] == 400 and get("/api/search?k=3")[0] == 400
        assert get(f"/page/{len(searcher.entries)}.png")[0] == 404 and get("/page/..%2Findex.json")[0] == 404
        status, kind, body = get("/")
        assert status == 200 and b'id="query"' in body
    finally:
        server.shutdown()
        server.server_close()
