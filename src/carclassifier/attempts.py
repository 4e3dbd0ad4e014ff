"""The attempt history of a stage, kept beside its checkpoints: what preemption cost it.

``<out>/attempts.json`` lists every process that trained the stage (one entry per attempt)::

    {"owner": ..., "started": t0, "resumed_at": [epoch, step], "reached": [epoch, step],
     "reached_at": t, "last_checkpoint_at": t, "checkpoint_seconds": [...],
     "lost_seconds": s, "end": "finished" | "preempted" | "killed" | "error" | null,
     "checkpointed_on_stop": true | false}

It is rewritten at each checkpoint, on stop, and at most every `HEARTBEAT_S` seconds of
training in between, so an attempt killed without notice (SIGKILL, a lost node) is known up to
its last heartbeat: the next attempt marks it ``killed``. Time lost to an interruption is the
training time after the attempt's last checkpoint (work the next attempt redoes); for a killed
attempt it is counted up to its last heartbeat, so it may be short by up to `HEARTBEAT_S`.
The history also gives the preemption rate that ``checkpoint.every: auto`` uses (`learned_mtbf`):
only preemptions that lost work count there (one stopped by SIGTERM after a checkpoint of its
last step redoes nothing, so it is no reason to checkpoint more often).
Times are wall-clock seconds (attempts run in different processes); ``clock`` is injectable.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from carclassifier import storage

log = logging.getLogger(__name__)

ATTEMPTS = "attempts.json"
HEARTBEAT_S = 60.0
"""Longest time between two writes of the attempt history while training."""
PREEMPTED = ("preempted", "killed")


def learned_mtbf(attempts: list[dict[str, Any]], prior_s: float) -> tuple[float, str]:
    """Mean time between work-losing preemptions from the attempts so far, with ``prior_s``
    counted as one observed interval (so no history gives the prior, and each preemption pulls
    the estimate towards what this stage saw): ``(prior + observed run time) / (1 + n)``, ``n``
    the preemptions not saved by a checkpoint of their last step."""
    observed = sum(_duration(a) for a in attempts)
    preemptions = sum(
        a.get("end") in PREEMPTED and not a.get("checkpointed_on_stop") for a in attempts
    )
    mtbf = (prior_s + observed) / (1 + preemptions)
    source = (
        f"learned: {preemptions} preemption(s) that lost work in {observed / 60:.0f} min of "
        f"{len(attempts)} earlier attempt(s), prior {prior_s / 60:.0f} min"
    )
    return mtbf, source


def _duration(attempt: dict[str, Any]) -> float:
    return max(0.0, float(attempt.get("reached_at") or attempt["started"]) - attempt["started"])


class AttemptLedger:
    """This attempt's entry in ``<out>/attempts.json``, and the earlier ones."""

    def __init__(self, out: str, owner: str, clock: Callable[[], float] = time.time) -> None:
        self.uri = storage.join(out, ATTEMPTS)
        self.clock = clock
        text = storage.read_text(self.uri)
        try:
            self.earlier: list[dict[str, Any]] = json.loads(text) if text else []
        except ValueError:
            log.warning("%s is unreadable: the stage's attempt history starts over", self.uri)
            self.earlier = []
        for attempt in self.earlier:
            if attempt.get("end") is None:  # stopped without a word: SIGKILL, node lost
                attempt["end"] = "killed"
                attempt["lost_seconds"] = _lost(attempt)
        now = clock()
        self.current: dict[str, Any] = {
            "owner": owner, "started": now, "resumed_at": None, "reached": None,
            "reached_at": now, "training_since": None, "last_checkpoint_at": None,
            "checkpoint_seconds": [], "lost_seconds": 0.0, "end": None,
        }  # fmt: skip
        self._written = float("-inf")

    @property
    def attempts(self) -> list[dict[str, Any]]:
        """Every attempt, this one last."""
        return [*self.earlier, self.current]

    def checkpoint_costs(self) -> list[float]:
        """Measured checkpoint durations of earlier attempts (seconds)."""
        return [c for a in self.earlier for c in a.get("checkpoint_seconds", [])]

    def write(self) -> None:
        """Store the history now."""
        storage.write_text(self.uri, json.dumps(self.attempts, indent=1))
        self._written = self.clock()

    def training(self, position: tuple[int, int]) -> None:
        """Training starts (or resumes) at ``position`` = (epochs done, steps into the next)."""
        now = self.clock()
        self.current.update(resumed_at=list(position), reached=list(position), reached_at=now,
                            training_since=now)  # fmt: skip
        self.write()

    def step(self, position: tuple[int, int]) -> None:
        """A training step ended at ``position``; writes a heartbeat when one is due."""
        now = self.clock()
        self.current.update(reached=list(position), reached_at=now)
        if now - self._written >= HEARTBEAT_S:
            self.write()

    def checkpointed(self, position: tuple[int, int], seconds: float) -> None:
        """A checkpoint of ``position`` was committed; it took ``seconds``."""
        now = self.clock()
        self.current["checkpoint_seconds"].append(round(seconds, 3))
        self.current.update(reached=list(position), reached_at=now, last_checkpoint_at=now)
        self.write()

    def ended(self, how: str, checkpointed: bool = False) -> None:
        """This attempt ends: ``finished``, ``preempted`` (SIGTERM) or ``error``;
        ``checkpointed``: its last step is checkpointed (nothing to redo)."""
        self.current["end"] = how
        self.current["checkpointed_on_stop"] = checkpointed
        self.current["lost_seconds"] = (
            0.0 if how == "finished" or checkpointed else _lost(self.current)
        )
        self.write()

    def summary(self) -> dict[str, Any]:
        """Across attempts: attempts, preemptions, minutes lost (work redone), minutes spent
        checkpointing, checkpoints written (the stage metrics' names)."""
        attempts = self.attempts
        costs = [c for a in attempts for c in a.get("checkpoint_seconds", [])]
        lost = sum(a.get("lost_seconds", 0.0) for a in attempts if a.get("end") in PREEMPTED)
        return {
            "attempts": len(attempts),
            "preemptions": sum(a.get("end") in PREEMPTED for a in attempts),
            "minutes_lost_to_preemption": round(lost / 60, 3),
            "minutes_checkpointing": round(sum(costs) / 60, 3),
            "checkpoints_written": len(costs),
        }


def _lost(attempt: dict[str, Any]) -> float:
    """Training seconds after the attempt's last checkpoint: what the next attempt redoes."""
    since = attempt.get("last_checkpoint_at") or attempt.get("training_since")
    if since is None:
        return 0.0
    return round(max(0.0, float(attempt.get("reached_at") or since) - since), 3)
