"""The memory model: per-layer saved tensors against autograd's, and the estimate's structure."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from colintern.model.architecture import TextDims, VisionDims
from colintern.tuning.advisor import LM_LORA_TARGET_REGEX, analyze_architecture
from colintern.tuning.memory_model import (
    HEADROOM,
    TrainingMemorySetup,
    estimate_peak_memory,
    lm_layer_saved_bytes,
    max_batch_size,
    vision_layer_saved_bytes,
)

TEXT = TextDims(layers=1, hidden=64, heads=4, kv_heads=2, head_dim=32, intermediate=192, vocab=100)
RANK = 4
BATCH, SEQ = 2, 24


def _saved_bytes(module, run, skip=()) -> tuple[int, int]:
    """(activation bytes, weight-copy bytes) autograd saves while `run()` executes, each storage once; parameters and
    `skip` tensors excluded. Weight copies (autocast's casts) are tensors shaped like one of the module's parameters."""
    excluded = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *skip]}
    weight_shapes = {tuple(p.shape) for p in module.parameters()}
    activations, weight_copies = {}, {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            target = weight_copies if tuple(tensor.shape) in weight_shapes else activations
            target[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(activations.values()), sum(weight_copies.values())


def _qwen3_layer(dtype, finetuning, dropout, attn):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

    config = Qwen3Config(
        hidden_size=TEXT.hidden,
        intermediate_size=TEXT.intermediate,
        num_attention_heads=TEXT.heads,
        num_key_value_heads=TEXT.kv_heads,
        head_dim=TEXT.head_dim,
        num_hidden_layers=1,
        vocab_size=TEXT.vocab,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    root = nn.Module()  # named like the real model so that the LoRA target regex applies
    root.language_model = nn.Module()
    root.language_model.layers = nn.ModuleList([Qwen3DecoderLayer(config, 0)])
    root = root.to(dtype)
    if finetuning == "lora":
        lora = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=dropout, target_modules=LM_LORA_TARGET_REGEX)
        root = get_peft_model(root, lora).base_model.model
    return root.language_model.layers[0].train(), Qwen3RotaryEmbedding(config)


# (dtype, fine-tuning, LoRA dropout, padded batch, attention, layer input requires grad)
CASES = [
    (dtype, finetuning, dropout, masked, "sdpa", True)
    for dtype in ("float32", "bfloat16")
    for finetuning, dropout in (("lora", 0.0), ("lora", 0.1), ("full", 0.0))
    for masked in (False, True)
]
CASES += [(dtype, "lora", 0.1, True, "eager", True) for dtype in ("float32", "bfloat16")]
CASES += [("float32", "full", 0.0, True, "eager", True)]
# the first layer under LoRA: its input (frozen embeddings) requires no grad
CASES += [(dtype, "lora", 0.1, False, "sdpa", False) for dtype in ("float32", "bfloat16")]


@pytest.mark.parametrize("dtype,finetuning,dropout,masked,attn,input_requires_grad", CASES)
def test_lm_layer_ledger_equals_autograd(dtype, finetuning, dropout, masked, attn, input_requires_grad):
    layer, rope = _qwen3_layer(getattr(torch, dtype), finetuning, dropout, attn)
    hidden = torch.randn(BATCH, SEQ, TEXT.hidden, dtype=getattr(torch, dtype), requires_grad=input_requires_grad)
    cos, sin = rope(hidden, torch.arange(SEQ)[None].expand(BATCH, SEQ))
    mask = None
    if masked:
        keep = torch.ones(BATCH, SEQ, dtype=torch.bool)
        keep[0, :5] = False  # left padding
        mask = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool))[None, None] & keep[:, None, None, :]
    skip = [cos, sin] + ([mask] if mask is not None else [])
    measured, _ = _saved_bytes(layer, lambda: layer(hidden, attention_mask=mask, position_embeddings=(cos, sin)), skip)
    setup = TrainingMemorySetup(
        dtype=dtype, finetuning=finetuning, lora_dropout=dropout, attn_implementation=attn, device="cpu", autocast=False
    )
    predicted = lm_layer_saved_bytes(TEXT, setup, SEQ, masked, RANK, input_requires_grad)
    assert predicted * BATCH * SEQ == measured


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lm_layer_ledger_under_autocast(dropout):
    layer, rope = _qwen3_layer(torch.bfloat16, "lora", dropout, "sdpa")
    hidden = torch.randn(BATCH, SEQ, TEXT.hidden, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope(hidden, torch.arange(SEQ)[None].expand(BATCH, SEQ))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(hidden, attention_mask=None, position_embeddings=(cos, sin))

    activations, weight_copies = _saved_bytes(layer, run, [cos, sin])
    setup = TrainingMemorySetup(dtype="bfloat16", autocast=True, lora_dropout=dropout, device="cpu")
    assert lm_layer_saved_bytes(TEXT, setup, SEQ, False, RANK) * BATCH * SEQ == activations
    lora_params = sum(p.numel() for name, p in layer.named_parameters() if "lora_" in name)
    assert weight_copies == 2 * lora_params  # autocast's bf16 copies of the float32 LoRA weights


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("use_qk_norm,norm_type", [(False, "layer_norm"), (True, "rms_norm")])
def test_vision_layer_ledger_equals_autograd(dtype, use_qk_norm, norm_type):
    from transformers.models.internvl import InternVLVisionConfig
    from transformers.models.internvl.modeling_internvl import InternVLVisionLayer

    config = InternVLVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=4,
        num_hidden_layers=1,
        image_size=32,
        patch_size=4,
        use_qk_norm=use_qk_norm,
        norm_type=norm_type,
    )
    config._attn_implementation = "sdpa"
    layer = InternVLVisionLayer(config).to(getattr(torch, dtype)).train()
    hidden = torch.randn(BATCH, SEQ, 64, dtype=getattr(torch, dtype), requires_grad=True)
    measured, _ = _saved_bytes(layer, lambda: layer(hidden))
    dims = VisionDims(
        layers=1,
        hidden=64,
        heads=4,
        intermediate=256,
        image_size=32,
        patch_size=4,
        use_qk_norm=use_qk_norm,
        norm_type=norm_type,
    )
    setup = TrainingMemorySetup(dtype=dtype, finetuning="full", device="cpu", autocast=False)
    assert vision_layer_saved_bytes(dims, setup) * BATCH * SEQ == measured


# ---------------------------------------------------------------------------------------------- the estimate
@pytest.fixture(scope="module")
def one_b():
    return analyze_architecture("OpenGVLab/InternVL3_5-1B-HF")


def test_every_part_grows_with_the_batch(one_b):
    for checkpointing in (False, True):
        setup = TrainingMemorySetup(gradient_checkpointing=checkpointing)
        estimates = [estimate_peak_memory(one_b, setup.replace(per_device_batch_size=b)) for b in (1, 2, 4, 8, 16)]
        for smaller, larger in zip(estimates, estimates[1:], strict=False):
            for part in smaller.parts:
                assert larger.part(part.name).bytes >= part.bytes, part.name
            assert larger.peak_bytes > smaller.peak_bytes


def test_peak_is_the_largest_phase_and_a_sum_of_parts(one_b):
    estimate = estimate_peak_memory(one_b, TrainingMemorySetup(per_device_batch_size=8))
    assert estimate.tensor_peak_bytes == max(estimate.phase_bytes.values())
    tensor_parts = [part for part in estimate.parts if part.name != HEADROOM]
    assert estimate.tensor_peak_bytes == sum(part.bytes for part in tensor_parts if estimate.peak_phase in part.phases)
    assert estimate.part(HEADROOM).bytes == estimate.headroom_bytes > 0
    assert estimate.peak_bytes == estimate.tensor_peak_bytes + estimate.headroom_bytes
    table = estimate.format_table()
    assert "frozen weights" in table and "estimated peak" in table


def test_sizes_of_the_main_parts(one_b):
    estimate = estimate_peak_memory(one_b, TrainingMemorySetup(per_device_batch_size=4, query_tokens=64))
    assert estimate.part("frozen weights").bytes == one_b.total_params * 2  # bf16
    # fp32 weight + gradient + exp_avg + exp_avg_sq = 16 bytes per LoRA and head parameter (the head keeps float32
    # master weights under a bf16 load since issue 15; it used to be counted, and trained, in bf16)
    lora_and_head = one_b.lora_params * 4 + one_b.head_params * 4
    assert estimate.part("trainable weights").bytes + estimate.part("optimizer states (AdamW)").bytes == (
        3 * lora_and_head
    )
    # ColbertLoss's (B, B, Lq, Ld) float32 scores (autocast outputs are float32) + bool mask + gradient
    # (the trainer compacts pages to their image tokens before the loss)
    assert estimate.part("MaxSim score tensor (loss)").bytes == 4 * 4 * 64 * one_b.image_tokens_per_page * (4 + 4 + 1)
    gathered = estimate_peak_memory(one_b, TrainingMemorySetup(per_device_batch_size=4, world_size=8))
    assert gathered.part("MaxSim score tensor (loss)").bytes == 8 * estimate.part("MaxSim score tensor (loss)").bytes
    assert estimate.part("vision tower working set").bytes > 0
    assert estimate.part("vision activations: pages").bytes == 0  # frozen, run under no_grad


def test_checkpointing_keeps_only_layer_inputs(one_b):
    setup = TrainingMemorySetup(per_device_batch_size=4, pages_padded=False)
    plain = estimate_peak_memory(one_b, setup).part("LM activations: pages").bytes
    checkpointed = estimate_peak_memory(one_b, setup.replace(gradient_checkpointing=True))
    assert checkpointed.part("LM activations: pages").bytes < plain / 10
    # 2*s*b*h bytes per layer in 16-bit (Korthikanti et al.'s full recomputation), plus what follows the last layer
    # (final norm, head, embeddings: ~7h per token against 28 x 2h)
    layer_inputs = one_b.text.layers * 2 * 4 * one_b.page_tokens * one_b.text.hidden
    assert layer_inputs < checkpointed.part("LM activations: pages").bytes < 1.2 * layer_inputs


def test_max_batch_size_is_the_boundary(one_b):
    setup = TrainingMemorySetup(gradient_checkpointing=True)
    budget = 20 * 1024**3
    batch = max_batch_size(one_b, setup, budget)
    assert estimate_peak_memory(one_b, setup.replace(per_device_batch_size=batch)).peak_bytes <= budget
    assert estimate_peak_memory(one_b, setup.replace(per_device_batch_size=batch + 1)).peak_bytes > budget
    assert max_batch_size(one_b, setup, 1024**3) == 0  # the weights alone do not fit in 1 GiB
    assert max_batch_size(one_b, setup, 10**15, limit=64) == 64


def test_quantized_language_model_weights(one_b):
    """QLoRA: the LM linears in 4 or 8 bits, every other frozen weight upcast to float32 by peft."""
    text = one_b.text
    per_layer = text.hidden * (text.q_dim + 2 * text.kv_dim) + text.q_dim * text.hidden + 3 * text.hidden * text.intermediate
    linears = text.layers * per_layer
    setup = TrainingMemorySetup(per_device_batch_size=4)
    bf16 = estimate_peak_memory(one_b, setup)
    nf4 = estimate_peak_memory(one_b, setup.replace(quantize="4bit"))
    int8 = estimate_peak_memory(one_b, setup.replace(quantize="8bit"))
    others = (one_b.total_params - linears) * 4
    assert nf4.part("frozen weights").bytes == int(linears * (0.5 + 0.127 / 8) + others)
    assert int8.part("frozen weights").bytes > linears + others
    assert nf4.part("dequantised weight").bytes == text.intermediate * text.hidden * 2  # the largest linear, bf16
    assert bf16.part("dequantised weight").bytes == 0
    assert nf4.peak_bytes < int8.peak_bytes
    # everything but the weights is unchanged
    for part in bf16.parts:
        if part.name not in ("frozen weights", "dequantised weight", HEADROOM):
            assert nf4.part(part.name).bytes == part.bytes, part.name
    with pytest.raises(ValueError, match="quantize"):
        TrainingMemorySetup(quantize="3bit")
    with pytest.raises(ValueError, match="lora"):
        TrainingMemorySetup(quantize="4bit", finetuning="full")


def test_setup_rejects_unknown_values():
    with pytest.raises(ValueError):
        TrainingMemorySetup(dtype="int8")
    with pytest.raises(ValueError):
        TrainingMemorySetup(finetuning="qlora")
    assert dataclasses.asdict(TrainingMemorySetup())["per_device_batch_size"] == 8


def test_gradient_cache_keeps_activations_of_the_chunk(one_b):
    setup = TrainingMemorySetup(per_device_batch_size=16, gradient_checkpointing=True)
    plain_16 = estimate_peak_memory(one_b, setup)
    cached = estimate_peak_memory(one_b, setup.replace(per_device_batch_size=128, cache_chunk_size=16))
    plain_128 = estimate_peak_memory(one_b, setup.replace(per_device_batch_size=128))
    for name in ("LM activations: queries", "backward working set: pages", "vision tower working set"):
        assert cached.part(name).bytes == plain_16.part(name).bytes
    # the loss and the inputs stay per batch; the embeddings and their cached gradients are added
    assert cached.part("MaxSim score tensor (loss)").bytes == plain_128.part("MaxSim score tensor (loss)").bytes
    assert cached.part("input batch").bytes == plain_128.part("input batch").bytes
    assert cached.part("gradient cache: embeddings + gradients").bytes > 0
    assert plain_16.peak_bytes < cached.peak_bytes < plain_128.peak_bytes
    # a chunk of at least the batch is a plain step
    same = estimate_peak_memory(one_b, setup.replace(cache_chunk_size=16))
    assert same.peak_bytes == plain_16.peak_bytes


def test_the_advisor_recommends_an_in_batch_size_and_a_chunk():
    from colintern.tuning.advisor import format_recommendation, recommend

    rec = recommend("OpenGVLab/InternVL3_5-1B-HF", vram_gib=80, num_gpus=1)
    assert rec.cache_in_batch_size > rec.per_device_train_batch_size >= rec.cache_chunk_size
    assert rec.cache_memory.peak_bytes <= 0.9 * 80 * 2**30
    text = format_recommendation(rec)
    assert f"--batch-size {rec.cache_in_batch_size} --cache-chunk-size {rec.cache_chunk_size}" in text
    assert rec.to_json()["gradient_cache"]["cache_chunk_size"] == rec.cache_chunk_size
