import argparse
import json

import pytest

from colintern.training.arguments import (
    LM_LINEAR_TARGETS,
    RunConfig,
    advisor_overrides,
    config_from_args,
    config_parser,
    load_yaml_config,
)
from colintern.utils import ColinternError


def parse(argv: list[str]) -> RunConfig:
    return config_from_args(config_parser().parse_args(argv))


def test_default_preset_is_the_seed_recipe():
    config = parse([])
    assert config.preset == "colintern3_5-1b"
    assert config.model.name_or_path == "OpenGVLab/InternVL3_5-1B-HF"
    assert config.data.dataset == "vidore/colpali_train_set"
    t, lora = config.training, config.lora
    assert (t.num_train_epochs, t.per_device_train_batch_size, t.gradient_accumulation_steps, t.learning_rate,
            t.warmup_steps) == (5, 16, 4, 5e-5, 100)
    assert (lora.enabled, lora.rank, lora.alpha, lora.dropout) == (True, 32, 32, 0.1)
    assert t.gradient_checkpointing and t.bf16 is None and config.model.attn_implementation == "auto"  # None: auto


def test_flags_override_the_preset():
    config = parse(["--preset", "demo", "--peft", "--lr", "5e-5", "--max-steps", "20", "--output-dir", "D",
                    "--batch-size", "8", "--grad-accum", "2", "--warmup-steps", "0", "--lora-rank", "8", "--seed", "7",
                    "--epochs", "2", "--model", "m", "--dataset", "d", "--no-train-vision"])
    assert config.lora.enabled and config.lora.rank == 8
    t = config.training
    assert (t.learning_rate, t.max_steps, t.output_dir, t.per_device_train_batch_size, t.gradient_accumulation_steps,
            t.warmup_steps, t.seed, t.num_train_epochs) == (
        5e-5, 20, "D", 8, 2, 0, 7, 2.0)
    assert config.model.name_or_path == "m" and config.data.dataset == "d" and not t.train_vision


def test_yaml_base_inheritance_and_precedence(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: demo.yaml\nexperiment: {name: lr-test, hyperparameters_under_test: [training.lr]}\n"
                     "training: {lr: 2.0e-4}\n")
    data = load_yaml_config(child)
    assert data["model"]["name_or_path"] == "embedded:tiny-internvl3_5" and data["training"]["learning_rate"] == 2e-4
    config = parse(["--config", str(child), "--lr", "3e-4"])
    assert config.training.learning_rate == 3e-4  # the flag wins over the file
    assert config.training.per_device_train_batch_size == 32  # inherited from demo.yaml
    assert config.experiment.name == "lr-test"


def test_unknown_fields_and_bad_values_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {learning_rat: 1e-4}\n")
    with pytest.raises(ColinternError, match="unknown field 'training.learning_rat' \\(did you mean learning_rate"):
        parse(["--config", str(bad)])
    with pytest.raises(ColinternError, match="training.per_device_train_batch_size"):
        parse(["--batch-size", "many"])
    with pytest.raises(ColinternError, match="Unknown preset 'nope'.*demo"):
        parse(["--preset", "nope"])


def test_advisor_json_feeds_the_training_config(tmp_path):
    advice = tmp_path / "advisor.json"
    advice.write_text(json.dumps({"learning_rate": 3e-5, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 8,
                                  "effective_batch_size": 64, "num_train_epochs": 5, "warmup_steps": 220,
                                  "lora_rank": 64, "lora_alpha": 64, "estimated_peak_memory_gb": 21.5}))
    config = parse(["--config-from", str(advice)])
    t = config.training
    assert (t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (3e-5, 8, 8)
    assert (config.training.warmup_steps, config.lora.rank, config.lora.alpha) == (220, 64, 64)
    assert parse(["--config-from", str(advice), "--lr", "1e-5"]).training.learning_rate == 1e-5
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


def test_every_numeric_field_declares_its_range():
    """One validation layer: a number or a fixed set of words without declared limits would pass unchecked."""
    import dataclasses
    import typing

    from colintern.cli import Limits
    from colintern.training.arguments import _unwrap_optional

    unchecked = []
    for section in RunConfig.SECTIONS:
        section_cls = type(getattr(RunConfig(), section))
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            if section == "training" and f.name not in section_cls.__annotations__:
                continue  # transformers.TrainingArguments' own fields: its own checks (test below)
            tp, _ = _unwrap_optional(hints[f.name])
            if tp in (int, float) and Limits.from_metadata(f.metadata) is None:
                unchecked.append(f"{section}.{f.name}")
    assert unchecked == []


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lr", "-1", "--lr = -1.0: must be a finite number > 0"),
        ("--lr", "nan", "--lr = nan: must be a finite number > 0"),
        ("--max-grad-norm", "nan", "--max-grad-norm = nan: must be a finite number >= 0"),
        ("--batch-size", "0", "--batch-size = 0: must be an integer >= 1"),
        ("--grad-accum", "0", "--grad-accum = 0: must be an integer >= 1"),
        ("--warmup-steps", "-5", "--warmup-steps = -5.0: must be a finite number >= 0"),
        ("--lora-rank", "0", "--lora-rank = 0: must be an integer >= 1"),
        ("--lora-dropout", "2", "--lora-dropout = 2.0: must be a finite number in [0, 1)"),
        ("--num-workers", "-1", "--num-workers = -1: must be an integer >= 0"),
        ("--logging-steps", "0", "--logging-steps = 0: must be an integer >= 1"),
        ("--max-num-visual-tokens", "0", "--max-num-visual-tokens = 0: must be an integer >= 1"),
        ("--max-steps", "0", "--max-steps = 0: must be an integer >= 1, or -1"),
        ("--epochs", "-1", "--epochs = -1.0: must be a finite number > 0"),
        ("--scheduler", "bogus", "--scheduler = 'bogus': must be one of linear, cosine"),
        ("--loss", "mse", "--loss = 'mse': must be one of colbert, pairwise"),
        ("--bf16", "maybe", "--bf16 = 'maybe': must be one of auto, true, false"),
    ],
)
def test_bad_flag_values_name_the_flag_value_and_range(flag, value, message):
    with pytest.raises(ColinternError) as caught:
        parse(["--preset", "demo", flag, value])
    assert str(caught.value).startswith(message) and str(caught.value).endswith("(set on the command line)")


def test_values_from_files_presets_and_advisor_json_pass_the_same_check(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: demo.yaml\ntraining: {max_steps: 0}\n")
    with pytest.raises(ColinternError, match=r"^training.max_steps \(--max-steps\) = 0: .* \(set in .*bad.yaml\)$"):
        parse(["--config", str(bad)])
    advice = tmp_path / "advice.json"
    advice.write_text(json.dumps({"learning_rate": 1e-4, "lora_dropout": 5}))
    with pytest.raises(ColinternError, match=r"lora.dropout \(--lora-dropout\) = 5.0: .* \(set in --config-from .*"):
        parse(["--config-from", str(advice)])
    assert parse(["--preset", "demo", "--max-steps", "-1", "--eval-steps", "none"]).training.max_steps == -1
    # a value a later source replaces is still checked: a bad preset or file is a bug to report, not to hide
    with pytest.raises(ColinternError, match="bad.yaml"):
        parse(["--config", str(bad), "--max-steps", "5"])


@pytest.mark.parametrize("preset", ["colintern3_5-1b", "colintern3_5-1b_test", "demo", "demo_test"])
def test_every_shipped_preset_passes_the_checks(preset):
    assert parse(["--preset", preset]).preset == preset


def test_a_non_utf8_config_file_is_named(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("training: {lr: 1.0e-3}  # café\n".encode("latin-1"))
    with pytest.raises(ColinternError, match=r"latin.yaml is not UTF-8 text \(line 1: .*save it as UTF-8"):
        parse(["--config", str(latin)])


def test_script_flags_share_a_field_range():
    from colintern.training.arguments import field_limits

    parser = argparse.ArgumentParser()
    parser.add_argument("--lora-dropout", type=float, **field_limits("lora.dropout"))
    assert parser.parse_args(["--lora-dropout", "0.5"]).lora_dropout == 0.5
    with pytest.raises(ColinternError, match=r"--lora-dropout = 1.0: must be a finite number in \[0, 1\)"):
        parser.parse_args(["--lora-dropout", "1"])


# ---------------------------------------------------------------- the training options are transformers.TrainingArguments
OLD_FLAGS = ["--lr", "3e-4", "--batch-size", "8", "--grad-accum", "2", "--epochs", "2", "--max-steps", "20",
             "--output-dir", "D", "--scheduler", "cosine", "--warmup-steps", "5", "--num-workers", "1",
             "--resume", "latest", "--no-gradient-checkpointing", "--bf16", "true", "--save-steps", "10",
             "--eval-steps", "5", "--logging-steps", "2", "--weight-decay", "0.01", "--report-to", "none"]
NEW_FLAGS = ["--learning_rate", "3e-4", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
             "--num_train_epochs", "2", "--max_steps", "20", "--output_dir", "D", "--lr_scheduler_type", "cosine",
             "--warmup_steps", "5", "--dataloader_num_workers", "1", "--resume_from_checkpoint", "latest",
             "--gradient_checkpointing", "false", "--bf16", "true", "--save_steps", "10", "--eval_steps", "5",
             "--logging_steps", "2", "--weight_decay", "0.01", "--report_to", "none"]


def test_old_flags_and_new_spellings_give_the_same_training_arguments():
    from transformers import TrainingArguments

    old = parse(["--preset", "demo", *OLD_FLAGS])
    new = parse(["--preset", "demo", *NEW_FLAGS])
    dashed = parse(["--preset", "demo", *[a.replace("_", "-") if a.startswith("--") else a for a in NEW_FLAGS]])
    assert isinstance(old.training, TrainingArguments)
    assert old.to_dict() == new.to_dict() == dashed.to_dict()
    t = new.training
    assert (t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs) == (
        3e-4, 8, 2, 2.0)
    assert (t.lr_scheduler_type, t.resume_from_checkpoint, t.gradient_checkpointing, t.bf16) == (
        "cosine", "latest", False, True)
    assert t.report_to == [] and t.dataloader_num_workers == 1 and t.output_dir == "D"


def test_the_parser_is_hfargumentparser_and_help_lists_both_spellings():
    from transformers import HfArgumentParser

    from colintern.training.__main__ import build_parser

    parser = build_parser()
    assert isinstance(parser, HfArgumentParser)
    text = " ".join(parser.format_help().split())
    for flag in ("--learning_rate LEARNING_RATE, --learning-rate LEARNING_RATE, --lr LEARNING_RATE",
                 "--per_device_train_batch_size", "--batch-size", "--gradient_accumulation_steps", "--grad-accum",
                 "--num_train_epochs", "--epochs", "--lr_scheduler_type", "--scheduler", "--resume_from_checkpoint",
                 "--resume", "--dataloader_num_workers", "--num-workers", "--max-steps", "--output-dir", "--peft",
                 "--preset", "--config", "--config-from", "--no-train-vision", "--no-gradient-checkpointing",
                 "--torch_compile"):
        assert flag in text, flag


def test_an_old_format_yaml_and_saved_run_still_load(tmp_path):
    """Files in the sectioned format from before the TrainingArguments names (training: {lr: ..., batch_size: ...})."""
    old = tmp_path / "old.yaml"
    old.write_text("base: demo.yaml\ntraining: {lr: 2.0e-4, epochs: 2, batch_size: 8, grad_accum: 2, scheduler: cosine,"
                   " resume: latest, bf16: 'false', report_to: none}\n")
    new = tmp_path / "new.yaml"
    new.write_text("base: demo.yaml\ntraining: {learning_rate: 2.0e-4, num_train_epochs: 2, per_device_train_batch_size: 8,"
                   " gradient_accumulation_steps: 2, lr_scheduler_type: cosine, resume_from_checkpoint: latest,"
                   " bf16: false, report_to: none}\n")
    assert parse(["--config", str(old)]).to_dict() == parse(["--config", str(new)]).to_dict()
    # colintern_run.json as runs before this change saved it (resume reads it back)
    saved = {"preset": "demo", "experiment": {"name": None, "description": None, "hyperparameters_under_test": []},
             "model": {"name_or_path": "embedded:tiny-internvl3_5", "max_num_visual_tokens": 16, "dtype": "float32",
                       "attn_implementation": "auto", "quantize": None},
             "training": {"output_dir": "D", "epochs": 5.0, "max_steps": 800, "batch_size": 32, "grad_accum": 1,
                          "lr": 0.001, "lr_head": None, "lr_vision": None, "warmup_steps": 50, "scheduler": "linear",
                          "weight_decay": 0.0, "max_grad_norm": 1.0, "loss": "colbert", "temperature": None,
                          "train_vision": True, "gradient_checkpointing": False, "bf16": "auto", "seed": 42,
                          "logging_steps": 10, "eval_steps": 200, "save_steps": 200, "save_total_limit": 2,
                          "early_stopping_patience": None, "retrieval_eval": True, "report_to": "none",
                          "run_name": None, "dataloader_num_workers": 0, "augment": {}, "resume": None,
                          "overwrite": False, "cache_chunk_size": None},
             "runtime": {"torch": "2.x"}}
    config = RunConfig.from_dict(saved)
    t = config.training
    assert (t.learning_rate, t.per_device_train_batch_size, t.num_train_epochs, t.bf16, t.report_to) == (
        1e-3, 32, 5.0, None, [])
    assert RunConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_an_old_advisor_json_loads(tmp_path):
    """--config-from: the advisor's TrainingArguments names at the top, or colintern's sections with the old names."""
    top = tmp_path / "top.json"
    top.write_text(json.dumps({"hyperparameters": {"learning_rate": 3e-5, "per_device_train_batch_size": 8,
                                                   "gradient_accumulation_steps": 8, "num_train_epochs": 2,
                                                   "gradient_checkpointing": False, "lora_rank": 16}}))
    sections = tmp_path / "sections.json"
    sections.write_text(json.dumps({"training": {"lr": 3e-5, "batch_size": 8, "grad_accum": 8, "epochs": 2,
                                                 "gradient_checkpointing": False}, "lora": {"rank": 16}}))
    a, b = parse(["--config-from", str(top)]), parse(["--config-from", str(sections)])
    assert a.to_dict() == b.to_dict()
    assert (a.training.learning_rate, a.training.per_device_train_batch_size, a.training.gradient_checkpointing,
            a.lora.rank) == (3e-5, 8, False, 16)


def test_transformers_own_checks_and_options_decided_by_colintern_are_one_line_errors(capsys):
    from colintern.cli import run
    from colintern.training.__main__ import build_parser, main

    with pytest.raises(ColinternError, match=r"^command line: training options rejected by transformers"):
        parse(["--preset", "demo", "--torch_empty_cache_steps", "0"])
    with pytest.raises(ColinternError, match=r"training.optim \(--optim\) is set by colintern from colintern's AdamW"):
        parse(["--preset", "demo", "--optim", "adafactor"])
    assert run(main, build_parser(), ["--preset", "demo", "--torch_empty_cache_steps", "0", "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: command line: training options rejected")


def test_other_trainingarguments_fields_reach_the_trainer():
    from colintern.training.trainer import recipe_arguments

    config = parse(["--preset", "demo", "--lr_scheduler_kwargs", '{"num_cycles": 2}', "--ddp_timeout", "60"])
    arguments = recipe_arguments(config)
    assert arguments["lr_scheduler_kwargs"] == {"num_cycles": 2} and arguments["ddp_timeout"] == 60
    assert "ddp_timeout" not in recipe_arguments(parse(["--preset", "demo"]))
    assert config.to_dict()["training"]["ddp_timeout"] == 60  # saved with the run, and read back by a resume


def test_the_model_card_reads_old_and_new_run_configurations(tmp_path):
    """export.model_card shows the recipe from colintern_run.json, whichever names the run saved it with."""
    from peft import LoraConfig

    from colintern.training.export import model_card

    LoraConfig(r=16, lora_alpha=16, base_model_name_or_path="embedded:tiny-internvl3_5").save_pretrained(str(tmp_path))
    new = parse(["--preset", "demo", "--lr", "4e-4"]).to_dict()
    old = {**new, "training": {"lr": 4e-4, "epochs": 5.0, "batch_size": 32, "grad_accum": 1, "scheduler": "linear",
                               "warmup_steps": 50, "max_steps": 800, "loss": "colbert"}}
    for run_config in (new, old):
        card = model_card(tmp_path, run_config, None)
        assert "| batch x accumulation | 32 x 1 |" in card and "| learning rate | 0.0004 (warm-up 50" in card, card
        assert "linear) |" in card and "| epochs / max steps | 5.0 / 800 |" in card
