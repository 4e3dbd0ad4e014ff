"""Preemption: a stage killed (SIGKILL mid-epoch, SIGKILL during a checkpoint upload) or stopped
(SIGTERM, which checkpoints the step it stops at) and started again with the same arguments ends
with the weights of an uninterrupted run; so does a stage killed at every one of its steps in
turn, resuming each time from its last mid-epoch checkpoint.

Every interrupted run is the real ``carclassifier train-stage`` command in a subprocess; `DRIVER`
wraps it to inject the fault at an exact point (no sleeps) and turns on TensorFlow's op
determinism. The uninterrupted reference runs `run_stage` in the test process (without op
determinism: the tiny model's CPU kernels give the same numbers either way).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import write_image

from carclassifier import checkpoints
from carclassifier.config import load_config
from carclassifier.errors import PREEMPTED_EXIT_CODE
from carclassifier.prepare import validate_and_split
from carclassifier.stages import run_stage

EPOCHS = 3
STAGES = (
    f"stages=[{{name: stage_1, epochs: {EPOCHS}, unfreeze: 0.5, learning_rate: 0.01,"
    " reduce_lr: {enabled: false}}]"
)
SETTINGS = ["model.weights=null", "input.image_size=32", "input.batch_size=4", STAGES]

DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    import tensorflow as tf
    tf.config.experimental.enable_op_determinism()
    from carclassifier import checkpoints, storage
    fault = os.environ.get("FAULT", "")
    kind, _, where = fault.partition(":")
    if kind in ("sigkill-batch", "sigterm-batch"):
        epoch, batch = (int(x) for x in where.split(","))
        sig = signal.SIGKILL if kind == "sigkill-batch" else signal.SIGTERM
        begin = checkpoints.StageCheckpoint.on_epoch_begin
        batch_end = checkpoints.StageCheckpoint.on_train_batch_end
        def on_epoch_begin(self, e, logs=None):
            self.current = e + 1
            begin(self, e, logs)
        def on_train_batch_end(self, b, logs=None):
            batch_end(self, b, logs)
            if (self.current, self.position[1]) == (epoch, batch):
                os.kill(os.getpid(), sig)
        checkpoints.StageCheckpoint.on_epoch_begin = on_epoch_begin
        checkpoints.StageCheckpoint.on_train_batch_end = on_train_batch_end
    elif kind == "sigkill-upload":  # after model.keras is stored, before state.json
        put = storage.put_file
        def put_file(local, uri):
            if uri.endswith(f"epoch-{int(where):04d}/state.json"):
                os.kill(os.getpid(), signal.SIGKILL)
            put(local, uri)
        storage.put_file = put_file
    from carclassifier.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def small_init_model(path: Path, size: int = 32, num_classes: int = 3) -> Path:
    """A tiny classifier shaped like ours (a ``backbone`` with ``block<N><letter>_`` layers,
    dropout, ``predictions``), seeded, saved to ``path``: training it takes milliseconds."""
    init = keras.initializers.GlorotUniform(seed=3)
    image = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, name="stem_conv", kernel_initializer=init)(image)
    x = keras.layers.Conv2D(6, 3, name="block1a_conv", kernel_initializer=init)(x)
    x = keras.layers.Conv2D(8, 3, name="block2a_conv", kernel_initializer=init)(x)
    x = keras.layers.Conv2D(8, 1, name="top_conv", kernel_initializer=init)(x)
    backbone = keras.Model(image, x, name="backbone")
    inputs = keras.Input((size, size, 3), name="image")
    x = backbone(keras.layers.Rescaling(1.0 / 255.0)(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions",
                                 kernel_initializer=init)(x)  # fmt: skip
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    """A tiny dataset (3 classes x 4 images) prepared once; CLI args for its stage."""
    root = tmp_path_factory.mktemp("preemption")
    init = small_init_model(root / "init.keras")
    data = root / "data"
    for c, cls in enumerate(("audi", "bmw", "lada")):
        for i in range(4):
            write_image(data / cls / f"img_{i}.jpg", seed=c * 100 + i)
    out = root / "run"
    config = load_config(None, [f"data.root={data}", f"output_dir={out}", *SETTINGS])
    prepared = validate_and_split(config, out, progress=False)

    def args(stage_out: Path) -> list[str]:
        sets = [x for s in SETTINGS for x in ("--set", s)]
        return ["train-stage", "--data", str(data), "--out", str(out), "--split",
                str(out / "split.csv"), *sets, "--stage", "stage_1", "--init", str(init),
                "--stage-out", str(stage_out)]  # fmt: skip

    def reference(stage_out: Path, *settings: str) -> dict:  # in this process
        cfg = load_config(None, [f"data.root={data}", f"output_dir={out}", *SETTINGS, *settings])
        return run_stage(cfg, "stage_1", prepared, str(stage_out), str(init)).metrics

    return root, args, reference


@pytest.fixture(scope="module")
def reference_out(prepared_run) -> Path:
    """The uninterrupted run's stage folder."""
    root, _, reference = prepared_run
    reference(root / "reference")
    return root / "reference"


def _run(args: list[str], fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FAULT": fault, "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, "-c", DRIVER, *args], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _latest_epoch(stage_out: Path) -> int:
    return json.loads((stage_out / "checkpoints" / "latest.json").read_text())["epoch"]


def _latest(stage_out: Path) -> tuple[int, int]:
    """The position of the latest checkpoint ((0, 0): none)."""
    path = stage_out / "checkpoints" / "latest.json"
    if not path.exists():
        return 0, 0
    pointer = json.loads(path.read_text())
    return pointer["epoch"], pointer.get("step", 0)


def assert_same_result(stage_out: Path, reference_out: Path) -> None:
    """Final weights (rtol 1e-5) and per-epoch history (rtol 1e-4) of the uninterrupted run."""
    final = _weights(stage_out / "checkpoints" / f"epoch-{EPOCHS:04d}" / "model.keras")
    expected = _weights(reference_out / "checkpoints" / f"epoch-{EPOCHS:04d}" / "model.keras")
    assert len(final) == len(expected)
    for a, b in zip(final, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    history = (stage_out / "history.csv").read_text().splitlines()
    reference_history = (reference_out / "history.csv").read_text().splitlines()
    assert len(history) == len(reference_history) == EPOCHS + 1
    for row, ref in zip(history[1:], reference_history[1:], strict=True):
        ours = [float(x) for x in row.split(",")]
        theirs = [float(x) for x in ref.split(",")]
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def _weights(path: Path) -> list[np.ndarray]:
    return keras.models.load_model(path, compile=False).get_weights()


def test_killed_and_stopped_stage_resumes_to_the_uninterrupted_result(prepared_run, reference_out):
    root, args, _ = prepared_run

    stage_out = root / "interrupted"
    # 1. SIGKILL in the middle of epoch 2: epoch 1's checkpoint is the latest
    killed = _run(args(stage_out), "sigkill-batch:2,2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _latest_epoch(stage_out) == 1

    # 2. resumed, then SIGKILL while epoch 2's checkpoint is being uploaded (model stored,
    #    state not): the torn checkpoint never becomes the latest
    torn = _run(args(stage_out), "sigkill-upload:2")
    assert torn.returncode == -signal.SIGKILL, torn.stderr[-3000:]
    assert "(epoch 1 done)" in torn.stderr and "took over" in torn.stderr  # stale claim, same run
    assert (stage_out / "checkpoints" / "epoch-0002" / "model.keras").is_file()
    assert not (stage_out / "checkpoints" / "epoch-0002" / "checkpoint.json").exists()
    assert _latest_epoch(stage_out) == 1

    # 3. resumed, then SIGTERM in epoch 3: the step ends, a checkpoint of it is written (the
    #    cost measured by attempt 1 fits in the 30 s grace period), exit 143
    stopped = _run(args(stage_out), "sigterm-batch:3,1")
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
    assert (
        "stopped by SIGTERM in epoch 3 after batch 1: checkpoint of this step written in the "
        "grace period"
    ) in stopped.stderr
    assert _latest(stage_out) == (2, 1)
    assert not (stage_out / "metrics.json").exists()

    # 4. resumed at that step, to the end
    finished = _run(args(stage_out))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "(epoch 2 done, 1 steps of epoch 3)" in finished.stderr
    assert "epoch 3 resumes at step 1" in finished.stderr
    assert_same_result(stage_out, reference_out)
    metrics = json.loads((stage_out / "metrics.json").read_text())
    assert metrics["attempts"] == 4 and metrics["preemptions"] == 3  # 2 SIGKILLs, 1 SIGTERM
    assert metrics["minutes_lost_to_preemption"] >= 0 and metrics["minutes_checkpointing"] > 0


class Killed(BaseException):
    """What SIGKILL does to the process, in-process: nothing after it runs."""


def test_a_stage_killed_at_every_step_in_turn_ends_as_the_uninterrupted_one(
    prepared_run, reference_out, monkeypatch
):
    root, _, reference = prepared_run
    stage_out = root / "killed-every-step"
    steps = 3  # 9 training images in batches of 4
    original = checkpoints.StageCheckpoint.on_train_batch_end
    mid_epoch: set[tuple[int, int]] = set()  # mid-epoch checkpoints resumed from
    for target in range(1, EPOCHS * steps):  # killed after global step 1, 2, ..., 8

        def on_train_batch_end(self, batch, logs=None, target=target):
            original(self, batch, logs)
            if self.position[0] * steps + self.position[1] == target:
                raise Killed(target)

        monkeypatch.setattr(checkpoints.StageCheckpoint, "on_train_batch_end", on_train_batch_end)
        with pytest.raises(Killed):
            reference(stage_out, "checkpoint.every=2")
        epoch, step = _latest(stage_out)
        assert target - 1 <= epoch * steps + step <= target  # the step, or the one before
        if step:
            mid_epoch.add((epoch, step))
    monkeypatch.setattr(checkpoints.StageCheckpoint, "on_train_batch_end", original)
    metrics = reference(stage_out, "checkpoint.every=2")
    assert_same_result(stage_out, reference_out)
    assert metrics["attempts"] == EPOCHS * steps and metrics["preemptions"] == EPOCHS * steps - 1
    assert len(mid_epoch) >= 3 and metrics["checkpoint_every"] == "2"
    assert metrics["checkpoints_written"] >= len(mid_epoch) + 1


def test_an_auto_checkpointed_generator_stage_killed_mid_epoch_resumes_there(
    prepared_run, reference_out, monkeypatch
):
    """``every: auto`` (bounds so short that every step is due) with the recipe's generator
    pipeline: killed after step 1 of epoch 2, resumed at that step, the result of an
    uninterrupted run with that pipeline, which is the tf.data run's (identical batches)."""
    root, _, reference = prepared_run
    stage_out = root / "auto-generator"
    settings = ["input.pipeline=image_data_augmentor", "checkpoint.every=auto",
                "checkpoint.min_minutes=0.00001", "checkpoint.max_minutes=0.00002"]  # fmt: skip
    reference(root / "generator-reference", settings[0])
    assert_same_result(root / "generator-reference", reference_out)  # same batches, same result
    original = checkpoints.StageCheckpoint.on_train_batch_end

    def on_train_batch_end(self, batch, logs=None):
        original(self, batch, logs)
        if self.position == (1, 1):
            raise Killed("epoch 2, step 1")

    monkeypatch.setattr(checkpoints.StageCheckpoint, "on_train_batch_end", on_train_batch_end)
    with pytest.raises(Killed):
        reference(stage_out, *settings)
    assert _latest(stage_out) == (1, 1)
    monkeypatch.setattr(checkpoints.StageCheckpoint, "on_train_batch_end", original)
    metrics = reference(stage_out, *settings)
    assert_same_result(stage_out, root / "generator-reference")
    assert metrics["checkpoint_every"] == "auto" and metrics["preemptions"] == 1
    assert metrics["mtbf_source"].startswith("learned: 1 preemption(s) that lost work")
    assert metrics["mtbf_minutes"] < 120  # the prior pulled down by the preemption seen
    assert metrics["checkpoint_interval_minutes"] == 0.0  # clipped to the (tiny) upper bound
