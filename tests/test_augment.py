import albumentations as A
import cv2
import numpy as np
import pytest

from carclassifier.augment import (
    ZoomOut,
    build_transform,
    train_transform,
    tta_transform,
    val_transform,
)
from carclassifier.config import AugmentConfig, dump_config, parse_config, preset_transforms
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


# The training list as it was before presets existed (commit 1eaacfb), written out: the default
# preset must stay exactly this, so existing recipes train on the same augmentation stream.
CROPPED_BEFORE_PRESETS = [
    {"RandomResizedCrop": {"scale": [0.6, 1.0], "ratio": [0.75, 1.333]}},
    {"HorizontalFlip": {"p": 0.5}},
    {"Affine": {"translate_percent": [-0.06, 0.06], "scale": [0.9, 1.1], "rotate": [-10, 10],
                "p": 0.5}},
    {"RandomBrightnessContrast": {"brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5}},
    {"HueSaturationValue": {"hue_shift_limit": 10, "sat_shift_limit": 20, "val_shift_limit": 10,
                            "p": 0.3}},
    {"OneOf": {"transforms": [{"GaussianBlur": {"blur_limit": [3, 5]}}, {"GaussNoise": {}}],
               "p": 0.2}},
    {"CoarseDropout": {"num_holes_range": [1, 4], "hole_height_range": [0.05, 0.15],
                       "hole_width_range": [0.05, 0.15], "p": 0.3}},
]  # fmt: skip


def test_default_preset_is_the_training_list_of_before_bit_for_bit():
    default, named = AugmentConfig(), AugmentConfig(preset="cropped")
    assert default.preset == named.preset == "cropped"
    assert default.train == named.train == CROPPED_BEFORE_PRESETS
    before = train_transform(AugmentConfig(train=CROPPED_BEFORE_PRESETS), 48, seed=5)
    now = train_transform(default, 48, seed=5)
    for _ in range(6):  # the same stream of draws, not just the first one
        np.testing.assert_array_equal(now(image=IMAGE)["image"], before(image=IMAGE)["image"])


def test_presets_resolve_from_config_and_overrides():
    config = parse_config("augment: {preset: uncropped}")
    assert config.augment.train == preset_transforms("uncropped")
    names = [next(iter(spec)) for spec in config.augment.train]
    assert {"RandomResizedCrop", "ZoomOut", "CoarseDropout"} <= set(names)
    assert parse_config("", ["augment.preset=uncropped"]).augment == config.augment
    again = parse_config(dump_config(config))  # a dumped config names both; they agree
    assert again.augment == config.augment
    custom = parse_config("augment: {train: [{HorizontalFlip: {p: 1.0}}]}")
    assert custom.augment.preset is None  # an explicit train list wins over the default preset
    assert parse_config(dump_config(custom)).augment == custom.augment


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("augment: {preset: uncroped}", r"'uncroped' is not a preset; presets are \['cropped', "
                                        r"'uncropped'\]"),
        ("augment: {preset: uncropped, train: [{HorizontalFlip: {}}]}",
         "differs from preset 'uncropped'.*give one of the two"),
    ],
)  # fmt: skip
def test_bad_preset_or_a_conflicting_train_list_fail_clearly(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(text)
    with pytest.raises(ConfigError, match="presets are"):
        preset_transforms("nope")


def _placement(out: np.ndarray, small: np.ndarray) -> tuple[int, int]:
    side = small.shape[0]
    spots = [
        (top, left)
        for top in range(out.shape[0] - side + 1)
        for left in range(out.shape[1] - side + 1)
        if np.array_equal(out[top : top + side, left : left + side], small)
    ]
    assert len(spots) == 1, spots
    return spots[0]


def test_zoom_out_puts_the_smaller_photo_at_random_places_on_its_blurred_reflection():
    photo = IMAGE[:64, :64]
    small = cv2.resize(photo, (32, 32), interpolation=cv2.INTER_AREA)
    spots = set()
    for seed in range(6):
        zoom = A.Compose([ZoomOut(scale_range=(0.5, 0.5), position="random", p=1.0)], seed=seed)
        out = zoom(image=photo)["image"]
        assert out.shape == photo.shape and out.dtype == np.uint8
        spots.add(_placement(out, small))
    assert len(spots) >= 4 and spots != {(16, 16)}  # random places, not the centre
    corner = ZoomOut(scale_range=(0.5, 0.5)).apply(photo, fraction=0.5, x=1.0, y=0.0)
    assert _placement(corner, small) == (0, 32)  # top right
    draws = []
    for seed in range(8):
        zoom = ZoomOut((0.4, 0.9), p=1.0)
        zoom.set_random_seed(seed)
        draws.append(zoom.get_params()["fraction"])
    assert all(0.4 <= f <= 0.9 for f in draws) and len(set(draws)) == len(draws)


def test_uncropped_preset_runs_on_a_photo_and_changes_scale_and_place():
    photo = IMAGE
    plain = val_transform(64)(image=photo)["image"]
    augment = AugmentConfig(preset="uncropped")
    transform = train_transform(augment, 64, seed=0)
    outs = [transform(image=photo)["image"] for _ in range(12)]
    assert all(o.shape == (64, 64, 3) and o.dtype == np.uint8 for o in outs)
    assert all(not np.array_equal(o, plain) for o in outs)
    zoom = next(t for t in transform.transforms if isinstance(t, ZoomOut))
    assert zoom.position == "random" and zoom.scale_range == (0.4, 1.0) and zoom.p == 0.5
