"""Champion/challenger: promote only a model that beats the champion on the same images."""

import json

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from carclassifier.export import write_export
from carclassifier.gate import champion_challenger

CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    """Solid-colour images: the dominant channel is the class."""
    root = tmp_path_factory.mktemp("colours")
    rows = []
    for label, name in enumerate(CLASSES):
        for i in range(3):
            pixels = np.zeros((32, 32, 3), np.uint8)
            pixels[..., label] = 200 + i * 10
            (root / name).mkdir(exist_ok=True)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
            rows.append({"path": f"{name}/{i}.png", "label": label})
    return root, pd.DataFrame(rows)


def colour_model(permutation):
    """Predicts class permutation[dominant channel]: identity = perfect, a derangement = always wrong."""
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(3, activation="softmax")
    outputs = dense(x)
    model = keras.Model(inputs, outputs)
    kernel = np.zeros((3, 3), np.float32)
    for channel, label in enumerate(permutation):
        kernel[channel, label] = 0.1
    dense.set_weights([kernel, np.zeros(3, np.float32)])
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    base = tmp_path_factory.mktemp("exports")
    return {
        "good": str(write_export(colour_model([0, 1, 2]), CLASSES, base / "good")),
        "bad": str(write_export(colour_model([1, 2, 0]), CLASSES, base / "bad")),
        "other_classes": str(
            write_export(colour_model([0, 1, 2]), ["a", "b", "c"], base / "other")
        ),
    }


def test_first_model_becomes_champion_and_only_a_better_one_replaces_it(
    colour_data, exports, tmp_path
):
    root, frame = colour_data
    pointer = str(tmp_path / "champion.json")
    first = champion_challenger(exports["bad"], root, frame, CLASSES, pointer)
    assert first["promoted"] and first["reason"] == "no champion yet"
    assert first["challenger_accuracy"] == 0.0
    assert json.loads(open(pointer).read())["export"] == exports["bad"]

    better = champion_challenger(exports["good"], root, frame, CLASSES, pointer)
    assert better["promoted"] and better["champion_accuracy"] == 0.0
    assert better["challenger_accuracy"] == 1.0

    worse = champion_challenger(exports["bad"], root, frame, CLASSES, pointer)
    assert not worse["promoted"] and worse["champion_accuracy"] == 1.0
    tie = champion_challenger(exports["good"], root, frame, CLASSES, pointer)
    assert not tie["promoted"]  # must beat, not equal, the champion
    assert json.loads(open(pointer).read())["export"] == exports["good"]


def test_different_class_lists_are_never_promoted_automatically(colour_data, exports, tmp_path):
    root, frame = colour_data
    pointer = str(tmp_path / "champion.json")
    champion_challenger(exports["bad"], root, frame, CLASSES, pointer)
    decision = champion_challenger(exports["other_classes"], root, frame, CLASSES, pointer)
    assert not decision["promoted"] and "class lists differ" in decision["reason"]
