import math

import numpy as np
import pytest

from colintern.training.arguments import RunConfig
from colintern.training.lr_finder import LRFinderResult, apply_rules, find_lr, plot_lr_finder, suggest, valley
from colintern.utils import ColinternError

from tests.training.test_trainer import small_run


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = list(np.logspace(-6, 0, 120))
    x = np.log10(lrs)
    # loss falls fastest around 1e-3, bottoms out near 1e-2, then blows up
    loss = list(3 - 1.5 * np.tanh(2 * (x + 3)) + np.where(x > -2, 20 * (x + 2) ** 2, 0))
    steepest, minimum = suggest(lrs, loss, skip_start=5)
    assert 5e-4 < steepest < 2e-3
    assert 3e-3 < minimum < 3e-2


def test_range_test_on_the_tiny_model_sweeps_exponentially_and_plots(colintern_home, small_synthdocs_dir, tmp_path):
    config = small_run(tmp_path, small_synthdocs_dir, name="lrf")
    config.lora.enabled = False
    result = find_lr(config, lr_min=1e-5, lr_max=1e-1, steps=24, skip_start=3)
    assert 10 <= len(result.lrs) <= 24
    ratios = np.diff(np.log(result.lrs))
    assert np.allclose(ratios, ratios[0], rtol=1e-3)  # exponential schedule
    assert math.isclose(result.lrs[0], 1e-5, rel_tol=1e-6)
    assert result.min_loss_lr is not None
    png = plot_lr_finder(result, tmp_path / "lr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list((tmp_path / "lrf").glob("checkpoint-*"))  # the sweep saves nothing


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr_min": 0.0}, r"--lr-min = 0.0: must be a finite number > 0"),
        ({"lr_min": 1.0, "lr_max": 1e-4}, r"--lr-max \(0.0001\) must be larger than --lr-min \(1\)"),
        ({"steps": 5}, r"--steps = 5: must be an integer >= 13"),
        ({"divergence": float("nan")}, r"--divergence = nan"),
    ],
)
def test_a_bad_range_is_refused_before_any_step(kwargs, message, tmp_path):
    """lr_min 0 divided by zero and an inverted range ran the whole sweep; now both stop before the model loads."""
    config = RunConfig()
    config.model.name_or_path = str(tmp_path / "no-model-needed")
    with pytest.raises(ColinternError, match=message):
        find_lr(config, **{"lr_min": 1e-6, "lr_max": 1.0, "steps": 20, **kwargs})


def test_no_suggestion_says_why():
    diverged = LRFinderResult(lrs=[1e-5, 1e-4, 1e-3], smoothed=[3, 2, 9], diverged_at=1e-3)
    assert "stopped after 3 steps, diverging at 1.00e-03" in diverged.why_no_suggestion()
    flat = LRFinderResult(lrs=list(np.logspace(-6, 0, 20)), smoothed=list(np.linspace(1, 5, 20)), min_loss_lr=1e-6)
    assert "lowest at the start of the sweep" in flat.why_no_suggestion() and "--lr-min" in flat.why_no_suggestion()


def _curve_with_a_wiggle():
    lrs = list(np.logspace(-6, 0, 121))
    x = np.log10(lrs)
    # flat (slowly rising) until 1e-4, falling steadily to a minimum at 1e-2, then diverging; one noisy dip at 1e-5
    loss = np.where(x < -4, 3 + 0.01 * (x + 6), 3.02 - 0.8 * (x + 4)) + np.where(x > -2, 20 * (x + 2) ** 2, 0)
    loss[np.argmin(np.abs(x + 5))] -= 0.5
    return lrs, list(loss)


def test_valley_is_the_middle_of_the_longest_descent_and_ignores_a_single_steep_wiggle():
    lrs, loss = _curve_with_a_wiggle()
    assert 5e-4 < valley(lrs, loss, skip_start=5) < 2e-3  # halfway along 1e-4 -> 1e-2
    steepest, minimum = suggest(lrs, loss, skip_start=5)
    assert 5e-6 < steepest < 2e-5  # the steepest-descent reading lands on the wiggle
    assert 5e-3 < minimum < 2e-2
    result = apply_rules(LRFinderResult(lrs=lrs, losses=loss, smoothed=loss), skip_start=5, rule="valley")
    assert result.suggestion == result.valley_lr and result.rule == "valley"
    assert math.isclose(apply_rules(result, skip_start=5, rule="min/10").suggestion, result.min_loss_lr / 10)
