"""The Keras Lite0 port agrees with the torch reference implementation on the same weights.

Needs the optional extra ``torch-reference`` (torch, efficientnet_lite_pytorch); skipped without.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import skimage.data
from PIL import Image

torch = pytest.importorskip("torch")
efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")

from carclassifier.backbones import efficientnet_lite0  # noqa: E402
from carclassifier.backbones.lite0 import imagenet_weights_path  # noqa: E402
from carclassifier.backbones.torch_legacy import read_legacy_state_dict  # noqa: E402

TOLERANCE = 1e-3


def photos(size: int = 224) -> np.ndarray:
    """chelsea and coffee, PIL-bilinear resized, raw RGB 0..255 float32, NHWC."""
    images = [
        Image.fromarray(getattr(skimage.data, name)()).resize((size, size), Image.BILINEAR)
        for name in ("chelsea", "coffee")
    ]
    return np.stack([np.asarray(image, dtype=np.float32) for image in images])


@pytest.fixture(scope="module")
def reference():  # noqa: ANN201 - an efficientnet_lite_pytorch.EfficientNet
    model = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_reader_is_bit_identical_to_torch_load() -> None:
    expected = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    ours = read_legacy_state_dict(imagenet_weights_path())
    assert list(ours) == list(expected)
    for key, tensor in expected.items():
        array = tensor.numpy()
        assert ours[key].dtype == array.dtype and ours[key].shape == array.shape, key
        assert ours[key].tobytes() == array.tobytes(), key


@pytest.mark.slow
def test_keras_matches_torch(reference) -> None:  # noqa: ANN001
    batch = photos()
    classifier = efficientnet_lite0(include_top=True, classifier_activation=None)
    pooled = keras.Model(classifier.input, classifier.get_layer("avg_pool").output)
    keras_logits = classifier.predict(batch, verbose=0)
    keras_pooled = pooled.predict(batch, verbose=0)

    nchw = torch.from_numpy((batch - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        torch_logits = reference(nchw).numpy()
        torch_pooled = reference.extract_features(nchw).mean(dim=(2, 3)).numpy()

    logit_diff = float(np.abs(keras_logits - torch_logits).max())
    pooled_diff = float(np.abs(keras_pooled - torch_pooled).max())
    print(f"max |logit diff| {logit_diff:.2e}, max |pooled feature diff| {pooled_diff:.2e}")
    assert logit_diff < TOLERANCE
    assert pooled_diff < TOLERANCE
    assert list(torch_logits.argmax(axis=1)) == [285, 967]
    assert list(keras_logits.argmax(axis=1)) == [285, 967]
