"""Inference with a trained classifier: class probabilities of image files, plain and with
test-time augmentation (TTA).

    plain, averaged = predict_views(model, paths, tta=tta_transform(config.augment, 224), tta_views=5)
    probs = predict_proba(model, paths)

A model here takes raw RGB pixels in 0..255 (float32) at its own input size
(`model_image_size`) and outputs softmax probabilities. Each image is decoded once per call; with
TTA, view 0 is the plain resized image and views 1.. are draws of the TTA transform on it
(`carclassifier.tta.tta_predict`), so averaging never loses the plain prediction. Used by
`carclassifier.evaluate` (validation metrics) and `carclassifier.predict` (submissions).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from carclassifier.data import load_image
from carclassifier.errors import DatasetError
from carclassifier.tta import tta_predict

log = logging.getLogger(__name__)

Transform = Callable[..., dict[str, Any]]
"""An albumentations transform (or any callable used as ``t(image=...)["image"]``)."""

DECODE_WORKERS = 4

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def check_class_names(model: Any, class_names: Sequence[str], hint: str = "") -> int:
    """The model's number of classes; `DatasetError` when ``class_names`` has another length."""
    num_classes = int(model.output_shape[-1])
    if len(class_names) != num_classes:
        raise DatasetError(
            f"{len(class_names)} class names but the model outputs {num_classes} classes"
            + (f"; {hint}" if hint else "")
        )
    return num_classes


def model_image_size(model: Any) -> tuple[int, int]:
    """The (height, width) a model takes, from ``model.input_shape``."""
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise ValueError(f"expected a model with one image input, got inputs {shape}")
        shape = shape[0]
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        raise ValueError(f"model input shape {shape} is not (batch, height, width, 3)")
    return int(shape[1]), int(shape[2])


def _decode(path: str, size: tuple[int, int]) -> np.ndarray | str:
    """The resized uint8 image, or the reason it cannot be read."""
    try:
        return load_image(path, size)
    except _DECODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"


def forward(model: Any, images: list[np.ndarray], batch_size: int) -> np.ndarray:
    """Probabilities of ``images``, at most ``batch_size`` of them per model call (a TTA batch
    holds ``views`` times as many images as the model should see at once)."""
    parts = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    return np.concatenate(
        [np.asarray(model.predict_on_batch(np.stack(part).astype(np.float32))) for part in parts]
    ).astype(np.float64)


def predict_views(
    model: Any,
    paths: Sequence[str | Path],
    batch_size: int = 32,
    tta: Transform | None = None,
    tta_views: int = 1,
    seed: int = 0,
    progress: bool = True,
    skip_unreadable: bool = False,
    workers: int = DECODE_WORKERS,
) -> tuple[np.ndarray, np.ndarray]:
    """Plain and TTA-averaged probabilities in one pass: ``(plain, averaged)``, each (N, C).

    The plain prediction is view 0 of the TTA average, so it costs nothing extra; without
    ``tta`` (or with ``tta_views == 1``) both arrays are equal. See `predict_proba` for the
    arguments; ``workers`` threads decode the next batch while the model runs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if tta_views < 1:
        raise ValueError(f"tta_views must be at least 1, got {tta_views}")
    size = model_image_size(model)
    views = tta_views if tta is not None else 1
    if views > 1 and hasattr(tta, "set_random_seed"):
        tta.set_random_seed(seed)  # the same draws on every call
    paths = [str(p) for p in paths]
    n, num_classes = len(paths), int(model.output_shape[-1])
    plain = np.full((n, num_classes), np.nan, dtype=np.float32)
    averaged = plain.copy()
    chunks = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    unreadable = 0
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(
            total=n,
            desc=f"predicting ({views} view{'s' if views > 1 else ''})",
            unit="img",
            disable=not progress,
        ) as bar,
    ):

        def submit(chunk: range) -> list[Future]:
            return [pool.submit(_decode, paths[i], size) for i in chunk]

        pending = submit(chunks[0]) if chunks else []
        for c, chunk in enumerate(chunks):
            decoded = [f.result() for f in pending]
            pending = submit(chunks[c + 1]) if c + 1 < len(chunks) else []  # overlap decoding
            rows, images = [], []
            for i, result in zip(chunk, decoded, strict=True):
                if isinstance(result, str):
                    if not skip_unreadable:
                        raise DatasetError(f"cannot read image {paths[i]} ({result})")
                    log.warning("skipping unreadable image %s (%s)", paths[i], result)
                    unreadable += 1
                else:
                    rows.append(i)
                    images.append(result)
            if images:
                first, mean = tta_predict(
                    lambda batch: forward(model, batch, batch_size), images, tta, views
                )
                plain[rows] = first
                averaged[rows] = mean
            bar.update(len(chunk))
    if unreadable:
        log.warning("%d of %d images could not be read; their rows are NaN", unreadable, n)
    return plain, averaged


def predict_proba(
    model: Any,
    paths: Sequence[str | Path],
    batch_size: int = 32,
    tta: Transform | None = None,
    tta_views: int = 1,
    seed: int = 0,
    progress: bool = True,
    skip_unreadable: bool = False,
) -> np.ndarray:
    """Class probabilities (N, C) of the images at ``paths``, in order.

    Each image is decoded once at the model's input size (`model_image_size`). With ``tta``
    (e.g. `carclassifier.augment.tta_transform`) the result is the mean over ``tta_views``
    views: view 0 the plain resized image, views 1.. ``tta(image=...)`` of it; ``tta_views`` is
    ignored without ``tta``. A transform with ``set_random_seed`` (albumentations) is reseeded
    with ``seed`` first and then drawn image by image in order, so results are reproducible and
    do not depend on ``batch_size``. Forward passes take ``batch_size`` images each.

    An unreadable image raises `DatasetError`, or with ``skip_unreadable`` gets a NaN row (and
    a logged warning).
    """
    return predict_views(model, paths, batch_size, tta, tta_views, seed, progress, skip_unreadable)[
        1
    ]
