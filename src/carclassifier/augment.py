"""albumentations pipelines built from config: training augmentation, validation and TTA.

A transform in config is one mapping ``{ClassName: {params}}`` naming an albumentations class;
``OneOf``/``SomeOf``/``Sequential`` take nested ``transforms``. Size parameters left out
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
from typing import Any

import albumentations as A
from albumentations.core.composition import BaseCompose
from pydantic import ValidationError

from carclassifier.config import MAX_SEED, AugmentConfig, RunConfig, TransformSpec
from carclassifier.errors import ConfigError, one_line


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
