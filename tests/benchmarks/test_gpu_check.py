"""scripts/gpu_check.sh's Python half (colintern/benchmarks/gpu_check.py) on the CPU: the bf16 step, the tiny LoRA
curve and the environment record, run as the script runs them (in-process) and read back from their JSON."""

import json
import math

from colintern.benchmarks.full_size_check import expected_lora_trainable
from colintern.benchmarks.gpu_check import build_parser, main


def run_check(argv):
    args = build_parser().parse_args(argv)
    code = main(args)
    return code, json.loads(open(args.output).read())


def test_bf16_step_records_the_dtype_and_the_moved_fraction_of_every_group(tiny_model_dir, tmp_path):
    code, report = run_check(["bf16-step", "--lr", "5e-5", "--device", "cpu", "--output", str(tmp_path / "b.json")])
    assert report["command"].startswith("python ") and report["device"] == "cpu"
    (step,) = report["steps"]
    assert math.isfinite(step["loss"]) and step["lr"] == 5e-5
    groups = step["groups"]
    assert {"lora_or_language_model", "head"} <= set(groups)
    assert groups["lora_or_language_model"]["dtypes"] == ["float32"]  # peft keeps LoRA weights in float32
    assert groups["head"]["parameters"] == 128 * 128 + 128
    assert 0 < step["head_weight_fraction_changed"] <= 1
    # the verdict follows from what was recorded: float32 master weights, and every head weight moved
    head_ok = step["head_weight_dtype"] == ["float32"] and step["head_weight_fraction_changed"] == 1.0
    all_float32 = all(group["dtypes"] == ["float32"] for group in groups.values())
    assert step["every_trained_parameter_float32"] == all_float32
    assert report["passed"] == step["passed"] == (head_ok and all_float32)
    assert code == (0 if report["passed"] else 1)


def test_tiny_lora_curve_trains_on_a_real_format_data_set(tiny_model_dir, tmp_path):
    """The data set is written as a Hub download of vidore/colpali_train_set is (data/train-*.parquet,
    data/test-*.parquet); whether colintern's loader reads both splits with their own rows is recorded and decides the
    verdict, and the curve is measured either way (on train/ and test/ folders when the snapshot is not read)."""
    code, report = run_check([
        "lora-curve", "--tiny", "--steps", "2", "--eval-steps", "2",
        "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path / "curve.json"),
    ])  # fmt: skip
    assert (tmp_path / "work" / "data" / "data" / "train-00000-of-00001.parquet").is_file()
    loader = report["data"]["loader"]
    # colintern reads the Hub snapshot layout with its own splits (issue 15 item 2)
    assert loader["ok"] and code == 0 and report["passed"]
    assert loader["rows_found"] == {"train": 16, "test": 8} and "fell_back_to" not in loader
    assert [entry["step"] for entry in report["losses"]] == [1, 2]
    assert all(math.isfinite(entry["loss"]) for entry in report["losses"])
    assert [entry["step"] for entry in report["eval_losses"]] == [2]
    assert report["global_step"] == 2 and report["steady_samples_per_second"] > 0
    from transformers.models.internvl import InternVLConfig

    tiny = expected_lora_trainable(InternVLConfig.from_pretrained(tiny_model_dir), 32)["total"]
    assert report["trainable_parameters"] == report["trainable_expected_by_formula"] == tiny
    assert report["data"]["columns"] == ["query", "image", "image_filename", "answer", "source"]


def test_environment_on_a_cpu_records_versions_and_the_bf16_noise(tiny_model_dir, tmp_path):
    code, report = run_check(["environment", "--output", str(tmp_path / "env.json")])
    assert code == 0 and report["passed"] is None  # nothing to pass or fail without a GPU
    assert report["cuda_available"] is False and report["versions"]["torch"]
    assert report["flash_attention_forward"]["skipped"] == "no CUDA device"
    noise = report["flash_attention_forward"]["bf16_vs_float32"]
    assert 0 < noise["bf16_vs_float32"] < 0.1  # bf16 rounding shows, on unit-norm embeddings it stays small
    assert noise["eager_vs_sdpa_bf16"] < 0.1
