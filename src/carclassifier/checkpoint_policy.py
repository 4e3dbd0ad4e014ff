"""When a stage writes a mid-epoch checkpoint, and whether one still fits after SIGTERM.

``checkpoint.every`` (see `carclassifier.config.CheckpointConfig`): ``epoch`` (epoch ends only),
N steps, ``<N>m`` minutes, or ``auto``: the Young/Daly interval ``sqrt(2 x C x M)``, which
minimises the expected time lost to checkpoints plus redone work for a checkpoint cost ``C``
and a mean time between preemptions ``M``, bounded to ``[min_minutes, max_minutes]``. ``C`` is
measured (the duration of each checkpoint written: save + upload + pointer); ``M`` is
configured or learned from the stage's attempt history (`carclassifier.attempts`). Until a
checkpoint has been measured, ``auto`` uses the shortest interval, so the first measurement
comes early. Everything reads time from an injectable clock (tests use a fake one).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from carclassifier.config import CheckpointConfig

log = logging.getLogger(__name__)

Clock = Callable[[], float]


def young_daly_interval(cost_s: float, mtbf_s: float, lo_s: float, hi_s: float) -> float:
    """Seconds between checkpoints that minimise expected lost time (Young's first-order
    optimum ``sqrt(2 x cost x MTBF)``), clipped to ``[lo_s, hi_s]``."""
    if cost_s < 0 or mtbf_s <= 0 or lo_s > hi_s:
        raise ValueError(
            f"young_daly_interval needs cost >= 0, MTBF > 0 and lo <= hi "
            f"(got {cost_s}, {mtbf_s}, {lo_s}, {hi_s})"
        )
    return min(hi_s, max(lo_s, math.sqrt(2.0 * cost_s * mtbf_s)))


def fits_in_grace(cost_s: float | None, grace_s: float, since_signal_s: float) -> bool:
    """Whether a checkpoint costing ``cost_s`` (None: never measured) ends before SIGKILL,
    ``grace_s`` after a SIGTERM received ``since_signal_s`` ago."""
    return cost_s is not None and cost_s <= grace_s - since_signal_s


class CheckpointPolicy:
    """Says at each training step whether a mid-epoch checkpoint is due.

    ``record`` takes each checkpoint's measured cost (epoch-end ones too) and restarts the
    interval; ``costs`` seeds the measurements with earlier attempts' (so a restarted stage's
    ``auto`` interval and SIGTERM decision start from evidence).
    """

    def __init__(
        self, config: CheckpointConfig, mtbf_s: float, mtbf_source: str,
        costs: list[float] | None = None, clock: Clock = time.monotonic,
    ) -> None:  # fmt: skip
        self.config = config
        self.mtbf_s = mtbf_s
        self.mtbf_source = mtbf_source
        self.costs = list(costs or [])
        self.clock = clock
        self._since = clock()
        self._steps = 0
        self._logged: float | None = None

    @property
    def cost_s(self) -> float | None:
        """Mean measured checkpoint cost (seconds), None before the first."""
        return sum(self.costs) / len(self.costs) if self.costs else None

    @property
    def worst_cost_s(self) -> float | None:
        """Longest measured checkpoint (the SIGTERM decision is conservative), None before one."""
        return max(self.costs) if self.costs else None

    @property
    def interval_s(self) -> float | None:
        """Seconds between mid-epoch checkpoints (timed and auto modes), else None."""
        minutes = self.config.every_minutes
        if minutes is not None:
            return minutes * 60.0
        if self.config.every != "auto":
            return None
        lo, hi = self.config.min_minutes * 60.0, self.config.max_minutes * 60.0
        if self.cost_s is None:
            return lo
        return young_daly_interval(self.cost_s, self.mtbf_s, lo, hi)

    def describe(self) -> dict[str, float | str | None]:
        """The interval and its inputs, for logs and the stage's metrics."""
        interval = self.interval_s
        cost = self.cost_s
        return {
            "checkpoint_every": str(self.config.every),
            "checkpoint_interval_minutes": None if interval is None else round(interval / 60, 3),
            "checkpoint_seconds": None if cost is None else round(cost, 3),
            "mtbf_minutes": round(self.mtbf_s / 60, 1) if self.config.every == "auto" else None,
            "mtbf_source": self.mtbf_source if self.config.every == "auto" else None,
        }

    def _log_interval(self) -> None:
        interval = self.interval_s
        if self.config.every != "auto" or interval is None:
            return
        if self._logged is not None and abs(interval - self._logged) <= 0.1 * self._logged:
            return
        self._logged = interval
        cost = self.cost_s
        log.info(
            "checkpoint interval %.1f min (auto: %s; bounds %g-%g min; MTBF %.0f min, %s)",
            interval / 60,
            "no checkpoint measured yet: shortest"
            if cost is None
            else f"sqrt(2 x {cost:.2f} s checkpoint x MTBF)",
            self.config.min_minutes, self.config.max_minutes, self.mtbf_s / 60, self.mtbf_source,
        )  # fmt: skip

    def start(self) -> None:
        """Count the interval from now (training starts or resumes)."""
        self._since = self.clock()
        self._steps = 0
        self._log_interval()

    def step(self) -> bool:
        """One training step done: True when a mid-epoch checkpoint is due now."""
        self._steps += 1
        every = self.config.every_steps
        if every is not None:
            return self._steps >= every
        interval = self.interval_s
        return interval is not None and self.clock() - self._since >= interval

    def record(self, cost_s: float) -> None:
        """A checkpoint was written in ``cost_s`` seconds: measure it, restart the interval."""
        self.costs.append(cost_s)
        self.start()
