"""The real InternVL3.5-1B architecture with random weights, built from its shipped config (no download), and its FLOPs.

Used by `scripts/benchmark.py <name> --full-size` to measure speed, memory and model FLOPs utilisation (MFU) of the
shape users train and evaluate, on machines that cannot reach the Hub. The model is built from the config colintern
ships for OpenGVLab/InternVL3_5-1B-HF (`colintern/configs/internvl3_5/InternVL3_5-1B`, read by
`colintern.tuning.advisor.load_model_config`) as it is: InternViT-300M (24 layers, hidden 1024, 16 heads, MLP 4096,
q/k/v biases, 448px tiles of 14px patches) + a 2-layer MLP projector after a 0.5 pixel shuffle + Qwen3-0.6B
(28 layers, hidden 1024, 16 query / 8 key-value heads of 128, MLP 3072, vocabulary 151,936), plus colintern's
128-dim `custom_text_proj` head: 905,446,528 parameters. The FLOP count reads its numbers from the same config
(`colintern.model.architecture.InternVLArchitecture`); tests use a scaled-down copy of the config (`tiny_config`).

Forward FLOPs (`forward_flops`), counting 2 FLOPs per multiply-add of every matrix product and convolution (norms,
activations, softmax, RoPE and the embedding lookup are left out, as is usual for MFU):

    per 448px tile, vision tower (P = (448/14)^2 = 1024 patches, N = P + 1 tokens with CLS, h = 1024, m = 4096):
        patch embedding   2 * P * (3 * 14 * 14) * h
        per layer         2 * N * h * 4h  (q, k, v, output projections)  +  2 * N * h * m * 2  (fc1, fc2)
                          + 2 * 2 * N^2 * h  (QK^T and AV, bidirectional)
    per tile, projector (T = P / 4 = 256 image tokens):  2 * T * 4h * H  +  2 * T * H * H        (H = 1024)
    per sequence of S tokens, language model (q = 16 * 128 = 2048, kv = 8 * 128 = 1024, M = 3072):
        per layer         2 * S * H * (q + 2 kv)  +  2 * S * q * H  +  2 * S * H * M * 3  (gate, up, down)
                          + 2 * 2 * S^2 * q * c  (QK^T and AV; c = 1/2 for causal attention, 1 if counted dense)
        head              2 * S * H * 128
The causal half (c = 1/2) is what a causal kernel has to compute and what MFU uses here; `causal=False` gives the
dense count that `torch.utils.flop_counter.FlopCounterMode` reports (the tests check the formula against it).
MFU = model FLOPs per second / the accelerator's dense bf16 peak (`PEAK_BF16_TFLOPS`, or `--peak-tflops`).
"""

from __future__ import annotations

import json
import logging

from colintern.model.architecture import DEFAULT_MAX_NUM_VISUAL_TOKENS, INTERNVL3_5_1B, InternVLArchitecture

logger = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s, matched on the device name.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
}


FULL_SIZE_MODEL = INTERNVL3_5_1B


def full_size_config(name: str = FULL_SIZE_MODEL):
    """The shipped `InternVLConfig` of an InternVL3.5 preset (offline; no weights)."""
    from colintern.tuning.advisor import load_model_config

    return load_model_config(name)


def scaled_config(vision: dict, text: dict, **changes):
    """InternVL3.5-1B's shipped config file with some numbers changed: every other setting (q/k/v biases, norms,
    pooling, the projector) stays the shipped one, so a narrower copy runs the same code on a CPU."""
    from transformers.models.internvl import InternVLConfig

    from colintern.tuning.advisor import preset_config_dir

    data = json.loads((preset_config_dir(FULL_SIZE_MODEL) / "config.json").read_text())
    data["vision_config"].update(vision)
    data["text_config"].update(text)
    data.update(changes)
    return InternVLConfig.from_dict(data)


def tiny_config():
    """A scaled-down InternVL3.5-1B for tests (the --full-size code paths on a CPU in seconds): 56px tiles of 14px
    patches (4 image tokens per tile), 2 narrow layers each, a 1,000-token vocabulary."""
    return scaled_config(
        vision={"image_size": [56, 56], "patch_size": [14, 14], "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 64},
        text={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "intermediate_size": 128, "vocab_size": 1000},
        image_seq_length=4,
    )


def build_processor(config, max_num_visual_tokens: int = DEFAULT_MAX_NUM_VISUAL_TOKENS):
    """A ColIntern3_5Processor with the tiles of the `InternVLConfig` `config` (InternVL's tiling and normalisation)
    and an offline tokenizer.

    The tokenizer is the embedded byte-level one (its ids fit any vocabulary of >= 1,000): token counts of queries
    are close to Qwen's for the short English queries used, and page prompts are almost all image tokens anyway.
    """
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    from colintern.model.embedded import build_tiny_tokenizer
    from colintern.model.processing import ColIntern3_5Processor

    architecture = InternVLArchitecture.from_config(config)
    side = architecture.vision.image_size
    tile = {"height": side, "width": side}
    return ColIntern3_5Processor(
        image_processor=GotOcr2ImageProcessor(size=tile, crop_to_patches=True, max_patches=12),
        tokenizer=build_tiny_tokenizer(),
        video_processor=InternVLVideoProcessor(size=tile),
        image_seq_length=architecture.image_seq_length,
        max_num_visual_tokens=max(max_num_visual_tokens, architecture.image_seq_length),
    )


def build_model(config, image_token_id: int, device, dtype, attn_implementation: str = "sdpa"):
    """ColIntern3_5 of an `InternVLConfig` with random weights (seeded), created directly on `device` in `dtype`, in
    eval mode; `image_token_id` is the processor's image-context token. On the meta device it costs nothing (for
    counting parameters)."""
    import copy

    import torch

    from colintern.model.modeling import ColIntern3_5

    config = copy.deepcopy(config)
    config.image_token_id = image_token_id
    torch.manual_seed(0)
    with torch.device(device):
        model = ColIntern3_5._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.reset_head()
    return model.eval()


def build_full_size(config=None, *, device="cpu", dtype=None, attn_implementation: str = "sdpa",
                    max_num_visual_tokens: int = DEFAULT_MAX_NUM_VISUAL_TOKENS):
    """(model, processor) of the benchmarks' `--full-size`: the `InternVLConfig` `config` as it is (default: the
    shipped InternVL3.5-1B config), random weights, on `device` in `dtype` (default float32)."""
    import torch

    config = config if config is not None else full_size_config()
    processor = build_processor(config, max_num_visual_tokens)
    model = build_model(config, processor.image_token_id, device, dtype or torch.float32, attn_implementation)
    return model, processor


def forward_flops(arch: InternVLArchitecture, n_tiles: int, seq_len: int, causal: bool = True) -> dict[str, float]:
    """Forward FLOPs of one input (see the module docstring): `n_tiles` tiles (0 for a query) and `seq_len`
    language-model tokens. Returns the parts and their "total"."""
    vision_dims, text = arch.vision, arch.text
    h, m, layers = vision_dims.hidden, vision_dims.intermediate, vision_dims.layers
    patches = vision_dims.patches_per_tile
    n = vision_dims.tokens_per_tile  # patches + CLS
    patch_embedding = 2 * patches * (3 * vision_dims.patch_size**2) * h
    vision_layer = 2 * n * h * 4 * h + 2 * n * h * m * 2 + 2 * 2 * n * n * h
    vision = n_tiles * (patch_embedding + layers * vision_layer)

    big_h = text.hidden
    shuffled = round(h / arch.downsample_ratio**2)
    tokens = arch.image_seq_length
    projector = n_tiles * (2 * tokens * shuffled * big_h + 2 * tokens * big_h * big_h)

    q, kv, s = text.q_dim, text.kv_dim, seq_len
    attention_factor = 0.5 if causal else 1.0
    text_layer = (
        2 * s * big_h * (q + 2 * kv) + 2 * s * q * big_h + 2 * s * big_h * text.intermediate * 3
        + 2 * 2 * s * s * q * attention_factor
    )
    language = text.layers * text_layer
    head = 2 * s * big_h * arch.embedding_dim
    parts = {"vision": float(vision), "projector": float(projector), "language": float(language), "head": float(head)}
    parts["total"] = sum(parts.values())
    return parts


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak of a known accelerator (by `torch.cuda.get_device_name()`), else None."""
    if not device_name:
        return None
    for key, value in PEAK_BF16_TFLOPS.items():  # ordered: specific names before their prefixes
        if key in device_name:
            return value
    return None
