"""Page decoding, shared by the training data pipeline and the encoder: one place that turns whatever a dataset or a
user hands over (a PIL image in any mode, encoded bytes, a `{"bytes", "path"}` dict, a file path, an array) into an
RGB PIL image, or a `ColinternError` naming the page.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from colintern.utils import ColinternError

PageInput = Image.Image | bytes | str | Path | Mapping[str, Any]


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a page in any PIL mode to RGB: transparency onto white, 16-bit and float greyscale rescaled to 8 bits.

    Decoding happens here (`image.load()`), so a truncated or corrupt file fails at this point, not deep in a batch.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    image.load()
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def open_page(page: PageInput, page_id: Any = None) -> Image.Image:
    """A PIL image for `page`, opened lazily (size and mode known, pixels not yet decoded).

    Raises:
        ColinternError naming `page_id` when the page is not an image PIL can identify.
    """
    if isinstance(page, Image.Image):
        return page
    label = f"page {page_id!r}" if page_id is not None else "a page"
    try:
        if isinstance(page, Mapping):
            if page.get("bytes") is not None:
                return Image.open(io.BytesIO(page["bytes"]))
            if page.get("path"):
                return Image.open(page["path"])
            raise ColinternError(f"Cannot read {label}: the image has neither bytes nor a path.")
        if isinstance(page, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(bytes(page)))
        if isinstance(page, (str, Path)):
            return Image.open(page)
        if hasattr(page, "shape"):  # an array or tensor: (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4
            array = np.asarray(page.cpu() if hasattr(page, "cpu") else page)
            if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
                array = array.transpose(1, 2, 0)
            if array.dtype != np.uint8:
                array = (np.clip(array, 0, 1) * 255 if array.max() <= 1 else np.clip(array, 0, 255)).astype(np.uint8)
            return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
    except Image.DecompressionBombError as error:  # a header claiming far more pixels than a page has
        raise ColinternError(
            f"Cannot read {label}: {error} Replace it with a downscaled copy or remove it (or, if you trust the file, "
            "raise PIL.Image.MAX_IMAGE_PIXELS)."
        ) from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ColinternError(f"Cannot read {label}: {error}. Replace or remove this page.") from error
    raise ColinternError(f"Cannot read {label}: unsupported page type {type(page).__name__}.")


def load_page(page: PageInput, page_id: Any = None) -> Image.Image:
    """`page` decoded and converted to RGB (any PIL mode; see `to_rgb`).

    Raises:
        ColinternError naming `page_id` when the file is truncated, corrupt or not an image.
    """
    image = open_page(page, page_id)
    try:
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for truncated / corrupt data
        label = f"page {page_id!r}" if page_id is not None else "a page"
        raise ColinternError(f"Cannot decode {label}: {error}. Replace or remove this page.") from error
