"""Test-time augmentation (TTA): the one place that turns images into averaged probabilities.

    plain, averaged = tta_predict(forward, images, transform, views)

View 0 of every image is the image itself and views 1.. are ``transform(image=...)`` of it, drawn
image by image (an image's views in a row), so the result does not depend on how callers batch
and the average never loses the plain prediction. Used by `carclassifier.inference` and the
serving predictor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Forward = Callable[[list[np.ndarray]], np.ndarray]
"""Model call: a list of uint8 [H, W, 3] images -> probabilities (N, C)."""


def tta_predict(
    forward: Forward, images: Sequence[np.ndarray], transform: Any | None, views: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(plain, averaged)`` probabilities (N, C) of ``images`` in one ``forward`` call.

    Without ``transform`` or with ``views == 1`` both are the plain prediction. A transform whose
    output shape differs from its input raises `ValueError` (build it for the model's size).
    """
    if views < 1:
        raise ValueError(f"tta views must be at least 1, got {views}")
    images = list(images)
    n = len(images)
    extra = views - 1 if transform is not None else 0
    batch = list(images)
    for image in images:
        for _ in range(extra):
            view = transform(image=image)["image"]
            if view.shape != image.shape:
                raise ValueError(
                    f"the tta transform returns {view.shape} images but the model takes "
                    f"{image.shape}; build it for the model's size, e.g. "
                    f"tta_transform(config.augment, {image.shape[0]})"
                )
            batch.append(view)
    probs = np.asarray(forward(batch))
    plain = probs[:n]
    if not extra:
        return plain, plain.copy()
    augmented = probs[n:].reshape(n, extra, -1)
    return plain, (plain + augmented.sum(axis=1)) / views
