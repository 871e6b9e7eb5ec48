"""The memory benchmark: its tensor-memory tracker, and the model's prediction against a real tiny training step."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from colintern.benchmarks.memory import TensorMemoryTracker, measure_and_predict
from colintern.model.embedded import EMBEDDED_MODEL
from colintern.tuning.memory_model import TrainingMemorySetup


def test_tracker_counts_storages_until_they_are_released():
    existing = torch.zeros(1000)  # 4,000 bytes
    tracker = TensorMemoryTracker()
    tracker.track(existing, existing.view(10, 100))  # a view shares the storage: counted once
    with tracker:
        first = torch.ones(2000)  # +8,000
        second = first * 2  # +8,000 -> 20,000 live
        del first  # -8,000
        joined = torch.cat([second, second])  # +16,000 -> 28,000 live: the peak
        del second, joined
    assert tracker.peak_bytes == 28_000
    assert tracker.current_bytes == 4_000


def test_tracker_sees_the_backward_pass():
    weight = torch.randn(64, 64, requires_grad=True)
    tracker = TensorMemoryTracker()
    tracker.track(weight)
    with tracker:
        (weight @ weight).relu().sum().backward()
    assert tracker.current_bytes >= 2 * weight.numel() * 4  # the weight and its gradient stay
    assert tracker.peak_bytes >= 4 * weight.numel() * 4  # product, relu output, and gradients were alive together


@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_prediction_matches_a_real_training_step(tiny_model_dir, finetuning):
    setup = TrainingMemorySetup(
        per_device_batch_size=4,
        query_tokens=16,
        finetuning=finetuning,
        lora_rank=8,
        dtype="float32",
        device="cpu",
    )
    row = measure_and_predict(EMBEDDED_MODEL, setup)
    assert row["measured_bytes"] > 0
    assert abs(row["error"]) < 0.15, row


def test_benchmark_command_records_the_comparison(tiny_model_dir, tmp_path, capsys):
    path = Path(__file__).resolve().parents[2] / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("benchmark_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["memory", "--batch-sizes", "2", "--modes", "lora", "--checkpointing", "on", "--query-tokens", "8"]
    argv += ["--output-dir", str(tmp_path), "--tag", "test"]
    assert script.run(script.main, script.build_parser(), argv) == 0
    assert "| lora | on | 2 |" in capsys.readouterr().out
    result = json.loads((tmp_path / "memory-test.json").read_text())
    assert result["benchmark"] == "memory" and result["device"] == "cpu"
    (row,) = result["rows"]
    assert row["measured_bytes"] > 0 and abs(row["error"]) < 0.15
    assert result["machine"]["torch"] == torch.__version__
