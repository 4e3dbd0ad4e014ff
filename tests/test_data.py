from pathlib import Path

import pandas as pd
import pytest
from conftest import write_image

from carclassifier.data import (
    inspect_image,
    load_dataset,
    make_split,
    read_split,
    validate_dataset,
    write_split,
)
from carclassifier.demo_data import real_demo_root
from carclassifier.errors import DatasetError


def kinds(findings):
    return {(f.kind, f.path) for f in findings}


def test_folder_layout_labels_in_alphabetical_order(make_folder_dataset):
    root = make_folder_dataset(classes=("zaz", "audi", "lada"), per_class=2)
    (root / "audi" / "notes.txt").write_text("not an image")
    ds = load_dataset(root)
    assert ds.layout == "folders"
    assert ds.class_names == ["audi", "lada", "zaz"]
    assert set(zip(ds.records["class_name"], ds.records["label"], strict=True)) == {
        ("audi", 0),
        ("lada", 1),
        ("zaz", 2),
    }
    assert ("not_an_image", "audi/notes.txt") in kinds(ds.findings)
    assert len(ds.records) == 6


def make_kaggle_layout(root: Path) -> Path:
    for category in ("0", "1", "2"):
        for i in range(3):
            write_image(
                root / "train" / category / f"{category}{i}.jpg", seed=int(category) * 10 + i
            )
    write_image(root / "train" / "1" / "orphan.jpg", seed=99)
    rows = [(f"{c}{i}.jpg", c) for c in ("0", "1", "2") for i in range(3)]
    rows += [("00.jpg", "0"), ("ghost.jpg", "2"), ("x.jpg", "12")]
    pd.DataFrame(rows, columns=["Id", "Category"]).to_csv(root / "train.csv", index=False)
    write_image(root / "test_upload" / "t1.jpg", seed=5)
    pd.DataFrame({"Id": ["t1.jpg"], "Category": [0]}).to_csv(
        root / "sample_submission.csv", index=False
    )
    return root


def test_kaggle_layout_and_its_findings(tmp_path):
    ds = load_dataset(make_kaggle_layout(tmp_path / "kaggle"))
    assert ds.layout == "kaggle"
    assert ds.class_names == ["0", "1", "2"]
    assert sorted(ds.records["label"].unique()) == [0, 1, 2]
    assert len(ds.records) == 9
    found = kinds(ds.findings)
    assert ("duplicate_id", "00.jpg") in found
    assert ("missing_file", "ghost.jpg") in found
    assert ("unknown_label", "x.jpg") in found
    assert ("file_without_id", "train/1/orphan.jpg") in found
    assert ds.test_dir == tmp_path / "kaggle" / "test_upload"
    assert ds.sample_submission is not None
    report = validate_dataset(ds, progress=False)
    assert set(report.excluded["path"]) >= {"ghost.jpg", "x.jpg"}


def test_kaggle_csv_without_the_right_columns(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train.csv").write_text("image,label\na.jpg,1\n")
    with pytest.raises(DatasetError, match="lacks column"):
        load_dataset(tmp_path)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no class subfolders"):
        load_dataset(tmp_path)


def test_bad_images_are_excluded_and_listed_never_raised(make_folder_dataset):
    root = make_folder_dataset(per_class=4)
    (root / "audi" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    good = (root / "audi" / "img_0.jpg").read_bytes()
    (root / "audi" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "bmw" / "empty.jpg").write_bytes(b"")
    (root / "bmw" / "text.png").write_text("hello")
    write_image(root / "lada" / "gray.jpg", mode="L")
    write_image(root / "lada" / "cmyk.jpg", mode="CMYK")
    write_image(root / "lada" / "alpha.png", mode="RGBA", fmt="PNG")
    report = validate_dataset(load_dataset(root), workers=2, progress=False)
    excluded = dict(zip(report.excluded["path"], report.excluded["reason"], strict=True))
    assert set(excluded) == {
        "audi/corrupt.jpg",
        "audi/truncated.jpg",
        "bmw/empty.jpg",
        "bmw/text.png",
    }
    assert "truncated" in excluded["audi/truncated.jpg"]
    assert "0 bytes" in excluded["bmw/empty.jpg"]
    assert "not an image" in excluded["bmw/text.png"]
    warned = {f.path: f.message for f in report.findings if f.kind == "not_rgb"}
    assert set(warned) == {"lada/gray.jpg", "lada/cmyk.jpg", "lada/alpha.png"}
    assert "CMYK" in warned["lada/cmyk.jpg"]
    assert report.class_counts == {"audi": 4, "bmw": 4, "lada": 7}
    assert len(report.usable) == 15
    assert {"width", "height", "mode", "bytes"} <= set(report.usable.columns)
    report.ensure_trainable(min_images_per_class=2)
    summary = report.summary()
    assert "4 excluded" in summary and "corrupt_image" in summary


def test_empty_class_is_reported(make_folder_dataset):
    root = make_folder_dataset(per_class=3)
    (root / "empty_model").mkdir()
    report = validate_dataset(load_dataset(root), progress=False)
    assert ("empty_class", "empty_model") in kinds(report.findings)
    with pytest.raises(DatasetError, match="too few usable images.*empty_model"):
        report.ensure_trainable()


def test_a_dataset_that_cannot_be_trained_on_stops(make_folder_dataset):
    root = make_folder_dataset(classes=("only",), per_class=3)
    (root / "broken").mkdir()
    (root / "broken" / "a.jpg").write_bytes(b"garbage")
    report = validate_dataset(load_dataset(root), progress=False)
    with pytest.raises(DatasetError, match="only 1 class"):
        report.ensure_trainable()


def test_huge_dimensions_are_excluded(tmp_path, monkeypatch):
    monkeypatch.setattr("carclassifier.data.MAX_IMAGE_PIXELS", 100)
    info = inspect_image(write_image(tmp_path / "big.png", size=(20, 20), fmt="PNG"))
    assert info.error is not None and "pixel limit" in info.error


def test_split_is_stratified_deterministic_and_round_trips(make_folder_dataset, tmp_path):
    root = make_folder_dataset(classes=("a", "b", "c"), per_class=10)
    (root / "d").mkdir()
    for i in range(2):
        write_image(root / "d" / f"{i}.jpg", seed=500 + i)
    records = load_dataset(root).records
    split = make_split(records, val_fraction=0.2, seed=7)
    val = split[split["subset"] == "val"]
    assert val.groupby("class_name").size().to_dict() == {"a": 2, "b": 2, "c": 2, "d": 1}
    assert split["path"].is_unique and len(split) == len(records)
    assert make_split(records.sample(frac=1, random_state=3), 0.2, seed=7).equals(split)
    assert not make_split(records, 0.2, seed=8).equals(split)
    path = write_split(split, tmp_path / "out" / "split.csv")
    assert read_split(path).equals(split[read_split(path).columns].reset_index(drop=True))
    with pytest.raises(DatasetError, match="val_fraction"):
        make_split(records, 1.0)


@pytest.mark.skipif(real_demo_root() is None, reason="../shared/data/cars-ru10 not present")
def test_real_cars_ru10_layout():
    ds = load_dataset(real_demo_root())
    assert ds.layout == "labels_csv"
    assert ds.class_names[:3] == ["honda_civic", "hyundai_accent", "hyundai_solaris"]
    assert ds.class_names[-1] == "toyota_camry"
    assert len(ds.records) == 787
    assert not [f for f in ds.findings if f.severity == "error"]
