"""Optuna search on the tiny real model and a small real SynthDocs folder: pruning, failed trials, resuming, the memory
constraint (InternVL3.5-1B's real shape on the meta device), multi-objective Pareto fronts, and the outputs."""

import glob
import json
import logging
import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    fail_stale_trials,
    open_storage,
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
        assert loaded.get("training.learning_rate").log and loaded.get("lora.rank").type == "categorical"
        assert loaded.get("training.per_device_train_batch_size") is not None and loaded.get("training.weight_decay") is not None
    with pytest.raises(ColinternError, match="did you mean lr"):
        space(**{"training.lrr": LR})
    with pytest.raises(ColinternError, match="type must be one of"):
        space(**{"training.learning_rate": {"type": "uniform", "low": 1, "high": 2}})
    with pytest.raises(ColinternError, match="log-scaled range needs low > 0"):
        space(**{"training.learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}})
    with pytest.raises(ColinternError, match="training.per_device_train_batch_size"):
        space(**{"training.per_device_train_batch_size": {"type": "categorical", "choices": ["many"]}})
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
    searched = space(**{"training.per_device_train_batch_size": {"type": "categorical", "choices": [4, 16, 64]},
                        "training.gradient_checkpointing": {"type": "categorical", "choices": [True, False]}})
    bounded, bound = bound_batch_size(base, searched, vram_gib=24)
    assert 16 <= bound < 64 and bounded.get("training.per_device_train_batch_size").choices == (4, 16)
    big = RunConfig()
    big.training.per_device_train_batch_size, big.training.gradient_checkpointing = 16, False
    assert not check_memory(big, 24).fits and check_memory(big, 24).excess_gib > 0
    big.training.gradient_checkpointing = True
    assert check_memory(big, 24).fits

    settings = SearchSettings(output_dir=tmp_path / "study", study_name="fit", n_trials=1, vram_gib=24)
    result = run_search(base, searched, settings,
                        enqueue=[{"training.per_device_train_batch_size": 16, "training.gradient_checkpointing": False}])
    (trial,) = result.study.trials
    assert trial.state == TrialState.PRUNED and "infeasible" in trial.user_attrs["infeasible"]
    assert trial.constraints[MEMORY_CONSTRAINT] > 0 and trial.user_attrs["estimated_peak_gib"] > 24
    assert not (tmp_path / "study" / "trials").exists()  # nothing trained
    record = json.loads(result.best_params_path.read_text())
    assert record["optuna"]["best_trial"] is None and record["optuna"]["trials"]["infeasible"] == 1

    tiny = RunConfig.from_dict({"model": {"name_or_path": "embedded:tiny-internvl3_5", "max_num_visual_tokens": 16}})
    with pytest.raises(ColinternError, match="No batch size in the search space fits"):
        bound_batch_size(tiny, space(**{"training.per_device_train_batch_size": {"type": "categorical", "choices": [4, 8]}}), 0.5)


def test_pruning_failed_trials_outputs_and_resume(colintern_home, small_synthdocs_dir, tmp_path):
    base = tiny_base(small_synthdocs_dir)
    searched = space(**{"training.learning_rate": LR, "training.temperature": TEMPERATURE})
    out = tmp_path / "study"
    settings = SearchSettings(output_dir=out, study_name="s", objectives=("eval_loss",), n_trials=3,
                              pruner="median", pruner_startup_trials=1)
    result = run_search(base, searched, settings, enqueue=[
        {"training.learning_rate": 2e-3, "training.temperature": 0.02},  # learns: the median pruner's reference
        {"training.learning_rate": 1e-7, "training.temperature": 0.02},  # learns nothing: pruned at its first evaluation
        {"training.learning_rate": 1e-3, "training.temperature": 1e-45},  # NaN loss: failed, the study goes on
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
    assert config.training.learning_rate == 2e-3 and config.training.temperature == 0.02
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and "params_training.learning_rate" in rows[0] and "COMPLETE" in rows[1] and "PRUNED" in rows[2]
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
    searched = space(**{"training.learning_rate": LR, "training.per_device_train_batch_size": {"type": "categorical", "choices": [4, 8]}})
    out = tmp_path / "pareto"
    settings = SearchSettings(output_dir=out, study_name="p", objectives=("ndcg", "memory"), n_trials=2)
    result = run_search(base, searched, settings, enqueue=[{"training.learning_rate": 1e-3, "training.per_device_train_batch_size": 4},
                                                           {"training.learning_rate": 1e-3, "training.per_device_train_batch_size": 8}])
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
    searched = space(**{"training.learning_rate": {"type": "float", "low": 5e-4, "high": 2e-3, "log": True}})
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
        run_search(base, space(**{"training.learning_rate": LR}), SearchSettings(output_dir=out, study_name="c", n_trials=3))
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
    space_file.write_text("parameters:\n  training.learning_rate: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}\n"
                          "  training.per_device_train_batch_size: {type: categorical, choices: [4, 8]}\n")
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
    assert config["training"]["learning_rate"] == record["learning_rate"]
    assert config["training"]["per_device_train_batch_size"] == record["per_device_train_batch_size"]



def test_script_errors_are_one_line(capsys, tmp_path):
    import importlib.util

    from colintern.cli import run

    spec = importlib.util.spec_from_file_location("optuna_optimizer", REPO_ROOT / "scripts" / "optuna_optimizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--preset", "demo", "--output-dir", str(tmp_path), "--objective", "memory"]
    assert run(script.main, script.build_parser(), argv) == 2
    assert "error: --objective memory: the first objective must be" in capsys.readouterr().err



def test_storage_errors_are_one_line(tmp_path):
    """--storage bogus:// used to end in SQLAlchemy's traceback; a refused connection names the URL without its
    password."""
    with pytest.raises(ColinternError, match=r"--storage bogus://x: cannot open it \(Can't load plugin"):
        open_storage("bogus://x", tmp_path)
    with pytest.raises(ColinternError, match=r"--storage postgresql://user:\*\*\*@127.0.0.1:1/x: cannot open it") as e:
        open_storage("postgresql://user:secret@127.0.0.1:1/x", tmp_path)
    assert "secret" not in str(e.value)
    assert isinstance(open_storage(str(tmp_path / "s.journal"), tmp_path), optuna.storages.JournalStorage)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_workers_and_optunas_heartbeat_retry(tmp_path):
    """Which trials belong to a dead worker, and Optuna's heartbeat retrying a silent one (a worker on another
    machine, which the process check cannot see) with the dead run's attributes left out of the retry."""
    from colintern.tuning.search.storage import retry_stale_trial, worker_identity, worker_is_gone

    me = worker_identity()
    assert not worker_is_gone(me)
    exited = subprocess.Popen(["true"])
    exited.wait()
    assert worker_is_gone({**me, "pid": exited.pid, "start": None})
    assert worker_is_gone({**me, "start": me["start"] + 1})  # the pid now belongs to another process
    assert not worker_is_gone({**me, "host": "elsewhere", "pid": exited.pid})  # another machine: cannot tell

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'h.db'}", heartbeat_interval=1, grace_period=1,
                                         heartbeat_stale_trial_callback=retry_stale_trial)
    study = optuna.create_study(study_name="h", storage=storage)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr("worker", {**me, "host": "elsewhere"})
    trial.set_user_attr("estimated_peak_gib", 1.5)
    trial.set_constraint(MEMORY_CONSTRAINT, -0.5)
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)
    fail_stale_trials(study)
    first, retry = study.trials
    assert first.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.params == first.params and retry.system_attrs["failed_trial"] == 0
    assert first.constraints == {MEMORY_CONSTRAINT: -0.5} and not retry.constraints  # the rerun measures its own
    assert retry.user_attrs == {"estimated_peak_gib": 1.5, "retry_of": 0, "retry_reason": "heartbeat"}
    assert counted_trials(study) == 0  # the retry counts once it has run, the silent trial never


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("optuna_optimizer", REPO_ROOT / "scripts" / "optuna_optimizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_a_study_where_every_trial_failed_is_an_error(colintern_home, small_synthdocs_dir, tmp_path, capsys):
    """Every trial ends in a NaN loss: the script exits 2 naming the first failure and its log file (it used to
    print an empty summary and exit 0)."""
    from colintern.cli import run

    space_file = tmp_path / "space.yaml"
    space_file.write_text("parameters:\n  training.temperature: {type: categorical, choices: [1.0e-45]}\n")  # NaN loss
    out = tmp_path / "study"
    script = load_script()
    argv = ["--preset", "demo", "--dataset", str(small_synthdocs_dir), "--max-steps", "2", "--eval-steps", "1",
            "--num-workers", "0", "--max-eval-samples", "24", "--search-space", str(space_file), "--objective",
            "eval_loss", "--output-dir", str(out), "--trials", "2", "--study-name", "nan"]
    assert run(script.main, script.build_parser(), argv) == 2
    err = capsys.readouterr().err
    log = out / "logs" / "trial-0000.log"
    assert "error: All 2 trial(s) of study 'nan' failed. The first, trial 0 (temperature=1e-45), failed (nan): " \
           "NonFiniteLossError" in err
    assert err.rstrip().endswith(f"Its log: {log}")
    text = log.read_text()
    assert "Trial 0 failed (nan)" in text and "Traceback (most recent call last)" in text
    assert "NonFiniteLossError" in text
    record = json.loads((out / "optuna_best_params.json").read_text())  # the outputs are still written
    assert record["optuna"]["best_trial"] is None and record["optuna"]["trials"]["failed"] == 2


def wait_for(condition, timeout: float, what: str, processes=(), log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not condition():
        for process in processes:
            if process.poll() is not None:
                tail = log.read_text()[-3000:] if log is not None else ""
                raise AssertionError(f"{what}: worker {process.pid} exited with {process.returncode} first\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.1)


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_a_killed_worker_s_trial_runs_again_exactly_once(colintern_home, small_synthdocs_dir, tmp_path, storage,
                                                         caplog, capsys):
    """kill -9 in the middle of a trial leaves it RUNNING; the same command again fails it and runs its
    configuration once more, at once (it used to stay RUNNING until the heartbeat's grace period, or forever in a
    journal file, and the resumed study sampled a new configuration instead)."""
    space_file = tmp_path / "space.yaml"
    space_file.write_text("parameters:\n  training.learning_rate: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}\n")
    out = tmp_path / "study"
    args = ["--preset", "demo", "--dataset", str(small_synthdocs_dir), "--max-steps", "6", "--eval-steps", "2",
            "--num-workers", "0", "--max-eval-samples", "24", "--search-space", str(space_file), "--objective",
            "eval_loss", "--output-dir", str(out), "--study-name", "k", "--trials", "1"]
    if storage == "journal":
        args += ["--storage", str(tmp_path / "k.journal")]
        optuna_storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "k.journal")))
    else:
        optuna_storage = f"sqlite:///{out / 'optuna.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen([sys.executable, "scripts/optuna_optimizer.py", *args], cwd=REPO_ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)

    def training() -> bool:  # trial 0 has reported its first evaluation: it is in the middle of training
        if not (out / "trials" / "trial-0000" / "colintern_run.json").is_file():
            return False  # (the storage is not polled before the worker has made it: no race to create its tables)
        study = optuna.load_study(study_name="k", storage=optuna_storage)
        return any(t.state == TrialState.RUNNING and t.intermediate_values for t in study.trials)

    try:
        wait_for(training, 300, "trial 0 training", [worker], tmp_path / "worker.log")
    finally:
        worker.kill()  # SIGKILL
        worker.wait()
    (killed,) = optuna.load_study(study_name="k", storage=optuna_storage).trials
    assert killed.state == TrialState.RUNNING and killed.user_attrs["worker"]["pid"] == worker.pid

    from colintern.cli import run

    script = load_script()
    caplog.set_level(logging.INFO)
    assert run(script.main, script.build_parser(), args) == 0  # the same command again (in this process: faster)
    assert f"Trial 0: its worker (process {worker.pid}) is gone; the configuration runs again." in caplog.text
    study = optuna.load_study(study_name="k", storage=optuna_storage)
    first, rerun = study.trials
    assert first.state == TrialState.FAIL and rerun.state == TrialState.COMPLETE
    assert rerun.params == first.params and rerun.user_attrs["retry_of"] == 0
    assert rerun.system_attrs["failed_trial"] == 0  # Optuna's record (RetryHeartbeatStaleTrialCallback)
    assert rerun.user_attrs["worker"]["pid"] != worker.pid and counted_trials(study) == 1
    assert "trial 1: eval_loss" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ PostgreSQL
def postgres_bin() -> Path | None:
    """initdb and pg_ctl: on PATH, or in Debian's /usr/lib/postgresql/<version>/bin (not on PATH)."""
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return Path(shutil.which("initdb")).parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) for x in
                         Path(p).parent.name.split(".") if x.isdigit()], reverse=True):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres_url(tmp_path):
    """A throwaway PostgreSQL cluster on a free local port (Debian: apt-get install postgresql).

    PostgreSQL refuses to run as root. Run as root (as here), the cluster belongs to the package's unprivileged
    `postgres` user and every PostgreSQL command runs through `runuser -u postgres --`; its folder is then a
    fresh `mkdtemp` under /tmp handed to that user, because tmp_path lies below pytest's root-only (0700)
    /tmp/pytest-of-root, which `postgres` cannot enter. Run as anyone else, the cluster lives in tmp_path."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed: no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin "
                    "(Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is not installed (pip install -e .[dev])")
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no 'postgres' user to run PostgreSQL as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root, and there is no runuser to run PostgreSQL as the 'postgres' user")
        home = Path(tempfile.mkdtemp(prefix="colintern-pg-"))
        os.chown(home, owner.pw_uid, owner.pw_gid)
        prefix = [shutil.which("runuser"), "-u", "postgres", "--"]
    else:
        home = tmp_path / "postgres"
        home.mkdir()
    data, port = home / "data", free_port()

    def pg(*command, timeout=120):
        return subprocess.run([*prefix, *map(str, command)], cwd=home, capture_output=True, text=True,
                              timeout=timeout, check=False)

    try:
        made = pg(bindir / "initdb", "-D", data, "-U", "colintern", "-A", "trust", "-E", "UTF8", "--no-sync")
        assert made.returncode == 0, made.stdout + made.stderr
        started = pg(bindir / "pg_ctl", "-D", data, "-l", home / "server.log", "-w", "-t", "60", "-o",
                     f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"postgresql://colintern@127.0.0.1:{port}/postgres"
    finally:
        pg(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop", timeout=60)
        if prefix:
            shutil.rmtree(home, ignore_errors=True)


def start_worker(spec: dict, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "tests.tuning.search_worker", json.dumps(spec)],
                                cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


def test_postgresql_two_workers_one_killed(colintern_home, small_synthdocs_dir, tmp_path, postgres_url):
    """Two workers share a study on a real PostgreSQL server; one is killed (SIGKILL) in the middle of a trial. The
    other runs the dead worker's configuration again: every configuration completes exactly once, and each value
    (so the best) equals a single worker's run of the same configurations."""
    configs = [{"training.learning_rate": lr} for lr in (3e-4, 1e-3, 3e-3, 1e-2)]
    common = {"dataset": str(small_synthdocs_dir), "max_steps": 4, "eval_steps": 2, "n_trials": len(configs),
              "space": {"training.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}}
    storage = optuna.storages.RDBStorage(postgres_url)
    study = optuna.create_study(study_name="pg", storage=storage, direction="minimize")
    for params in configs:  # queued before the workers start, so that they never race to enqueue
        study.enqueue_trial(params)
    gate = tmp_path / "gate"
    gate.mkdir()
    shared = {**common, "storage": postgres_url, "study": "pg", "output_dir": str(tmp_path / "pg"),
              "gate": str(gate)}
    a = start_worker(shared, tmp_path / "a.log")
    b = start_worker(shared, tmp_path / "b.log")
    single = start_worker({**common, "storage": None, "study": "one", "output_dir": str(tmp_path / "one"),
                           "enqueue": configs}, tmp_path / "single.log")
    try:
        wait_for(lambda: {p.name for p in gate.iterdir()} >= {f"paused-{a.pid}", f"paused-{b.pid}"}, 300,
                 "both workers in their first trial", [a, b])
        a.kill()  # SIGKILL, after its first training step
        a.wait()
        (gate / "go").touch()
        assert b.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()[-3000:]
        assert single.wait(timeout=300) == 0, (tmp_path / "single.log").read_text()[-3000:]
    finally:
        for process in (a, b, single):
            process.kill()
            process.wait()

    trials = optuna.load_study(study_name="pg", storage=storage).trials
    storage.remove_session()
    storage.engine.dispose()  # the server stops next
    (killed,) = [t for t in trials if t.user_attrs["worker"]["pid"] == a.pid]
    assert killed.state == TrialState.FAIL
    assert f"its worker (process {a.pid}) is gone" in (tmp_path / "b.log").read_text()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["training.learning_rate"] for t in complete) == sorted(c["training.learning_rate"] for c in configs)
    assert all(t.user_attrs["worker"]["pid"] == b.pid for t in complete)
    (rerun,) = [t for t in complete if t.user_attrs.get("retry_of") == killed.number]
    assert rerun.params == killed.params and len(trials) == len(configs) + 1

    reference = optuna.load_study(study_name="one", storage=f"sqlite:///{tmp_path / 'one' / 'optuna.db'}")
    assert [t.state for t in reference.trials] == [TrialState.COMPLETE] * len(configs)
    expected = {t.params["training.learning_rate"]: t.value for t in reference.trials}
    for t in complete:
        assert math.isclose(t.value, expected[t.params["training.learning_rate"]], rel_tol=1e-6), (t.params, t.value, expected)
    best = min(complete, key=lambda t: t.value)
    assert best.params == reference.best_params and math.isclose(best.value, reference.best_value, rel_tol=1e-6)


def test_a_search_space_with_the_old_training_names_still_works():
    """Search spaces written before the training options took TrainingArguments' names (training.lr, ...)."""
    from colintern.training.arguments import advisor_key
    from colintern.tuning.search.space import trial_config

    old = space(**{"training.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},
                   "training.batch_size": {"type": "categorical", "choices": [4, 8]}})
    assert old.get("training.per_device_train_batch_size").choices == (4, 8)  # what the memory bound looks up
    config = trial_config(RunConfig(), {"training.lr": 2e-4, "training.batch_size": 8})
    assert (config.training.learning_rate, config.training.per_device_train_batch_size) == (2e-4, 8)
    assert advisor_key("training.lr") == "learning_rate" and advisor_key("lora.rank") == "lora_rank"
