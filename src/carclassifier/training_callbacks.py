"""Keras callbacks of a training stage: the LR schedule and plateau/early-stopping callbacks from
the stage config, per-epoch seeding (so a resumed epoch replays the uninterrupted one) and the
SIGTERM guard that stops a stage cleanly when Kubernetes preempts its pod."""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from carclassifier import storage
from carclassifier.checkpoint_policy import fits_in_grace
from carclassifier.checkpoints import LATEST, StageCheckpoint, seed_generators
from carclassifier.config import StageConfig
from carclassifier.errors import PREEMPTED_EXIT_CODE, StagePreempted

log = logging.getLogger(__name__)


def _lr_factor(stage: StageConfig, epoch: int) -> float:
    schedule = stage.schedule
    if schedule.kind == "cosine":
        progress = epoch / max(1, stage.epochs - 1)
        floor = schedule.min_lr_fraction
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule.kind == "step":
        return schedule.step_factor ** (epoch // schedule.step_epochs)
    return 1.0


def stage_callbacks(stage: StageConfig) -> list[keras.callbacks.Callback]:
    """ReduceLROnPlateau, the LR schedule and EarlyStopping as the stage config asks."""
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
        for i, generator in enumerate(seed_generators(self.model)):
            state = generator.state
            value = np.array([(base + 7919 * (i + 1)) % (2**31 - 1), 0])
            state.assign(value.astype(keras.backend.standardize_dtype(state.dtype)))


def epoch_seed(seed: int, epoch: int) -> int:
    """The RNG seed of ``epoch`` in a stage seeded with ``seed``."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1)


class SigtermGuard(keras.callbacks.Callback):
    """While training, SIGTERM sets a flag; the callback then stops after the current train or
    validation step (or after the epoch-end checkpoint being written) by raising
    `StagePreempted`. Stopped after a train step, it first has ``checkpoint`` write a mid-epoch
    checkpoint of that step when the longest checkpoint measured so far fits in what is left
    of ``grace_s`` (the time Kubernetes waits before SIGKILL); else it exits at once and says
    why. Comes after `StageCheckpoint`. Installs its handler only in the main thread (elsewhere
    SIGTERM keeps its default action). ``clock`` is injectable for tests."""

    def __init__(
        self, stage: StageConfig, out: str, checkpoint: StageCheckpoint | None = None,
        grace_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        super().__init__()
        self.stage = stage
        self.out = out
        self.checkpoint = checkpoint
        self.grace_s = grace_s
        self.clock = clock
        self.received = False
        self.signalled_at = 0.0
        self._epoch = 0
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        log.warning("%s: SIGTERM received: stopping after the current step", self.stage.name)
        self.signalled_at = self.clock()
        self.received = True

    def __enter__(self) -> SigtermGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _kept(self) -> str:
        return (
            f"the last checkpoint ({storage.join(self.out, LATEST)} names it) is kept and a "
            "restart with the same arguments resumes from it"
        )

    def _stop(self, where: str, kept: str | None = None) -> None:
        message = f"{self.stage.name}: stopped by SIGTERM {where}; {kept or self._kept()}"
        log.warning("%s (exit status %d)", message, PREEMPTED_EXIT_CODE)
        raise StagePreempted(message)

    def mid_epoch_checkpoint(self) -> tuple[str, str | None]:
        """Write a checkpoint of the current step if it fits in the grace period left.
        Returns what happened and, when a checkpoint of this step is stored, what is kept."""
        resumes = "a restart with the same arguments resumes from it"
        checkpoint = self.checkpoint
        if checkpoint is None:
            return "epoch abandoned", None
        if checkpoint.saved == checkpoint.position:
            return "the checkpoint of this step is stored", resumes
        if not checkpoint.can_save_mid_epoch():
            return "epoch abandoned (only its end can be checkpointed)", None
        cost = checkpoint.policy.worst_cost_s if checkpoint.policy is not None else None
        since = self.clock() - self.signalled_at
        if not fits_in_grace(cost, self.grace_s, since):
            why = (
                "no checkpoint has been measured yet in this stage"
                if cost is None
                else f"a checkpoint takes up to {cost:.1f}s"
            )
            left = max(0.0, self.grace_s - since)
            return (
                f"no checkpoint written: {why} and {left:.1f}s of the {self.grace_s:g}s grace "
                "period are left",
                None,
            )
        uri = checkpoint.save_mid_epoch()
        return f"checkpoint of this step written in the grace period ({uri})", resumes

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        if self.received:
            self._stop(f"before epoch {epoch + 1}")

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.received:
            step = self.checkpoint.position[1] if self.checkpoint is not None else batch + 1
            done, kept = self.mid_epoch_checkpoint()
            self._stop(f"in epoch {self._epoch + 1} after batch {step}: {done}", kept)

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.received:
            self._stop(f"while validating epoch {self._epoch + 1}: epoch abandoned")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.received:
            self._stop(f"after epoch {epoch + 1}'s checkpoint")
