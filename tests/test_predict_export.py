"""Submission files (predict_folder) and the serving export (write_export / load_exported)."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_model, write_image

from carclassifier.errors import DatasetError, StorageError
from carclassifier.export import load_exported, write_export
from carclassifier.inference import predict_proba
from carclassifier.predict import predict_folder

SIZE = 32
CLASSES = ["audi", "bmw", "lada"]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def test_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "test"
    for i, name in enumerate(["c.jpg", "a.jpg", "b.png", "d.jpeg"]):
        write_image(folder / name, seed=i, fmt="PNG" if name.endswith("png") else "JPEG")
    (folder / "notes.txt").write_text("not an image")
    write_image(folder / ".hidden" / "x.jpg")
    return folder


def _sample(path: Path, ids: list[str]) -> Path:
    pd.DataFrame({"Id": ids, "Category": 0}).to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------- predict_folder


def test_competition_format_is_exactly_id_category(model, test_dir, tmp_path):
    out = tmp_path / "sub" / "dir" / "submission.csv"
    frame = predict_folder(model, test_dir, CLASSES, out, progress=False)
    written = pd.read_csv(out)
    assert list(written.columns) == ["Id", "Category"]
    assert list(written["Id"]) == ["a.jpg", "b.png", "c.jpg", "d.jpeg"]
    pd.testing.assert_frame_equal(written, frame)
    probs = predict_proba(model, [test_dir / i for i in written["Id"]], progress=False)
    np.testing.assert_array_equal(written["Category"], probs.argmax(axis=1))


def test_rows_follow_the_sample_submission(model, test_dir, tmp_path, caplog):
    order = ["d.jpeg", "a.jpg", "c.jpg"]  # b.png not in the sample: left out with a warning
    sample = _sample(tmp_path / "sample.csv", order)
    with caplog.at_level(logging.WARNING, logger="carclassifier.predict"):
        frame = predict_folder(
            model, test_dir, CLASSES, tmp_path / "s.csv", sample_submission=sample, progress=False
        )
    assert list(frame["Id"]) == order
    assert list(pd.read_csv(tmp_path / "s.csv")["Id"]) == order
    assert "b.png" in caplog.text


def test_sample_id_without_image_is_an_error(model, test_dir, tmp_path):
    sample = _sample(tmp_path / "sample.csv", ["a.jpg", "zz_missing.jpg"])
    with pytest.raises(DatasetError, match="zz_missing.jpg"):
        predict_folder(
            model, test_dir, CLASSES, tmp_path / "s.csv", sample_submission=sample, progress=False
        )
    assert not (tmp_path / "s.csv").exists()


def test_nested_folders_give_relative_ids_and_full_format(model, tmp_path):
    folder = tmp_path / "nested"
    write_image(folder / "x" / "one.jpg", seed=1)
    write_image(folder / "x" / "y" / "two.jpg", seed=2)
    write_image(folder / "three.jpg", seed=3)
    frame = predict_folder(
        model, folder, CLASSES, tmp_path / "full.csv", fmt="full", top_k=2, progress=False
    )
    assert list(frame["Id"]) == ["three.jpg", "x/one.jpg", "x/y/two.jpg"]
    assert list(frame.columns) == [
        *("Id", "Category", "class_name"),
        *("top1_class", "top1_prob", "top2_class", "top2_prob"),
    ]
    assert list(frame["class_name"]) == [CLASSES[c] for c in frame["Category"]]
    assert (frame["top1_class"] == frame["class_name"]).all()
    assert (frame["top1_prob"] >= frame["top2_prob"]).all()
    assert (frame["top1_class"] != frame["top2_class"]).all()


def test_unreadable_images_are_dropped_unless_the_sample_needs_them(
    model, test_dir, tmp_path, caplog
):
    (test_dir / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with caplog.at_level(logging.WARNING):
        frame = predict_folder(model, test_dir, CLASSES, tmp_path / "s.csv", progress=False)
    assert "broken.jpg" not in set(frame["Id"]) and len(frame) == 4
    assert "broken.jpg" in caplog.text
    sample = _sample(tmp_path / "sample.csv", ["a.jpg", "broken.jpg"])
    with pytest.raises(DatasetError, match="cannot be read: 'broken.jpg'"):
        predict_folder(
            model, test_dir, CLASSES, tmp_path / "t.csv", sample_submission=sample, progress=False
        )


def test_empty_or_missing_folder_is_a_clear_error(model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images under"):
        predict_folder(model, tmp_path / "empty", CLASSES, tmp_path / "s.csv", progress=False)
    with pytest.raises(DatasetError, match="does not exist"):
        predict_folder(model, tmp_path / "nope", CLASSES, tmp_path / "s.csv", progress=False)


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    metadata = {"backbone": "tiny", "accuracy": np.float32(0.5), "image_size": np.int64(SIZE)}
    assert write_export(model, CLASSES, out, metadata) == out
    return out


def _pixels(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)


def test_export_layout_and_labels(exported):
    assert (exported / "model.keras").is_file()
    assert (exported / "saved_model" / "1" / "saved_model.pb").is_file()
    assert [p.name for p in exported.parent.iterdir()] == ["model"]  # no partial folders left
    labels = json.loads((exported / "labels.json").read_text())
    assert labels["class_names"] == CLASSES
    assert labels["image_size"] == SIZE
    assert labels["input"] == "RGB float32 0-255, shape [N,H,W,3]"
    assert labels["metadata"] == {"backbone": "tiny", "accuracy": 0.5, "image_size": SIZE}


def test_load_exported_round_trip(model, exported):
    loaded, labels = load_exported(exported)
    assert labels["class_names"] == CLASSES
    x = _pixels()
    np.testing.assert_allclose(
        loaded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6, rtol=0
    )


def test_saved_model_serving_signature(model, exported):
    import tensorflow as tf

    serving = tf.saved_model.load(str(exported / "saved_model" / "1")).signatures["serving_default"]
    ((name, spec),) = serving.structured_input_signature[1].items()
    assert name == "image" and spec.dtype == tf.float32
    assert spec.shape.as_list() == [None, SIZE, SIZE, 3]
    x = _pixels()
    probs = serving(image=tf.constant(x))["output_0"].numpy()
    np.testing.assert_allclose(probs, model.predict_on_batch(x), atol=1e-6, rtol=0)


def test_export_replaces_an_existing_folder(tmp_path):
    other = tiny_model(num_classes=2)
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    write_export(other, ["x", "y"], out)
    assert sorted(p.name for p in out.iterdir()) == [
        "labels.json",
        "model.keras",
        "model.onnx",
        "saved_model",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with pytest.raises(ValueError, match="3 class names but the model outputs 2"):
        write_export(other, CLASSES, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_load_exported_errors(exported, tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        load_exported(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "labels.json").write_text((exported / "labels.json").read_text())
    with pytest.raises(StorageError, match="model.keras is missing"):
        load_exported(partial)
    (partial / "model.keras").write_bytes(b"garbage")
    with pytest.raises(StorageError, match="cannot load model.keras"):
        load_exported(partial)


def test_load_exported_from_gcs(model, exported, gcs_emulator, tmp_path):
    from carclassifier.storage import gcs_client

    bucket = gcs_client().create_bucket(f"test-{uuid.uuid4().hex[:8]}")
    for name in ("model.keras", "labels.json"):
        bucket.blob(f"runs/x/export/{name}").upload_from_filename(str(exported / name))
    loaded, labels = load_exported(f"gs://{bucket.name}/runs/x/export/")
    assert labels["class_names"] == CLASSES
    x = _pixels()
    np.testing.assert_allclose(
        loaded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6, rtol=0
    )
    with pytest.raises(StorageError, match="not a complete export"):
        load_exported(f"gs://{bucket.name}/runs/other")
    # a re-export to the same prefix is what the next load gets (no stale cache)
    newer = write_export(tiny_model(num_classes=2), ["x", "y"], tmp_path / "newer")
    for name in ("model.keras", "labels.json"):
        bucket.blob(f"runs/x/export/{name}").upload_from_filename(str(newer / name))
    reloaded, labels = load_exported(f"gs://{bucket.name}/runs/x/export")
    assert labels["class_names"] == ["x", "y"] and reloaded.output_shape == (None, 2)


@pytest.mark.slow
def test_export_of_the_real_classifier_loads_in_safe_mode(tmp_path):
    """The nested Lite0 backbone survives .keras (safe_mode) and SavedModel export."""
    import tensorflow as tf

    from carclassifier.config import ModelConfig
    from carclassifier.model import build_classifier

    model = build_classifier(ModelConfig(backbone="efficientnet_lite0", weights=None), 3, SIZE)
    out = write_export(model, CLASSES, tmp_path / "export", {"backbone": "efficientnet_lite0"})
    loaded, labels = load_exported(out)
    assert labels["metadata"]["backbone"] == "efficientnet_lite0"
    x = _pixels(2)
    expected = model.predict_on_batch(x)
    np.testing.assert_allclose(loaded.predict_on_batch(x), expected, atol=1e-6, rtol=0)
    serving = tf.saved_model.load(str(out / "saved_model" / "1")).signatures["serving_default"]
    np.testing.assert_allclose(
        serving(image=tf.constant(x))["output_0"].numpy(), expected, atol=1e-6, rtol=0
    )


# --------------------------------------------------------------------------- the recipe's TTA


def test_the_recipes_tta_gives_the_same_numbers_in_evaluate_predict_and_serving(model, tmp_path):
    """An export of the B6 recipe (8 TTA views, seed 42) records its TTA; evaluation,
    ``carclassifier predict --tta`` (no --config) and the server's ``?tta=1`` (no --tta-views)
    then average the very same views of a photo."""
    from carclassifier.augment import TtaSettings
    from carclassifier.cli import main
    from carclassifier.config import load_config
    from carclassifier.evaluate import evaluate_classifier
    from carclassifier.serving.app import create_app
    from carclassifier.serving.config import ServingConfig
    from carclassifier.serving.predictor import Predictor

    config = load_config("configs/recipe_b6.yaml")
    assert (config.augment.tta_views, config.data.seed) == (8, 42)
    photo = write_image(tmp_path / "photos" / "car.jpg", (90, 60), seed=5)
    export = write_export(
        model, CLASSES, tmp_path / "export", onnx=False, tta=TtaSettings.from_config(config)
    )
    recorded = json.loads((export / "labels.json").read_text())["tta"]
    assert recorded == {"transforms": config.augment.tta, "views": 8, "seed": 42}

    frame = pd.DataFrame({"path": ["car.jpg"], "label": [0]})
    evaluate_classifier(model, photo.parent, frame, CLASSES, config, tmp_path / "eval", False)
    evaluated = pd.read_csv(tmp_path / "eval" / "predictions_val.csv").iloc[0]

    out = tmp_path / "predicted.csv"
    argv = ["predict", "--model", str(export), "--images", str(photo.parent), "--output", str(out)]
    assert main([*argv, "--tta", "--format", "full"]) == 0
    row = pd.read_csv(out).iloc[0]
    predicted = {row[f"top{k}_class"]: row[f"top{k}_prob"] for k in (1, 2, 3)}

    client = create_app(ServingConfig(model=str(export)), Predictor.load(export, "keras"))
    with photo.open("rb") as handle:
        body = (
            client.test_client()
            .post("/v1/predict?tta=1&top_k=3", data={"file": [(handle, "car.jpg")]})
            .json
        )
    served = {t["class"]: t["probability"] for t in body["predictions"][0]["top"]}

    assert body["tta_views"] == 8
    assert evaluated["predicted_tta_class"] == row["top1_class"] == max(served, key=served.get)
    np.testing.assert_allclose(evaluated["prob_tta"], predicted[row["top1_class"]], atol=1e-6)
    np.testing.assert_allclose(
        [predicted[c] for c in CLASSES], [served[c] for c in CLASSES], atol=1e-6
    )
    assert abs(evaluated["prob_tta"] - evaluated["prob"]) > 1e-4  # the views changed something


def test_an_export_with_a_broken_tta_record_is_refused(model, tmp_path):
    export = write_export(model, CLASSES, tmp_path / "export", onnx=False)
    labels = json.loads((export / "labels.json").read_text())
    assert "tta" not in labels  # no TTA given: readers use the library's
    labels["tta"] = {"transforms": [], "views": 0, "seed": 1}
    (export / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(StorageError, match="tta_views"):
        load_exported(export)
