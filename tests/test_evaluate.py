"""Evaluation with test-time augmentation: predict_proba and evaluate_classifier's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_model
from PIL import Image

from carclassifier.augment import tta_transform
from carclassifier.config import RunConfig
from carclassifier.data import load_dataset, load_image
from carclassifier.errors import DatasetError
from carclassifier.evaluate import evaluate_classifier
from carclassifier.inference import predict_proba, predict_views

SIZE = 32
CLASSES = ["audi", "bmw", "lada"]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def dataset(make_folder_dataset):
    root = make_folder_dataset(tuple(CLASSES), per_class=4)
    return root, load_dataset(root).records


@pytest.fixture
def config() -> RunConfig:
    config = RunConfig()
    config.augment.tta_views = 3
    config.input.batch_size = 4
    return config


def _paths(root: Path, frame: pd.DataFrame) -> list[Path]:
    return [root / p for p in frame["path"]]


def test_predict_proba_is_the_model_on_resized_images(model, dataset):
    root, frame = dataset
    paths = _paths(root, frame)
    probs = predict_proba(model, paths, batch_size=5, progress=False)
    assert probs.shape == (len(paths), 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    images = np.stack([load_image(p, (SIZE, SIZE)) for p in paths]).astype(np.float32)
    np.testing.assert_allclose(probs, model.predict_on_batch(images), atol=1e-6)


def test_tta_with_one_view_or_without_transform_is_plain(model, dataset, config):
    root, frame = dataset
    paths = _paths(root, frame)
    tta = tta_transform(config.augment, SIZE, seed=0)
    plain = predict_proba(model, paths, progress=False)
    np.testing.assert_array_equal(predict_proba(model, paths, tta=tta, progress=False), plain)
    np.testing.assert_array_equal(predict_proba(model, paths, tta_views=4, progress=False), plain)


def test_tta_is_the_mean_of_the_plain_and_augmented_views(model, dataset, config):
    root, frame = dataset
    paths = _paths(root, frame)
    tta = tta_transform(config.augment, SIZE, seed=123)
    plain, averaged = predict_views(model, paths, 3, tta, 3, seed=7, progress=False)
    tta.set_random_seed(7)  # documented draw order: image by image, views 1.. in a row
    expected = []
    for path in paths:
        image = load_image(path, (SIZE, SIZE))
        views = [image] + [tta(image=image)["image"] for _ in range(2)]
        expected.append(model.predict_on_batch(np.stack(views).astype(np.float32)).mean(axis=0))
    np.testing.assert_allclose(averaged, np.stack(expected), atol=1e-6)
    assert not np.allclose(averaged, plain, atol=1e-5)  # the views did change something
    np.testing.assert_allclose(plain, predict_proba(model, paths, progress=False), atol=1e-6)
    # reproducible, and independent of the batch size
    again = predict_proba(model, paths, batch_size=7, tta=tta, tta_views=3, seed=7, progress=False)
    np.testing.assert_allclose(again, averaged, atol=1e-6)


def test_unreadable_image_raises_or_gets_a_nan_row(model, dataset, tmp_path):
    root, frame = dataset
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    paths = [*_paths(root, frame)[:2], bad]
    with pytest.raises(DatasetError, match="broken.jpg"):
        predict_proba(model, paths, progress=False)
    probs = predict_proba(model, paths, progress=False, skip_unreadable=True)
    assert np.isnan(probs[2]).all() and not np.isnan(probs[:2]).any()


def test_evaluate_classifier_writes_consistent_outputs(model, dataset, config, tmp_path):
    root, frame = dataset
    out = tmp_path / "eval"
    result = evaluate_classifier(model, root, frame, CLASSES, config, out, progress=False)
    n = len(frame)

    saved = json.loads((out / "evaluation.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["num_images"] == n and saved["image_size"] == SIZE
    assert saved["tta"]["views"] == 3
    assert saved["tta_gain"] == pytest.approx(saved["tta"]["accuracy"] - saved["accuracy"])
    for per_class in (saved["per_class"], saved["tta"]["per_class"]):
        assert [c["class"] for c in per_class] == CLASSES
        assert sum(c["support"] for c in per_class) == n
        assert set(per_class[0]) == {"class", "precision", "recall", "f1", "support"}

    predictions = pd.read_csv(out / "predictions_val.csv")
    assert list(predictions["path"]) == list(frame["path"])
    assert saved["accuracy"] == pytest.approx(
        (predictions["predicted"] == predictions["label"]).mean()
    )
    assert saved["tta"]["accuracy"] == pytest.approx(
        (predictions["predicted_tta"] == predictions["label"]).mean()
    )
    plain = predict_proba(model, _paths(root, frame), progress=False)
    np.testing.assert_array_equal(predictions["predicted"], plain.argmax(axis=1))
    np.testing.assert_allclose(predictions["prob"], plain.max(axis=1), atol=1e-6)
    labels = frame["label"].to_numpy()
    hand_loss = -np.mean(np.log(plain[np.arange(n), labels].astype(np.float64)))
    assert saved["loss"] == pytest.approx(hand_loss, rel=1e-4)

    for name, column in (
        ("confusion_matrix.csv", "predicted"),
        ("confusion_matrix_tta.csv", "predicted_tta"),
    ):
        matrix = pd.read_csv(out / name, index_col=0)
        assert list(matrix.index) == CLASSES and list(matrix.columns) == CLASSES
        assert matrix.to_numpy().sum() == n
        correct = (predictions[column] == predictions["label"]).groupby(predictions["label"]).sum()
        np.testing.assert_array_equal(
            np.diag(matrix.to_numpy()), correct.reindex(range(3), fill_value=0)
        )

    with Image.open(out / "confusion_matrix.png") as png:
        assert png.format == "PNG" and png.width > 400 and png.height > 200


def test_evaluate_classifier_rejects_mismatches(model, dataset, config, tmp_path):
    root, frame = dataset
    with pytest.raises(DatasetError, match="2 class names but the model outputs 3"):
        evaluate_classifier(model, root, frame, CLASSES[:2], config, tmp_path, progress=False)
    with pytest.raises(DatasetError, match="no validation images"):
        evaluate_classifier(model, root, frame.iloc[:0], CLASSES, config, tmp_path, progress=False)
    with pytest.raises(DatasetError, match="outside the 3 classes"):
        evaluate_classifier(
            model, root, frame.assign(label=5), CLASSES, config, tmp_path, progress=False
        )


def test_tta_for_another_size_is_a_clear_error(model, dataset, config):
    root, frame = dataset
    tta = tta_transform(config.augment, 64, seed=0)
    with pytest.raises(ValueError, match=r"tta_transform\(config.augment, 32\)"):
        predict_proba(model, _paths(root, frame), tta=tta, tta_views=2, progress=False)
