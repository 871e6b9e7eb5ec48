"""Batch invariance: a page's or query's embedding must not depend on what else is in its batch.

Retrieval scores that move with the batch size (padding attended, a padding side that shifts what a model reads, a
batch-dependent kernel) make a leaderboard number a property of the evaluation machine rather than of the model.
`check_invariance` embeds a sample of pages and queries once one at a time and once at the run's batch size, and
compares the MaxSim score matrices: the largest score difference and, per query, the top-k pages in order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from colintern.model.encoding import encode_pages, encode_queries
from colintern.model.scoring import max_sim
from colintern.utils import ColinternError

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
DEFAULT_TOP_K = 10
DEFAULT_SAMPLE = 32


@dataclass
class InvarianceReport:
    """Scores of the sample at batch 1 against the run's batch size."""

    batch_size: int
    n_pages: int
    n_queries: int
    top_k: int
    tolerance: float
    max_score_diff: float
    worst_query: int  # indices in the sample of the largest difference
    worst_page: int
    queries_with_other_top_k: int

    @property
    def passed(self) -> bool:
        return self.max_score_diff <= self.tolerance and self.queries_with_other_top_k == 0

    def line(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"batch invariance {verdict}: {self.n_queries} queries x {self.n_pages} pages at batch 1 and batch "
            f"{self.batch_size}: largest score difference {self.max_score_diff:.3g} (tolerance {self.tolerance:g}, "
            f"query {self.worst_query}, page {self.worst_page}), top-{self.top_k} differs for "
            f"{self.queries_with_other_top_k} of {self.n_queries} queries"
        )

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise ColinternError(
                self.line() + ": embeddings depend on the batch, so scores depend on the evaluation batch size. "
                "Evaluate at --batch-size 1 or fix the batching (padding side, attention mask)."
            )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    # stable sort: equal scores keep page order in both runs
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def check_invariance(
    model,
    processor,
    pages: Sequence[Any],
    queries: Sequence[str],
    batch_size: int,
    *,
    texts: Sequence[str] | None = None,
    max_text_tokens: int | None = None,
    top_k: int = DEFAULT_TOP_K,
    tolerance: float = DEFAULT_TOLERANCE,
    encode_pages_fn: Callable[..., list[torch.Tensor]] = encode_pages,
    encode_queries_fn: Callable[..., list[torch.Tensor]] = encode_queries,
) -> InvarianceReport:
    """Embed `pages` (with `texts` after the image, if given) and `queries` at batch 1 and at `batch_size`, in
    float32, and compare their MaxSim scores.

    `encode_pages_fn` / `encode_queries_fn` take the arguments of `colintern.model.encoding.encode_pages` /
    `encode_queries` (the encoders under test; the defaults are the ones evaluations use).
    """
    if not pages or not queries:
        raise ColinternError("the batch-invariance check needs at least one page and one query.")
    results = {}
    for size in (1, batch_size):
        page_kwargs = {"texts": list(texts), "max_text_tokens": max_text_tokens} if texts is not None else {}
        page_embeddings = encode_pages_fn(
            model, processor, pages, batch_size=size, storage_dtype=torch.float32, **page_kwargs
        )
        query_embeddings = encode_queries_fn(model, processor, list(queries), batch_size=size,
                                             storage_dtype=torch.float32)  # fmt: skip
        results[size] = max_sim(query_embeddings, page_embeddings).float()
    one, many = results[1], results[batch_size]
    diff = (one - many).abs()
    worst = int(diff.argmax())
    k = min(top_k, one.shape[1])
    moved = int((_top_k(one, k) != _top_k(many, k)).any(dim=1).sum())
    report = InvarianceReport(
        batch_size=batch_size,
        n_pages=len(pages),
        n_queries=len(queries),
        top_k=k,
        tolerance=tolerance,
        max_score_diff=float(diff.max()),
        worst_query=worst // one.shape[1],
        worst_page=worst % one.shape[1],
        queries_with_other_top_k=moved,
    )
    logger.info("%s", report.line())
    return report


def sample_task(task, n: int = DEFAULT_SAMPLE, seed: int = 0) -> tuple[list[Any], list[str], list[str] | None]:
    """(pages, queries, page texts or None) sampled from a loaded retrieval task's first subset and split."""
    import datasets

    subset = next(iter(task.dataset))
    split = task.eval_splits[0]
    data = task.dataset[subset][split]
    corpus, query_table = data["corpus"], data["queries"]
    if isinstance(corpus.features.get("image"), datasets.Image):
        corpus = corpus.cast_column("image", datasets.Image(decode=False))
    rng = random.Random(seed)
    page_rows = sorted(rng.sample(range(len(corpus)), min(n, len(corpus))))
    query_rows = sorted(rng.sample(range(len(query_table)), min(n, len(query_table))))
    pages = [corpus[i]["image"] for i in page_rows]
    texts = [corpus[i]["text"] or "" for i in page_rows] if "text" in corpus.column_names else None
    queries = [query_table[i]["text"] for i in query_rows]
    return pages, queries, texts
