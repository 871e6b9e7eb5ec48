"""Learning-rate range test (L. Smith, "Cyclical Learning Rates", 2015; the fastai LR finder).

The learning rate grows exponentially from `lr_min` to `lr_max` over `steps` optimizer steps of the real training
setup (same model, data, loss, optimizer); the loss is smoothed with a bias-corrected exponential moving average and
the sweep stops once it diverges (smoothed loss above `divergence` x its minimum). Three readings of the curve are
recorded: the steepest descent of the smoothed loss against log(lr) before its minimum (noisy: one steep wiggle
decides it), fastai's "valley" (the middle of the longest decreasing stretch of the curve) and the minimum's rate / 10.
The suggestion is SUGGESTION_RULE, chosen by measurement: see results/lr_finder/README.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from colintern.cli import check_option
from colintern.training.arguments import RunConfig
from colintern.utils import ColinternError

logger = logging.getLogger(__name__)

SKIP_START = 10  # steps whose loss is left out of the suggestion (the moving average is still settling)
MIN_POINTS = 3  # points after SKIP_START that a suggestion needs


@dataclass
class LRFinderResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestion: float | None = None  # by SUGGESTION_RULE
    min_loss_lr: float | None = None
    steepest_lr: float | None = None
    valley_lr: float | None = None
    min_over_10: float | None = None
    rule: str = ""
    diverged_at: float | None = None
    skip_start: int = SKIP_START

    def to_dict(self) -> dict:
        return asdict(self)

    def why_no_suggestion(self) -> str:
        """Why the sweep gave no steepest-descent suggestion, and what to change."""
        if self.min_loss_lr is None:  # too few points after the first skip_start steps
            where = f", diverging at {self.diverged_at:.2e}" if self.diverged_at else ""
            return (f"the sweep stopped after {len(self.lrs)} steps{where}, too few after the first "
                    f"{self.skip_start}; lower --lr-max or give more --steps.")
        return f"the loss was lowest at the start of the sweep ({self.min_loss_lr:.2e}); lower --lr-min."


class _Recorder(TrainerCallback):
    def __init__(self, result: LRFinderResult, beta: float, divergence: float, skip_start: int):
        self.result, self.beta, self.divergence, self.skip_start = result, beta, divergence, skip_start
        self.average = 0.0
        self.best = math.inf

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "loss" not in logs or "learning_rate" not in logs:
            return control
        loss, lr = float(logs["loss"]), float(logs["learning_rate"])
        step = len(self.result.losses) + 1
        self.average = self.beta * self.average + (1 - self.beta) * loss
        smoothed = self.average / (1 - self.beta**step)
        self.result.lrs.append(lr)
        self.result.losses.append(loss)
        self.result.smoothed.append(smoothed)
        if step > self.skip_start:
            self.best = min(self.best, smoothed)
            if not math.isfinite(loss) or smoothed > self.divergence * self.best:
                self.result.diverged_at = lr
                control.should_training_stop = True
        return control


def suggest(
    lrs: list[float], smoothed: list[float], skip_start: int = SKIP_START
) -> tuple[float | None, float | None]:
    """(steepest-descent lr before the minimum, lr of the minimum smoothed loss)."""
    if len(lrs) < skip_start + MIN_POINTS:
        return None, None
    lrs_arr, loss_arr = np.asarray(lrs[skip_start:]), np.asarray(smoothed[skip_start:])
    finite = np.isfinite(loss_arr)
    lrs_arr, loss_arr = lrs_arr[finite], loss_arr[finite]
    minimum = int(np.argmin(loss_arr))
    if minimum < 2:
        return None, float(lrs_arr[minimum])
    gradient = np.gradient(loss_arr[: minimum + 1], np.log(lrs_arr[: minimum + 1]))
    return float(lrs_arr[int(np.argmin(gradient))]), float(lrs_arr[minimum])


def valley(lrs: list[float], smoothed: list[float], skip_start: int = 10) -> float | None:
    """fastai's "valley" rule (fastai.callback.schedule.valley): the longest decreasing subsequence of the smoothed
    loss, and the learning rate halfway along it (start + 1/3 + 1/6 of its length, as fastai indexes it)."""
    losses = [v for v in smoothed[skip_start:]]
    rates = lrs[skip_start:]
    n = len(losses)
    if n < 3:
        return None
    longest = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[max_end] < longest[i]:
                max_end = i
                max_start = max_end - longest[max_end]
    sections = (max_end - max_start) / 3
    return float(rates[max_start + int(sections) + int(sections / 2)])


SUGGESTION_RULE = "valley"  # or "min/10"; measured on the demo and the LoRA stage (results/lr_finder/README.md)


def apply_rules(result: LRFinderResult, skip_start: int = 10, rule: str = SUGGESTION_RULE) -> LRFinderResult:
    """Fill in the three readings of the curve and the suggestion by `rule`."""
    if rule not in ("valley", "min/10"):
        raise ValueError(f"unknown suggestion rule {rule!r} (valley or min/10)")
    result.steepest_lr, result.min_loss_lr = suggest(result.lrs, result.smoothed, skip_start)
    result.valley_lr = valley(result.lrs, result.smoothed, skip_start)
    result.min_over_10 = result.min_loss_lr / 10 if result.min_loss_lr else None
    result.rule = rule
    result.suggestion = result.valley_lr if rule == "valley" else result.min_over_10
    return result


def find_lr(
    config: RunConfig,
    lr_min: float = 1e-7,
    lr_max: float = 1.0,
    steps: int = 200,
    divergence: float = 4.0,
    beta: float = 0.9,
    skip_start: int = SKIP_START,
) -> LRFinderResult:
    """Sweep the learning rate over `steps` real training steps of `config`; nothing is saved but the config."""
    from colintern.training.trainer import build_trainer

    check_option(lr_min, "--lr-min", gt=0)
    check_option(lr_max, "--lr-max", gt=0)
    check_option(steps, "--steps", kind=int, ge=skip_start + MIN_POINTS)
    check_option(divergence, "--divergence", gt=1)
    if lr_max <= lr_min:
        raise ColinternError(f"--lr-max ({lr_max:g}) must be larger than --lr-min ({lr_min:g}): the sweep goes up.")

    config.training.max_steps = steps
    config.training.warmup_steps = 0
    config.training.eval_steps = None
    config.training.logging_steps = 1
    config.training.report_to = "none"
    config.training.resume_from_checkpoint = None
    config.training.early_stopping_patience = None
    ratio = lr_max / lr_min

    def exponential(optimizer):
        # each parameter group starts at lr_min x (its lr / the main lr), keeping per-part ratios
        for group in optimizer.param_groups:
            group["initial_lr"] = lr_min * group["lr"] / config.training.learning_rate
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: ratio ** (step / max(1, steps - 1)))

    result = LRFinderResult(skip_start=skip_start)
    run = build_trainer(config, [_Recorder(result, beta, divergence, skip_start)], scheduler_fn=exponential,
                        save_checkpoints=False, validate_resume=False)
    for group in run.trainer.optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    run.stop.install()
    try:
        run.trainer.train()
    finally:
        run.stop.uninstall()
    return apply_rules(result, skip_start)


def plot_lr_finder(result: LRFinderResult, path: str | Path, title: str = "Learning-rate range test") -> Path:
    """Loss (raw and smoothed) against learning rate on a log axis, with the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=1, label="loss per step")
    ax.plot(result.lrs, result.smoothed, color="C0", linewidth=2, label="smoothed loss")
    if result.valley_lr:
        ax.axvline(result.valley_lr, color="C2", linestyle="--",
                   label=f"valley {result.valley_lr:.2e}" + (" (suggestion)" if result.rule == "valley" else ""))
    if result.min_over_10:
        ax.axvline(result.min_over_10, color="C4", linestyle="--",
                   label=f"minimum / 10 {result.min_over_10:.2e}" + (" (suggestion)" if result.rule == "min/10" else ""))
    if result.steepest_lr:
        ax.axvline(result.steepest_lr, color="0.5", linestyle=(0, (1, 3)), label=f"steepest {result.steepest_lr:.2e}")
    if result.min_loss_lr:
        ax.axvline(result.min_loss_lr, color="C3", linestyle=":", label=f"minimum {result.min_loss_lr:.2e}")
    if result.diverged_at:
        ax.axvline(result.diverged_at, color="C1", linestyle="-.", label=f"diverged {result.diverged_at:.2e}")
    ax.set_xscale("log")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
