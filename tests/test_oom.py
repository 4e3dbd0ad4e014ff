"""Out of device memory inside fit: a clear error naming the stage, batch and image size and a
smaller batch to try; the checkpoint so far is kept and a rerun with that batch resumes."""

import json

import pytest
import tensorflow as tf
from test_preemption import small_init_model

from carclassifier import checkpoints
from carclassifier.config import load_config
from carclassifier.prepare import validate_and_split
from carclassifier.stages import StageOutOfMemoryError, run_stage

STAGE = "stages=[{name: stage_1, epochs: 2, unfreeze: 0.5, learning_rate: 0.01}]"


def _config(out, data, *extra):
    return load_config(None, [f"data.root={data}", f"output_dir={out}", "model.weights=null",
                              "input.image_size=32", "input.batch_size=4", STAGE, *extra])  # fmt: skip


def test_out_of_memory_names_the_batch_and_keeps_the_checkpoint(
    make_folder_dataset, tmp_path, monkeypatch, caplog
):
    data = make_folder_dataset(per_class=4)
    config = _config(tmp_path / "run", data)
    prepared = validate_and_split(config, tmp_path / "run", progress=False)
    init = str(small_init_model(tmp_path / "init.keras"))
    out = str(tmp_path / "run" / "stages" / "stage_1")

    begin = checkpoints.StageCheckpoint.on_epoch_begin

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch
        begin(self, epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        if self.current == 1:  # the allocator fails in epoch 2, as a too large batch would
            raise tf.errors.ResourceExhaustedError(
                None, None, "OOM when allocating tensor with shape[4,32,32,3] on /device:GPU:0"
            )

    monkeypatch.setattr(checkpoints.StageCheckpoint, "on_epoch_begin", on_epoch_begin)
    monkeypatch.setattr(checkpoints.StageCheckpoint, "on_train_batch_end", on_train_batch_end)
    with pytest.raises(StageOutOfMemoryError) as error:
        run_stage(config, "stage_1", prepared, out, init)
    message = str(error.value)
    assert "stage_1 ran out of device memory at batch size 4 with 32x32 px images" in message
    assert "try batch size 2 (--set stages.stage_1.batch_size=2)" in message
    assert "the checkpoint of epoch 1" in message and "a rerun resumes from it" in message
    assert "\n" not in message
    assert isinstance(error.value.__cause__, tf.errors.ResourceExhaustedError)
    latest = json.loads((tmp_path / "run/stages/stage_1/checkpoints/latest.json").read_text())
    assert latest["epoch"] == 1

    monkeypatch.undo()
    smaller = _config(tmp_path / "run", data, "stages.stage_1.batch_size=2")
    with caplog.at_level("INFO", logger="carclassifier"):
        result = run_stage(smaller, "stage_1", prepared, out, init)
    assert "(epoch 1 done)" in caplog.text and "batch 2" in caplog.text
    assert result.metrics["epochs_run"] == 2 and not result.skipped
