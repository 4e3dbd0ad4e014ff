"""One typed configuration object for a run, loaded from YAML with command-line overrides.

Every section is a pydantic model that forbids unknown keys, so a typo fails before anything
trains with a message naming the key. ``load_config("configs/x.yaml", ["input.batch_size=8"])``
is the only way the CLI, the components and the tests build a `RunConfig`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from carclassifier.errors import ConfigError

SIZE_MULTIPLE = 32
"""Every backbone in the registry downsamples by 32: image sizes must be multiples of it."""
MIN_IMAGE_SIZE = 32
"""Smallest input size accepted (one pixel of the backbones' last feature map)."""
MAX_IMAGE_SIZE = 2048
"""Largest input size accepted (the recipe's largest is 448; EfficientNet-B7's default 600)."""
MAX_SEED = 2**31 - 1
"""Seeds go to numpy and keras.utils.set_random_seed (with the epoch added): keep them 31-bit."""

_GCS_BUCKET = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]{1,220}[a-z0-9])$")


def check_location(value: str, what: str, object_required: bool = False) -> str:
    """A local path or a ``gs://bucket/object`` URI; anything else with ``://`` (another scheme,
    a malformed bucket name, ``gs:/x``) raises ``ValueError`` naming ``what``.

    Bucket names follow Cloud Storage's rules (3-63 characters, or up to 222 with dots;
    lower-case letters, digits, ``-``, ``_`` and ``.``; starting and ending with a letter or a
    digit). ``object_required``: the URI must name an object, not just a bucket.
    """
    text = str(value)
    if not text.strip():
        raise ValueError(f"{what} is empty")
    if any(ch in text for ch in "\x00\r\n"):
        raise ValueError(f"{what} {text!r} contains a control character")
    if text.startswith(("gs:/", "gs:\\")) and not text.startswith("gs://"):
        raise ValueError(f"{what} {text!r} is malformed: write gs://BUCKET/PATH")
    if "://" not in text:
        return text
    scheme, _, rest = text.partition("://")
    if scheme != "gs":
        raise ValueError(
            f"{what} {text!r}: only local paths and gs://BUCKET/PATH URIs are supported, "
            f"not {scheme}://"
        )
    bucket, _, blob = rest.partition("/")
    longest = 222 if "." in bucket else 63
    if not (3 <= len(bucket) <= longest and _GCS_BUCKET.match(bucket)) or ".." in bucket:
        raise ValueError(
            f"{what} {text!r}: {bucket!r} is not a valid Cloud Storage bucket name (3-63 "
            "lower-case letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
        )
    if object_required and not blob.strip("/"):
        raise ValueError(f"{what} {text!r} names a bucket but no object: write gs://{bucket}/PATH")
    if len(blob.encode("utf-8")) > 1024:
        raise ValueError(f"{what} {text!r}: object names are at most 1024 bytes")
    return text


def _location_or_none(what: str):  # noqa: ANN202 - a pydantic field validator
    def check(value: str | None) -> str | None:
        return None if value is None else check_location(value, what)

    return check


TransformSpec = dict[str, dict[str, Any]]
"""One albumentations transform: ``{ClassName: {param: value}}`` (see `carclassifier.augment`)."""


def check_image_size(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    """The one image-size rule: a whole multiple of ``multiple`` (the backbones' stride), at
    least `MIN_IMAGE_SIZE`; ``ValueError`` saying which sizes to use otherwise. The config, the
    backbone registry and the Lite0 builder all check sizes with it."""
    if value < MIN_IMAGE_SIZE:
        raise ValueError(
            f"{value} px is too small: sizes are multiples of {multiple}, at least {MIN_IMAGE_SIZE}"
        )
    if value % multiple:
        lower = max(multiple, value - value % multiple)
        raise ValueError(
            f"{value} px is not a multiple of {multiple} (the backbones' stride); "
            f"use {lower} or {lower + multiple}"
        )
    return value


def _check_size(value: int | None) -> int | None:
    return None if value is None else check_image_size(value)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PRIMARY_SOURCE = "primary"
"""The ``source`` of the photos of ``data.root`` (split.csv, leaks.csv, the EDA report)."""
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ExtraSource(_Section):
    """More labelled photos for TRAINING only (`carclassifier.sources`): another dataset in one
    of the layouts `carclassifier.data.load_dataset` reads, with its class names mapped to ours.
    Photos of classes ``class_map`` does not name are dropped and counted."""

    name: str = Field(
        description="Short name: the photos' ``source`` in split.csv and the EDA report; a "
        "folder name (letters, digits, '_', '-', '.'), unique, not 'primary'."
    )
    root: str = Field(description="The source's folder, or a gs://BUCKET/PATH prefix.")
    layout: Literal["kaggle", "labels_csv", "folders"] | None = Field(
        None, description="Its layout; None: detected as for data.root."
    )
    class_map: dict[str, str] = Field(
        min_length=1,
        description="Their class name -> our class name (a class of data.root); photos of "
        "their other classes are dropped (counted in sources.csv and the log).",
    )
    weight: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="How often each of its photos is drawn in a training epoch, relative to a "
        "data.root photo (1.0: as often; 2.0: twice as often; 0.5: half as often).",
    )

    _root = field_validator("root")(_location_or_none("data.extra_sources[].root"))

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if value == PRIMARY_SOURCE or not _SOURCE_NAME.match(value):
            raise ValueError(
                f"extra source name {value!r} must be 1-64 letters, digits, '_', '-' or '.' "
                f"(starting with a letter or digit) and not {PRIMARY_SOURCE!r}"
            )
        return value


class DataConfig(_Section):
    """Where the images are and how they are split."""

    root: str | None = Field(
        None,
        description="Dataset folder (Kaggle layout, labels.csv or class folders). "
        "None: the demo data (../shared/data/cars-ru10, else generated images).",
    )
    test_dir: str | None = Field(
        None, description="Unlabelled test images (default: found in root)."
    )
    val_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Share of each class kept for validation."
    )
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed of the train/validation split.")
    min_images_per_class: int = Field(
        2, ge=1, description="Fewer usable images in any class stops the run."
    )
    leak_check: bool = Field(
        True,
        description="Leave out (and list in leaks.csv) training photos that are near-duplicates "
        "of validation or test photos (perceptual hash, carclassifier.lineage).",
    )

    extra_sources: list[ExtraSource] = Field(
        default_factory=list,
        description="More labelled datasets for training only (never validation): their "
        "classes mapped to ours, near-duplicates of validation/test photos left out "
        "(data.leak_check), drawn per epoch by weight (carclassifier.sources).",
    )

    _root = field_validator("root")(_location_or_none("data.root"))

    @field_validator("extra_sources")
    @classmethod
    def _unique_sources(cls, value: list[ExtraSource]) -> list[ExtraSource]:
        names = [source.name for source in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"extra source name(s) {repeated} are used twice; names are unique")
        return value


def _cropped_train_transforms() -> list[TransformSpec]:
    """Preset ``cropped``: for tightly cropped photos like the demo data's (the recipe's
    augmentation as it always was: mild crops, flip, affine, colour, blur/noise, small holes)."""
    return [
        {"RandomResizedCrop": {"scale": [0.6, 1.0], "ratio": [0.75, 1.333]}},
        {"HorizontalFlip": {"p": 0.5}},
        {
            "Affine": {
                "translate_percent": [-0.06, 0.06],
                "scale": [0.9, 1.1],
                "rotate": [-10, 10],
                "p": 0.5,
            }
        },
        {"RandomBrightnessContrast": {"brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5}},
        {
            "HueSaturationValue": {
                "hue_shift_limit": 10,
                "sat_shift_limit": 20,
                "val_shift_limit": 10,
                "p": 0.3,
            }
        },
        {
            "OneOf": {
                "transforms": [{"GaussianBlur": {"blur_limit": [3, 5]}}, {"GaussNoise": {}}],
                "p": 0.2,
            }
        },
        {
            "CoarseDropout": {
                "num_holes_range": [1, 4],
                "hole_height_range": [0.05, 0.15],
                "hole_width_range": [0.05, 0.15],
                "p": 0.3,
            }
        },
    ]


def _uncropped_train_transforms() -> list[TransformSpec]:
    """Preset ``uncropped``: for models that will see whole photos with the car anywhere in
    them. ``cropped`` plus framing: crops zoom in further (down to 35 % of the area, often
    off-centre), `carclassifier.augment.ZoomOut` zooms out (the car at 40-100 % of the side,
    at a random place, on a blurred reflection of itself), and larger cut-outs occlude up to
    a third of the side."""
    _crop, *middle, _dropout = _cropped_train_transforms()
    return [
        {"RandomResizedCrop": {"scale": [0.35, 1.0], "ratio": [0.75, 1.333]}},
        {"ZoomOut": {"scale_range": [0.4, 1.0], "position": "random", "p": 0.5}},
        *middle,
        {
            "CoarseDropout": {
                "num_holes_range": [1, 2],
                "hole_height_range": [0.1, 0.35],
                "hole_width_range": [0.1, 0.35],
                "p": 0.5,
            }
        },
    ]


AUGMENT_PRESETS: dict[str, Callable[[], list[TransformSpec]]] = {
    "cropped": _cropped_train_transforms,
    "uncropped": _uncropped_train_transforms,
}
"""``augment.preset`` names: each gives a fresh ``augment.train`` list (see its docstring)."""
DEFAULT_AUGMENT_PRESET = "cropped"


def preset_transforms(name: str) -> list[TransformSpec]:
    """The ``augment.train`` list of preset ``name``; `ConfigError` listing the presets otherwise."""
    if name not in AUGMENT_PRESETS:
        raise ConfigError(
            f"augment.preset {name!r} is not a preset; presets are {sorted(AUGMENT_PRESETS)} "
            "(or leave preset out and give augment.train)"
        )
    return AUGMENT_PRESETS[name]()


def _default_tta_transforms() -> list[TransformSpec]:
    """Chosen from the robustness report (docs/robustness.md): with 5 views never worse than
    plain on clean photos, and the largest mean gain under shifts of the candidates measured."""
    return [
        {"HorizontalFlip": {"p": 0.5}},
        {"Affine": {"translate_percent": [-0.04, 0.04], "scale": [0.95, 1.05], "p": 0.7}},
        {"RandomBrightnessContrast": {"brightness_limit": 0.1, "contrast_limit": 0.1, "p": 0.5}},
    ]


class AugmentConfig(_Section):
    """albumentations pipelines: ``train`` (augmented), ``tta`` (mild, for test-time views).

    ``preset`` names a ready-made ``train`` list (`AUGMENT_PRESETS`): ``cropped`` (the default,
    the recipe's augmentation for tightly cropped photos) or ``uncropped`` (adds zoom-out,
    random placement and occlusion). ``train`` is what training uses: the preset's list unless
    the config gives ``train`` itself (then ``preset`` is None: a custom list). Giving both is allowed only when they agree (as in a
    dumped config); a ``train`` list that differs from an explicitly named preset is an error,
    so a recipe never silently ignores one of the two.
    """

    preset: str | None = Field(
        None,
        description="Ready-made training augmentation: cropped (the default when train is not "
        "given either) or uncropped; null when augment.train is a list of the config's own.",
    )
    train: list[TransformSpec] = Field(default_factory=_cropped_train_transforms)
    tta: list[TransformSpec] = Field(default_factory=_default_tta_transforms)
    tta_views: int = Field(
        5, ge=1, le=100, description="Augmented views averaged per image by TTA."
    )

    @model_validator(mode="before")
    @classmethod
    def _train_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name, train = data.get("preset"), data.get("train")
        if name is None:  # no preset named: the default preset's list, or a custom train list
            if train is None:
                return {
                    **data,
                    "preset": DEFAULT_AUGMENT_PRESET,
                    "train": preset_transforms(DEFAULT_AUGMENT_PRESET),
                }
            return {**data, "preset": None}
        if not isinstance(name, str) or name not in AUGMENT_PRESETS:
            raise ValueError(
                f"preset {name!r} is not a preset; presets are {sorted(AUGMENT_PRESETS)} "
                "(or leave preset out and give augment.train)"
            )
        preset = preset_transforms(name)
        if train is None:
            return {**data, "train": preset}
        if train != preset:
            raise ValueError(
                f"train is given and differs from preset {name!r}'s list; give one of the two: "
                "remove augment.preset (or set augment.preset=null) to use your train list, or "
                "remove augment.train to use the preset"
            )
        return data

    @field_validator("train", "tta")
    @classmethod
    def _one_name_per_item(cls, value: list[TransformSpec]) -> list[TransformSpec]:
        for item in value:
            if not isinstance(item, dict) or len(item) != 1:
                raise ValueError(
                    "each transform is one mapping {Name: {params}}, e.g. {HorizontalFlip: {p: 0.5}}"
                )
        return value


ShiftName = Literal[
    "zoom_out", "off_centre", "occlusion", "jpeg", "blur", "brightness", "colour", "rotation",
    "hflip",
]  # fmt: skip
"""The controlled shifts of the robustness report (see `carclassifier.robustness`)."""
SHIFT_NAMES: tuple[str, ...] = get_args(ShiftName)


class RobustnessConfig(_Section):
    """The robustness report: validation accuracy (plain and TTA) under controlled, seeded
    shifts of the photos, each at a few strengths, and the calibration of the predictions."""

    enabled: bool = Field(True, description="Write the report with every evaluation.")
    shifts: list[ShiftName] = Field(
        default_factory=lambda: list(SHIFT_NAMES), description="Shifts to apply (default: all)."
    )
    strengths: list[float] = Field(
        default_factory=lambda: [0.5, 1.0],
        description="Strengths in (0, 1] (1 = the strongest shift; hflip has none).",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the photo sample and shifts.")
    max_photos: int = Field(
        48,
        ge=1,
        le=100_000,
        description="Validation photos shifted (a seeded sample); each costs one forward pass "
        "per shift, strength and TTA view.",
    )

    @field_validator("shifts")
    @classmethod
    def _unique_shifts(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(
                f"name at least one shift of {list(SHIFT_NAMES)}, or set enabled: false"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"shifts are repeated in {value}; name each once")
        return value

    @field_validator("strengths")
    @classmethod
    def _strengths_in_range(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("give at least one strength, e.g. [0.5, 1.0]")
        bad = [s for s in value if not 0.0 < s <= 1.0]
        if bad:
            raise ValueError(f"strengths must be in (0, 1] (1 = strongest), got {bad}")
        if len({round(s * 100) for s in value}) != len(value):
            raise ValueError(
                f"strengths {value} repeat at percent precision (metric names use percent)"
            )
        return sorted(value)


class EvaluateConfig(_Section):
    """What an evaluation reports besides accuracy, loss and the confusion matrix."""

    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)


class InputConfig(_Section):
    """How batches are made."""

    pipeline: Literal["tf_data", "image_data_augmentor"] = Field(
        "tf_data", description="tf_data (fast) or image_data_augmentor (the recipe's generator)."
    )
    image_size: int = Field(
        224,
        ge=MIN_IMAGE_SIZE,
        le=MAX_IMAGE_SIZE,
        description="Square input size in pixels (multiple of 32).",
    )
    batch_size: int = Field(16, ge=1, le=4096)
    workers: int = Field(2, ge=1, le=256, description="Parallel decode/augment workers.")
    cache: Literal["auto", "memory", "off"] = Field(
        "auto",
        description="Keep decoded images in memory between epochs (exact: same pixels). "
        "auto: when a pipeline's images fit in cache_budget_mb.",
    )
    cache_budget_mb: int = Field(
        4096, ge=0, description="auto cache: most MB of decoded images each pipeline may keep."
    )

    @field_validator("cache", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false

    _size = field_validator("image_size")(_check_size)


class HeadConfig(_Section):
    """The classification head on top of the backbone."""

    pooling: Literal["avg", "max"] = "avg"
    dense_units: list[int] = Field(
        default_factory=list, description="Extra dense layers, e.g. [256]."
    )
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    batch_norm: bool = Field(True, description="BatchNormalization after each extra dense layer.")

    @field_validator("dense_units")
    @classmethod
    def _positive_units(cls, value: list[int]) -> list[int]:
        if any(units < 1 or units > 65536 for units in value):
            raise ValueError("dense layer sizes must be between 1 and 65536")
        return value


class ModelConfig(_Section):
    """Backbone and head."""

    backbone: str = Field("efficientnet_lite0", description="A name from carclassifier.backbones.")
    weights: str | None = Field(
        "imagenet", description="imagenet, null (random) or a weights file path / gs:// URI."
    )
    head: HeadConfig = Field(default_factory=HeadConfig)

    _weights = field_validator("weights")(_location_or_none("model.weights"))


Monitor = Literal["val_accuracy", "val_loss"]


class ReduceLRConfig(_Section):
    """keras ReduceLROnPlateau (the recipe's idea 3)."""

    enabled: bool = True
    monitor: Monitor = "val_accuracy"
    factor: float = Field(0.3, gt=0.0, lt=1.0)
    patience: int = Field(3, ge=1, le=10000)
    min_lr: float = Field(1e-8, ge=0.0, le=1.0)


class ScheduleConfig(_Section):
    """A learning-rate schedule over the epochs of a stage (the recipe's idea 4)."""

    kind: Literal["constant", "cosine", "step"] = "constant"
    min_lr_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="cosine: final LR / initial LR."
    )
    step_epochs: int = Field(3, ge=1, le=10000, description="step: epochs between LR drops.")
    step_factor: float = Field(0.5, gt=0.0, lt=1.0, description="step: LR multiplier at each drop.")


class EarlyStoppingConfig(_Section):
    """keras EarlyStopping; the stage's best model is kept either way."""

    enabled: bool = False
    monitor: Monitor = "val_accuracy"
    patience: int = Field(4, ge=1, le=10000)


class StageConfig(_Section):
    """One fine-tuning stage; each starts from the previous stage's best model."""

    name: str = Field(
        pattern=r"^[a-z0-9_]+$", description="e.g. stage_2; used in file and task names."
    )
    description: str = Field("", description="Shown in logs and the run graph.")
    epochs: int = Field(ge=1, le=10000)
    unfreeze: float = Field(
        ge=0.0,
        le=1.0,
        description="Share of backbone blocks trained, counted from the top (0 = head only).",
    )
    learning_rate: float = Field(gt=0.0, le=1.0)
    image_size: int | None = Field(
        None, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE, description="Default: input.image_size."
    )
    batch_size: int | None = Field(None, ge=1, le=4096, description="Default: input.batch_size.")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    train_batchnorm: bool = Field(
        False, description="Train unfrozen BatchNormalization layers (default: keep them frozen)."
    )
    allow_refreeze: bool = Field(False, description="Allow unfreezing less than the stage before.")
    reduce_lr: ReduceLRConfig = Field(default_factory=ReduceLRConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)

    _size = field_validator("image_size")(_check_size)

    @model_validator(mode="after")
    def _one_lr_controller(self) -> StageConfig:
        if self.reduce_lr.enabled and self.schedule.kind != "constant":
            raise ValueError(
                f"stage {self.name}: reduce_lr and a {self.schedule.kind} schedule both steer the "
                "learning rate; set reduce_lr.enabled: false or schedule.kind: constant"
            )
        return self


def _default_stages() -> list[StageConfig]:
    return [
        StageConfig(
            name="stage_1", description="head only", epochs=3, unfreeze=0.0, learning_rate=1e-3
        ),
        StageConfig(
            name="stage_2", description="unfreeze 1/2", epochs=2, unfreeze=0.5, learning_rate=1e-4
        ),
    ]


class TrainConfig(_Section):
    """How stages run."""

    gpu_hours_budget: float | None = Field(
        500.0,
        gt=0,
        description="GPU hours a run may use (all stages, retries included); a stage does not "
        "start once they are spent. null: no limit. The B6 recipe needs ~7 h on a T4.",
    )

    mixed_precision: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: mixed_float16 when a GPU is visible, float32 on CPU."
    )
    jit_compile: bool = Field(False, description="XLA-compile the train step.")
    steps_per_epoch: int | None = Field(
        None, ge=1, le=10**7, description="Cap batches per epoch (tests, smoke runs)."
    )
    keep_checkpoints: int = Field(
        2,
        ge=2,
        le=1000,
        description="Checkpoints kept (epoch-end and mid-epoch), newest first; at least 2, so "
        "a corrupt newest one falls back to the previous.",
    )


class GateConfig(_Section):
    """How the champion/challenger gate tells progress from noise (`carclassifier.gate`)."""

    significance: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Promote only when McNemar's exact test (one-sided, on the photos the two "
        "models disagree on) gives p below this.",
    )
    max_recall_drop: float = Field(
        0.05, ge=0, le=1, description="No class's recall may fall by more than this."
    )
    formats_tolerance: float = Field(
        1e-4,
        gt=0,
        le=1,
        description="model.onnx and model.keras must agree within this on the gate's photos.",
    )


DEFAULT_MTBF_MINUTES = 120.0
"""Prior mean time between preemptions (a spot node lives ~2 h at the median) used by
``checkpoint.every: auto`` when ``checkpoint.mtbf_minutes`` is not set."""

_EVERY_MINUTES = re.compile(r"^(\d+(?:\.\d+)?)m$")


class CheckpointConfig(_Section):
    """When a stage checkpoints (always at each epoch end, too) and what SIGTERM may do."""

    every: int | str = Field(
        "epoch",
        description="epoch: at epoch ends only; N: also every N training steps; '<N>m': every N "
        "minutes; auto: the Young/Daly interval from the measured checkpoint cost and the "
        "preemption rate.",
    )
    mtbf_minutes: float | None = Field(
        None,
        gt=0.0,
        le=10**6,
        description="Mean time between preemptions for auto. None: learned from the stage's "
        f"attempt history, starting from {DEFAULT_MTBF_MINUTES:g} min.",
    )
    grace_seconds: float = Field(
        30.0,
        ge=0.0,
        le=86400.0,
        description="Time between SIGTERM and SIGKILL (the pod's terminationGracePeriodSeconds): "
        "a checkpoint is written on SIGTERM only if its measured cost fits.",
    )
    min_minutes: float = Field(1.0, gt=0.0, le=10**4, description="auto: shortest interval.")
    max_minutes: float = Field(60.0, gt=0.0, le=10**4, description="auto: longest interval.")

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, value: Any) -> int | str:
        if isinstance(value, bool) or value is None:
            raise ValueError(
                "write epoch, a number of steps (e.g. 200), minutes (e.g. 10m) or auto"
            )
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"{value} steps: checkpoint every 1 step or more")
            return value
        text = str(value).strip().lower()
        if text.isdigit():
            return cls._every(int(text))
        if text in ("epoch", "auto"):
            return text
        match = _EVERY_MINUTES.match(text)
        if match is None or float(match.group(1)) <= 0:
            raise ValueError(
                f"{value!r} is not epoch, a number of steps (e.g. 200), minutes (e.g. 10m) or auto"
            )
        return text

    @model_validator(mode="after")
    def _bounds(self) -> CheckpointConfig:
        if self.min_minutes > self.max_minutes:
            raise ValueError(
                f"min_minutes {self.min_minutes} > max_minutes {self.max_minutes}: swap them"
            )
        return self

    @property
    def every_steps(self) -> int | None:
        """Steps between mid-epoch checkpoints (``every: N``), else None."""
        return self.every if isinstance(self.every, int) else None

    @property
    def every_minutes(self) -> float | None:
        """Minutes between mid-epoch checkpoints (``every: '<N>m'``), else None."""
        match = _EVERY_MINUTES.match(self.every) if isinstance(self.every, str) else None
        return float(match.group(1)) if match else None


class RunConfig(_Section):
    """Everything one run needs."""

    name: str = Field("local", pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = Field("runs/local", description="Local folder or gs:// prefix for outputs.")
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    stages: list[StageConfig] = Field(default_factory=_default_stages, min_length=1, max_length=100)

    _output_dir = field_validator("output_dir")(_location_or_none("output_dir"))

    @model_validator(mode="after")
    def _stages_make_a_recipe(self) -> RunConfig:
        names = [stage.name for stage in self.stages]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"stage names must be unique; repeated: {duplicated}")
        for before, after in zip(self.stages, self.stages[1:], strict=False):
            if after.unfreeze < before.unfreeze and not after.allow_refreeze:
                raise ValueError(
                    f"stage {after.name} unfreezes {after.unfreeze} < {before.unfreeze} of stage "
                    f"{before.name}; if that is meant, set allow_refreeze: true on {after.name}"
                )
        return self

    def stage(self, name: str) -> StageConfig:
        """The stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(
            f"no stage {name!r} in this config; stages are {[s.name for s in self.stages]}"
        )

    def stage_image_size(self, stage: StageConfig) -> int:
        """The input size a stage trains at: its own ``image_size``, else ``input.image_size``
        (the one place this rule lives)."""
        return stage.image_size or self.input.image_size

    def stage_batch_size(self, stage: StageConfig) -> int:
        """The batch size a stage trains with."""
        return stage.batch_size or self.input.batch_size


def _printable(part: object) -> str:
    """A key of the config as shown in an error: as is, or quoted when it holds a newline or
    another unprintable character (the message stays one line)."""
    text = str(part)
    return text if text.isprintable() else repr(text)


def _format_validation_error(error: ValidationError, source: str) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(_printable(p) for p in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against configs/*.yaml)"
        parts.append(f"{key}: {message}")
    return f"invalid config {source}: " + "; ".join(parts)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not KEY=VALUE, e.g. input.batch_size=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {override!r}: the value is not valid YAML ({yaml_problem(exc)}); "
            "quote text values, e.g. data.root='my folder'"
        ) from None
    node: Any = data
    *parents, leaf = key.strip().split(".")
    for part in parents:
        if isinstance(node, list):  # a stage addressed by its name: stages.stage_2.epochs=3
            matches = [item for item in node if isinstance(item, dict) and item.get("name") == part]
            if not matches:
                names = [item.get("name") for item in node if isinstance(item, dict)]
                raise ConfigError(
                    f"override {override!r}: no stage named {part!r} (stages: {names})"
                )
            node = matches[0]
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, dict | list):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    if isinstance(node, list):
        raise ConfigError(f"override {override!r}: name a stage, e.g. stages.stage_1.epochs=2")
    node[leaf] = value


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a plain mapping into a `RunConfig`; errors name the offending key."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``KEY=VALUE`` overrides."""
    if path is None:
        return parse_config("", overrides, "<defaults>")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text; save it as UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. a NUL byte in the path
        raise ConfigError(f"cannot read config {path!r}: {exc}") from None
    return parse_config(text, overrides, str(path))


def parse_config(
    text: str, overrides: list[str] | None = None, source: str = "<text>"
) -> RunConfig:
    """A config from YAML ``text`` (named ``source`` in errors) with ``KEY=VALUE`` overrides."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {source} is not valid YAML: {yaml_problem(exc)}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config {source} must be a mapping of sections, got {type(loaded).__name__}"
        )
    for override in overrides or []:
        _apply_override(loaded, override)
    return config_from_dict(loaded, source)


def resolve_config(
    config_yaml: str,
    overrides: list[str] | None = None,
    backbone: str = "",
    image_size: int = 0,
    stage_names: list[str] | tuple[str, ...] | None = None,
) -> RunConfig:
    """The recipe YAML text with ``KEY=VALUE`` overrides applied, then the pipeline's
    ``backbone`` ("" = the recipe's) and ``image_size`` (0 = the recipe's ``input.image_size``;
    stages with their own size keep it). The backbone must be a registered one, and with
    ``stage_names`` (the stages the pipeline graph was compiled for) the overrides may not
    change the stage list (the one place that rule is checked: the prepare step and the
    pipeline's argument check both call this): both fail here, before any download or GPU pod.
    """
    # Lazy: the backbone registry imports Keras/TensorFlow (seconds); the config itself must
    # load without it.
    from carclassifier.backbones import get_backbone

    if not isinstance(backbone, str):
        raise ConfigError(f"backbone {backbone!r} must be a string ('' keeps the recipe's)")
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ConfigError(f"image_size {image_size!r} must be a whole number (0: the recipe's)")
    extra = list(overrides or [])
    if backbone:
        extra.append(f"model.backbone={backbone}")
    if image_size:
        extra.append(f"input.image_size={image_size}")
    config = parse_config(config_yaml, extra, "(the pipeline's recipe)")
    get_backbone(config.model.backbone)
    names = [stage.name for stage in config.stages]
    if stage_names is not None and names != list(stage_names):
        raise ConfigError(
            f"the overrides make the stages {names}, but this pipeline was compiled for "
            f"{list(stage_names)}; compile it from the changed recipe (python -m pipelines compile)"
        )
    return config


def dump_config(config: RunConfig) -> str:
    """The config as YAML, as it would be loaded again (written next to every run's outputs)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
