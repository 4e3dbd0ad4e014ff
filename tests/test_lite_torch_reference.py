"""The Keras Lite0/1/2 port agrees with the torch reference implementation on the same weights.

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

from carclassifier.backbones import efficientnet_lite, get_backbone  # noqa: E402
from carclassifier.backbones.lite import imagenet_weights_path  # noqa: E402
from carclassifier.backbones.torch_legacy import read_legacy_state_dict  # noqa: E402

TOLERANCE = 1e-3
LITE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def photos(size: int) -> np.ndarray:
    """chelsea and coffee, PIL-bilinear resized, raw RGB 0..255 float32, NHWC."""
    images = [
        Image.fromarray(getattr(skimage.data, name)()).resize((size, size), Image.BILINEAR)
        for name in ("chelsea", "coffee")
    ]
    return np.stack([np.asarray(image, dtype=np.float32) for image in images])


def reference(variant: str, size: int):  # noqa: ANN201 - an efficientnet_lite_pytorch.EfficientNet
    """The torch model with the same weights; its 'same' padding is computed for ``size``."""
    model = efficientnet_lite_pytorch.EfficientNet.from_name(
        variant.replace("_", "-"), image_size=size
    )
    state = torch.load(imagenet_weights_path(variant), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("variant", LITE)
def test_reader_is_bit_identical_to_torch_load(variant: str) -> None:
    expected = torch.load(imagenet_weights_path(variant), map_location="cpu", weights_only=True)
    ours = read_legacy_state_dict(imagenet_weights_path(variant))
    assert list(ours) == list(expected)
    for key, tensor in expected.items():
        array = tensor.numpy()
        assert ours[key].dtype == array.dtype and ours[key].shape == array.shape, key
        assert ours[key].tobytes() == array.tobytes(), key


@pytest.mark.slow
@pytest.mark.parametrize("variant", LITE)
def test_keras_matches_torch(variant: str) -> None:
    size = get_backbone(variant).default_image_size
    batch = photos(size)
    classifier = efficientnet_lite(variant, include_top=True, classifier_activation=None)
    pooled = keras.Model(classifier.input, classifier.get_layer("avg_pool").output)
    keras_logits = classifier.predict(batch, verbose=0)
    keras_pooled = pooled.predict(batch, verbose=0)

    torch_model = reference(variant, size)
    nchw = torch.from_numpy((batch - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        torch_logits = torch_model(nchw).numpy()
        torch_pooled = torch_model.extract_features(nchw).mean(dim=(2, 3)).numpy()

    logit_diff = float(np.abs(keras_logits - torch_logits).max())
    pooled_diff = float(np.abs(keras_pooled - torch_pooled).max())
    print(
        f"{variant} at {size} px: max |logit diff| {logit_diff:.2e}, "
        f"max |pooled feature diff| {pooled_diff:.2e}"
    )
    assert logit_diff < TOLERANCE
    assert pooled_diff < TOLERANCE
    assert list(torch_logits.argmax(axis=1)) == [285, 967]
    assert list(keras_logits.argmax(axis=1)) == [285, 967]
