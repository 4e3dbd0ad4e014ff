"""A small, timm-style registry of image backbones by name.

Every registered backbone takes raw RGB pixels in 0..255 (float) and does its own preprocessing,
so callers never normalize images themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import keras

from carclassifier.backbones.lite import (
    VARIANTS,
    efficientnet_lite0,
    efficientnet_lite1,
    efficientnet_lite2,
)
from carclassifier.config import SIZE_MULTIPLE, check_image_size
from carclassifier.errors import BackboneError, StorageError
from carclassifier.storage import local_copy

PREPROCESSING_INSIDE = "inside the model: raw RGB 0-255 in"


@dataclass(frozen=True)
class BackboneSpec:
    """What the project needs to know about a backbone.

    ``builder(input_shape=..., include_top=False, weights=...)`` returns a ``keras.Model``.
    """

    name: str
    builder: Callable[..., keras.Model]
    default_image_size: int
    size_multiple: int  # input sizes must be multiples of this (a project rule)
    offline_weights: bool  # True when weights="imagenet" needs no network
    preprocessing: str  # human text, e.g. "inside the model: raw RGB 0-255 in"


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry (replacing one of the same name) and return it."""
    _REGISTRY[spec.name] = spec
    return spec


def available_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    """The spec registered as ``name``; `BackboneError` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackboneError(
            f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}"
        ) from None


def build_backbone(
    name: str, image_size: int, weights: str | os.PathLike[str] | None = "imagenet"
) -> keras.Model:
    """Build backbone ``name`` as a feature extractor for square ``image_size`` inputs.

    The model takes raw RGB 0..255 floats of shape (image_size, image_size, 3) and outputs the
    last 4-D feature map (before pooling). ``weights``: ``"imagenet"``, ``None`` (random), or a
    local path / ``gs://`` URI of a weights file for that architecture.
    """
    spec = get_backbone(name)
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise BackboneError(f"image_size={image_size!r} must be a whole number of pixels")
    try:
        check_image_size(image_size, spec.size_multiple)
    except ValueError as exc:
        raise BackboneError(f"image_size={image_size} for {name}: {exc}") from None
    return spec.builder(input_shape=(image_size, image_size, 3), include_top=False, weights=weights)


def _keras_weights(weights: str | os.PathLike[str] | None) -> str | None:
    """``weights`` as keras.applications takes it: "imagenet", None, or a local file path."""
    if weights is None or str(weights) == "imagenet":
        return None if weights is None else "imagenet"
    if not isinstance(weights, str | os.PathLike):
        raise BackboneError(f"weights={weights!r}: use 'imagenet', None, or a path / gs:// URI")
    try:
        return str(local_copy(weights))
    except StorageError as exc:
        raise BackboneError(f"cannot use weights {weights}: {exc}") from exc


def _keras_app_builder(
    app: Callable[..., keras.Model], **extra: object
) -> Callable[..., keras.Model]:
    """Wrap a ``keras.applications`` constructor into the registry's builder signature."""

    def build(
        input_shape: tuple[int, int, int] = (224, 224, 3),
        include_top: bool = False,
        weights: str | os.PathLike[str] | None = "imagenet",
    ) -> keras.Model:
        resolved = _keras_weights(weights)
        try:
            return app(include_top=include_top, weights=resolved, input_shape=input_shape, **extra)
        except ValueError as exc:
            raise BackboneError(
                f"cannot build {app.__name__} with weights={weights}: {exc}"
            ) from exc

    build.__doc__ = f"Build keras.applications.{app.__name__} (raw RGB 0-255 in)."
    return build


def _register_defaults() -> None:
    apps = keras.applications
    # keras.applications' native sizes (224, 240, 260, 300, 380, 456, 528, 600) rounded to the
    # nearest multiple of 32, the stride of the network; the recipe itself uses 224 and 448.
    b_sizes = (224, 256, 256, 288, 384, 448, 512, 608)
    for i, size in enumerate(b_sizes):
        register_backbone(
            BackboneSpec(
                name=f"efficientnet_b{i}",
                builder=_keras_app_builder(getattr(apps, f"EfficientNetB{i}")),
                default_image_size=size,
                size_multiple=SIZE_MULTIPLE,
                offline_weights=False,
                preprocessing=PREPROCESSING_INSIDE,
            )
        )
    for variant, size in (("s", 384), ("m", 480), ("l", 480)):
        register_backbone(
            BackboneSpec(
                name=f"efficientnet_v2_{variant}",
                builder=_keras_app_builder(
                    getattr(apps, f"EfficientNetV2{variant.upper()}"), include_preprocessing=True
                ),
                default_image_size=size,
                size_multiple=SIZE_MULTIPLE,
                offline_weights=False,
                preprocessing=PREPROCESSING_INSIDE,
            )
        )
    lite_builders = (efficientnet_lite0, efficientnet_lite1, efficientnet_lite2)
    for builder in lite_builders:
        register_backbone(
            BackboneSpec(
                name=builder.__name__,
                builder=builder,
                default_image_size=VARIANTS[builder.__name__].default_image_size,
                size_multiple=SIZE_MULTIPLE,
                offline_weights=True,
                preprocessing=PREPROCESSING_INSIDE,
            )
        )


_register_defaults()
