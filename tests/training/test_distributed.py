"""Multi-process training on the CPU with the gloo backend, launched by torchrun as users launch GPU runs."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def torchrun(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)


def test_each_rank_uses_the_pages_of_both_ranks_as_negatives(tmp_path):
    out = tmp_path / "ranks.json"
    done = torchrun("tests/ddp_negatives_check.py", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["gathered_pages"] == 6 and r["offset"] == 3 * r["rank"]
        assert abs(r["loss"] - r["reference"]) < 1e-5  # exactly the loss over both ranks' pages
        assert abs(r["loss"] - r["local_only"]) > 1e-4  # and not the loss over this rank's pages alone
        assert r["grad_ok"]


def test_torchrun_trains_the_demo_on_two_cpu_processes(colintern_home, small_synthdocs_dir, tmp_path):
    out = tmp_path / "ddp"
    done = torchrun("scripts/train.py", "--preset", "demo", "--dataset", str(small_synthdocs_dir), "--max-steps", "3",
                    "--batch-size", "4", "--output-dir", str(out), "--num-workers", "0", "--eval-steps", "3",
                    "--save-steps", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    from colintern.model.checkpoints import inspect_checkpoint

    assert inspect_checkpoint(out / "checkpoint-3").complete
