import io

import numpy as np
import pytest
import torch
from PIL import Image

from colintern.data.pages import to_rgb
from colintern.model.processing import max_tiles_for_budget


@pytest.mark.parametrize(
    ("budget", "tokens_per_tile", "expected"),
    [(256, 256, 1), (512, 256, 1), (768, 256, 2), (1536, 256, 5), (3328, 256, 12), (16, 16, 1), (64, 16, 3)],
)
def test_tile_budget_counts_the_thumbnail(budget, tokens_per_tile, expected):
    assert max_tiles_for_budget(budget, tokens_per_tile) == expected


def test_tile_budget_below_one_tile_is_an_error():
    with pytest.raises(ValueError, match="below one tile"):
        max_tiles_for_budget(100, 256)


@pytest.mark.parametrize("max_tokens", [16, 48, 64, 112, 208])
@pytest.mark.parametrize("size", [(192, 256), (256, 192), (128, 128), (900, 120), (64, 1000)])
def test_tiling_counts_match_the_processed_batch(tiny_retriever, max_tokens, size):
    _, processor = tiny_retriever
    processor.set_max_num_visual_tokens(max_tokens)
    try:
        batch = processor.process_images([Image.new("RGB", size, (200, 30, 30))])
        n_tiles = processor.n_tiles(size)
        assert batch["pixel_values"].shape[0] == n_tiles
        image_tokens = int(processor.get_image_mask(batch).sum())
        assert image_tokens == processor.n_image_tokens(size) == n_tiles * processor.image_seq_length
        assert image_tokens <= max_tokens
        columns, rows = processor.tile_grid(size)
        assert processor.get_n_patches(size) == (columns * 4, rows * 4)  # 16 tokens per tile: a 4 x 4 grid
    finally:
        processor.set_max_num_visual_tokens(16)


def test_batch_with_different_tile_counts(tiny_retriever):
    _, processor = tiny_retriever
    processor.set_max_num_visual_tokens(112)
    try:
        sizes = [(128, 128), (192, 600), (700, 128)]
        batch = processor.process_images([Image.new("RGB", s, "white") for s in sizes])
        assert batch["pixel_values"].shape[0] == sum(processor.n_tiles(s) for s in sizes)
        assert batch["input_ids"].shape[0] == 3
        # left padding: every row ends with real tokens
        assert bool(batch["attention_mask"][:, -1].all())
    finally:
        processor.set_max_num_visual_tokens(16)


def test_process_images_gives_exactly_what_the_internvl_processor_gives(tiny_retriever, tmp_path):
    """The cached-prompt fast path against `InternVLProcessor.__call__` on the page prompt, tile counts mixed."""
    from colintern.model.processing import ColIntern3_5Processor

    _, processor = tiny_retriever
    processor.set_max_num_visual_tokens(112)
    try:
        rng = np.random.default_rng(0)
        sizes = [(128, 128), (192, 600), (700, 128), (128, 176), (192, 600)]
        pages = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
        fast = processor.process_images(pages)
        reference = processor(
            text=[processor.visual_prompt_prefix] * len(pages), images=pages, padding="longest", return_tensors="pt",
            **processor._tiling_kwargs(),
        )
        for key in ("input_ids", "attention_mask", "pixel_values"):
            assert torch.equal(fast[key], reference[key]), key
        # the cache is not part of the saved processor
        processor.save_pretrained(tmp_path)
        assert "_prompt_ids_cache" not in "".join(p.read_text() for p in tmp_path.glob("*.json"))
        assert ColIntern3_5Processor.from_pretrained(tmp_path).process_images(pages[:1])["input_ids"].equal(
            fast["input_ids"][:1, -fast["attention_mask"][0].sum():]
        )
    finally:
        processor.set_max_num_visual_tokens(16)


def _image_in_mode(mode: str) -> Image.Image:
    rgb = Image.new("RGB", (40, 30), (10, 120, 240))
    if mode == "I;16":
        return Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "L", "1", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_any_pil_mode_becomes_rgb(mode):
    converted = to_rgb(_image_in_mode(mode))
    assert converted.mode == "RGB" and converted.size == (40, 30)


def test_transparency_is_composited_on_white_and_16_bit_is_rescaled():
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)


def test_truncated_file_fails_in_conversion():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buffer, format="PNG")
    truncated = Image.open(io.BytesIO(buffer.getvalue()[:60]))
    with pytest.raises(OSError):
        to_rgb(truncated)


def test_queries_get_prefix_and_augmentation_tokens_and_empty_queries_work(tiny_retriever):
    _, processor = tiny_retriever
    batch = processor.process_queries(["red header with a pie chart", ""])
    pad = processor.tokenizer.convert_tokens_to_ids(processor.query_augmentation_token)
    assert batch["input_ids"].shape[0] == 2
    # the last 10 tokens of every query are the augmentation token
    assert bool((batch["input_ids"][:, -10:] == pad).all())
    assert int(batch["attention_mask"][1].sum()) >= 11  # prefix + 10 augmentation tokens


def test_score_is_float32_queries_by_pages(tiny_retriever):
    _, processor = tiny_retriever
    qs = [torch.randn(5, 128, dtype=torch.bfloat16), torch.randn(3, 128, dtype=torch.bfloat16)]
    ps = [torch.randn(16, 128, dtype=torch.bfloat16)] * 4
    scores = processor.score(qs, ps)
    assert scores.shape == (2, 4) and scores.dtype == torch.float32
