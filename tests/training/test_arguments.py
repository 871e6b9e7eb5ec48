import argparse
import json

import pytest

from colintern.training.arguments import (
    LM_LINEAR_TARGETS,
    RunConfig,
    add_config_arguments,
    advisor_overrides,
    config_from_args,
    load_yaml_config,
)
from colintern.utils import ColinternError


def parse(argv: list[str]) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_default_preset_is_the_seed_recipe():
    config = parse([])
    assert config.preset == "colintern3_5-1b"
    assert config.model.name_or_path == "OpenGVLab/InternVL3_5-1B-HF"
    assert config.data.dataset == "vidore/colpali_train_set"
    t, lora = config.training, config.lora
    assert (t.epochs, t.batch_size, t.grad_accum, t.lr, t.warmup_steps) == (5, 16, 4, 5e-5, 100)
    assert (lora.enabled, lora.rank, lora.alpha, lora.dropout) == (True, 32, 32, 0.1)
    assert t.gradient_checkpointing and t.bf16 == "auto" and config.model.attn_implementation == "auto"


def test_flags_override_the_preset():
    config = parse(["--preset", "demo", "--peft", "--lr", "5e-5", "--max-steps", "20", "--output-dir", "D",
                    "--batch-size", "8", "--grad-accum", "2", "--warmup-steps", "0", "--lora-rank", "8", "--seed", "7",
                    "--epochs", "2", "--model", "m", "--dataset", "d", "--no-train-vision"])
    assert config.lora.enabled and config.lora.rank == 8
    t = config.training
    assert (t.lr, t.max_steps, t.output_dir, t.batch_size, t.grad_accum, t.warmup_steps, t.seed, t.epochs) == (
        5e-5, 20, "D", 8, 2, 0, 7, 2.0)
    assert config.model.name_or_path == "m" and config.data.dataset == "d" and not t.train_vision


def test_yaml_base_inheritance_and_precedence(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: demo.yaml\nexperiment: {name: lr-test, hyperparameters_under_test: [training.lr]}\n"
                     "training: {lr: 2.0e-4}\n")
    data = load_yaml_config(child)
    assert data["model"]["name_or_path"] == "embedded:tiny-internvl3_5" and data["training"]["lr"] == 2e-4
    config = parse(["--config", str(child), "--lr", "3e-4"])
    assert config.training.lr == 3e-4  # the flag wins over the file
    assert config.training.batch_size == 32  # inherited from demo.yaml
    assert config.experiment.name == "lr-test"


def test_unknown_fields_and_bad_values_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {learning_rate: 1e-4}\n")
    with pytest.raises(ColinternError, match="unknown field 'training.learning_rate'"):
        parse(["--config", str(bad)])
    with pytest.raises(ColinternError, match="training.batch_size"):
        parse(["--batch-size", "many"])
    with pytest.raises(ColinternError, match="Unknown preset 'nope'.*demo"):
        parse(["--preset", "nope"])


def test_advisor_json_feeds_the_training_config(tmp_path):
    advice = tmp_path / "advisor.json"
    advice.write_text(json.dumps({"learning_rate": 3e-5, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 8,
                                  "effective_batch_size": 64, "num_train_epochs": 5, "warmup_steps": 220,
                                  "lora_rank": 64, "lora_alpha": 64, "estimated_peak_memory_gb": 21.5}))
    config = parse(["--config-from", str(advice)])
    assert (config.training.lr, config.training.batch_size, config.training.grad_accum) == (3e-5, 8, 8)
    assert (config.training.warmup_steps, config.lora.rank, config.lora.alpha) == (220, 64, 64)
    assert parse(["--config-from", str(advice), "--lr", "1e-5"]).training.lr == 1e-5
    with pytest.raises(ColinternError, match="no known hyperparameters"):
        (tmp_path / "empty.json").write_text("{}")
        advisor_overrides(tmp_path / "empty.json")


def test_saved_run_config_reloads_identically(tmp_path):
    config = parse(["--preset", "demo", "--lr", "4e-4"])
    config.save(tmp_path / "colintern_run.json")
    again = parse(["--config", str(tmp_path / "colintern_run.json")])
    assert again.to_dict() == config.to_dict()


def test_lora_targets_match_language_model_linears_only():
    import re

    assert re.fullmatch(LM_LINEAR_TARGETS, "base_model.model.language_model.layers.3.self_attn.q_proj")
    assert re.fullmatch(LM_LINEAR_TARGETS, "language_model.layers.0.mlp.down_proj")
    assert not re.fullmatch(LM_LINEAR_TARGETS, "vision_tower.encoder.layer.0.attention.q_proj")
    assert not re.fullmatch(LM_LINEAR_TARGETS, "custom_text_proj")
