"""EfficientNet-Lite0/1/2 in Keras with the embedded ImageNet weights, and the backbone registry."""

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
    efficientnet_lite,
    efficientnet_lite0,
    get_backbone,
)
from carclassifier.backbones.lite import round_filters, round_repeats
from carclassifier.errors import BackboneError

EGYPTIAN_CAT, ESPRESSO = 285, 967
LITE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
# Per variant: default size, blocks, last block of stage 6, last stage's channels, and the
# parameter count: the torch state dict's numbers less one num_batches_tracked per BN layer.
LAYOUT = {
    "efficientnet_lite0": (224, 16, "block6d", 320, 4_694_073 - 49),
    "efficientnet_lite1": (256, 21, "block6e", 320, 5_470_408 - 64),
    "efficientnet_lite2": (256, 21, "block6e", 352, 6_150_232 - 64),
}


def photo(name: str, size: int = 224) -> np.ndarray:
    """A bundled skimage photo resized (PIL bilinear) to size x size, raw RGB 0..255 float32."""
    image = Image.fromarray(getattr(skimage.data, name)()).resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


@pytest.fixture(scope="module", params=LITE)
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def classifier(variant: str) -> keras.Model:
    """The variant with its ImageNet top, at its default size, giving logits."""
    return efficientnet_lite(variant, include_top=True, classifier_activation=None)


@pytest.fixture(scope="module")
def features(variant: str) -> keras.Model:
    return build_backbone(variant, get_backbone(variant).default_image_size)


@pytest.mark.slow
def test_imagenet_weights_classify_photos(classifier: keras.Model) -> None:
    size = classifier.input.shape[1]
    batch = np.stack([photo("chelsea", size), photo("coffee", size)])
    logits = classifier.predict(batch, verbose=0)
    assert logits.shape == (2, 1000)
    assert list(logits.argmax(axis=1)) == [EGYPTIAN_CAT, ESPRESSO]


def test_layout_and_feature_shape(
    variant: str, classifier: keras.Model, features: keras.Model
) -> None:
    size, n_blocks, last_of_stage_6, top_in, params = LAYOUT[variant]
    assert get_backbone(variant).default_image_size == size
    assert features.output.shape == (None, size // 32, size // 32, 1280)
    assert features.input.shape == (None, size, size, 3)
    names = {layer.name for layer in classifier.layers}
    short = variant.removeprefix("efficientnet_")
    assert {f"{short}_preprocess", "stem_conv", "block1a_dwconv", "top_conv"} <= names
    assert f"{last_of_stage_6}_add" in names
    assert {"avg_pool", "top_dropout", "predictions"} <= names
    assert "block1a_expand_conv" not in names and "block7b_dwconv" not in names
    blocks = {n.split("_")[0] for n in names if n.startswith("block")}
    assert len(blocks) == n_blocks
    assert classifier.get_layer("top_conv").kernel.shape == (1, 1, top_in, 1280)
    assert classifier.get_layer("stem_conv").kernel.shape == (3, 3, 3, 32)
    assert classifier.count_params() == params  # all but num_batches_tracked


def test_scaling_rules_match_the_reference_table() -> None:
    """round_filters / round_repeats as efficientnet_lite_pytorch.utils computes them."""
    b0_filters = (16, 24, 40, 80, 112, 192, 320)
    assert [round_filters(f, 1.1) for f in b0_filters] == [16, 24, 48, 88, 120, 208, 352]
    assert [round_filters(f, 1.0) for f in b0_filters] == list(b0_filters)
    assert [round_repeats(r, 1.1) for r in (2, 2, 3, 3, 4)] == [3, 3, 4, 4, 5]
    assert [round_repeats(r, 1.2) for r in (2, 2, 3, 3, 4)] == [3, 3, 4, 4, 5]


# Keras' own save_weights trips a numpy 2 DeprecationWarning on TF tensors (not ours).
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_weights_round_trip(variant: str, features: keras.Model, tmp_path: Path) -> None:
    path = tmp_path / f"{variant}.weights.h5"
    features.save_weights(path)
    # Weights do not depend on the input size, so a small model takes them too.
    again = build_backbone(variant, 64, weights=str(path))
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
    with pytest.raises(BackboneError, match="efficientnet_lite2"):
        efficientnet_lite("efficientnet_lite3", weights=None)


# Keras warns about every layer of the file it cannot place before the shape error.
@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_another_variants_weights_file_is_refused(tmp_path: Path) -> None:
    lite0_weights = tmp_path / "lite0.weights.h5"
    efficientnet_lite0(input_shape=(32, 32, 3), weights=None).save_weights(lite0_weights)
    with pytest.raises(BackboneError, match="does not fit efficientnet_lite1"):
        build_backbone("efficientnet_lite1", 32, weights=str(lite0_weights))


def test_registry() -> None:
    expected = [f"efficientnet_b{i}" for i in range(8)] + [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "efficientnet_v2_l",
        "efficientnet_v2_m",
        "efficientnet_v2_s",
    ]
    assert available_backbones() == expected
    for name in LITE:
        spec = get_backbone(name)
        assert spec.offline_weights and spec.size_multiple == 32
        assert spec.default_image_size == LAYOUT[name][0]
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
