"""Run one fine-tuning stage: init checkpoint → train with callbacks → best model + metrics + plots.

A stage is a function of (config, stage name, init model, data split) and writes everything
through `carclassifier.storage`, so its output location may be a local folder or a gs:// prefix:
the checkpoints, pointer, claim and best model of `carclassifier.checkpoints`, then::

    <out>/history.csv  metrics.json  Train_Val_acc_<stage>.png  Train_Val_loss_<stage>.png

The callbacks (LR schedule, plateau, early stopping, per-epoch seeding, the SIGTERM guard) live
in `carclassifier.training_callbacks`.

Reliability (see docs/reliability.md):

* Resume. Started again with the same arguments, a stage resumes from its last checkpoint
  (weights, optimizer state, history, ReduceLROnPlateau/EarlyStopping counters): an epoch end,
  or a step inside an epoch (``checkpoint.every``: steps, minutes or ``auto``, see
  `carclassifier.checkpoint_policy`). Randomness is a function of (seed, epoch): the input
  batches of epoch e (`make_inputs` ``initial_epoch``, ``initial_step`` skipping the batches
  already trained) and the model's dropout/global seeds (`EpochSeed`; a mid-epoch checkpoint
  stores the seeds' state at its step), so a resumed stage ends with the weights of an
  uninterrupted one. A stage resumed mid-epoch trains the rest of that epoch in one
  ``model.fit`` call and the epochs after it in a second.
* Torn checkpoints. A checkpoint is complete once its ``checkpoint.json`` (SHA-256 of both
  files) exists; ``latest.json`` then moves to it (on gs:// conditional on the generation read,
  so two writers cannot both move it). A checkpoint that fails its checksums is skipped with a
  warning and the previous good one is used; at least two are kept.
* SIGTERM (what Kubernetes sends before SIGKILL): the current train or validation step
  finishes; after a train step a checkpoint of that step is written if the longest checkpoint
  measured so far fits in what is left of ``checkpoint.grace_seconds`` (else the log says why
  not and the last checkpoint stands), and the process exits with status 143
  (`PREEMPTED_EXIT_CODE`). A checkpoint upload under way when the signal comes completes first.
* Lost time. ``<out>/attempts.json`` (`carclassifier.attempts`) records every attempt: the
  stage's metrics count attempts, preemptions, minutes lost to them (work redone) and minutes
  spent checkpointing.
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
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from carclassifier import storage
from carclassifier.attempts import AttemptLedger, learned_mtbf
from carclassifier.checkpoint_policy import CheckpointPolicy
from carclassifier.checkpoints import (
    BEST_MODEL,
    StageCheckpoint,
    StageConflictError,
    claim_stage,
    discard_newer,
    read_checkpoint,
)
from carclassifier.config import DEFAULT_MTBF_MINUTES, RunConfig, StageConfig
from carclassifier.errors import CarClassifierError, StagePreempted
from carclassifier.inputs import batches_per_epoch, make_inputs
from carclassifier.model import build_classifier, load_model, set_trainable
from carclassifier.plots import plot_history
from carclassifier.prepare import PreparedData
from carclassifier.training_callbacks import EpochSeed, SigtermGuard, stage_callbacks

log = logging.getLogger(__name__)

METRICS = "metrics.json"


@dataclass
class StageResult:
    """What a finished stage left behind."""

    name: str
    out: str
    best_model: str
    metrics: dict[str, Any]
    skipped: bool = False


class StageOutOfMemoryError(CarClassifierError):
    """The device ran out of memory: the batch (or image) is too large for it."""


# --------------------------------------------------------------------------- devices


def gpu_count() -> int:
    """Visible GPUs."""
    return len(tf.config.list_physical_devices("GPU"))


def distribution_scope() -> contextlib.AbstractContextManager:
    """MirroredStrategy's scope when more than one GPU is visible, else a no-op."""
    if gpu_count() > 1:
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


# --------------------------------------------------------------------------- one stage


class _StageInputs:
    """A stage's inputs: training batches from any (epoch, step), validation batches."""

    def __init__(self, config: RunConfig, stage: StageConfig, prepared: PreparedData) -> None:
        size, batch = config.stage_image_size(stage), config.stage_batch_size(stage)
        self.config = config.model_copy(
            update={
                "input": config.input.model_copy(update={"image_size": size, "batch_size": batch})
            }
        )
        train = prepared.subset("train")
        if config.train.steps_per_epoch:
            shuffled = train.sample(frac=1.0, random_state=config.data.seed)
            train = shuffled.head(config.train.steps_per_epoch * batch).reset_index(drop=True)
        self.train_frame = train
        self.root = prepared.dataset.root
        self.classes = prepared.dataset.class_names
        self.val = make_inputs(self.config, self.root, prepared.subset("val"), self.classes,
                               training=False)  # fmt: skip
        self.steps_per_epoch = batches_per_epoch(len(train), batch)

    def train(self, epoch: int, step: int = 0):  # noqa: ANN201 - tf.data.Dataset or PyDataset
        """Training batches from batch ``step`` of epoch ``epoch`` on."""
        return make_inputs(self.config, self.root, self.train_frame, self.classes, training=True,
                           initial_epoch=epoch, initial_step=step)  # fmt: skip


def stage_fingerprint(
    config: RunConfig, stage: StageConfig, prepared: PreparedData, init: str | None
) -> str:
    """What makes two runs of a stage the same: the stage (batch size aside, so that a stage
    stopped by OOM can resume with a smaller one), model, augmentation, seed, image size, split,
    classes, init model content and the extra sources' draw weights."""
    split = prepared.split[[c for c in ("path", "label", "subset") if c in prepared.split]]
    parts = {
        "stage": stage.model_dump(mode="json", exclude={"batch_size"}),
        "image_size": config.stage_image_size(stage),
        "model": config.model.model_dump(mode="json"),
        # the resolved lists; the preset's name only labels them (fingerprints stay as before)
        "augment": config.augment.model_dump(mode="json", exclude={"preset"}),
        "seed": config.data.seed,
        "steps_per_epoch": config.train.steps_per_epoch,
        "classes": list(prepared.dataset.class_names),
        "split": hashlib.sha256(split.to_csv(index=False).encode()).hexdigest(),
        "init": storage.content_id(init) if init else None,
    }
    if config.data.extra_sources:  # their weights change the draws (absent: today's fingerprint)
        parts["source_weights"] = {s.name: s.weight for s in config.data.extra_sources}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _finish(
    out: str, stage: StageConfig, state: dict, train_images: int, image_size: int,
    fingerprint: str | None = None, reliability: dict | None = None,
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
        **(reliability or {}),
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
            discard_newer(out, (int(state["epoch"]), int(state.get("step", 0))))
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
    initial_epoch, initial_step = int(state.get("epoch", 0)), int(state.get("step", 0))
    state["seed"] = config.data.seed
    inputs = _StageInputs(config, stage, prepared)
    ledger = AttemptLedger(out, owner)
    policy = _checkpoint_policy(config, ledger)
    if initial_epoch < stage.epochs and not _stopped_early(state):
        tracked = stage_callbacks(stage)
        checkpoint = StageCheckpoint(
            out,
            stage,
            state,
            tracked,
            config.train.keep_checkpoints,
            owner,
            policy,
            ledger,
            inputs.steps_per_epoch,
        )
        guard = SigtermGuard(stage, out, checkpoint, config.checkpoint.grace_seconds)
        callbacks = [EpochSeed(config.data.seed), *tracked, checkpoint, guard]
        ledger.training((initial_epoch, initial_step))
        with guard:
            try:
                _train(model, inputs, callbacks, stage, state, initial_epoch, initial_step)
            except StagePreempted:
                ledger.ended("preempted", checkpointed=checkpoint.saved == checkpoint.position)
                raise
            except StageConflictError:
                raise  # the stage folder is another process's now: write nothing there
            except Exception as exc:
                with contextlib.suppress(CarClassifierError, OSError):
                    ledger.ended("error")
                if not _is_out_of_memory(exc):
                    raise
                raise _out_of_memory(stage, out, batch, size, state) from exc
    ledger.ended("finished")
    reliability = ledger.summary() | policy.describe()
    log.info("%s: %d attempt(s), %d preemption(s), %.1f min lost to them, %.1f min checkpointing "
             "(%d checkpoints)", stage.name, reliability["attempts"], reliability["preemptions"],
             reliability["minutes_lost_to_preemption"], reliability["minutes_checkpointing"],
             reliability["checkpoints_written"])  # fmt: skip
    train_images = len(inputs.train_frame)
    metrics = _finish(out, stage, state, train_images, size, fingerprint, reliability)
    log.info("%s done: best val_accuracy %.4f at epoch %s (%.1f min) -> %s", stage.name,
             metrics["best_val_accuracy"], metrics["best_epoch"], metrics["minutes"], metrics["best_model"])  # fmt: skip
    return StageResult(stage.name, out, metrics["best_model"], metrics)


def _checkpoint_policy(config: RunConfig, ledger: AttemptLedger) -> CheckpointPolicy:
    """The stage's checkpoint policy: MTBF configured or learned from the attempt history,
    checkpoint costs measured by earlier attempts."""
    if config.checkpoint.mtbf_minutes is not None:
        mtbf, source = config.checkpoint.mtbf_minutes * 60, "configured"
    else:
        mtbf, source = learned_mtbf(ledger.earlier, DEFAULT_MTBF_MINUTES * 60)
    return CheckpointPolicy(config.checkpoint, mtbf, source, ledger.checkpoint_costs())


def _stopped_early(state: dict) -> bool:
    return bool(state.get("callbacks", {}).get("EarlyStopping", {}).get("stopped_epoch", 0))


def _train(
    model: keras.Model, inputs: _StageInputs, callbacks: list, stage: StageConfig, state: dict,
    epoch: int, step: int,
) -> None:  # fmt: skip
    """``model.fit`` from (epoch, step) to the stage's end: the rest of a partly trained epoch
    first (its own call: Keras' epochs have one length), then the whole epochs after it."""
    steps = inputs.steps_per_epoch
    fit = {"validation_data": inputs.val, "callbacks": callbacks,
           "shuffle": False,  # the input pipelines shuffle, seeded by epoch
           "verbose": 1 if sys.stdout.isatty() else 2}  # fmt: skip
    if step:
        model.fit(inputs.train(epoch, step), epochs=epoch + 1, initial_epoch=epoch,
                  steps_per_epoch=steps - step, **fit)  # fmt: skip
        epoch += 1
    if epoch < stage.epochs and not _stopped_early(state):
        model.fit(inputs.train(epoch), epochs=stage.epochs, initial_epoch=epoch,
                  steps_per_epoch=steps, **fit)  # fmt: skip


def _is_out_of_memory(exc: BaseException) -> bool:
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
