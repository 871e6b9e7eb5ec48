"""`make check-full-size` (colintern/benchmarks/full_size_check.py): the whole check on a tiny architecture through the
same code, and its parts (formula, tensor comparison, key layouts, work folder) on their own."""

import json

import pytest
import torch

from colintern.benchmarks.full_size_check import (
    KEY_LAYOUTS,
    build_parser,
    compare_with_checkpoint,
    expected_lora_trainable,
    key_layout,
    main,
    rekey_checkpoint,
    saved_keys,
    shipped_config,
    work_folder,
    write_pairs_dataset,
)
from colintern.utils import ColinternError


def test_lora_formula_gives_the_count_measured_at_full_size():
    # 20,316,288: the trainable count of one LoRA step at full size measured in issue 15 (r = 32)
    expected = expected_lora_trainable(shipped_config(), 32)
    assert expected["total"] == 20_316_288
    assert expected["head"] == 1024 * 128 + 128 and expected["layers"] == 28


def test_tensor_comparison_finds_a_changed_tensor_in_both_layouts(tiny_model_dir, tmp_path):
    from colintern.model.loading import load_retriever

    assert key_layout(saved_keys(tiny_model_dir)) == "legacy"  # what transformers' save_pretrained writes
    other = rekey_checkpoint(tiny_model_dir, tmp_path / "prefixed")
    assert key_layout(saved_keys(other)) == "prefixed"
    assert {k for k in saved_keys(other)} != set(saved_keys(tiny_model_dir))
    for folder in (tiny_model_dir, other):
        model, _ = load_retriever(str(folder), device="cpu")
        result = compare_with_checkpoint(model, folder)
        assert result["compared"] == result["equal"] == len(saved_keys(folder)) and not result["mismatched"]
        assert result["missing"] == ["custom_text_proj.bias", "custom_text_proj.weight"]
        with torch.no_grad():
            model.language_model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
        changed = compare_with_checkpoint(model, folder)["mismatched"]
        prefix = KEY_LAYOUTS[key_layout(saved_keys(folder))][0]
        assert changed == [f"{prefix}layers.1.mlp.up_proj.weight"]


def test_snapshot_layout_reads_as_the_hub_dataset_does(tmp_path):
    import datasets

    from colintern.benchmarks.full_size_check import synthdocs_rows

    rows = synthdocs_rows(5, (64, 90))
    folder = write_pairs_dataset(tmp_path / "snapshot", {"train": rows[:3], "test": rows[3:]}, layout="snapshot")
    assert sorted(p.name for p in (folder / "data").iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    loaded = datasets.load_dataset(str(folder))
    assert {name: len(split) for name, split in loaded.items()} == {"train": 3, "test": 2}
    assert loaded["train"].column_names == ["query", "image", "image_filename", "answer", "source"]
    assert isinstance(loaded["train"].features["image"], datasets.Image)


def test_work_dir_with_earlier_output_is_refused_and_left_alone(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.txt").write_text("not the check's")
    with pytest.raises(ColinternError, match="already has model"), work_folder(str(tmp_path)):
        pass
    assert (tmp_path / "model" / "mine.txt").read_text() == "not the check's"


def test_whole_check_on_a_tiny_architecture(tiny_model_dir, tmp_path):
    """The five checks end to end (Hub-layout checkpoint, load and compare in both layouts, one LoRA step through the
    trainer, encode through the mteb wrapper) on a tiny config: the code path of the full-size run."""
    from colintern.model.embedded import TinyModelConfig, tiny_internvl_config

    config_dir = tmp_path / "tiny-config"
    tiny_internvl_config(TinyModelConfig(), vocab_size=1000, image_token_id=5).save_pretrained(config_dir)
    output = tmp_path / "report.json"
    args = build_parser().parse_args([
        "--config", str(config_dir), "--page-size", "256x352", "--max-num-visual-tokens", "64",
        "--work-dir", str(tmp_path / "work"), "--output", str(output),
    ])  # fmt: skip
    assert main(args) == 0
    report = json.loads(output.read_text())
    checks = {check["name"]: check for check in report["checks"]}
    assert list(checks) == ["checkpoint", "load", "load-other-layout", "lora-step", "encode"]
    assert all(check["passed"] for check in checks.values()) and report["passed"]
    assert checks["checkpoint"]["layout"] == "legacy" and checks["load-other-layout"]["layout"] == "prefixed"
    assert checks["load"]["equal"] == checks["checkpoint"]["saved_tensors"]
    step = checks["lora-step"]
    assert step["trainable_parameters"] == step["expected_by_formula"]["total"]
    assert step["expected_by_formula"]["total"] == 32 * 2 * (
        (128 + 128) + (128 + 64) * 2 + (128 + 128) + (128 + 256) * 2 + (256 + 128)) + 128 * 128 + 128
    assert checks["encode"]["page_embedding"] == [3 * 16, 128]  # 1 x 2 tiles + thumbnail, 16 tokens each
    assert report["command"].startswith("python ") and report["peak_rss_gb"] > 0
    assert (tmp_path / "work" / "model" / "config.json").is_file()  # --work-dir is kept
