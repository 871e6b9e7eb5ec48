"""embedded:tiny-internvl3_5-pretrained: the shipped checkpoint, and that the project's own command rebuilds it."""

from __future__ import annotations

import json
import math

import pytest

from colintern.model.embedded import PRETRAINED_DIR, PRETRAINED_MANIFEST, PRETRAINED_MODEL, resolve_embedded


def _manifest() -> dict:
    return json.loads((PRETRAINED_DIR / PRETRAINED_MANIFEST).read_text())


def test_the_alias_is_the_shipped_checkpoint_trained_on_domain_a():
    assert resolve_embedded(PRETRAINED_MODEL) == str(PRETRAINED_DIR)
    manifest = _manifest()
    assert manifest["run_config"]["data"]["dataset"] == "embedded:synthdocs-a"
    assert manifest["run_config"]["lora"]["enabled"] is False and manifest["run_config"]["training"]["train_vision"]
    scores = manifest["held_out"]
    # it learnt domain A (chance is ~0.02) and knows less of domain B, whose colours it never saw
    assert scores["domain_a_ndcg_at_5"] > 0.5 and scores["domain_b_ndcg_at_5"] < scores["domain_a_ndcg_at_5"]
    files = {p.name for p in PRETRAINED_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "processor_config.json"} <= files
    assert not any(name.startswith(("checkpoint-", "optimizer", "trainer_state")) for name in files)


def test_it_loads_as_a_retriever_with_its_trained_head():
    from colintern.model.loading import load_retriever

    model, processor = load_retriever(PRETRAINED_MODEL, device="cpu")
    assert processor.max_num_visual_tokens == 16
    assert sum(p.numel() for p in model.parameters()) == 1_091_968


@pytest.mark.slow
def test_a_rebuild_by_the_preset_retraces_the_shipped_run(colintern_home, tmp_path):
    """The first 20 steps of `train.py --preset demo-pretrain` (within the warm-up, where the schedule does not
    depend on the run's length) log the training losses the shipped run logged."""
    from scripts.build_pretrained import train_losses, train_pretrained

    run_dir = train_pretrained(tmp_path / "run", max_steps=20)
    shipped, rebuilt = _manifest()["train_loss"], train_losses(run_dir)
    for step in ("10", "20"):
        assert math.isclose(rebuilt[step], shipped[step], rel_tol=0.02), (step, rebuilt[step], shipped[step])


@pytest.mark.slow
def test_a_full_rebuild_reaches_the_shipped_held_out_scores(colintern_home, tmp_path):
    """The whole recipe (600 steps: ~2 minutes on 2 quiet CPU cores) lands within SCORE_TOLERANCE NDCG@5."""
    from scripts.build_pretrained import SCORE_TOLERANCE, held_out_scores, train_pretrained

    run_dir = train_pretrained(tmp_path / "run")
    rebuilt, shipped = held_out_scores(run_dir, tmp_path / "results"), _manifest()["held_out"]
    for key, value in shipped.items():
        assert abs(rebuilt[key] - value) <= SCORE_TOLERANCE, (key, rebuilt[key], value)
