"""The real InternVL3.5-1B architecture with random weights, built from its numbers (no download), and its FLOPs.

Used by `scripts/benchmark.py <name> --full-size` to measure speed, memory and model FLOPs utilisation (MFU) of the
shape users train and evaluate, on machines that cannot reach the Hub. The architecture is the config colintern
ships for OpenGVLab/InternVL3_5-1B-HF (`colintern/configs/internvl3_5/InternVL3_5-1B`, read by
`colintern.tuning.advisor.load_model_config`): InternViT-300M (24 layers, hidden 1024, 16 heads, MLP 4096, 448px tiles of
14px patches) + a 2-layer MLP projector after a 0.5 pixel shuffle + Qwen3-0.6B (28 layers, hidden 1024, 16 query /
8 key-value heads of 128, MLP 3072, vocabulary 151,936), plus colintern's 128-dim `custom_text_proj` head.
`InternVLSpec` holds the same numbers for the FLOP count (`spec_from_config`); tests build tiny specs through the
same code (`build_config`).

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

import logging
from dataclasses import asdict, dataclass

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


@dataclass(frozen=True)
class InternVLSpec:
    """Every architectural number of an InternVL3.5 retriever. Defaults: InternVL3.5-1B: 0.91B parameters as a
    retriever (InternViT 0.30B + projector + Qwen3 0.60B with its 0.16B embedding; the LM head is not used)."""

    image_size: int = 448
    patch_size: int = 14
    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    text_hidden: int = 1024
    text_layers: int = 28
    text_heads: int = 16
    text_kv_heads: int = 8
    head_dim: int = 128
    text_mlp: int = 3072
    vocab_size: int = 151_936
    downsample_ratio: float = 0.5
    embedding_dim: int = 128

    @property
    def patches_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens per tile after pixel shuffle (256 for 448px tiles of 14px patches)."""
        return round(self.patches_per_tile * self.downsample_ratio**2)

    @classmethod
    def tiny(cls) -> InternVLSpec:
        """A scaled-down spec (same code paths; builds and runs on a CPU in seconds), for tests."""
        return cls(
            image_size=56, patch_size=14, vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64,
            text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, head_dim=16, text_mlp=128, vocab_size=1000,
        )


FULL_SIZE_MODEL = "OpenGVLab/InternVL3_5-1B-HF"


def full_size_config(name: str = FULL_SIZE_MODEL):
    """The shipped `InternVLConfig` of an InternVL3.5 preset (offline; no weights)."""
    from colintern.tuning.advisor import load_model_config

    return load_model_config(name)


def spec_from_config(config, embedding_dim: int | None = None) -> InternVLSpec:
    """The `InternVLSpec` (architectural numbers) of an `InternVLConfig`."""
    vision, text = config.vision_config, config.text_config

    def first(value):
        return value[0] if isinstance(value, (list, tuple)) else value

    return InternVLSpec(
        image_size=first(vision.image_size),
        patch_size=first(vision.patch_size),
        vision_hidden=vision.hidden_size,
        vision_layers=vision.num_hidden_layers,
        vision_heads=vision.num_attention_heads,
        vision_mlp=vision.intermediate_size,
        text_hidden=text.hidden_size,
        text_layers=text.num_hidden_layers,
        text_heads=text.num_attention_heads,
        text_kv_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        text_mlp=text.intermediate_size,
        vocab_size=text.vocab_size,
        downsample_ratio=config.downsample_ratio,
        embedding_dim=embedding_dim or getattr(config, "embedding_dim", None) or 128,
    )


def build_config(spec: InternVLSpec, image_token_id: int):
    """The `InternVLConfig` (InternViT vision config + Qwen3 text config) of `spec`."""
    from transformers import Qwen3Config
    from transformers.models.internvl import InternVLConfig, InternVLVisionConfig

    vision = InternVLVisionConfig(
        hidden_size=spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        intermediate_size=spec.vision_mlp,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        norm_type="layer_norm",
        use_mean_pooling=True,
    )
    text = Qwen3Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_mlp,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=40_960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=spec.tokens_per_tile,
        downsample_ratio=spec.downsample_ratio,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config.embedding_dim = spec.embedding_dim
    return config


def build_processor(spec: InternVLSpec, max_num_visual_tokens: int = 1536):
    """A ColIntern3_5Processor with `spec`'s tiles (InternVL's tiling and normalisation) and an offline tokenizer.

    The tokenizer is the embedded byte-level one (its ids fit any vocabulary of >= 1,000): token counts of queries
    are close to Qwen's for the short English queries used, and page prompts are almost all image tokens anyway.
    """
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    from colintern.model.embedded import build_tiny_tokenizer
    from colintern.model.processing import ColIntern3_5Processor

    tile = {"height": spec.image_size, "width": spec.image_size}
    return ColIntern3_5Processor(
        image_processor=GotOcr2ImageProcessor(size=tile, crop_to_patches=True, max_patches=12),
        tokenizer=build_tiny_tokenizer(),
        video_processor=InternVLVideoProcessor(size=tile),
        image_seq_length=spec.tokens_per_tile,
        max_num_visual_tokens=max(max_num_visual_tokens, spec.tokens_per_tile),
    )


def build_model(config, image_token_id: int, device, dtype, attn_implementation: str = "sdpa"):
    """ColIntern3_5 of an `InternVLConfig` (or an `InternVLSpec`) with random weights (seeded), created directly on
    `device` in `dtype`, in eval mode; `image_token_id` is the processor's image-context token."""
    import copy

    import torch

    from colintern.model.modeling import ColIntern3_5

    if isinstance(config, InternVLSpec):
        config = build_config(config, image_token_id)
    config = copy.deepcopy(config)
    config.image_token_id = image_token_id
    torch.manual_seed(0)
    with torch.device(device):
        model = ColIntern3_5._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.reset_head()
    return model.eval()


def forward_flops(spec: InternVLSpec, n_tiles: int, seq_len: int, causal: bool = True) -> dict[str, float]:
    """Forward FLOPs of one input (see the module docstring): `n_tiles` 448px tiles (0 for a query) and `seq_len`
    language-model tokens. Returns the parts and their "total"."""
    h, m, layers = spec.vision_hidden, spec.vision_mlp, spec.vision_layers
    patches = spec.patches_per_tile
    n = patches + 1
    patch_embedding = 2 * patches * (3 * spec.patch_size**2) * h
    vision_layer = 2 * n * h * 4 * h + 2 * n * h * m * 2 + 2 * 2 * n * n * h
    vision = n_tiles * (patch_embedding + layers * vision_layer)

    big_h = spec.text_hidden
    shuffled = round(h / spec.downsample_ratio**2)
    projector = n_tiles * (2 * spec.tokens_per_tile * shuffled * big_h + 2 * spec.tokens_per_tile * big_h * big_h)

    q, kv, s = spec.text_heads * spec.head_dim, spec.text_kv_heads * spec.head_dim, seq_len
    attention_factor = 0.5 if causal else 1.0
    text_layer = (
        2 * s * big_h * (q + 2 * kv) + 2 * s * q * big_h + 2 * s * big_h * spec.text_mlp * 3
        + 2 * 2 * s * s * q * attention_factor
    )
    language = spec.text_layers * text_layer
    head = 2 * s * big_h * spec.embedding_dim
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


def describe(spec: InternVLSpec) -> dict:
    return {**asdict(spec), "tokens_per_tile": spec.tokens_per_tile}
