"""The cost guard (carclassifier.budget): a stage does not start once the run's GPU hours are
spent, and the run summary says why."""

import json

import pytest

from carclassifier import storage
from carclassifier.budget import BudgetSpentError, check_budget, gpu_hours_used
from carclassifier.run_summary import collect


def _attempts(run_dir: str, stage: str, *durations: float) -> None:
    """The attempt history a stage leaves (carclassifier.attempts), one entry per process."""
    entries = [{"started": 1000.0, "reached_at": 1000.0 + d, "end": "preempted"} for d in durations]
    storage.write_text(storage.join(run_dir, "stages", stage, "attempts.json"), json.dumps(entries))


def test_used_gpu_hours_count_every_attempt_of_every_stage(tmp_path):
    run_dir = str(tmp_path / "run")
    _attempts(run_dir, "stage_1", 1800.0, 1800.0)  # preempted once: both attempts paid for
    _attempts(run_dir, "stage_2", 3600.0)
    assert gpu_hours_used(run_dir, gpus=2) == pytest.approx(4.0)
    assert check_budget(run_dir, "stage_3", 2, budget=None) == pytest.approx(4.0)
    assert check_budget(run_dir, "stage_3", 2, budget=4.5) == pytest.approx(4.0)


def test_a_tiny_budget_stops_the_next_stage_and_the_summary_says_why(tmp_path):
    run_dir = str(tmp_path / "run")
    _attempts(run_dir, "stage_1", 90.0)
    with pytest.raises(BudgetSpentError, match=r"stage_2 not started: .* 0.03 of its 0.01 GPU"):
        check_budget(run_dir, "stage_2", 1, budget=0.01)
    storage.write_text(
        storage.join(run_dir, "dataset.json"), json.dumps({"stages": ["stage_1", "stage_2"]})
    )
    summary = collect(run_dir, "FAILED", "run-9", "exit-handler-1")
    assert summary.failed_task == "stage_2"
    assert "train.gpu_hours_budget" in summary.error and "not started" in summary.markdown()
