"""A smoke forward pass: the configured classifier on one real validation batch.

Proves the whole chain (data → input pipeline → backbone with its weights → head) before any
training is spent on it. `carclassifier run-local` ends with it until the trainer lands.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from carclassifier.config import RunConfig
from carclassifier.inputs import make_inputs
from carclassifier.model import build_classifier
from carclassifier.prepare import PreparedData

log = logging.getLogger(__name__)


def smoke_forward(config: RunConfig, prepared: PreparedData, out_dir: str | Path) -> dict:
    """Build the classifier, predict one validation batch, check the output, write ``smoke.json``."""
    started = time.perf_counter()
    classes = prepared.dataset.class_names
    model = build_classifier(config.model, len(classes), config.input.image_size)
    built = time.perf_counter()
    batches = make_inputs(
        config, prepared.dataset.root, prepared.subset("val"), classes, training=False
    )
    images, labels = next(iter(batches))
    images = np.asarray(images)
    probs = model.predict(images, verbose=0)
    done = time.perf_counter()
    sums = probs.sum(axis=1)
    if (
        probs.shape != (len(images), len(classes))
        or not np.all(np.isfinite(probs))
        or not np.allclose(sums, 1, atol=1e-4)
    ):
        raise RuntimeError(
            f"smoke forward pass produced bad output: shape {probs.shape}, sums {sums}"
        )
    result = {
        "backbone": config.model.backbone,
        "weights": config.model.weights,
        "input_pipeline": config.input.pipeline,
        "image_size": config.input.image_size,
        "parameters": int(model.count_params()),
        "batch_shape": list(images.shape),
        "output_shape": list(probs.shape),
        "pixel_range": [float(images.min()), float(images.max())],
        "predicted": [classes[i] for i in probs.argmax(axis=1)],
        "true": [classes[i] for i in np.asarray(labels).argmax(axis=1)],
        "build_seconds": round(built - started, 2),
        "forward_seconds": round(done - built, 2),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smoke.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    log.info(
        "smoke forward pass OK: %s %s -> %s in %.1fs (untrained head: predictions are random)",
        config.model.backbone,
        result["batch_shape"],
        result["output_shape"],
        done - built,
    )
    return result
