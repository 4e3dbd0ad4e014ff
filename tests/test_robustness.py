"""The robustness report: seeded shifts that do what they say, ECE, and the report's outputs
from evaluate_classifier and the pipeline's evaluate step."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_dataset, tiny_model

from carclassifier.config import RobustnessConfig, RunConfig, load_config
from carclassifier.data import load_dataset, load_image
from carclassifier.errors import ConfigError
from carclassifier.robustness import (
    SHIFTS,
    calibration_table,
    expected_calibration_error,
    metric_name,
    shift_grid,
    shift_transform,
)

SIZE = 64
CLASSES = ["audi", "bmw", "lada"]


def _photo(size: int = SIZE) -> np.ndarray:
    """A smooth image with edges (gradients, a disc, a bar), unlike noise JPEG keeps it well."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.stack([255 * x, 255 * y, 128 + 100 * np.sin(6 * x)], axis=-1)
    image[(x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05] = (250, 40, 30)
    image[int(0.7 * size) : int(0.8 * size), int(0.1 * size) : int(0.5 * size)] = 20
    return image.clip(0, 255).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.mark.parametrize(("name", "strength"), shift_grid(RobustnessConfig()))
def test_each_shift_is_seeded_and_changes_the_photo(name, strength):
    photos = [_photo(), np.ascontiguousarray(_photo()[::-1])]
    first = [shift_transform(name, strength, SIZE, seed=3)(image=p)["image"] for p in photos]
    again = [shift_transform(name, strength, SIZE, seed=3)(image=p)["image"] for p in photos]
    for shifted, repeated, photo in zip(first, again, photos, strict=True):
        assert shifted.shape == photo.shape and shifted.dtype == np.uint8
        np.testing.assert_array_equal(shifted, repeated)
        assert not np.array_equal(shifted, photo)


def test_zoom_out_puts_the_scaled_photo_in_the_centre_of_a_blurred_reflection():
    photo = _photo()
    out = shift_transform("zoom_out", 1.0, SIZE, seed=0)(image=photo)["image"]
    side = round(SIZE * 0.4)  # strength 1: the car at 40 % of the side
    top = (SIZE - side) // 2
    small = cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(out[top : top + side, top : top + side], small)
    border = out[:top].astype(np.float64)
    assert abs(border.mean() - photo.mean()) < 40  # a background of the photo's colours, not black
    # blurred: less detail than the same band of a sharp reflection
    sharp = cv2.copyMakeBorder(
        small, top, SIZE - side - top, top, SIZE - side - top, cv2.BORDER_REFLECT_101
    )
    assert (
        np.abs(np.diff(border, axis=1)).mean()
        < np.abs(np.diff(sharp[:top].astype(float), axis=1)).mean()
    )
    half = shift_transform("zoom_out", 0.5, SIZE, seed=0)(image=photo)["image"]
    side = round(SIZE * 0.7)
    top = (SIZE - side) // 2
    np.testing.assert_array_equal(
        half[top : top + side, top : top + side],
        cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA),
    )


def test_flip_is_fliplr_and_off_centre_is_a_corner_crop():
    photo = _photo()
    flipped = shift_transform("hflip", 1.0, SIZE, seed=0)(image=photo)["image"]
    np.testing.assert_array_equal(flipped, np.fliplr(photo))
    side = round(SIZE * 0.6)
    corners = [
        cv2.resize(photo[y : y + side, x : x + side], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        for y in (0, SIZE - side)
        for x in (0, SIZE - side)
    ]
    crop = shift_transform("off_centre", 1.0, SIZE, seed=0)
    for _ in range(4):
        out = crop(image=photo)["image"]
        assert min(np.abs(out.astype(int) - c).max() for c in corners) <= 1


def test_occlusion_blacks_out_one_square_of_the_stated_side():
    photo = np.full((SIZE, SIZE, 3), 200, dtype=np.uint8)
    for strength in (0.5, 1.0):
        out = shift_transform("occlusion", strength, SIZE, seed=1)(image=photo)["image"]
        rows, cols = np.nonzero((out == 0).all(axis=-1))
        side = round(0.5 * strength * SIZE)
        assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side
        assert len(rows) == side * side


def test_jpeg_quality_lowers_psnr_monotonically():
    photo = _photo(128)
    psnr = [
        _psnr(shift_transform("jpeg", s, 128, seed=0)(image=photo)["image"], photo)
        for s in (0.1, 0.4, 0.7, 1.0)
    ]
    assert psnr == sorted(psnr, reverse=True) and psnr[0] - psnr[-1] > 5


def test_metric_names():
    assert metric_name("zoom_out", 0.5) == "robust_zoom_out_50_accuracy"
    assert metric_name("blur", 1.0, tta=True) == "robust_blur_100_accuracy_tta"
    assert metric_name("hflip", 1.0) == "robust_hflip_accuracy"
    assert set(SHIFTS) == set(RobustnessConfig().shifts)


def test_ece_against_a_hand_computed_case():
    labels = np.array([0, 1, 0, 2, 0])
    probs = np.array(
        [
            [0.95, 0.03, 0.02],  # right at 0.95 -> bin (0.9, 1]
            [0.95, 0.04, 0.01],  # wrong at 0.95 -> same bin
            [0.92, 0.04, 0.04],  # right at 0.92 -> same bin: accuracy 2/3, confidence 0.94
            [0.20, 0.25, 0.55],  # right at 0.55 -> bin (0.5, 0.6]
            [0.58, 0.40, 0.02],  # right at 0.58 -> same bin: accuracy 1, confidence 0.565
        ]
    )
    hand = (3 * abs(2 / 3 - 0.94) + 2 * abs(1 - 0.565)) / 5
    assert expected_calibration_error(labels, probs) == pytest.approx(hand)
    table = calibration_table(labels, probs)
    assert len(table) == 10 and table["count"].sum() == 5
    assert table.loc[9, "count"] == 3 and table.loc[9, "accuracy"] == pytest.approx(2 / 3)
    assert table.loc[5, "confidence"] == pytest.approx(0.565)
    assert expected_calibration_error(labels, np.eye(3)[labels]) == 0.0  # sure and right


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("evaluate.robustness.strengths=[0.0, 1.0]", "strengths must be in (0, 1]"),
        ("evaluate.robustness.strengths=[]", "at least one strength"),
        ("evaluate.robustness.strengths=[0.5, 0.501]", "repeat at percent precision"),
        ("evaluate.robustness.shifts=[blur, blur]", "repeated"),
        ("evaluate.robustness.shifts=[snow]", "zoom_out"),
        ("evaluate.robustness.max_photos=0", "max_photos"),
    ],
)
def test_bad_robustness_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=f"evaluate.robustness.*{message}".replace("(", r"\(")):
        load_config(None, [override])


# --------------------------------------------------------------------------- with a model


@pytest.fixture(scope="module")
def model():
    return tiny_model(32, 3)


def test_evaluate_classifier_writes_the_robustness_report(model, make_folder_dataset, tmp_path):
    from carclassifier.evaluate import evaluate_classifier

    root = make_folder_dataset(tuple(CLASSES), per_class=4)
    frame = load_dataset(root).records
    config = RunConfig()
    config.augment.tta_views = 2
    config.input.batch_size = 4
    config.evaluate.robustness.strengths = [1.0]
    config.evaluate.robustness.max_photos = 7
    out = tmp_path / "eval"
    result = evaluate_classifier(model, root, frame, CLASSES, config, out, progress=False)

    report = json.loads((out / "evaluation.json").read_text())["robustness"]
    metrics = report["metrics"]
    assert metrics["robust_photos"] == 7 and report["views"] == 2
    for name in SHIFTS:
        assert 0.0 <= metrics[metric_name(name, 1.0)] <= 1.0
        assert 0.0 <= metrics[metric_name(name, 1.0, tta=True)] <= 1.0
        assert (out / f"robustness_{name}.png").is_file()
    assert 0.0 <= metrics["ece"] <= 1.0 and 0.0 <= metrics["ece_tta"] <= 1.0
    assert metrics == result["robustness"]["metrics"]
    table = pd.read_csv(out / "robustness.csv")
    assert len(table) == len(SHIFTS) and set(table["shift"]) == set(SHIFTS)
    page = (out / "robustness.html").read_text()
    assert page.count("data:image/png;base64,") == len(SHIFTS) + 1 and "zoom_out" in page
    assert (out / "reliability.png").is_file() and (out / "calibration.csv").is_file()

    # the flip row is the model on the flipped photos of the seeded sample
    seeded = np.sort(np.random.default_rng(0).choice(len(frame), size=7, replace=False))
    photos = [load_image(root / frame["path"].iloc[i], (32, 32)) for i in seeded]
    flipped = model.predict_on_batch(np.stack([np.fliplr(p) for p in photos]).astype(np.float32))
    labels = frame["label"].to_numpy()[seeded]
    assert metrics["robust_hflip_accuracy"] == pytest.approx(np.mean(flipped.argmax(1) == labels))
    # and the report is reproducible
    again = evaluate_classifier(
        model, root, frame, CLASSES, config, tmp_path / "again", progress=False
    )
    assert again["robustness"]["metrics"] == metrics


def test_disabled_robustness_writes_no_report(model, make_folder_dataset, tmp_path):
    from carclassifier.evaluate import evaluate_classifier

    root = make_folder_dataset(tuple(CLASSES), per_class=2)
    config = RunConfig()
    config.augment.tta_views = 1
    config.evaluate.robustness.enabled = False
    result = evaluate_classifier(
        model, root, load_dataset(root).records, CLASSES, config, tmp_path, progress=False
    )
    assert "robustness" not in result and not (tmp_path / "robustness.html").exists()


def test_the_pipeline_step_logs_robustness_metrics_and_html(tmp_path):
    from carclassifier import steps
    from carclassifier.config import dump_config

    recipe = dump_config(
        load_config(
            None,
            ["input.image_size=32", "input.batch_size=4", "augment.tta_views=2",
             "evaluate.robustness.strengths=[1.0]", "evaluate.robustness.shifts=[zoom_out, hflip]"],
        )
    )  # fmt: skip
    artifact = tmp_path / "dataset"
    steps.prepare_step(recipe, [], str(tiny_dataset(tmp_path / "cars")), str(artifact))
    model_path = tmp_path / "model.keras"
    tiny_model(32, 2).save(model_path)
    report = tmp_path / "report.html"
    result = steps.evaluate_step(
        str(artifact), str(model_path), str(tmp_path / "eval"), str(report)
    )
    metrics = result.metrics
    assert {"robust_zoom_out_100_accuracy", "robust_hflip_accuracy_tta", "ece", "ece_tta"} <= set(
        metrics
    )
    page = report.read_text()
    assert "Robustness under shifts" in page and "Calibration" in page
    assert page.count("data:image/png;base64,") == 1 + 2 + 1  # confusion, two shifts, reliability
