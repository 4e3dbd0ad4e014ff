"""What a stage folder holds while it trains: per-epoch checkpoints, the ``latest.json`` pointer,
the best model, and the claim that says which run (and which process) writes there::

    <out>/stage.json                                         claim: fingerprint + owning process
    <out>/checkpoints/epoch-0003/{model.keras,state.json}   every epoch (the newest 2+ kept)
    <out>/checkpoints/epoch-0003/checkpoint.json             their checksums, written after them
    <out>/checkpoints/latest.json                            pointer, written last
    <out>/best.keras                                         best by val_accuracy

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
import socket
import tempfile
import time
import uuid
from pathlib import Path

import keras
import numpy as np

from carclassifier import storage
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


class StageConflictError(CarClassifierError):
    """The stage's output location belongs to another run (or another process took it over)."""


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
    folders = [
        n for n in storage.list_names(storage.join(out, "checkpoints")) if n.startswith("epoch-")
    ]
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
