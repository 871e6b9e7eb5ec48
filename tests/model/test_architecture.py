"""One architecture description, read from the config: what the advisor, the memory model and the benchmarks use."""

import dataclasses

import pytest

from colintern.model.architecture import (
    InternVLArchitecture,
    VisualTokenBudgetError,
    max_tiles_for_budget,
    tiles_per_page,
)
from colintern.utils import ColinternError


def test_the_architecture_is_read_from_the_config(tiny_retriever):
    from colintern.model.embedded import TinyModelConfig

    model, processor = tiny_retriever
    tiny = TinyModelConfig()
    architecture = InternVLArchitecture.from_config(model.config)
    assert (architecture.vision.image_size, architecture.vision.patch_size) == (tiny.image_size, tiny.patch_size)
    assert (architecture.vision.hidden, architecture.vision.layers) == (tiny.vision_hidden, tiny.vision_layers)
    assert (architecture.text.hidden, architecture.text.layers) == (tiny.text_hidden, tiny.text_layers)
    assert (architecture.text.heads, architecture.text.kv_heads) == (tiny.text_heads, tiny.text_kv_heads)
    assert architecture.image_seq_length == tiny.image_seq_length == processor.image_seq_length
    assert architecture.embedding_dim == model.dim


def test_the_advisor_summary_is_the_same_architecture(tiny_model_dir, tiny_retriever):
    from colintern.tuning.advisor import analyze_architecture

    model, _ = tiny_retriever
    summary = analyze_architecture(str(tiny_model_dir))
    assert isinstance(summary, InternVLArchitecture)
    base = InternVLArchitecture.from_config(model.config)
    assert {f.name: getattr(summary, f.name) for f in dataclasses.fields(InternVLArchitecture)} == vars(base)


def test_a_budget_below_one_tile_is_a_user_error_and_a_bad_value():
    for function in (max_tiles_for_budget, tiles_per_page):
        with pytest.raises(VisualTokenBudgetError) as error:
            function(100, 256)
        assert isinstance(error.value, ColinternError) and isinstance(error.value, ValueError)
