import numpy as np
import pytest

from carclassifier.augment import build_transform, train_transform, tta_transform, val_transform
from carclassifier.config import AugmentConfig
from carclassifier.errors import ConfigError

IMAGE = np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8)


def test_default_train_augmentation_ends_at_the_size_and_changes_pixels():
    transform = train_transform(AugmentConfig(), 64, seed=1)
    names = [type(t).__name__ for t in transform.transforms]
    for expected in (
        "RandomResizedCrop",
        "HorizontalFlip",
        "RandomBrightnessContrast",
        "HueSaturationValue",
        "OneOf",
        "CoarseDropout",
    ):
        assert expected in names
    out = transform(image=IMAGE)["image"]
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    plain = val_transform(64)(image=IMAGE)["image"]
    assert not np.array_equal(out, plain)


def test_same_seed_same_augmentation():
    a = train_transform(AugmentConfig(), 48, seed=3)(image=IMAGE)["image"]
    b = train_transform(AugmentConfig(), 48, seed=3)(image=IMAGE)["image"]
    assert np.array_equal(a, b)


def test_validation_is_resize_only():
    out = val_transform(32)(image=IMAGE)["image"]
    assert out.shape == (32, 32, 3)
    assert np.array_equal(val_transform(32)(image=out)["image"], out)


def test_tta_and_nested_specs_from_config():
    config = AugmentConfig(
        tta=[{"OneOf": {"transforms": [{"HorizontalFlip": {}}, {"VerticalFlip": {}}], "p": 1.0}}]
    )
    out = tta_transform(config, 40, seed=0)(image=IMAGE)["image"]
    assert out.shape == (40, 40, 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"HorizontalFlipp": {}}, "not an albumentations transform"),
        ({"HorizontalFlip": {"probability": 0.5}}, "no parameter"),
        ({"RandomBrightnessContrast": {"brightness_limit": "lots"}}, "bad parameters"),
        ({"A": {}, "B": {}}, "one mapping"),
    ],
)
def test_bad_transform_specs_fail_with_the_name(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_transform(spec, 32)
