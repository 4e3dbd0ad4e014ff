"""The compiled Kubeflow pipeline (kfp IR YAML): the graph follows the recipe's stage list, and
every training task asks for GPUs, resources, retries, caching and the cluster settings."""

from pathlib import Path

import pytest
import yaml
from kfp import compiler

from carclassifier.config import load_config
from carclassifier.kubeflow import kfp_versions
from pipelines import ClusterOptions, build_pipeline, compile_pipeline
from pipelines.__main__ import compile_main

B6 = Path(__file__).parents[1] / "configs" / "recipe_b6.yaml"
IMAGE = "registry.example/carclassifier/trainer:test"
B6_STAGES = ["stage_1", "stage_2", "stage_3", "stage_4", "stage_5_1", "stage_5_2", "stage_5_3"]
GPU_TASK_COMPONENTS = ("train-stage", "evaluate-model", "predict-submission", "champion-gate")


def _load(path: Path) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def b6(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    out = compile_pipeline(B6, tmp_path_factory.mktemp("ir") / "b6.yaml", IMAGE)
    return _load(out)


def _tasks(spec: dict) -> dict:
    """Every container task, those inside the exit handler's and conditions' groups included."""
    return {
        name: task
        for name, task, _ in kfp_versions.walk_tasks(spec)
        if "executorLabel" in spec["components"][task["componentRef"]["name"]]
    }


def _pipeline_parameter(spec: dict, task: dict, name: str) -> str | None:
    """The pipeline parameter a task's input ``name`` comes from, through its groups."""
    root_of = next(r for _, t, r in kfp_versions.walk_tasks(spec) if t is task)
    source = task["inputs"]["parameters"][name]
    return (
        root_of(source["componentInputParameter"]) if "componentInputParameter" in source else None
    )


def _stage_tasks(spec: dict) -> list[tuple[str, dict]]:
    """(task name, task) of the training tasks, in the order the Model artifact flows."""
    stages = {
        name: task
        for name, task in _tasks(spec).items()
        if "stage_name" in task["inputs"].get("parameters", {})
    }
    first = [n for n, t in stages.items() if "init_model" not in t["inputs"].get("artifacts", {})]
    assert len(first) == 1
    order = first
    while True:
        following = [
            n
            for n, t in stages.items()
            if t["inputs"]["artifacts"].get("init_model", {}).get("taskOutputArtifact", {})
            == {"outputArtifactKey": "model", "producerTask": order[-1]}
        ]
        if not following:
            break
        assert len(following) == 1
        order += following
    assert len(order) == len(stages)
    return [(n, stages[n]) for n in order]


def _stage_name(task: dict) -> str:
    return task["inputs"]["parameters"]["stage_name"]["runtimeValue"]["constant"]


def _executor(spec: dict, task: dict) -> dict:
    component = spec["components"][task["componentRef"]["name"]]
    return spec["deploymentSpec"]["executors"][component["executorLabel"]]


def _is_model_task(task: dict) -> bool:
    return task["componentRef"]["name"].startswith(tuple(f"comp-{c}" for c in GPU_TASK_COMPONENTS))


def test_stages_are_chained_in_recipe_order_by_their_models(b6):
    spec, _ = b6
    chain = _stage_tasks(spec)
    assert [_stage_name(t) for _, t in chain] == B6_STAGES
    (first_name, first), *rest = chain
    assert "validate-and-eda" in first["dependentTasks"]  # no GPU before the data check
    for (before, _), (_, task) in zip(chain, rest, strict=False):
        assert before in task["dependentTasks"]
    names = [_stage_name(t) for _, t in chain]
    assert names == [s.name for s in load_config(B6).stages]
    tasks = _tasks(spec)
    last = chain[-1][0]
    assert tasks["evaluate-model"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"] == {
        "outputArtifactKey": "model",
        "producerTask": last,
    }
    assert "evaluate-model" in tasks["predict-submission"]["dependentTasks"]
    evaluation = tasks["export-model"]["inputs"]["artifacts"]["evaluation"]
    assert evaluation["taskOutputArtifact"]["producerTask"] == "evaluate-model"
    gate_input = tasks["champion-gate"]["inputs"]["parameters"]["export_uri"]
    assert gate_input["taskOutputParameter"]["producerTask"] == "export-model"


def test_stage_tasks_get_data_run_key_and_display_names(b6):
    spec, _ = b6
    chain = _stage_tasks(spec)
    for _, task in chain:
        params, artifacts = task["inputs"]["parameters"], task["inputs"]["artifacts"]
        assert artifacts["dataset"]["taskOutputArtifact"]["producerTask"] == "prepare-data"
        assert params["run_key"]["taskOutputParameter"] == {
            "outputParameterKey": "run_key",
            "producerTask": "prepare-data",
        }
        assert _pipeline_parameter(spec, task, "checkpoint_root") == "checkpoint_root"
    display = [t["taskInfo"]["name"] for _, t in chain]
    assert display[0] == "Stage 1 — head only"
    assert display[1] == "Stage 2 — unfreeze 1/2"
    assert display[4] == "Stage 5.1 — all layers at 448 px, LR 1e-5"
    prepare = _tasks(spec)["prepare-data"]["inputs"]["parameters"]
    assert prepare["stage_names"]["runtimeValue"]["constant"] == B6_STAGES
    assert "efficientnet_b6" in prepare["config_yaml"]["runtimeValue"]["constant"]


def test_every_model_task_requests_gpus_from_the_pipeline_parameters(b6):
    spec, _ = b6
    gpu_tasks = [t for t in _tasks(spec).values() if _is_model_task(t)]
    assert len(gpu_tasks) == len(B6_STAGES) + 3
    for task in gpu_tasks:
        resources = _executor(spec, task)["container"]["resources"]
        assert resources["accelerator"] == {
            "resourceType": "{{$.inputs.parameters['pipelinechannel--gpu_type']}}",
            "resourceCount": "{{$.inputs.parameters['pipelinechannel--gpu_count']}}",
        }
        assert _pipeline_parameter(spec, task, "pipelinechannel--gpu_type") == "gpu_type"
        assert _pipeline_parameter(spec, task, "pipelinechannel--gpu_count") == "gpu_count"
        assert (resources["resourceCpuRequest"], resources["resourceCpuLimit"]) == ("6", "8")
        assert resources["resourceMemoryRequest"] == "20Gi"
        assert resources["resourceMemoryLimit"] == "26Gi"
    cpu_only = _executor(spec, _tasks(spec)["prepare-data"])["container"]["resources"]
    assert "accelerator" not in cpu_only
    assert cpu_only["resourceCpuRequest"] == "2" and cpu_only["resourceMemoryLimit"] == "16Gi"


def test_retries_and_caching(b6, tmp_path):
    spec, _ = b6
    tasks = _tasks(spec)
    for name, task in _stage_tasks(spec):
        assert task["retryPolicy"] == {
            "maxRetryCount": 3,
            "backoffDuration": "60s",
            "backoffFactor": 2.0,
            "backoffMaxDuration": "86400s",  # tests/test_cluster_rules.py: a day
        }, name
        assert task["cachingOptions"] == {"enableCache": True}
    for name in ("prepare-data", "validate-and-eda", "evaluate-model", "export-model"):
        assert tasks[name]["cachingOptions"] == {"enableCache": True}, name
    assert tasks["champion-gate"]["cachingOptions"].get("enableCache", False) is False

    fresh, _ = _load(compile_pipeline(B6, tmp_path / "fresh.yaml", IMAGE, cache_data=False))
    assert _tasks(fresh)["prepare-data"]["cachingOptions"].get("enableCache", False) is False
    assert _tasks(fresh)["train-stage"]["cachingOptions"] == {"enableCache": True}


def test_kubernetes_platform_spec(b6):
    spec, executors = b6
    for name, task in _tasks(spec).items():
        k8s = executors[spec["components"][task["componentRef"]["name"]]["executorLabel"]]
        assert k8s["secretAsVolume"] == [
            {
                "mountPath": "/var/secrets/google",
                "optional": True,
                "secretName": "gcs-credentials",
                "secretNameParameter": {"runtimeValue": {"constant": "gcs-credentials"}},
            }
        ], name
        env = {e["name"]: e["value"] for e in _executor(spec, task)["container"]["env"]}
        assert env["CARCLASSIFIER_GCS_KEY_FILE"] == "/var/secrets/google/key.json"
        if _is_model_task(task):
            assert k8s["nodeSelector"] == {"labels": ClusterOptions().gpu_node_selector}
            assert k8s["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ]
        else:
            assert "nodeSelector" not in k8s and "tolerations" not in k8s, name
        assert ("secretAsEnv" in k8s) == (name == "prepare-data")
    prepare = _tasks(spec)["prepare-data"]["componentRef"]["name"]
    (kaggle,) = executors[spec["components"][prepare]["executorLabel"]]["secretAsEnv"]
    assert kaggle["secretName"] == "kaggle-credentials" and kaggle["optional"] is True
    assert kaggle["keyToEnv"] == [
        {"secretKey": "KAGGLE_USERNAME", "envVar": "KAGGLE_USERNAME"},
        {"secretKey": "KAGGLE_KEY", "envVar": "KAGGLE_KEY"},
    ]


def test_gpu_node_label_option(tmp_path):
    out = tmp_path / "l4.yaml"
    label = "cloud.google.com/gke-accelerator=nvidia-l4"
    assert compile_main(["--config", str(B6), "--out", str(out), "--gpu-node-label", label]) == 0
    spec, executors = _load(out)
    stage = _tasks(spec)["train-stage"]["componentRef"]["name"]
    selector = executors[spec["components"][stage]["executorLabel"]]["nodeSelector"]
    assert selector == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}


def test_ui_outputs_and_artifacts(b6):
    spec, _ = b6

    def outputs(task_name: str) -> dict[str, str]:
        component = spec["components"][_tasks(spec)[task_name]["componentRef"]["name"]]
        artifacts = component["outputDefinitions"]["artifacts"]
        return {name: a["artifactType"]["schemaTitle"] for name, a in artifacts.items()}

    for name, _ in _stage_tasks(spec):
        assert outputs(name) == {
            "model": "system.Model",
            "metrics": "system.Metrics",
            "curves": "system.HTML",
        }
    assert outputs("prepare-data") == {"dataset": "system.Dataset"}
    assert outputs("validate-and-eda") == {"report": "system.HTML", "metrics": "system.Metrics"}
    assert outputs("evaluate-model") == {
        "metrics": "system.Metrics",
        "confusion": "system.ClassificationMetrics",
        "confusion_tta": "system.ClassificationMetrics",
        "report": "system.HTML",
        "evaluation": "system.Artifact",
    }
    assert outputs("export-model") == {"exported": "system.Model"}
    assert outputs("champion-gate") == {"metrics": "system.Metrics", "report": "system.HTML"}


def test_images_parameters_and_no_runtime_installs(b6):
    spec, _ = b6
    for executor in spec["deploymentSpec"]["executors"].values():
        container = executor["container"]
        assert container["image"] == IMAGE
        assert not any("pip install" in part for part in container["command"])
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {name: p.get("defaultValue") for name, p in params.items()} == {
        "data_source": "",
        "overrides": [],
        "backbone": "",
        "image_size": 0,
        "gpu_type": "nvidia.com/gpu",
        "gpu_count": "1",
        "checkpoint_root": "",
        "champion_pointer": "",
        "min_improvement": 0.0,
        "serving_root": "",
        "inference_service": "",
        "webhook_url": "",
    }
    assert spec["pipelineInfo"]["name"] == "car-classifier-recipe-b6"


def test_another_stage_list_gives_another_graph(tmp_path):
    stages = (
        "stages=[{name: warmup, epochs: 1, unfreeze: 0.0, learning_rate: 0.01},"
        " {name: finetune, description: top half, epochs: 2, unfreeze: 0.5, learning_rate: 0.001},"
        " {name: polish, epochs: 1, unfreeze: 0.5, learning_rate: 0.0001}]"
    )
    config = load_config(B6, [stages])
    out = tmp_path / "three.yaml"
    compiler.Compiler().compile(build_pipeline(config, IMAGE), package_path=str(out))
    spec, _ = _load(out)
    chain = _stage_tasks(spec)
    assert [_stage_name(t) for _, t in chain] == ["warmup", "finetune", "polish"]
    assert [t["taskInfo"]["name"] for _, t in chain] == ["warmup", "finetune — top half", "polish"]
    assert (
        _tasks(spec)["evaluate-model"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"][
            "producerTask"
        ]
        == (chain[-1][0])
    )


def test_compiling_twice_gives_identical_bytes(b6, tmp_path, capsys):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    compile_pipeline(B6, first, IMAGE)
    assert compile_main(["--config", str(B6), "--out", str(second), "--image", IMAGE]) == 0
    assert first.read_bytes() == second.read_bytes()
    assert capsys.readouterr().out.strip() == str(second)


def test_compile_cli_reports_a_bad_config_in_one_line(tmp_path, capsys):
    assert (
        compile_main(["--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")])
        == 2
    )
    assert capsys.readouterr().err.startswith("error: cannot read config")
