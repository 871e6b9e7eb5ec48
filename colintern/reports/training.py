"""Diagnose a training run from transformers' `trainer_state.json`, in the terms a practitioner uses.

    from colintern.reports.training import training_report
    report = training_report("experiments/demo")        # a run directory (or one of its checkpoint-*/ folders)
    print(report.to_text()); report.plot("training_report.png")

The run's `log_history` (loss, grad_norm, learning_rate every `logging_steps`; eval_loss at each evaluation) gives:
the loss at the start and end of every epoch, whether it converged, loss spikes, NaN/inf, oscillation (a batch too
small for the learning rate), too-slow convergence (learning rate too low, too few epochs), a learning-rate schedule
that is not warmup-then-decay, grad-norm instability and the train/eval gap. Every finding carries the change to
make. `colintern_run.json` (the resolved run configuration colintern's trainer writes next to it) adds the batch
size, accumulation, learning rate and loss when present; every key in it is optional.

The thresholds are the fields of `DiagnosisThresholds`, each documented there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from colintern.utils import RUN_CONFIG_FILE, ColinternError, read_run_config

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
# The effective batch of the published ColPali/ColQwen recipes (per-device batch x accumulation x processes).
REFERENCE_EFFECTIVE_BATCH = 64


@dataclass(frozen=True)
class DiagnosisThresholds:
    """When a pattern in the logged curves becomes a finding. Losses are compared relative to their own level."""

    # Fewer finite loss values than this and no trend is judged (only NaN, schedule and completion checks run).
    min_points: int = 5
    # Rolling-median window, as a fraction of the logged loss values (at least 3): the "trend" of the loss.
    smoothing_fraction: float = 0.1
    # Start-to-end fall of the loss below 5%: the run is stalled (the seed's "2.40 -> 2.35" is 2%).
    stalled_max_drop: float = 0.05
    # Below 20%: converging too slowly (learning rate too low or too few epochs). A healthy fine-tune falls >50%.
    slow_max_drop: float = 0.20
    # The loss ends more than 10% above where it started: diverging.
    diverging_rise: float = 0.10
    # The last 20% of the logged steps are "the end of the run" for the convergence verdict.
    tail_fraction: float = 0.2
    # The trend falls less than 5% over that tail: converged (flattening); more: still improving, more epochs help.
    improving_min_tail_drop: float = 0.05
    # Step-to-step relative noise of the logged loss around its trend above 15%: oscillating wildly, the symptom of
    # a batch too small for the learning rate. Healthy logged losses (averages over logging_steps) stay within a few
    # percent.
    oscillation_max_noise: float = 0.15
    # A loss value above 1.5x the median of the preceding window is a spike.
    spike_factor: float = 1.5
    # A grad norm above 5x the median of the preceding window is a grad-norm spike; isolated ones (fewer than 3 in
    # the run) are noted, more are a warning.
    grad_spike_factor: float = 5.0
    grad_spikes_for_warning: int = 3
    # The median grad norm of the last 20% of steps above 3x that of the first 20% (after warmup): growing.
    grad_growth_factor: float = 3.0
    # Last eval loss more than 25% above the training loss at the same step: a train/eval gap.
    train_eval_gap: float = 0.25
    # Eval loss ends more than 5% above its minimum while the training loss kept falling: overfitting.
    overfit_rise: float = 0.05
    # The first logged learning rate at or above 90% of the peak, logged within the first 2% of the run: no warmup.
    no_warmup_start_ratio: float = 0.9
    # The peak learning rate reached after 30% of the steps: the warmup eats the run.
    max_warmup_fraction: float = 0.3
    # At the end of a finished run the learning rate should be below half its peak (linear/cosine decay).
    decayed_end_ratio: float = 0.5
    # Final loss within 5% of the chance level ln(in-batch documents): the model cannot tell pages apart.
    chance_tolerance: float = 0.05


# ------------------------------------------------------------------------------------------------------- inputs


@dataclass
class TrainingHistory:
    """The curves and counters of one run, read from a trainer_state.json. Arrays are aligned per series."""

    source: Path
    loss_steps: np.ndarray
    loss: np.ndarray  # may hold NaN/inf
    loss_epochs: np.ndarray
    grad_steps: np.ndarray
    grad_norm: np.ndarray
    lr_steps: np.ndarray
    learning_rate: np.ndarray
    eval_steps: np.ndarray
    eval_loss: np.ndarray
    eval_epochs: np.ndarray
    global_step: int
    max_steps: int
    num_train_epochs: float
    epoch: float
    logging_steps: int | None
    train_batch_size: int | None
    finished: bool  # the Trainer logged its final train_runtime summary
    from_checkpoint: bool  # read from checkpoint-*/ because the run directory has no trainer_state.json


@dataclass
class RunSettings:
    """What colintern_run.json says about the run; every field may be unknown (None)."""

    learning_rate: float | None = None
    per_device_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    world_size: int | None = None
    num_train_epochs: float | None = None
    warmup_steps: int | None = None
    max_grad_norm: float | None = None
    loss: str | None = None
    lora_rank: int | None = None
    peft: bool | None = None
    source: str | None = None  # the colintern_run.json read; None when the run has none
    cache_chunk_size: int | None = None  # gradient cache: the per-device batch is embedded in chunks of this size

    @property
    def effective_batch_size(self) -> int | None:
        """Per-device batch x accumulation x processes; unknown without a run config (accumulation unknown)."""
        if self.per_device_batch_size is None or (self.source is None and self.gradient_accumulation_steps is None):
            return None
        return self.per_device_batch_size * (self.gradient_accumulation_steps or 1) * (self.world_size or 1)

    @property
    def in_batch_documents(self) -> int | None:
        """Documents each query is scored against in the contrastive loss (per-device batch x processes gathered)."""
        if self.per_device_batch_size is None:
            return None
        return self.per_device_batch_size * (self.world_size or 1)


def find_trainer_state(run_dir: str | Path) -> Path:
    """`run_dir/trainer_state.json`, else the newest `checkpoint-*/trainer_state.json` (an interrupted run)."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.name.endswith(".json"):
        return run_dir
    if not run_dir.is_dir():
        raise ColinternError(f"{run_dir} does not exist. Pass the --output-dir of a training run.")
    top = run_dir / TRAINER_STATE
    if top.exists():
        return top
    checkpoints = sorted(
        (p for p in run_dir.glob("checkpoint-*/" + TRAINER_STATE)),
        key=lambda p: int(m.group(1)) if (m := re.search(r"checkpoint-(\d+)$", p.parent.name)) else -1,
    )
    if checkpoints:
        logger.info("No %s at the top of %s: reading the newest checkpoint, %s", TRAINER_STATE, run_dir,
                    checkpoints[-1].parent.name)
        return checkpoints[-1]
    raise ColinternError(
        f"no {TRAINER_STATE} in {run_dir} or its checkpoint-*/ folders. The Trainer writes it at every checkpoint "
        "and at the end of training: pass the run's --output-dir (or train with save_steps set)."
    )


def read_history(path: str | Path) -> TrainingHistory:
    """Parse a trainer_state.json (the fields of transformers' `TrainerState`, as `TrainerState.save_to_json` writes
    them; read as plain JSON because importing transformers' trainer costs seconds, and keys of other versions are
    simply ignored). Python's json reads the NaN/Infinity the Trainer writes for a diverged loss."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ColinternError(f"{path} is not readable JSON ({error}); is the file complete?") from error
    if not isinstance(raw, dict) or not isinstance(raw.get("log_history", []), list):
        raise ColinternError(f"{path} is not a transformers trainer_state.json (no log_history list)")
    state = _StateFields(**{k: raw[k] for k in _StateFields.__dataclass_fields__ if raw.get(k) is not None})
    log = [entry for entry in raw.get("log_history", []) if isinstance(entry, dict)]

    def series(key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = [(e.get("step", 0), _as_float(e[key]), _as_float(e.get("epoch", math.nan))) for e in log if key in e]
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)
        steps, values, epochs = zip(*rows, strict=True)
        return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=float), np.asarray(epochs, dtype=float)

    loss_steps, loss, loss_epochs = series("loss")
    grad_steps, grad_norm, _ = series("grad_norm")
    lr_steps, learning_rate, _ = series("learning_rate")
    eval_steps, eval_loss, eval_epochs = series("eval_loss")
    return TrainingHistory(
        source=path,
        loss_steps=loss_steps,
        loss=loss,
        loss_epochs=loss_epochs,
        grad_steps=grad_steps,
        grad_norm=grad_norm,
        lr_steps=lr_steps,
        learning_rate=learning_rate,
        eval_steps=eval_steps,
        eval_loss=eval_loss,
        eval_epochs=eval_epochs,
        global_step=int(state.global_step or 0),
        max_steps=int(state.max_steps or 0),
        num_train_epochs=float(state.num_train_epochs or 0),
        epoch=float(state.epoch or 0),
        logging_steps=int(state.logging_steps) if state.logging_steps else None,
        train_batch_size=int(state.train_batch_size) if state.train_batch_size else None,
        finished=any("train_runtime" in e for e in log),
        from_checkpoint=path.parent.name.startswith("checkpoint-"),
    )


@dataclass
class _StateFields:
    """The counters of transformers' TrainerState that the report uses (same names and defaults)."""

    epoch: float = 0
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    num_train_epochs: float = 0
    train_batch_size: int | None = None


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


_SETTING_KEYS: dict[str, tuple[str, ...]] = {
    "learning_rate": ("learning_rate", "lr"),
    "per_device_batch_size": ("per_device_train_batch_size", "batch_size", "train_batch_size"),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", "grad_accum", "gradient_accumulation"),
    "world_size": ("world_size", "num_processes", "n_gpus", "num_gpus"),
    "num_train_epochs": ("num_train_epochs", "epochs"),
    "warmup_steps": ("warmup_steps",),
    "max_grad_norm": ("max_grad_norm",),
    "loss": ("loss", "loss_name", "loss_type"),
    "lora_rank": ("lora_rank", "r", "rank"),
    "peft": ("peft", "use_peft", "enabled"),
    "cache_chunk_size": ("cache_chunk_size",),
}
_SETTING_SECTIONS = {"lora_rank": ("lora",), "peft": ("lora", "training", "")}


def read_run_settings(run_dir: str | Path) -> RunSettings:
    """The run configuration colintern's trainer saved (`colintern_run.json`), tolerating missing keys/sections."""
    run_dir = Path(run_dir)
    candidates = [run_dir / RUN_CONFIG_FILE]
    if run_dir.name.startswith("checkpoint-"):
        candidates.append(run_dir.parent / RUN_CONFIG_FILE)
    path = next((p for p in candidates if p.exists()), None)
    config = read_run_config(path.parent) if path is not None else None
    if config is None:
        return RunSettings()
    values: dict[str, Any] = {}
    for name, keys in _SETTING_KEYS.items():
        sections = _SETTING_SECTIONS.get(name, ("training", "", "model", "data", "runtime"))
        for section in sections:
            table = config if section == "" else config.get(section)
            if not isinstance(table, dict):
                continue
            hit = next((table[k] for k in keys if table.get(k) is not None), None)
            if hit is not None:
                values[name] = hit
                break
    settings = RunSettings(source=str(path))
    for name, value in values.items():
        try:
            if name in ("learning_rate", "num_train_epochs", "max_grad_norm"):
                value = float(value)
            elif name == "loss":
                value = str(value)
            elif name == "peft":
                value = bool(value)
            else:
                value = int(value)
        except (TypeError, ValueError):
            logger.debug("Ignoring %s=%r in %s", name, value, path)
            continue
        setattr(settings, name, value)
    return settings


# ------------------------------------------------------------------------------------------------------ findings


@dataclass
class Finding:
    kind: str  # a stable identifier, e.g. "nan", "oscillation", "stalled"
    severity: str  # "critical" (the run failed), "warning" (fix before the next run), "info"
    message: str  # what was observed, with the numbers
    suggestion: str  # the change to make
    steps: list[int] = field(default_factory=list)  # where it shows, for the plot


@dataclass
class EpochSummary:
    epoch: int
    first_step: int
    last_step: int
    loss_start: float | None
    loss_end: float | None
    non_finite: int
    eval_loss: float | None


@dataclass
class TrainingReport:
    run_dir: Path
    history: TrainingHistory
    settings: RunSettings
    epochs: list[EpochSummary]
    findings: list[Finding]
    thresholds: DiagnosisThresholds

    @property
    def kinds(self) -> list[str]:
        return [f.kind for f in self.findings]

    @property
    def verdict(self) -> str:
        severities = {f.severity for f in self.findings}
        if "critical" in severities:
            return "failed"
        if "warning" in severities:
            return "needs attention"
        return "healthy"

    def to_dict(self) -> dict:
        h = self.history
        return {
            "run_dir": str(self.run_dir),
            "trainer_state": str(h.source),
            "verdict": self.verdict,
            "global_step": h.global_step,
            "max_steps": h.max_steps,
            "epochs": [dataclasses.asdict(e) for e in self.epochs],
            "findings": [dataclasses.asdict(f) for f in self.findings],
            "settings": dataclasses.asdict(self.settings),
            "thresholds": dataclasses.asdict(self.thresholds),
        }

    def to_text(self) -> str:
        h, s = self.history, self.settings
        lines = [f"Training report: {self.run_dir}"]
        progress = f"{h.global_step}/{h.max_steps} steps" if h.max_steps else f"{h.global_step} steps"
        epochs = f"epoch {h.epoch:.2f} of {h.num_train_epochs:g}" if h.num_train_epochs else f"epoch {h.epoch:.2f}"
        every = f" (every {h.logging_steps} steps)" if h.logging_steps else ""
        lines.append(
            f"  {h.source}: {progress}, {epochs}, {len(h.loss)} loss values{every}, {len(h.eval_loss)} evaluations"
            + ("" if h.finished else ", no end-of-training summary (interrupted or still running)")
        )
        run = _describe_settings(s, h)
        if run:
            lines.append(f"  run: {run}")
        lines.append("")
        if self.epochs:
            lines.append(f"{'epoch':>5}  {'steps':>11}  {'loss start -> end':>19}  {'change':>8}  {'eval loss':>9}")
            for e in self.epochs:
                change = (
                    f"{100 * (e.loss_end - e.loss_start) / e.loss_start:+.1f}%"
                    if e.loss_start and e.loss_end is not None and math.isfinite(e.loss_end)
                    else "n/a"
                )
                loss = f"{_num(e.loss_start)} -> {_num(e.loss_end)}"
                if e.non_finite:
                    loss += f" ({e.non_finite} NaN)"
                lines.append(
                    f"{e.epoch:>5}  {f'{e.first_step}-{e.last_step}':>11}  {loss:>19}  {change:>8}  "
                    f"{_num(e.eval_loss):>9}"
                )
            lines.append("")
        counts = {sev: sum(f.severity == sev for f in self.findings) for sev in ("critical", "warning", "info")}
        detail = ", ".join(
            f"{n} {sev}{'s' if n > 1 and sev == 'warning' else ''}" for sev, n in counts.items() if n and sev != "info"
        ) or "no problems found"
        lines.append(f"Verdict: {self.verdict.upper()} ({detail})")
        for finding in self.findings:
            lines.append(f"  [{finding.severity}] {finding.kind}: {finding.message}")
            lines.append(f"      -> {finding.suggestion}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        return plot_training(self, path)


def _num(value: float | None) -> str:
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.3g}"


def _describe_settings(s: RunSettings, h: TrainingHistory) -> str:
    parts = []
    if s.learning_rate is not None:
        parts.append(f"lr {s.learning_rate:g}")
    batch = s.per_device_batch_size or h.train_batch_size
    if batch and s.source is None:
        parts.append(f"batch {batch}/device (no {RUN_CONFIG_FILE}: accumulation and processes unknown)")
    elif batch:
        effective = batch * (s.gradient_accumulation_steps or 1) * (s.world_size or 1)
        parts.append(
            f"batch {batch}/device x {s.gradient_accumulation_steps or 1} accumulation x {s.world_size or 1} "
            f"process(es) = {effective}"
            + (f" (in-batch {batch} through the gradient cache, chunks of {s.cache_chunk_size})"
               if s.cache_chunk_size and s.cache_chunk_size < batch else "")
        )
    if s.warmup_steps is not None:
        parts.append(f"warmup {s.warmup_steps} steps")
    if s.peft is not None or s.lora_rank is not None:
        parts.append(f"LoRA r={s.lora_rank}" if s.peft is not False and s.lora_rank else "full fine-tuning")
    if s.loss:
        parts.append(f"loss {s.loss}")
    return ", ".join(parts)


def training_report(run_dir: str | Path, thresholds: DiagnosisThresholds | None = None) -> TrainingReport:
    """Read a run directory (or a trainer_state.json) and diagnose it."""
    thresholds = thresholds or DiagnosisThresholds()
    state_path = find_trainer_state(run_dir)
    history = read_history(state_path)
    run_dir = Path(run_dir) if Path(run_dir).is_dir() else state_path.parent
    settings = read_run_settings(run_dir if (run_dir / RUN_CONFIG_FILE).exists() else state_path.parent)
    if settings.per_device_batch_size is None and history.train_batch_size:
        settings.per_device_batch_size = history.train_batch_size
    findings = diagnose(history, settings, thresholds, run_dir=run_dir)
    return TrainingReport(run_dir, history, settings, summarize_epochs(history), findings, thresholds)


def summarize_epochs(history: TrainingHistory) -> list[EpochSummary]:
    """Loss at the first and last logged step of each epoch (as the logs show it), and the last eval loss in it."""
    if not len(history.loss):
        return []
    epoch_index = _epoch_index(history.loss_epochs, history.loss_steps, history)
    eval_index = _epoch_index(history.eval_epochs, history.eval_steps, history)
    summaries = []
    for epoch in sorted(set(epoch_index.tolist())):
        mask = epoch_index == epoch
        values, steps = history.loss[mask], history.loss_steps[mask]
        finite = np.isfinite(values)
        evals = history.eval_loss[eval_index == epoch]
        summaries.append(
            EpochSummary(
                epoch=int(epoch),
                first_step=int(steps[0]),
                last_step=int(steps[-1]),
                loss_start=float(values[finite][0]) if finite.any() else None,
                loss_end=float(values[-1]) if not finite[-1] else float(values[finite][-1]),
                non_finite=int((~finite).sum()),
                eval_loss=float(evals[-1]) if len(evals) else None,
            )
        )
    return summaries


def _epoch_index(epochs: np.ndarray, steps: np.ndarray, history: TrainingHistory) -> np.ndarray:
    """1-based epoch of each logged point: a point logged at epoch e (fractional, as the Trainer records it) belongs
    to epoch ceil(e); without epochs, from the step and the steps per epoch."""
    if len(epochs) and np.isfinite(epochs).all():
        return np.maximum(1, np.ceil(epochs - 1e-9)).astype(int)
    if history.max_steps and history.num_train_epochs:
        per_epoch = history.max_steps / history.num_train_epochs
        return np.maximum(1, np.ceil(steps / per_epoch - 1e-9)).astype(int)
    return np.ones(len(steps), dtype=int)


# ---------------------------------------------------------------------------------------------------- diagnosis


def diagnose(
    history: TrainingHistory,
    settings: RunSettings | None = None,
    thresholds: DiagnosisThresholds | None = None,
    run_dir: Path | None = None,
) -> list[Finding]:
    """All findings for one run, most severe first."""
    t = thresholds or DiagnosisThresholds()
    settings = settings or RunSettings()
    findings: list[Finding] = []
    first_bad = _non_finite(history, settings, findings, run_dir)
    findings += _completion(history, run_dir)

    # Trends are judged on the part of the run before anything became NaN.
    keep = np.isfinite(history.loss) & (history.loss_steps < first_bad if first_bad is not None else True)
    steps, loss = history.loss_steps[keep], history.loss[keep]
    if len(loss) < t.min_points:
        findings.append(
            Finding(
                "too_few_logs",
                "info",
                f"only {len(loss)} finite loss values logged: too few to judge the loss curve",
                "log more often (logging_steps, e.g. 10) or train longer",
            )
        )
    else:
        findings += _loss_trend(steps, loss, history, settings, t, judge_convergence=first_bad is None)
    findings += _lr_schedule(history, settings, t)
    findings += _grad_norm(history, settings, first_bad, t)
    findings += _train_eval(history, first_bad, t)
    effective = settings.effective_batch_size
    if effective is not None and effective < REFERENCE_EFFECTIVE_BATCH:
        findings.append(
            Finding(
                "small_effective_batch",
                "info",
                f"effective batch {effective} is below the {REFERENCE_EFFECTIVE_BATCH} of the published ColPali/ColQwen"
                " recipes (fine for a demo; expect noisier gradients and fewer in-batch negatives)",
                f"raise the per-device batch, with the gradient cache when memory does not allow it (e.g. --batch-size"
                f" {max(REFERENCE_EFFECTIVE_BATCH, 2 * (settings.per_device_batch_size or 1))} --cache-chunk-size "
                f"{min(settings.per_device_batch_size or 16, 16)}: more in-batch negatives at the memory of the chunk), "
                f"or gradient_accumulation_steps to about {math.ceil(REFERENCE_EFFECTIVE_BATCH / effective)}x its "
                "value (which adds no negatives)",
            )
        )
    order = {"critical": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: order[f.severity])


def _non_finite(
    history: TrainingHistory, settings: RunSettings, findings: list[Finding], run_dir: Path | None
) -> int | None:
    """Adds the NaN/inf finding; returns the first step at which any curve is non-finite."""
    bad = []
    for name, steps, values in (
        ("loss", history.loss_steps, history.loss),
        ("grad norm", history.grad_steps, history.grad_norm),
        ("eval loss", history.eval_steps, history.eval_loss),
    ):
        mask = ~np.isfinite(values)
        if mask.any():
            bad.append((int(steps[mask][0]), name, str(values[mask][0]), int(mask.sum())))
    if not bad:
        return None
    bad.sort()
    first_step = bad[0][0]
    what = "; ".join(f"{name} {value} from step {step} ({n} values)" for step, name, value, n in bad)
    lr = settings.learning_rate or _peak_lr(history)
    lower = f"lower the learning rate (e.g. {lr:.2g} -> {lr / 3:.2g})" if lr else "lower the learning rate 2-5x"
    resume = ""
    if run_dir is not None:
        from colintern.model.checkpoints import last_healthy_checkpoint

        # complete and healthy when saved (finite weights and gradient norms, no runaway growth), before the NaN
        good = last_healthy_checkpoint(_checkpoints_dir(run_dir), before_step=first_step)
        if good is not None:
            resume = f"; restart from {good.path.name}, the last healthy one before the NaN, with those changes"
    findings.append(
        Finding(
            "nan",
            "critical",
            f"training diverged to non-finite values: {what}. Everything after step {first_step} is lost "
            "(transformers hides a NaN batch loss behind the running average, so the grad norm often shows it first)",
            f"{lower}, keep gradient clipping on (max_grad_norm=1.0), lengthen the warmup (e.g. 100+ steps), train in "
            f"bf16 rather than fp16{resume}",
            steps=[first_step],
        )
    )
    return first_step


def _checkpoints_dir(run_dir: Path) -> Path:
    """Where a run's checkpoint-N folders are (the report may be given one of them)."""
    return run_dir.parent if re.fullmatch(r"checkpoint-\d+", run_dir.name) else run_dir


def _completion(history: TrainingHistory, run_dir: Path | None = None) -> list[Finding]:
    if history.finished or not history.max_steps or history.global_step >= history.max_steps:
        return []
    where = " (read from the newest checkpoint)" if history.from_checkpoint else ""
    resume = "resume it from its last checkpoint (python scripts/train.py ... --resume latest)"
    if run_dir is not None:
        from colintern.model.checkpoints import latest_complete_checkpoint

        # only a complete checkpoint (its save finished) can be resumed; --resume latest skips the others
        latest, skipped = latest_complete_checkpoint(_checkpoints_dir(run_dir))
        passed = f", passing over the incomplete {', '.join(s.path.name for s in skipped)}" if skipped else ""
        if latest is not None:
            resume = (f"resume it from its last complete checkpoint, {latest.path.name} (python scripts/train.py ... "
                      f"--resume latest{passed})")
        else:
            incomplete = f" ({', '.join(s.path.name for s in skipped)} never finished saving)" if skipped else ""
            resume = f"it has no complete checkpoint to resume from{incomplete}: train it again"
    return [
        Finding(
            "incomplete",
            "warning",
            f"the run stopped at step {history.global_step} of {history.max_steps} "
            f"({100 * history.global_step / history.max_steps:.0f}%){where}",
            f"{resume} before judging the model; the findings below cover only the steps so far",
            steps=[history.global_step],
        )
    ]


def _rolling_median(values: np.ndarray, window: int) -> np.ndarray:
    half = window // 2
    return np.array([np.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))])


def _window(n: int, t: DiagnosisThresholds) -> int:
    window = max(3, int(round(n * t.smoothing_fraction)))
    return window if window % 2 else window + 1


def _loss_trend(
    steps: np.ndarray,
    loss: np.ndarray,
    history: TrainingHistory,
    settings: RunSettings,
    t: DiagnosisThresholds,
    judge_convergence: bool = True,
) -> list[Finding]:
    findings: list[Finding] = []
    n = len(loss)
    window = _window(n, t)
    trend = _rolling_median(loss, window)
    k = max(1, min(n // 3, max(3, round(0.1 * n))))  # start/end level: median of the first/last 10% of values
    start, end = float(np.median(loss[:k])), float(np.median(loss[-k:]))
    span = f"steps {int(steps[0])}-{int(steps[-1])}"
    lr = settings.learning_rate or _peak_lr(history)
    if start <= 0:
        return findings
    drop = (start - end) / start

    noise = _relative_noise(loss)
    oscillating = noise is not None and noise > t.oscillation_max_noise
    if oscillating:
        effective = settings.effective_batch_size
        batch_note = f" (effective batch now {effective})" if effective else ""
        findings.append(
            Finding(
                "oscillation",
                "warning",
                f"the loss swings +-{100 * noise:.0f}% around its trend (more than {100 * t.oscillation_max_noise:.0f}%"
                f"), {start:.3g} -> {end:.3g} over {span}: the gradient estimate is too noisy for the step size",
                f"raise the effective batch to >= {REFERENCE_EFFECTIVE_BATCH} with gradient_accumulation_steps"
                f"{batch_note}, and/or lower the learning rate"
                + (f" (e.g. {lr:.2g} -> {lr / 2:.2g})" if lr else " 2x")
                + "; more in-batch negatives also make the contrastive loss itself less noisy",
            )
        )
    else:
        spikes = []
        for i in range(window, n):
            base = float(np.median(loss[i - window : i]))
            if base > 0 and loss[i] > t.spike_factor * base:
                spikes.append(int(steps[i]))
        if spikes:
            findings.append(
                Finding(
                    "loss_spikes",
                    "warning",
                    f"{len(spikes)} loss spike(s) above {t.spike_factor:g}x the preceding median, at step(s) "
                    f"{_steps(spikes)}",
                    "lower the learning rate or lengthen the warmup, keep max_grad_norm=1.0; if spikes recur at the "
                    "same position every epoch, inspect those batches for corrupt pages or empty queries",
                    steps=spikes,
                )
            )

    chance = _chance_loss(settings)
    at_chance = chance is not None and abs(end - chance) <= t.chance_tolerance * chance
    if drop < -t.diverging_rise:
        findings.append(
            Finding(
                "diverging",
                "warning",
                f"the loss rose from {start:.3g} to {end:.3g} ({100 * -drop:+.0f}%) over {span}",
                "lower the learning rate 3-10x and check the warmup; a rising contrastive loss usually means the step "
                "size is too large for the batch",
            )
        )
    elif drop < t.stalled_max_drop:
        findings.append(
            Finding(
                "stalled",
                "warning",
                f"the loss barely moved: {start:.3g} -> {end:.3g} ({100 * -drop:+.1f}%) over {span}"
                + (f", at the chance level ln({settings.in_batch_documents}) = {chance:.3g}" if at_chance else ""),
                "raise the learning rate"
                + (f" (e.g. {lr:.2g} -> {3 * lr:.2g}; scripts/lr_finder.py finds the range)" if lr else " 3-10x")
                + ", make sure the warmup is a small part of the run, check that the intended parameters train "
                "(LoRA targets and custom_text_proj), and train for more epochs (the published recipes use 5)",
            )
        )
    elif drop < t.slow_max_drop:
        findings.append(
            Finding(
                "slow_convergence",
                "warning",
                f"the loss fell only {100 * drop:.0f}% ({start:.3g} -> {end:.3g}) over {span}; healthy fine-tuning "
                "runs fall by half or more",
                "raise the learning rate"
                + (f" (e.g. {lr:.2g} -> {2 * lr:.2g})" if lr else " 2-3x")
                + " or train for more epochs",
            )
        )
    elif at_chance:
        findings.append(
            Finding(
                "loss_at_chance",
                "warning",
                f"the final loss {end:.3g} is the chance level ln({settings.in_batch_documents}) = {chance:.3g}: "
                "the model cannot tell the pages of a batch apart",
                "check that page embeddings differ between pages (prompt tokens masked out of the document "
                "embedding), that custom_text_proj trains, and the learning rate",
            )
        )
    if judge_convergence and drop >= t.stalled_max_drop and not oscillating:
        tail_start = max(0, int(round(n * (1 - t.tail_fraction))) - 1)
        if n - tail_start >= 3 and trend[tail_start] > 0:
            tail_drop = (trend[tail_start] - trend[-1]) / trend[tail_start]
            tail_span = f"steps {int(steps[tail_start])}-{int(steps[-1])}"
            if tail_drop < t.improving_min_tail_drop:
                findings.append(
                    Finding(
                        "converged",
                        "info",
                        f"the loss flattened at about {trend[-1]:.3g} over the last {100 * t.tail_fraction:.0f}% of "
                        f"the run ({tail_span}: {100 * -tail_drop:+.1f}%)",
                        "more epochs at this learning rate will not help much; compare checkpoints on the "
                        "evaluation metric (NDCG@5) rather than the loss",
                    )
                )
            else:
                findings.append(
                    Finding(
                        "still_improving",
                        "info",
                        f"the loss was still falling at the end: {100 * -tail_drop:+.0f}% over the last "
                        f"{100 * t.tail_fraction:.0f}% of the run ({tail_span})",
                        "more epochs would likely help, as long as the eval loss keeps falling too",
                    )
                )
    return findings


def _peak_lr(history: TrainingHistory) -> float | None:
    """The highest learning rate the scheduler reached (what the run really used), None if none was logged."""
    finite = history.learning_rate[np.isfinite(history.learning_rate)]
    return float(finite.max()) if len(finite) and finite.max() > 0 else None


def _relative_noise(loss: np.ndarray) -> float | None:
    """Step-to-step relative noise of the loss, free of its trend: the spread of each log-loss around the mean of
    its two neighbours (a straight line in log space, so an exponential fall counts as no noise), scaled so that
    independent noise of relative size s gives s. Spikes are robustly discounted (MAD instead of std)."""
    if len(loss) < 3 or (loss <= 0).any():
        return None
    logs = np.log(loss)
    residual = logs[1:-1] - (logs[:-2] + logs[2:]) / 2
    mad = float(np.median(np.abs(residual - np.median(residual))))
    return 1.4826 * mad / math.sqrt(1.5)


def _chance_loss(settings: RunSettings) -> float | None:
    """The loss of a model whose scores do not depend on the page: ln(B) for the in-batch softmax losses
    (colbert, negative-ce), ln(2) for the pairwise ones."""
    if settings.loss and "pairwise" in settings.loss.lower():
        return math.log(2)
    documents = settings.in_batch_documents
    return math.log(documents) if documents and documents > 1 else None


def _lr_schedule(history: TrainingHistory, settings: RunSettings, t: DiagnosisThresholds) -> list[Finding]:
    steps, lr = history.lr_steps, history.learning_rate
    finite = np.isfinite(lr)
    steps, lr = steps[finite], lr[finite]
    if len(lr) < 3 or lr.max() <= 0:
        return []
    total = history.max_steps or int(steps[-1])
    peak_index = int(np.argmax(lr))
    peak = float(lr[peak_index])
    warmup_hint = f"warmup_steps={max(1, round(0.03 * total))}-{max(1, round(0.05 * total))} (3-5% of {total} steps)"
    findings = []
    if lr.min() >= 0.99 * peak:
        return [
            Finding(
                "lr_constant",
                "warning",
                f"the learning rate stayed at {peak:g} for the whole run: no warmup and no decay",
                f"use warmup then decay: lr_scheduler_type='linear' (or 'cosine') with {warmup_hint}",
            )
        ]
    configured_warmup = settings.warmup_steps or 0
    # Only judged when the first logged point falls early enough to be inside a normal warmup (2% of the run).
    if lr[0] >= t.no_warmup_start_ratio * peak and steps[0] <= 0.02 * total and configured_warmup < steps[0]:
        findings.append(
            Finding(
                "no_warmup",
                "warning",
                f"the learning rate started at {lr[0]:g} ({100 * lr[0] / peak:.0f}% of its peak) at step "
                f"{int(steps[0])}",
                f"add a warmup ({warmup_hint}): early large steps on a fresh projection head destabilise training",
            )
        )
    if total and steps[peak_index] > t.max_warmup_fraction * total:
        findings.append(
            Finding(
                "long_warmup",
                "warning",
                f"the learning rate peaked only at step {int(steps[peak_index])} of {total} "
                f"({100 * steps[peak_index] / total:.0f}% of the run)",
                f"shorten the warmup to {warmup_hint}",
                steps=[int(steps[peak_index])],
            )
        )
    after = lr[peak_index:]
    rises = [
        int(steps[peak_index + i])
        for i in range(1, len(after))
        if after[i] > after[i - 1] * 1.01 and after[i - 1] < 0.99 * peak
    ]
    if rises:
        findings.append(
            Finding(
                "lr_irregular",
                "warning",
                f"the learning rate rises again after its peak, at step(s) {_steps(rises)}: restarts, or a resumed run "
                "whose scheduler started over",
                "resume with the optimizer and scheduler state (--resume from a checkpoint, not a fresh run on the "
                "weights); use restarts only on purpose",
                steps=rises,
            )
        )
    progressed = steps[-1] / total if total else 1.0
    if progressed >= 0.9 and lr[-1] > t.decayed_end_ratio * peak and not rises:
        findings.append(
            Finding(
                "no_decay",
                "warning",
                f"the learning rate ended at {lr[-1]:g}, {100 * lr[-1] / peak:.0f}% of its peak {peak:g}: no decay",
                "decay it to zero after the warmup (lr_scheduler_type='linear' or 'cosine'); the final low-LR steps "
                "settle the weights",
            )
        )
    return findings


def _grad_norm(
    history: TrainingHistory, settings: RunSettings, first_bad: int | None, t: DiagnosisThresholds
) -> list[Finding]:
    keep = np.isfinite(history.grad_norm)
    if first_bad is not None:
        keep &= history.grad_steps < first_bad
    steps, norms = history.grad_steps[keep], history.grad_norm[keep]
    n = len(norms)
    if n < t.min_points:
        return []
    findings = []
    window = _window(n, t)
    spikes = [
        int(steps[i])
        for i in range(window, n)
        if norms[i] > t.grad_spike_factor * max(float(np.median(norms[i - window : i])), 1e-12)
    ]
    if spikes:
        findings.append(
            Finding(
                "grad_norm_spikes",
                "warning" if len(spikes) >= t.grad_spikes_for_warning else "info",
                f"{len(spikes)} grad-norm spike(s) above {t.grad_spike_factor:g}x the preceding median "
                f"(median {np.median(norms):.3g}), at step(s) {_steps(spikes)}",
                "keep gradient clipping at max_grad_norm=1.0 (the logged norm is measured before clipping), lower the "
                "learning rate and lengthen the warmup",
                steps=spikes,
            )
        )
    clip = settings.max_grad_norm
    if clip and float(np.median(norms)) > 2 * clip:
        findings.append(
            Finding(
                "always_clipped",
                "info",
                f"the median grad norm {np.median(norms):.3g} is far above max_grad_norm={clip:g}: nearly every step "
                "is clipped, so the step size is set by the clipping rather than the learning rate",
                "fine while the loss falls; if it stalls, the learning rate has less effect than it seems (compare "
                "runs at a different max_grad_norm before raising the learning rate)",
            )
        )
    part = max(2, int(round(n * t.tail_fraction)))
    early = float(np.median(norms[window // 2 : window // 2 + part]))  # skip the first warmup points
    late = float(np.median(norms[-part:]))
    if early > 0 and late > t.grad_growth_factor * early:
        findings.append(
            Finding(
                "grad_norm_growing",
                "warning",
                f"the grad norm grew from about {early:.3g} to {late:.3g} ({late / early:.1f}x) over the run",
                "a growing grad norm precedes divergence: lower the learning rate, keep max_grad_norm=1.0",
                steps=[int(steps[-part])],
            )
        )
    return findings


def _train_eval(history: TrainingHistory, first_bad: int | None, t: DiagnosisThresholds) -> list[Finding]:
    keep = np.isfinite(history.eval_loss)
    if first_bad is not None:
        keep &= history.eval_steps < first_bad
    eval_steps, eval_loss = history.eval_steps[keep], history.eval_loss[keep]
    if not len(history.eval_loss):
        return [
            Finding(
                "no_eval",
                "info",
                "no evaluation loss was logged, so over-fitting cannot be seen",
                "evaluate on a held-out split during training (eval_strategy='steps', eval_steps about 1/10 of the "
                "run)",
            )
        ]
    findings = []
    finite = np.isfinite(history.loss)
    train_steps, train_loss = history.loss_steps[finite], history.loss[finite]
    if len(eval_loss) and len(train_loss):
        trend = _rolling_median(train_loss, min(_window(len(train_loss), t), len(train_loss)))

        def train_at(step: int) -> float:
            index = int(np.searchsorted(train_steps, step, side="right")) - 1
            return float(trend[max(0, index)])

        last_train = train_at(int(eval_steps[-1]))
        gap = (eval_loss[-1] - last_train) / last_train if last_train > 0 else 0.0
        if gap > t.train_eval_gap:
            findings.append(
                Finding(
                    "train_eval_gap",
                    "warning",
                    f"the eval loss {eval_loss[-1]:.3g} is {100 * gap:.0f}% above the training loss {last_train:.3g} "
                    f"at step {int(eval_steps[-1])}: the model fits the training pages better than held-out ones",
                    "more (or more varied) training data, LoRA dropout 0.1 / weight decay, fewer epochs or early "
                    "stopping; check the eval split comes from the same distribution",
                    steps=[int(eval_steps[-1])],
                )
            )
        best = int(np.argmin(eval_loss))
        if len(eval_loss) >= 3 and best < len(eval_loss) - 1 and eval_loss[-1] > (1 + t.overfit_rise) * eval_loss[best]:
            if train_at(int(eval_steps[-1])) < train_at(int(eval_steps[best])):
                findings.append(
                    Finding(
                        "overfitting",
                        "warning",
                        f"the eval loss was lowest at step {int(eval_steps[best])} ({eval_loss[best]:.3g}) and rose to "
                        f"{eval_loss[-1]:.3g} by step {int(eval_steps[-1])} while the training loss kept falling",
                        f"keep the checkpoint nearest step {int(eval_steps[best])} (load_best_model_at_end=True, "
                        "metric_for_best_model='eval_loss', EarlyStoppingCallback), train fewer epochs or add data",
                        steps=[int(eval_steps[best])],
                    )
                )
    return findings


def _steps(steps: list[int], limit: int = 6) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f" and {len(steps) - limit} more" if len(steps) > limit else "")


# ---------------------------------------------------------------------------------------------------------- plot


def plot_training(report: TrainingReport, path: str | Path) -> Path:
    """Three panels against the optimizer step: training loss (raw and trend) with the eval loss, the learning
    rate, and the grad norm (log scale); epoch boundaries dotted, NaN and spikes marked in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = report.history
    path = Path(path)
    fig, (ax_loss, ax_lr, ax_grad) = plt.subplots(
        3, 1, figsize=(11, 9), sharex=True, height_ratios=(2.2, 1, 1.2), layout="constrained"
    )
    finite = np.isfinite(h.loss)
    if finite.any():
        ax_loss.plot(h.loss_steps[finite], h.loss[finite], color="tab:blue", alpha=0.5, linewidth=1,
                     label="training loss (logged)")
        trend = _rolling_median(h.loss[finite], _window(int(finite.sum()), report.thresholds))
        ax_loss.plot(h.loss_steps[finite], trend, color="tab:blue", linewidth=2, label="training loss (trend)")
        top = float(np.nanpercentile(h.loss[finite], 98)) * 1.6
        if np.nanmax(h.loss[finite]) > top:  # keep a huge spike from flattening the curve; mark it at the edge
            off = h.loss[finite] > top
            ax_loss.set_ylim(top=top, bottom=min(0.0, float(np.nanmin(h.loss[finite]))))
            ax_loss.scatter(h.loss_steps[finite][off], np.full(off.sum(), top * 0.98), marker="^", color="tab:red",
                            zorder=5, label="off-scale value")
        low, high = float(np.nanmin(h.loss[finite])), float(np.nanmax(h.loss[finite]))
        if low > 0 and high - low < 0.25 * high:  # a nearly flat loss: show it against zero so it looks flat
            ax_loss.set_ylim(0, 1.1 * max(high, float(np.nanmax(h.eval_loss, initial=0.0))))
    eval_finite = np.isfinite(h.eval_loss)
    if eval_finite.any():
        ax_loss.plot(h.eval_steps[eval_finite], h.eval_loss[eval_finite], "o-", color="tab:orange", linewidth=1.5,
                     markersize=4, label="eval loss")
    spike_steps = [s for f in report.findings if f.kind == "loss_spikes" for s in f.steps]
    if spike_steps:
        mask = np.isin(h.loss_steps, spike_steps)
        ax_loss.scatter(h.loss_steps[mask], h.loss[mask], marker="x", color="tab:red", s=50, zorder=6,
                        label="spike")
    for finding in report.findings:
        if finding.kind == "nan":
            for ax in (ax_loss, ax_lr, ax_grad):
                ax.axvline(finding.steps[0], color="tab:red", linewidth=1.5)
            ax_loss.text(finding.steps[0], 0.97, " NaN from here", color="tab:red", va="top",
                         transform=ax_loss.get_xaxis_transform())
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.legend(loc="upper right", fontsize=8)

    lr_finite = np.isfinite(h.learning_rate)
    if lr_finite.any():
        ax_lr.plot(h.lr_steps[lr_finite], h.learning_rate[lr_finite], color="tab:green", linewidth=1.5)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("Learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    grad_finite = np.isfinite(h.grad_norm) & (h.grad_norm > 0)
    if grad_finite.any():
        values = h.grad_norm[grad_finite]
        ax_grad.plot(h.grad_steps[grad_finite], values, color="tab:purple", linewidth=1)
        if values.max() > 20 * values.min():  # a log scale only when the norm spans orders of magnitude
            ax_grad.set_yscale("log")
        grad_spikes = [s for f in report.findings if f.kind == "grad_norm_spikes" for s in f.steps]
        if grad_spikes:
            mask = np.isin(h.grad_steps, grad_spikes)
            ax_grad.scatter(h.grad_steps[mask], h.grad_norm[mask], marker="x", color="tab:red", s=50, zorder=6)
    if (~np.isfinite(h.grad_norm)).any():
        bad = h.grad_steps[~np.isfinite(h.grad_norm)]
        ax_grad.scatter(bad, np.full(len(bad), 1.0), marker="v", color="tab:red", clip_on=False, label="NaN/inf",
                        transform=ax_grad.get_xaxis_transform())
        ax_grad.legend(loc="upper right", fontsize=8)
    ax_grad.set_ylabel("grad norm\n(before clipping)")
    ax_grad.set_title("Gradient norm")
    ax_grad.set_xlabel("optimizer step")

    if not h.finished and h.max_steps > h.global_step:  # an interrupted run: show what is missing
        for ax in (ax_loss, ax_lr, ax_grad):
            ax.axvspan(h.global_step, h.max_steps, color="0.85", alpha=0.5, linewidth=0)
            ax.set_xlim(right=h.max_steps)
        ax_loss.text((h.global_step + h.max_steps) / 2, 0.5, f"not run\n(stopped at step {h.global_step})",
                     ha="center", va="center", color="0.35", transform=ax_loss.get_xaxis_transform())
    boundaries = [e.last_step for e in report.epochs[:-1]]
    for ax in (ax_loss, ax_lr, ax_grad):
        ax.grid(alpha=0.3)
        for step in boundaries:
            ax.axvline(step, color="0.5", linestyle=":", linewidth=1)
    for e in report.epochs:
        ax_loss.text((e.first_step + e.last_step) / 2, 0.02, f"epoch {e.epoch}", ha="center", va="bottom",
                     fontsize=8, color="0.4", transform=ax_loss.get_xaxis_transform())
    problems = [f.kind for f in report.findings if f.severity != "info"]
    fig.suptitle(f"{report.run_dir.name}: {report.verdict}" + (f" ({', '.join(problems)})" if problems else ""),
                 fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
