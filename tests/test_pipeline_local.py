"""The pipeline's steps, then the whole Kubeflow pipeline run by kfp.local (every task a
subprocess, as pods would be) on a tiny dataset, with checkpoints and the champion pointer in
gs:// buckets on the GCS emulator.

kfp.local ignores images, resources, accelerators and the kubernetes platform config (the IR
tests cover those) but runs the real component code, artifacts, task order and caching.
"""

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny_dataset, webhook_receiver, write_image

from carclassifier import artifacts, reports, steps, storage
from carclassifier.config import dump_config, load_config, resolve_config
from carclassifier.errors import ConfigError, DatasetError
from pipelines import run_pipeline_local

TWO_STAGES = (
    "stages=[{name: stage_1, description: head only, epochs: 1, unfreeze: 0.0, "
    "learning_rate: 0.01}, {name: stage_2, description: all layers, epochs: 1, unfreeze: 1.0, "
    "learning_rate: 0.001}]"
)
TASKS_IN_ORDER = [
    "prepare-data",
    "validate-and-eda",
    "train-stage",
    "train-stage-2",
    "evaluate-model",
]


@pytest.fixture(scope="module", autouse=True)
def _scratch(tmp_path_factory: pytest.TempPathFactory):
    """Unpacked image shards go to a test folder, also in kfp.local's task subprocesses."""
    previous = os.environ.get(artifacts.SCRATCH_ENV)
    os.environ[artifacts.SCRATCH_ENV] = str(tmp_path_factory.mktemp("scratch"))
    yield
    if previous is None:
        os.environ.pop(artifacts.SCRATCH_ENV, None)
    else:
        os.environ[artifacts.SCRATCH_ENV] = previous


def _recipe(*extra: str) -> str:
    return dump_config(load_config(None, ["name=steps-test", TWO_STAGES, *extra]))


# --------------------------------------------------------------------------- steps, no kfp


def test_resolve_config_applies_overrides_then_parameters():
    config = resolve_config(
        _recipe(),
        ["stages.stage_2.epochs=3", "model.backbone=efficientnet_b0"],
        "efficientnet_b3",
        64,
    )
    assert config.stage("stage_2").epochs == 3
    assert config.model.backbone == "efficientnet_b3" and config.input.image_size == 64
    unchanged = resolve_config(_recipe(), [], "", 0)
    assert unchanged.model.backbone == "efficientnet_lite0" and unchanged.input.image_size == 224


def test_prepare_writes_the_dataset_artifact_and_a_stable_run_key(tmp_path):
    data = tiny_dataset(tmp_path / "cars")
    first = steps.prepare_step(
        _recipe(), [], str(data), str(tmp_path / "a"), stage_names=["stage_1", "stage_2"]
    )
    again = steps.prepare_step(_recipe(), [], str(data), str(tmp_path / "b"))
    longer = steps.prepare_step(
        _recipe(), ["stages.stage_2.epochs=2"], str(data), str(tmp_path / "c")
    )
    assert first["run_key"] == again["run_key"] != longer["run_key"]
    assert first["run_key"].startswith("steps-test-")
    assert first["test_dir"] == "data/test_upload"
    assert (first["train_images"], first["val_images"], first["class_names"]) == (
        6,
        2,
        ["audi", "bmw"],
    )
    artifact = tmp_path / "a"
    for name in ("config.yaml", "split.csv", "validation.json", "usable.csv", "dataset.json"):
        assert (artifact / name).is_file()
    assert (artifact / "shards" / "index.json").is_file() and not (artifact / "data").exists()
    config, prepared, manifest = artifacts.load_dataset_artifact(str(artifact))
    root = (artifacts.images_root(str(artifact)) / "data").resolve()
    assert prepared.dataset.root == root and manifest == first
    assert config.stage("stage_2").epochs == 1

    counts = steps.eda_step(str(artifact), str(tmp_path / "eda" / "report.html"))
    assert counts["images"] == 8 and counts["classes"] == 2 and counts["excluded"] == 0
    assert "data:image/png;base64," in (tmp_path / "eda" / "report.html").read_text()


def test_a_dataset_without_test_folder_gets_no_test_images(tmp_path):
    data = tiny_dataset(tmp_path / "cars")
    shutil.rmtree(data / "test_upload")
    manifest = steps.prepare_step(_recipe(), [], str(data), str(tmp_path / "a"))
    assert manifest["test_dir"] is None and not (tmp_path / "a" / "test").exists()


def test_the_gate_leaves_a_pointer_that_already_names_the_export(tmp_path):
    artifact = tmp_path / "dataset"
    steps.prepare_step(_recipe(), [], str(tiny_dataset(tmp_path / "cars")), str(artifact))
    pointer = tmp_path / "champion.json"
    text = json.dumps({"export": "gs://b/run/export", "val_accuracy": 0.75})
    pointer.write_text(text)
    decision = steps.gate_step(
        str(artifact), "gs://b/run/export", str(pointer), 0.0, "", str(tmp_path / "decision.md")
    )
    assert decision["promoted"] is False and decision["metrics"]["champion_accuracy"] == 0.75
    assert pointer.read_text() == text
    assert "already the champion" in (tmp_path / "decision.md").read_text()


def test_a_retried_gate_that_promoted_still_lets_the_deploy_run(tmp_path):
    """The defect the chaos run found (docs/reliability.md, fault 8): a gate killed after its
    pointer write is retried. The pointer names the export *and this run's key*, and the run
    has no deploy.json yet, so the answer is "promoted" again; once deployed, or when another
    run put the export there, it is "already the champion"."""
    artifact = tmp_path / "dataset"
    steps.prepare_step(_recipe(), [], str(tiny_dataset(tmp_path / "cars")), str(artifact))
    pointer, root = tmp_path / "champion.json", tmp_path / "ckpt"

    def gate(run_key: str, promoted_by: str) -> dict:
        pointer.write_text(
            json.dumps({"export": "gs://b/x", "val_accuracy": 0.5, "run_key": promoted_by})
        )
        return steps.gate_step(
            str(artifact), "gs://b/x", str(pointer), 0.0, str(root), str(tmp_path / "g.md"), run_key
        )

    again = gate("k1", promoted_by="k1")
    assert again["promoted"] is True and "earlier attempt of this run" in again["reason"]
    assert gate("k1", promoted_by="k0")["promoted"] is False  # another run's champion
    config = artifacts.load_dataset_artifact(str(artifact))[0]
    folder = Path(artifacts.run_dir(str(root), "k1", config))
    (folder / artifacts.DEPLOY_RECORD).write_text("{}")
    deployed = gate("k1", promoted_by="k1")
    assert (
        deployed["promoted"] is False
        and deployed["reason"] == "this export is already the champion"
    )


def test_a_stage_task_refuses_to_start_when_the_gpu_budget_is_spent(tmp_path):
    """train_stage_step checks the run's GPU hours (carclassifier.budget) before training."""
    from carclassifier.artifacts import run_dir
    from carclassifier.budget import BudgetSpentError

    artifact = tmp_path / "dataset"
    recipe = _recipe("train.gpu_hours_budget=0.01")
    manifest = steps.prepare_step(recipe, [], str(tiny_dataset(tmp_path / "cars")), str(artifact))
    root = str(tmp_path / "ckpt")
    folder = run_dir(root, manifest["run_key"], load_config(None, ["name=steps-test"]))
    storage.write_text(
        storage.join(folder, "stages", "stage_1", "attempts.json"),
        json.dumps([{"started": 0.0, "reached_at": 60.0, "end": "finished"}]),
    )
    with pytest.raises(BudgetSpentError, match="stage_2 not started"):
        steps.train_stage_step(
            str(artifact), "stage_2", root, manifest["run_key"], None,
            str(tmp_path / "m.keras"), str(tmp_path / "c.html"), "", "1",
        )  # fmt: skip
    assert json.loads(storage.read_text(storage.join(folder, "budget.json")))["stage"] == "stage_2"


def test_prepare_refuses_a_changed_stage_list_and_an_unknown_source(tmp_path):
    with pytest.raises(ConfigError, match="compiled for"):
        steps.prepare_step(_recipe(), [], "", str(tmp_path / "x"), stage_names=["stage_1"])
    with pytest.raises(DatasetError, match="neither 'kaggle'"):
        steps.prepare_step(_recipe(), [], str(tmp_path / "nowhere"), str(tmp_path / "y"))


def test_log_metrics_also_writes_the_artifact_file(tmp_path):
    class FakeMetrics:
        path = str(tmp_path / "metrics")
        logged: dict = {}

        def log_metric(self, name, value):
            self.logged[name] = value

    artifact = FakeMetrics()
    reports.log_metrics(artifact, {"val_accuracy": 0.5, "epochs": 2})
    assert artifact.logged == {"val_accuracy": 0.5, "epochs": 2}
    assert json.loads(Path(artifact.path).read_text()) == artifact.logged


def test_a_mounted_gcs_key_is_used_only_when_present(tmp_path, monkeypatch):
    seen = []
    step = steps._step(lambda: seen.append(os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv(steps.GCS_KEY_FILE_ENV, str(tmp_path / "key.json"))
    step()  # no secret mounted: ambient credentials
    (tmp_path / "key.json").write_text("{}")
    step()
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/mine.json")
    step()  # credentials set by the user win
    assert seen == [None, str(tmp_path / "key.json"), "/mine.json"]


# --------------------------------------------------------------------------- the pipeline, kfp.local


def _executor_output(task_dir: Path) -> dict:
    return json.loads((task_dir / "executor_output.json").read_text())


def _artifact_metadata(task_dir: Path, name: str) -> dict:
    return _executor_output(task_dir)["artifacts"][name]["artifacts"][0]["metadata"]


@pytest.fixture(scope="module")
def webhook() -> Iterator[tuple[str, list[dict]]]:
    """A Slack-style incoming webhook on 127.0.0.1 recording what it is sent."""
    with webhook_receiver("/hooks/carclassifier") as hook:
        yield hook


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, gcs_emulator: str, webhook) -> dict:
    """The retraining loop, three runs on photos under a gs:// prefix: the first promotes and
    deploys version 1; the second (same data) is cached but for the gate, which keeps the
    champion; then photos are added to the prefix and the third retrains on the new data
    version with a challenger that learns nothing, which the gate keeps out."""
    root = tmp_path_factory.mktemp("pipeline")
    data = tiny_dataset(root / "cars")
    config = load_config(
        None,
        [
            "name=pipeline-test",
            f"output_dir={root / 'out'}",
            "model.weights=null",
            "input.image_size=32",
            "input.batch_size=4",
            "augment.tta_views=2",
            TWO_STAGES,
        ],
    )
    client = storage.gcs_client()
    checkpoints = client.create_bucket(f"ckpt-{uuid.uuid4().hex[:8]}").name
    champions = client.create_bucket(f"champ-{uuid.uuid4().hex[:8]}").name
    photos = client.create_bucket(f"photos-{uuid.uuid4().hex[:8]}").name
    storage.upload_tree(data, f"gs://{photos}/cars")
    pointer = f"gs://{champions}/car-classifier/champion.json"
    url, received = webhook

    arguments = {
        "data_source": f"gs://{photos}/cars",
        "checkpoint_root": f"gs://{checkpoints}/runs",
        "champion_pointer": pointer,
        "webhook_url": url,
    }
    tasks = run_pipeline_local(config, root / "kfp", enable_caching=True, **arguments)
    first_pointer = storage.read_text(pointer)
    again = run_pipeline_local(config, root / "kfp", enable_caching=True, **arguments)
    for i in range(3):  # new photos arrive in the bucket
        for c, name in enumerate(("audi", "bmw")):
            path = write_image(root / "new" / name / f"new_{i}.jpg", seed=900 + 10 * c + i)
            storage.put_file(path, f"gs://{photos}/cars/{name}/new_{i}.jpg")
    untrained = ["stages.stage_1.learning_rate=1e-12", "stages.stage_2.learning_rate=1e-12"]
    third = run_pipeline_local(
        config, root / "kfp", enable_caching=True, overrides=untrained, **arguments
    )
    return {
        "tasks": tasks,
        "again": again,
        "third": third,
        "checkpoints": checkpoints,
        "pointer": pointer,
        "first_pointer": first_pointer,
        "webhook": received,
    }


@pytest.mark.slow
def test_tasks_ran_in_dag_order(pipeline_run):
    tasks = pipeline_run["tasks"]
    names = {p.name for p in tasks.iterdir()}
    assert names == {
        *TASKS_IN_ORDER, "predict-submission", "export-model", "champion-gate", "deploy-model",
        "run-summary",
    }  # fmt: skip
    finished = {n: (tasks / n / "executor_output.json").stat().st_mtime_ns for n in names}
    order = [finished[n] for n in TASKS_IN_ORDER]
    assert order == sorted(order)
    last = finished["evaluate-model"]
    assert finished["predict-submission"] > last and finished["export-model"] > last
    assert finished["champion-gate"] > finished["export-model"]
    assert finished["run-summary"] > max(v for k, v in finished.items() if k != "run-summary")


@pytest.mark.slow
def test_stages_wrote_checkpoints_and_best_models_to_the_bucket(pipeline_run):
    tasks = pipeline_run["tasks"]
    run_key = _executor_output(tasks / "prepare-data")["parameterValues"]["run_key"]
    assert run_key.startswith("pipeline-test-")
    names = {b.name for b in storage.gcs_client().list_blobs(pipeline_run["checkpoints"])}
    for stage in ("stage_1", "stage_2"):
        prefix = f"runs/{run_key}/stages/{stage}/"
        for leaf in (
            "checkpoints/epoch-0001/model.keras",
            "checkpoints/epoch-0001/state.json",
            "checkpoints/latest.json",
            "best.keras",
            "metrics.json",
            "history.csv",
            f"Train_Val_acc_{stage}.png",
        ):
            assert prefix + leaf in names
    for task, stage in (("train-stage", "stage_1"), ("train-stage-2", "stage_2")):
        model = _artifact_metadata(tasks / task, "model")
        assert model["stage"] == stage
        assert (
            model["uri"]
            == f"gs://{pipeline_run['checkpoints']}/runs/{run_key}/stages/{stage}/best.keras"
        )
        assert (tasks / task / "model").stat().st_size > 0  # the Model handed to the next task
        metrics = _artifact_metadata(tasks / task, "metrics")
        assert {"val_accuracy", "val_loss", "epochs", "minutes"} <= set(metrics)
        assert metrics["epochs"] == 1
        curves = (tasks / task / "curves").read_text()
        assert "data:image/png;base64," in curves


@pytest.mark.slow
def test_eda_and_evaluation_outputs(pipeline_run):
    tasks = pipeline_run["tasks"]
    assert "data:image/png;base64," in (tasks / "validate-and-eda" / "report").read_text()
    assert _artifact_metadata(tasks / "validate-and-eda", "metrics")["classes"] == 2
    evaluation = tasks / "evaluate-model"
    for name in ("evaluation.json", "confusion_matrix.csv", "confusion_matrix_tta.csv"):
        assert (evaluation / "evaluation" / name).is_file()
    metrics = _artifact_metadata(evaluation, "metrics")
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["tta_views"] == 2
    assert {"ece", "robust_zoom_out_100_accuracy", "robust_hflip_accuracy_tta"} <= set(metrics)
    assert "Robustness under shifts" in (evaluation / "report").read_text()
    assert (evaluation / "evaluation" / "robustness.html").is_file()
    matrix = _artifact_metadata(evaluation, "confusion")["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == ["audi", "bmw"]
    assert sum(map(sum, (row["row"] for row in matrix["rows"]))) == 2  # one val image per class


@pytest.mark.slow
def test_submission_export_and_first_model_promoted(pipeline_run):
    tasks = pipeline_run["tasks"]
    lines = (tasks / "predict-submission" / "submission").read_text().splitlines()
    assert lines[0] == "Id,Category" and sorted(lines[1:])[0].startswith("test_0.jpg,")
    assert len(lines) == 3
    export_uri = _executor_output(tasks / "export-model")["parameterValues"]["Output"]
    assert storage.exists(storage.join(export_uri, "labels.json"))
    assert (tasks / "export-model" / "exported" / "saved_model").is_dir()
    pointer = json.loads(pipeline_run["first_pointer"])
    assert pointer["export"] == export_uri
    gate = tasks / "champion-gate"
    assert _executor_output(gate)["parameterValues"]["Output"] is True
    assert "promoted" in (gate / "report").read_text()


@pytest.mark.slow
def test_rerun_is_cached_except_the_gate_which_keeps_the_champion(pipeline_run):
    again = pipeline_run["again"]
    # every other task a cache hit; the gate keeps the champion, so nothing is deployed
    assert {p.name for p in again.iterdir()} == {"champion-gate", "run-summary"}
    gate = again / "champion-gate"
    assert _executor_output(gate)["parameterValues"]["Output"] is False
    assert "already the champion" in (gate / "report").read_text()
    assert storage.read_text(pipeline_run["pointer"]) == pipeline_run["first_pointer"]


@pytest.mark.slow
def test_the_first_run_deploys_version_1_and_tells_the_webhook(pipeline_run):
    tasks = pipeline_run["tasks"]
    assert _executor_output(tasks / "deploy-model")["parameterValues"]["Output"] == 1
    serving = f"gs://{pipeline_run['checkpoints']}/runs/serving"
    live = json.loads(storage.read_text(f"{serving}/champion.json"))
    assert live["version"] == 1 and storage.exists(f"{serving}/1/saved_model.pb")
    run_key = _executor_output(tasks / "prepare-data")["parameterValues"]["run_key"]
    summary = json.loads(
        storage.read_text(f"gs://{pipeline_run['checkpoints']}/runs/{run_key}/summary.json")
    )
    version = _artifact_metadata(tasks / "prepare-data", "dataset")["data_version"]
    assert summary["status"] == "SUCCEEDED" and summary["deployed_version"] == 1
    assert summary["data_version"] == version and version.startswith("sha256:")
    assert set(summary["stages"]) == {"stage_1", "stage_2"} and summary["gate"]["promoted"]
    texts = [message["text"] for message in pipeline_run["webhook"]]
    assert any("SUCCEEDED" in t and "deployed: serving version 1" in t for t in texts), texts


@pytest.mark.slow
def test_new_photos_give_a_new_data_version_and_a_losing_challenger_is_kept_out(pipeline_run):
    """The third run reads the grown prefix (a new data version), trains a challenger that
    learns nothing, and the gate's paired test keeps the champion: no deployment."""
    first, third = pipeline_run["tasks"], pipeline_run["third"]
    before = _artifact_metadata(first / "prepare-data", "dataset")
    after = _artifact_metadata(third / "prepare-data", "dataset")
    assert after["data_version"] != before["data_version"]
    assert (
        after["train_images"] + after["val_images"]
        == before["train_images"] + before["val_images"] + 6
    )
    assert _executor_output(third / "champion-gate")["parameterValues"]["Output"] is False
    assert "McNemar" in (third / "champion-gate" / "report").read_text()
    assert not (third / "deploy-model").exists()
    assert json.loads(storage.read_text(pipeline_run["pointer"])) == json.loads(
        pipeline_run["first_pointer"]
    )
    serving = f"gs://{pipeline_run['checkpoints']}/runs/serving"
    assert json.loads(storage.read_text(f"{serving}/champion.json"))["version"] == 1
