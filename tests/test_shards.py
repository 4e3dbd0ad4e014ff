"""The image hand-off between pipeline tasks: tar shards in the Dataset artifact.

Why shards: the KFP v2 launcher copies an input artifact with one GET per object
(kubeflow/pipelines backend/src/v2/objectstore/object_store.go, DownloadBlob: ``bucket.List``
over the artifact's prefix, then ``downloadFile`` → ``bucket.NewReader`` per listed object, one
after another; the same at tags 2.2.0 and 2.17.0) and uploads an output file by file
(UploadBlob: ``os.ReadDir`` recursion, one ``bucket.NewWriter`` per file). So the number of
objects in the Dataset artifact is the number of round trips of every task that reads it.
benchmarks/data_handoff.py measures that pattern against the GCS emulator.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_image

from carclassifier import artifacts, shards, steps
from carclassifier.config import dump_config, load_config
from carclassifier.data import load_dataset, load_image, read_split
from carclassifier.errors import DatasetError


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _dirs(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir())


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """data/ in labels.csv layout with an empty folder, a long nested name, and test/."""
    root = tmp_path / "src"
    lines = ["path,class_name,class_id"]
    for c, name in enumerate(("audi", "bmw")):
        for i in range(6):
            write_image(root / "data" / name / f"img_{i}.jpg", seed=c * 10 + i)
            lines.append(f"{name}/img_{i}.jpg,{name},{c}")
    (root / "data" / "labels.csv").write_text("\n".join(lines) + "\n")
    (root / "data" / "empty").mkdir()
    write_image(root / "data" / ("x" * 60) / ("y" * 80) / "deep.png", seed=99, fmt="PNG")
    write_image(root / "test" / "t_0.jpg", seed=50)
    return root


def test_same_input_gives_the_same_shard_bytes(source: Path, tmp_path: Path) -> None:
    first = shards.write_shards(source, ["data", "test"], tmp_path / "a", shard_bytes=8_000)
    for path in sorted(source.rglob("*"), reverse=True):  # other mtimes and modes, same content
        path.chmod(0o700 if path.is_dir() else 0o600)
        os.utime(path, (1_700_000_000, 1_700_000_000))
    second = shards.write_shards(source, ["data", "test"], tmp_path / "b", shard_bytes=8_000)
    assert len(first) > 2, "the small shard size must split the images over several shards"
    assert first == second
    for shard in first:
        data = (tmp_path / "a" / shard.name).read_bytes()
        assert data == (tmp_path / "b" / shard.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
    assert shards.index_digest(tmp_path / "a") == shards.index_digest(tmp_path / "b")
    with tarfile.open(tmp_path / "a" / first[0].name) as tar:
        member = tar.getmembers()[0]
        assert (member.mtime, member.uid, member.uname) == (0, 0, "")


def test_round_trip_gives_identical_files_folders_images_and_labels(
    source: Path, tmp_path: Path
) -> None:
    packed = shards.write_shards(source, ["data", "test"], tmp_path / "shards", shard_bytes=8_000)
    out = shards.extract_shards(tmp_path / "shards", tmp_path / "out")
    assert _tree(out) == _tree(source) and _dirs(out) == _dirs(source)
    assert sum(s.members for s in packed) == len(_tree(source)) + len(_dirs(source))
    for rel in ("data/audi/img_3.jpg", "data/" + "x" * 60 + "/" + "y" * 80 + "/deep.png"):
        np.testing.assert_array_equal(
            load_image(out / rel, (16, 16)), load_image(source / rel, (16, 16))
        )


def _recipe() -> str:
    return dump_config(load_config(None, ["name=shards-test"]))


def test_prepare_hands_on_shards_and_later_steps_see_the_same_data(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Dataset artifact holds a few objects, not one per image, and a reading step gets
    the same records, labels, split and test images as from the folder itself."""
    monkeypatch.setenv(artifacts.SCRATCH_ENV, str(tmp_path / "scratch"))
    data = source / "data"
    write_image(data / "test_upload" / "t_1.jpg", seed=51)
    artifact = tmp_path / "artifact"
    manifest = steps.prepare_step(_recipe(), [], str(data), str(artifact))
    files = sorted(p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file())
    assert files == [
        "config.yaml", "dataset.json", "excluded.csv", "leaks.csv", "shards/images-00000.tar",
        "shards/index.json", "split.csv", "usable.csv", "validation.json",
    ]  # fmt: skip
    assert manifest["shards"] == 1 and manifest["test_dir"] == "data/test_upload"
    assert manifest["shards_sha256"] == shards.index_digest(artifact / "shards")

    config, prepared, read_back = artifacts.load_dataset_artifact(str(artifact))
    assert read_back == manifest
    root = prepared.dataset.root
    assert root.is_relative_to((tmp_path / "scratch").resolve())
    assert _tree(root) == _tree(data)
    assert prepared.dataset.class_names == ["audi", "bmw"]
    direct = load_dataset(data)
    pd.testing.assert_frame_equal(prepared.dataset.records, direct.records)
    assert prepared.dataset.layout == direct.layout == "labels_csv"
    pd.testing.assert_frame_equal(prepared.split, read_split(artifact / "split.csv"))
    assert len(prepared.split) == 12 and set(prepared.split["subset"]) == {"train", "val"}
    assert (root.parent / manifest["test_dir"] / "t_1.jpg").read_bytes() == (
        data / "test_upload" / "t_1.jpg"
    ).read_bytes()
    again = artifacts.images_root(str(artifact))
    assert again == root.parent  # unpacked once per pod
    assert json.loads((artifact / "dataset.json").read_text()) == manifest


def test_a_truncated_shard_is_a_clear_error_and_leaves_nothing(
    source: Path, tmp_path: Path
) -> None:
    packed = shards.write_shards(source, ["data"], tmp_path / "shards", shard_bytes=8_000)
    victim = tmp_path / "shards" / packed[1].name
    victim.write_bytes(victim.read_bytes()[:1500])
    with pytest.raises(DatasetError, match=rf"{packed[1].name} is 1500 bytes, but index.json says"):
        shards.extract_shards(tmp_path / "shards", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_altered_or_foreign_shard_is_a_clear_error(source: Path, tmp_path: Path) -> None:
    packed = shards.write_shards(source, ["data"], tmp_path / "shards")
    victim = tmp_path / "shards" / packed[0].name
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0xFF  # inside an image: the tar still reads
    victim.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="altered .*re-run the prepare step"):
        shards.extract_shards(tmp_path / "shards", tmp_path / "out")
    victim.write_bytes(b"\x01" * len(data))  # same size, not a tar
    with pytest.raises(DatasetError, match="not a readable tar"):
        shards.extract_shards(tmp_path / "shards", tmp_path / "out")
    (tmp_path / "shards" / shards.INDEX_FILE).unlink()
    with pytest.raises(DatasetError, match="has no image shards; re-run the prepare step"):
        shards.extract_shards(tmp_path / "shards", tmp_path / "out")


def test_a_damaged_shard_fails_the_reading_step_not_later(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(artifacts.SCRATCH_ENV, str(tmp_path / "scratch"))
    artifact = tmp_path / "artifact"
    steps.prepare_step(_recipe(), [], str(source / "data"), str(artifact))
    shard = artifact / "shards" / "images-00000.tar"
    shard.write_bytes(shard.read_bytes()[:-2048])
    with pytest.raises(DatasetError, match="images-00000.tar is .* bytes, but index.json says"):
        artifacts.load_dataset_artifact(str(artifact))
    assert list((tmp_path / "scratch").iterdir()) == []


@pytest.mark.parametrize("data_filter", [True, False], ids=["data-filter", "python-3.11.2"])
def test_a_member_pointing_outside_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_filter: bool
) -> None:
    """A shard whose index matches but whose member escapes the destination (``../``) is a
    DatasetError and writes nothing outside, also on a Python without tarfile's ``data``
    filter (Debian bookworm's 3.11.2 in the stand-in image: ``extract(filter=...)`` there
    was a TypeError that left every reading task of the image run without outputs)."""
    if not data_filter:
        monkeypatch.setattr(shards, "_DATA_FILTER", {})
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    payload = tmp_path / "payload.txt"
    payload.write_text("escaped")
    with tarfile.open(shard_dir / "images-00000.tar", "w") as tar:
        tar.add(payload, arcname="../escaped.txt")
    shard = shard_dir / "images-00000.tar"
    index = {"format": shards.FORMAT, "shards": [{
        "name": shard.name, "members": 1, "bytes": shard.stat().st_size,
        "sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
    }]}  # fmt: skip
    (shard_dir / shards.INDEX_FILE).write_text(json.dumps(index))
    (tmp_path / "out").mkdir()
    with pytest.raises(DatasetError, match="outside the destination"):
        shards.extract_shards(shard_dir, tmp_path / "out" / "dest")
    assert not (tmp_path / "out" / "escaped.txt").exists()
