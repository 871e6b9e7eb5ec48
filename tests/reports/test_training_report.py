"""Training diagnosis on trainer_state.json files written by transformers' own TrainerState (synthetic curves of
the four run types practitioners recognise) and by a real transformers Trainer run."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import TrainerState

from colintern.cli import run
from colintern.training.arguments import RunConfig
from colintern.reports.training import (
    DiagnosisThresholds,
    find_trainer_state,
    read_run_settings,
    training_report,
)
from colintern.utils import ColinternError

REPO_ROOT = Path(__file__).resolve().parents[2]


def linear_warmup_decay(step: int, total: int, peak: float, warmup: int) -> float:
    """transformers' get_linear_schedule_with_warmup."""
    if step < warmup:
        return peak * step / max(1, warmup)
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def write_run(
    run_dir: Path,
    loss_at,
    *,
    epochs: int = 5,
    steps_per_epoch: int = 100,
    logging_steps: int = 10,
    eval_every: int | None = 100,
    eval_at=None,
    grad_at=lambda step: 1.5,
    lr_at=None,
    peak_lr: float = 5e-5,
    warmup: int = 25,
    stop_at: int | None = None,
    config: dict | None = None,
    batch_size: int = 16,
) -> Path:
    """A run directory as the Trainer leaves it: trainer_state.json (TrainerState.save_to_json) with log entries
    in the Trainer's keys, and optionally colintern_run.json."""
    total = epochs * steps_per_epoch
    last = stop_at or total
    lr_at = lr_at or (lambda step: linear_warmup_decay(step, total, peak_lr, warmup))
    state = TrainerState(
        epoch=last / steps_per_epoch,
        global_step=last,
        max_steps=total,
        logging_steps=logging_steps,
        eval_steps=eval_every or 500,
        save_steps=steps_per_epoch,
        train_batch_size=batch_size,
        num_train_epochs=epochs,
    )
    for step in range(logging_steps, last + 1, logging_steps):
        state.log_history.append(
            {
                "epoch": step / steps_per_epoch,
                "grad_norm": float(grad_at(step)),
                "learning_rate": float(lr_at(step)),
                "loss": float(loss_at(step)),
                "step": step,
            }
        )
        if eval_every and step % eval_every == 0:
            state.log_history.append(
                {
                    "epoch": step / steps_per_epoch,
                    "eval_loss": float((eval_at or (lambda s: 1.05 * loss_at(s)))(step)),
                    "eval_runtime": 1.0,
                    "eval_samples_per_second": 100.0,
                    "eval_steps_per_second": 10.0,
                    "step": step,
                }
            )
    if stop_at is None:
        state.log_history.append(
            {"epoch": float(epochs), "step": total, "total_flos": 1e12, "train_loss": 1.0, "train_runtime": 60.0,
             "train_samples_per_second": 10.0, "train_steps_per_second": 1.0}
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if stop_at is None:
        state.save_to_json(str(run_dir / "trainer_state.json"))
    else:  # an interrupted run: only its checkpoints hold a trainer_state.json
        (run_dir / f"checkpoint-{last}").mkdir()
        state.save_to_json(str(run_dir / f"checkpoint-{last}" / "trainer_state.json"))
    if config is not None:
        (run_dir / "colintern_run.json").write_text(json.dumps(config))
    return run_dir


def saved_checkpoint(run_dir: Path, step: int, healthy: bool = True) -> Path:
    """A checkpoint-N folder marked complete as the trainer marks it (write_checkpoint_marker, written last), with
    the health the trainer records."""
    from colintern.model.checkpoints import write_checkpoint_marker

    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir()
    TrainerState(global_step=step).save_to_json(str(folder / "trainer_state.json"))
    problems = [] if healthy else ["weights up to 2.1e+04, 21000x the initial 1"]
    write_checkpoint_marker(folder, step, {"healthy": healthy, "problems": problems})
    return folder


def noise(seed: int, scale: float):
    rng = np.random.default_rng(seed)
    table = rng.normal(0, scale, 100_000)
    return lambda step: float(table[step])


# colintern_run.json as colintern's trainer writes it: the published recipe (lr 5e-5, batch 16 x 4 accumulation,
# 5 epochs, LoRA r=32, ColbertLoss) with a warmup scaled to these 500-step curves.
RECIPE = RunConfig.from_dict({"training": {"warmup_steps": 25}}).to_dict()


@pytest.fixture
def healthy_run(tmp_path):
    """The seed guide's healthy run: 2.40 -> ~0.75 over 5 epochs, warmup then linear decay, stable grad norm."""
    jitter, grad_jitter = noise(0, 0.02), noise(1, 0.08)
    return write_run(
        tmp_path / "healthy",
        lambda s: (0.7 + 1.7 * math.exp(-s / 150)) * (1 + jitter(s)),
        grad_at=lambda s: 1.5 * (1 + grad_jitter(s)),
        config=RECIPE,
    )


def test_healthy_run_gets_a_clean_bill(healthy_run, tmp_path):
    report = training_report(healthy_run)
    assert report.verdict == "healthy", report.to_text()
    assert all(f.severity == "info" for f in report.findings)
    assert {"still_improving", "converged"} & set(report.kinds)
    assert [e.epoch for e in report.epochs] == [1, 2, 3, 4, 5]
    first, last = report.epochs[0], report.epochs[-1]
    assert first.loss_start == pytest.approx(0.7 + 1.7 * math.exp(-10 / 150), rel=0.1)
    assert last.loss_end == pytest.approx(0.75, rel=0.05)
    assert all(e.eval_loss is not None for e in report.epochs)
    assert report.settings.effective_batch_size == 64 and report.settings.lora_rank == 32
    assert report.settings.learning_rate == 5e-5 and report.settings.loss == "colbert" and report.settings.peft
    text = report.to_text()
    assert "HEALTHY" in text and "batch 16/device x 4 accumulation" in text


def test_nan_run_is_a_failure_that_names_the_step_and_the_fix(tmp_path):
    jitter = noise(2, 0.02)

    def loss(step):  # fine until the grad norm blows up at step 200; NaN from step 240
        return math.nan if step >= 240 else (0.7 + 1.7 * math.exp(-step / 150)) * (1 + jitter(step))

    def grad(step):
        return 1.5 if step < 200 else (math.inf if step >= 230 else 1.5 * 4 ** ((step - 190) / 10))

    config = RunConfig.from_dict({"training": {"warmup_steps": 25, "lr": 5e-4}}).to_dict()
    run_dir = write_run(tmp_path / "nan", loss, grad_at=grad, peak_lr=5e-4, config=config)
    saved_checkpoint(run_dir, 200)
    report = training_report(run_dir)
    assert report.verdict == "failed"
    assert report.kinds[0] == "nan"
    nan = report.findings[0]
    assert nan.severity == "critical" and nan.steps == [230]
    assert "checkpoint-200" in nan.suggestion and "max_grad_norm" in nan.suggestion
    assert "0.0005 -> 0.00017" in nan.suggestion
    assert "grad_norm_spikes" in report.kinds or "grad_norm_growing" in report.kinds
    assert report.epochs[2].non_finite > 0


def test_nan_run_names_the_last_healthy_complete_checkpoint(tmp_path):
    def loss(step):
        return math.nan if step >= 240 else 0.7 + 1.7 * math.exp(-step / 150)

    run_dir = write_run(tmp_path / "nan", loss, grad_at=lambda step: math.inf if step >= 230 else 1.5)
    saved_checkpoint(run_dir, 200)
    saved_checkpoint(run_dir, 220, healthy=False)  # saved before the NaN, but its weights had already blown up
    (run_dir / "checkpoint-225").mkdir()  # a save cut short: no marker
    (run_dir / "checkpoint-225" / "trainer_state.json").write_text("{}")
    nan = next(f for f in training_report(run_dir).findings if f.kind == "nan")
    assert "restart from checkpoint-200, the last healthy one" in nan.suggestion
    assert "checkpoint-220" not in nan.suggestion and "checkpoint-225" not in nan.suggestion


def test_interrupted_run_is_resumed_only_from_a_complete_checkpoint(tmp_path):
    def loss(step):
        return 0.7 + 1.7 * math.exp(-step / 150)

    run_dir = write_run(tmp_path / "cut", loss, stop_at=300)  # checkpoint-300: a trainer_state.json, nothing else
    assert "no complete checkpoint" in training_report(run_dir).findings[0].suggestion
    saved_checkpoint(run_dir, 200)  # the run wrote markers: checkpoint-300, without one, never finished saving
    incomplete = training_report(run_dir).findings[0]
    assert incomplete.kind == "incomplete"
    assert "last complete checkpoint, checkpoint-200" in incomplete.suggestion
    assert "--resume latest, passing over the incomplete checkpoint-300" in incomplete.suggestion


def test_oscillating_run_points_at_the_batch_size(tmp_path):
    jitter = noise(3, 0.35)
    run_dir = write_run(
        tmp_path / "oscillating",
        lambda s: max(0.05, (2.4 - 0.3 * s / 300) * (1 + jitter(s))),
        epochs=1,
        steps_per_epoch=300,
        logging_steps=5,
        eval_every=None,
        config={"training": {"learning_rate": 1e-4, "batch_size": 2, "grad_accum": 1}},
    )
    report = training_report(run_dir)
    assert report.verdict == "needs attention"
    assert "oscillation" in report.kinds and "stalled" not in report.kinds
    oscillation = next(f for f in report.findings if f.kind == "oscillation")
    assert "effective batch now 2" in oscillation.suggestion and "gradient_accumulation_steps" in oscillation.suggestion
    assert "no_eval" in report.kinds and "small_effective_batch" in report.kinds


def test_stalled_run_asks_for_a_higher_learning_rate(tmp_path):
    jitter = noise(4, 0.01)
    run_dir = write_run(
        tmp_path / "stalled",
        lambda s: (2.40 - 0.05 * s / 300) * (1 + jitter(s)),
        epochs=1,
        steps_per_epoch=300,
        logging_steps=10,
        eval_every=100,
        peak_lr=1e-6,
        warmup=10,
        config={"training": {"lr": 1e-6, "batch_size": 16, "gradient_accumulation_steps": 4}},
    )
    report = training_report(run_dir)
    assert report.verdict == "needs attention"
    assert "stalled" in report.kinds
    assert not {"oscillation", "converged", "still_improving", "nan"} & set(report.kinds)
    stalled = next(f for f in report.findings if f.kind == "stalled")
    assert "raise the learning rate" in stalled.suggestion and "3e-06" in stalled.suggestion
    assert report.epochs[0].loss_start == pytest.approx(2.40, rel=0.02)
    assert report.epochs[0].loss_end == pytest.approx(2.35, rel=0.02)


def test_a_loss_at_the_chance_level_is_named(tmp_path):
    jitter = noise(5, 0.01)
    run_dir = write_run(
        tmp_path / "chance",
        lambda s: math.log(32) * (1.02 - 0.03 * s / 300) * (1 + jitter(s)),
        epochs=1,
        steps_per_epoch=300,
        config={"training": {"batch_size": 32, "loss": "colbert"}},
        batch_size=32,
    )
    report = training_report(run_dir)
    stalled = next(f for f in report.findings if f.kind == "stalled")
    assert "chance level ln(32)" in stalled.message


def test_schedule_problems_are_found(tmp_path):
    jitter = noise(6, 0.02)
    loss = lambda s: (0.7 + 1.7 * math.exp(-s / 150)) * (1 + jitter(s))  # noqa: E731
    constant = training_report(write_run(tmp_path / "constant", loss, lr_at=lambda s: 5e-5))
    assert "lr_constant" in constant.kinds
    no_warmup = training_report(write_run(tmp_path / "no_warmup", loss, warmup=0))
    assert "no_warmup" in no_warmup.kinds and "no_decay" not in no_warmup.kinds
    long_warmup = training_report(write_run(tmp_path / "long_warmup", loss, warmup=250))
    assert "long_warmup" in long_warmup.kinds
    restarted = training_report(
        write_run(tmp_path / "restarted", loss, lr_at=lambda s: linear_warmup_decay(s % 250, 250, 5e-5, 25))
    )
    assert "lr_irregular" in restarted.kinds
    no_decay = training_report(
        write_run(tmp_path / "no_decay", loss, lr_at=lambda s: 5e-5 * min(1.0, s / 25) * (1 - 0.2 * s / 500))
    )
    assert "no_decay" in no_decay.kinds


def test_overfitting_and_the_train_eval_gap(tmp_path):
    jitter = noise(7, 0.02)
    loss = lambda s: (0.3 + 2.1 * math.exp(-s / 120)) * (1 + jitter(s))  # noqa: E731
    eval_loss = lambda s: 0.9 + 1.5 * math.exp(-s / 100) + 0.0012 * max(0, s - 200)  # noqa: E731
    report = training_report(write_run(tmp_path / "overfit", loss, eval_at=eval_loss, eval_every=50))
    assert {"overfitting", "train_eval_gap"} <= set(report.kinds)
    overfit = next(f for f in report.findings if f.kind == "overfitting")
    assert "load_best_model_at_end" in overfit.suggestion


def test_loss_spikes_are_located(tmp_path):
    jitter = noise(8, 0.02)

    def loss(step):
        base = (0.7 + 1.7 * math.exp(-step / 150)) * (1 + jitter(step))
        return base * 3 if step in (310, 420) else base

    report = training_report(write_run(tmp_path / "spiky", loss))
    spikes = next(f for f in report.findings if f.kind == "loss_spikes")
    assert spikes.steps == [310, 420]


def test_an_interrupted_run_is_read_from_its_newest_checkpoint(tmp_path):
    jitter = noise(9, 0.02)
    run_dir = write_run(tmp_path / "interrupted", lambda s: (0.7 + 1.7 * math.exp(-s / 150)) * (1 + jitter(s)),
                        stop_at=300)
    older = run_dir / "checkpoint-100"
    older.mkdir()
    (older / "trainer_state.json").write_text((run_dir / "checkpoint-300" / "trainer_state.json").read_text())
    assert find_trainer_state(run_dir) == run_dir / "checkpoint-300" / "trainer_state.json"
    report = training_report(run_dir)
    assert report.kinds[0] == "incomplete"
    assert "300 of 500" in report.findings[0].message


def test_missing_state_and_odd_configs_give_clear_answers(tmp_path):
    with pytest.raises(ColinternError, match="no trainer_state.json"):
        find_trainer_state(tmp_path)
    with pytest.raises(ColinternError, match="does not exist"):
        find_trainer_state(tmp_path / "nope")
    (tmp_path / "colintern_run.json").write_text(json.dumps({"training": {"lr": "not a number"}, "lora": None}))
    settings = read_run_settings(tmp_path)
    assert settings.learning_rate is None and settings.effective_batch_size is None
    (tmp_path / "colintern_run.json").write_text("{ truncated")
    assert read_run_settings(tmp_path).learning_rate is None


def test_thresholds_are_configurable(healthy_run):
    strict = DiagnosisThresholds(oscillation_max_noise=0.001)
    assert "oscillation" in training_report(healthy_run, strict).kinds


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_script_prints_the_diagnosis_and_writes_plot_and_json(tmp_path, capsys):
    jitter = noise(2, 0.02)
    nan_run = write_run(
        tmp_path / "nan_script",
        lambda s: math.nan if s >= 240 else (0.7 + 1.7 * math.exp(-s / 150)) * (1 + jitter(s)),
        grad_at=lambda s: math.inf if s >= 230 else 1.5,
    )
    out = subprocess.run(
        [sys.executable, "scripts/training_report.py", "--model-path", str(nan_run), "--json",
         str(tmp_path / "r.json")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 1, out.stderr
    assert "Verdict: FAILED" in out.stdout and "[critical] nan" in out.stdout
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "failed"
    width, height = _png_size(nan_run / "training_report.png")
    assert width >= 800 and height >= 600
    assert (nan_run / "training_report.png").stat().st_size > 20_000

    # the same front end in-process: a missing run is one `error:` line and exit status 2
    spec = importlib.util.spec_from_file_location("training_report", REPO_ROOT / "scripts" / "training_report.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert run(script.main, script.build_parser(), ["--model-path", str(tmp_path / "x")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error:") and "does not exist" in stderr and stderr.count("\n") == 1


def test_a_real_trainer_run_is_diagnosed(tmp_path):
    """trainer_state.json as transformers' Trainer writes it (a tiny regression, 60 steps, with evaluation)."""
    import torch
    from torch import nn
    from transformers import Trainer, TrainingArguments

    class Regression(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 1)

        def forward(self, x, labels=None):
            prediction = self.linear(x).squeeze(-1)
            return {"loss": nn.functional.mse_loss(prediction, labels), "logits": prediction}

    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(8, generator=generator)
    features = torch.randn(1240, 8, generator=generator)
    rows = [{"x": f, "labels": (f @ weights)} for f in features]
    args = TrainingArguments(
        output_dir=str(tmp_path / "real"), per_device_train_batch_size=40, num_train_epochs=2, learning_rate=0.05,
        warmup_steps=5, logging_steps=3, eval_strategy="steps", eval_steps=10, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    torch.manual_seed(0)
    trainer = Trainer(model=Regression(), args=args, train_dataset=rows[:1200], eval_dataset=rows[1200:])
    trainer.train()
    trainer.save_state()
    report = training_report(tmp_path / "real")
    assert report.history.finished and report.history.global_step == 60
    assert len(report.history.loss) == 20 and len(report.history.eval_loss) == 6
    assert [e.epoch for e in report.epochs] == [1, 2]
    assert report.epochs[-1].loss_end < report.epochs[0].loss_start
    assert report.verdict == "healthy", report.to_text()
    assert report.settings.per_device_batch_size == 40 and report.settings.effective_batch_size is None
    assert report.plot(tmp_path / "real.png").exists()
