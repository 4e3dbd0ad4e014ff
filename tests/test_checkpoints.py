"""Torn and corrupt checkpoints: only a complete, checksummed checkpoint becomes the latest; a bad
one is skipped with a warning for the previous good one; two writers cannot both move the
pointer; a process that lost the stage's claim writes nothing."""

import json
import logging
import uuid

import numpy as np
import pytest
from conftest import tiny_model
from gcs_fault_proxy import FaultProxy

from carclassifier import checkpoints, storage
from carclassifier.checkpoints import (
    CLAIM,
    StageConflictError,
    read_checkpoint,
    write_checkpoint,
)
from carclassifier.errors import StorageError


@pytest.fixture(scope="module")
def model():
    built = tiny_model()
    built.compile(optimizer="adam", loss="categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    built.fit(x, np.eye(3, dtype="float32")[[0, 1, 2, 0]], epochs=1, verbose=0)  # optimizer state
    return built


def _write_epochs(out, model, tmp_path, epochs=(1, 2, 3), keep=1):
    for epoch in epochs:
        write_checkpoint(out, epoch, model, {"epoch": epoch, "history": {}}, tmp_path, keep=keep)


def test_two_checkpoints_are_kept_and_the_pointer_names_the_newest(model, tmp_path):
    out = tmp_path / "stage"
    _write_epochs(str(out), model, tmp_path)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "epoch-0002", "epoch-0003", "latest.json",
    ]  # fmt: skip
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    manifest = json.loads((out / "checkpoints" / "epoch-0003" / "checkpoint.json").read_text())
    assert pointer == manifest and pointer["epoch"] == 3
    assert pointer["sha256"] == storage.sha256_file(out / "checkpoints/epoch-0003/model.keras")
    assert pointer["state_sha256"] == storage.sha256_file(out / "checkpoints/epoch-0003/state.json")


@pytest.mark.parametrize("damage", ["truncate model", "corrupt state", "delete state"])
def test_a_bad_newest_checkpoint_falls_back_to_the_previous_one(model, tmp_path, caplog, damage):
    out = tmp_path / "stage"
    _write_epochs(str(out), model, tmp_path)
    newest = out / "checkpoints" / "epoch-0003"
    if damage == "truncate model":
        data = (newest / "model.keras").read_bytes()
        (newest / "model.keras").write_bytes(data[: len(data) // 2])
    elif damage == "corrupt state":
        (newest / "state.json").write_text('{"epoch": 3, "history": {"loss": [9]}}')
    else:
        (newest / "state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="carclassifier.checkpoints"):
        restored, state = read_checkpoint(str(out), tmp_path / "read")
    assert state["epoch"] == 2
    assert restored.get_weights()[0].shape == model.get_weights()[0].shape
    text = caplog.text
    assert "epoch-0003" in text and "falling back to the previous good checkpoint" in text
    assert ("does not match its checksum" in text) != (damage == "delete state")


def test_an_uncommitted_newer_folder_is_ignored_and_a_broken_pointer_is_survived(
    model, tmp_path, caplog
):
    out = tmp_path / "stage"
    _write_epochs(str(out), model, tmp_path, epochs=(1, 2))
    torn = out / "checkpoints" / "epoch-0003"  # killed while uploading epoch 3
    torn.mkdir()
    (torn / "model.keras").write_bytes(b"half a zip")
    assert read_checkpoint(str(out), tmp_path / "a")[1]["epoch"] == 2
    (out / "checkpoints" / "latest.json").write_text('{"epoch": 2, "di')  # torn pointer
    with caplog.at_level(logging.WARNING, logger="carclassifier.checkpoints"):
        assert read_checkpoint(str(out), tmp_path / "b")[1]["epoch"] == 2
    assert "latest.json is unreadable" in caplog.text


def test_no_good_checkpoint_is_a_clear_error(model, tmp_path):
    out = tmp_path / "stage"
    _write_epochs(str(out), model, tmp_path, epochs=(1, 2))
    for folder in ("epoch-0001", "epoch-0002"):
        (out / "checkpoints" / folder / "model.keras").write_bytes(b"x")
    with pytest.raises(StorageError, match=r"no checkpoint under .* matches its checksum; delete"):
        read_checkpoint(str(out), tmp_path / "read")


def test_gcs_checkpoints_fall_back_and_pointer_moves_are_conditional(
    model, tmp_path, gcs_emulator, monkeypatch, caplog
):
    with FaultProxy(gcs_emulator) as proxy:  # enforces ifGenerationMatch, as GCS does
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        bucket = storage.gcs_client().create_bucket(f"ckpt-{uuid.uuid4().hex[:8]}")
        out = f"gs://{bucket.name}/run/stages/stage_1"
        _write_epochs(out, model, tmp_path)
        names = sorted(b.name for b in bucket.list_blobs())
        assert [n for n in names if "epoch-0001" in n] == []
        assert f"run/stages/stage_1/checkpoints/epoch-0002/{checkpoints.MANIFEST}" in names
        bucket.blob("run/stages/stage_1/checkpoints/epoch-0003/model.keras").upload_from_string(
            b"truncated"
        )
        with caplog.at_level(logging.WARNING, logger="carclassifier.checkpoints"):
            assert read_checkpoint(out, tmp_path / "read")[1]["epoch"] == 2
        assert "falling back" in caplog.text

        # Another writer moves the pointer between our read of its generation and our write.
        real = storage.read_versioned

        def stale_read(uri):
            text, generation = real(uri)
            if uri.endswith("latest.json"):
                storage.write_text(uri, text)  # the other writer
            return text, generation

        monkeypatch.setattr(storage, "read_versioned", stale_read)
        with pytest.raises(StageConflictError, match="moved by another writer while epoch 4"):
            write_checkpoint(out, 4, model, {"epoch": 4}, tmp_path, keep=1)
        assert any(s[2] == "412" for s in proxy.seen)


def test_a_process_that_lost_the_claim_writes_no_checkpoint(model, tmp_path):
    out = tmp_path / "stage"
    storage.write_text(str(out / CLAIM), json.dumps({"fingerprint": "f", "owner": "new-pod"}))
    with pytest.raises(StageConflictError, match="taken over by another process .*new-pod"):
        write_checkpoint(str(out), 1, model, {"epoch": 1}, tmp_path, keep=2, owner="old-pod")
    assert not (out / "checkpoints").exists()
    write_checkpoint(str(out), 1, model, {"epoch": 1}, tmp_path, keep=2, owner="new-pod")
    assert (out / "checkpoints" / "latest.json").is_file()


def test_mid_epoch_checkpoints_are_ordered_kept_and_leftovers_discarded(model, tmp_path):
    out = tmp_path / "stage"
    for epoch, step in ((1, 0), (1, 2), (2, 0)):
        write_checkpoint(str(out), epoch, model, {"epoch": epoch, "step": step}, tmp_path,
                         keep=2, step=step)  # fmt: skip
    folders = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert folders == ["epoch-0001-step-000002", "epoch-0002", "latest.json"]
    write_checkpoint(str(out), 2, model, {"epoch": 2, "step": 1}, tmp_path, keep=2, step=1)
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert (pointer["epoch"], pointer["step"], pointer["dir"]) == (2, 1, "epoch-0002-step-000001")
    torn = out / "checkpoints" / "epoch-0002-step-000003"  # a killed attempt's upload
    torn.mkdir()
    (torn / "model.keras").write_bytes(b"half")
    assert read_checkpoint(str(out), tmp_path / "read")[1] == {"epoch": 2, "step": 1}
    checkpoints.discard_newer(str(out), (2, 1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "epoch-0002", "epoch-0002-step-000001", "latest.json",
    ]  # fmt: skip
