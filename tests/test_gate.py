"""Champion/challenger: promote only a model that beats the champion on the same images, by more
than noise (McNemar's exact test), with no class falling behind and its export formats agreeing."""

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from carclassifier.export import write_export
from carclassifier.gate import ModelResult, champion_challenger, compare, mcnemar_exact

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
    assert first.promoted and first.reason == "no champion yet"
    assert first.challenger_accuracy == 0.0
    assert json.loads(open(pointer).read())["export"] == exports["bad"]

    better = champion_challenger(exports["good"], root, frame, CLASSES, pointer)
    assert better.promoted and better.champion_accuracy == 0.0
    assert better.challenger_accuracy == 1.0
    # 9 photos only the challenger gets right, none only the champion: p = 0.5 ** 9
    assert (better.challenger_only, better.champion_only) == (9, 0)
    assert better.p_value == pytest.approx(0.5**9)

    worse = champion_challenger(exports["bad"], root, frame, CLASSES, pointer)
    assert not worse.promoted and worse.champion_accuracy == 1.0
    tie = champion_challenger(exports["good"], root, frame, CLASSES, pointer)
    assert not tie.promoted  # must beat, not equal, the champion
    assert json.loads(open(pointer).read())["export"] == exports["good"]


def test_different_class_lists_are_never_promoted_automatically(colour_data, exports, tmp_path):
    root, frame = colour_data
    pointer = str(tmp_path / "champion.json")
    champion_challenger(exports["bad"], root, frame, CLASSES, pointer)
    decision = champion_challenger(exports["other_classes"], root, frame, CLASSES, pointer)
    assert not decision.promoted and "class lists differ" in decision.reason


@pytest.mark.parametrize("only_new, only_old", [(9, 0), (7, 2), (12, 5), (3, 3), (1, 6), (30, 18)])
def test_mcnemar_exact_matches_statsmodels(only_new, only_old):
    """One-sided exact McNemar p-values against statsmodels' two-sided exact test
    (statsmodels.stats.contingency_tables.mcnemar, exact=True: 2 x the smaller binomial tail,
    capped at 1): for b >= c the two-sided value is twice ours, else ours is the larger tail."""
    from scipy.stats import binom
    from statsmodels.stats.contingency_tables import mcnemar

    ours = mcnemar_exact(only_new, only_old)
    two_sided = mcnemar([[50, only_old], [only_new, 50]], exact=True).pvalue
    n = only_new + only_old
    assert ours == pytest.approx(binom.sf(only_new - 1, n, 0.5))  # P(X >= b)
    if only_new > only_old:
        assert two_sided == pytest.approx(min(1.0, 2 * ours))
    else:
        assert ours >= 0.5 and two_sided == pytest.approx(
            min(1.0, 2 * (1 - ours + binom.pmf(only_new, n, 0.5)))
        )
    assert mcnemar_exact(0, 0) == 1.0


def _result(predicted, labels, num_classes=3):
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    recalls = [float(np.mean(predicted[labels == k] == k)) for k in range(num_classes)]
    return ModelResult(
        "x", float(np.mean(predicted == labels)), (0.0, 1.0), recalls, list(predicted)
    )


def test_one_photo_better_on_150_is_noise_not_progress():
    """0.7 points more accuracy (one photo of 150) is what retraining on the same data gives by
    chance: kept, with the reason saying so; 20 more photos right is promoted."""
    labels = np.arange(150) % 3
    champion = labels.copy()
    champion[:10] = (labels[:10] + 1) % 3  # 140 of 150 right
    one_better = champion.copy()
    one_better[0] = labels[0]  # 141 of 150
    decision = compare(_result(one_better, labels), _result(champion, labels), labels, CLASSES)
    assert not decision.promoted and "within noise" in decision.reason
    assert decision.p_value == pytest.approx(0.5)

    much_better = labels.copy()
    much_better[100:102] = (labels[100:102] + 1) % 3  # 148 right: 10 gained, 2 lost
    decision = compare(_result(much_better, labels), _result(champion, labels), labels, CLASSES)
    assert decision.promoted, decision.reason
    assert (decision.challenger_only, decision.champion_only) == (10, 2)


def test_a_class_that_falls_behind_blocks_promotion():
    """Better overall, significantly, but one class loses more recall than allowed: kept."""
    labels = np.arange(150) % 3
    champion = labels.copy()
    champion[:60] = np.where(labels[:60] == 2, 2, (labels[:60] + 1) % 3)  # 40 wrong, none blue
    challenger = labels.copy()
    blue = np.flatnonzero(labels == 2)[:8]
    challenger[blue] = 0  # 8 blue photos now wrong: blue recall 1.0 -> 0.84
    decision = compare(_result(challenger, labels), _result(champion, labels), labels, CLASSES)
    assert decision.challenger.accuracy > decision.champion.accuracy
    assert decision.p_value < 0.05
    assert not decision.promoted and "recall of blue falls by 0.160" in decision.reason
    assert compare(
        _result(challenger, labels), _result(champion, labels), labels, CLASSES,
        max_recall_drop=0.2,
    ).promoted  # fmt: skip


def test_export_formats_that_disagree_are_never_promoted(colour_data, exports, tmp_path):
    """The challenger's model.onnx (what serving uses first) must answer as its model.keras on
    the gate's photos: an export whose ONNX file is another model's is kept out."""
    root, frame = colour_data
    good = exports["good"]
    if not (Path(good) / "model.onnx").is_file():
        pytest.skip("the ONNX conversion is not available here")
    decision = champion_challenger(good, root, frame, CLASSES, str(tmp_path / "a.json"))
    assert decision.promoted and decision.formats_difference < 1e-4
    mixed = tmp_path / "mixed"
    shutil.copytree(good, mixed)
    shutil.copy(Path(exports["bad"]) / "model.onnx", mixed / "model.onnx")
    decision = champion_challenger(str(mixed), root, frame, CLASSES, str(tmp_path / "b.json"))
    assert not decision.promoted and "model.onnx and model.keras differ" in decision.reason
    assert decision.formats_difference > 0.1
    assert not (tmp_path / "b.json").exists()
