"""Preemption: a stage killed (SIGKILL mid-epoch, SIGKILL during a checkpoint upload) or stopped
(SIGTERM) and started again with the same arguments ends with the weights of an uninterrupted run.

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
        def on_epoch_begin(self, e, logs=None):
            self.current = e + 1
            begin(self, e, logs)
        def on_train_batch_end(self, b, logs=None):
            if (self.current, b + 1) == (epoch, batch):
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

    def reference(stage_out: Path) -> None:  # uninterrupted, in this process
        run_stage(config, "stage_1", prepared, str(stage_out), str(init))

    return root, args, reference


def _run(args: list[str], fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FAULT": fault, "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, "-c", DRIVER, *args], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _latest_epoch(stage_out: Path) -> int:
    return json.loads((stage_out / "checkpoints" / "latest.json").read_text())["epoch"]


def _weights(path: Path) -> list[np.ndarray]:
    return keras.models.load_model(path, compile=False).get_weights()


def test_killed_and_stopped_stage_resumes_to_the_uninterrupted_result(prepared_run):
    root, args, reference = prepared_run
    reference_out = root / "reference"
    reference(reference_out)

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

    # 3. resumed, then SIGTERM in epoch 3: stops after the step, exits 143, keeps epoch 2
    stopped = _run(args(stage_out), "sigterm-batch:3,1")
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
    assert "stopped by SIGTERM in epoch 3 after batch 1: epoch abandoned" in stopped.stderr
    assert _latest_epoch(stage_out) == 2
    assert not (stage_out / "metrics.json").exists()

    # 4. resumed to the end
    finished = _run(args(stage_out))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "(epoch 2 done)" in finished.stderr

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
