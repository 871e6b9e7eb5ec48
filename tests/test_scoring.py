import pytest
import torch
import torch.nn.functional as F

from colintern.scoring import max_sim, max_sim_reference


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
