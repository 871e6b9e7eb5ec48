"""Encoding pages and queries in batches, and ranking metrics, shared by evaluation, training and benchmarks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_queries(
    model,
    processor,
    queries: Sequence[str],
    batch_size: int = 32,
    progress: bool = False,
    storage_dtype: torch.dtype = torch.float16,
) -> list[torch.Tensor]:
    """Query embeddings as a list of (tokens, dim) CPU tensors in `storage_dtype`, padding removed."""
    device = _model_device(model)
    out: list[torch.Tensor] = []
    for start in tqdm(range(0, len(queries), batch_size), desc="Encoding queries", disable=not progress):
        batch = processor.process_queries(list(queries[start : start + batch_size])).to(device)
        embeddings = model(**batch)
        mask = batch["attention_mask"].bool()
        out.extend(e[m].to("cpu", storage_dtype) for e, m in zip(embeddings, mask))
    return out


@torch.no_grad()
def encode_pages(
    model,
    processor,
    pages: Sequence[Image.Image],
    batch_size: int = 16,
    progress: bool = False,
    storage_dtype: torch.dtype = torch.float16,
) -> list[torch.Tensor]:
    """Page embeddings (image tokens only) as a list of (tokens, dim) CPU tensors in `storage_dtype`."""
    device = _model_device(model)
    out: list[torch.Tensor] = []
    for start in tqdm(range(0, len(pages), batch_size), desc="Encoding pages", disable=not progress):
        batch = processor.process_images(list(pages[start : start + batch_size])).to(device)
        embeddings = model(**batch)
        keep = processor.get_image_mask(batch) & batch["attention_mask"].bool()
        out.extend(e[m].to("cpu", storage_dtype) for e, m in zip(embeddings, keep))
    return out


def rank_of(scores: torch.Tensor, index: int) -> int:
    """1-based rank of `scores[index]`, counting ties against it (pessimistic, so ties never flatter a model)."""
    return int((scores >= scores[index]).sum())


def ndcg_at_k(scores: torch.Tensor, relevant: Sequence[int], k: int = 5) -> float:
    """Mean NDCG@k over queries with one relevant page each: scores (n_queries, n_pages), relevant[i] a page index."""
    total = 0.0
    for row, page in zip(scores, relevant):
        rank = rank_of(row, page)
        total += 1.0 / math.log2(rank + 1) if rank <= k else 0.0
    return total / max(1, len(relevant))
