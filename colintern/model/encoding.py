"""Encoding pages and queries in batches, shared by evaluation, training and benchmarks.

Pages are batched by tile count: every page in a batch is cut into the same number of tiles, so every sequence has
the same length and no compute goes to padding (InternVL's dynamic tiling gives a page 1 to `max_patches + 1` tiles,
256 tokens each on InternVL3.5). Queries are batched by token length for the same reason. Embeddings are returned in
the caller's order, on the CPU, in 16-bit (`storage_dtype`), as a ragged list of (tokens, dim) tensors.

A page may be given as a PIL image (any mode; `colintern.data.pages.to_rgb` converts it), encoded image bytes, a
`{"bytes": ..., "path": ...}` dict (the `datasets.Image(decode=False)` form) or a file path. Pages are opened lazily
(the header only) to plan the batches, and decoded one batch at a time; an unreadable page raises a `ColinternError`
naming its id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from colintern.data.pages import PageInput, load_page, open_page
from colintern.utils import ColinternError



def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def plan_batches(costs: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most `batch_size` items that share the same cost (tile count or length).

    Items are sorted by cost (stable, so equal items keep their order); a batch never mixes costs, so no sequence
    in it is padded. Costs take few distinct values (a page has 1 to max_patches + 1 tiles), so few batches are
    smaller than `batch_size`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(costs)), key=costs.__getitem__)
    batches: list[list[int]] = []
    for index in order:
        if batches and len(batches[-1]) < batch_size and costs[batches[-1][0]] == costs[index]:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@contextmanager
def _keep_text_tokens(model, enabled: bool):
    """While encoding pages with text: the model keeps every token's embedding (the caller selects image and text
    tokens) instead of zeroing all but the image tokens."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not enabled or not hasattr(target, "mask_non_image_embeddings"):
        yield
        return
    before = target.mask_non_image_embeddings
    target.mask_non_image_embeddings = False
    try:
        yield
    finally:
        target.mask_non_image_embeddings = before


# ---------------------------------------------------------------------------------------------------- encoders
@torch.no_grad()
def encode_queries(
    model,
    processor,
    queries: Sequence[str],
    batch_size: int = 32,
    progress: bool = False,
    storage_dtype: torch.dtype = torch.float16,
) -> list[torch.Tensor]:
    """Query embeddings as a list of (tokens, dim) CPU tensors in `storage_dtype`, padding removed, input order.

    Queries are batched by token count (no padding within a batch). An empty query is embedded from the query
    prefix and the augmentation tokens alone.
    """
    for index, query in enumerate(queries):
        if not isinstance(query, str):
            raise ColinternError(f"Query {index} is {type(query).__name__}, not text: give every query as a string.")
    device = _model_device(model)
    formatted = [processor.format_query(query) for query in queries]
    # Tokenized once: the lengths plan the batches and the same ids are padded per batch (tokenizing twice cost
    # 16-18% of query throughput; results/benchmarks/encode.md).
    token_ids = processor.tokenizer(formatted, add_special_tokens=True)["input_ids"]
    out: list[torch.Tensor | None] = [None] * len(queries)
    for batch in tqdm(plan_batches([len(ids) for ids in token_ids], batch_size), desc="Encoding queries",
                      disable=not progress):
        padded = processor.tokenizer.pad({"input_ids": [token_ids[i] for i in batch]}, return_tensors="pt")
        inputs = {"input_ids": padded["input_ids"].to(device), "attention_mask": padded["attention_mask"].to(device)}
        embeddings = model(**inputs)
        mask = inputs["attention_mask"].bool()
        for index, embedding, keep in zip(batch, embeddings, mask):
            out[index] = embedding[keep].to("cpu", storage_dtype)
    return out  # type: ignore[return-value]


@torch.no_grad()
def encode_pages(
    model,
    processor,
    pages: Sequence[PageInput],
    batch_size: int = 16,
    progress: bool = False,
    storage_dtype: torch.dtype = torch.float16,
    page_ids: Sequence[Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
    texts: Sequence[str] | None = None,
    max_text_tokens: int | None = None,
) -> list[torch.Tensor]:
    """Page embeddings (image tokens only) as a list of (n_tiles * tokens_per_tile, dim) CPU tensors, input order.

    With `texts` (a text per page, e.g. its OCR text), each page's prompt continues after the image with its text
    (cut to `max_text_tokens` tokens) and the embedding holds the image tokens followed by the text tokens: under
    causal attention the image tokens cannot see the text, so the text tokens (which see the whole image) carry it.
    Pages of a batch then differ in length and are left-padded, which (masked, with rotary positions) leaves every
    embedding as at batch size 1; `scripts/evaluate.py --check-invariance` checks it.

    Args:
        pages: PIL images in any mode, image bytes, `{"bytes", "path"}` dicts or paths; any indexable sequence
            (e.g. a lazy view over a `datasets.Dataset` column), read one batch at a time.
        batch_size: pages per forward pass; pages in a batch have the same tile count (see `plan_batches`).
        page_ids: names used in error messages (default: the position).
        on_batch: called with the number of pages after each batch (progress reporting).
    """
    n_pages = len(pages)
    ids = list(page_ids) if page_ids is not None else list(range(n_pages))
    if len(ids) != n_pages:
        raise ValueError(f"{len(ids)} page ids for {n_pages} pages")
    # Plan from the headers only: `Image.open` reads the size without decoding the pixels.
    n_tiles = []
    for index in range(n_pages):
        page = pages[index]
        image = open_page(page, ids[index])
        n_tiles.append(processor.n_tiles(image.size))
        if image is not page:  # opened here from bytes or a path: release the file now
            image.close()
    device = _model_device(model)
    out: list[torch.Tensor | None] = [None] * n_pages
    if texts is not None:
        if len(texts) != n_pages:
            raise ValueError(f"{len(texts)} texts for {n_pages} pages")
        lengths = [len(ids) for ids in processor.page_text_ids(list(texts), max_text_tokens)]
        by_length = sorted(range(n_pages), key=lambda i: (n_tiles[i], lengths[i]))  # little padding in a batch
        batches = [[by_length[j] for j in batch] for batch in plan_batches([n_tiles[i] for i in by_length], batch_size)]
    else:
        batches = plan_batches(n_tiles, batch_size)
    with tqdm(total=n_pages, desc="Encoding pages", unit="page", disable=not progress) as bar, _keep_text_tokens(
        model, texts is not None
    ):
        for batch in batches:
            images = [load_page(pages[i], ids[i]) for i in batch]
            if texts is None:
                inputs = processor.process_images(images).to(device)
                text_mask = None
            else:
                inputs = processor.process_images(images, [texts[i] for i in batch], max_text_tokens).to(device)
                text_mask = inputs.pop("text_mask")
            embeddings = model(**inputs)
            keep = processor.get_image_mask(inputs) & inputs["attention_mask"].bool()
            if text_mask is not None:
                keep = keep | (text_mask & inputs["attention_mask"].bool())
            for index, embedding, mask in zip(batch, embeddings, keep):
                out[index] = embedding[mask].to("cpu", storage_dtype)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(len(batch))
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- metrics
