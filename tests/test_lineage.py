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


def test_prepare_leaves_leaking_training_photos_out_and_records_the_data_version(tmp_path):
    """validate_and_split: a re-saved copy of a photo that lands in training while the original
    is validated is left out of split.csv and listed in leaks.csv."""
    from carclassifier.config import load_config
    from carclassifier.prepare import validate_and_split

    root = tmp_path / "cars"
    for c, name in enumerate(("audi", "bmw")):
        for i in range(5):
            original = write_image(root / name / f"img_{i}.jpg", (96, 64), seed=c * 100 + i)
            with Image.open(original) as image:
                image.save(root / name / f"copy_{i}.jpg", quality=50)
    config = load_config(None, [f"data.root={root}", "data.val_fraction=0.3"])
    prepared = validate_and_split(config, tmp_path / "out", progress=False)
    assert prepared.leaks, "some original/copy pair is split between train and val"
    train = set(prepared.subset("train")["path"])
    assert all(leak.train not in train for leak in prepared.leaks)
    listed = pd.read_csv(tmp_path / "out" / "leaks.csv")
    assert set(listed["train"]) == {leak.train for leak in prepared.leaks}
    assert prepared.data_version and prepared.data_version.startswith("sha256:")
    off = validate_and_split(
        load_config(None, [f"data.root={root}", "data.val_fraction=0.3", "data.leak_check=false"]),
        tmp_path / "off",
        progress=False,
    )
    assert not off.leaks and len(off.split) == len(prepared.split) + len(
        {leak.train for leak in prepared.leaks}
    )
