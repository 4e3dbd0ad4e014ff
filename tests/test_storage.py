"""storage.local_copy against a real GCS protocol server on 127.0.0.1 (no mocks)."""

import numpy as np
import pytest

from carclassifier.errors import StorageError
from carclassifier.storage import local_copy, split_gcs_uri


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Each test downloads into its own cache folder."""
    monkeypatch.setenv("CARCLASSIFIER_CACHE", str(tmp_path / "cache"))


def test_gs_object_is_downloaded_once_into_the_cache(bucket, tmp_path):
    bucket.blob("weights/a.bin").upload_from_string(b"0123456789")
    path = local_copy(f"gs://{bucket.name}/weights/a.bin")
    assert path.read_bytes() == b"0123456789"
    assert not list(path.parent.glob("*.partial"))
    bucket.blob("weights/a.bin").delete()
    assert local_copy(f"gs://{bucket.name}/weights/a.bin") == path  # served from the cache


def test_missing_object_and_bad_uris_are_clear(bucket, tmp_path):
    with pytest.raises(StorageError, match="not found"):
        local_copy(f"gs://{bucket.name}/nope.h5")
    with pytest.raises(StorageError, match="names no object"):
        split_gcs_uri("gs://bucket-only")
    with pytest.raises(StorageError, match="does not exist"):
        local_copy(tmp_path / "missing.h5")


@pytest.mark.slow
def test_lite0_weights_from_a_gs_uri(bucket, tmp_path):
    from carclassifier.backbones import build_backbone

    original = build_backbone("efficientnet_lite0", 64, weights="imagenet")
    saved = tmp_path / "lite0.weights.h5"
    original.save_weights(saved)
    bucket.blob("models/lite0.weights.h5").upload_from_filename(str(saved))
    restored = build_backbone(
        "efficientnet_lite0", 64, weights=f"gs://{bucket.name}/models/lite0.weights.h5"
    )
    x = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(restored(x).numpy(), original(x).numpy(), atol=1e-6)


def test_trees_round_trip_through_gcs(bucket, tmp_path):
    source = tmp_path / "src"
    (source / "a" / "b").mkdir(parents=True)
    (source / "top.txt").write_text("1")
    (source / "a" / "b" / "deep.bin").write_bytes(b"\x00\x01")
    from carclassifier.storage import download_tree, upload_tree

    upload_tree(source, f"gs://{bucket.name}/data/set")
    copy = download_tree(f"gs://{bucket.name}/data/set", tmp_path / "copy")
    assert (copy / "top.txt").read_text() == "1"
    assert (copy / "a" / "b" / "deep.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(StorageError, match="nothing under"):
        download_tree(f"gs://{bucket.name}/nothing", tmp_path / "none")
