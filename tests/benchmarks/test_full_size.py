"""The full-size model is the shipped InternVL3.5-1B config as it is (its parameter count against the architecture's
formula), and the FLOP formula of full_size.py against torch's FlopCounterMode on a scaled-down copy (same code)."""

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from colintern.benchmarks.full_size import (
    build_full_size,
    forward_flops,
    full_size_config,
    peak_bf16_tflops,
    tiny_config,
)
from colintern.model.architecture import InternVLArchitecture

# ColIntern3_5 on the shipped InternVL3.5-1B config: InternViT-300M with q/k/v biases, the projector, Qwen3-0.6B
# without its LM head, and the 128-dim head. (Without the vision biases it would be 905,372,800.)
INTERNVL3_5_1B_RETRIEVER_PARAMETERS = 905_446_528


def retriever_parameters_by_formula(config) -> int:
    """ColIntern3_5's parameter count from the config's numbers, layer by layer (transformers' InternVL modules)."""
    vision, text = config.vision_config, config.text_config
    h, m, layers = vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
    image, patch = vision.image_size[0], vision.patch_size[0]
    patches = (image // patch) ** 2
    bias = h if vision.attention_bias else 0
    norm = 2 * h if vision.norm_type == "layer_norm" else h
    vision_layer = (
        3 * (h * h + bias)  # q, k, v projections
        + (h * h + h)  # output projection
        + (2 * h if vision.use_qk_norm else 0) * (2 if vision.norm_type == "layer_norm" else 1)
        + (h * m + m) + (m * h + h)  # fc1, fc2
        + 2 * norm  # layernorm_before, layernorm_after
        + 2 * h  # layer scale lambda_1, lambda_2
    )
    vision_total = (
        h  # CLS token
        + (patches + 1) * h  # absolute position embeddings
        + 3 * patch * patch * h + h  # patch embedding convolution
        + layers * vision_layer
        + (0 if vision.use_mean_pooling else norm)
    )
    shuffled = round(h / config.downsample_ratio**2)
    big_h = text.hidden_size
    projector = 2 * shuffled + (shuffled * big_h + big_h) + (big_h * big_h + big_h)
    q, kv = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    text_layer = big_h * q + 2 * big_h * kv + q * big_h + 2 * text.head_dim + 3 * big_h * text.intermediate_size
    language = text.vocab_size * big_h + text.num_hidden_layers * (text_layer + 2 * big_h) + big_h
    head = big_h * 128 + 128
    return vision_total + projector + language + head


def test_the_full_size_model_is_the_shipped_config_with_all_its_parameters():
    config = full_size_config()
    assert config.vision_config.attention_bias  # the shipped InternViT has q/k/v biases
    model, _ = build_full_size(device="meta", dtype=torch.bfloat16)  # what --full-size builds; meta: no memory
    built = sum(p.numel() for p in model.parameters())
    assert built == retriever_parameters_by_formula(config) == INTERNVL3_5_1B_RETRIEVER_PARAMETERS
    assert all(layer.attention.q_proj.bias is not None for layer in model.vision_tower.encoder.layer)


@pytest.fixture(scope="module")
def tiny_full_size():
    config = tiny_config()
    # eager attention: its matmuls are what FlopCounterMode counts on the CPU
    model, processor = build_full_size(config, attn_implementation="eager")
    return InternVLArchitecture.from_config(config), processor, model


def test_the_scaled_down_config_keeps_the_shipped_settings(tiny_full_size):
    _, _, model = tiny_full_size
    shipped, tiny = full_size_config(), model.config
    assert tiny.vision_config.attention_bias == shipped.vision_config.attention_bias is True
    assert tiny.text_config.tie_word_embeddings == shipped.text_config.tie_word_embeddings is False
    assert sum(p.numel() for p in model.parameters()) == retriever_parameters_by_formula(tiny)


def counted_flops(model, batch) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**batch)
    return counter.get_total_flops()


def test_page_flops_match_flop_counter(tiny_full_size):
    spec, processor, model = tiny_full_size
    batch = processor.process_images([Image.new("RGB", (112, 150), (200, 30, 30))])
    tiles, seq_len = batch["pixel_values"].shape[0], batch["input_ids"].shape[1]
    assert tiles > 1
    dense = forward_flops(spec, tiles, seq_len, causal=False)
    assert counted_flops(model, batch) == pytest.approx(dense["total"], rel=1e-9)
    causal = forward_flops(spec, tiles, seq_len, causal=True)
    assert causal["vision"] == dense["vision"] and causal["language"] < dense["language"]


def test_query_flops_match_flop_counter(tiny_full_size):
    spec, processor, model = tiny_full_size
    batch = processor.process_queries(["a report with a red header and a pie chart"])
    flops = forward_flops(spec, 0, batch["input_ids"].shape[1], causal=False)
    assert flops["vision"] == 0 and counted_flops(model, batch) == pytest.approx(flops["total"], rel=1e-9)


def test_peak_table_matches_device_names():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.4
    assert peak_bf16_tflops("NVIDIA L40S") == 362.0
    assert peak_bf16_tflops("Some CPU") is None and peak_bf16_tflops(None) is None
