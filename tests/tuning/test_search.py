"""Optuna search on the tiny real model and a small real SynthDocs folder: pruning, failed trials, resuming, the memory
constraint (InternVL3.5-1B's real shape on the meta device), multi-objective Pareto fronts, and the outputs."""

import json
import os
import signal
import subprocess
import sys

import optuna
import pytest
import torch
from optuna.trial import TrialState
from PIL import Image
from transformers import TrainerCallback

from colintern.training.arguments import RunConfig, advisor_overrides, apply_overrides
from colintern.tuning.search import (
    MEMORY_CONSTRAINT,
    SearchSettings,
    SearchSpace,
    bound_batch_size,
    build_pruner,
    check_memory,
    counted_trials,
    default_search_space_path,
    parse_objectives,
    run_search,
)
from colintern.utils import ColinternError

from tests.conftest import REPO_ROOT


def tiny_base(dataset, **training) -> RunConfig:
    """Full training of the tiny model (as the demo preset), 4 steps of batch 8, evaluated every 2 steps."""
    return RunConfig.from_dict({
        "model": {"name_or_path": "embedded:tiny-internvl3_5", "max_num_visual_tokens": 16, "dtype": "float32"},
        "data": {"dataset": str(dataset), "eval_split": "validation", "max_eval_samples": 24},
        "lora": {"enabled": False},
        "training": {"max_steps": 4, "batch_size": 8, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 0, "eval_steps": 2,
                     "logging_steps": 1, "report_to": "none", "gradient_checkpointing": False, "bf16": "false",
                     "dataloader_num_workers": 0, "train_vision": True, **training},
    })


def space(**parameters) -> SearchSpace:
    return SearchSpace.from_dict({"parameters": parameters})


LR = {"type": "float", "low": 1e-7, "high": 1e-2, "log": True}
# temperature 1e-45 (a float32 subnormal) overflows the scores to inf: a real NaN loss (0 itself is refused up front)
TEMPERATURE = {"type": "categorical", "choices": [0.02, 1e-45]}


def assert_png(path):
    assert path.is_file(), path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_search_space_files_and_errors():
    for preset, name in (("demo", "optuna_search_space_demo.yaml"), ("colintern3_5-1b", "optuna_search_space.yaml")):
        path = default_search_space_path(preset)
        assert path.name == name
        loaded = SearchSpace.from_yaml(path)
        assert loaded.get("training.lr").log and loaded.get("lora.rank").type == "categorical"
        assert loaded.get("training.batch_size") is not None and loaded.get("training.weight_decay") is not None
    with pytest.raises(ColinternError, match="did you mean lr"):
        space(**{"training.lrr": LR})
    with pytest.raises(ColinternError, match="type must be one of"):
        space(**{"training.lr": {"type": "uniform", "low": 1, "high": 2}})
    with pytest.raises(ColinternError, match="log-scaled range needs low > 0"):
        space(**{"training.lr": {"type": "float", "low": 0, "high": 1, "log": True}})
    with pytest.raises(ColinternError, match="training.batch_size"):
        space(**{"training.batch_size": {"type": "categorical", "choices": ["many"]}})
    demo = RunConfig.from_dict({"training": {"max_steps": 480, "eval_steps": 160}})
    hyperband = build_pruner(SearchSettings(output_dir="x", pruner="hyperband"), demo)
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    assert isinstance(build_pruner(SearchSettings(output_dir="x", objectives="ndcg,memory"), demo),
                      optuna.pruners.NopPruner)  # Optuna cannot prune multi-objective trials
    assert parse_objectives("ndcg, memory") == ("ndcg", "memory")
    with pytest.raises(ColinternError, match="first objective"):
        parse_objectives("memory,ndcg")
    with pytest.raises(ColinternError, match="choose from"):
        parse_objectives("accuracy")


def test_memory_constraint_rejects_configurations_before_training(tmp_path):
    """InternVL3.5-1B's real shape (meta device, no weights) on a 24 GiB GPU: batch 64 cannot fit anywhere in the
    space, so it is dropped; batch 16 fits only with gradient checkpointing, so the trial without it is rejected
    before any model is loaded (offline, the 1B weights do not even exist here)."""
    base = RunConfig()  # the 1B preset's defaults: LoRA r=32, 1536 visual tokens, bf16
    searched = space(**{"training.batch_size": {"type": "categorical", "choices": [4, 16, 64]},
                        "training.gradient_checkpointing": {"type": "categorical", "choices": [True, False]}})
    bounded, bound = bound_batch_size(base, searched, vram_gib=24)
    assert 16 <= bound < 64 and bounded.get("training.batch_size").choices == (4, 16)
    big = RunConfig()
    big.training.batch_size, big.training.gradient_checkpointing = 16, False
    assert not check_memory(big, 24).fits and check_memory(big, 24).excess_gib > 0
    big.training.gradient_checkpointing = True
    assert check_memory(big, 24).fits

    settings = SearchSettings(output_dir=tmp_path / "study", study_name="fit", n_trials=1, vram_gib=24)
    result = run_search(base, searched, settings,
                        enqueue=[{"training.batch_size": 16, "training.gradient_checkpointing": False}])
    (trial,) = result.study.trials
    assert trial.state == TrialState.PRUNED and "infeasible" in trial.user_attrs["infeasible"]
    assert trial.constraints[MEMORY_CONSTRAINT] > 0 and trial.user_attrs["estimated_peak_gib"] > 24
    assert not (tmp_path / "study" / "trials").exists()  # nothing trained
    record = json.loads(result.best_params_path.read_text())
    assert record["optuna"]["best_trial"] is None and record["optuna"]["trials"]["infeasible"] == 1

    tiny = RunConfig.from_dict({"model": {"name_or_path": "embedded:tiny-internvl3_5", "max_num_visual_tokens": 16}})
    with pytest.raises(ColinternError, match="No batch size in the search space fits"):
        bound_batch_size(tiny, space(**{"training.batch_size": {"type": "categorical", "choices": [4, 8]}}), 0.5)


def test_pruning_failed_trials_outputs_and_resume(colintern_home, small_synthdocs_dir, tmp_path):
    base = tiny_base(small_synthdocs_dir)
    searched = space(**{"training.lr": LR, "training.temperature": TEMPERATURE})
    out = tmp_path / "study"
    settings = SearchSettings(output_dir=out, study_name="s", objectives=("eval_loss",), n_trials=3,
                              pruner="median", pruner_startup_trials=1)
    result = run_search(base, searched, settings, enqueue=[
        {"training.lr": 2e-3, "training.temperature": 0.02},  # learns: the median pruner's reference
        {"training.lr": 1e-7, "training.temperature": 0.02},  # learns nothing: pruned at its first evaluation
        {"training.lr": 1e-3, "training.temperature": 1e-45},  # NaN loss: failed, the study goes on
    ])
    trials = result.study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert list(trials[0].intermediate_values) == [2, 4] and list(trials[1].intermediate_values) == [2]
    assert trials[1].intermediate_values[2] > trials[0].intermediate_values[2]
    assert trials[2].user_attrs["failure"] == "nan" and "NonFiniteLossError" in trials[2].user_attrs["error"]
    statuses = [json.loads((out / "trials" / f"trial-000{i}" / "trial.json").read_text())["status"] for i in range(3)]
    assert statuses == ["complete", "pruned", "failed (nan)"]
    assert (out / "trials" / "trial-0001" / "trainer_state.json").is_file()  # a pruned trial's curve is kept

    # outputs: best parameters usable by scripts/train.py --config-from, the CSV, valid PNGs
    record = json.loads((out / "optuna_best_params.json").read_text())
    assert record["learning_rate"] == 2e-3 and record["training"] == {"temperature": 0.02}
    assert record["optuna"]["best_trial"] == 0 and record["objective"]["eval_loss"] == trials[0].value
    config = RunConfig()
    apply_overrides(config, advisor_overrides(out / "optuna_best_params.json"))
    assert config.training.lr == 2e-3 and config.training.temperature == 0.02
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and "params_training.lr" in rows[0] and "COMPLETE" in rows[1] and "PRUNED" in rows[2]
    for name in ("optimization_history.png", "intermediate_values.png"):
        assert_png(out / name)

    # resume: a larger --trials continues the numbering and never re-runs what is finished
    finished = {t.number: (t.datetime_complete, t.params) for t in trials}
    again = run_search(base, searched, SearchSettings(output_dir=out, study_name="s", objectives=("eval_loss",),
                                                      n_trials=5, pruner_startup_trials=1))
    assert again.ran_trials == 2 and [t.number for t in again.study.trials] == [0, 1, 2, 3, 4]
    assert {t.number: (t.datetime_complete, t.params) for t in again.study.trials[:3]} == finished
    new = [t.params for t in again.study.trials[3:]]
    assert new[0] != new[1] and all(p not in [f[1] for f in finished.values()] for p in new)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in again.study.trials)
    if len([t for t in again.study.trials if t.state == TrialState.COMPLETE]) >= 2:
        assert_png(out / "param_importances.png")

    # the same --trials again: nothing to do; a spent time budget: nothing to do
    assert run_search(base, searched, SearchSettings(output_dir=out, study_name="s", objectives=("eval_loss",),
                                                     n_trials=5)).ran_trials == 0
    assert run_search(base, searched, SearchSettings(output_dir=out, study_name="s", objectives=("eval_loss",),
                                                     n_trials=9, time_budget_hours=1e-6)).ran_trials == 0
    # a different base configuration under the same name is refused, naming the difference
    with pytest.raises(ColinternError, match="training.max_steps: 4 -> 6"):
        run_search(tiny_base(small_synthdocs_dir, max_steps=6), searched,
                   SearchSettings(output_dir=out, study_name="s", objectives=("eval_loss",), n_trials=9))


def test_multi_objective_reports_the_pareto_front(colintern_home, small_synthdocs_dir, tmp_path):
    base = tiny_base(small_synthdocs_dir)
    searched = space(**{"training.lr": LR, "training.batch_size": {"type": "categorical", "choices": [4, 8]}})
    out = tmp_path / "pareto"
    settings = SearchSettings(output_dir=out, study_name="p", objectives=("ndcg", "memory"), n_trials=2)
    result = run_search(base, searched, settings, enqueue=[{"training.lr": 1e-3, "training.batch_size": 4},
                                                           {"training.lr": 1e-3, "training.batch_size": 8}])
    trials = result.study.trials
    assert all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in trials)
    assert all(0 <= t.values[0] <= 1 for t in trials)
    # memory: batch 8 needs more than batch 4 (on the CPU, the memory model's estimate for the GPU budget)
    assert trials[1].values[1] > trials[0].values[1]
    if not torch.cuda.is_available():
        assert trials[0].values[1] == trials[0].user_attrs["estimated_peak_gib"]
    front = {t.number for t in result.study.best_trials}
    record = json.loads(result.best_params_path.read_text())
    assert {p["trial"] for p in record["optuna"]["pareto_front"]} == front and 0 in front
    assert set(record["objective"]) == {"ndcg_at_5", "peak_memory_gib"}
    assert "values_ndcg_at_5" in (out / "trials.csv").read_text().splitlines()[0]
    assert_png(out / "pareto_front.png")
    assert_png(out / "optimization_history.png")


class InterruptAt(TrainerCallback):
    """Ctrl-C (a real SIGINT to this process) while trial `number` trains its second step."""

    def __init__(self, number: int):
        self.number, self.trials_begun = number, -1

    def on_train_begin(self, args, state, control, **kwargs):
        self.trials_begun += 1

    def on_step_begin(self, args, state, control, **kwargs):
        if self.trials_begun == self.number and state.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def interactive_sigint():
    """SIGINT raising KeyboardInterrupt, as in an interactive Python. A process started in the background by a
    non-interactive shell (`make test &`, nohup) inherits SIGINT ignored, and Python then keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupted_trial_runs_again_when_the_study_resumes(
    colintern_home, small_synthdocs_dir, tmp_path, interactive_sigint
):
    base = tiny_base(small_synthdocs_dir)
    searched = space(**{"training.lr": {"type": "float", "low": 5e-4, "high": 2e-3, "log": True}})
    settings = SearchSettings(output_dir=tmp_path / "s", study_name="i", objectives=("eval_loss",), n_trials=2)
    with pytest.raises(KeyboardInterrupt):
        run_search(base, searched, settings, callbacks=[InterruptAt(1)])
    study = run_search(base, searched, settings).study  # the same command again
    first, cut, rerun = study.trials
    assert first.state == TrialState.COMPLETE and cut.state == TrialState.FAIL
    assert cut.user_attrs["interrupted"] == "interrupted"
    assert json.loads((tmp_path / "s" / "trials" / "trial-0001" / "trial.json").read_text())["status"] == "interrupted"
    assert rerun.state == TrialState.COMPLETE and rerun.params == cut.params and rerun.user_attrs["retry_of"] == 1
    assert counted_trials(study) == 2


def test_a_configuration_error_stops_the_search_with_its_message(colintern_home, small_synthdocs_dir, tmp_path):
    base = tiny_base(small_synthdocs_dir, max_steps=2)
    base.data.eval_split = "train"  # pairs, not a retrieval split: no NDCG@5 for any trial
    out = tmp_path / "s"
    with pytest.raises(ColinternError, match="reported no eval_ndcg_at_5"):
        run_search(base, space(**{"training.lr": LR}), SearchSettings(output_dir=out, study_name="c", n_trials=3))
    study = optuna.load_study(study_name="c", storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]  # stopped after one; re-queued
    assert study.trials[0].user_attrs["interrupted"].startswith("stopped: The evaluation reported no")
    assert counted_trials(study) == 0 and (out / "optuna_best_params.json").is_file()


def run_script(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "scripts/optuna_optimizer.py", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO_ROOT)


def test_script_resumes_a_journal_study_and_feeds_train(colintern_home, small_synthdocs_dir, tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("parameters:\n  training.lr: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}\n"
                          "  training.batch_size: {type: categorical, choices: [4, 8]}\n")
    out, journal = tmp_path / "study", tmp_path / "shared" / "study.journal"
    common = ["--preset", "demo", "--dataset", str(small_synthdocs_dir), "--max-steps", "4", "--eval-steps", "2",
              "--num-workers", "0", "--max-eval-samples", "24", "--search-space", str(space_file),
              "--storage", str(journal), "--output-dir", str(out)]
    first = run_script(*common, "--trials", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Best trial:" in first.stdout and "trial 0: ndcg_at_5" in first.stdout
    second = run_script(*common, "--trials", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 trial(s) already finished; continuing to 2" in second.stderr
    assert "Trial 1:" in second.stderr and "Trial 0:" not in second.stderr  # trial 0 is not re-run
    assert journal.is_file() and not (out / "optuna.db").exists()
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["trial-0000", "trial-0001"]

    best = out / "optuna_best_params.json"
    printed = subprocess.run(
        [sys.executable, "scripts/train.py", "--preset", "demo", "--config-from", str(best), "--print-config"],
        capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300)
    assert printed.returncode == 0, printed.stderr[-2000:]
    record = json.loads(best.read_text())
    config = json.loads(printed.stdout)
    assert config["training"]["lr"] == record["learning_rate"]
    assert config["training"]["batch_size"] == record["per_device_train_batch_size"]



def test_script_errors_are_one_line(capsys, tmp_path):
    import importlib.util

    from colintern.cli import run

    spec = importlib.util.spec_from_file_location("optuna_optimizer", REPO_ROOT / "scripts" / "optuna_optimizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--preset", "demo", "--output-dir", str(tmp_path), "--objective", "memory"]
    assert run(script.main, script.build_parser(), argv) == 2
    assert "error: --objective memory: the first objective must be" in capsys.readouterr().err
