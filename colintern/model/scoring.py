"""MaxSim (late-interaction) scoring for multi-vector embeddings.

score(q, d) = sum over query tokens i of max over page tokens j of <q_i, d_j>.

Conventions:
  * Inputs are lists of (n_tokens, dim) tensors (ragged) or padded (n, max_tokens, dim) tensors.
  * An all-zero vector is not a token: it is padding or a masked position (the model zeroes those). Such vectors are
    dropped, so padding can never win a max, also when every real similarity is negative.
  * A page with no tokens scores -inf; a query with no tokens scores 0.

How it is computed (the (queries, pages, query tokens, page tokens) tensor is never materialised):
  * Pages are sorted by length and cut into chunks; the query tokens of all queries form one matrix, cut into blocks
    so that a (query block, chunk tokens) similarity block holds at most `chunk_elements` values. The CPU default
    (2^24 values, 64 MB) is the robust choice rather than the fastest on an idle machine: every GEMM and max is a
    parallel region whose threads meet at its end, and on a busy machine each meeting waits for a descheduled
    thread, so many small blocks collapse (measured on 2 shared cores under load: 2^19-2^21-value blocks 9.5-16
    GFLOP/s, 2^24-value blocks 23-80), while on a quiet machine cache-sized blocks win by 1.1-1.4x (2^20: 117
    GFLOP/s, 2^24: 83, on 2 threads). Pass `chunk_elements=1 << 20` on a dedicated CPU.
  * A chunk's pages are gathered by one `torch.cat` and cast to the compute dtype by one copy into a preallocated
    (pages x longest, dim) buffer. A page shorter than the longest is padded with copies of its own last token: a
    duplicate cannot change a max, so no -inf masking pass is needed and the result stays exact.
  * Per block: one GEMM into a preallocated buffer, an amax over the page-token axis of its (rows, pages, tokens)
    view, and a segment sum of the per-token maxima into their queries (`index_add_`).
  * CPU: float32 compute (this CPU's 16-bit GEMMs are 30-40x slower than its float32 ones). CUDA: 16-bit GEMMs with
    float32 accumulation for 16-bit inputs, maxima summed in float32; or, when the optional `late-interaction-kernels`
    package is installed, its fused varlen Triton kernel on the packed (unpadded) tokens.
"""

from __future__ import annotations

import torch

Embeddings = list[torch.Tensor] | torch.Tensor

# Similarity values per block (see the module docstring): CPU 16M float32 = 64 MB; CUDA 128M 16-bit values = 256 MB.
DEFAULT_CHUNK_ELEMENTS_CPU = 1 << 24
DEFAULT_CHUNK_ELEMENTS_CUDA = 1 << 27
# late-interaction-kernels path: page tokens sent to the device per call (bounds device memory: 4M x 128 x 2 B = 1 GiB)
LIK_CHUNK_TOKENS = 1 << 22
BACKENDS = ("auto", "torch", "lik")


def _as_token_list(embeddings: Embeddings, name: str, strip: bool = True) -> list[torch.Tensor]:
    """Ragged list of (n_i, dim) tensors with all-zero (absent) tokens removed.

    A padded tensor is always stripped (one pass over the whole tensor gives the true lengths). `strip=False` leaves
    list items as they are, for callers that deal with absent tokens themselves, in fewer, larger operations.
    """
    if isinstance(embeddings, torch.Tensor):
        if embeddings.ndim != 3:
            raise ValueError(f"{name}: expected a (n, tokens, dim) tensor or a list of (tokens, dim) tensors")
        if embeddings.shape[0] == 0:
            raise ValueError(f"No {name} provided")
        present = embeddings.any(dim=-1)  # (n, tokens): one pass for the whole tensor, no temporary
        full = present.all(dim=-1).tolist()
        return [item if keep_all else item[mask] for item, mask, keep_all in zip(embeddings, present, full)]
    items = list(embeddings)
    if len(items) == 0:
        raise ValueError(f"No {name} provided")
    out = []
    for item in items:
        if item.ndim != 2:
            raise ValueError(f"{name}: each item must be (tokens, dim), got shape {tuple(item.shape)}")
        if not strip:
            out.append(item)
            continue
        present = item.any(dim=-1)  # a token is present when any component is non-zero
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


def lik_available(device: torch.device) -> bool:
    """True when the optional `late-interaction-kernels` package can score on `device` (CUDA, compute >= 8.0)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from late_interaction_kernels import maxsim_varlen  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or its Triton import failing on this platform
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def max_sim(
    qs: Embeddings,
    ps: Embeddings,
    device: str | torch.device | None = None,
    chunk_elements: int | None = None,
    backend: str = "auto",
    **_ignored,
) -> torch.Tensor:
    """MaxSim scores of every query against every page: (n_queries, n_pages) float32 on the CPU.

    Args:
        qs: query embeddings, a list of (tokens, dim) tensors or a zero-padded (n, tokens, dim) tensor.
        ps: page embeddings, same forms.
        device: where to compute (default: CUDA when available, else CPU).
        chunk_elements: bound on the similarity values held at once (memory/speed trade-off; default per device).
        backend: "torch" (chunked GEMMs), "lik" (the `late-interaction-kernels` package, CUDA and 16-bit inputs
            only) or "auto" (lik when it is installed and applies, else torch).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    queries = _as_token_list(qs, "queries", strip=False)  # absent tokens are handled by the implementations
    pages = _as_token_list(ps, "pages", strip=False)
    if queries[0].shape[-1] != pages[0].shape[-1]:
        raise ValueError(f"query dim {queries[0].shape[-1]} != page dim {pages[0].shape[-1]}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    dtype = _compute_dtype(device, pages[0].dtype)
    if chunk_elements is None:
        chunk_elements = DEFAULT_CHUNK_ELEMENTS_CPU if device.type == "cpu" else DEFAULT_CHUNK_ELEMENTS_CUDA

    use_lik = dtype in (torch.float16, torch.bfloat16) and lik_available(device)
    if backend == "lik" and not use_lik:
        raise ValueError(
            "backend='lik' needs the late-interaction-kernels package, a CUDA GPU of compute capability >= 8.0 and "
            "16-bit embeddings; use backend='auto' to fall back to the torch implementation."
        )
    if backend != "torch" and use_lik:
        return _max_sim_lik(_strip_absent(queries), _strip_absent(pages), device, dtype)
    return _max_sim_torch(queries, pages, device, dtype, max(1, int(chunk_elements)))


def _max_sim_torch(
    queries: list[torch.Tensor],
    pages: list[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    chunk_elements: int,
) -> torch.Tensor:
    """Chunked-GEMM MaxSim. Absent (all-zero) tokens may still be in `queries` and `pages`: they are found once over
    all query tokens and once per page chunk (a few large operations rather than two per page)."""
    n_queries, n_pages, dim = len(queries), len(pages), pages[0].shape[-1]
    scores = torch.empty(n_queries, n_pages, dtype=torch.float32)

    # All query tokens in one matrix; `owner[t]` is the query that token t belongs to.
    q_lengths = torch.tensor([len(q) for q in queries])
    q_tokens = torch.cat(queries).to(device=device, dtype=dtype)
    owner = torch.repeat_interleave(torch.arange(n_queries), q_lengths).to(device)
    present = q_tokens.any(dim=1)
    if not bool(present.all()):
        q_tokens, owner = q_tokens[present], owner[present]
    total_q_tokens = q_tokens.shape[0]

    p_lengths = [len(p) for p in pages]
    empty = [i for i, length in enumerate(p_lengths) if length == 0]
    scores[:, empty] = float("-inf")
    order = sorted((i for i in range(n_pages) if p_lengths[i] > 0), key=p_lengths.__getitem__)
    if not order:
        return scores
    if total_q_tokens == 0:  # no query has a token: 0 against every page that has one
        for i in order:
            scores[:, i] = 0.0 if bool(pages[i].any()) else float("-inf")
        return scores

    # Block sizes: query tokens per block, then page tokens per chunk (at least one page; lengths ascend along
    # `order`, so the last page added to a chunk is its longest).
    longest = p_lengths[order[-1]]
    q_block = max(1, min(total_q_tokens, chunk_elements // longest))
    chunk_tokens = max(longest, chunk_elements // q_block)
    chunks: list[list[int]] = []
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop - start + 1) * p_lengths[order[stop]] <= chunk_tokens:
            stop += 1
        chunks.append(order[start:stop])
        start = stop
    max_chunk_pages = max(len(chunk) for chunk in chunks)
    max_chunk_tokens = max(len(chunk) * p_lengths[chunk[-1]] for chunk in chunks)

    # Preallocated buffers, reused by every chunk (fresh allocations of this size would page-fault on each use).
    page_buffer = torch.empty(max_chunk_tokens * dim, dtype=dtype, device=device)
    # Pages in another dtype or on another device are gathered there first: a same-dtype cat is one operation, a
    # casting one is one copy per page (each a parallel region that may wait for a thread on a busy machine).
    source = pages[0]
    staging = None
    if source.dtype != dtype or source.device != device:
        staging = torch.empty(max_chunk_tokens * dim, dtype=source.dtype, device=source.device)
    sim_buffer = torch.empty(min(q_block, total_q_tokens) * max_chunk_tokens, dtype=dtype, device=device)
    best_buffer = torch.empty(min(q_block, total_q_tokens) * max_chunk_pages, dtype=dtype, device=device)
    chunk_scores = torch.empty(n_queries, max_chunk_pages, dtype=torch.float32, device=device)

    for chunk in chunks:
        n, length = len(chunk), p_lengths[chunk[-1]]
        page_matrix = page_buffer[: n * length * dim].view(n * length, dim)  # (pages x longest, dim)
        pieces = []
        for index in chunk:
            page = pages[index]
            pieces.append(page)
            if len(page) < length:  # pad with the page's own last token: the max over its tokens is unchanged
                pieces.append(page[-1:].expand(length - len(page), dim))
        if staging is None:
            torch.cat(pieces, out=page_matrix)  # gathers and pads into the buffer
        else:
            staged = staging[: n * length * dim].view(n * length, dim)
            torch.cat(pieces, out=staged)
            page_matrix.copy_(staged)  # one cast (and transfer) for the chunk
        present = page_matrix.any(dim=1)
        empty_pages = None if bool(present.all()) else _fill_absent_tokens(page_matrix.view(n, length, dim), present)
        page_matrix_t = page_matrix.T  # (dim, chunk tokens)
        out = chunk_scores[:, :n].zero_()
        for q_start in range(0, total_q_tokens, q_block):
            rows = min(q_block, total_q_tokens - q_start)
            sim = sim_buffer[: rows * n * length].view(rows, n * length)
            torch.mm(q_tokens[q_start : q_start + rows], page_matrix_t, out=sim)
            best = best_buffer[: rows * n].view(rows, n)
            torch.amax(sim.view(rows, n, length), dim=-1, out=best)  # (block tokens, pages)
            out.index_add_(0, owner[q_start : q_start + rows], best.float())
        if empty_pages is not None:
            out[:, empty_pages] = float("-inf")
        scores[:, chunk] = out.cpu()
    return scores


def _fill_absent_tokens(padded: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Overwrite absent (all-zero) tokens of each page in `padded` (pages, tokens, dim) with a copy of one of that
    page's present tokens, which cannot change its max; return the mask of pages with no token at all."""
    n, length, _ = padded.shape
    present = present.view(n, length)
    first_present = present.to(torch.uint8).argmax(dim=1)  # 0 where a page has none (then all its rows are 0)
    fill = padded[torch.arange(n, device=padded.device), first_present]  # (pages, dim)
    padded.copy_(torch.where(present[..., None], padded, fill[:, None, :]))
    return ~present.any(dim=1)


def _strip_absent(items: list[torch.Tensor]) -> list[torch.Tensor]:
    """Items without their absent (all-zero) tokens."""
    out = []
    for item in items:
        present = item.any(dim=-1)
        out.append(item if bool(present.all()) else item[present])
    return out


def _max_sim_lik(
    queries: list[torch.Tensor], pages: list[torch.Tensor], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """MaxSim through late-interaction-kernels' fused varlen kernel on packed tokens (no padding, so exact)."""
    from late_interaction_kernels import maxsim_varlen

    def offsets(lengths: list[int]) -> torch.Tensor:
        return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)

    n_queries, n_pages = len(queries), len(pages)
    scores = torch.empty(n_queries, n_pages, dtype=torch.float32)
    q_packed = torch.cat(queries).to(device=device, dtype=dtype)
    cu_q = offsets([len(q) for q in queries])  # an empty query scores 0 in the kernel, as here
    non_empty = [i for i in range(n_pages) if len(pages[i]) > 0]
    scores[:, [i for i in range(n_pages) if len(pages[i]) == 0]] = float("-inf")
    if q_packed.shape[0] == 0:  # no query has a token: every score is 0
        scores[:, non_empty] = 0.0
        return scores
    start = 0
    while start < len(non_empty):
        stop, tokens = start, 0
        while stop < len(non_empty) and (stop == start or tokens + len(pages[non_empty[stop]]) <= LIK_CHUNK_TOKENS):
            tokens += len(pages[non_empty[stop]])
            stop += 1
        chunk = non_empty[start:stop]
        d_packed = torch.cat([pages[i] for i in chunk]).to(device=device, dtype=dtype)
        cu_d = offsets([len(pages[i]) for i in chunk])
        scores[:, chunk] = maxsim_varlen(q_packed, d_packed, cu_q, cu_d).float().cpu()
        start = stop
    return scores


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
