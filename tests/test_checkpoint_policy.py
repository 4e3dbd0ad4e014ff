"""When mid-epoch checkpoints are due (steps, minutes, auto = Young/Daly from measured cost and
preemption rate), what SIGTERM does with its grace period, and the attempt history's
accounting of lost time: all on a fake clock."""

import json
import math

import pytest

from carclassifier.attempts import ATTEMPTS, AttemptLedger, learned_mtbf
from carclassifier.checkpoint_policy import CheckpointPolicy, fits_in_grace, young_daly_interval
from carclassifier.config import CheckpointConfig, load_config
from carclassifier.errors import ConfigError, StagePreempted
from carclassifier.training_callbacks import SigtermGuard


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_young_daly_interval_is_sqrt_two_cost_mtbf_within_bounds():
    assert young_daly_interval(15, 7200, 60, 3600) == pytest.approx(math.sqrt(2 * 15 * 7200))
    assert young_daly_interval(0.01, 7200, 60, 3600) == 60  # cheap checkpoints: the floor
    assert young_daly_interval(600, 86400, 60, 3600) == 3600  # rare preemptions: the ceiling
    with pytest.raises(ValueError, match="MTBF > 0"):
        young_daly_interval(1, 0, 60, 3600)


def _due_at(policy: CheckpointPolicy, clock: FakeClock, dt: float) -> float:
    """Step every ``dt`` fake seconds until a checkpoint is due; the time it became due."""
    start = clock.now
    while not policy.step():
        clock.now += dt
        assert clock.now - start < 10**6
    return clock.now - start


def test_auto_measures_first_then_uses_young_daly_with_the_measured_cost():
    clock = FakeClock()
    config = CheckpointConfig(every="auto", min_minutes=1, max_minutes=60)
    policy = CheckpointPolicy(config, mtbf_s=7200, mtbf_source="configured", clock=clock)
    policy.start()
    assert policy.interval_s == 60  # nothing measured yet: the shortest, to measure early
    assert _due_at(policy, clock, 1.0) == 60
    policy.record(15.0)  # that checkpoint took 15 s
    expected = math.sqrt(2 * 15 * 7200)  # 464.8 s
    assert policy.interval_s == pytest.approx(expected)
    assert _due_at(policy, clock, 1.0) == math.ceil(expected)
    policy.record(5.0)  # mean cost now 10 s
    assert policy.interval_s == pytest.approx(math.sqrt(2 * 10 * 7200))
    assert policy.describe() == {
        "checkpoint_every": "auto", "checkpoint_interval_minutes": round(math.sqrt(2 * 10 * 7200) / 60, 3),
        "checkpoint_seconds": 10.0, "mtbf_minutes": 120.0, "mtbf_source": "configured",
    }  # fmt: skip
    assert policy.worst_cost_s == 15.0


def test_steps_minutes_and_epoch_modes():
    clock = FakeClock()
    steps = CheckpointPolicy(CheckpointConfig(every=3), 7200, "-", clock=clock)
    steps.start()
    assert [steps.step() for _ in range(3)] == [False, False, True]
    minutes = CheckpointPolicy(CheckpointConfig(every="10m"), 7200, "-", clock=clock)
    minutes.start()
    assert minutes.interval_s == 600 and _due_at(minutes, clock, 7.0) == 602
    epoch = CheckpointPolicy(CheckpointConfig(), 7200, "-", clock=clock)
    epoch.start()
    clock.now += 10**5
    assert not epoch.step() and epoch.interval_s is None


@pytest.mark.parametrize(
    ("value", "expected"), [("auto", "auto"), (200, 200), ("200", 200), ("2.5m", "2.5m"),
                            ("epoch", "epoch"), ("AUTO", "auto")],
)  # fmt: skip
def test_checkpoint_every_accepts(value, expected):
    assert CheckpointConfig(every=value).every == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [("checkpoint.every=0", "checkpoint every 1 step or more"),
     ("checkpoint.every=10s", "'10s' is not epoch, a number of steps"),
     ("checkpoint.every=true", "write epoch, a number of steps"),
     ("checkpoint.grace_seconds=-1", "grace_seconds"),
     ("checkpoint.min_minutes=90", "min_minutes 90.0 > max_minutes 60.0: swap them")],
)  # fmt: skip
def test_bad_checkpoint_settings_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_attempt_history_counts_lost_and_checkpoint_time_and_gives_the_mtbf(tmp_path):
    clock = FakeClock(1000.0)
    out = str(tmp_path / "stage")
    first = AttemptLedger(out, "pod-1", clock)
    first.training((0, 0))
    clock.now = 1100.0
    first.checkpointed((0, 50), 4.0)
    clock.now = 1400.0
    first.step((0, 90))  # heartbeat (60 s passed): 300 s trained after the checkpoint
    clock.now = 1430.0  # ...then SIGKILL: nothing more is written

    second = AttemptLedger(out, "pod-2", clock)
    assert second.earlier[0]["end"] == "killed" and second.earlier[0]["lost_seconds"] == 300.0
    assert second.checkpoint_costs() == [4.0]
    assert learned_mtbf(second.earlier, 7200.0)[0] == pytest.approx((7200 + 400) / 2)
    second.training((0, 50))
    clock.now = 1500.0
    second.checkpointed((1, 0), 6.0)
    clock.now = 1560.0
    second.step((1, 10))
    second.ended("preempted")  # SIGTERM, no checkpoint fitted: 60 s lost
    third = AttemptLedger(out, "pod-3", clock)
    third.training((1, 0))
    third.checkpointed((2, 0), 2.0)
    third.ended("finished")
    assert third.summary() == {
        "attempts": 3, "preemptions": 2, "minutes_lost_to_preemption": 6.0,
        "minutes_checkpointing": 0.2, "checkpoints_written": 3,
    }  # fmt: skip
    stored = json.loads((tmp_path / "stage" / ATTEMPTS).read_text())
    assert [a["end"] for a in stored] == ["killed", "preempted", "finished"]
    saved = {"started": 0.0, "reached_at": 3600.0, "end": "preempted", "checkpointed_on_stop": True}
    assert learned_mtbf([saved], 7200.0)[0] == 7200 + 3600  # lost nothing: not counted


class StubCheckpoint:
    """What SigtermGuard asks of StageCheckpoint."""

    def __init__(self, costs: list[float]) -> None:
        self.position, self.saved, self.steps_per_epoch = (0, 2), (0, 0), 3
        self.policy = CheckpointPolicy(CheckpointConfig(), 7200, "-", costs=costs)
        self.written: list[tuple[int, int]] = []

    def can_save_mid_epoch(self) -> bool:
        return 0 < self.position[1] < self.steps_per_epoch

    def save_mid_epoch(self) -> str:
        self.written.append(self.position)
        self.saved = self.position
        return "out/checkpoints/epoch-0000-step-000002"


def _sigterm_at(elapsed: float, costs: list[float], stage) -> tuple[StubCheckpoint, str]:
    clock = FakeClock(100.0)
    checkpoint = StubCheckpoint(costs)
    guard = SigtermGuard(stage, "out", checkpoint, grace_s=30.0, clock=clock)
    guard._handler(15, None)  # SIGTERM at t=100
    clock.now += elapsed  # the step under way ends this much later
    with pytest.raises(StagePreempted) as stopped:
        guard.on_train_batch_end(1)
    return checkpoint, str(stopped.value)


def test_sigterm_checkpoints_only_when_the_measured_cost_fits_in_the_grace_left():
    stage = load_config(None).stages[0]
    checkpoint, message = _sigterm_at(20.0, [4.0, 9.0], stage)  # 10 s left, 9 s needed
    assert checkpoint.written == [(0, 2)]
    assert "after batch 2: checkpoint of this step written in the grace period" in message
    assert "resumes from it" in message
    checkpoint, message = _sigterm_at(22.0, [4.0, 9.0], stage)  # 8 s left
    assert checkpoint.written == []
    assert (
        "no checkpoint written: a checkpoint takes up to 9.0s and 8.0s of the 30s grace" in message
    )
    checkpoint, message = _sigterm_at(0.0, [], stage)
    assert checkpoint.written == [] and "no checkpoint has been measured yet" in message
    assert fits_in_grace(1.0, 30.0, 29.0) and not fits_in_grace(1.0, 30.0, 29.5)
