"""Shared fixtures: tiny real models and real files, built once per test session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the Hugging Face Hub and never log to W&B servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def colintern_home(tmp_path_factory) -> Path:
    """An isolated $COLINTERN_HOME for the session, so tests build their own embedded assets."""
    home = Path(os.environ.get("COLINTERN_TEST_HOME") or tmp_path_factory.mktemp("colintern_home"))
    os.environ["COLINTERN_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(colintern_home) -> Path:
    """The embedded tiny InternVL checkpoint (built once per session)."""
    from colintern.model.embedded import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def small_synthdocs_dir(tmp_path_factory) -> Path:
    """A small SynthDocs corpus (64 training pages, 24 test pages) for tests that need real files quickly."""
    from colintern.data.synthdocs import SynthDocsConfig, write_synthdocs

    return write_synthdocs(tmp_path_factory.mktemp("data") / "synthdocs", SynthDocsConfig(n_train=64, max_eval_pages=24))


@pytest.fixture(scope="session")
def tiny_retriever(tiny_model_dir):
    """(model, processor) for the tiny checkpoint, eval mode, one tile per page."""
    from colintern.model.loading import load_retriever

    model, processor = load_retriever(str(tiny_model_dir), device="cpu", max_num_visual_tokens=16)
    return model.eval(), processor


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A real PEFT adapter on the tiny checkpoint (LoRA + saved head, weights moved off their init), with processor."""
    from tests.helpers import build_tiny_adapter

    path = tmp_path_factory.mktemp("adapters") / "tiny-adapter"
    build_tiny_adapter(tiny_model_dir, path)
    return path
