"""ColIntern3.5: a ColPali-style multi-vector retriever on the InternVL3.5 backbone.

The model is transformers' `InternVLModel` (vision tower + pixel-shuffle projector + Qwen3 language model, no LM
head) with one extra linear layer, `custom_text_proj`, mapping every last hidden state to a `embedding_dim`-sized
vector (128 by default, stored in the config). Embeddings are L2-normalised and zeroed where the attention mask is 0;
for page images, only the image-context tokens are kept (see `mask_non_image_embeddings`).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.internvl import InternVLConfig, InternVLModel

from colintern.model.architecture import ATTENTION_MODES, DEFAULT_EMBEDDING_DIM

logger = logging.getLogger(__name__)

# The head is initialised from its own generator so that it is the same on every load, whatever the global RNG:
# a checkpoint saved without trained head weights can then be recognised (see `head_is_untrained`).
DEFAULT_HEAD_INIT_SEED = 0
HEAD_INIT_STD = 0.02

# Checkpoint layouts that all load into ColIntern3_5:
#   Hub (transformers >= 4.52): model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*, lm_head
#   legacy, and what save_pretrained writes: language_model.model.*, vision_tower.*, multi_modal_projector.*
#   plus, for saved retrievers, custom_text_proj.*  (lm_head is ignored: a retriever has no LM head)
CHECKPOINT_KEY_MAPPING = {
    r"^model\.language_model\.": "language_model.",
    r"^model\.vision_tower\.": "vision_tower.",
    r"^model\.multi_modal_projector\.": "multi_modal_projector.",
    r"^language_model\.model\.": "language_model.",
    r"^base_model\.model\.custom_text_proj": "custom_text_proj",
}


class ColIntern3_5(InternVLModel):  # noqa: N801 - the model family's published name
    """InternVL3.5 + `custom_text_proj`: returns (batch, tokens, embedding_dim) L2-normalised multi-vectors.

    Args:
        config: an `InternVLConfig`. `config.embedding_dim` (default 128) sets the projection size and
            `config.head_init_seed` (default 0) the head's deterministic initialisation.
        mask_non_image_embeddings: keep only the image-context tokens of page inputs (those with `pixel_values`).
            Under causal attention the text before the image (`<|im_start|>user`, `<img>`) gets the same vector on
            every page; left in, those vectors match every query equally and drown the page-specific ones.
    """

    main_input_name: ClassVar[str] = "input_ids"
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"^lm_head\.", r"^language_model\.lm_head\."]

    def __init__(self, config: InternVLConfig, mask_non_image_embeddings: bool = True):
        super().__init__(config)
        if getattr(config, "embedding_dim", None) is None:
            config.embedding_dim = DEFAULT_EMBEDDING_DIM
        if getattr(config, "head_init_seed", None) is None:
            config.head_init_seed = DEFAULT_HEAD_INIT_SEED
        self.dim = int(config.embedding_dim)
        self.custom_text_proj = nn.Linear(config.text_config.hidden_size, self.dim)
        self.mask_non_image_embeddings = mask_non_image_embeddings
        self.post_init()
        self.reset_head()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, reading every checkpoint layout in `CHECKPOINT_KEY_MAPPING`."""
        kwargs.setdefault("key_mapping", dict(CHECKPOINT_KEY_MAPPING))
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if kwargs.get("output_loading_info") else loaded  # (model, loading_info) when asked
        if model.head_is_untrained():  # expected for a base model (e.g. under an adapter); evaluation checks it
            logger.debug("custom_text_proj is in its initial state (seed %d).", model.config.head_init_seed)
        return loaded

    # ------------------------------------------------------------------ head initialisation
    @torch.no_grad()
    def initial_head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's documented initial state: weight ~ N(0, 0.02) drawn from a CPU generator seeded with
        `config.head_init_seed`, bias zero. A random Gaussian projection keeps cosine similarities of the hidden
        states (Johnson-Lindenstrauss), so an untrained head is a neutral start for contrastive training."""
        generator = torch.Generator(device="cpu").manual_seed(int(self.config.head_init_seed))
        out_features, in_features = self.custom_text_proj.weight.shape
        weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float32) * HEAD_INIT_STD
        return weight, torch.zeros(out_features, dtype=torch.float32)

    @torch.no_grad()
    def reset_head(self) -> None:
        """Put `custom_text_proj` back in its deterministic initial state."""
        weight, bias = self.initial_head_weights()
        proj = self.custom_text_proj
        if proj.weight.device.type == "meta":  # inside from_pretrained: `_init_weights` runs after materialising
            return
        proj.weight.copy_(weight.to(proj.weight.dtype))
        proj.bias.copy_(bias.to(proj.bias.dtype))

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "custom_text_proj", None):
            weight, bias = self.initial_head_weights()
            module.weight.copy_(weight.to(module.weight.device, module.weight.dtype))
            module.bias.copy_(bias.to(module.bias.device, module.bias.dtype))
            return
        super()._init_weights(module)

    @torch.no_grad()
    def head_is_untrained(self, atol: float = 1e-6) -> bool:
        """True when `custom_text_proj` still holds its deterministic initial weights."""
        weight, bias = self.initial_head_weights()
        proj = self.custom_text_proj
        return bool(
            torch.allclose(proj.weight.float().cpu(), weight, atol=atol)
            and torch.allclose(proj.bias.float().cpu(), bias, atol=atol)
        )

    # ------------------------------------------------------------------ attention mode
    @property
    def attention(self) -> str:
        """"causal" or "bidirectional": how the language model attends (read from `config.text_config.is_causal`)."""
        return "bidirectional" if getattr(self.config.text_config, "is_causal", True) is False else "causal"

    def set_attention(self, mode: str) -> None:
        """Make the language model attend causally (the published recipe) or bidirectionally, for training and
        encoding alike.

        transformers' own switch: with `is_causal=False` in the Qwen3 config, `create_causal_mask` builds a
        bidirectional mask (still masking padding) and the attention kernels (eager, SDPA, flash-attention) get
        `is_causal=False`. It lives in `config.text_config`, so `save_pretrained` writes it into config.json and a
        fresh `from_pretrained` attends the same way; causal leaves the config as the base model had it.
        """
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, not {mode!r}")
        text_config = self.config.text_config
        if mode == "bidirectional":
            text_config.is_causal = False
        elif "is_causal" in vars(text_config):
            del text_config.is_causal  # transformers' default is causal: a causal model's config stays unchanged

    # ------------------------------------------------------------------ forward
    def _vision_is_frozen(self) -> bool:
        parts = (self.vision_tower, self.multi_modal_projector)
        return not any(p.requires_grad for part in parts for p in part.parameters())

    def _image_features(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        # A frozen vision tower and projector need no autograd graph: no activations are stored for them.
        if self._vision_is_frozen() and torch.is_grad_enabled():
            with torch.no_grad():
                features = self.get_image_features(pixel_values=pixel_values, return_dict=True)
            features.pooler_output = features.pooler_output.detach()
            return features
        return self.get_image_features(pixel_values=pixel_values, return_dict=True)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Embed queries (`input_ids`, `attention_mask`) or pages (plus `pixel_values`: (n_tiles, 3, H, W)).

        Returns:
            (batch, sequence_length, embedding_dim) float tensor, L2-normalised per token, zero where masked.
        """
        for unused in ("use_cache", "output_hidden_states", "return_dict", "labels"):
            kwargs.pop(unused, None)
        mm_encoder_outputs = None
        if pixel_values is not None:
            mm_encoder_outputs = {"image": self._image_features(pixel_values)}
        hidden = (
            super()
            .forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                mm_encoder_outputs=mm_encoder_outputs,
                use_cache=False,
                return_dict=True,
                **kwargs,
            )
            .last_hidden_state
        )  # (batch, seq, hidden)
        # a trained head keeps float32 master weights over a 16-bit backbone; autocast (if on) picks the compute dtype
        hidden = hidden.to(self.custom_text_proj.weight.dtype)
        proj = F.normalize(self.custom_text_proj(hidden), p=2, dim=-1, eps=1e-12)  # (batch, seq, dim)
        keep = attention_mask.to(proj.dtype)
        if pixel_values is not None and self.mask_non_image_embeddings:
            keep = keep * (input_ids == self.config.image_token_id).to(proj.dtype)
        return proj * keep.unsqueeze(-1)

    # ------------------------------------------------------------------ conveniences
    @property
    def embedding_dim(self) -> int:
        return self.dim

    @property
    def image_seq_length(self) -> int:
        """Image tokens per 448px (or configured) tile after pixel shuffle."""
        return int(self.config.image_seq_length)
