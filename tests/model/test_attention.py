"""`--attention causal|bidirectional`: what the language model attends to, and that the mode survives saving/loading."""

import json

import pytest
import torch
from PIL import Image

from colintern.model.loading import load_model, load_processor, load_retriever, saved_attention
from colintern.utils import RUN_CONFIG_FILE, ColinternError

QUERIES = ["a red header", "which page has a blue pie chart and a green star?"]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """The tiny checkpoint with SDPA and with eager attention (eval mode), and its processor."""
    sdpa = load_model(str(tiny_model_dir), device="cpu", attn_implementation="sdpa").eval()
    eager = load_model(str(tiny_model_dir), device="cpu", attn_implementation="eager").eval()
    yield sdpa, eager, load_processor(str(tiny_model_dir), max_num_visual_tokens=16)
    sdpa.set_attention("causal")
    eager.set_attention("causal")


def _embed(model, batch, mode):
    model.set_attention(mode)
    with torch.no_grad():
        return model(**batch)


@pytest.mark.parametrize("implementation", [0, 1], ids=["sdpa", "eager"])
def test_a_token_sees_a_later_token_only_under_bidirectional_attention(models, implementation):
    model, processor = models[implementation], models[2]
    batch = processor.process_queries([QUERIES[1]])
    changed = {k: v.clone() for k, v in batch.items()}
    position = batch["input_ids"].shape[1] // 2  # a token in the middle (one query: no padding)
    changed["input_ids"][0, -1] = (batch["input_ids"][0, -1] + 7) % model.config.text_config.vocab_size  # a later token
    for mode, sees_later in (("causal", False), ("bidirectional", True)):
        before, after = _embed(model, batch, mode), _embed(model, changed, mode)
        difference = float((before[0, position] - after[0, position]).abs().max())
        assert (difference > 1e-3) is sees_later, (mode, difference)


def test_prompt_tokens_before_the_image_see_the_page_only_under_bidirectional_attention(models):
    model, processor = models[0], models[2]
    red, blue = Image.new("RGB", (128, 128), "red"), Image.new("RGB", (128, 128), "blue")
    model.mask_non_image_embeddings = False
    try:
        for mode, differ in (("causal", False), ("bidirectional", True)):
            a = _embed(model, processor.process_images([red]), mode)
            b = _embed(model, processor.process_images([blue]), mode)
            first_image = int((processor.process_images([red])["input_ids"][0] == model.config.image_token_id)
                              .nonzero()[0])
            prompt_difference = float((a[0, :first_image] - b[0, :first_image]).abs().max())
            assert (prompt_difference > 1e-3) is differ, (mode, prompt_difference)
    finally:
        model.mask_non_image_embeddings = True


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_padding_has_no_effect_and_sdpa_agrees_with_eager(models, mode):
    sdpa, eager, processor = models
    together = processor.process_queries(QUERIES)  # the short query is left-padded
    alone = processor.process_queries(QUERIES[:1])
    assert not bool(together["attention_mask"].all())
    padded, single = _embed(sdpa, together, mode), _embed(sdpa, alone, mode)
    length = alone["input_ids"].shape[1]
    torch.testing.assert_close(padded[0, -length:], single[0], rtol=1e-4, atol=1e-5)
    assert bool((padded[0, :-length] == 0).all())
    # a padding token's value never reaches a real token: change it, nothing changes
    repadded = {k: v.clone() for k, v in together.items()}
    repadded["input_ids"][0, 0] = (repadded["input_ids"][0, 0] + 5) % sdpa.config.text_config.vocab_size
    torch.testing.assert_close(_embed(sdpa, repadded, mode), padded, rtol=0, atol=1e-6)
    torch.testing.assert_close(_embed(eager, together, mode), padded, rtol=1e-4, atol=1e-5)


def test_the_mode_round_trips_through_save_and_load(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir), device="cpu").eval()
    assert model.attention == "causal"
    model.set_attention("bidirectional")
    model.save_pretrained(tmp_path / "bidirectional")
    assert json.loads((tmp_path / "bidirectional" / "config.json").read_text())["text_config"]["is_causal"] is False
    processor = load_processor(str(tiny_model_dir), max_num_visual_tokens=16)
    processor.save_pretrained(tmp_path / "bidirectional")
    fresh, _ = load_retriever(str(tmp_path / "bidirectional"), device="cpu")
    assert fresh.attention == "bidirectional"
    batch = processor.process_queries(QUERIES)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch), model(**batch))
    # causal again: the config is the base model's again, and so is what it computes
    fresh.set_attention("causal")
    fresh.save_pretrained(tmp_path / "causal")
    assert "is_causal" not in json.loads((tmp_path / "causal" / "config.json").read_text())["text_config"]
    assert load_model(str(tmp_path / "causal"), device="cpu").attention == "causal"
    with pytest.raises(ValueError, match="bidirectional"):
        model.set_attention("full")


def test_an_adapter_attends_as_its_run_was_trained(tiny_adapter_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_adapter_dir, run)
    assert saved_attention(run) is None
    model, _ = load_retriever(str(run), device="cpu")
    assert model.attention == "causal"  # no record: the base model's (causal) config
    (run / RUN_CONFIG_FILE).write_text(json.dumps({"model": {"attention": "bidirectional"}}))
    shutil.copytree(tiny_adapter_dir, run / "checkpoint-4")  # a checkpoint's run config is in the run folder
    for folder in (run, run / "checkpoint-4"):
        assert saved_attention(folder) == "bidirectional"
        model, _ = load_retriever(str(folder), device="cpu")
        assert model.attention == "bidirectional"
    assert load_retriever(str(run), device="cpu", attention="causal")[0].attention == "causal"  # explicit wins
    (run / RUN_CONFIG_FILE).write_text(json.dumps({"model": {"attention": "sideways"}}))
    with pytest.raises(ColinternError, match="model.attention='sideways'"):
        saved_attention(run)
