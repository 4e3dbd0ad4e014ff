"""Shared fixtures: small datasets made on the fly, the real demo photos when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def write_image(
    path: Path,
    size: tuple[int, int] = (48, 40),
    mode: str = "RGB",
    seed: int = 0,
    fmt: str = "JPEG",
) -> Path:
    """A small random image file (``size`` is width, height)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)
    return path


@pytest.fixture
def make_folder_dataset(tmp_path: Path):
    """Factory: class folders ``root/<class>/img_<i>.jpg`` with ``per_class`` images each."""

    def make(
        classes: tuple[str, ...] = ("audi", "bmw", "lada"), per_class: int = 5, name: str = "ds"
    ) -> Path:
        root = tmp_path / name
        for c, cls in enumerate(classes):
            for i in range(per_class):
                write_image(root / cls / f"img_{i}.jpg", seed=c * 100 + i)
        return root

    return make


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real cars-ru10 photos when ../shared is there, else generated toy images."""
    from carclassifier.demo_data import demo_dataset_root

    return demo_dataset_root(tmp_path_factory.mktemp("demo"))
