import pytest
import torch
from PIL import Image, ImageChops

from colintern.data.augment import PageAugmentation
from colintern.utils import ColinternError


def page():
    image = Image.new("RGB", (96, 128), "white")
    image.paste(Image.new("RGB", (96, 20), (200, 30, 30)), (0, 0))
    return image


def test_augmentation_changes_pages_reproducibly_from_the_torch_seed():
    augment = PageAugmentation.from_dict({"probability": 1.0, "rotation": 3, "brightness": 0.2, "contrast": 0.2,
                                          "noise": 0.03, "blur": 1.0, "jpeg_quality": [40, 80]})
    torch.manual_seed(0)
    a = augment(page())
    torch.manual_seed(0)
    b = augment(page())
    assert a.size == page().size and a.mode == "RGB"
    assert ImageChops.difference(a, b).getbbox() is None  # same seed, same page
    assert ImageChops.difference(a, page()).getbbox() is not None  # and it did change the page


def test_probability_zero_and_no_settings_leave_pages_alone():
    augment = PageAugmentation.from_dict({"probability": 0.0, "rotation": 5, "noise": 0.1})
    assert ImageChops.difference(augment(page()), page()).getbbox() is None


def test_bad_settings_are_rejected():
    with pytest.raises(ColinternError, match="unknown setting"):
        PageAugmentation.from_dict({"rotate": 2})
    with pytest.raises(ColinternError, match="jpeg_quality"):
        PageAugmentation.from_dict({"jpeg_quality": [90, 10]})
