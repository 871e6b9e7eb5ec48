"""The FLOP formula of full_size.py against torch's FlopCounterMode on a scaled-down InternVL3.5 (same code path)."""

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from colintern.benchmarks.full_size import (
    InternVLSpec,
    build_model,
    build_processor,
    forward_flops,
    peak_bf16_tflops,
)


@pytest.fixture(scope="module")
def tiny_full_size():
    spec = InternVLSpec.tiny()
    processor = build_processor(spec)
    # eager attention: its matmuls are what FlopCounterMode counts on the CPU
    model = build_model(spec, processor.image_token_id, "cpu", torch.float32, "eager")
    return spec, processor, model


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
