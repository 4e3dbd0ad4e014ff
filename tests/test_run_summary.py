"""The run summary of the exit task (carclassifier.run_summary), posted to a webhook receiver
on 127.0.0.1."""

import json

import pytest
from conftest import webhook_receiver

from carclassifier import storage
from carclassifier.run_summary import run_record, write_summary


@pytest.fixture
def receiver():
    """A Slack-style incoming-webhook endpoint that records the JSON bodies it is sent."""
    with webhook_receiver("/hooks/T000/B000") as hook:
        yield hook


def _run_folder(root: str) -> str:
    """What a finished run's steps leave in its folder."""
    run_dir = storage.join(root, "recipe-b6-abc")
    storage.write_text(
        storage.join(run_dir, "dataset.json"), json.dumps({"data_version": "sha256:00ff"})
    )
    for name, acc, minutes in (("stage_1", 0.81, 30.0), ("stage_2", 0.93, 90.0)):
        preempted = {"attempts": 3, "preemptions": 2, "minutes_lost_to_preemption": 12.0,
                     "minutes_checkpointing": 2.0} if name == "stage_2" else {}  # fmt: skip
        storage.write_text(
            storage.join(run_dir, "stages", name, "metrics.json"),
            json.dumps(
                {"best_val_accuracy": acc, "minutes": minutes, "epochs_run": 5, **preempted}
            ),
        )
    storage.write_text(
        storage.join(run_dir, "evaluation", "metrics.json"), json.dumps({"accuracy": 0.94})
    )
    storage.write_text(
        storage.join(run_dir, "gate.json"),
        json.dumps({"promoted": True, "reason": "significantly better"}),
    )
    storage.write_text(storage.join(run_dir, "deploy.json"), json.dumps({"version": 4}))
    storage.write_text(run_record(root, "run-1"), json.dumps({"run_dir": run_dir}))
    return run_dir


def test_a_finished_run_is_summarised_in_its_folder_and_posted(tmp_path, receiver):
    url, received = receiver
    root = str(tmp_path / "ckpt")
    run_dir = _run_folder(root)
    summary = write_summary(root, "run-1", "SUCCEEDED", webhook_url=url, gpus_per_task=2)
    assert summary.data_version == "sha256:00ff" and summary.deployed_version == 4
    assert summary.gpu_hours == round((30 + 90 + 12 + 2) / 60 * 2, 3)  # redone work too
    assert summary.stages["stage_2"]["best_val_accuracy"] == 0.93
    written = json.loads(storage.read_text(storage.join(run_dir, "summary.json")))
    assert written["gate"]["promoted"] is True
    (body,) = received
    assert body["text"].startswith("✅ carclassifier run run-1: **SUCCEEDED**")
    assert "deployed: serving version 4" in body["text"] and "GPU hours: 4.47" in body["text"]
    assert (
        "stage_2: best val accuracy 0.9300, 90.0 min (3 attempt(s), 12.0 min lost to "
        "preemption, 2.0 min checkpointing)"
    ) in body["text"]
    assert "stage_1: best val accuracy 0.8100, 30.0 min\n" in body["text"]


def test_a_failed_run_names_the_failed_task_and_a_dead_webhook_fails_nothing(tmp_path, receiver):
    url, received = receiver
    root = str(tmp_path / "ckpt")
    summary = write_summary(root, "run-2", "FAILED", "train-stage-3", "OOMKilled", webhook_url=url)
    assert summary.run_dir is None and summary.failed_task == "train-stage-3"
    assert "failed task: `train-stage-3`: OOMKilled" in received[0]["text"]
    assert storage.read_text(storage.join(root, "kfp-runs", "run-2", "summary.md")).startswith("❌")
    dead = write_summary(root, "run-2", "FAILED", webhook_url="http://127.0.0.1:9/nothing")
    assert dead.status == "FAILED"  # the post failed, logged, and nothing raised
