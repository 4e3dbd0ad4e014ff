"""The staged trainer: trainable fractions, checkpoints, resume after a kill, gs:// outputs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import keras
import numpy as np
import pytest

from carclassifier import storage
from carclassifier.checkpoints import read_checkpoint, write_checkpoint
from carclassifier.config import ModelConfig, load_config
from carclassifier.model import backbone_blocks, build_classifier, set_trainable
from carclassifier.prepare import validate_and_split
from carclassifier.stages import run_stage
from carclassifier.training_callbacks import _lr_factor

TINY_STAGES = (
    "stages=[{name: stage_1, epochs: 2, unfreeze: 0.0, learning_rate: 0.01},"
    " {name: stage_2, epochs: 1, unfreeze: 1.0, learning_rate: 0.001, image_size: 64}]"
)


def tiny_config(out, data, *extra):
    return load_config(None, [f"data.root={data}", f"output_dir={out}", "model.weights=null",
                              "input.image_size=32", "input.batch_size=4", TINY_STAGES, *extra])  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model():
    return build_classifier(ModelConfig(weights=None), 3, 32)


@pytest.mark.parametrize(
    ("fraction", "blocks"), [(0.0, 0), (0.1, 2), (0.5, 8), (0.75, 12), (1.0, 16)]
)
def test_unfreeze_counts_whole_blocks_from_the_top(tiny_model, fraction, blocks):
    counts = set_trainable(tiny_model, fraction)
    assert counts["blocks_total"] == 16 and counts["blocks_unfrozen"] == blocks
    stem, all_blocks, top = backbone_blocks(tiny_model.get_layer("backbone"))

    def weighted(layers):
        return [
            x for x in layers if x.weights and not isinstance(x, keras.layers.BatchNormalization)
        ]

    for i, block in enumerate(all_blocks):
        expected = i >= 16 - blocks
        assert all(layer.trainable == expected for layer in weighted(block)), f"block {i}"
    assert all(layer.trainable == (fraction > 0) for layer in weighted(top))
    assert all(layer.trainable == (fraction == 1.0) for layer in weighted(stem))
    bns = [
        layer
        for layer in tiny_model.get_layer("backbone").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert not any(layer.trainable for layer in bns)
    assert tiny_model.get_layer("predictions").trainable


def test_batchnorm_trains_only_when_asked(tiny_model):
    set_trainable(tiny_model, 1.0, train_batchnorm=True)
    bns = [
        layer
        for layer in tiny_model.get_layer("backbone").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert all(layer.trainable for layer in bns)


def test_lr_schedules():
    config = load_config(None, ["stages=[{name: s, epochs: 5, unfreeze: 0, learning_rate: 0.1, "
                                "reduce_lr: {enabled: false}, schedule: {kind: cosine, min_lr_fraction: 0.1}}]"])  # fmt: skip
    stage = config.stages[0]
    factors = [_lr_factor(stage, e) for e in range(5)]
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors, factors[1:], strict=False))
    stepped = stage.model_copy(
        update={"schedule": stage.schedule.model_copy(update={"kind": "step", "step_epochs": 2})}
    )
    assert [_lr_factor(stepped, e) for e in range(5)] == [1, 1, 0.5, 0.5, 0.25]


def test_checkpoint_round_trip_keeps_weights_and_optimizer_state(tmp_path):
    model = build_classifier(ModelConfig(weights=None), 3, 32)
    set_trainable(model, 0.5)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"]
    )
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = np.eye(3, dtype="float32")[[0, 1, 2, 0, 1, 2, 0, 1]]
    model.fit(x, y, epochs=1, verbose=0)
    out = str(tmp_path / "stage")
    for epoch in (1, 2):
        write_checkpoint(out, epoch, model, {"epoch": epoch, "history": {}}, tmp_path, keep=1)
    assert (tmp_path / "stage" / "checkpoints" / "epoch-0001").exists()  # the previous good one
    restored, state = read_checkpoint(out, tmp_path / "read")
    assert state["epoch"] == 2
    for a, b in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    saved_opt = [v.numpy() for v in model.optimizer.variables]
    loaded_opt = [v.numpy() for v in restored.optimizer.variables]
    assert len(saved_opt) == len(loaded_opt) > 2
    for a, b in zip(saved_opt, loaded_opt, strict=True):
        np.testing.assert_array_equal(a, b)


def test_corrupt_checkpoint_is_detected(tmp_path, tiny_model):
    tiny_model.compile(optimizer="adam", loss="categorical_crossentropy")
    out = str(tmp_path / "stage")
    write_checkpoint(out, 1, tiny_model, {"epoch": 1}, tmp_path, keep=1)
    target = tmp_path / "stage" / "checkpoints" / "epoch-0001" / "model.keras"
    target.write_bytes(target.read_bytes()[:1000])
    from carclassifier.errors import StorageError

    with pytest.raises(StorageError, match="checksum"):
        read_checkpoint(out, tmp_path / "read")


KILL_AFTER_FIRST_EPOCH = textwrap.dedent(
    """
    import os, signal, sys
    from carclassifier import checkpoints
    original = checkpoints.StageCheckpoint.on_epoch_end
    def on_epoch_end(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # preempted right after epoch 1's checkpoint
    checkpoints.StageCheckpoint.on_epoch_end = on_epoch_end
    from carclassifier.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_killed_stage_resumes_after_its_last_epoch(make_folder_dataset, tmp_path):
    data = make_folder_dataset(per_class=4)
    out = tmp_path / "run"
    validate_and_split(tiny_config(out, data), out, progress=False)
    stage_out = out / "stages" / "stage_1"
    args = ["train-stage", "--data", str(data), "--out", str(out), "--split", str(out / "split.csv"),
            "--set", "model.weights=null", "--set", "input.image_size=32", "--set", "input.batch_size=4",
            "--set", TINY_STAGES.replace("epochs: 2", "epochs: 3", 1), "--stage", "stage_1",
            "--stage-out", str(stage_out)]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_EPOCH, *args], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert json.loads((stage_out / "checkpoints" / "latest.json").read_text())["epoch"] == 1
    assert not (stage_out / "metrics.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "carclassifier.cli", *args], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint" in resumed.stderr and "(epoch 1 done)" in resumed.stderr
    assert "stage_1 epoch 1/3" not in resumed.stderr and "stage_1 epoch 2/3" in resumed.stderr
    metrics = json.loads((stage_out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3
    history = (stage_out / "history.csv").read_text().splitlines()
    assert len(history) == 4  # header + 3 epochs, the first from before the kill


def test_stage_outputs_to_gcs_and_reruns_are_skipped(make_folder_dataset, tmp_path, gcs_emulator):
    data = make_folder_dataset(per_class=4)
    config = tiny_config(
        tmp_path / "run",
        data,
        "stages=[{name: stage_1, epochs: 1, unfreeze: 0.0, learning_rate: 0.01}]",
    )
    prepared = validate_and_split(config, tmp_path / "run", progress=False)
    bucket = storage.gcs_client().create_bucket(f"ckpt-{uuid.uuid4().hex[:8]}")
    out = f"gs://{bucket.name}/run-1/stages/stage_1"
    result = run_stage(config, "stage_1", prepared, out, init=None)
    names = {b.name for b in bucket.list_blobs()}
    expected = {"best.keras", "metrics.json", "history.csv", "Train_Val_acc_stage_1.png",
                "Train_Val_loss_stage_1.png", "checkpoints/latest.json",
                "checkpoints/epoch-0001/model.keras", "checkpoints/epoch-0001/state.json"}  # fmt: skip
    assert {f"run-1/stages/stage_1/{n}" for n in expected} <= names
    assert result.best_model == f"{out}/best.keras" and not result.skipped
    again = run_stage(config, "stage_1", prepared, out, init=None)
    assert again.skipped and again.metrics == result.metrics


def test_all_stages_end_to_end_on_tiny_images(make_folder_dataset, tmp_path):
    from carclassifier.local_run import run_local

    data = make_folder_dataset(per_class=5)
    (data / "test_upload").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (data / "test_upload" / name).write_bytes((data / "audi" / "img_0.jpg").read_bytes())
    out = tmp_path / "run"
    summary = run_local(tiny_config(out, data, "augment.tta_views=2"), progress=False)
    assert [s["stage"] for s in summary.stages] == ["stage_1", "stage_2"]
    assert [s["epochs_run"] for s in summary.stages] == [2, 1]
    assert summary.stages[1]["image_size"] == 64
    for stage in ("stage_1", "stage_2"):
        for name in ("best.keras", "history.csv", "metrics.json", f"Train_Val_acc_{stage}.png"):
            assert (out / "stages" / stage / name).is_file(), (stage, name)
    evaluation = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert evaluation["tta"]["views"] == 2
    assert summary.tta_gain == pytest.approx(evaluation["tta"]["accuracy"] - evaluation["accuracy"])
    assert (out / "export" / "saved_model" / "1" / "saved_model.pb").is_file() and (
        out / "export" / "labels.json"
    ).is_file()
    labels = json.loads((out / "export" / "labels.json").read_text())
    assert labels["tta"]["views"] == 2  # the recipe's TTA, for predict --tta and the server
    submission = (out / "submission.csv").read_text().splitlines()
    assert submission[0] == "Id,Category" and len(submission) == 3
    assert "| stage_2 |" in (out / "summary.md").read_text()
    assert (
        "| attempts | minutes lost to preemption | minutes checkpointing |"
        in (out / "summary.md").read_text()
    )
    first = summary.stages[0]  # one uninterrupted attempt, one checkpoint per epoch
    assert (first["attempts"], first["preemptions"], first["checkpoints_written"]) == (1, 0, 2)
    assert first["minutes_lost_to_preemption"] == 0 and first["checkpoint_seconds"] > 0
    assert first["checkpoint_every"] == "epoch" and first["checkpoint_interval_minutes"] is None
    assert "robustness (" in (out / "summary.md").read_text()
    assert summary.robustness == evaluation["robustness"]["metrics"]
    assert (out / "evaluation" / "robustness.html").is_file()
    assert Path(summary.eda).is_file()
