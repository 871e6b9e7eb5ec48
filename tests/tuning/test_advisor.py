"""The hyperparameter advisor: architecture analysis on the meta device, the rules, and the script's output."""

from __future__ import annotations

import importlib.util
import json

import pytest

from colintern.tuning import advisor
from colintern.tuning.advisor import (
    PRESETS,
    analyze_architecture,
    base_learning_rate,
    load_model_config,
    lora_rank_for_size,
    recommend,
    scale_learning_rate,
    warmup_steps_for,
)
from colintern.utils import ColinternError

ONE_B = "OpenGVLab/InternVL3_5-1B-HF"
REQUIRED_JSON_KEYS = [
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "effective_batch_size",
    "num_train_epochs",
    "warmup_steps",
    "lora_rank",
    "lora_alpha",
    "estimated_peak_memory_gb",
]


@pytest.fixture(scope="module")
def one_b():
    return analyze_architecture(ONE_B, lora_rank=32)


def _qwen3_params(hidden, intermediate, layers, heads, kv_heads, head_dim=128, vocab=151936):
    """Qwen3 parameters from its published shape, by hand: embeddings, per layer q/k/v/o + q/k norms + SwiGLU MLP +
    two RMSNorms, final norm."""
    attention = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    per_layer = attention + 2 * head_dim + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden


def test_internvl3_5_1b_parameter_counts(one_b):
    # The published size of InternVL3.5-1B is 1.06B parameters (InternViT-300M + Qwen3-0.6B + MLP projector +
    # untied LM head), built here on the meta device from the shipped config.
    assert one_b.backbone_params == pytest.approx(1.06e9, rel=0.005)
    assert one_b.language_params == _qwen3_params(1024, 3072, 28, 16, 8)
    assert one_b.lm_head_params == 151936 * 1024
    assert one_b.vision_params == pytest.approx(0.304e9, rel=0.01)  # InternViT-300M
    assert one_b.projector_params == (4096 * 2 + 4096 * 1024 + 1024) + (1024 * 1024 + 1024)  # LN + 2 linears
    assert one_b.head_params == 1024 * 128 + 128
    assert one_b.total_params == one_b.backbone_params - one_b.lm_head_params + one_b.head_params
    assert one_b.vision_params + one_b.projector_params + one_b.language_params + one_b.head_params == (
        one_b.total_params
    )
    # LoRA r=32 on q/k/v/o/gate/up/down of 28 layers: r * (in + out) each
    per_layer = 32 * ((1024 + 2048) + 2 * (1024 + 1024) + (2048 + 1024) + 2 * (1024 + 3072) + (3072 + 1024))
    assert one_b.lora_params == 28 * per_layer
    assert (one_b.text.layers, one_b.text.hidden, one_b.text.heads, one_b.text.kv_heads) == (28, 1024, 16, 8)
    assert (one_b.vision.layers, one_b.vision.hidden, one_b.vision.image_size, one_b.vision.patch_size) == (
        24,
        1024,
        448,
        14,
    )
    # 448px / 14 = 32 x 32 patches, pixel shuffle 0.5 -> 256 tokens; 1536 tokens -> 5-tile grid + thumbnail
    assert one_b.image_seq_length == 256
    assert one_b.tiles_per_page == 6
    assert one_b.page_tokens == 6 * 256 + 5


def test_presets_resolve_offline_and_grow():
    sizes = [analyze_architecture(hub_id).backbone_params for hub_id in PRESETS]
    assert sizes == sorted(sizes)
    assert sizes[-1] == pytest.approx(15.1e9, rel=0.01)  # InternVL3.5-14B
    assert load_model_config("internvl3_5-4b").text_config.hidden_size == 2560  # short preset names work


def test_lora_count_matches_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from colintern.model.loading import load_model

    arch = analyze_architecture(str(tiny_model_dir), lora_rank=8)
    model = load_model(str(tiny_model_dir), device="cpu")
    lora = LoraConfig(
        r=8,
        lora_alpha=8,
        target_modules=advisor.LM_LORA_TARGET_REGEX,
        modules_to_save=list(advisor.LORA_MODULES_TO_SAVE),
    )
    peft_model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == arch.lora_trainable_params
    assert arch.total_params == sum(p.numel() for p in model.parameters()) - arch.lora_params - arch.head_params


@pytest.mark.parametrize("budget", [16, 32, 48, 64, 256, 512, 768, 1024, 1536, 2560, 3072])
@pytest.mark.parametrize("tile_tokens", [16, 256])
def test_tiles_per_page_agrees_with_the_processor(budget, tile_tokens):
    from colintern.model.processing import max_tiles_for_budget

    if budget < tile_tokens:
        with pytest.raises(ColinternError):
            advisor.tiles_per_page(budget, tile_tokens)
        return
    grid = max_tiles_for_budget(budget, tile_tokens)
    assert advisor.tiles_per_page(budget, tile_tokens) == grid + (1 if grid > 1 else 0)
    assert advisor.tiles_per_page(budget, tile_tokens) * tile_tokens <= budget


def test_page_tokens_match_the_processor(tiny_retriever, tiny_model_dir):
    from PIL import Image

    _, processor = tiny_retriever
    arch = analyze_architecture(str(tiny_model_dir))
    batch = processor.process_images([Image.new("RGB", (128, 128), "white")])
    assert batch["input_ids"].shape[1] == arch.page_tokens
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == arch.image_tokens_per_page


def test_adapter_folder_resolves_to_its_base(tmp_path, tiny_model_dir):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    assert load_model_config(str(tmp_path)).text_config.hidden_size == 128


@pytest.mark.parametrize("name", ["/no/such/folder", "no-such-org/no-such-model", "embedded:nothing"])
def test_unknown_models_give_a_clear_error(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ColinternError) as error:
        load_model_config(name)
    assert name.split(":")[-1].lstrip("/").split("/")[0] in str(error.value)


# ---------------------------------------------------------------------------------------------- rules
def test_learning_rate_table_and_scaling():
    assert base_learning_rate(int(0.3e9)) == 7e-5
    assert base_learning_rate(int(1.06e9)) == 5e-5
    assert base_learning_rate(int(4.7e9)) == 3e-5
    assert base_learning_rate(int(8.5e9)) < 3e-5
    sizes = [10**power for power in range(6, 12)] + [int(x * 1e9) for x in (0.5, 0.75, 1, 3, 7, 12, 30)]
    rates = [base_learning_rate(size) for size in sorted(sizes)]
    assert rates == sorted(rates, reverse=True)  # never larger for a larger model
    assert scale_learning_rate(5e-5, 64) == 5e-5
    assert scale_learning_rate(5e-5, 256) == pytest.approx(1e-4)  # x4 batch -> x2 lr
    assert scale_learning_rate(5e-5, 16) == pytest.approx(2.5e-5)


def test_lora_rank_and_warmup_rules():
    assert [lora_rank_for_size(int(x * 1e9)) for x in (0.3, 1.06, 2.35, 4.73, 8.5)] == [16, 32, 32, 64, 64]
    assert warmup_steps_for(9275) == 278  # 3%
    assert warmup_steps_for(2000) == 100  # at least 100 ...
    assert warmup_steps_for(500) == 25  # ... unless that would exceed 5% of a short run
    for steps in (40, 500, 2000, 10_000, 100_000):
        assert 0.025 * steps <= warmup_steps_for(steps) <= 0.05 * steps + 1


def test_more_memory_never_gives_a_smaller_batch():
    previous = 0
    for vram in (6, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 141):
        rec = recommend(ONE_B, vram_gib=vram, num_gpus=1)
        assert rec.per_device_train_batch_size >= previous
        assert rec.memory.peak_bytes <= 0.9 * vram * 1024**3
        assert rec.effective_batch_size == 64
        previous = rec.per_device_train_batch_size
    assert previous == 64  # an H200 holds the whole reference batch


@pytest.mark.parametrize("vram", [24, 80])
def test_a_larger_model_never_gets_a_larger_learning_rate(vram):
    rates = [recommend(hub_id, vram_gib=vram, num_gpus=1).learning_rate for hub_id in list(PRESETS)[:4]]
    assert rates == sorted(rates, reverse=True)
    assert rates[0] == 5e-5


def test_recommendation_for_one_b_on_an_80gb_gpu():
    rec = recommend(ONE_B, vram_gib=80, num_gpus=1)
    assert rec.lora_rank == rec.lora_alpha == 32
    assert rec.num_train_epochs == 5
    assert rec.per_device_train_batch_size * rec.gradient_accumulation_steps == 64
    assert rec.total_steps == 5 * -(-advisor.COLPALI_TRAIN_SET_PAIRS // 64)
    assert rec.warmup_steps == warmup_steps_for(rec.total_steps)
    payload = rec.to_json()
    assert list(payload)[: len(REQUIRED_JSON_KEYS)] == REQUIRED_JSON_KEYS
    assert payload["estimated_peak_memory_gb"] <= 0.9 * 80


def test_multi_gpu_keeps_the_effective_batch():
    rec = recommend(ONE_B, vram_gib=80, num_gpus=8)
    assert rec.per_device_train_batch_size <= 8
    assert rec.effective_batch_size == 64


def test_a_model_that_cannot_fit_is_refused():
    with pytest.raises(ColinternError, match="does not fit"):
        recommend("OpenGVLab/InternVL3_5-14B-HF", vram_gib=12, num_gpus=1)


def test_quantization_lets_a_larger_model_fit_and_travels_to_the_trainer(tmp_path):
    from colintern.training.arguments import advisor_overrides

    plain = recommend("OpenGVLab/InternVL3_5-8B-HF", vram_gib=24, num_gpus=1)
    qlora = recommend("OpenGVLab/InternVL3_5-8B-HF", vram_gib=24, num_gpus=1, quantize="4bit")
    assert qlora.per_device_train_batch_size > plain.per_device_train_batch_size
    assert qlora.memory.part("frozen weights").bytes < plain.memory.part("frozen weights").bytes / 2
    payload = qlora.to_json()
    assert payload["quantize"] == "4bit" and "quantize" not in plain.to_json()
    path = tmp_path / "advisor.json"
    path.write_text(json.dumps(payload))
    assert advisor_overrides(path)["model"]["quantize"] == "4bit"


# ---------------------------------------------------------------------------------------------- the script
def _script():
    path = advisor.Path(__file__).resolve().parents[2] / "scripts" / "hyperparameter_optimizer.py"
    spec = importlib.util.spec_from_file_location("hyperparameter_optimizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(argv):
    from colintern.cli import run

    script = _script()
    return run(script.main, script.build_parser(), argv)


def test_script_prints_the_optimal_hyperparameters_block(capsys):
    assert _run_script(["--model", ONE_B, "--vram-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "OPTIMAL HYPERPARAMETERS" in out
    block = out.split("OPTIMAL HYPERPARAMETERS", 1)[1]
    for label in (
        "Learning Rate:",
        "Batch Size:",
        "Gradient Accumulation:",
        "Effective Batch Size:",
        "Number of Epochs:",
        "Warmup Steps:",
        "LoRA Rank:",
        "Estimated Peak Memory:",
    ):
        assert f"\n{label} " in block, label
    assert "ARCHITECTURE" in out and "MEMORY BREAKDOWN" in out and "frozen weights" in out
    assert "Effective Batch Size: 64" in block


def test_script_json_and_output_file(capsys, tmp_path):
    target = tmp_path / "advisor.json"
    assert _run_script(["--model", ONE_B, "--vram-gb", "80", "--json", "--output", str(target)]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(target.read_text())
    assert printed == saved
    for key in REQUIRED_JSON_KEYS:
        assert key in saved, key
    assert saved["effective_batch_size"] == 64
    assert saved["lora_alpha"] == saved["lora_rank"] == 32


def test_script_without_gpu_notes_the_16gb_assumption(capsys, caplog, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _run_script(["--model", ONE_B, "--json"]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["advisor"]["vram_gb"] == 16.0
    assert any("No GPU is visible" in note for note in saved["advisor"]["notes"])


def test_script_error_is_one_line(capsys):
    assert _run_script(["--model", "/no/such/checkpoint"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_largest_fitting_batch_is_monotone_in_memory_and_rank():
    from colintern.tuning.advisor import largest_fitting_batch

    batches = [largest_fitting_batch(ONE_B, vram, lora_rank=32) for vram in (8, 16, 24, 48)]
    assert batches == sorted(batches) and batches[0] >= 1
    assert largest_fitting_batch(ONE_B, 16, lora_rank=128) <= largest_fitting_batch(ONE_B, 16, lora_rank=8)
    assert largest_fitting_batch(ONE_B, 16, gradient_checkpointing=False) < batches[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_gpus": 0}, r"--num-gpus = 0: must be an integer >= 1"),  # was taken as 'the visible GPUs'
        ({"lora_dropout": 5.0}, r"--lora-dropout = 5.0: must be a finite number in \[0, 1\)"),  # was written to JSON
        ({"vram_gib": float("nan")}, r"--vram-gb = nan"),
        ({"epochs": 0}, r"--epochs = 0: must be an integer >= 1"),
        ({"query_tokens": 0}, r"--query-tokens = 0"),
        ({"max_num_visual_tokens": 0}, r"--max-num-visual-tokens = 0"),
    ],
)
def test_out_of_range_inputs_are_refused(kwargs, message):
    with pytest.raises(ColinternError, match=message):
        recommend(ONE_B, **{"vram_gib": 24, **kwargs})


def test_script_refuses_a_bad_value_before_writing_json(capsys, tmp_path):
    target = tmp_path / "advisor.json"
    assert _run_script(["--model", ONE_B, "--lora-dropout", "5", "--output", str(target)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --lora-dropout = 5.0: must be a finite number in [0, 1) (set on the command line)")
    assert not target.exists()


def test_the_demo_lora_preset_holds_the_advisors_settings_for_the_pretrained_backbone(tmp_path):
    """The preset is the advisor's recommendation, not hand-picked numbers: if a rule changes, this names the drift."""
    import json

    from colintern.data.synthdocs import SynthDocsConfig
    from colintern.model.embedded import PRETRAINED_MODEL
    from colintern.training.arguments import RunConfig, advisor_overrides, apply_overrides, load_yaml_config, preset_path
    from colintern.tuning.advisor import recommend

    preset = RunConfig()
    apply_overrides(preset, load_yaml_config(preset_path("demo-lora")), "preset demo-lora")
    n_train = SynthDocsConfig(domain="b").n_train
    advice = recommend(PRETRAINED_MODEL, dataset_size=n_train, epochs=int(preset.training.num_train_epochs))
    (tmp_path / "advisor.json").write_text(json.dumps(advice.to_json()))
    overrides = advisor_overrides(tmp_path / "advisor.json")  # what scripts/train.py --config-from applies
    assert {"learning_rate", "per_device_train_batch_size", "warmup_steps"} <= set(overrides["training"]) and "rank" in overrides["lora"]
    for section, values in overrides.items():
        for name, value in values.items():
            assert getattr(getattr(preset, section), name) == value, f"demo-lora {section}.{name} != advisor {value}"
    assert advice.total_steps == int(preset.training.num_train_epochs) * -(-n_train // advice.effective_batch_size)
    assert preset.lora.enabled and not preset.training.train_vision and preset.training.max_steps == -1
    assert preset.model.name_or_path == PRETRAINED_MODEL and preset.data.dataset == "embedded:synthdocs-b"


def test_models_narrower_than_internvl3_5_1b_get_the_width_scaled_rate():
    """Narrower than InternVL3.5-1B's language model, the rate follows 1/width from the published small-model recipe
    (ColSmolVLM: 5e-4 at 576 wide; measured on the tiny backbone: results/ablations/demo-lora-lr.md); every shipped
    InternVL3.5 keeps the published recipes' rate."""
    from colintern.tuning.advisor import learning_rate_for

    assert learning_rate_for(int(1.06e9), 1024) == 5e-5  # InternVL3.5-1B: ColPali's 5e-5
    assert learning_rate_for(int(0.3e9), 2048) == 7e-5  # wide enough: the table
    assert learning_rate_for(int(0.26e9), 576) == pytest.approx(5e-4)  # ColSmolVLM-256M's own recipe
    assert learning_rate_for(1_075_456, 128) == pytest.approx(2.25e-3)  # the embedded tiny model (4e-4 before)
    assert learning_rate_for(int(1.06e9), 1023) > learning_rate_for(int(1.06e9), 1024)  # only narrower ones move
    for hub_id in PRESETS:
        rec = recommend(hub_id, vram_gib=80, num_gpus=1)
        table = advisor.scale_learning_rate(advisor.base_learning_rate(rec.arch.backbone_params), rec.effective_batch_size)
        assert rec.learning_rate == pytest.approx(table, rel=1e-2), hub_id
    tiny = recommend("embedded:tiny-internvl3_5-pretrained", vram_gib=16, num_gpus=1, dataset_size=6000, epochs=1)
    assert tiny.learning_rate == pytest.approx(2.25e-3) and "576/128" in " ".join(tiny.reasoning)
