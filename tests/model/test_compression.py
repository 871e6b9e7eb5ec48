"""Compressed page vectors: each transform's bytes and scores against the float reference, on real embeddings of
SynthDocs pages and queries by the shipped trained tiny model."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch

from colintern.model.compression import (
    CompressedPage,
    CompressionConfig,
    StorageStats,
    compress_pages,
    pack_signs,
    prepare_queries,
    rescore_top,
    score,
    unpack_signs,
)
from colintern.model.scoring import max_sim, max_sim_reference
from colintern.utils import ColinternError


@pytest.fixture(scope="module")
def embedded(small_synthdocs_dir):
    """(queries, pages): the test split of the small SynthDocs corpus encoded by the trained tiny model (float16)."""
    from colintern.evaluation.tasks import read_split
    from colintern.model.embedded import PRETRAINED_MODEL
    from colintern.model.encoding import encode_pages, encode_queries
    from colintern.model.loading import load_retriever

    split = read_split(small_synthdocs_dir / "test")
    model, processor = load_retriever(PRETRAINED_MODEL, device="cpu")
    model.eval()
    corpus = split["corpus"].cast_column("image", datasets.Image(decode=False))
    pages = encode_pages(model, processor, [row["image"] for row in corpus], batch_size=8)
    queries = encode_queries(model, processor, list(split["queries"]["text"]), batch_size=8)
    return queries, pages


def _top(scores: torch.Tensor, k: int) -> list[list[int]]:
    return torch.topk(scores, k, dim=1).indices.tolist()


# ---------------------------------------------------------------------------------------------------- settings
def test_specs_parse_to_configs_and_back():
    config = CompressionConfig.parse("pool=2, dim=64, quant=binary, scoring=hamming, rescore=16")
    assert config == CompressionConfig(2, 64, "binary", "hamming", 16)
    assert CompressionConfig.parse(config.label()) == config
    assert CompressionConfig.parse("int8") == CompressionConfig(quantization="int8")
    assert CompressionConfig.parse("none").is_identity and CompressionConfig().label() == "none"
    assert CompressionConfig().experiment_kwargs() is None
    assert CompressionConfig.parse("pool=2,quant=int8").experiment_kwargs() == {"pool_factor": 2,
                                                                               "quantization": "int8"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pool=0", "pool factor must be an integer >= 1"),
        ("dim=x", "dim must be an integer"),
        ("quant=int4", "quantization must be one of float16, int8, binary"),
        ("rescore=8", "rescore applies to quant=int8 or quant=binary"),
        ("scoring=hamming,quant=int8", "scoring=hamming applies to quant=binary only"),
        ("pooling=2", "is not KEY=VALUE"),
    ],
)
def test_bad_specs_are_one_clear_error(spec, message):
    with pytest.raises(ColinternError, match=message):
        CompressionConfig.parse(spec)


def test_a_dimension_above_the_models_is_refused(embedded):
    _, pages = embedded
    with pytest.raises(ColinternError, match="dim=256 is larger than the model's 128 dimensions"):
        compress_pages(pages, CompressionConfig(dim=256))


# ---------------------------------------------------------------------------------------------------- transforms
def test_the_baseline_is_the_float16_vectors_unchanged(embedded):
    queries, pages = embedded
    config = CompressionConfig()
    out = compress_pages(pages, config)
    assert all(torch.equal(a, b) for a, b in zip(out, pages))
    stats = StorageStats()
    stats.add(pages, out)
    assert stats.index_bytes == stats.float16_bytes == sum(len(p) * 128 * 2 for p in pages)
    assert torch.equal(score(prepare_queries(queries, config), out, config), max_sim(queries, pages))


def test_pooling_keeps_the_dimension_and_divides_the_vectors(embedded):
    _, pages = embedded
    for factor in (2, 3, 4):
        pooled = compress_pages(pages, CompressionConfig(pool_factor=factor))
        for page, out in zip(pages, pooled):
            assert out.shape == (max(len(page) // factor, 1), 128) and out.dtype == torch.float16
            assert torch.allclose(out.float().norm(dim=-1), torch.ones(len(out)), atol=2e-3)  # cluster means normalised
        stats = StorageStats()
        stats.add(pages, pooled)
        assert stats.index_bytes == sum(len(p) * 128 * 2 for p in pooled)
    single = [pages[0][:1]]  # colpali-engine's pooler refuses one vector: it is kept as it is
    assert torch.equal(compress_pages(single, CompressionConfig(pool_factor=2))[0], single[0])


def test_truncation_cuts_and_renormalises_pages_and_queries(embedded):
    queries, pages = embedded
    config = CompressionConfig(dim=32)
    out, cut = compress_pages(pages, config), prepare_queries(queries, config)
    for page, page_out in zip(pages, out):
        assert page_out.shape == (len(page), 32)
        expected = torch.nn.functional.normalize(page[:, :32].float(), dim=-1)
        assert torch.allclose(page_out.float(), expected, atol=1e-3)
    assert all(q.shape[-1] == 32 for q in cut)
    scores = score(cut, out, config)
    assert torch.allclose(scores, max_sim_reference(cut, out), atol=1e-3)
    stats = StorageStats()
    stats.add(pages, out)
    assert stats.index_bytes * 4 == stats.float16_bytes  # 32 of 128 dims


def test_int8_scores_are_within_tolerance_of_float(embedded):
    queries, pages = embedded
    config = CompressionConfig(quantization="int8")
    out = compress_pages(pages, config)
    for page, item in zip(pages, out):
        assert isinstance(item, CompressedPage) and item.codes.dtype == torch.int8 and item.scales.dtype == torch.float16
        assert int(item.codes.abs().max()) == 127  # the largest component of some vector uses the full range
        assert item.nbytes == len(page) * (128 + 2)  # one byte a component, a float16 scale a vector
        assert torch.allclose(item.decode(), page.float(), atol=float(item.scales.float().max()) * 0.51 + 1e-3)
    reference = max_sim_reference(queries, pages)
    scores = score(queries, out, config)
    assert (scores - reference).abs().max() < 0.01 * reference.abs().max()
    assert _top(scores, 1) == _top(reference, 1)


def test_sign_bits_pack_as_numpy_does_for_any_dimension(embedded):
    _, pages = embedded
    for dim in (128, 20):  # 20 dims: 3 bytes a vector, the last one padded
        vectors = pages[0][:, :dim].float()
        codes = pack_signs(vectors)
        assert torch.equal(codes, torch.from_numpy(np.packbits(vectors.numpy() > 0, axis=-1)))
        assert codes.shape == (len(vectors), math.ceil(dim / 8))
        assert torch.equal(unpack_signs(codes, dim), torch.where(vectors > 0, 1.0, -1.0))
    item = compress_pages(pages[:1], CompressionConfig(dim=20, quantization="binary"))[0]
    assert item.nbytes == len(pages[0]) * 3


def test_hamming_scoring_is_maxsim_of_one_minus_twice_the_hamming_distance(embedded):
    queries, pages = embedded
    config = CompressionConfig(quantization="binary", binary_scoring="hamming")
    out = compress_pages(pages, config)
    scores = score(queries, out, config)
    expected = np.zeros(scores.shape)
    for i, query in enumerate(queries):  # popcount of XOR on packed bits, as a binary index computes it
        q_bits = np.packbits(query.float().numpy() > 0, axis=-1)
        for j, page in enumerate(out):
            xor = np.bitwise_xor(q_bits[:, None, :], page.codes.numpy()[None, :, :])
            hamming = np.unpackbits(xor, axis=-1).sum(axis=-1)  # (query vectors, page vectors)
            expected[i, j] = (1 - 2 * hamming / 128).max(axis=1).sum()
    assert np.allclose(scores.numpy(), expected, atol=1e-4)


def test_binary_with_rescoring_recovers_the_exact_top_k_order(embedded):
    queries, pages = embedded
    k = 5
    exact = _top(max_sim(queries, pages), k)
    bits = CompressionConfig(quantization="binary")
    alone = _top(score(queries, compress_pages(pages, bits), bits), k)
    assert sum(a == b for a, b in zip(alone, exact)) < len(exact) / 2  # the bits alone get most orders wrong
    config = CompressionConfig(quantization="binary", rescore=12)  # half of the 24 pages re-scored
    out = compress_pages(pages, config)
    assert all(item.nbytes == len(page) * 16 and item.rescore_bytes == len(page) * 128 * 2
               for item, page in zip(out, pages))
    assert _top(score(queries, out, config), k) == exact

    # A rough first stage (16 bits a vector): wherever the exact top k are among the candidates, their order is exact.
    rough = CompressionConfig(dim=16, quantization="binary", rescore=8)
    cut_queries, cut_pages = prepare_queries(queries, rough), compress_pages(pages, rough)
    cut_exact = _top(max_sim(cut_queries, compress_pages(pages, CompressionConfig(dim=16))), k)
    candidates = _top(score(cut_queries, cut_pages, CompressionConfig(dim=16, quantization="binary")), 8)
    rescored = _top(score(cut_queries, cut_pages, rough), k)
    covered = [i for i in range(len(queries)) if set(cut_exact[i]) <= set(candidates[i])]
    assert 0 < len(covered) < len(queries)
    assert all(rescored[i] == cut_exact[i] for i in covered)


def test_rescored_pages_rank_first_and_the_others_keep_their_order():
    generator = torch.Generator().manual_seed(0)
    pages = [torch.nn.functional.normalize(torch.randn(n, 8, generator=generator), dim=-1) for n in (3, 5, 2, 4, 6)]
    queries = [torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=-1)]
    items = compress_pages(pages, CompressionConfig(quantization="binary", rescore=2))
    approx = torch.tensor([[5.0, 4.0, 3.0, 2.0, float("-inf")]])
    out = rescore_top(queries, items, approx, 2)
    exact = max_sim(queries, pages)
    assert torch.allclose(out[0, :2], exact[0, :2], atol=1e-2)  # float16 copies of the candidates
    assert out[0, 2:4].max() < out[0, :2].min() and out[0, 2] > out[0, 3]  # below, in their order
    assert out[0, 4] == float("-inf")
