"""The architecture of an InternVL3.5 retriever, read from its `InternVLConfig`: one description for every user.

`InternVLArchitecture.from_config(config)` holds the numbers the hyperparameter advisor, the memory model
(`colintern.tuning`) and the full-size benchmark's FLOP count (`colintern.benchmarks.full_size`) need. The config
stays the source of truth: models are built from the config itself, never from these numbers.

The page budget lives here too (the processor's tiling and the advisor's token counts use the same rule):
`max_tiles_for_budget` gives the tiler's grid limit for a visual-token budget, `tiles_per_page` what a page then
costs with its thumbnail. Nothing here imports colpali-engine, so the advisor runs where it is not installed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from colintern.utils import ColinternError

INTERNVL3_5_1B = "OpenGVLab/InternVL3_5-1B-HF"  # the published backbone: the default base model everywhere
DEFAULT_MAX_NUM_VISUAL_TOKENS = 1536  # 6 tiles of 256 tokens: e.g. 2 x 2 tiles + thumbnail for a square page
DEFAULT_EMBEDDING_DIM = 128  # the width of custom_text_proj unless the config says otherwise (ColPali's 128)
# How the language model attends when it encodes queries and pages (`ColIntern3_5.set_attention`): "causal" is the
# published recipe (InternVL's and ColPali's), "bidirectional" drops the causal mask (padding stays masked).
ATTENTION_MODES = ("causal", "bidirectional")


class VisualTokenBudgetError(ColinternError, ValueError):
    """A visual-token budget below one tile: the user's setting (a ColinternError), and a bad value."""


def max_tiles_for_budget(max_num_visual_tokens: int, tokens_per_tile: int) -> int:
    """The `max_patches` for GotOcr2's tiler that keeps a page within `max_num_visual_tokens`.

    A page cut into more than one tile also gets a thumbnail tile, so a grid of n > 1 tiles costs n + 1 tiles.
    """
    budget = max_num_visual_tokens // tokens_per_tile
    if budget < 1:
        raise VisualTokenBudgetError(
            f"max_num_visual_tokens={max_num_visual_tokens} is below one tile ({tokens_per_tile} tokens); "
            f"use at least {tokens_per_tile}."
        )
    return budget - 1 if budget >= 3 else 1


def tiles_per_page(max_num_visual_tokens: int, tokens_per_tile: int) -> int:
    """Most tiles a page can get under the budget: the tiler's grid limit + the thumbnail (for grids > 1)."""
    grid = max_tiles_for_budget(max_num_visual_tokens, tokens_per_tile)
    return grid + 1 if grid > 1 else 1


def _first(value) -> int:
    """`image_size` and `patch_size` are [h, w] in InternVL configs (square here), an int in older ones."""
    return int(value[0] if isinstance(value, list | tuple) else value)


@dataclass(frozen=True)
class TextDims:
    """The language model's shape (Qwen3)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, text_config) -> TextDims:
        return cls(
            layers=text_config.num_hidden_layers,
            hidden=text_config.hidden_size,
            heads=text_config.num_attention_heads,
            kv_heads=text_config.num_key_value_heads,
            head_dim=getattr(text_config, "head_dim", None)
            or text_config.hidden_size // text_config.num_attention_heads,
            intermediate=text_config.intermediate_size,
            vocab=text_config.vocab_size,
        )


@dataclass(frozen=True)
class VisionDims:
    """The vision tower's shape (InternViT)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    image_size: int
    patch_size: int
    use_qk_norm: bool
    norm_type: str

    @property
    def patches_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_tile(self) -> int:
        """Sequence length in the vision tower: patches + the CLS token."""
        return self.patches_per_tile + 1

    @classmethod
    def from_config(cls, vision_config) -> VisionDims:
        return cls(
            layers=vision_config.num_hidden_layers,
            hidden=vision_config.hidden_size,
            heads=vision_config.num_attention_heads,
            intermediate=vision_config.intermediate_size,
            image_size=_first(vision_config.image_size),
            patch_size=_first(vision_config.patch_size),
            use_qk_norm=bool(vision_config.use_qk_norm),
            norm_type=str(vision_config.norm_type),
        )


@dataclass(frozen=True)
class InternVLArchitecture:
    """Every architectural number of a ColIntern3.5 retriever, read from its `InternVLConfig`.

    `image_seq_length` is the number of image tokens a tile gives the language model after the pixel shuffle
    (256 for 448px tiles of 14px patches at `downsample_ratio` 0.5).
    """

    text: TextDims
    vision: VisionDims
    image_seq_length: int
    downsample_ratio: float
    embedding_dim: int

    @classmethod
    def from_config(cls, config, embedding_dim: int | None = None) -> InternVLArchitecture:
        return cls(
            text=TextDims.from_config(config.text_config),
            vision=VisionDims.from_config(config.vision_config),
            image_seq_length=int(config.image_seq_length),
            downsample_ratio=float(config.downsample_ratio),
            embedding_dim=int(embedding_dim or getattr(config, "embedding_dim", None) or DEFAULT_EMBEDDING_DIM),
        )

    def to_dict(self) -> dict:
        return asdict(self)
