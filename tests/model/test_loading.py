import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.internvl import InternVLForConditionalGeneration

from colintern.model.loading import load_model, load_processor, load_retriever
from colintern.model.modeling import ColIntern3_5
from colintern.utils import ColinternError


def backbone_state(model_dir):
    return InternVLForConditionalGeneration.from_pretrained(str(model_dir)).model.state_dict()


def test_embedded_checkpoint_round_trips_offline(tiny_model_dir):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    reference = backbone_state(tiny_model_dir)
    model = ColIntern3_5.from_pretrained(str(tiny_model_dir))
    state = model.state_dict()
    assert all(torch.equal(reference[k], state[k]) for k in reference)
    assert set(state) - set(reference) == {"custom_text_proj.weight", "custom_text_proj.bias"}


def test_hub_layout_with_model_prefix_and_lm_head_loads(tiny_model_dir, tmp_path):
    """OpenGVLab/InternVL3_5-1B-HF stores InternVLForConditionalGeneration keys: model.*-prefixed, plus lm_head."""
    hub_dir = tmp_path / "hub-layout"
    shutil.copytree(tiny_model_dir, hub_dir)
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    renamed = {}
    for key, value in weights.items():
        if key.startswith("language_model.model."):
            renamed["model.language_model." + key[len("language_model.model.") :]] = value
        else:
            renamed["model." + key] = value
    renamed["lm_head.weight"] = weights["language_model.model.embed_tokens.weight"].clone()
    assert all(k.startswith(("model.", "lm_head")) for k in renamed)
    save_file(renamed, str(hub_dir / "model.safetensors"), metadata={"format": "pt"})

    reference = backbone_state(tiny_model_dir)
    state = ColIntern3_5.from_pretrained(str(hub_dir)).state_dict()
    assert all(torch.equal(reference[k], state[k]) for k in reference)


def test_saved_retriever_round_trips_with_its_head(tiny_retriever, tmp_path):
    model, processor = tiny_retriever
    trained = ColIntern3_5(model.config)
    trained.load_state_dict(model.state_dict())
    with torch.no_grad():
        trained.custom_text_proj.weight.mul_(3.0)
    trained.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reloaded_processor = load_retriever(str(tmp_path), device="cpu")
    assert torch.equal(reloaded.custom_text_proj.weight, trained.custom_text_proj.weight)
    assert not reloaded.head_is_untrained()
    assert reloaded_processor.max_num_visual_tokens == processor.max_num_visual_tokens


def test_processor_round_trip_gives_identical_inputs(tiny_retriever, tmp_path):
    from PIL import Image

    _, processor = tiny_retriever
    processor.save_pretrained(tmp_path)
    again = load_processor(str(tmp_path))
    page = [Image.new("RGB", (150, 220), "orange")]
    a, b = processor.process_images(page), again.process_images(page)
    assert all(torch.equal(a[k], b[k]) for k in a)
    q = ["cyan header with a bar chart"]
    assert torch.equal(processor.process_queries(q)["input_ids"], again.process_queries(q)["input_ids"])


def test_model_loads_in_float32_with_sdpa_on_cpu(tiny_model_dir):
    model = load_model(str(tiny_model_dir), device="cpu")
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"


def test_unknown_hub_id_offline_gives_a_clear_error(colintern_home):
    with pytest.raises(ColinternError) as info:
        load_model("OpenGVLab/this-model-does-not-exist", device="cpu")
    message = str(info.value)
    assert "OpenGVLab/this-model-does-not-exist" in message
    assert "--preset demo" in message and "huggingface-cli download" in message


def test_missing_local_folder_gives_a_clear_error():
    with pytest.raises(ColinternError, match="no such folder"):
        load_model("./no/such/checkpoint", device="cpu")


def test_adapter_folders_are_read_by_peft(tiny_adapter_dir, tmp_path):
    import json

    from peft import LoraConfig
    from peft.utils import CONFIG_NAME

    from colintern.model.loading import AdapterInfo, is_adapter_dir
    from colintern.utils import ADAPTER_CONFIG_FILE

    assert ADAPTER_CONFIG_FILE == CONFIG_NAME and is_adapter_dir(tiny_adapter_dir)
    info = AdapterInfo.read(tiny_adapter_dir)
    assert isinstance(info.config, LoraConfig) and info.config.r == 4
    assert info.base_model == info.config.base_model_name_or_path
    no_base = tmp_path / "no-base"
    shutil.copytree(tiny_adapter_dir, no_base)
    config = json.loads((no_base / CONFIG_NAME).read_text())
    config["base_model_name_or_path"] = None
    (no_base / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ColinternError, match="names no base model"):
        AdapterInfo.read(no_base)
    (no_base / CONFIG_NAME).write_text("{ truncated")
    with pytest.raises(ColinternError, match="adapter_config.json is unreadable"):
        AdapterInfo.read(no_base)


def test_building_the_embedded_checkpoint_leaves_the_callers_random_stream_alone(tiny_model_dir, tmp_path):
    # found: building it on first use re-seeded torch's global RNG, so a seeded run started differently (head and
    # LoRA initialisation) the first time than once the checkpoint existed
    from colintern.model.embedded import build_tiny_checkpoint

    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    build_tiny_checkpoint(tmp_path / "tiny")
    assert torch.equal(torch.rand(4), expected)
    rebuilt = load_file(str(tmp_path / "tiny" / "model.safetensors"))  # and the weights are still seed 0's
    shipped = load_file(str(tiny_model_dir / "model.safetensors"))
    assert rebuilt.keys() == shipped.keys() and all(torch.equal(rebuilt[k], shipped[k]) for k in shipped)
