"""Where the model looks: each query token's similarity to every patch of a page, drawn over the page.

colpali-engine's interpretability helpers (`colpali_engine.interpretability`) assume one patch grid per page. An
InternVL page is a grid of tiles (`ColIntern3_5Processor.tile_grid`), each giving `image_seq_length` tokens in
row-major order (a side x side square after the pixel shuffle), tiles in row-major order, then a thumbnail tile of the
whole page when there is more than one tile. `similarity_maps` puts the tile tokens back at their place on the page
(the thumbnail's are left out, as `get_n_patches` leaves them out); the tiler resizes the page onto the whole grid, so
the map covers the page exactly. (The helpers also need einops and seaborn, which colintern does not install.)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from colintern.utils import ColinternError

MAX_TOKENS_SHOWN = 24  # panels per PNG beyond the page itself


def query_token_labels(processor, text: str) -> tuple[list[str], list[int]]:
    """(label, position in the query's embeddings) of each token of `text` itself (the query prefix and the
    augmentation tokens that `format_query` adds are left out)."""
    formatted = processor.format_query(text)
    start = formatted.index(text) if text else len(formatted)
    stop = start + len(text)
    encoded = processor.tokenizer(formatted, add_special_tokens=True, return_offsets_mapping=True)
    labels, positions = [], []
    for position, (begin, end) in enumerate(encoded["offset_mapping"]):
        if end > begin and begin < stop and end > start:
            labels.append(formatted[max(begin, start) : min(end, stop)].strip() or "␣")
            positions.append(position)
    if not positions:
        raise ColinternError("The query has no tokens to explain: give some text.")
    return labels, positions


def similarity_maps(
    query: torch.Tensor, page: torch.Tensor, processor, image_size: tuple[int, int]
) -> torch.Tensor:
    """(query tokens, rows * side, columns * side) similarities of each query token to each page patch, float32.

    `page` holds the page's image-token embeddings as the encoder returns them (tiles, then the thumbnail);
    `image_size` = (width, height) of the page image that was encoded (it fixes the tile grid).
    """
    columns, rows = processor.tile_grid(image_size)
    side = math.isqrt(processor.image_seq_length)
    if side * side != processor.image_seq_length:
        raise ValueError(f"image_seq_length {processor.image_seq_length} is not a square number of patches")
    expected = processor.n_tiles(image_size) * processor.image_seq_length
    if page.shape[0] != expected:
        raise ColinternError(
            f"The page has {page.shape[0]} embeddings, but a {image_size[0]}x{image_size[1]} page gives {expected} "
            "with this processor: the index was built with other tiling settings; rebuild it."
        )
    similarities = query.float() @ page.float().T  # (query tokens, page tokens)
    grid = similarities[:, : columns * rows * side * side]
    # (q, tile row, tile column, patch row, patch column) -> (q, tile row, patch row, tile column, patch column)
    grid = grid.reshape(-1, rows, columns, side, side).permute(0, 1, 3, 2, 4)
    return grid.reshape(-1, rows * side, columns * side)


def plot_similarity_maps(
    page: Image.Image, maps: torch.Tensor, labels: list[str], output: Path, title: str = ""
) -> Path:
    """A PNG: the page, then one panel per query token with its map over the page (one colour scale for all tokens,
    so a token that matches nowhere stays dark) and its best similarity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(len(labels), MAX_TOKENS_SHOWN)
    low, high = float(maps[:shown].min()), float(maps[:shown].max())
    panels = shown + 1
    columns = min(panels, 6)
    rows = math.ceil(panels / columns)
    aspect = page.height / page.width
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.4 * aspect * rows + 0.6), squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    extent = (0, page.width, page.height, 0)
    axes.flat[0].imshow(page)
    axes.flat[0].set_title("page", fontsize=9)
    for i in range(shown):
        axis = axes.flat[i + 1]
        axis.imshow(page)
        axis.imshow(maps[i].numpy(), cmap="magma", alpha=0.6, extent=extent, interpolation="bicubic",
                    vmin=low, vmax=high if high > low else low + 1e-6)
        axis.set_title(f"{labels[i][:18]} ({float(maps[i].max()):.2f})", fontsize=9)
    if len(labels) > shown:
        title += f"  (first {shown} of {len(labels)} query tokens)"
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(output)
    return output
