"""albumentations pipelines built from config: training augmentation, validation and TTA.

A transform in config is one mapping ``{ClassName: {params}}`` naming an albumentations class
or one of this module's own (`CUSTOM_TRANSFORMS`: `ZoomOut`); ``OneOf``/``SomeOf``/``Sequential``
take nested ``transforms``. Size parameters left out
(``size`` of RandomResizedCrop, ``height``/``width`` of Resize) are filled with the run's image
size. Every pipeline ends at exactly ``image_size x image_size`` and yields uint8 RGB; pixel
normalization belongs to the backbone and happens inside the model.

`TtaSettings` is what test-time augmentation needs besides the model (the ``augment.tta``
transforms, the number of views, the seed); an export records the recipe's in ``labels.json``
so that evaluation, ``carclassifier predict --tta`` and the server's ``?tta=1`` make the same
views of the same photo.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
from albumentations.core.composition import BaseCompose
from pydantic import ValidationError

from carclassifier.config import MAX_SEED, AugmentConfig, RunConfig, TransformSpec
from carclassifier.errors import ConfigError, one_line


class ZoomOut(A.ImageOnlyTransform):
    """The photo shrunk to a side fraction drawn from ``scale_range`` and placed in a frame of
    its own size, in the centre (``position="centre"``) or at a random place (``"random"``);
    the frame is the shrunk photo's reflection (reflect-101 border, repeated where the margin
    is wider than the photo) blurred with sigma = ``sigma`` x the longer side, a plausible
    background without a hard edge or a mirrored sharp car.

    The robustness report's ``zoom_out`` shift is this transform at one fraction, centred; the
    ``uncropped`` augmentation preset uses it at random fractions and places.
    """

    def __init__(
        self,
        scale_range: tuple[float, float] = (0.5, 1.0),
        position: Literal["centre", "random"] = "random",
        sigma: float = 0.04,
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        low, high = (float(v) for v in scale_range)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"ZoomOut scale_range must be 0 < low <= high <= 1, got {scale_range}")
        if position not in ("centre", "random"):
            raise ValueError(f"ZoomOut position must be 'centre' or 'random', got {position!r}")
        if sigma < 0:
            raise ValueError(f"ZoomOut sigma must be >= 0 (a share of the side), got {sigma}")
        self.scale_range, self.position, self.sigma = (low, high), position, float(sigma)

    def get_params(self) -> dict[str, float]:
        """The side fraction and, for a random position, where the photo goes (0-1 each way)."""
        fraction = self.py_random.uniform(*self.scale_range)
        if self.position == "centre":
            return {"fraction": fraction, "x": -1.0, "y": -1.0}
        return {"fraction": fraction, "x": self.py_random.random(), "y": self.py_random.random()}

    def apply(
        self,
        img: np.ndarray,
        fraction: float = 1.0,
        x: float = -1.0,
        y: float = -1.0,
        **params: Any,
    ) -> np.ndarray:
        height, width = img.shape[:2]
        small_h, small_w = max(1, round(height * fraction)), max(1, round(width * fraction))
        if (small_h, small_w) == (height, width):
            return img
        small = cv2.resize(img, (small_w, small_h), interpolation=cv2.INTER_AREA)
        if x < 0:  # centred
            top, left = (height - small_h) // 2, (width - small_w) // 2
        else:
            top, left = round(y * (height - small_h)), round(x * (width - small_w))
        framed = cv2.copyMakeBorder(
            small, top, height - small_h - top, left, width - small_w - left, cv2.BORDER_REFLECT_101
        )
        sigma = self.sigma * max(height, width)
        background = cv2.GaussianBlur(framed, (0, 0), sigma) if sigma > 0 else framed
        background[top : top + small_h, left : left + small_w] = small
        return background

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale_range", "position", "sigma")


CUSTOM_TRANSFORMS: dict[str, type] = {"ZoomOut": ZoomOut}
"""Transforms of this project that a config may name besides albumentations' own."""


def _transform_class(name: str) -> type:
    cls = CUSTOM_TRANSFORMS.get(name) or getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform | BaseCompose)):
        raise ConfigError(
            f"augment: {name!r} is not an albumentations transform "
            f"(albumentations {A.__version__}; see its docs for names like HorizontalFlip) "
            f"nor one of carclassifier's own {sorted(CUSTOM_TRANSFORMS)}"
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


@dataclass(frozen=True)
class TtaSettings:
    """How test-time-augmented views are made: the albumentations ``transforms`` (the config's
    ``augment.tta``), ``views`` per image (view 0 the image itself) and the ``seed`` the
    transform is drawn with. The defaults are the library's (`AugmentConfig`, seed 0)."""

    transforms: list[TransformSpec] = field(default_factory=lambda: AugmentConfig().tta)
    views: int = AugmentConfig.model_fields["tta_views"].default
    seed: int = 0

    @classmethod
    def from_config(cls, config: RunConfig) -> TtaSettings:
        """The recipe's TTA: ``augment.tta``, ``augment.tta_views``, seeded with ``data.seed``
        (what `carclassifier.evaluate.evaluate_classifier` uses)."""
        return cls(list(config.augment.tta), config.augment.tta_views, config.data.seed)

    @classmethod
    def from_document(cls, value: Any, source: str) -> TtaSettings:
        """Settings read back from `to_document`'s form (an export's ``labels.json``), checked as
        the config checks them; `ConfigError` naming ``source`` otherwise."""
        if not isinstance(value, dict) or set(value) != {"transforms", "views", "seed"}:
            raise ConfigError(
                f"{source}: tta must be a mapping of transforms, views and seed; re-export the model"
            )
        try:
            augment = AugmentConfig(tta=value["transforms"], tta_views=value["views"])
        except ValidationError as exc:
            raise ConfigError(
                f"{source}: invalid tta ({one_line(exc)}); re-export the model"
            ) from None
        seed = value["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"{source}: tta seed {seed!r} must be a whole number 0..{MAX_SEED}")
        return cls(augment.tta, augment.tta_views, seed)

    def to_document(self) -> dict[str, Any]:
        """The settings as JSON-ready data (``transforms``, ``views``, ``seed``)."""
        return {"transforms": self.transforms, "views": self.views, "seed": self.seed}

    def overridden(self, views: int | None = None, seed: int | None = None) -> TtaSettings:
        """The same settings with ``views`` and/or ``seed`` replaced (None keeps them)."""
        return replace(
            self,
            views=self.views if views is None else views,
            seed=self.seed if seed is None else seed,
        )

    def transform(self, image_size: int) -> A.Compose | None:
        """The view transform for ``image_size`` px, seeded with `seed`; None for one view."""
        return _compose(self.transforms, image_size, self.seed) if self.views > 1 else None
