"""Building real artefacts for tests: PEFT adapters on the tiny checkpoint, pages in every PIL mode."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LM_LINEARS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def build_tiny_adapter(
    base_dir: str | Path,
    output_dir: str | Path,
    *,
    seed: int = 1,
    save_head: bool = True,
    change_head: bool = True,
    scale: float = 0.05,
    max_num_visual_tokens: int = 16,
):
    """A real PEFT adapter on `base_dir`, as the trainer saves one: LoRA on the language-model linears and, with
    `save_head`, the full `custom_text_proj` through `modules_to_save`. Its weights are moved off their initial values
    (a stand-in for training steps), then saved with the processor. Returns the PeftModel (unmerged, eval mode)."""
    from peft import LoraConfig, get_peft_model

    from colintern.model.loading import load_model, load_processor

    model = load_model(str(base_dir), device="cpu")
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=LM_LINEARS, modules_to_save=["custom_text_proj"] if save_head else None
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if not parameter.requires_grad or ("custom_text_proj" in name and not change_head):
                continue
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(str(output_dir))
    load_processor(str(base_dir), max_num_visual_tokens=max_num_visual_tokens).save_pretrained(str(output_dir))
    return peft_model.eval()


def page_in_mode(mode: str, size: tuple[int, int] = (96, 128)) -> Image.Image:
    """A page-like image (white page, coloured band, dark block) in PIL `mode`."""
    page = Image.new("RGB", size, (255, 255, 255))
    page.paste((200, 30, 30), (0, 0, size[0], size[1] // 5))
    page.paste((20, 20, 20), (10, size[1] // 2, size[0] - 10, size[1] // 2 + 20))
    if mode == "RGBA":
        rgba = page.convert("RGBA")
        rgba.putalpha(Image.new("L", size, 128))
        return rgba
    if mode == "P":
        return page.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode == "I;16":  # 16-bit greyscale, as scanners write it: 8-bit levels times 257
        grey = np.asarray(page.convert("L"), dtype=np.uint16) * 257
        return Image.fromarray(grey.astype("<u2"))
    return page.convert(mode)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()
