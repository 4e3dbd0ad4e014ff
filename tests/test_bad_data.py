"""Bad data in the training set (issue #6, fault 4): every kind of broken file and broken label
row is excluded and reported by name — in validation.json, the printed summary and the EDA page —
odd colour modes are converted and trained on, the split never lists an excluded file, and a
dataset with too little left stops before training with the counts and the minimum. A 1-epoch
training through the CLI on the bad dataset ends normally."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_image
from PIL import Image

from carclassifier.cli import main
from carclassifier.data import inspect_image, load_dataset, load_image, validate_dataset

CLASSES = ("audi", "bmw", "lada")


def png_header_bomb(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A 60-byte PNG whose header declares ``width`` x ``height`` (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def real_png_bomb(path: Path) -> Path:
    """A genuine, fully valid 9000x9000 PNG (81 Mpx) that compresses to ~10 kB."""
    Image.new("1", (9000, 9000)).save(path, "PNG")
    return path


def sixteen_bit_gray(path: Path) -> Path:
    """A 16-bit grayscale PNG (mode I;16) with mid-gray values (PIL alone would give white)."""
    pixels = np.random.default_rng(3).integers(20000, 40000, (40, 48), dtype=np.uint16)
    Image.fromarray(pixels).save(path, "PNG")
    return path


BAD_FILES = {
    "audi/corrupt.jpg": "corrupt_image",
    "audi/truncated.jpg": "corrupt_image",
    "bmw/empty.jpg": "empty_file",
    "bmw/notes.png": "not_an_image",
    "lada/bomb_header.png": "too_large",
    "lada/bomb_real.png": "too_large",
}
ODD_MODES = {
    "audi/gray.jpg": "L",
    "bmw/cmyk.jpg": "CMYK",
    "lada/alpha.png": "RGBA",
    "lada/gray16.png": "I;16",
    "bmw/palette.png": "P",
}


def make_bad_folder_dataset(root: Path, per_class: int = 4) -> Path:
    """Class folders with ``per_class`` good photos each, every bad kind and every odd mode."""
    for c, cls in enumerate(CLASSES):
        for i in range(per_class):
            write_image(root / cls / f"img_{i}.jpg", seed=c * 100 + i)
    (root / "audi" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg at all")
    good = (root / "audi" / "img_0.jpg").read_bytes()
    (root / "audi" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "bmw" / "empty.jpg").write_bytes(b"")
    (root / "bmw" / "notes.png").write_text("a text file with an image name")
    png_header_bomb(root / "lada" / "bomb_header.png")
    real_png_bomb(root / "lada" / "bomb_real.png")
    write_image(root / "audi" / "gray.jpg", mode="L", seed=7)
    write_image(root / "bmw" / "cmyk.jpg", mode="CMYK", seed=8)
    write_image(root / "lada" / "alpha.png", mode="RGBA", fmt="PNG", seed=9)
    write_image(root / "bmw" / "palette.png", mode="P", fmt="PNG", seed=10)
    sixteen_bit_gray(root / "lada" / "gray16.png")
    return root


def test_each_bad_file_is_excluded_with_its_kind_and_odd_modes_are_kept(tmp_path):
    root = make_bad_folder_dataset(tmp_path / "ds")
    report = validate_dataset(load_dataset(root), workers=2, progress=False)
    excluded = dict(zip(report.excluded["path"], report.excluded["reason"], strict=True))
    assert set(excluded) == set(BAD_FILES)
    kinds = {f.path: f.kind for f in report.errors()}
    assert kinds == BAD_FILES
    assert "900000000 pixels" in excluded["lada/bomb_header.png"]  # 30000 x 30000
    assert "9000x9000 px is over the 80,000,000 pixel limit" in excluded["lada/bomb_real.png"]
    usable = set(report.usable["path"])
    assert set(ODD_MODES) <= usable and not usable & set(BAD_FILES)
    modes = dict(zip(report.usable["path"], report.usable["mode"], strict=True))
    assert {p: modes[p] for p in ODD_MODES} == ODD_MODES
    warned = {f.path for f in report.findings if f.kind == "not_rgb"}
    assert warned == set(ODD_MODES)
    assert report.class_counts == {"audi": 5, "bmw": 6, "lada": 6}


@pytest.mark.parametrize("rel", sorted(ODD_MODES))
def test_odd_modes_load_as_rgb_with_their_content(tmp_path, rel):
    root = make_bad_folder_dataset(tmp_path / "ds", per_class=1)
    array = load_image(root / rel, (32, 32))
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    # Random content stays random: neither clipped to white/black nor a constant image.
    assert 40 < array.mean() < 215 and array.std() > 5, (rel, array.mean(), array.std())


def test_sixteen_bit_and_float_grayscale_are_scaled_not_clipped(tmp_path):
    gray16 = load_image(sixteen_bit_gray(tmp_path / "g16.png"), (40, 48))
    # 20000..40000 of 65535 -> about 78..156 of 255
    assert 70 < gray16.min() and gray16.max() < 165
    floats = np.linspace(0.0, 1.0, 40 * 48, dtype=np.float32).reshape(40, 48)
    Image.fromarray(floats, "F").save(tmp_path / "f.tif")
    loaded = load_image(tmp_path / "f.tif", (40, 48))
    assert loaded.min() <= 1 and loaded.max() >= 254


def test_a_header_bomb_is_refused_before_decoding(tmp_path):
    info = inspect_image(png_header_bomb(tmp_path / "b.png", 100_000, 100_000))
    assert info.kind == "too_large" and info.error and "pixel limit" in info.error
    assert (tmp_path / "b.png").stat().st_size < 200


def make_bad_kaggle_dataset(root: Path) -> Path:
    """The Kaggle layout with every kind of broken train.csv row."""
    rows = []
    for c in ("0", "1", "2"):
        for i in range(3):
            write_image(root / "train" / c / f"{c}{i}.jpg", seed=int(c) * 10 + i)
            rows.append((f"{c}{i}.jpg", c))
    write_image(root / "train" / "1" / "twice.jpg", seed=50)
    write_image(root / "train" / "2" / "disputed.jpg", seed=51)
    write_image(root / "train" / "0" / "unlabelled.jpg", seed=52)
    rows += [
        ("twice.jpg", "1"),
        ("twice.jpg", "1"),  # duplicate, same label: used once
        ("disputed.jpg", "2"),
        ("disputed.jpg", "0"),  # duplicate, conflicting labels: excluded
        ("unlabelled.jpg", ""),  # missing label
        ("00.jpg", "7"),  # unknown label (and a duplicate id of 00.jpg with another label)
        ("ghost.jpg", "1"),  # listed, no file
        ("../../etc/passwd", "1"),  # path traversal through the id
        ("", "2"),  # empty id
    ]
    pd.DataFrame(rows, columns=["Id", "Category"]).to_csv(root / "train.csv", index=False)
    return root


def test_broken_csv_rows_are_excluded_and_named(tmp_path):
    root = make_bad_kaggle_dataset(tmp_path / "kaggle")
    report = validate_dataset(load_dataset(root), progress=False)
    findings = {(f.kind, f.path): f for f in report.findings}
    assert findings[("duplicate_id", "twice.jpg")].severity == "warning"
    assert findings[("conflicting_labels", "disputed.jpg")].severity == "error"
    assert findings[("conflicting_labels", "00.jpg")].severity == "error"
    assert ("missing_label", "unlabelled.jpg") in findings
    assert ("missing_file", "ghost.jpg") in findings
    assert ("bad_id", "'../../etc/passwd'") in findings
    assert ("bad_id", "''") in findings
    usable = list(report.usable["path"])
    assert usable.count("train/1/twice.jpg") == 1
    for gone in ("disputed.jpg", "unlabelled.jpg", "00.jpg", "passwd"):
        assert not [p for p in usable if p.endswith(gone)], gone
    excluded = set(report.excluded["path"])
    assert {"disputed.jpg", "00.jpg", "unlabelled.jpg", "ghost.jpg"} <= excluded
    assert "twice.jpg" not in excluded  # kept once, so not excluded
    # A conflicting or unlabelled id is reported once, not again as "file without id".
    orphans = {f.path for f in report.findings if f.kind == "file_without_id"}
    assert not orphans & {"train/2/disputed.jpg", "train/0/unlabelled.jpg"}


def test_labels_csv_paths_cannot_leave_the_dataset(tmp_path):
    root = tmp_path / "ds"
    secret = write_image(tmp_path / "outside.jpg", seed=1)
    rows = []
    for c, cls in enumerate(("a", "b")):
        for i in range(2):
            write_image(root / cls / f"{i}.jpg", seed=c * 10 + i)
            rows.append((f"{cls}/{i}.jpg", cls, c))
    rows += [("../outside.jpg", "a", 0), (str(secret), "b", 1), ("a/../../outside.jpg", "a", 0)]
    pd.DataFrame(rows, columns=["path", "class_name", "class_id"]).to_csv(
        root / "labels.csv", index=False
    )
    report = validate_dataset(load_dataset(root), progress=False)
    bad = {f.path for f in report.findings if f.kind == "bad_path"}
    assert bad == {"'../outside.jpg'", repr(str(secret)), "'a/../../outside.jpg'"}
    assert len(report.usable) == 4 and not report.usable["path"].str.contains("outside").any()


def test_prepare_writes_a_split_without_the_bad_files_and_reports_them(tmp_path, capsys):
    root = make_bad_folder_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    assert main(["prepare", "--data", str(root), "--out", str(out)]) == 0
    validation = json.loads((out / "validation.json").read_text())
    assert {e["path"] for e in validation["excluded"]} == set(BAD_FILES)
    assert {f["path"] for f in validation["findings"] if f["severity"] == "error"} == set(BAD_FILES)
    split = pd.read_csv(out / "split.csv")
    assert not set(split["path"]) & set(BAD_FILES)
    assert set(ODD_MODES) <= set(split["path"])
    assert len(split) == validation["usable"] == 17

    # The validate command prints the count and the names.
    assert main(["validate", "--data", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "17 usable images" in printed and "6 excluded" in printed
    for name in ("audi/corrupt.jpg", "bmw/empty.jpg", "bmw/notes.png", "lada/bomb_header.png"):
        assert name in printed


def test_eda_page_lists_the_excluded_files(tmp_path):
    root = make_bad_folder_dataset(tmp_path / "ds", per_class=3)
    out = tmp_path / "run"
    assert main(["eda", "--data", str(root), "--out", str(out)]) == 0
    page = (out / "eda" / "eda.html").read_text()
    for name in BAD_FILES:
        assert name in page, name


def test_too_little_left_stops_before_training_with_the_counts(tmp_path, capsys):
    root = tmp_path / "ds"
    for i in range(3):
        write_image(root / "audi" / f"{i}.jpg", seed=i)
    write_image(root / "bmw" / "only.jpg", seed=10)
    (root / "bmw" / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    png_header_bomb(root / "bmw" / "bomb.png")
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert "Traceback" not in err
    assert err.startswith("error: too few usable images in class(es) {'bmw': 1}")
    assert "4 usable image(s) left, 2 excluded" in err and "the minimum is 2 per class" in err
    assert (out / "validation.json").is_file() and not (out / "split.csv").exists()
    assert not (out / "stages").exists()  # nothing trained


def test_one_epoch_training_on_the_bad_dataset_ends_normally(tmp_path, capsys):
    root = make_bad_folder_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    stage = "stages=[{name: s1, epochs: 1, unfreeze: 0.0, learning_rate: 0.01}]"
    args = ["--data", str(root), "--out", str(out), "--set", "model.weights=null",
            "--set", "input.image_size=32", "--set", "input.batch_size=8", "--set", stage]  # fmt: skip
    assert main(["train", *args]) == 0
    metrics = json.loads((out / "stages" / "s1" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1
    assert (out / "stages" / "s1" / "best.keras").is_file()
    assert "| s1 |" in capsys.readouterr().out
