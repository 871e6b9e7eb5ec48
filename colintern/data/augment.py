"""Training-page augmentation: the distortions scanned and photographed pages show. Off unless configured.

    training:
      augment: {probability: 0.5, rotation: 2.0, brightness: 0.15, contrast: 0.15, noise: 0.02, blur: 0.8,
                jpeg_quality: [50, 95]}

Each operation is applied independently with `probability`; magnitudes are drawn uniformly up to the given bound.
The operations are torchvision's (`torchvision.transforms.v2`: RandomRotation, ColorJitter, GaussianBlur,
GaussianNoise, JPEG, each in a RandomApply). They draw from torch's global RNG, which the Trainer seeds and restores
on resume, and which DataLoader workers derive per epoch: runs stay reproducible with their seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import cached_property

from PIL import Image

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

    @cached_property
    def transform(self):
        """The `torchvision.transforms.v2` pipeline: PIL page -> uint8 tensor -> the enabled operations -> PIL."""
        from torchvision.transforms import v2

        p = self.probability
        steps = [v2.ToImage()]
        if self.rotation:
            rotate = v2.RandomRotation(self.rotation, interpolation=v2.InterpolationMode.BILINEAR, fill=255)
            steps.append(v2.RandomApply([rotate], p=p))
        if self.brightness:
            steps.append(v2.RandomApply([v2.ColorJitter(brightness=self.brightness)], p=p))
        if self.contrast:
            steps.append(v2.RandomApply([v2.ColorJitter(contrast=self.contrast)], p=p))
        if self.blur:  # sigma ~ the radius of PIL's GaussianBlur; the kernel covers 3 sigma either side
            blur = v2.GaussianBlur(2 * math.ceil(3 * self.blur) + 1, sigma=(min(0.1, self.blur), self.blur))
            steps.append(v2.RandomApply([blur], p=p))
        if self.noise:  # on uint8 images sigma is in units of 255, as `noise` is
            steps.append(v2.RandomApply([v2.GaussianNoise(sigma=self.noise)], p=p))
        if self.jpeg_quality:
            steps.append(v2.RandomApply([v2.JPEG(list(self.jpeg_quality))], p=p))
        steps.append(v2.ToPILImage())
        return v2.Compose(steps)

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.transform(image.convert("RGB"))
