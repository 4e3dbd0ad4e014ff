"""EfficientNet-Lite0 in Keras with the embedded ImageNet weights, and the backbone registry."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import skimage.data
from PIL import Image

from carclassifier.backbones import (
    available_backbones,
    build_backbone,
    efficientnet_lite0,
    get_backbone,
)
from carclassifier.errors import BackboneError

EGYPTIAN_CAT, ESPRESSO = 285, 967


def photo(name: str, size: int = 224) -> np.ndarray:
    """A bundled skimage photo resized (PIL bilinear) to size x size, raw RGB 0..255 float32."""
    image = Image.fromarray(getattr(skimage.data, name)()).resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


@pytest.fixture(scope="module")
def classifier() -> keras.Model:
    return efficientnet_lite0(include_top=True, classifier_activation=None)


@pytest.fixture(scope="module")
def features() -> keras.Model:
    return build_backbone("efficientnet_lite0", 224)


@pytest.mark.slow
def test_imagenet_weights_classify_photos(classifier: keras.Model) -> None:
    batch = np.stack([photo("chelsea"), photo("coffee")])
    logits = classifier.predict(batch, verbose=0)
    assert logits.shape == (2, 1000)
    assert list(logits.argmax(axis=1)) == [EGYPTIAN_CAT, ESPRESSO]


def test_layout_and_feature_shape(classifier: keras.Model, features: keras.Model) -> None:
    assert features.output.shape == (None, 7, 7, 1280)
    assert features.input.shape == (None, 224, 224, 3)
    names = {layer.name for layer in classifier.layers}
    assert {"lite0_preprocess", "stem_conv", "block1a_dwconv", "block6d_add", "top_conv"} <= names
    assert {"avg_pool", "top_dropout", "predictions"} <= names
    assert "block1a_expand_conv" not in names and "block7b_dwconv" not in names
    blocks = {n.split("_")[0] for n in names if n.startswith("block")}
    assert len(blocks) == 16
    assert classifier.count_params() == 4_694_073 - 49  # all but num_batches_tracked


# Keras' own save_weights trips a numpy 2 DeprecationWarning on TF tensors (not ours).
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_weights_round_trip(features: keras.Model, tmp_path: Path) -> None:
    path = tmp_path / "lite0.weights.h5"
    features.save_weights(path)
    # Weights do not depend on the input size, so a small model takes them too.
    again = build_backbone("efficientnet_lite0", 64, weights=str(path))
    for a, b in zip(features.weights, again.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_random_init_and_bad_arguments(tmp_path: Path) -> None:
    model = efficientnet_lite0(input_shape=(32, 64, 3), weights=None, pooling="avg")
    assert model.output.shape == (None, 1280)
    with pytest.raises(BackboneError, match="multiple of 32"):
        build_backbone("efficientnet_lite0", 100)
    with pytest.raises(BackboneError, match="multiples of 32"):
        efficientnet_lite0(input_shape=(16, 16, 3), weights=None)
    with pytest.raises(BackboneError, match="efficientnet_lite0"):
        get_backbone("resnet50")
    with pytest.raises(BackboneError, match="does not exist"):
        efficientnet_lite0(weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(BackboneError, match=".weights.h5"):
        efficientnet_lite0(weights="imagenet21k")
    with pytest.raises(BackboneError, match="does not exist"):
        build_backbone("efficientnet_b0", 224, weights=str(tmp_path / "missing.weights.h5"))


def test_registry() -> None:
    expected = [f"efficientnet_b{i}" for i in range(8)] + [
        "efficientnet_lite0",
        "efficientnet_v2_l",
        "efficientnet_v2_m",
        "efficientnet_v2_s",
    ]
    assert available_backbones() == expected
    lite0 = get_backbone("efficientnet_lite0")
    assert lite0.offline_weights and lite0.default_image_size == 224 and lite0.size_multiple == 32
    assert not get_backbone("efficientnet_v2_s").offline_weights


@pytest.mark.slow
def test_keras_application_builds() -> None:
    model = build_backbone("efficientnet_b0", 64, weights=None)
    assert model.output.shape == (None, 2, 2, 1280)
    assert model.input.shape == (None, 64, 64, 3)


def test_every_default_image_size_is_valid_for_its_backbone():
    from carclassifier.backbones import available_backbones, get_backbone

    for name in available_backbones():
        spec = get_backbone(name)
        assert spec.default_image_size % spec.size_multiple == 0, name


def test_random_weights_follow_the_global_seed():
    """weights=None: the same seed gives the same initial weights, another seed other ones (a
    resumed or repeated stage with random weights starts where the first one did)."""

    def first_weights(seed: int) -> np.ndarray:
        keras.utils.set_random_seed(seed)
        model = efficientnet_lite0(input_shape=(32, 32, 3), weights=None)
        return np.concatenate([w.ravel() for w in model.get_weights()[:4]])

    np.testing.assert_array_equal(first_weights(7), first_weights(7))
    assert not np.array_equal(first_weights(7), first_weights(8))
