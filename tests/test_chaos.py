"""Chaos run of the local pipeline (`pipelines.chaos`): a fault schedule kills task processes
(SIGKILL; SIGTERM then SIGKILL after a grace period), one of them while its checkpoint upload to
the GCS emulator is in flight, and kfp.local's own retries resume them.

The retries are the backend's, not the harness's: kfp 2.17.3 reruns a failed task as its
``set_retry`` policy says in ``kfp/local/orchestrator/task_executor.py``,
``execute_single_task`` (``for attempt in range(max_retries + 1)``, sleeping the policy's
backoff between attempts). The harness replaces only
``kfp.local.subprocess_task_handler.run_local_subprocess`` (same command, same environment,
own process group) to send the signals; the test checks that each relaunch came from kfp
(attempt numbers of one task growing with every failed exit status).
"""

import json

import pytest
from conftest import tiny_dataset

from carclassifier import storage
from carclassifier.errors import ConfigError
from pipelines import chaos

ONE_STAGE = (
    "stages=[{name: stage_1, description: all layers, epochs: 2, unfreeze: 1.0, "
    "learning_rate: 0.01}]"
)


def test_random_schedules_are_seeded_capped_and_checked():
    config = chaos.chaos_config(None)
    first = chaos.FaultSchedule.random(12, 7, config)
    assert first == chaos.FaultSchedule.random(12, 7, config)
    assert first != chaos.FaultSchedule.random(12, 8, config)
    assert chaos.FaultSchedule.from_dict(json.loads(json.dumps(first.to_dict()))) == first
    assert {f.kind for f in first.faults} == {"sigkill", "sigterm"}
    assert {f.task for f in first.faults} <= set(chaos.task_names(config))
    per_task: dict[str, list[int]] = {}
    for fault in first.faults:
        per_task.setdefault(fault.task, []).append(fault.attempt)
    assert all(a == list(range(1, len(a) + 1)) for a in per_task.values())  # attempts 1, 2, ...
    assert first.retries_needed() <= 3
    assert chaos.chaos_options(first).retries >= first.retries_needed()
    with pytest.raises(ConfigError, match="exactly one of"):
        chaos.Fault("train-stage", after_seconds=1.0, on_line="x")
    with pytest.raises(ConfigError, match="kind"):
        chaos.Fault("train-stage", "sighup", after_seconds=1.0)
    with pytest.raises(ConfigError, match="one fault per task attempt"):
        chaos.FaultSchedule((chaos.Fault("a", after_seconds=1), chaos.Fault("a", after_seconds=2)))
    with pytest.raises(ConfigError, match="at most"):
        chaos.FaultSchedule.random(1000, 0, config)


def test_upload_names_are_read_from_every_kind_of_upload_request():
    name = chaos._object_name
    assert (
        name("POST", "/upload/storage/v1/b/b/o?uploadType=media&name=a%2Fb.json", b"") == "a/b.json"
    )
    body = b'--x\r\ncontent-type: application/json\r\n\r\n{"name": "runs/m.keras"}\r\n--x'
    assert name("POST", "/upload/storage/v1/b/b/o?uploadType=multipart", body) == "runs/m.keras"
    assert name("PUT", "/upload/storage/v1/b/b/o?uploadType=resumable&upload_id=1", b"") is None
    assert name("GET", "/storage/v1/b/b/o/x", b"") is None


def test_a_chaos_run_survives_its_faults_with_the_uninterrupted_weights(tmp_path, bucket):
    """Two faults on the stage task, one per attempt: SIGKILL while the first mid-epoch
    checkpoint's model.keras is being uploaded (the tap drops the request), then SIGTERM after
    that step's checkpoint, with SIGKILL 0.3 s later if the task is still there (it stops after
    its current step, and may be killed while checkpointing it: both must be survived).
    The pipeline ends SUCCESS and the stage's final weights equal an uninterrupted training of
    the same stage from the same Dataset artifact (rtol 1e-5, as tests/test_preemption.py)."""
    data = tiny_dataset(tmp_path / "cars")
    config = chaos.chaos_config(None, [f"output_dir={tmp_path / 'out'}", ONE_STAGE])
    upload = r"stages/stage_1/checkpoints/epoch-0000-step-000001/model\.keras$"
    schedule = chaos.FaultSchedule(
        (
            chaos.Fault("train-stage", "sigkill", attempt=1, on_upload=upload),
            chaos.Fault(
                "train-stage",
                "sigterm",
                attempt=2,
                on_line="stage_1 epoch 1 step 1/",
                grace_seconds=0.3,
            ),
        )
    )
    checkpoints = f"gs://{bucket.name}/runs"
    report = chaos.run_chaos(
        config, tmp_path / "kfp", schedule, data_source=str(data), checkpoint_root=checkpoints
    )
    assert report.status == "SUCCESS"
    injected, survived = report.injected, report.survived
    assert len(injected) == len(survived) >= 2, [e.to_dict() for e in report.events]
    assert any(e.fault.trigger == "upload" for e in injected)
    assert {e.fault.kind for e in injected} == {"sigkill", "sigterm"}
    killed_upload = next(e for e in injected if e.fault.trigger == "upload")
    assert killed_upload.exit_status == -9 and killed_upload.detail.endswith("model.keras")
    stage = [a for a in report.attempts if a["task"] == "train-stage"]
    assert [a["attempt"] for a in stage] == list(range(1, len(injected) + 2))  # kfp's relaunches
    assert all(a["exit_status"] != 0 for a in stage[:-1]) and stage[-1]["exit_status"] == 0

    run_key = chaos.run_key_of(report.run)
    summary = json.loads(storage.read_text(storage.join(checkpoints, run_key, "summary.json")))
    assert summary["status"] == "SUCCEEDED"
    assert summary["stages"]["stage_1"]["attempts"] == len(stage)
    expected = chaos.steps_reference(report.run, config, tmp_path / "reference")
    chaos.weights_difference(chaos.final_model_uri(config, checkpoints, run_key), expected)
