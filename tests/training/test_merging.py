"""Checkpoint merging (model soups) on tiny real training runs: exact averages, greedy soups, refusals, and outputs
that evaluate.py and merge_adapter.py take."""

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from colintern.training.merging import (
    MERGE_RECORD_FILE,
    check_compatible,
    find_candidates,
    merge_checkpoints,
    ndcg_scorer,
    validation_split,
)
from colintern.training.trainer import train
from colintern.utils import RUN_CONFIG_FILE, ColinternError
from tests.conftest import REPO_ROOT
from tests.training.test_trainer import full_run, small_run


@pytest.fixture(scope="module")
def runs(colintern_home, small_synthdocs_dir, tmp_path_factory):
    """Real tiny runs: LoRA with seeds 3 and 4 (checkpoints 2, 4, 6), LoRA of rank 8, full fine-tuning."""
    root = tmp_path_factory.mktemp("merge-runs")
    return {
        "lora3": train(small_run(root, small_synthdocs_dir, name="lora3")).output_dir,
        "lora4": train(small_run(root, small_synthdocs_dir, name="lora4", seed=4)).output_dir,
        "full": train(full_run(root, small_synthdocs_dir, name="full", max_steps=4)).output_dir,
        "rank8": train(_rank8(root, small_synthdocs_dir)).output_dir,
    }


def _rank8(root, dataset):
    config = small_run(root, dataset, name="rank8", max_steps=2)
    config.lora.rank = 8
    return config


def _retriever_weights(folder) -> dict[str, torch.Tensor]:
    from colintern.model.loading import load_retriever

    model, _ = load_retriever(str(folder), device="cpu")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run_script(name: str, argv: list[str]) -> int:
    """A script's own front end, in this process (its parser, its main, colintern.cli.run's error handling)."""
    from colintern.cli import run

    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return run(module.main, module.build_parser(), argv)


def test_a_uniform_adapter_soup_is_exactly_the_average_of_the_merged_models(runs, tmp_path):
    candidates = find_candidates([runs["lora3"], runs["lora4"]], final=True)
    assert [c.kind for c in candidates] == ["adapter", "adapter"]
    result = merge_checkpoints(candidates, tmp_path / "soup", method="uniform")
    assert result.ingredients == ["lora3", "lora4"]
    config = json.loads((tmp_path / "soup" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8  # rank n * r, scale 1
    record = json.loads((tmp_path / "soup" / MERGE_RECORD_FILE).read_text())
    assert record["method"] == "uniform" and len(record["ingredients"]) == 2
    soup = _retriever_weights(tmp_path / "soup")
    ingredients = [_retriever_weights(runs[name]) for name in ("lora3", "lora4")]
    moved = 0
    for key, value in soup.items():
        expected = (ingredients[0][key] + ingredients[1][key]) / 2
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(ingredients[0][key], ingredients[1][key])
    assert moved > 10  # the two runs really differ (LoRA-adapted linears and the head)


def test_last_checkpoints_of_one_run_and_a_full_weight_soup(runs, tmp_path):
    last_two = find_candidates([runs["lora3"]], last=2)
    assert [c.label for c in last_two] == ["lora3/checkpoint-4", "lora3/checkpoint-6"]
    assert len(find_candidates([runs["lora3"]])) == 3  # every complete checkpoint by default

    full = find_candidates([runs["full"]])
    assert [c.kind for c in full] == ["full", "full"]
    merge_checkpoints(full, tmp_path / "full-soup")
    merged = load_file(str(tmp_path / "full-soup" / "model.safetensors"))
    parts = [load_file(str(c.path / "model.safetensors")) for c in full]
    assert merged.keys() == parts[0].keys()
    for key in merged:
        torch.testing.assert_close(merged[key], (parts[0][key] + parts[1][key]) / 2, rtol=1e-6, atol=1e-7)
    model_weights = _retriever_weights(tmp_path / "full-soup")  # a plain model folder: loads like a checkpoint
    assert any(k.startswith("custom_text_proj") for k in model_weights)


def test_greedy_keeps_a_checkpoint_only_when_validation_ndcg_does_not_drop(runs, tmp_path, small_synthdocs_dir):
    candidates = find_candidates([runs["lora3"], runs["lora4"]], last=2)
    split = validation_split(candidates[0])
    assert split == small_synthdocs_dir / "validation"
    score = ndcg_scorer(split, batch_size=8, device="cpu")
    result = merge_checkpoints(candidates, tmp_path / "greedy", method="greedy", score_folder=score)
    assert set(result.scores) == {c.label for c in candidates}
    ranked = sorted(result.scores, key=lambda label: -result.scores[label])
    assert [step["candidate"] for step in result.history] == ranked  # best first
    best = result.history[0]["soup_ndcg_at_5"]
    assert best == max(result.scores.values())
    for step in result.history[1:]:
        assert step["kept"] is (step["soup_ndcg_at_5"] >= best)
        best = max(best, step["soup_ndcg_at_5"]) if step["kept"] else best
    assert result.ingredients == [step["candidate"] for step in result.history if step["kept"]]
    # what was written is the soup of exactly those ingredients, and scores what the greedy walk measured last
    assert score(tmp_path / "greedy") == pytest.approx(best, abs=1e-4)
    record = json.loads((tmp_path / "greedy" / MERGE_RECORD_FILE).read_text())
    assert record["validation_ndcg_at_5"] == result.scores and record["greedy_steps"] == result.history
    assert not [p for p in (tmp_path / "greedy").iterdir() if p.name.startswith(".merge-trials")]


def test_incompatible_checkpoints_are_refused_with_the_reason(runs, tmp_path, tiny_adapter_dir):
    with pytest.raises(ColinternError, match=r"\br differs \(8 vs 4"):
        check_compatible(find_candidates([runs["lora3"], runs["rank8"]], final=True))
    with pytest.raises(ColinternError, match="with full-weight checkpoints"):
        check_compatible(find_candidates([runs["lora3"], runs["full"]], final=True))
    other_base = tmp_path / "other-base" / "checkpoint-1"  # another base model's adapter (same rank and targets)
    shutil.copytree(tiny_adapter_dir, other_base)
    with pytest.raises(ColinternError, match="base_model_name_or_path differs"):
        check_compatible(find_candidates([runs["lora3"], other_base], final=True))
    bidirectional = tmp_path / "bidirectional"
    shutil.copytree(runs["lora4"], bidirectional)
    run_config = json.loads((bidirectional / RUN_CONFIG_FILE).read_text())
    run_config["model"]["attention"] = "bidirectional"
    (bidirectional / RUN_CONFIG_FILE).write_text(json.dumps(run_config))
    with pytest.raises(ColinternError, match="attention bidirectional"):
        merge_checkpoints(find_candidates([runs["lora3"], bidirectional], final=True), tmp_path / "never")
    assert not (tmp_path / "never").exists()  # refused before anything is written
    with pytest.raises(ColinternError, match="at least 2"):
        find_candidates([runs["rank8"]], last=1)


def test_an_existing_output_is_never_overwritten(runs, tmp_path):
    output = tmp_path / "taken"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(ColinternError, match="not empty"):
        merge_checkpoints(find_candidates([runs["lora3"]], last=2), output)
    assert [p.name for p in output.iterdir()] == ["notes.txt"]
    with pytest.raises(ColinternError, match="input"):  # nor written inside one of its inputs
        merge_checkpoints(find_candidates([runs["lora3"]], last=2), runs["lora3"] / "soup")


def test_the_merge_script_output_goes_through_evaluate_and_merge_adapter(runs, tmp_path, small_synthdocs_dir, capsys):
    soup = tmp_path / "soup"
    assert _run_script("merge_checkpoints", [str(runs["lora3"]), str(runs["lora4"]), "--final", "--method",
                                             "uniform", "--output", str(soup)]) == 0
    assert "Merged 2 checkpoint(s) (uniform)" in capsys.readouterr().out
    assert _run_script("merge_checkpoints", [str(runs["lora3"]), "--last", "2", "--output", str(soup)]) != 0
    assert "not empty" in capsys.readouterr().err  # the same output again: refused, one line

    assert _run_script("evaluate", ["--model-path", str(soup), "--benchmarks", str(small_synthdocs_dir / "test"),
                                    "--output-dir", str(tmp_path / "eval"), "--json", "--no-progress",
                                    "--device", "cpu"]) == 0
    summary = capsys.readouterr().out
    assert "ndcg" in summary.lower()

    exported = tmp_path / "exported"
    assert _run_script("merge_adapter", ["--adapter", str(soup), "--output-dir", str(exported)]) == 0
    soup_weights, exported_weights = _retriever_weights(soup), _retriever_weights(exported)
    for key, value in soup_weights.items():
        torch.testing.assert_close(exported_weights[key], value, rtol=1e-5, atol=1e-6)
