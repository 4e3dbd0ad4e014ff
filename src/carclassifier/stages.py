"""Run one fine-tuning stage: init checkpoint → train with callbacks → best model + metrics + plots.

A stage is a function of (config, stage name, init model, data split) and writes everything
through `carclassifier.storage`, so its output location may be a local folder or a gs:// prefix::

    <out>/stage.json                                         claim: fingerprint + owning process
    <out>/checkpoints/epoch-0003/{model.keras,state.json}   every epoch (the newest 2+ kept)
    <out>/checkpoints/epoch-0003/checkpoint.json             their checksums, written after them
    <out>/checkpoints/latest.json                            pointer, written last
    <out>/best.keras                                         best by val_accuracy
    <out>/history.csv  metrics.json  Train_Val_acc_<stage>.png  Train_Val_loss_<stage>.png

Reliability (see docs/reliability.md):

* Resume. Started again with the same arguments, a stage resumes after its last complete epoch
  (weights, optimizer state, history, ReduceLROnPlateau/EarlyStopping counters). Randomness is a
  function of (seed, epoch): the input batches of epoch e (`make_inputs` ``initial_epoch``) and
  the model's dropout/global seeds (`EpochSeed`), so a resumed stage ends with the weights of an
  uninterrupted one.
* Torn checkpoints. A checkpoint is complete once its ``checkpoint.json`` (SHA-256 of both
  files) exists; ``latest.json`` then moves to it (on gs:// conditional on the generation read,
  so two writers cannot both move it). A checkpoint that fails its checksums is skipped with a
  warning and the previous good one is used; at least two are kept.
* SIGTERM (what Kubernetes sends before SIGKILL): the current train or validation step
  finishes, the epoch is abandoned (a mid-epoch state could not be resumed identically, so no
  mid-epoch checkpoint is written: the last complete epoch's checkpoint is already stored), and
  the process exits with status 143 (`PREEMPTED_EXIT_CODE`). A checkpoint upload under way when
  the signal comes completes first; so the time to exit is one step plus at most one upload.
* Out of memory: a clear `StageOutOfMemoryError` naming the stage, batch and image size and a
  smaller batch size to try; the checkpoints stay.
* Idempotence. A stage whose ``metrics.json`` exists and was made from the same fingerprint
  (stage and model config, augmentation, seed, split, init model) is returned as it is. Another
  run pointed at the same ``out`` is refused (`StageConflictError`); a restarted process of the
  same run takes the claim over, and the process it replaced stops at its next checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from carclassifier import storage
from carclassifier.config import RunConfig, StageConfig
from carclassifier.errors import CarClassifierError, StorageError
from carclassifier.inputs import batches_per_epoch, make_inputs
from carclassifier.model import build_classifier, set_trainable
from carclassifier.plots import plot_history
from carclassifier.prepare import PreparedData

log = logging.getLogger(__name__)

BEST_MODEL = "best.keras"
METRICS = "metrics.json"
LATEST = "checkpoints/latest.json"
CLAIM = "stage.json"
MANIFEST = "checkpoint.json"
MIN_KEPT = 2
"""Checkpoints kept at least: the newest and the previous good one to fall back to."""
PREEMPTED_EXIT_CODE = 143
"""Exit status after SIGTERM (128 + 15): the stage stopped cleanly and resumes when restarted."""
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


class StageConflictError(CarClassifierError):
    """The stage's output location belongs to another run (or another process took it over)."""


class StageOutOfMemoryError(CarClassifierError):
    """The device ran out of memory: the batch (or image) is too large for it."""


class StagePreempted(SystemExit):
    """SIGTERM stopped the stage cleanly; exits the process with `PREEMPTED_EXIT_CODE`."""

    def __init__(self, message: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


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


# --------------------------------------------------------------------------- callbacks


class EpochSeed(keras.callbacks.Callback):
    """At the start of every epoch, seed Python/NumPy/backend RNGs and every ``SeedGenerator`` of
    the model (dropout) from (seed, epoch), so that epoch e draws the same random numbers
    whether the run started at epoch 0 or resumed at e. Must come first in the callback list."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        base = epoch_seed(self.seed, epoch)
        keras.utils.set_random_seed(base)
        generators = [g for layer in self.model._flatten_layers() for g in layer._seed_generators]
        for i, generator in enumerate(generators):
            state = generator.state
            value = np.array([(base + 7919 * (i + 1)) % (2**31 - 1), 0])
            state.assign(value.astype(keras.backend.standardize_dtype(state.dtype)))


def epoch_seed(seed: int, epoch: int) -> int:
    """The RNG seed of ``epoch`` in a stage seeded with ``seed``."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1)


class StageCheckpoint(keras.callbacks.Callback):
    """Every epoch: update the history, save the best model, write a checkpoint, then move the
    ``latest.json`` pointer to it. On train begin: restore the other callbacks' counters.

    Must come last in the callback list, so its restore runs after the others reset themselves.
    """

    def __init__(
        self, out: str, stage: StageConfig, state: dict, tracked: list, keep: int,
        owner: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.out = out
        self.stage = stage
        self.state = state
        self.tracked = tracked
        self.keep = keep
        self.owner = owner
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
                self.out, epoch + 1, self.model, self.state, Path(tmp), self.keep, self.owner
            )
        log.info(
            "%s epoch %d/%d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f lr %.2e (%.0fs)%s -> %s",
            self.stage.name, epoch + 1, self.stage.epochs, logs.get("loss", float("nan")),
            logs.get("accuracy", float("nan")), loss, accuracy, logs["learning_rate"], seconds,
            " best" if improved else "", uri,
        )  # fmt: skip


class SigtermGuard(keras.callbacks.Callback):
    """While training, SIGTERM sets a flag; the callback then stops after the current train or
    validation step (or after the epoch-end checkpoint being written) by raising
    `StagePreempted`. Comes after `StageCheckpoint`. Installs its handler only in the main
    thread (elsewhere SIGTERM keeps its default action)."""

    def __init__(self, stage: StageConfig, out: str) -> None:
        super().__init__()
        self.stage = stage
        self.out = out
        self.received = False
        self._epoch = 0
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        log.warning("%s: SIGTERM received: stopping after the current step", self.stage.name)
        self.received = True

    def __enter__(self) -> SigtermGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _stop(self, where: str) -> None:
        latest = storage.join(self.out, LATEST)
        message = (
            f"{self.stage.name}: stopped by SIGTERM {where}; the last complete epoch's checkpoint "
            f"({latest}) is kept and a restart with the same arguments resumes from it"
        )
        log.warning("%s (exit status %d)", message, PREEMPTED_EXIT_CODE)
        raise StagePreempted(message)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        if self.received:
            self._stop(f"before epoch {epoch + 1}")

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.received:
            self._stop(f"in epoch {self._epoch + 1} after batch {batch + 1}: epoch abandoned")

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.received:
            self._stop(f"while validating epoch {self._epoch + 1}: epoch abandoned")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.received:
            self._stop(f"after epoch {epoch + 1}'s checkpoint")


# --------------------------------------------------------------------------- checkpoints


def _callback_states(callbacks: list[keras.callbacks.Callback]) -> dict[str, dict]:
    states = {}
    for callback in callbacks:
        values = {k: getattr(callback, k) for k in _CALLBACK_STATE if hasattr(callback, k)}
        states[type(callback).__name__] = {
            k: (float(v) if isinstance(v, np.floating | float) else v) for k, v in values.items()
        }
    return states


def _check_owner(out: str, owner: str | None) -> None:
    if owner is None:
        return
    text = storage.read_text(storage.join(out, CLAIM))
    holder = json.loads(text).get("owner") if text else None
    if holder is not None and holder != owner:
        raise StageConflictError(
            f"{out} was taken over by another process of this run ({holder}); this one "
            f"({owner}) stops without writing there"
        )


def write_checkpoint(
    out: str, epoch: int, model: keras.Model, state: dict, tmp: Path, keep: int,
    owner: str | None = None,
) -> str:  # fmt: skip
    """Upload ``model.keras`` + ``state.json`` for ``epoch``, then their checksums
    (``checkpoint.json``), then point ``latest.json`` at them (so a half-written checkpoint is
    never the latest), then drop checkpoints beyond ``max(keep, MIN_KEPT)``.

    With ``owner``, first checks that this process still holds the stage's claim. On gs:// the
    pointer is replaced only if nobody replaced it since it was read (``if_generation_match``).
    """
    name = f"epoch-{epoch:04d}"
    folder = storage.join(out, "checkpoints", name)
    model_file, state_file = tmp / "model.keras", tmp / "state.json"
    model.save(model_file)
    state_file.write_text(json.dumps(state), encoding="utf-8")
    _check_owner(out, owner)
    storage.put_file(model_file, storage.join(folder, "model.keras"))
    storage.put_file(state_file, storage.join(folder, "state.json"))
    manifest = {
        "epoch": epoch,
        "dir": name,
        "sha256": storage.sha256_file(model_file),
        "state_sha256": storage.sha256_file(state_file),
    }
    storage.write_text(storage.join(folder, MANIFEST), json.dumps(manifest))
    latest = storage.join(out, LATEST)
    _, generation = storage.read_versioned(latest)
    try:
        storage.write_text(latest, json.dumps(manifest), if_generation_match=generation or 0)
    except storage.PreconditionFailedError as exc:
        raise StageConflictError(
            f"{latest} was moved by another writer while epoch {epoch} was being saved: "
            "two processes are training into the same stage folder"
        ) from exc
    kept = max(keep, MIN_KEPT)
    for stale in storage.list_names(storage.join(out, "checkpoints")):
        if stale.startswith("epoch-") and int(stale.split("-")[1]) <= epoch - kept:
            storage.delete_tree(storage.join(out, "checkpoints", stale))
    return folder


def _verified(out: str, entry: dict, tmp: Path) -> tuple[Path, dict] | None:
    """The model file and state of a checkpoint whose files match ``entry``'s checksums."""
    folder = storage.join(out, "checkpoints", entry["dir"])
    try:
        model_file = storage.get_file(storage.join(folder, "model.keras"), tmp / "model.keras")
        state_file = storage.get_file(storage.join(folder, "state.json"), tmp / "state.json")
    except StorageError as exc:
        log.warning("checkpoint %s is incomplete (%s): trying the previous one", folder, exc)
        return None
    for path, key in ((model_file, "sha256"), (state_file, "state_sha256")):
        if key in entry and storage.sha256_file(path) != entry[key]:
            log.warning("checkpoint %s: %s does not match its checksum (truncated or corrupt): "
                        "trying the previous one", folder, path.name)  # fmt: skip
            return None
    return model_file, json.loads(state_file.read_text(encoding="utf-8"))


def _candidates(out: str) -> list[dict]:
    """Checkpoint entries to try, newest first: the pointer's, then older complete folders."""
    entries: list[dict] = []
    newest = None
    text = storage.read_text(storage.join(out, LATEST))
    if text is not None:
        try:
            pointer = json.loads(text)
            entries.append(pointer)
            newest = int(pointer["epoch"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s is unreadable: looking for checkpoints folder by folder",
                        storage.join(out, LATEST))  # fmt: skip
    folders = [n for n in storage.list_names(storage.join(out, "checkpoints")) if n.startswith("epoch-")]
    for name in sorted(folders, reverse=True):
        if newest is not None and int(name.split("-")[1]) >= newest:
            continue  # newer than the pointer: never committed
        manifest = storage.read_text(storage.join(out, "checkpoints", name, MANIFEST))
        if manifest is None:
            continue
        try:
            entries.append(json.loads(manifest))
        except ValueError:
            log.warning("checkpoint %s has an unreadable %s: skipped", name, MANIFEST)
    return entries


def read_checkpoint(out: str, tmp: Path) -> tuple[keras.Model, dict] | None:
    """The newest good checkpoint under ``out`` (compiled, optimizer state restored), or None.

    A checkpoint whose files fail their checksums is skipped with a warning in favour of the
    previous one; when checkpoints exist but none is good, raises `StorageError`."""
    entries = _candidates(out)
    if not entries:
        return None
    for entry in entries:
        found = _verified(out, entry, tmp)
        if found is None:
            continue
        model_file, state = found
        folder = storage.join(out, "checkpoints", entry["dir"])
        if entry is not entries[0]:
            log.warning("falling back to the previous good checkpoint %s", folder)
        model = keras.models.load_model(model_file, compile=True, safe_mode=True)
        log.info("resuming from checkpoint %s (epoch %d done)", folder, entry["epoch"])
        return model, state
    raise StorageError(
        f"no checkpoint under {storage.join(out, 'checkpoints')} matches its checksum; "
        f"delete {out} to start the stage over"
    )


# --------------------------------------------------------------------------- one stage


def _stage_inputs(
    config: RunConfig, stage: StageConfig, prepared: PreparedData, initial_epoch: int = 0
):  # noqa: ANN202
    """Training batches from epoch ``initial_epoch`` on, validation batches, training images."""
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
        make_inputs(cfg, prepared.dataset.root, train, classes, training=True,
                    initial_epoch=initial_epoch),
        make_inputs(cfg, prepared.dataset.root, prepared.subset("val"), classes, training=False),
        len(train),
    )  # fmt: skip


def content_id(uri: str) -> str:
    """A content checksum of the file at ``uri`` (local: SHA-256; gs://: the stored CRC32C)."""
    if storage.is_gcs_uri(uri):
        bucket, name = storage.split_gcs_uri(uri)
        blob = storage.gcs_client().bucket(bucket).get_blob(
            name, retry=storage.gcs_retry(f"look up {uri}"), timeout=storage.gcs_timeout()
        )
        if blob is None:
            raise StorageError(f"{uri} not found: check the --init model URI")
        return f"crc32c:{blob.crc32c or blob.md5_hash or blob.size}"
    return f"sha256:{storage.sha256_file(storage.local_copy(uri))}"


def stage_fingerprint(
    config: RunConfig, stage: StageConfig, prepared: PreparedData, init: str | None
) -> str:
    """What makes two runs of a stage the same: the stage (batch size aside, so that a stage
    stopped by OOM can resume with a smaller one), model, augmentation, seed, image size, split,
    classes and init model content."""
    split = prepared.split[[c for c in ("path", "label", "subset") if c in prepared.split]]
    parts = {
        "stage": stage.model_dump(mode="json", exclude={"batch_size"}),
        "image_size": config.stage_image_size(stage),
        "model": config.model.model_dump(mode="json"),
        "augment": config.augment.model_dump(mode="json"),
        "seed": config.data.seed,
        "steps_per_epoch": config.train.steps_per_epoch,
        "classes": list(prepared.dataset.class_names),
        "split": hashlib.sha256(split.to_csv(index=False).encode()).hexdigest(),
        "init": content_id(init) if init else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def claim_stage(out: str, stage: StageConfig, fingerprint: str) -> str:
    """Write ``<out>/stage.json`` naming this process as the stage's writer; returns the owner id.

    Created exclusively (gs://: ``if_generation_match=0``; locally a hard link). Held by a run
    with another fingerprint: `StageConflictError`. Held by the same run (a restarted or retried
    process after a crash): taken over, conditional on the generation read, and the old holder
    stops at its next checkpoint."""
    uri = storage.join(out, CLAIM)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    claim = {"stage": stage.name, "fingerprint": fingerprint, "owner": owner, "since": time.time()}
    text = json.dumps(claim)
    for _ in range(3):
        if storage.create_text(uri, text):
            log.info("%s: claimed %s (run %s)", stage.name, out, fingerprint)
            return owner
        current, generation = storage.read_versioned(uri)
        if current is None:
            continue
        held = json.loads(current)
        if held.get("fingerprint") != fingerprint:
            raise StageConflictError(
                f"{out} holds stage {held.get('stage')!r} of another run (fingerprint "
                f"{held.get('fingerprint')}, this run {fingerprint}: different config, data or "
                "init model); give this run its own output location or delete that one"
            )
        try:
            storage.write_text(uri, text, if_generation_match=generation)
        except storage.PreconditionFailedError:
            raise StageConflictError(
                f"another process of this run claimed {out} at the same moment; let one of them "
                "run"
            ) from None
        log.info("%s: took over %s from %s (same run %s: resuming)", stage.name, out,
                 held.get("owner"), fingerprint)  # fmt: skip
        return owner
    raise StageConflictError(f"{uri} keeps appearing and vanishing: is another run cleaning up?")


def _finish(
    out: str, stage: StageConfig, state: dict, train_images: int, image_size: int,
    fingerprint: str | None = None,
) -> dict:  # fmt: skip
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
        "fingerprint": fingerprint,
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
    when ``out`` holds this stage finished from the same inputs; refuses (`StageConflictError`)
    when ``out`` belongs to another run.
    """
    stage = config.stage(stage_name)
    fingerprint = stage_fingerprint(config, stage, prepared, init)
    done = storage.read_text(storage.join(out, METRICS))
    if done is not None:
        metrics = json.loads(done)
        if metrics.get("fingerprint") not in (None, fingerprint):
            raise StageConflictError(
                f"{out} holds {stage.name} finished by another run (fingerprint "
                f"{metrics['fingerprint']}, this run {fingerprint}: different config, data or "
                "init model); give this run its own output location"
            )
        log.info("%s already finished in %s: skipping", stage.name, out)
        return StageResult(stage.name, out, storage.join(out, BEST_MODEL), metrics, skipped=True)
    owner = claim_stage(out, stage, fingerprint)
    size = config.stage_image_size(stage)
    batch = config.stage_batch_size(stage)
    classes = prepared.dataset.class_names
    log.info("=== %s (%s): %d epochs at %d px, batch %d, unfreeze %.2f, lr %.1e -> %s",
             stage.name, stage.description or "-", stage.epochs, size, batch, stage.unfreeze,
             stage.learning_rate, out)  # fmt: skip
    configure_precision(config.train.mixed_precision)
    keras.utils.set_random_seed(config.data.seed)  # a fresh model's initial weights
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
    state["seed"] = config.data.seed
    stopped = state.get("callbacks", {}).get("EarlyStopping", {}).get("stopped_epoch", 0)
    train, val, train_images = _stage_inputs(config, stage, prepared, initial_epoch)
    if initial_epoch < stage.epochs and not stopped:
        tracked = _callbacks(stage)
        checkpoint = StageCheckpoint(
            out, stage, state, tracked, config.train.keep_checkpoints, owner
        )
        with SigtermGuard(stage, out) as guard:
            try:
                model.fit(
                    train,
                    validation_data=val,
                    epochs=stage.epochs,
                    initial_epoch=initial_epoch,
                    steps_per_epoch=batches_per_epoch(train_images, batch),
                    callbacks=[EpochSeed(config.data.seed), *tracked, checkpoint, guard],
                    shuffle=False,  # the input pipelines shuffle, seeded by epoch
                    verbose=1 if sys.stdout.isatty() else 2,
                )
            except Exception as exc:
                if not _is_out_of_memory(exc):
                    raise
                raise _out_of_memory(stage, out, batch, size, state) from exc
    metrics = _finish(out, stage, state, train_images, size, fingerprint)
    log.info("%s done: best val_accuracy %.4f at epoch %s (%.1f min) -> %s", stage.name,
             metrics["best_val_accuracy"], metrics["best_epoch"], metrics["minutes"], metrics["best_model"])  # fmt: skip
    return StageResult(stage.name, out, metrics["best_model"], metrics)


def _is_out_of_memory(exc: BaseException) -> bool:
    import tensorflow as tf

    return isinstance(exc, tf.errors.ResourceExhaustedError) or "RESOURCE_EXHAUSTED" in str(exc)


def _out_of_memory(
    stage: StageConfig, out: str, batch: int, size: int, state: dict
) -> StageOutOfMemoryError:
    smaller = max(1, batch // 2)
    done = int(state.get("epoch", 0))
    kept = (
        f"the checkpoint of epoch {done} in {storage.join(out, 'checkpoints')} is kept and a "
        "rerun resumes from it"
        if done
        else "no epoch had finished, so nothing was checkpointed"
    )
    message = (
        f"{stage.name} ran out of device memory at batch size {batch} with {size}x{size} px "
        f"images (epoch {done + 1}); try batch size {smaller} (--set stages.{stage.name}."
        f"batch_size={smaller}) or smaller images; {kept}"
    )
    log.error(message)
    return StageOutOfMemoryError(message)


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
