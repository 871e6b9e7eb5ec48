"""The train-step benchmark runs both ways on a few steps of the tiny model and writes its JSON; the --full-size code
path (random InternVL3.5 architecture saved and loaded by both ways, LoRA, MFU) runs on a scaled-down spec."""

import json

from colintern.benchmarks.train_step import COLINTERN, COLPALI, TrainStepRun, benchmark_train_step
from scripts.benchmark import build_parser
from scripts.benchmark import main as benchmark_main


def test_train_step_benchmark_compares_both_ways_on_the_demo_model(tmp_path, tiny_model_dir, small_synthdocs_dir):
    args = build_parser().parse_args([
        "train-step", "--dataset", str(small_synthdocs_dir), "--batch-size", "4", "--steps", "2", "--warmup", "1",
        "--workers", "0", "--reference-workers", "0", "1", "--device", "cpu", "--threads", "1", "--rounds", "2",
        "--output-dir", str(tmp_path),
    ])
    assert benchmark_main(args) == 0
    result = json.loads((tmp_path / "train-step.json").read_text())
    runs = result["implementations"]
    assert set(runs) == {COLINTERN, COLPALI, f"{COLPALI}[workers=1]"}
    for run in runs.values():
        assert run["timed_steps"] == 2 and run["batch_size"] == 4 and run["samples_per_second"] > 0
        assert len(run["losses"]) == 3 and all(loss > 0 for loss in run["losses"])
    # the same model is trained: every parameter of the tiny model (the demo preset trains vision too)
    assert runs[COLINTERN]["trainable_parameters"] == runs[COLPALI]["trainable_parameters"]
    assert result["speedup_vs_colpali_engine"] == runs[COLINTERN]["samples_per_second"] / runs[COLPALI]["samples_per_second"]
    assert "speedup_vs_colpali_engine>=1.5" in result["targets"]
    # interleaved rounds: the median round counts, with the spread, the load averages and the conditions
    assert result["timing"]["order"] == [COLINTERN, COLPALI, f"{COLPALI}[workers=1]",
                                         f"{COLPALI}[workers=1]", COLPALI, COLINTERN]
    ours = runs[COLINTERN]
    assert len(ours["rounds_samples_per_second"]) == 2 and len(ours["seconds_per_round"]) == 2
    assert ours["samples_per_second"] == 4 * 2 / ours["seconds_median"]
    assert min(ours["rounds_samples_per_second"]) <= ours["samples_per_second"] <= ours["samples_per_second_best"]
    assert result["conditions"] == "quiet" or result["conditions"].startswith("under load (load avg ")
    assert result["command"].startswith("python ") and result["machine"]["colpali_engine"]


def test_full_size_train_step_path_runs_on_a_scaled_down_spec(colintern_home, small_synthdocs_dir):
    plan = TrainStepRun(
        preset="colintern3_5-1b", dataset=str(small_synthdocs_dir), batch_size=2, steps=1, warmup=1, device="cpu",
        full_size=True, tiny_full_size=True, page_size=(112, 150), peak_tflops=1.0, threads=1,
        colintern_workers=0, rounds=1,
    )
    figures = benchmark_train_step(plan)
    ours = figures["implementations"][COLINTERN]
    assert ours["tiles_per_page"] > 1  # 112x150 pages on 56px tiles: a grid plus the thumbnail
    assert ours["backward_factor_language_model"] == 1.0  # LoRA: no weight gradients of frozen weights
    assert ours["model_flops_per_sample"] > 0 and 0 < ours["mfu"]
    assert figures["implementations"][COLPALI]["samples_per_second"] > 0
