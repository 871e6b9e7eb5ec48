import pytest
import torch
import torch.nn.functional as F

from colintern.model.scoring import max_sim, max_sim_reference


def ragged(n: int, low: int, high: int, dim: int, seed: int, negative: bool = False) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        x = F.normalize(torch.randn(length, dim, generator=generator), dim=-1)
        if negative:  # every similarity with a positive-orthant query is negative
            x = -x.abs()
        out.append(x)
    return out


def test_matches_brute_force_on_ragged_inputs():
    qs = ragged(7, 1, 12, 16, seed=0)
    ps = ragged(23, 1, 40, 16, seed=1)
    torch.testing.assert_close(max_sim(qs, ps), max_sim_reference(qs, ps), rtol=1e-5, atol=1e-5)


def test_padding_never_wins_when_all_similarities_are_negative():
    qs = [x.abs() for x in ragged(5, 2, 6, 8, seed=2)]
    ps = ragged(9, 1, 30, 8, seed=3, negative=True)
    expected = max_sim_reference(qs, ps)
    assert (expected < 0).all()
    # zero-padded tensor input: the zero rows are padding and must not raise the max to 0
    padded_ps = torch.nn.utils.rnn.pad_sequence(ps, batch_first=True)
    padded_qs = torch.nn.utils.rnn.pad_sequence(qs, batch_first=True)
    torch.testing.assert_close(max_sim(padded_qs, padded_ps), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(max_sim(qs, ps), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_elements", [1, 37, 1000, 1 << 24])
def test_chunking_does_not_change_scores(chunk_elements):
    qs = ragged(6, 1, 9, 32, seed=4)
    ps = ragged(17, 1, 25, 32, seed=5)
    torch.testing.assert_close(
        max_sim(qs, ps, chunk_elements=chunk_elements), max_sim_reference(qs, ps), rtol=1e-5, atol=1e-5
    )


def test_sixteen_bit_inputs_give_float32_scores_close_to_reference():
    qs = [x.to(torch.bfloat16) for x in ragged(4, 3, 8, 128, seed=6)]
    ps = [x.to(torch.bfloat16) for x in ragged(11, 5, 60, 128, seed=7)]
    scores = max_sim(qs, ps)
    assert scores.dtype == torch.float32 and scores.shape == (4, 11)
    torch.testing.assert_close(scores, max_sim_reference(qs, ps), rtol=1e-4, atol=1e-3)


def test_masked_positions_inside_a_sequence_are_ignored():
    q = F.normalize(torch.ones(2, 4), dim=-1)
    page = -F.normalize(torch.rand(5, 4) + 0.1, dim=-1)
    page_with_holes = torch.cat([torch.zeros(2, 4), page[:3], torch.zeros(1, 4), page[3:]])
    assert torch.allclose(max_sim([q], [page_with_holes]), max_sim([q], [page]))


def test_empty_page_scores_minus_infinity_and_bad_shapes_are_rejected():
    q = [F.normalize(torch.randn(3, 4), dim=-1)]
    assert max_sim(q, [torch.zeros(5, 4)]).item() == float("-inf")
    with pytest.raises(ValueError, match="No queries"):
        max_sim([], [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="dim"):
        max_sim([torch.randn(2, 4)], [torch.randn(2, 5)])


def test_empty_queries_score_zero_and_empty_pages_minus_infinity_among_others():
    qs = [torch.zeros(3, 8), *ragged(3, 2, 5, 8, seed=8)]
    ps = [*ragged(4, 3, 9, 8, seed=9), torch.zeros(2, 8)]
    scores = max_sim(qs, ps, chunk_elements=40)
    torch.testing.assert_close(scores, max_sim_reference(qs, ps), rtol=1e-5, atol=1e-5)
    assert (scores[0, :4] == 0).all() and torch.isinf(scores[:, 4]).all()
    only_empty_queries = max_sim([torch.zeros(2, 8)], ps)
    assert (only_empty_queries[0, :4] == 0).all() and torch.isinf(only_empty_queries[0, 4])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_compute_path_used_on_gpus_is_close_to_reference(dtype):
    # On CUDA 16-bit inputs are multiplied in 16 bits; the same code runs on the CPU when asked for that dtype.
    from colintern.model.scoring import _max_sim_torch

    qs = [x.to(dtype) for x in ragged(5, 3, 9, 64, seed=10)]
    ps = [x.to(dtype) for x in ragged(13, 4, 50, 64, seed=11)]
    scores = _max_sim_torch(qs, ps, torch.device("cpu"), dtype, chunk_elements=500)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, max_sim_reference(qs, ps), rtol=0, atol=0.05)


def test_backend_choice_is_validated():
    q, p = ragged(2, 1, 3, 8, seed=12), ragged(2, 1, 3, 8, seed=13)
    with pytest.raises(ValueError, match="backend must be one of"):
        max_sim(q, p, backend="triton")
    with pytest.raises(ValueError, match="late-interaction-kernels"):
        max_sim(q, p, device="cpu", backend="lik")
    torch.testing.assert_close(max_sim(q, p, backend="torch"), max_sim(q, p, backend="auto"))


def test_late_interaction_kernels_route_packs_chunks_and_handles_empty_inputs(monkeypatch):
    """The adapter to late-interaction-kernels' varlen kernel (CUDA-only, not installed here), run against a
    brute-force stand-in with the kernel's documented contract: packed tokens + int32 cumulative offsets."""
    import sys
    import types

    from colintern.model import scoring

    def maxsim_varlen(q_packed, d_packed, cu_q, cu_d):
        assert cu_q.dtype == torch.int32 and cu_d.dtype == torch.int32 and q_packed.dtype == torch.bfloat16
        out = torch.zeros(len(cu_q) - 1, len(cu_d) - 1)
        for i in range(len(cu_q) - 1):
            q = q_packed[cu_q[i] : cu_q[i + 1]].double()
            for j in range(len(cu_d) - 1):
                d = d_packed[cu_d[j] : cu_d[j + 1]].double()
                out[i, j] = 0.0 if len(q) == 0 else (q @ d.T).max(dim=1).values.sum()
        return out

    monkeypatch.setitem(sys.modules, "late_interaction_kernels", types.SimpleNamespace(maxsim_varlen=maxsim_varlen))
    monkeypatch.setattr(scoring, "LIK_CHUNK_TOKENS", 20)  # several kernel calls
    qs = [x.to(torch.bfloat16) for x in [torch.zeros(2, 16), *ragged(3, 2, 6, 16, seed=14)]]
    ps = [x.to(torch.bfloat16) for x in [*ragged(6, 3, 15, 16, seed=15), torch.zeros(3, 16)]]
    queries, pages = scoring._as_token_list(qs, "queries"), scoring._as_token_list(ps, "pages")
    scores = scoring._max_sim_lik(queries, pages, torch.device("cpu"), torch.bfloat16)
    torch.testing.assert_close(scores, max_sim_reference(qs, ps), rtol=0, atol=1e-4)


@pytest.mark.parametrize("chunk_elements", [50, 1 << 24])
def test_absent_tokens_inside_list_pages_are_ignored_across_chunks(chunk_elements):
    """List inputs keep their zero rows until the chunk is built; they must never win a max nor count as tokens."""
    generator = torch.Generator().manual_seed(16)
    qs = [x.abs() for x in ragged(4, 2, 6, 8, seed=17)]
    clean = ragged(10, 2, 12, 8, seed=18, negative=True)
    holey = []
    for page in clean:
        rows = list(page)
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            rows.insert(int(torch.randint(0, len(rows) + 1, (1,), generator=generator)), torch.zeros(8))
        holey.append(torch.stack(rows))
    holey += [torch.zeros(3, 8), torch.zeros(0, 8)]
    expected = max_sim_reference(qs, [*clean, torch.zeros(0, 8), torch.zeros(0, 8)])
    scores = max_sim(qs, holey, chunk_elements=chunk_elements)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert torch.isinf(scores[:, -2:]).all() and (scores[:, :-2] < 0).all()
    assert torch.isinf(max_sim(qs, [torch.zeros(0, 8)])).all()
