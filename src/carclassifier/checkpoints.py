"""What a stage folder holds while it trains: per-epoch and mid-epoch checkpoints, the
``latest.json`` pointer, the best model, the attempt history and the claim that says which run
(and which process) writes there::

    <out>/stage.json                                         claim: fingerprint + owning process
    <out>/attempts.json                                      attempt history (carclassifier.attempts)
    <out>/checkpoints/epoch-0003/{model.keras,state.json}   every epoch (the newest 2+ kept)
    <out>/checkpoints/epoch-0003-step-000120/...             mid-epoch: 3 epochs + 120 steps done
    <out>/checkpoints/epoch-0003/checkpoint.json             their checksums, written after them
    <out>/checkpoints/latest.json                            pointer, written last
    <out>/best.keras                                         best by val_accuracy

A mid-epoch checkpoint (``checkpoint.every``, or on SIGTERM when it fits in the grace period)
also stores what the rest of the epoch needs to replay the uninterrupted run exactly: the
running loss/accuracy sums (totals and counts) of the epoch, the state of every dropout ``SeedGenerator`` and the
seconds trained in the epoch; the batches before it are skipped by the input pipeline
(``make_inputs(initial_step=...)``).

A checkpoint is complete once its ``checkpoint.json`` (SHA-256 of both files) exists;
``latest.json`` then moves to it (on gs:// conditional on the generation read, so two writers
cannot both move it). A checkpoint that fails its checksums is skipped with a warning and the
previous good one is used. Everything goes through `carclassifier.storage`, so ``out`` may be a
local folder or a gs:// prefix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from carclassifier import storage
from carclassifier.attempts import AttemptLedger
from carclassifier.checkpoint_policy import CheckpointPolicy
from carclassifier.config import StageConfig
from carclassifier.errors import CarClassifierError, StorageError

log = logging.getLogger(__name__)

BEST_MODEL = "best.keras"
LATEST = "checkpoints/latest.json"
CLAIM = "stage.json"
MANIFEST = "checkpoint.json"
MIN_KEPT = 2
"""Checkpoints kept at least: the newest and the previous good one to fall back to."""
MONITOR = "val_accuracy"
_CALLBACK_STATE = ("wait", "best", "cooldown_counter", "stopped_epoch", "best_epoch")
_FOLDER = re.compile(r"^epoch-(\d+)(?:-step-(\d+))?$")

Position = tuple[int, int]
"""Where training is: (epochs done, steps done in the next epoch)."""


def folder_name(epoch: int, step: int = 0) -> str:
    """The checkpoint folder of ``epoch`` epochs (plus ``step`` steps of the next) done."""
    return f"epoch-{epoch:04d}" + (f"-step-{step:06d}" if step else "")


def folder_position(name: str) -> Position | None:
    """The position a checkpoint folder name stands for, None for other names."""
    match = _FOLDER.match(name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def seed_generators(model: keras.Model) -> list:
    """Every ``SeedGenerator`` of the model's layers (dropout), in a fixed order."""
    return [g for layer in model._flatten_layers() for g in layer._seed_generators]


def _numbers(variable: keras.Variable) -> list | float | int:
    return keras.ops.convert_to_numpy(variable).tolist()


class StageConflictError(CarClassifierError):
    """The stage's output location belongs to another run (or another process took it over)."""


class StageCheckpoint(keras.callbacks.Callback):
    """Every epoch: update the history, save the best model, write a checkpoint, then move the
    ``latest.json`` pointer to it. Within an epoch: a checkpoint whenever ``policy`` says one is
    due (`save_mid_epoch`). On train begin: restore the other callbacks' counters; on the
    begin of an epoch resumed mid-way: restore its running metrics and dropout seeds.

    Must come last but for `SigtermGuard` in the callback list, so its restores run after the
    others reset themselves (and after `EpochSeed`). ``ledger`` hears of every step and
    checkpoint; ``steps_per_epoch`` is the epoch's full length (a resumed epoch is shorter).
    """

    def __init__(
        self, out: str, stage: StageConfig, state: dict, tracked: list, keep: int,
        owner: str | None = None, policy: CheckpointPolicy | None = None,
        ledger: AttemptLedger | None = None, steps_per_epoch: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:  # fmt: skip
        super().__init__()
        self.out = out
        self.stage = stage
        self.state = state
        self.tracked = tracked
        self.keep = keep
        self.owner = owner
        self.policy = policy
        self.ledger = ledger
        self.steps_per_epoch = steps_per_epoch
        self.clock = clock
        self.position: Position = (int(state.get("epoch", 0)), int(state.get("step", 0)))
        self.saved: Position = self.position  # the newest checkpoint's position
        self._offset = 0
        self._epoch_started = 0.0
        self._checkpointing = 0.0  # seconds of mid-epoch checkpoints in this epoch
        self._metric_sums: list | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        saved = self.state.get("callbacks", {})
        for callback in self.tracked:
            for key, value in saved.get(type(callback).__name__, {}).items():
                setattr(callback, key, value)
        if self.policy is not None:
            self.policy.start()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._offset, elapsed = 0, 0.0
        resume = self.state.get("resume")
        if resume and self.state.get("step") and int(self.state["epoch"]) == epoch:
            self._metric_sums = resume["metrics"]
            for generator, value in zip(seed_generators(self.model), resume["seed_generators"],
                                        strict=True):  # fmt: skip
                generator.state.assign(np.asarray(value, dtype=generator.state.dtype))
            self._offset, elapsed = int(self.state["step"]), float(resume["epoch_seconds"])
            log.info("%s: epoch %d resumes at step %d (the rest of its batches, its running "
                     "metrics and dropout seeds as they were)", self.stage.name, epoch + 1,
                     self._offset)  # fmt: skip
        self.position = (epoch, self._offset)
        self._epoch_started = self.clock() - elapsed
        self._checkpointing = 0.0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._metric_sums is not None:
            # The epoch's running loss/accuracy sums before the resumed step: Keras builds a
            # loaded model's metrics in its first step, so they are added back after it (they
            # are totals and counts, reset at the epoch's begin: the sums come out the same).
            for variable, value in zip(self.model.metrics_variables, self._metric_sums,
                                       strict=True):  # fmt: skip
                variable.assign_add(np.asarray(value, dtype=variable.dtype))
            self._metric_sums = None
        self.position = (self.position[0], self._offset + batch + 1)
        if self.ledger is not None:
            self.ledger.step(self.position)
        if self.policy is not None and self.policy.step():
            self.save_mid_epoch()

    def can_save_mid_epoch(self) -> bool:
        """Whether the current position can be a mid-epoch checkpoint: some of the epoch's
        training steps are still ahead (after its last one only the epoch end can be saved)."""
        step = self.position[1]
        return 0 < step and (self.steps_per_epoch is None or step < self.steps_per_epoch)

    def save_mid_epoch(self) -> str | None:
        """Checkpoint the current position (unless already saved or not savable): returns the
        folder written, or None."""
        if self.saved == self.position or not self.can_save_mid_epoch():
            return None
        epoch, step = self.position
        started = self.clock()
        state = {
            **self.state,
            "epoch": epoch,
            "step": step,
            "callbacks": _callback_states(self.tracked),
            "resume": {
                "metrics": [_numbers(v) for v in self.model.metrics_variables],
                "seed_generators": [_numbers(g.state) for g in seed_generators(self.model)],
                "epoch_seconds": round(started - self._epoch_started - self._checkpointing, 3),
            },
        }
        with tempfile.TemporaryDirectory() as tmp:
            uri = write_checkpoint(self.out, epoch, self.model, state, Path(tmp), self.keep,
                                   self.owner, step=step)  # fmt: skip
        seconds = self.clock() - started
        self._checkpointing += seconds
        self._committed(seconds)
        log.info("%s epoch %d step %d/%s: checkpoint in %.1fs -> %s", self.stage.name, epoch + 1,
                 step, self.steps_per_epoch or "?", seconds, uri)  # fmt: skip
        return uri

    def _committed(self, seconds: float) -> None:
        self.saved = self.position
        if self.policy is not None:
            self.policy.record(seconds)
        if self.ledger is not None:
            self.ledger.checkpointed(self.position, seconds)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        seconds = self.clock() - self._epoch_started - self._checkpointing
        logs["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        history = self.state.setdefault("history", {})
        for key, value in logs.items():
            history.setdefault(key, []).append(float(value))
        self.state.setdefault("epoch_seconds", []).append(round(seconds, 3))
        self.state["epoch"] = epoch + 1
        self.state["step"] = 0
        self.state.pop("resume", None)
        self.position = (epoch + 1, 0)
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
            started = self.clock()
            uri = write_checkpoint(
                self.out, epoch + 1, self.model, self.state, Path(tmp), self.keep, self.owner
            )
            self._committed(self.clock() - started)
        log.info(
            "%s epoch %d/%d: loss %.4f acc %.4f val_loss %.4f val_acc %.4f lr %.2e (%.0fs)%s -> %s",
            self.stage.name, epoch + 1, self.stage.epochs, logs.get("loss", float("nan")),
            logs.get("accuracy", float("nan")), loss, accuracy, logs["learning_rate"], seconds,
            " best" if improved else "", uri,
        )  # fmt: skip


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
    owner: str | None = None, step: int = 0,
) -> str:  # fmt: skip
    """Upload ``model.keras`` + ``state.json`` for ``epoch`` epochs (and ``step`` steps of the
    next) done, then their checksums (``checkpoint.json``), then point ``latest.json`` at them
    (so a half-written checkpoint is never the latest), then drop all but the newest
    ``max(keep, MIN_KEPT)`` checkpoints up to this one.

    With ``owner``, first checks that this process still holds the stage's claim. On gs:// the
    pointer is replaced only if nobody replaced it since it was read (``if_generation_match``).
    """
    name = folder_name(epoch, step)
    folder = storage.join(out, "checkpoints", name)
    model_file, state_file = tmp / "model.keras", tmp / "state.json"
    model.save(model_file)
    state_file.write_text(json.dumps(state), encoding="utf-8")
    _check_owner(out, owner)
    storage.put_file(model_file, storage.join(folder, "model.keras"))
    storage.put_file(state_file, storage.join(folder, "state.json"))
    manifest = {
        "epoch": epoch,
        "step": step,
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
    older = sorted(
        (position, name)
        for name in storage.list_names(storage.join(out, "checkpoints"))
        if (position := folder_position(name)) is not None and position <= (epoch, step)
    )
    for _, stale in older[: -max(keep, MIN_KEPT)]:
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
            newest = (int(pointer["epoch"]), int(pointer.get("step", 0)))
        except (ValueError, KeyError, TypeError):
            log.warning("%s is unreadable: looking for checkpoints folder by folder",
                        storage.join(out, LATEST))  # fmt: skip
    folders = [
        (position, name)
        for name in storage.list_names(storage.join(out, "checkpoints"))
        if (position := folder_position(name)) is not None
    ]
    for position, name in sorted(folders, reverse=True):
        if newest is not None and position >= newest:
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
        step = int(entry.get("step", 0))
        log.info("resuming from checkpoint %s (epoch %d done%s)", folder, entry["epoch"],
                 f", {step} steps of epoch {entry['epoch'] + 1}" if step else "")  # fmt: skip
        return model, state
    raise StorageError(
        f"no checkpoint under {storage.join(out, 'checkpoints')} matches its checksum; "
        f"delete {out} to start the stage over"
    )


def discard_newer(out: str, position: Position) -> None:
    """Delete checkpoint folders newer than ``position`` (the one a stage resumes from): left by
    an attempt killed before its pointer moved, or a bad newest one. The resumed run writes its
    own, and none of them can take a slot among the checkpoints kept to fall back to."""
    for name in storage.list_names(storage.join(out, "checkpoints")):
        found = folder_position(name)
        if found is not None and found > position:
            log.info("removing %s: newer than the checkpoint resumed from", name)
            storage.delete_tree(storage.join(out, "checkpoints", name))


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
                f"another process of this run claimed {out} at the same moment; let one of them run"
            ) from None
        log.info("%s: took over %s from %s (same run %s: resuming)", stage.name, out,
                 held.get("owner"), fingerprint)  # fmt: skip
        return owner
    raise StageConflictError(f"{uri} keeps appearing and vanishing: is another run cleaning up?")
