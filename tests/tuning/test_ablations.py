import json
import os
import subprocess
import sys

import pytest

from colintern.training.arguments import RunConfig
from colintern.tuning.ablations import ablation_table, parse_vary, plan_ablation, read_log
from colintern.utils import ColinternError

from tests.conftest import REPO_ROOT


def base_config() -> RunConfig:
    return RunConfig.from_dict({"training": {"lr": 1e-3, "batch_size": 32, "grad_accum": 1}, "lora": {"rank": 16}})


def test_one_factor_at_a_time_and_lr_scaling():
    plan = plan_ablation(base_config(), parse_vary(["batch=8,32,128"]), name="b", scale_lr="linear")
    assert [v.name for v in plan.variants] == ["batch_size=8", "batch_size=32", "batch_size=128"]
    assert [v.config.training.learning_rate for v in plan.variants] == [2.5e-4, 1e-3, 4e-3]
    sqrt = plan_ablation(base_config(), parse_vary(["batch=8"]), name="b", scale_lr="sqrt")
    assert sqrt.variants[0].config.training.learning_rate == pytest.approx(5e-4)
    both = plan_ablation(base_config(), parse_vary(["lr=1e-4,1e-3", "rank=4,8"]), name="x")
    assert len(both.variants) == 4  # 2 + 2, one factor at a time
    assert both.variants[2].config.lora.alpha == 4  # alpha follows rank
    grid = plan_ablation(base_config(), parse_vary(["lr=1e-4,1e-3", "rank=4,8"]), name="x", grid=True)
    assert len(grid.variants) == 4 and grid.variants[-1].name == "lr=1e-3,rank=8"
    assert len({v.config_hash for v in grid.variants}) == 4
    with pytest.raises(ColinternError, match="section.field"):
        parse_vary(["nonsense=1"])


def test_an_experiment_name_from_a_config_cannot_place_runs_outside_the_output_root(tmp_path):
    plan = plan_ablation(base_config(), parse_vary(["rank=4"]), name="../../../elsewhere", output_root=tmp_path)
    (variant,) = plan.variants
    assert variant.config.training.output_dir == str(tmp_path / "elsewhere" / "rank=4")


def test_ablation_runs_logs_a_nan_variant_and_skips_finished_ones(colintern_home, small_synthdocs_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "scripts/ablate.py", "--base", "demo", "--name", "temp",
        "--vary", "temperature=0.02,1e-45",  # 1e-45 (float32 subnormal) overflows the scores: a real NaN loss
        "--dataset", str(small_synthdocs_dir), "--max-steps", "3", "--batch-size", "4", "--num-workers", "0",
        "--eval-steps", "3", "--save-steps", "3", "--benchmarks", str(small_synthdocs_dir),
        "--log", str(tmp_path / "log.jsonl"), "--output-root", str(tmp_path / "runs"),
    ]
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_log(tmp_path / "log.jsonl")
    by_variant = {r["variant"]: r for r in records}
    assert by_variant["temperature=0.02"]["status"] == "ok"
    assert by_variant["temperature=0.02"]["ndcg_at_5"] is not None
    assert by_variant["temperature=0.02"]["final_train_loss"] is not None
    nan = by_variant["temperature=1e-45"]
    assert nan["status"] == "nan" and nan["nan"] and "nan" in nan["flags"]
    table = (tmp_path / "temp.md").read_text()
    assert "| temperature=1e-45 | nan |" in table and "| temperature=0.02 | ok |" in table

    again = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(read_log(tmp_path / "log.jsonl")) == 2  # both variants finished: nothing re-ran
    assert "already in" in again.stderr


def test_table_shows_the_latest_record_per_variant():
    records = [
        {"experiment": "e", "variant": "lr=1", "status": "failed", "error": "boom"},
        {"experiment": "e", "variant": "lr=1", "status": "ok", "ndcg_at_5": 0.5, "final_train_loss": 1.25},
        {"experiment": "other", "variant": "lr=2", "status": "ok"},
    ]
    table = ablation_table("e", records)
    assert "| lr=1 | ok | 1.25 |" in table and "lr=2" not in table and "boom" not in table
    json.dumps(records)
