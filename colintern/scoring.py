"""MaxSim (late-interaction) scoring for multi-vector embeddings.

score(q, d) = sum over query tokens i of max over page tokens j of <q_i, d_j>.

Conventions:
  * Inputs are lists of (n_tokens, dim) tensors (ragged) or padded (n, max_tokens, dim) tensors.
  * An all-zero vector is not a token: it is padding or a masked position (the model zeroes those). Such vectors are
    dropped, so padding can never win a max, also when every real similarity is negative.
  * A page with no tokens scores -inf; a query with no tokens scores 0.

The implementation never materialises the (queries, pages, query tokens, page tokens) tensor: pages are sorted by
length and scored in chunks whose similarity block stays under `chunk_elements` values, each chunk being one GEMM of
all (or a block of) query tokens against the chunk's page tokens, a max over page tokens and a per-query segment sum.
"""

from __future__ import annotations

import torch

Embeddings = list[torch.Tensor] | torch.Tensor

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # 16M similarity values per block: 64 MB in float32


def _as_token_list(embeddings: Embeddings, name: str) -> list[torch.Tensor]:
    """Ragged list of (n_i, dim) tensors with all-zero (absent) tokens removed."""
    if isinstance(embeddings, torch.Tensor):
        if embeddings.ndim != 3:
            raise ValueError(f"{name}: expected a (n, tokens, dim) tensor or a list of (tokens, dim) tensors")
        items = list(embeddings.unbind(0))
    else:
        items = list(embeddings)
    if len(items) == 0:
        raise ValueError(f"No {name} provided")
    out = []
    for item in items:
        if item.ndim != 2:
            raise ValueError(f"{name}: each item must be (tokens, dim), got shape {tuple(item.shape)}")
        present = item.ne(0).any(dim=-1)
        out.append(item if bool(present.all()) else item[present])
    dims = {t.shape[-1] for t in out}
    if len(dims) != 1:
        raise ValueError(f"{name}: embeddings have different dimensions {sorted(dims)}")
    return out


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    # CPUs run float32 GEMMs far faster than 16-bit ones; GPUs run 16-bit tensor-core GEMMs (fp32 accumulation).
    if device.type == "cpu" or dtype not in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def max_sim(
    qs: Embeddings,
    ps: Embeddings,
    device: str | torch.device | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    **_ignored,
) -> torch.Tensor:
    """MaxSim scores of every query against every page: (n_queries, n_pages) float32 on the CPU.

    Args:
        qs: query embeddings, a list of (tokens, dim) tensors or a zero-padded (n, tokens, dim) tensor.
        ps: page embeddings, same forms.
        device: where to compute (default: CUDA when available, else CPU).
        chunk_elements: bound on the similarity values held at once (memory/speed trade-off).
    """
    queries = _as_token_list(qs, "queries")
    pages = _as_token_list(ps, "pages")
    if queries[0].shape[-1] != pages[0].shape[-1]:
        raise ValueError(f"query dim {queries[0].shape[-1]} != page dim {pages[0].shape[-1]}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _compute_dtype(device, pages[0].dtype)

    n_queries, n_pages = len(queries), len(pages)
    scores = torch.empty(n_queries, n_pages, dtype=torch.float32)

    # All query tokens in one matrix; `owner[t]` is the query that token t belongs to.
    q_lengths = torch.tensor([len(q) for q in queries])
    q_tokens = torch.cat(queries).to(device=device, dtype=dtype)
    owner = torch.repeat_interleave(torch.arange(n_queries), q_lengths).to(device)
    total_q_tokens = max(1, q_tokens.shape[0])

    # Pages sorted by length so each chunk pads little; chunk size bounded by `chunk_elements`.
    p_lengths = [len(p) for p in pages]
    order = sorted(range(n_pages), key=p_lengths.__getitem__)
    # query tokens per block: all of them unless one page alone would exceed the budget
    q_block = max(1, min(total_q_tokens, chunk_elements // max(1, max(p_lengths))))

    start = 0
    while start < n_pages:
        # grow the chunk while the padded block (pages x longest page x query block) stays within budget;
        # lengths increase along `order`, so the last page added is the longest
        stop = start + 1
        while stop < n_pages and (stop - start + 1) * max(1, p_lengths[order[stop]]) * q_block <= chunk_elements:
            stop += 1
        chunk = order[start:stop]
        chunk_scores = _score_chunk(q_tokens, owner, n_queries, [pages[i] for i in chunk], q_block, device, dtype)
        scores[:, chunk] = chunk_scores.cpu()
        start = stop
    return scores


def _score_chunk(
    q_tokens: torch.Tensor,
    owner: torch.Tensor,
    n_queries: int,
    pages: list[torch.Tensor],
    q_block: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Scores of all queries against a few pages: (n_queries, len(pages)) float32."""
    lengths = [len(p) for p in pages]
    longest = max(lengths)
    n_pages = len(pages)
    out = torch.zeros(n_queries, n_pages, dtype=torch.float32, device=device)
    if longest == 0:
        return out.fill_(float("-inf"))
    if min(lengths) == longest:
        padded = torch.stack(pages).to(device=device, dtype=dtype)
        pad_mask = None
    else:
        padded = torch.nn.utils.rnn.pad_sequence(pages, batch_first=True).to(device=device, dtype=dtype)
        pad_mask = torch.arange(longest, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
    flat = padded.reshape(n_pages * longest, -1).T  # (dim, pages * tokens)
    for q_start in range(0, q_tokens.shape[0], q_block):
        block = q_tokens[q_start : q_start + q_block]
        sim = (block @ flat).view(block.shape[0], n_pages, longest)
        if pad_mask is not None:
            sim.masked_fill_(pad_mask[None], float("-inf"))
        best = sim.amax(dim=-1).float()  # (block tokens, pages)
        out.index_add_(0, owner[q_start : q_start + block.shape[0]], best)
    return out


def max_sim_reference(qs: Embeddings, ps: Embeddings) -> torch.Tensor:
    """Brute-force MaxSim in float64, one pair at a time (for tests and benchmarks)."""
    queries = _as_token_list(qs, "queries")
    pages = _as_token_list(ps, "pages")
    scores = torch.empty(len(queries), len(pages), dtype=torch.float64)
    for i, q in enumerate(queries):
        for j, p in enumerate(pages):
            if len(p) == 0:
                scores[i, j] = float("-inf")
            elif len(q) == 0:
                scores[i, j] = 0.0
            else:
                scores[i, j] = (q.double() @ p.double().T).max(dim=1).values.sum()
    return scores.float()
