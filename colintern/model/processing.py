"""ColIntern3_5Processor: page images (InternVL dynamic tiling) and queries for ColIntern3.5.

Built on colpali-engine's `BaseVisualRetrieverProcessor` (the interface every ColPali-style processor shares:
`process_images`, `process_queries`, `score`, `get_n_patches`) and transformers' `InternVLProcessor` (tokenizer,
`GotOcr2ImageProcessor` tiling and the `<img><IMG_CONTEXT>...</img>` expansion, `from_pretrained`/`save_pretrained`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor
from PIL import Image
from transformers import BatchFeature
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas
from transformers.models.internvl import InternVLProcessor

from colintern.data.pages import to_rgb
from colintern.model.architecture import DEFAULT_MAX_NUM_VISUAL_TOKENS, max_tiles_for_budget
from colintern.model.scoring import max_sim


class ColIntern3_5Processor(BaseVisualRetrieverProcessor, InternVLProcessor):  # noqa: N801
    """Processor for ColIntern3.5.

    Args:
        max_num_visual_tokens: upper bound on image tokens per page; sets the tiler's `max_patches`
            (see `max_tiles_for_budget`). Very large pages are thus bounded, whatever their size.
        Other arguments as `InternVLProcessor`.
    """

    query_prefix: ClassVar[str] = "Query: "
    query_augmentation_token: ClassVar[str] = "<|endoftext|>"
    n_augmentation_tokens: ClassVar[int] = 10  # as colpali-engine's process_queries and collator
    # Nothing follows the image: under causal attention, text after it cannot change the image tokens' embeddings
    # (the only ones kept for pages), so it would cost compute and change nothing.
    prompt_template: ClassVar[str] = "<|im_start|>user\n{image}"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        image_seq_length: int = 256,
        chat_template=None,
        max_num_visual_tokens: int = DEFAULT_MAX_NUM_VISUAL_TOKENS,
        **kwargs,
    ):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            image_seq_length=image_seq_length,
            chat_template=chat_template,
            **kwargs,
        )
        self.tokenizer.padding_side = "left"
        self.max_num_visual_tokens = int(max_num_visual_tokens)
        self.max_patches = max_tiles_for_budget(self.max_num_visual_tokens, self.image_seq_length)
        self._prompt_ids_cache: dict[int, list[int]] = {}  # page prompt token ids by tile count (not saved)

    @property
    def visual_prompt_prefix(self) -> str:
        return self.prompt_template.format(image=self.image_token)

    def set_max_num_visual_tokens(self, max_num_visual_tokens: int) -> None:
        self.max_patches = max_tiles_for_budget(max_num_visual_tokens, self.image_seq_length)
        self.max_num_visual_tokens = int(max_num_visual_tokens)

    # ------------------------------------------------------------------ inputs
    def _tiling_kwargs(self) -> dict:
        return {"crop_to_patches": self.max_patches > 1, "min_patches": 1, "max_patches": self.max_patches}

    def process_images(
        self, images: list[Image.Image], texts: list[str] | None = None, max_text_tokens: int | None = None
    ) -> BatchFeature:
        """Pages -> `input_ids`, `attention_mask` (left-padded) and `pixel_values` (total tiles, 3, H, W).

        The same tensors as `InternVLProcessor.__call__` on the page prompt (a test checks it), without re-tokenising
        the prompt for every page: a page's token ids depend only on its tile count and are cached per count.

        Args:
            texts: a text per page (e.g. its OCR text), placed in the prompt after the image on a new line, cut to
                `max_text_tokens` tokens; its token positions come back as `text_mask` (pop it before the forward).
        """
        if len(images) == 0:
            raise ValueError("process_images needs at least one image")
        if texts is not None and len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts for {len(images)} pages")
        rgb = [to_rgb(image) for image in images]
        image_inputs = self.image_processor(images=rgb, return_tensors="pt", **self._tiling_kwargs())
        tiles = image_inputs["num_patches"]
        rows = [self._page_prompt_ids(int(n)) for n in (tiles.tolist() if hasattr(tiles, "tolist") else tiles)]
        if texts is not None:
            text_ids = self.page_text_ids(texts, max_text_tokens)
            separator = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
            rows = [row + separator + ids if ids else row for row, ids in zip(rows, text_ids)]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding, as the tokenizer pads
            input_ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, length - len(row) :] = 1
        features = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": image_inputs["pixel_values"]}
        if texts is not None:  # the last len(ids) tokens of each row (left padding) are its text
            text_mask = torch.zeros((len(rows), length), dtype=torch.bool)
            for i, ids in enumerate(text_ids):
                if ids:
                    text_mask[i, length - len(ids) :] = True
            features["text_mask"] = text_mask
        return BatchFeature(features, tensor_type="pt")

    def page_text_ids(self, texts: list[str], max_text_tokens: int | None = None) -> list[list[int]]:
        """Token ids of each page's text (cut to `max_text_tokens`); an empty text has none.

        Special-token strings in the text (OCR markdown may hold `<img>`) are tokenised as plain text, and no id of
        an image placeholder is kept: the model would take it for a slot of the page's image features.
        """
        reserved = {
            getattr(self, name, None) for name in ("image_token_id", "start_image_token_id", "end_image_token_id")
        }
        out = []
        for text in texts:
            ids = []
            if text and text.strip():
                ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                ids = [i for i in ids if i not in reserved]
            out.append(ids[:max_text_tokens] if max_text_tokens is not None else ids)
        return out

    def _page_prompt_ids(self, n_tiles: int) -> list[int]:
        cache = self._prompt_ids_cache
        if n_tiles not in cache:
            expanded = self.visual_prompt_prefix.replace(
                self.image_token, self.replace_image_token({"num_patches": [n_tiles]}, 0), 1
            )
            cache[n_tiles] = self.tokenizer(expanded)["input_ids"]
        return cache[n_tiles]

    def process_texts(self, texts: list[str]) -> BatchFeature:
        """Tokenise texts as they are (no prefix, no augmentation): `input_ids`, `attention_mask`."""
        if len(texts) == 0:
            raise ValueError("process_texts needs at least one text")
        encoded = self.tokenizer(list(texts), padding="longest", return_tensors="pt")
        return BatchFeature({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})

    def format_query(self, text: str) -> str:
        """Prefix + text + augmentation tokens: the query form used in training and evaluation alike."""
        return self.query_prefix + text + self.query_augmentation_token * self.n_augmentation_tokens

    def process_queries(self, texts: list[str] | None = None, queries: list[str] | None = None, **kwargs):
        """Queries -> tokens. An empty query is kept: it is embedded from its prefix and augmentation tokens."""
        texts = queries if texts is None else texts
        if texts is None:
            raise ValueError("No texts or queries provided.")
        return self.process_texts([self.format_query(text) for text in texts])

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        qs: list[torch.Tensor] | torch.Tensor,
        ps: list[torch.Tensor] | torch.Tensor,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """MaxSim scores, (n_queries, n_pages) float32 on the CPU. See `colintern.model.scoring.max_sim`."""
        return max_sim(qs, ps, device=device, **kwargs)

    # ------------------------------------------------------------------ geometry
    def tile_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(columns, rows) of the tile grid for a page of `image_size` = (width, height), thumbnail excluded."""
        width, height = image_size
        if self.max_patches <= 1:
            return 1, 1
        tile = self.image_processor.size
        return get_optimal_tiled_canvas((height, width), (tile["height"], tile["width"]), 1, self.max_patches)

    def n_tiles(self, image_size: tuple[int, int]) -> int:
        """Tiles fed to the vision tower for a page of `image_size` = (width, height), thumbnail included."""
        columns, rows = self.tile_grid(image_size)
        return columns * rows + (1 if columns * rows > 1 else 0)

    def n_image_tokens(self, image_size: tuple[int, int]) -> int:
        """Image-context tokens (= document embeddings) of a page of `image_size` = (width, height)."""
        return self.n_tiles(image_size) * self.image_seq_length

    def get_n_patches(self, image_size: tuple[int, int], *args, **kwargs) -> tuple[int, int]:
        """(n_patches_x, n_patches_y) of the embedding grid over the tiled page (thumbnail excluded)."""
        columns, rows = self.tile_grid(image_size)
        side = math.isqrt(self.image_seq_length)
        return columns * side, rows * side

    def get_image_mask(self, batch_images: BatchFeature) -> torch.Tensor:
        """Boolean mask of the image-context tokens in processed pages."""
        return batch_images["input_ids"] == self.image_token_id
