"""Compressed page vectors for late-interaction retrieval: token pooling, dimension truncation, int8 and binary codes.

    config = CompressionConfig.parse("pool=2,dim=64,quant=binary,rescore=32")
    pages = compress_pages(page_embeddings, config)     # what an index keeps: (tensors or CompressedPage items)
    queries = prepare_queries(query_embeddings, config) # cut to the pages' dimension
    scores = score(queries, pages, config)              # (n_queries, n_pages) float32

The steps, in this order, each optional:
  1. pooling: colpali-engine's `HierarchicalTokenPooler` (Ward clustering of a page's vectors by cosine similarity,
     cluster means re-normalised): a page of n vectors keeps at most max(n // pool_factor, 1).
  2. truncation: the first `dim` components of every page and query vector, L2-re-normalised. The head was not
     trained Matryoshka-style, so this is a plain cut.
  3. quantization of the page vectors (queries stay float):
     * float16: 2 bytes a component; without steps 1-2 this is the baseline, vectors x dim x 2 bytes a page.
     * int8: symmetric, one float16 scale per vector (max |x| / 127): dim + 2 bytes a vector; scored as
       codes x scale against the float queries.
     * binary: sign bits (x > 0) packed 8 to a byte (numpy's `packbits` order): ceil(dim / 8) bytes a vector.
       Scored asymmetrically (float query . +-1/sqrt(dim)) or by Hamming (sign(query) . sign(page) / dim, which is
       1 - 2 x Hamming distance / dim).
  4. re-scoring (int8, binary): the `rescore` best pages of each query by the compressed score are scored again with
     the float16 vectors of steps 1-2. Those are kept apart (on disk, in an index) and counted separately
     (`rescore_bytes`); the re-scored pages rank above all others, which keep their compressed order.

Bytes are counted from the tensors that hold the codes (`page_bytes`), so they are exact, not estimated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F

from colintern.utils import ColinternError

QUANTIZATIONS = ("float16", "int8", "binary")
BINARY_SCORINGS = ("asymmetric", "hamming")
# Page vectors decoded at once while scoring codes (bounds the float copy: 2^19 x 128 x 4 B = 256 MB).
DECODE_BLOCK_VECTORS = 1 << 19
RESCORE_GROUP = 32  # queries re-scored together against the union of their candidates
_SPEC_KEYS = {"pool": "pool_factor", "dim": "dim", "quant": "quantization", "scoring": "binary_scoring",
              "rescore": "rescore"}


@dataclass(frozen=True)
class CompressionConfig:
    """How page vectors are stored and scored (see the module docstring). The defaults change nothing.

    Args:
        pool_factor: hierarchical token pooling; a page keeps at most max(vectors // pool_factor, 1) (1: off).
        dim: keep the first `dim` components of every vector, re-normalised (None: all).
        quantization: "float16", "int8" or "binary".
        binary_scoring: "asymmetric" (float query against sign bits) or "hamming" (sign bits against sign bits).
        rescore: re-score this many top pages per query with the float16 vectors (int8 and binary only; 0: off).
    """

    pool_factor: int = 1
    dim: int | None = None
    quantization: str = "float16"
    binary_scoring: str = "asymmetric"
    rescore: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.pool_factor, int) or self.pool_factor < 1:
            problems.append(f"pool factor must be an integer >= 1, got {self.pool_factor!r}")
        if self.dim is not None and (not isinstance(self.dim, int) or self.dim < 1):
            problems.append(f"dim must be an integer >= 1, got {self.dim!r}")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.binary_scoring not in BINARY_SCORINGS:
            problems.append(f"scoring must be one of {', '.join(BINARY_SCORINGS)}, got {self.binary_scoring!r}")
        elif self.binary_scoring != "asymmetric" and self.quantization != "binary":
            problems.append("scoring=hamming applies to quant=binary only")
        if not isinstance(self.rescore, int) or self.rescore < 0:
            problems.append(f"rescore must be an integer >= 0, got {self.rescore!r}")
        elif self.rescore and self.quantization == "float16":
            problems.append("rescore applies to quant=int8 or quant=binary (float16 vectors are already exact)")
        if problems:
            raise ColinternError(f"compression setting {self.label()!r}: {'; '.join(problems)}.")

    @property
    def is_identity(self) -> bool:
        """True when pages and queries are kept as they are (the float16 baseline)."""
        return self == CompressionConfig()

    @classmethod
    def parse(cls, spec: str | None) -> CompressionConfig:
        """From a spec such as "pool=2,dim=64,quant=binary,scoring=hamming,rescore=32" ("none" or "": the baseline).

        Raises:
            ColinternError naming the spec and what is wrong with it.
        """
        text = (spec or "").strip()
        if text.lower() in ("", "none", "float16"):
            return cls()
        values: dict[str, int | str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not sep and key in QUANTIZATIONS:  # "int8" alone is quant=int8
                key, value = "quant", key
            if key not in _SPEC_KEYS or not value:
                raise ColinternError(
                    f"compression setting {spec!r}: {part.strip()!r} is not KEY=VALUE with KEY one of "
                    f"{', '.join(_SPEC_KEYS)} (e.g. \"pool=2,dim=64,quant=binary,rescore=32\")."
                )
            name = _SPEC_KEYS[key]
            if name in ("pool_factor", "dim", "rescore"):
                try:
                    values[name] = int(value)
                except ValueError:
                    raise ColinternError(
                        f"compression setting {spec!r}: {key} must be an integer, got {value!r}."
                    ) from None
            else:
                values[name] = value.lower()
        return cls(**values)  # type: ignore[arg-type]

    def label(self) -> str:
        """The canonical spec ("none" for the baseline); `parse(label())` gives this config back."""
        parts = []
        if self.pool_factor != 1:
            parts.append(f"pool={self.pool_factor}")
        if self.dim is not None:
            parts.append(f"dim={self.dim}")
        if self.quantization != "float16":
            parts.append(f"quant={self.quantization}")
        if self.binary_scoring != "asymmetric":
            parts.append(f"scoring={self.binary_scoring}")
        if self.rescore:
            parts.append(f"rescore={self.rescore}")
        return ",".join(parts) or "none"

    def to_dict(self) -> dict:
        return asdict(self)

    def experiment_kwargs(self) -> dict | None:
        """The settings that differ from the baseline, for mteb's `ModelMeta.experiment_kwargs` (results then go
        to `{model}/{revision}/experiments/<settings>/` and model_meta.json records them); None for the baseline."""
        defaults = CompressionConfig()
        changed = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(defaults, f.name)}
        return changed or None


@dataclass
class CompressedPage:
    """One page's int8 or binary codes, and, for re-scoring, its float16 vectors (kept apart from the codes).

    codes: int8 (vectors, dim) or uint8 (vectors, ceil(dim / 8)) packed sign bits.
    scales: float16 (vectors,) for int8 (a component is codes x scale); None for binary.
    exact: float16 (vectors, dim) after pooling and truncation, when re-scoring is on; else None.
    """

    codes: torch.Tensor
    scales: torch.Tensor | None
    dim: int
    quantization: str
    exact: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and scales (what is scanned at query time)."""
        return self.codes.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    @property
    def rescore_bytes(self) -> int:
        return self.exact.nbytes if self.exact is not None else 0

    def decode(self) -> torch.Tensor:
        """(vectors, dim) float32: int8 codes x scale, or sign bits as +-1/sqrt(dim) (unit vectors)."""
        if self.quantization == "int8":
            return self.codes.float() * self.scales.float()[:, None]
        return unpack_signs(self.codes, self.dim) / math.sqrt(self.dim)


PageVectors = torch.Tensor | CompressedPage


# ---------------------------------------------------------------------------------------------------- transforms
def pool_pages(pages: Sequence[torch.Tensor], pool_factor: int) -> list[torch.Tensor]:
    """colpali-engine's hierarchical token pooling of each page (a page of one vector, or none, is kept as it is)."""
    if pool_factor == 1:
        return list(pages)
    from colpali_engine.compression.token_pooling import HierarchicalTokenPooler

    out = list(pages)
    poolable = [i for i, page in enumerate(pages) if len(page) > 1]  # the pooler refuses a single vector
    if poolable:
        pooled = HierarchicalTokenPooler().pool_embeddings([pages[i] for i in poolable], pool_factor=pool_factor)
        for index, page in zip(poolable, pooled):
            out[index] = page
    return out


def truncate(vectors: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The first `dim` components of each vector, L2-re-normalised (in the input dtype)."""
    if dim is None or dim == vectors.shape[-1]:
        return vectors
    if dim > vectors.shape[-1]:
        raise ColinternError(f"compression dim={dim} is larger than the model's {vectors.shape[-1]} dimensions.")
    return F.normalize(vectors[..., :dim].float(), p=2, dim=-1, eps=1e-12).to(vectors.dtype)


def quantize_int8(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8, scales float16): symmetric per-vector quantization, x ~ codes x scale, |codes| <= 127."""
    values = vectors.float()
    scales = (values.abs().amax(dim=-1) / 127.0).to(torch.float16)
    safe = scales.float().clamp_min(torch.finfo(torch.float16).tiny)  # all-zero vector: codes 0
    codes = torch.round(values / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def pack_signs(vectors: torch.Tensor) -> torch.Tensor:
    """uint8 (vectors, ceil(dim / 8)): bit = component > 0, most significant bit first (as `numpy.packbits`)."""
    bits = (vectors > 0).to(torch.uint8)
    pad = (-bits.shape[-1]) % 8
    if pad:
        bits = F.pad(bits, (0, pad))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (bits.view(*bits.shape[:-1], -1, 8) * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """(vectors, dim) float32 of +-1 from `pack_signs` codes."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (codes[..., None] >> shifts) & 1
    return bits.reshape(*codes.shape[:-1], -1)[..., :dim].float() * 2 - 1


def compress_page(page: torch.Tensor, config: CompressionConfig) -> PageVectors:
    """One page after pooling: truncated, then float16 (a tensor) or int8 / binary codes (a `CompressedPage`)."""
    vectors = truncate(page, config.dim)
    if config.quantization == "float16":
        return vectors.to(torch.float16)
    exact = vectors.to(torch.float16) if config.rescore else None
    if config.quantization == "int8":
        codes, scales = quantize_int8(vectors)
        return CompressedPage(codes, scales, vectors.shape[-1], "int8", exact)
    return CompressedPage(pack_signs(vectors), None, vectors.shape[-1], "binary", exact)


def compress_pages(pages: Sequence[torch.Tensor], config: CompressionConfig) -> list[PageVectors]:
    """Every page pooled, truncated and quantized as `config` says (float16 tensors or `CompressedPage` items)."""
    return [compress_page(page, config) for page in pool_pages(pages, config.pool_factor)]


def prepare_queries(queries: Sequence[torch.Tensor], config: CompressionConfig) -> list[torch.Tensor]:
    """Query vectors cut to the pages' dimension (queries are never pooled or quantized)."""
    return [truncate(query, config.dim) for query in queries]


# ---------------------------------------------------------------------------------------------------- storage
def page_bytes(page: PageVectors) -> int:
    """Bytes one page takes in the index: its tensor, or its codes and scales."""
    return page.nbytes if isinstance(page, (torch.Tensor, CompressedPage)) else 0


def float16_bytes(page: torch.Tensor) -> int:
    """The baseline: vectors x dim x 2."""
    return int(page.shape[0]) * int(page.shape[-1]) * 2


@dataclass
class StorageStats:
    """Bytes of a corpus before and after compression (summed over the pages seen)."""

    pages: int = 0
    vectors_before: int = 0
    vectors_after: int = 0
    float16_bytes: int = 0
    index_bytes: int = 0
    rescore_bytes: int = 0

    def add(self, originals: Sequence[torch.Tensor], compressed: Sequence[PageVectors]) -> None:
        self.pages += len(originals)
        self.vectors_before += sum(int(p.shape[0]) for p in originals)
        self.vectors_after += sum(len(p) for p in compressed)
        self.float16_bytes += sum(float16_bytes(p) for p in originals)
        self.index_bytes += sum(page_bytes(p) for p in compressed)
        self.rescore_bytes += sum(p.rescore_bytes for p in compressed if isinstance(p, CompressedPage))

    def to_dict(self) -> dict:
        n = max(self.pages, 1)
        return {
            "pages": self.pages,
            "vectors_per_page": self.vectors_after / n,
            "vectors_per_page_before": self.vectors_before / n,
            "float16_bytes_per_page": self.float16_bytes / n,
            "bytes_per_page": self.index_bytes / n,
            "rescore_bytes_per_page": self.rescore_bytes / n,
            "fraction_of_float16": self.index_bytes / self.float16_bytes if self.float16_bytes else None,
            "total_fraction_of_float16": (
                (self.index_bytes + self.rescore_bytes) / self.float16_bytes if self.float16_bytes else None
            ),
        }


# ---------------------------------------------------------------------------------------------------- scoring
def is_compressed(pages) -> bool:
    """True for a list of `CompressedPage` items (as `compress_pages` returns for int8 and binary)."""
    return isinstance(pages, Sequence) and len(pages) > 0 and isinstance(pages[0], CompressedPage)


def score(
    queries: Sequence[torch.Tensor],
    pages: Sequence[PageVectors],
    config: CompressionConfig,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Scores of every query against every page: (n_queries, n_pages) float32 on the CPU.

    Float pages are scored with `max_sim`; int8 and binary pages by MaxSim on their decoded codes (per block of
    pages, so the float copy stays bounded), Hamming-style when `config.binary_scoring` says so, then re-scored with
    their float16 vectors when `config.rescore` is set. `queries` are those of `prepare_queries`.
    """
    from colintern.model.scoring import max_sim

    pages = list(pages)
    if not is_compressed(pages):
        return max_sim(list(queries), pages, device=device)
    if not all(isinstance(p, CompressedPage) for p in pages):
        raise ValueError("pages mix compressed and float vectors")
    queries = list(queries)
    query_side = queries
    if config.quantization == "binary" and config.binary_scoring == "hamming":
        query_side = [torch.where(q > 0, 1.0, -1.0) / math.sqrt(q.shape[-1]) for q in queries]
    scores = torch.empty(len(queries), len(pages), dtype=torch.float32)
    start = 0
    while start < len(pages):
        stop, vectors = start, 0
        while stop < len(pages) and (stop == start or vectors + len(pages[stop]) <= DECODE_BLOCK_VECTORS):
            vectors += len(pages[stop])
            stop += 1
        scores[:, start:stop] = max_sim(query_side, [p.decode() for p in pages[start:stop]], device=device)
        start = stop
    if config.rescore:
        scores = rescore_top(queries, pages, scores, config.rescore, device=device)
    return scores


def rescore_top(
    queries: Sequence[torch.Tensor],
    pages: Sequence[CompressedPage],
    scores: torch.Tensor,
    k: int,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """`scores` with each query's top `k` pages re-scored exactly (float MaxSim on `page.exact`) and ranked first;
    the other pages keep their order, shifted below the lowest re-scored page."""
    from colintern.model.scoring import max_sim

    if any(p.exact is None for p in pages):
        raise ValueError("re-scoring needs the pages' float vectors: compress them with rescore > 0")
    k = min(k, scores.shape[1])
    top = torch.topk(scores, k, dim=1).indices
    out = scores.clone()
    exact_scores = torch.empty(top.shape, dtype=torch.float32)
    # Queries in groups, each group scored against the union of its candidates in one max_sim call (one call per
    # query would spend most of its time in per-call overhead); only the candidates' entries are used.
    for start in range(0, len(queries), RESCORE_GROUP):
        group = top[start : start + RESCORE_GROUP]
        union, position = torch.unique(group, return_inverse=True)
        block = max_sim(list(queries[start : start + RESCORE_GROUP]), [pages[j].exact for j in union.tolist()],
                        device=device)
        exact_scores[start : start + len(group)] = torch.gather(block, 1, position)
    for i in range(len(queries)):
        candidates, exact = top[i], exact_scores[i]
        rest = torch.ones(scores.shape[1], dtype=torch.bool)
        rest[candidates] = False
        out[i, candidates] = exact
        finite_exact, others = exact[torch.isfinite(exact)], out[i, rest]
        finite_others = others[torch.isfinite(others)]
        if len(finite_others):
            floor = float(finite_exact.min()) if len(finite_exact) else 0.0
            out[i, rest] = others + (floor - float(finite_others.max()) - 1.0)
    return out
