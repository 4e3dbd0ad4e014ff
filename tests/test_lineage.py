"""Data version and train/validation leakage (carclassifier.lineage) on real photos."""

import io
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_image
from PIL import Image

from carclassifier.demo_data import shared_dir
from carclassifier.lineage import data_version, find_leaks, without_leaks


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    """Six different photos: real car photos when ../shared/data is here, else random images."""
    shared = shared_dir()
    found = sorted((shared / "data" / "cars-ru10").rglob("*.jpg"))[::40][:6] if shared else []
    out = []
    for i in range(6):
        target = tmp_path / "data" / f"c{i % 2}" / f"p{i}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        if len(found) == 6:
            shutil.copy(found[i], target)
        else:
            write_image(target, (96, 64), seed=i)
        out.append(target)
    return out


def test_data_version_follows_the_content_not_the_order(photos, tmp_path):
    root = tmp_path / "data"
    paths = [str(p.relative_to(root)) for p in photos]
    labels = [p.parent.name for p in photos]
    version = data_version(root, paths, labels)
    assert version.startswith("sha256:") and len(version) == 7 + 16
    assert data_version(root, paths[::-1], labels[::-1]) == version
    assert data_version(root, paths[:-1], labels[:-1]) != version  # a photo fewer
    assert data_version(root, paths, labels[:-1] + ["c9"]) != version  # a label changed
    photos[0].write_bytes(photos[0].read_bytes() + b"\0")  # a photo's bytes changed
    assert data_version(root, paths, labels) != version


def test_a_recompressed_copy_of_a_validation_photo_in_training_is_found_and_left_out(
    photos, tmp_path
):
    root = tmp_path / "data"
    held = photos[0]
    copy = root / "c0" / "reupload.jpg"
    buffer = io.BytesIO()
    with Image.open(held) as image:
        image.convert("RGB").resize((image.width // 2, image.height // 2)).save(
            buffer, "JPEG", quality=40
        )
    copy.write_bytes(buffer.getvalue())
    train = [str(p.relative_to(root)) for p in photos[1:]] + ["c0/reupload.jpg"]
    leaks = find_leaks(root, train, {"val": ["c0/p0.jpg"], "test": []})
    assert [(x.train, x.held_out, x.subset) for x in leaks] == [
        ("c0/reupload.jpg", "c0/p0.jpg", "val")
    ]
    assert leaks[0].distance <= 6
    split = pd.DataFrame(
        {"path": [*train, "c0/p0.jpg"], "subset": ["train"] * len(train) + ["val"]}
    )
    kept = without_leaks(split, leaks)
    assert "c0/reupload.jpg" not in set(kept["path"]) and "c0/p0.jpg" in set(kept["path"])
    assert len(kept) == len(split) - 1
