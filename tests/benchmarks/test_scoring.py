"""The scoring benchmark runs end to end on tiny inputs and writes its JSON (no timing assertions)."""

import json

import pytest
import torch

from colintern.benchmarks import scoring as scoring_benchmark
from colintern.benchmarks.scoring import ScoringInputsConfig, make_inputs, top_k_overlap
from colintern.model.scoring import max_sim_reference
from scripts.benchmark import build_parser
from scripts.benchmark import main as benchmark_main


def test_inputs_are_deterministic_ragged_normalised_and_16_bit():
    config = ScoringInputsConfig.quick()
    queries, pages, targets = make_inputs(config)
    again, _, _ = make_inputs(config)
    assert all(torch.equal(a, b) for a, b in zip(queries, again))
    assert len(queries) == config.n_queries and len(pages) == config.n_pages and len(targets) == config.n_queries
    lengths = {len(p) for p in pages}
    assert len(lengths) > 1 and min(lengths) >= config.page_tokens[0] and max(lengths) <= config.page_tokens[1]
    assert all(p.dtype == torch.bfloat16 for p in pages)
    norms = torch.cat([p.float().norm(dim=-1) for p in pages])
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-2, rtol=0)
    # each query's target page is its best match
    assert (max_sim_reference(queries, pages).argmax(dim=1) == torch.tensor(targets)).all()


def test_top_k_overlap_counts_ties_with_the_reference_kth_score_as_shared():
    reference = torch.tensor([[5.0, 4.0, 3.0, 3.0, 1.0]])
    ours = torch.tensor([[5.0, 4.0, 2.9, 3.1, 1.0]])  # picks page 3 where the reference's topk picks page 2: a tie
    assert top_k_overlap(ours, reference, k=3, tie_aware=True) == 1.0
    assert top_k_overlap(ours, reference, k=3, tie_aware=False) == pytest.approx(2 / 3)
    worse = torch.tensor([[5.0, 0.0, 3.0, 3.0, 4.5]])  # page 4 is outside the reference's top 3
    assert top_k_overlap(worse, reference, k=3, tie_aware=True) == pytest.approx(2 / 3)


def test_quick_benchmark_in_process_writes_the_issue_keys(tmp_path):
    args = build_parser().parse_args(
        ["scoring", "--quick", "--in-process", "--rounds", "2", "--output-dir", str(tmp_path)]
    )
    assert benchmark_main(args) == 0
    result = json.loads((tmp_path / "scoring.json").read_text())
    assert {"speedup_vs_colpali_engine", "top10_overlap", "max_abs_score_diff_vs_colpali_engine"} <= set(result)
    assert set(result["implementations"]) == {"colintern", "colpali_engine", "mteb"}
    ours = result["implementations"]["colintern"]
    assert ours["max_abs_error_vs_float64"] < 1e-4  # exact up to float32 rounding
    assert result["top10_overlap"] >= 0.99
    assert ours["seconds"] > 0 and ours["peak_memory_bytes"] is not None
    assert result["machine"]["colpali_engine"] and result["command"].startswith("python")
    # interleaved rounds: medians with their spread, the load averages and a quiet / under-load label
    names = ["colintern", "colpali_engine", "mteb"]
    assert result["timing"]["order"] == names + names[::-1]
    assert len(ours["seconds_per_round"]) == 2 and ours["seconds"] == ours["seconds_median"]
    assert ours["seconds_min"] <= ours["seconds"] <= ours["seconds_max"] and ours["spread"] >= 0
    theirs = result["implementations"]["colpali_engine"]
    assert result["speedup_vs_colpali_engine"] == pytest.approx(theirs["seconds_median"] / ours["seconds_median"])
    assert result["conditions"] == "quiet" or result["conditions"].startswith("under load (load avg ")
    assert len(result["load_average"]["start"]) == 3 and len(result["load_average"]["end"]) == 3


def test_each_implementation_can_run_in_its_own_process(tmp_path):
    plan = scoring_benchmark.ScoringRun(inputs=ScoringInputsConfig.quick(), implementations=("colintern",))
    figures = scoring_benchmark.benchmark_scoring(plan)
    ours = figures["implementations"]["colintern"]
    assert figures["isolated_processes"] and ours["peak_memory_bytes"] is not None
    assert ours["memory_method"].startswith("VmHWM")
    assert ours["max_abs_error_vs_float64"] < 1e-4 and ours["target_page_at_rank_1"] == 1.0
