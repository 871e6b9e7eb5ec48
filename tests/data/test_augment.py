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


def test_the_seed_decides_and_workers_get_the_same_pipeline():
    import pickle

    augment = PageAugmentation.from_dict({"probability": 0.5, "rotation": 3, "brightness": 0.2, "contrast": 0.2,
                                          "noise": 0.03, "blur": 1.0, "jpeg_quality": [40, 80]})
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        outputs.append([augment(page()) for _ in range(4)])
    assert any(ImageChops.difference(a, b).getbbox() is not None for a, b in zip(*outputs, strict=True))
    copy = pickle.loads(pickle.dumps(augment))  # as a DataLoader worker receives the collator
    torch.manual_seed(1)
    assert ImageChops.difference(copy(page()), outputs[1][0]).getbbox() is None


@pytest.mark.parametrize(
    "setting", [{"rotation": 20}, {"brightness": 0.5}, {"contrast": 0.5}, {"blur": 2.0}, {"noise": 0.1},
                {"jpeg_quality": [5, 10]}],
)
def test_each_operation_changes_the_page_on_its_own(setting):
    augment = PageAugmentation.from_dict({"probability": 1.0, **setting})
    torch.manual_seed(0)
    out = augment(page())
    assert out.size == page().size and out.mode == "RGB"
    assert ImageChops.difference(out, page()).getbbox() is not None
    if "rotation" in setting:  # the corners a rotation uncovers are white paper
        black = Image.new("RGB", (96, 128), "black")
        torch.manual_seed(0)
        assert augment(black).getpixel((0, 0)) == (255, 255, 255)
