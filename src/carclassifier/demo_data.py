"""The demo dataset: the real car photos in ``../shared/data/cars-ru10`` when present, else small
images this module draws itself (logged loudly, so nobody mistakes them for photos)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

SHARED_DATA_ENV = "CARCLASSIFIER_SHARED_DATA"
REAL_DEMO = Path("data") / "cars-ru10"
REAL_SAMPLES = Path("data") / "sf-competition-samples"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path | None:
    """The shared folder (``$CARCLASSIFIER_SHARED_DATA`` or ``../shared`` beside the project)."""
    candidates = [
        os.environ.get(SHARED_DATA_ENV),
        Path.cwd().parent / "shared",
        PROJECT_ROOT.parent / "shared",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / REAL_DEMO).is_dir():
            return Path(candidate)
    return None


def real_demo_root() -> Path | None:
    """``shared/data/cars-ru10`` when it exists."""
    shared = shared_dir()
    return shared / REAL_DEMO if shared else None


def generate_synthetic_dataset(
    dest: str | Path, classes: int = 10, per_class: int = 12, size: int = 160, seed: int = 0
) -> Path:
    """Draw a labelled class-folder dataset of toy "cars" (a body and two wheels whose colour,
    proportions and roof differ by class). Returns ``dest``; drawing is skipped if it exists."""
    dest = Path(dest)
    marker = dest / ".complete"
    if marker.exists():
        return dest
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = dest / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        hue = int(255 * label / classes)
        for index in range(per_class):
            canvas = Image.new("HSV", (size, size), (int(rng.integers(0, 255)), 40, 200)).convert(
                "RGB"
            )
            draw = ImageDraw.Draw(canvas)
            body_h = size * (0.18 + 0.02 * (label % 4))
            x0, y0 = size * rng.uniform(0.05, 0.15), size * rng.uniform(0.4, 0.5)
            x1 = size * rng.uniform(0.8, 0.95)
            colour = Image.new("HSV", (1, 1), (hue, 220, 220)).convert("RGB").getpixel((0, 0))
            draw.rectangle([x0, y0, x1, y0 + body_h], fill=colour)
            roof = 0.3 + 0.05 * (label % 5)
            draw.polygon(
                [
                    (x0 + (x1 - x0) * 0.2, y0),
                    (x0 + (x1 - x0) * 0.35, y0 - body_h * roof * 2),
                    (x0 + (x1 - x0) * 0.7, y0 - body_h * roof * 2),
                    (x0 + (x1 - x0) * 0.85, y0),
                ],
                fill=colour,
            )
            r = size * 0.07
            for cx in (x0 + (x1 - x0) * 0.2, x0 + (x1 - x0) * 0.8):
                draw.ellipse([cx - r, y0 + body_h - r, cx + r, y0 + body_h + r], fill=(20, 20, 20))
            canvas.save(folder / f"{label}_{index:03d}.jpg", quality=90)
    marker.touch()
    return dest


def demo_dataset_root(work_dir: str | Path = "runs/demo-data") -> Path:
    """The real demo photos if available, else a generated dataset under ``work_dir``."""
    real = real_demo_root()
    if real is not None:
        log.info("demo data: real car photos at %s", real)
        return real
    target = Path(work_dir) / "synthetic"
    log.warning(
        "demo data: ../shared/data/cars-ru10 not found — using GENERATED toy images at %s "
        "(not photos; accuracy on them means nothing)",
        target,
    )
    return generate_synthetic_dataset(target)
