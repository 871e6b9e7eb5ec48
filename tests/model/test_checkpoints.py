import json
import shutil

import pytest
import torch

from colintern.model.checkpoints import (
    check_trained_head,
    describe_checkpoint,
    head_weights_saved,
    training_datasets,
)
from colintern.model.loading import load_retriever
from colintern.model.modeling import ColIntern3_5
from colintern.utils import ColinternError
from tests.helpers import build_tiny_adapter


def test_adapter_identity_is_a_content_hash(tiny_adapter_dir, tmp_path):
    info = describe_checkpoint(str(tiny_adapter_dir))
    assert info.kind == "adapter" and info.name == "colintern/tiny-adapter" and len(info.revision) == 12
    assert info.base_model and head_weights_saved(tiny_adapter_dir, adapter=True)

    copy = tmp_path / "tiny-adapter"
    shutil.copytree(tiny_adapter_dir, copy)
    assert describe_checkpoint(str(copy)).revision == info.revision  # same content, same revision
    config = json.loads((copy / "adapter_config.json").read_text())
    config["lora_alpha"] = 16  # a different model: its results must not be reused
    (copy / "adapter_config.json").write_text(json.dumps(config))
    assert describe_checkpoint(str(copy)).revision != info.revision
    assert describe_checkpoint(str(copy), model_name="me/other").name == "me/other"


def test_hub_ids_and_bad_paths(tmp_path):
    info = describe_checkpoint("OpenGVLab/InternVL3_5-1B-HF")
    assert (info.kind, info.name, info.path) == ("hub", "OpenGVLab/InternVL3_5-1B-HF", None)
    with pytest.raises(ColinternError, match="no such folder"):
        describe_checkpoint(str(tmp_path / "missing" / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ColinternError, match="neither an adapter folder"):
        describe_checkpoint(str(tmp_path / "empty"))


def test_trained_adapter_passes_the_head_check(tiny_adapter_dir):
    model, _ = load_retriever(str(tiny_adapter_dir), device="cpu")
    check_trained_head(model, describe_checkpoint(str(tiny_adapter_dir)))  # no error


def test_adapter_without_its_head_is_refused_naming_the_cause(tiny_model_dir, tmp_path):
    build_tiny_adapter(tiny_model_dir, tmp_path / "no-head", save_head=False)
    info = describe_checkpoint(str(tmp_path / "no-head"))
    assert head_weights_saved(info.path, adapter=True) is False
    model, _ = load_retriever(str(info.path), device="cpu")
    with pytest.raises(ColinternError, match=r"no custom_text_proj weights in its adapter file.*modules_to_save"):
        check_trained_head(model, info)
    check_trained_head(model, info, allow_untrained_head=True)  # the explicit opt-in


def test_adapter_with_an_unchanged_head_is_refused(tiny_model_dir, tmp_path):
    build_tiny_adapter(tiny_model_dir, tmp_path / "init-head", change_head=False)
    info = describe_checkpoint(str(tmp_path / "init-head"))
    assert head_weights_saved(info.path, adapter=True) is True
    model, _ = load_retriever(str(info.path), device="cpu")
    with pytest.raises(ColinternError, match=r"still the deterministic initialisation.*never trained"):
        check_trained_head(model, info)


def test_base_model_and_full_checkpoints(tiny_model_dir, tiny_retriever, tmp_path):
    base, _ = tiny_retriever
    info = describe_checkpoint(str(tiny_model_dir))
    assert info.kind == "checkpoint" and head_weights_saved(info.path, adapter=False) is False
    with pytest.raises(ColinternError, match=r"no custom_text_proj weights: it is a base model.*--allow-untrained"):
        check_trained_head(base, info)

    trained = ColIntern3_5(base.config)
    trained.load_state_dict(base.state_dict())
    with torch.no_grad():
        trained.custom_text_proj.weight.mul_(1.5)
    trained.save_pretrained(tmp_path / "full")
    full = describe_checkpoint(str(tmp_path / "full"))
    assert full.kind == "checkpoint" and head_weights_saved(full.path, adapter=False) is True
    check_trained_head(trained, full)


def test_training_datasets_come_from_the_run_config(tiny_adapter_dir, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(tiny_adapter_dir, folder)
    assert training_datasets(describe_checkpoint(str(folder))) is None  # unknown: no run config
    (folder / "colintern_run.json").write_text(json.dumps({"data": {"dataset": "vidore/colpali_train_set"}}))
    assert training_datasets(describe_checkpoint(str(folder))) == {
        "VidoreDocVQARetrieval",
        "VidoreInfoVQARetrieval",
        "VidoreTatdqaRetrieval",
        "VidoreArxivQARetrieval",
    }
    (folder / "colintern_run.json").write_text(json.dumps({"preset": "demo", "dataset": "embedded:synthdocs"}))
    assert training_datasets(describe_checkpoint(str(folder))) == {"SynthDocsRetrieval"}
