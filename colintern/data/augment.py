"""Training-page augmentation: the distortions scanned and photographed pages show. Off unless configured.

    training:
      augment: {probability: 0.5, rotation: 2.0, brightness: 0.15, contrast: 0.15, noise: 0.02, blur: 0.8,
                jpeg_quality: [50, 95]}

Each operation is applied independently with `probability`; magnitudes are drawn uniformly up to the given bound.
Randomness comes from torch's global RNG (one draw per page), which the Trainer seeds and restores on resume, and
which DataLoader workers derive per epoch: runs stay reproducible with their seed.
"""

from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from colintern.utils import ColinternError


@dataclass(frozen=True)
class PageAugmentation:
    probability: float = 0.5
    rotation: float = 0.0  # max degrees either way
    brightness: float = 0.0  # max relative change
    contrast: float = 0.0
    noise: float = 0.0  # std of Gaussian pixel noise, as a fraction of 255
    blur: float = 0.0  # max Gaussian blur radius in pixels
    jpeg_quality: tuple[int, int] | None = None  # re-encode with a quality drawn from this range

    @classmethod
    def from_dict(cls, settings: dict, seed: int = 0) -> PageAugmentation:
        known = {f.name for f in fields(cls)}
        unknown = set(settings) - known
        if unknown:
            raise ColinternError(f"training.augment: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
        values = dict(settings)
        if values.get("jpeg_quality") is not None:
            low, high = values["jpeg_quality"]
            if not 1 <= low <= high <= 100:
                raise ColinternError("training.augment.jpeg_quality must be [low, high] within 1..100")
            values["jpeg_quality"] = (int(low), int(high))
        if not 0 <= float(values.get("probability", 0.5)) <= 1:
            raise ColinternError("training.augment.probability must be between 0 and 1")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(self, image: Image.Image) -> Image.Image:
        rng = random.Random(int(torch.randint(0, 2**62, (1,))))
        image = image.convert("RGB")

        def active(bound) -> bool:
            return bool(bound) and rng.random() < self.probability

        if active(self.rotation):
            angle = rng.uniform(-self.rotation, self.rotation)
            image = image.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(255, 255, 255))
        if active(self.brightness):
            image = ImageEnhance.Brightness(image).enhance(1 + rng.uniform(-self.brightness, self.brightness))
        if active(self.contrast):
            image = ImageEnhance.Contrast(image).enhance(1 + rng.uniform(-self.contrast, self.contrast))
        if active(self.blur):
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, self.blur)))
        if active(self.noise):
            array = np.asarray(image, dtype=np.float32)
            noise = np.random.default_rng(rng.getrandbits(63)).normal(0, self.noise * 255, array.shape)
            image = Image.fromarray(np.clip(array + noise, 0, 255).astype(np.uint8))
        if self.jpeg_quality and rng.random() < self.probability:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=rng.randint(*self.jpeg_quality))
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        return image
