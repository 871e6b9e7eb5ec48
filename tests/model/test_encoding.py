import numpy as np
import pytest
import torch
from PIL import Image

from colintern.data.pages import load_page, open_page
from colintern.model.encoding import encode_pages, encode_queries, plan_batches
from colintern.model.scoring import max_sim
from colintern.utils import ColinternError
from tests.helpers import page_in_mode, png_bytes

MODES = ["RGBA", "P", "L", "CMYK", "I;16"]


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_is_converted_to_the_same_page(mode):
    reference = np.asarray(page_in_mode("RGB"), dtype=np.int16)
    page = page_in_mode(mode)
    assert page.mode == mode
    for given in (page, png_bytes(page, "TIFF" if mode == "CMYK" else "PNG")):  # in memory and as file bytes
        rgb = load_page(given, page_id="doc-1")
        assert rgb.mode == "RGB" and rgb.size == page.size
        converted = np.asarray(rgb, dtype=np.int16)
        if mode == "RGBA":  # half-transparent page composited onto white: lighter, white stays white
            assert (converted >= reference).all() and (converted[-1, -1] == 255).all()
        elif mode in ("L", "I;16"):  # greyscale: every channel equals the luminance
            assert (converted[..., 0] == converted[..., 1]).all() and abs(int(converted[70, 48, 0]) - 20) <= 1
        else:  # P (16-colour palette) and CMYK keep the colours
            assert np.abs(converted - reference).max() <= 2


def test_truncated_and_corrupt_pages_fail_naming_their_id():
    data = png_bytes(page_in_mode("RGB", (300, 400)))
    with pytest.raises(ColinternError, match=r"page 'scan-042'.*truncated"):
        load_page(data[: len(data) // 2], page_id="scan-042")
    with pytest.raises(ColinternError, match=r"page 'scan-043'"):
        open_page(b"not an image at all", page_id="scan-043")
    with pytest.raises(ColinternError, match=r"page 'scan-044'.*neither bytes nor a path"):
        open_page({"bytes": None, "path": None}, page_id="scan-044")


def test_batches_never_mix_tile_counts_and_cover_every_page():
    costs = [3, 1, 3, 7, 1, 1, 3, 7, 1]
    batches = plan_batches(costs, batch_size=2)
    assert sorted(i for batch in batches for i in batch) == list(range(len(costs)))
    assert all(len({costs[i] for i in batch}) == 1 and len(batch) <= 2 for batch in batches)
    # cheapest first, input order kept within a tile count: 4 one-tile pages, 3 three-tile pages, 2 seven-tile pages
    assert batches == [[1, 4], [5, 8], [0, 2], [6], [3, 7]]


def test_tile_bucketed_encoding_equals_page_by_page_encoding(tiny_retriever):
    model, processor = tiny_retriever
    processor.set_max_num_visual_tokens(64)  # up to 3 tiles + thumbnail: pages get 1 or 4 tiles
    try:
        sizes = [(128, 176), (400, 120), (96, 96), (120, 420), (128, 176), (300, 100)]
        pages = [page_in_mode("RGB", size) for size in sizes]
        tiles = [processor.n_tiles(size) for size in sizes]
        assert len(set(tiles)) > 1
        bucketed = encode_pages(model, processor, pages, batch_size=4)
        one_by_one = [encode_pages(model, processor, [page], batch_size=1)[0] for page in pages]
        for got, expected, n in zip(bucketed, one_by_one, tiles):
            assert got.dtype == torch.float16 and got.shape == (n * processor.image_seq_length, model.dim)
            torch.testing.assert_close(got.float(), expected.float(), atol=2e-3, rtol=0)
    finally:
        processor.set_max_num_visual_tokens(16)


def test_very_large_pages_are_bounded_by_the_tile_budget(tiny_retriever):
    model, processor = tiny_retriever
    processor.set_max_num_visual_tokens(64)
    try:
        huge = Image.new("RGB", (5000, 7000), (240, 240, 240))
        (embedding,) = encode_pages(model, processor, [huge])
        assert embedding.shape[0] == processor.n_image_tokens(huge.size) <= 64
    finally:
        processor.set_max_num_visual_tokens(16)


def test_empty_query_is_embedded_and_scored(tiny_retriever):
    model, processor = tiny_retriever
    queries = ["", "report with a red header", "   "]
    embeddings = encode_queries(model, processor, queries, batch_size=2)
    assert [e.shape[0] > processor.n_augmentation_tokens for e in embeddings] == [True] * 3
    scores = max_sim(embeddings, encode_pages(model, processor, [page_in_mode("RGB")]))
    assert torch.isfinite(scores).all()
    with pytest.raises(ColinternError, match="Query 1 is NoneType"):
        encode_queries(model, processor, ["fine", None])


def test_query_batching_keeps_the_input_order(tiny_retriever):
    model, processor = tiny_retriever
    queries = ["a", "a much longer query about a blue header and a pie chart", "b c", ""]
    batched = encode_queries(model, processor, queries, batch_size=3)
    for query, got in zip(queries, batched):
        (alone,) = encode_queries(model, processor, [query], batch_size=1)
        torch.testing.assert_close(got.float(), alone.float(), atol=2e-3, rtol=0)
