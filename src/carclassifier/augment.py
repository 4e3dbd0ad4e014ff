"""albumentations pipelines built from config: training augmentation, validation and TTA.

A transform in config is one mapping ``{ClassName: {params}}`` naming an albumentations class;
``OneOf``/``SomeOf``/``Sequential`` take nested ``transforms``. Size parameters left out
(``size`` of RandomResizedCrop, ``height``/``width`` of Resize) are filled with the run's image
size. Every pipeline ends at exactly ``image_size x image_size`` and yields uint8 RGB; pixel
normalization belongs to the backbone and happens inside the model.
"""

from __future__ import annotations

import inspect
from typing import Any

import albumentations as A
from albumentations.core.composition import BaseCompose

from carclassifier.config import AugmentConfig, TransformSpec
from carclassifier.errors import ConfigError


def _transform_class(name: str) -> type:
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform | BaseCompose)):
        raise ConfigError(
            f"augment: {name!r} is not an albumentations transform "
            f"(albumentations {A.__version__}; see its docs for names like HorizontalFlip)"
        )
    return cls


def build_transform(spec: TransformSpec, image_size: int) -> Any:
    """Build one albumentations transform (recursively for compositions) from its config."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"augment: {spec!r} must be one mapping {{Name: {{params}}}}")
    ((name, params),) = spec.items()
    cls = _transform_class(name)
    params = dict(params or {})
    accepted = inspect.signature(cls).parameters
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"augment: {name} has no parameter(s) {unknown}; it takes {sorted(accepted)}"
        )
    if "transforms" in params:
        params["transforms"] = [build_transform(s, image_size) for s in params["transforms"]]
    if "size" in accepted and "size" not in params:
        params["size"] = (image_size, image_size)
    if {"height", "width"} <= set(accepted):
        params.setdefault("height", image_size)
        params.setdefault("width", image_size)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"augment: bad parameters for {name}: {exc}") from None


def _compose(specs: list[TransformSpec], image_size: int, seed: int | None) -> A.Compose:
    transforms = [build_transform(s, image_size) for s in specs]
    transforms.append(A.Resize(image_size, image_size))  # whatever came before, end at the size
    return A.Compose(transforms, seed=seed)


def train_transform(config: AugmentConfig, image_size: int, seed: int | None = None) -> A.Compose:
    """The training augmentation from ``config.train``."""
    return _compose(config.train, image_size, seed)


def val_transform(image_size: int) -> A.Compose:
    """Validation/inference: resize only (normalization happens inside the model)."""
    return A.Compose([A.Resize(image_size, image_size)])


def tta_transform(config: AugmentConfig, image_size: int, seed: int | None = None) -> A.Compose:
    """The mild augmentation applied to each test-time-augmentation view."""
    return _compose(config.tta, image_size, seed)
