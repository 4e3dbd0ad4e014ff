"""Run one fine-tuning stage: init checkpoint → train with callbacks → best model + metrics + plots.

A stage is a function of (config, stage name, init model, data split) and writes everything
through `carclassifier.storage`, so its output location may be a local folder or a gs:// prefix::

    <out>/checkpoints/epoch-0003/{model.keras,state.json}   every epoch (the newest kept)
    <out>/checkpoints/latest.json                            pointer, written after the upload
    <out>/best.keras                                         best by val_accuracy
    <out>/history.csv  metrics.json  Train_Val_acc_<stage>.png  Train_Val_loss_<stage>.png

Started again with the same arguments, a stage resumes after its last complete epoch (model
weights, optimizer state, history, ReduceLROnPlateau/EarlyStopping counters); a stage whose
``metrics.json`` exists is finished and is not run again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from carclassifier import storage
from carclassifier.config import RunConfig, StageConfig
from carclassifier.errors import StorageError
from carclassifier.inputs import make_inputs
from carclassifier.model import build_classifier, set_trainable
from carclassifier.plots import plot_history
from carclassifier.prepare import PreparedData

log = logging.getLogger(__name__)

BEST_MODEL = "best.keras"
METRICS = "metrics.json"
LATEST = "checkpoints/latest.json"
MONITOR = "val_accuracy"
_CALLBACK_STATE = ("wait", "best", "cooldown_counter", "stopped_epoch", "best_epoch")


@dataclass
class StageResult:
    """What a finished stage left behind."""

    name: str
    out: str
    best_model: str
    metrics: dict[str, Any]
    skipped: bool = False


# --------------------------------------------------------------------------- devices


def gpu_count() -> int:
    """Visible GPUs."""
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def distribution_scope() -> contextlib.AbstractContextManager:
    """MirroredStrategy's scope when more than one GPU is visible, else a no-op."""
    if gpu_count() > 1:
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy()
        log.info("training on %d GPUs with MirroredStrategy", strategy.num_replicas_in_sync)
        return strategy.scope()
    return contextlib.nullcontext()


def configure_precision(mode: str) -> str:
    """Set the global dtype policy: mixed_float16 on a GPU (``auto``) or when ``on``."""
    policy = "mixed_float16" if mode == "on" or (mode == "auto" and gpu_count() > 0) else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


# --------------------------------------------------------------------------- model handling


def load_model(uri: str, compile: bool = False) -> keras.Model:
    """Load a ``.keras`` model from a local path or gs:// URI (never unpickles: safe_mode)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.get_file(uri, Path(tmp) / "model.keras")
        return keras.models.load_model(local, compile=compile, safe_mode=True)


def _resize_input(
    model: keras.Model, config: RunConfig, num_classes: int, size: int
) -> keras.Model:
    """The same weights in a model built for ``size`` px input (the backbone is fully convolutional)."""
    if model.input_shape[1] == size:
        return model
    log.info("rebuilding the model for %d px input (was %d px)", size, model.input_shape[1])
    fresh = build_classifier(config.model.model_copy(update={"weights": None}), num_classes, size)
    fresh.set_weights(model.get_weights())
    return fresh


def _optimizer(stage: StageConfig) -> keras.optimizers.Optimizer:
    if stage.optimizer == "sgd":
        return keras.optimizers.SGD(stage.learning_rate, momentum=0.9, nesterov=True)
    if stage.optimizer == "adamw":
        return keras.optimizers.AdamW(stage.learning_rate, weight_decay=stage.weight_decay or 1e-4)
    return keras.optimizers.Adam(stage.learning_rate)


def _compile(model: keras.Model, stage: StageConfig, config: RunConfig) -> None:
    model.compile(
        optimizer=_optimizer(stage),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=stage.label_smoothing),
        metrics=["accuracy"],
        jit_compile=config.train.jit_compile,
    )


def _lr_factor(stage: StageConfig, epoch: int) -> float:
    schedule = stage.schedule
    if schedule.kind == "cosine":
        progress = epoch / max(1, stage.epochs - 1)
        floor = schedule.min_lr_fraction
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule.kind == "step":
        return schedule.step_factor ** (epoch // schedule.step_epochs)
    return 1.0


def _callbacks(stage: StageConfig) -> list[keras.callbacks.Callback]:
    callbacks: list[keras.callbacks.Callback] = []
    if stage.reduce_lr.enabled:
        r = stage.reduce_lr
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=r.monitor, factor=r.factor, patience=r.patience, min_lr=r.min_lr, verbose=1
            )
        )
    if stage.schedule.kind != "constant":
        callbacks.append(
            keras.callbacks.LearningRateScheduler(
                lambda epoch, _lr: stage.learning_rate * _lr_factor(stage, epoch)
            )
        )
    if stage.early_stopping.enabled:
        e = stage.early_stopping
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor=e.monitor, patience=e.patience, verbose=1)
        )
    return callbacks


# --------------------------------------------------------------------------- checkpoints


def _callback_states(callbacks: list[keras.callbacks.Callback]) -> dict[str, dict]:
    states = {}
    for callback in callbacks:
        values = {k: getattr(callback, k) for k in _CALLBACK_STATE if hasattr(callback, k)}
        states[type(callback).__name__] = {
            k: (float(v) if isinstance(v, np.floating | float) else v) for k, v in values.items()
        }
    return states


class StageCheckpoint(keras.callbacks.Callback):
    """Every epoch: update the history, save the best model, write a checkpoint, then move the
    ``latest.json`` pointer to it. On train begin: restore the other callbacks' counters.

    Must come last in the callback list, so its restore runs after the others reset themselves.
    """

    def __init__(self, out: str, stage: StageConfig, state: dict, tracked: list, keep: int) -> None:
        super().__init__()
        self.out = out
        self.stage = stage
        self.state = state
        self.tracked = tracked
        self.keep = keep
        self._epoch_started = 0.0

    def on_train_begin(self, logs: dict | None = None) -> None:
        saved = self.state.get("callbacks", {})
        for callback in self.tracked:
            for key, value in saved.get(type(callback).__name__, {}).items():
                setattr(callback, key, value)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        seconds = time.perf_counter() - self._epoch_started
        logs["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        history = self.state.setdefault("history", {})
        for key, value in logs.items():
            history.setdefault(key, []).append(float(value))
        self.state.setdefault("epoch_seconds", []).append(round(seconds, 3))
        self.state["epoch"] = epoch + 1
        best = self.state.get("best")
        accuracy, loss = logs.get(MONITOR, 0.0), logs.get("val_loss", float("inf"))
        improved = best is None or (accuracy, -loss) > (best["val_accuracy"], -best["val_loss"])
        with tempfile.TemporaryDirectory() as tmp:
            if improved:
                self.state["best"] = {
                    "epoch": epoch + 1,
                    "val_accuracy": accuracy,
                    "val_loss": loss,
                }
                self.model.save(Path(tmp) / BEST_MODEL)
                storage.put_file(Path(tmp) / BEST_MODEL, storage.join(self.out, BEST_MODEL))
            self.state["callbacks"] = _callback_states(self.tracked)
            uri = write_checkpoint(
                self.out, epoch + 1, self.model, self.state, Path(tmp), self.keep
            )
        log.info(
            "%s epoch %d/%d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f lr %.2e (%.0fs)%s -> %s",
            self.stage.name, epoch + 1, self.stage.epochs, logs.get("loss", float("nan")),
            logs.get("accuracy", float("nan")), loss, accuracy, logs["learning_rate"], seconds,
            " best" if improved else "", uri,
        )  # fmt: skip


def write_checkpoint(
    out: str, epoch: int, model: keras.Model, state: dict, tmp: Path, keep: int
) -> str:
    """Upload ``model.keras`` + ``state.json`` for ``epoch``, then point ``latest.json`` at them
    (so a half-written checkpoint is never the latest), then drop checkpoints beyond ``keep``."""
    name = f"epoch-{epoch:04d}"
    folder = storage.join(out, "checkpoints", name)
    model_file, state_file = tmp / "model.keras", tmp / "state.json"
    model.save(model_file)
    state_file.write_text(json.dumps(state), encoding="utf-8")
    storage.put_file(model_file, storage.join(folder, "model.keras"))
    storage.put_file(state_file, storage.join(folder, "state.json"))
    pointer = {"epoch": epoch, "dir": name, "sha256": storage.sha256_file(model_file)}
    storage.write_text(storage.join(out, LATEST), json.dumps(pointer))
    for old in range(epoch - keep, 0, -1):
        stale = storage.join(out, "checkpoints", f"epoch-{old:04d}")
        if not storage.exists(storage.join(stale, "model.keras")):
            break
        storage.delete_tree(stale)
    return folder


def read_checkpoint(out: str, tmp: Path) -> tuple[keras.Model, dict] | None:
    """The newest complete checkpoint under ``out`` (compiled, optimizer state restored), or None."""
    text = storage.read_text(storage.join(out, LATEST))
    if text is None:
        return None
    pointer = json.loads(text)
    folder = storage.join(out, "checkpoints", pointer["dir"])
    model_file = storage.get_file(storage.join(folder, "model.keras"), tmp / "model.keras")
    if storage.sha256_file(model_file) != pointer["sha256"]:
        raise StorageError(
            f"checkpoint {folder} does not match its checksum; delete it to start the stage over"
        )
    state = json.loads(
        storage.get_file(storage.join(folder, "state.json"), tmp / "state.json").read_text()
    )
    model = keras.models.load_model(model_file, compile=True, safe_mode=True)
    log.info("resuming from checkpoint %s (epoch %d done)", folder, pointer["epoch"])
    return model, state


# --------------------------------------------------------------------------- one stage


def _stage_inputs(config: RunConfig, stage: StageConfig, prepared: PreparedData):  # noqa: ANN202
    size, batch = config.stage_image_size(stage), config.stage_batch_size(stage)
    cfg = config.model_copy(
        update={"input": config.input.model_copy(update={"image_size": size, "batch_size": batch})}
    )
    train = prepared.subset("train")
    if config.train.steps_per_epoch:
        shuffled = train.sample(frac=1.0, random_state=config.data.seed)
        train = shuffled.head(config.train.steps_per_epoch * batch).reset_index(drop=True)
    classes = prepared.dataset.class_names
    return (
        make_inputs(cfg, prepared.dataset.root, train, classes, training=True),
        make_inputs(cfg, prepared.dataset.root, prepared.subset("val"), classes, training=False),
        len(train),
    )


def _finish(out: str, stage: StageConfig, state: dict, train_images: int, image_size: int) -> dict:
    history = pd.DataFrame(state["history"])
    history.insert(0, "epoch", range(1, len(history) + 1))
    seconds = state.get("epoch_seconds", [])
    best = state.get("best") or {}
    metrics = {
        "stage": stage.name,
        "description": stage.description,
        "epochs_run": len(history),
        "epochs_planned": stage.epochs,
        "best_epoch": best.get("epoch"),
        "best_val_accuracy": best.get("val_accuracy"),
        "best_val_loss": best.get("val_loss"),
        "image_size": image_size,
        "unfreeze": stage.unfreeze,
        "seconds_per_epoch": round(float(np.mean(seconds)), 2) if seconds else None,
        "minutes": round(sum(seconds) / 60, 2),
        "train_images_per_second": round(train_images / float(np.mean(seconds)), 1)
        if seconds
        else None,
        "best_model": storage.join(out, BEST_MODEL),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        history.to_csv(tmp_path / "history.csv", index=False)
        storage.put_file(tmp_path / "history.csv", storage.join(out, "history.csv"))
        for path in plot_history(history, stage.name, tmp_path):
            storage.put_file(path, storage.join(out, path.name))
    storage.write_text(storage.join(out, METRICS), json.dumps(metrics, indent=2))
    return metrics


def run_stage(
    config: RunConfig, stage_name: str, prepared: PreparedData, out: str, init: str | None
) -> StageResult:
    """Train ``stage_name`` from ``init`` (a ``.keras`` URI; None builds a fresh model) into ``out``.

    Resumes after the last complete epoch when ``out`` holds checkpoints; returns at once
    when ``out`` holds a finished stage.
    """
    stage = config.stage(stage_name)
    done = storage.read_text(storage.join(out, METRICS))
    if done is not None:
        log.info("%s already finished in %s: skipping", stage.name, out)
        return StageResult(
            stage.name, out, storage.join(out, BEST_MODEL), json.loads(done), skipped=True
        )
    size = config.stage_image_size(stage)
    classes = prepared.dataset.class_names
    log.info("=== %s (%s): %d epochs at %d px, unfreeze %.2f, lr %.1e -> %s",
             stage.name, stage.description or "-", stage.epochs, size, stage.unfreeze,
             stage.learning_rate, out)  # fmt: skip
    configure_precision(config.train.mixed_precision)
    with tempfile.TemporaryDirectory() as tmp, distribution_scope():
        resumed = read_checkpoint(out, Path(tmp))
        if resumed is not None:
            model, state = resumed
        else:
            state = {"stage": stage.name, "epoch": 0}
            if init is None:
                model = build_classifier(config.model, len(classes), size)
            else:
                log.info("initial weights from %s", init)
                model = _resize_input(load_model(init), config, len(classes), size)
            counts = set_trainable(model, stage.unfreeze, stage.train_batchnorm)
            log.info("%s: %d/%d backbone blocks unfrozen, %s trainable parameters",
                     stage.name, counts["blocks_unfrozen"], counts["blocks_total"],
                     f"{counts['trainable_params']:,}")  # fmt: skip
            _compile(model, stage, config)
    initial_epoch = int(state.get("epoch", 0))
    state["seed"] = config.data.seed + initial_epoch
    keras.utils.set_random_seed(state["seed"])  # weight init, dropout: repeatable per (seed, epoch)
    stopped = state.get("callbacks", {}).get("EarlyStopping", {}).get("stopped_epoch", 0)
    train, val, train_images = _stage_inputs(config, stage, prepared)
    if initial_epoch < stage.epochs and not stopped:
        tracked = _callbacks(stage)
        checkpoint = StageCheckpoint(out, stage, state, tracked, config.train.keep_checkpoints)
        model.fit(
            train,
            validation_data=val,
            epochs=stage.epochs,
            initial_epoch=initial_epoch,
            callbacks=[*tracked, checkpoint],
            shuffle=False,  # the input pipelines shuffle, seeded
            verbose=1 if sys.stdout.isatty() else 2,
        )
    metrics = _finish(out, stage, state, train_images, size)
    log.info("%s done: best val_accuracy %.4f at epoch %s (%.1f min) -> %s", stage.name,
             metrics["best_val_accuracy"], metrics["best_epoch"], metrics["minutes"], metrics["best_model"])  # fmt: skip
    return StageResult(stage.name, out, metrics["best_model"], metrics)


def stage_dir(run_dir: str, stage_name: str) -> str:
    """Where a stage of a run writes (``<run>/stages/<stage>``)."""
    return storage.join(run_dir, "stages", stage_name)


def train_recipe(config: RunConfig, prepared: PreparedData, run_dir: str) -> list[StageResult]:
    """Run every stage of the recipe in order, each from the previous stage's best model."""
    results: list[StageResult] = []
    init = None
    for stage in config.stages:
        result = run_stage(config, stage.name, prepared, stage_dir(run_dir, stage.name), init)
        results.append(result)
        init = result.best_model
    return results
