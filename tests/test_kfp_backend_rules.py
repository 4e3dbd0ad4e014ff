"""The compiled pipeline against rules of the KFP backend's own code (kubeflow/pipelines), each
ported or pinned from the upstream file, function and tag its docstring names.

Tests marked ``mirror`` read a git mirror of kubeflow/pipelines (and argoproj/argo-workflows) and
check that the data and rules in `carclassifier.kubeflow.kfp_versions` still say what that code says; they
are skipped where no mirror is (CI), the others use only the committed data.
"""

import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from carclassifier.config import load_config
from carclassifier.errors import ConfigError
from carclassifier.kubeflow import kfp_versions
from pipelines.__main__ import compile_main
from pipelines.car_classifier import ClusterOptions, compile_pipeline, stage_timeout_seconds
from tests.kfp_protos import MIRROR, show

B6 = Path(__file__).parents[1] / "configs" / "recipe_b6.yaml"
IMAGE = "registry.example/carclassifier/trainer:test"
KFP_MIRROR = MIRROR
ARGO_MIRROR = Path("/work/.mirror/argoproj+argo-workflows/repo")
mirror = pytest.mark.skipif(not KFP_MIRROR.is_dir(), reason="no kubeflow/pipelines mirror here")
MODEL_TASKS = ("train-stage", "evaluate-model", "predict-submission", "champion-gate")


def _grep(repo: Path, rev: str, pattern: str, path: str) -> str:
    """``git grep -F`` hits of ``pattern`` under ``path`` at ``rev``, test files left out."""
    out = subprocess.run(
        ["git", "-C", str(repo), "grep", "-F", pattern, rev, "--", path],
        capture_output=True,
        text=True,
    ).stdout
    return "\n".join(line for line in out.splitlines() if "_test.go" not in line)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory):
    """``version -> (pipeline spec, platform spec)`` of the B6 recipe, compiled on demand."""
    cache: dict[str, tuple[dict, dict]] = {}
    folder = tmp_path_factory.mktemp("targets")

    def get(version: str) -> tuple[dict, dict]:
        if version not in cache:
            out = compile_pipeline(B6, folder / f"{version}.yaml", IMAGE, kfp_version=version)
            spec, platform = yaml.safe_load_all(out.read_text())
            cache[version] = (spec, platform)
        return cache[version]

    return get


def _tasks(spec: Mapping) -> dict[str, Any]:
    """Every container task, those in the exit handler's and conditions' groups included."""
    return {
        name: task
        for name, task, _ in kfp_versions.walk_tasks(spec)
        if "executorLabel" in spec["components"][task["componentRef"]["name"]]
    }


def _root_of(spec: Mapping, task: Mapping) -> Any:
    """The task's resolver of pipeline parameters (`kfp_versions.walk_tasks`)."""
    return next(r for _, t, r in kfp_versions.walk_tasks(spec) if t is task)


def _container(spec: Mapping, task: Mapping) -> dict[str, Any]:
    label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    return spec["deploymentSpec"]["executors"][label]["container"]


def _kubernetes(spec: Mapping, platform: Mapping, task: Mapping) -> dict[str, Any]:
    label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][label]


# --------------------------------------------------------------------------------------------
# Defect 1: what the driver makes of resource placeholders
# --------------------------------------------------------------------------------------------

_CHANNEL = re.compile(r"\$.inputs.parameters\['(.+?)'\]")
"""``inputPipelineChannelPattern`` of kubeflow/pipelines backend/src/v2/driver/util.go, 2.17.0."""


def _executor_parameter_values(spec: Mapping, task: Mapping, run: Mapping) -> dict[str, Any]:
    """The task's ``executorInput.inputs.parameterValues`` as the driver fills them for a run
    with parameters ``run`` (absent ones: the root defaults): a parameter passed down from the
    pipeline keeps the JSON kind of its value (a number stays a number Value)."""
    root = spec["root"]["inputDefinitions"]["parameters"]
    root_of = _root_of(spec, task)
    values: dict[str, Any] = {}
    for name, source in task["inputs"].get("parameters", {}).items():
        if "componentInputParameter" in source:
            parent = root_of(source["componentInputParameter"])
            if parent is not None:  # else another task's output, passed down through a group
                values[name] = run.get(parent, root[parent].get("defaultValue"))
        elif "runtimeValue" in source:
            values[name] = source["runtimeValue"]["constant"]
    return values


def _go_v(number: float) -> str:
    """Go's ``fmt.Sprintf("%v", float64)`` for the plain numbers of a resource spec: the
    shortest text that reads back the same, without a trailing ``.0`` (8.0 -> "8")."""
    text = repr(float(number))
    return text[:-2] if text.endswith(".0") else text


def resolve_pod_spec_input_runtime_parameter(value: str, parameter_values: Mapping) -> str:
    """Port of ``resolvePodSpecInputRuntimeParameter`` (kubeflow/pipelines
    backend/src/v2/driver/resolve.go, tag 2.17.0; util.go at 2.4.0): a placeholder becomes the
    executor input's value through ``GetStringValue()`` (protobuf's getter: "" unless the Value
    holds a string); any other text is a constant, returned as is."""
    match = _CHANNEL.search(value)
    if not match:
        return value
    if match.group(1) not in parameter_values:
        raise KeyError("executorInput did not contain container Image input parameter")
    resolved = parameter_values[match.group(1)]
    return resolved if isinstance(resolved, str) else ""


def pod_resources(container: Mapping, parameter_values: Mapping) -> dict[str, dict[str, str]]:
    """Port of the resource part of ``initPodSpecPatch`` and ``getPodResource`` (kubeflow/pipelines
    backend/src/v2/driver/driver.go, tag 2.17.0, the same since 2.4.0): the string field when
    set (resolved), else the old numeric one (memory as ``%vG``); the accelerator limit only
    when both its type and count resolve to non-empty text."""
    resources = container.get("resources", {})
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    for kind, unit in (("Cpu", ""), ("Memory", "G")):
        for name, out in (("Limit", limits), ("Request", requests)):
            new, old = (
                resources.get(f"resource{kind}{name}", ""),
                resources.get(f"{kind.lower()}{name}"),
            )
            text = resolve_pod_spec_input_runtime_parameter(new, parameter_values) if new else ""
            if not new and old:
                text = f"{_go_v(old)}{unit}"
            if text:
                out[kind.lower()] = text
    accelerator = resources.get("accelerator")
    if accelerator:
        kind = accelerator.get("resourceType", "")
        kind = resolve_pod_spec_input_runtime_parameter(kind, parameter_values) if kind else ""
        kind = kind or accelerator.get("type", "")
        count = accelerator.get("resourceCount", "")
        count = resolve_pod_spec_input_runtime_parameter(count, parameter_values) if count else ""
        if not accelerator.get("resourceCount") and int(accelerator.get("count") or 0) > 0:
            count = str(int(accelerator["count"]))
        if kind and count:
            limits[kind] = count
    return {"limits": limits, "requests": requests}


def pod_resources_before_2_4(container: Mapping) -> dict[str, dict[str, str]]:
    """Port of the resource part of ``initPodSpecPatch`` (kubeflow/pipelines
    backend/src/v2/driver/driver.go, tag 2.2.0, the same at 2.3.0): only the numeric fields
    (``cpuLimit``..., ``accelerator.type``/``count``; the API server drops the string ones,
    unknown to its pipeline_spec.proto, in ``GetDeploymentConfig``); no placeholder is read."""
    resources = container.get("resources", {})
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    for kind, unit in (("cpu", ""), ("memory", "G")):
        if resources.get(f"{kind}Limit"):
            limits[kind] = f"{_go_v(resources[f'{kind}Limit'])}{unit}"
        if resources.get(f"{kind}Request"):
            requests[kind] = f"{_go_v(resources[f'{kind}Request'])}{unit}"
    accelerator = resources.get("accelerator") or {}
    if accelerator.get("type") and int(accelerator.get("count") or 0) > 0:
        limits[accelerator["type"]] = str(int(accelerator["count"]))
    return {"limits": limits, "requests": requests}


def test_every_model_task_gets_one_gpu_with_the_default_parameters(packages):
    """Every resource placeholder of the compiled IR, resolved as the driver does
    (`resolve_pod_spec_input_runtime_parameter`, `pod_resources`: kubeflow/pipelines
    backend/src/v2/driver/resolve.go resolvePodSpecInputRuntimeParameter and driver.go
    initPodSpecPatch, tag 2.17.0) with the default parameters, gives the model tasks one
    nvidia.com/gpu and the configured CPU and memory. With ``gpu_count: int`` (a number Value)
    GetStringValue() gives "" and no task gets a GPU."""
    spec, _ = packages(kfp_versions.DEFAULT_VERSION)
    gpu, cpu = ClusterOptions().gpu_resources, ClusterOptions().cpu_resources
    seen = 0
    for name, task in _tasks(spec).items():
        container = _container(spec, task)
        for field in ("resourceCount", "resourceType"):
            text = container["resources"].get("accelerator", {}).get(field, "")
            assert _CHANNEL.search(text) or not text.startswith("{{"), (name, text)
        got = pod_resources(container, _executor_parameter_values(spec, task, {}))
        if task["componentRef"]["name"].startswith(tuple(f"comp-{t}" for t in MODEL_TASKS)):
            seen += 1
            assert got["limits"] == {
                "nvidia.com/gpu": "1",
                "cpu": gpu.cpu_limit,
                "memory": gpu.memory_limit,
            }, name
            assert got["requests"] == {"cpu": gpu.cpu_request, "memory": gpu.memory_request}
        else:
            assert got == {
                "limits": {"cpu": cpu.cpu_limit, "memory": cpu.memory_limit},
                "requests": {"cpu": cpu.cpu_request, "memory": cpu.memory_request},
            }, name
    assert seen == 7 + 3


def test_a_run_parameter_sets_the_gpu_count(packages):
    """``gpu_count="2"`` given to a run (a string Value, as submit passes a STRING parameter)
    becomes the limit ``2`` (same port as above)."""
    spec, _ = packages(kfp_versions.DEFAULT_VERSION)
    task = _tasks(spec)["train-stage"]
    got = pod_resources(
        _container(spec, task), _executor_parameter_values(spec, task, {"gpu_count": "2"})
    )
    assert got["limits"]["nvidia.com/gpu"] == "2"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_count"]["parameterType"] == "STRING"
    assert params["gpu_type"]["parameterType"] == "STRING"


def test_before_2_4_the_gpu_is_compiled_in(packages):
    """KFP 2.2.0's driver reads only the numeric resource fields (`pod_resources_before_2_4`:
    kubeflow/pipelines backend/src/v2/driver/driver.go initPodSpecPatch, tag 2.2.0): the package
    for it has the GPU as constants and no gpu_type/gpu_count parameters to mislead a user."""
    spec, _ = packages("2.2.0")
    assert {"gpu_type", "gpu_count"}.isdisjoint(spec["root"]["inputDefinitions"]["parameters"])
    stage = pod_resources_before_2_4(_container(spec, _tasks(spec)["train-stage"]))
    assert stage["limits"]["nvidia.com/gpu"] == "1"
    assert stage["limits"]["cpu"] == "8" and stage["requests"]["cpu"] == "6"
    assert stage["limits"]["memory"] == "27.917287424G"  # 26Gi, as the old field holds it
    prepare = pod_resources_before_2_4(_container(spec, _tasks(spec)["prepare-data"]))
    assert "nvidia.com/gpu" not in prepare["limits"]


def test_check_package_finds_a_number_parameter_in_the_pod_spec(packages):
    """`kfp_versions.check_package` names a resource placeholder fed by a non-string parameter
    (the defect: GetStringValue() of a number is "") and one a pre-2.4.0 driver cannot read."""
    spec, platform = packages(kfp_versions.DEFAULT_VERSION)
    assert kfp_versions.check_package(spec, kfp_versions.DEFAULT_VERSION, platform) == []
    broken = json.loads(json.dumps(spec))
    broken["root"]["inputDefinitions"]["parameters"]["gpu_count"]["parameterType"] = (
        "NUMBER_INTEGER"
    )
    problems = kfp_versions.check_package(broken, kfp_versions.DEFAULT_VERSION, platform)
    assert problems and all("gpu_count of type NUMBER_INTEGER" in p for p in problems)
    assert len(problems) == 10  # one per model task
    old = [p for p in kfp_versions.check_package(spec, "2.3.0") if "does not resolve" in p]
    assert old and "compile it in as a constant" in old[0]


# --------------------------------------------------------------------------------------------
# Defect 2: each target's kubernetes config against its proto's field list
# --------------------------------------------------------------------------------------------


def _allowed_paths(schema: Mapping[str, Mapping[str, str]]) -> tuple[set[str], set[str]]:
    """Every dotted field path (proto names) reachable from KubernetesExecutorConfig, and the
    paths of fields of another file's message type (``ml_pipelines.*``, ``google.protobuf.*``),
    whose insides are not in these field lists."""
    paths: set[str] = set()
    opaque: set[str] = set()

    def walk(message: str, prefix: str, depth: int) -> None:
        for field, kind in schema[message].items():
            paths.add(prefix + field)
            nested = [m for m in (f"{message}.{kind}", kind) if m in schema]
            if nested and depth < 6:
                walk(nested[0], f"{prefix}{field}.", depth + 1)
            elif "." in kind:
                opaque.add(prefix + field)

    walk("KubernetesExecutorConfig", "", 0)
    return paths, opaque


def _used_paths(config: Any, prefix: str = "") -> set[str]:
    """Dotted field paths (camelCase turned to proto names) of a kubernetes executor config;
    maps (nodeSelector labels) stop at their field."""
    if isinstance(config, list):
        return {p for item in config for p in _used_paths(item, prefix)}
    if not isinstance(config, dict):
        return set()
    paths: set[str] = set()
    for key, value in config.items():
        name = prefix + re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), key)
        paths.add(name)
        if key not in ("labels", "annotations"):
            paths |= _used_paths(value, name + ".")
    return paths


@pytest.mark.parametrize("version", kfp_versions.SUPPORTED_VERSIONS)
def test_each_target_uses_only_fields_of_its_proto(packages, version):
    """Every field of every task's kubernetes config is in the kfp-kubernetes proto that
    backend release was built with (committed field lists from kubernetes_platform/proto/
    kubernetes_executor_config.proto at the revision its go.mod names): drivers up to 2.4.0
    reject an unknown field (backend/src/v2/cmd/driver/main.go, jsonpb.UnmarshalString), the
    API server from 2.14.0 on (backend/src/v2/compiler/argocompiler/container.go,
    containerExecutorTask, protojson.Unmarshal). And the package says which target it is for."""
    spec, platform = packages(version)
    allowed, opaque = _allowed_paths(kfp_versions.backend(version).kubernetes_fields)
    for name, task in _tasks(spec).items():
        used = _used_paths(_kubernetes(spec, platform, task))
        unknown = {p for p in used - allowed if not any(p.startswith(o + ".") for o in opaque)}
        assert not unknown, (name, sorted(unknown))
    assert kfp_versions.check_package(spec, version, platform) == []
    assert kfp_versions.target_version(spec) == version


@pytest.mark.parametrize("version", kfp_versions.SUPPORTED_VERSIONS)
def test_what_each_target_keeps(packages, version):
    """What is left out where, from the proto diffs (docs/kfp-backend.md): secretNameParameter
    from 2.5.0 on, optional env secrets from 2.15.0 (the Kaggle secret), securityContext from
    2.16.0; the GPU parameters from 2.4.0; the timeout (activeDeadlineSeconds) everywhere."""
    spec, platform = packages(version)
    key = tuple(int(p) for p in version.split("."))
    prepare = _kubernetes(spec, platform, _tasks(spec)["prepare-data"])
    stage = _kubernetes(spec, platform, _tasks(spec)["train-stage"])
    assert ("securityContext" in stage) == (key >= (2, 16, 0))
    assert ("secretNameParameter" in stage["secretAsVolume"][0]) == (key >= (2, 5, 0))
    assert stage["secretAsVolume"][0]["optional"] is True  # honoured since 2.2.0
    assert ("secretAsEnv" in prepare) == (key >= (2, 15, 0))
    assert int(stage["activeDeadlineSeconds"]) > 0 and int(prepare["activeDeadlineSeconds"]) > 0
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert ("gpu_count" in params) == (key >= (2, 4, 0))


def test_fit_leaves_out_unknown_fields_and_unhonoured_optional_secrets():
    config = {
        "secretAsEnv": [
            {"secretName": "k", "optional": True, "keyToEnv": [{"secretKey": "a", "envVar": "A"}]},
            {"secretName": "r", "optional": False, "keyToEnv": [{"secretKey": "b", "envVar": "B"}]},
        ],
        "secretAsVolume": [{"secretName": "g", "secretNameParameter": {}, "mountPath": "/s"}],
        "securityContext": {"runAsUser": "10001"},
        "activeDeadlineSeconds": "60",
    }
    fitted, lost = kfp_versions.fit_kubernetes_config(config, "2.2.0")
    assert fitted == {
        "secretAsEnv": [{"secretName": "r", "keyToEnv": [{"secretKey": "b", "envVar": "B"}]}],
        "secretAsVolume": [{"secretName": "g", "mountPath": "/s"}],
        "activeDeadlineSeconds": "60",
    }
    assert lost == [
        "optional secretAsEnv k",
        "secretAsEnv.optional",
        "secretAsVolume.secretNameParameter",
        "securityContext",
    ]
    assert kfp_versions.fit_kubernetes_config(config, "2.17.0") == (config, [])


def test_compile_for_an_old_backend_says_in_one_line_what_is_lost(tmp_path, caplog):
    out = tmp_path / "old.yaml"
    args = ["--config", str(B6), "--out", str(out), "--image", IMAGE, "--kfp-version", "2.2.0"]
    assert compile_main(args) == 0
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert line.startswith("KFP 2.2.0 cannot read all that kfp ")
    for lost in ("securityContext (14 tasks)", "optional secretAsEnv kaggle-credentials",
                 "the run summary exit task (PipelineTaskFinalStatus, from 2.14.0)",
                 "gpu_type/gpu_count parameters (compiled in: 1 x nvidia.com/gpu)"):  # fmt: skip
        assert lost in line
    caplog.clear()
    assert compile_main([*args[:-1], kfp_versions.DEFAULT_VERSION]) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_unsupported_versions_are_refused_naming_the_supported_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compile_main(["--config", str(B6), "--out", str(tmp_path / "x"), "--kfp-version", "1.8.5"])
    assert "invalid choice: '1.8.5'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"'2.6.0' is not supported: use one of 2.2.0, "):
        kfp_versions.backend("2.6.0")


def test_stamp_round_trip_and_a_mismatch_is_a_problem(packages):
    assert kfp_versions.target_version({"pipelineInfo": {"description": "x"}}) is None
    assert kfp_versions.target_version({}) is None
    text = kfp_versions.stamp("Staged fine-tuning.", "2.5.0")
    assert text == "Staged fine-tuning. Compiled for the KFP backend 2.5.0."
    assert kfp_versions.target_version({"pipelineInfo": {"description": text}}) == "2.5.0"
    spec, platform = packages("2.5.0")
    problems = kfp_versions.check_package(spec, "2.2.0", platform)
    assert problems[0] == (
        "the package was compiled for KFP 2.5.0, not 2.2.0: compile it with --kfp-version 2.2.0"
    )
    assert any("secretNameParameter is unknown to KFP 2.2.0" in p for p in problems)


# --------------------------------------------------------------------------------------------
# Defect 6: task timeouts
# --------------------------------------------------------------------------------------------


def test_stage_timeouts_follow_their_epochs_and_the_others_are_short(packages):
    """kfp-kubernetes ``set_timeout`` writes ``activeDeadlineSeconds`` into the task's kubernetes
    config; the driver copies it into the pod spec patch (kubeflow/pipelines
    backend/src/v2/driver/k8s.go extendPodSpecPatch, tag 2.17.0; driver.go at 2.2.0), which
    Argo merges into the pod. Stages get setup + epochs x (size/224)² x the epoch budget."""
    spec, platform = packages(kfp_versions.DEFAULT_VERSION)
    config = load_config(B6)
    options = ClusterOptions()
    by_stage = {s.name: s for s in config.stages}
    stages = 0
    for name, task in _tasks(spec).items():
        seconds = int(_kubernetes(spec, platform, task)["activeDeadlineSeconds"])
        stage = task["inputs"].get("parameters", {}).get("stage_name")
        if stage:
            stages += 1
            expected = stage_timeout_seconds(
                config, by_stage[stage["runtimeValue"]["constant"]], options
            )
            assert seconds == expected, name
        else:
            assert seconds == 3600, name
    assert stages == 7
    assert stage_timeout_seconds(config, by_stage["stage_1"], options) == 1800 + 5 * 900
    assert stage_timeout_seconds(config, by_stage["stage_5_1"], options) == 1800 + 15 * 4 * 900


def test_timeout_options_are_validated():
    for bad, message in [
        ({"epoch_timeout": "15"}, "epoch_timeout '15' is not a duration like 60s, 30m or 2h"),
        ({"task_timeout": "0s"}, "task_timeout 0s must be from 1s to 168h"),
        ({"stage_setup_timeout": "200h"}, "stage_setup_timeout 200h must be from 1s"),
        ({"gpu_count": 1}, "gpu_count 1 is a number"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ClusterOptions(**bad).check()


@pytest.mark.parametrize("version", kfp_versions.SUPPORTED_VERSIONS)
def test_the_exit_task_is_compiled_only_for_backends_that_resolve_its_status(packages, version):
    """The run-summary exit task takes a ``PipelineTaskFinalStatus``: the driver resolves it from
    2.14.0 on (kubeflow/pipelines backend/src/v2/driver/resolve.go, resolveInputParameter,
    ``TaskInputsSpec_InputParameterSpec_TaskFinalStatus_``, tag 2.14.0); up to 2.5.0 the API
    server's Argo compiler refuses such a package ("task final status not supported yet",
    backend/src/v2/compiler/argocompiler/dag.go, tag 2.5.0). So the exit handler is there
    exactly where it can run, and check_package names it where it cannot."""
    spec, _ = packages(version)
    finals = kfp_versions._final_status_inputs(spec)
    supported = kfp_versions.backend(version).task_final_status
    assert bool(finals) == supported
    if supported:
        assert finals == [("run-summary", "status")]
        assert spec["root"]["dag"]["tasks"]["run-summary"]["triggerPolicy"] == {
            "strategy": "ALL_UPSTREAM_TASKS_COMPLETED"
        }
    newest, _ = packages(kfp_versions.DEFAULT_VERSION)
    problems = kfp_versions.check_package(newest, version)
    assert any("PipelineTaskFinalStatus" in p for p in problems) == (not supported)


@pytest.mark.parametrize("version", ["2.5.0", kfp_versions.DEFAULT_VERSION])
def test_every_dag_passes_its_tasks_the_parameters_they_read(packages, version):
    """The driver resolves a task's ``componentInputParameter`` from its parent DAG's inputs and
    fails the task otherwise ("parent DAG does not have input parameter", kubeflow/pipelines
    backend/src/v2/driver/resolve.go, resolveInputParameter, tag 2.17.0). The kfp compiler
    threads into a group (the exit handler, a condition) only the channels its tasks take as
    inputs, not those used only as resource placeholders: gpu_type/gpu_count reach the group
    because the stage tasks also take them as inputs (kfp.local found the gap)."""
    spec, _ = packages(version)
    dags = {"root": spec["root"]} | {
        name: comp for name, comp in spec["components"].items() if "dag" in comp
    }
    for name, dag in dags.items():
        inputs = set((dag.get("inputDefinitions") or {}).get("parameters") or {})
        for task_name, task in dag["dag"]["tasks"].items():
            for source in ((task.get("inputs") or {}).get("parameters") or {}).values():
                wanted = source.get("componentInputParameter")
                assert wanted is None or wanted in inputs, (name, task_name, wanted)


def test_deploy_runs_only_when_the_gate_promoted(packages):
    """The deploy task is in a condition group on the gate's boolean output (dsl.If), which the
    driver evaluates from the task's trigger policy (backend/src/v2/driver/driver.go,
    ``opts.Task.GetTriggerPolicy().GetCondition()`` -> expr.Condition, tag 2.2.0 on)."""
    spec, _ = packages(kfp_versions.DEFAULT_VERSION)
    groups = {
        name: comp for name, comp in spec["components"].items() if name.startswith("comp-condition")
    }
    (condition,) = [
        task
        for comp in spec["components"].values()
        for task in ((comp.get("dag") or {}).get("tasks") or {}).values()
        if task.get("componentRef", {}).get("name") in groups
    ]
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--champion-gate-Output'] == true"
    )
    (group,) = groups.values()
    assert set(group["dag"]["tasks"]) == {"deploy-model"}


# --------------------------------------------------------------------------------------------
# The data and rules above, against the upstream source (skipped without the mirror)
# --------------------------------------------------------------------------------------------


@mirror
def test_committed_field_lists_match_the_protos():
    """`kfp_versions.FIELDS_FILE` is what ``python -m tests.kfp_protos`` derives from
    kubeflow/pipelines kubernetes_platform/proto/kubernetes_executor_config.proto at the revision
    each tag's go.mod names (pseudo-version commit up to 2.4.1, ./kubernetes_platform after)."""
    from tests.kfp_protos import derive

    assert json.loads(kfp_versions.FIELDS_FILE.read_text()) == derive(KFP_MIRROR)


@mirror
@pytest.mark.parametrize("version", kfp_versions.SUPPORTED_VERSIONS)
def test_backend_rules_match_the_driver_code(version):
    """Each flag of `kfp_versions.backend` against the code at that tag: resource placeholders
    resolved (backend/src/v2/driver/driver.go initPodSpecPatch reads GetResourceCount()),
    optional env secrets honoured (driver: ``secretAsEnv.Optional``), strict kubernetes-config
    parsing in the driver (backend/src/v2/cmd/driver/main.go ``jsonpb.UnmarshalString``) or in
    the API server (backend/src/v2/compiler/argocompiler/container.go ``protojson.Unmarshal``),
    and the timeout copied into the pod (``podSpec.ActiveDeadlineSeconds = &timeout``)."""
    target = kfp_versions.backend(version)
    driver = show(KFP_MIRROR, version, "backend/src/v2/driver/driver.go")
    assert ("GetResourceCount()" in driver) == target.resource_placeholders
    optional = _grep(KFP_MIRROR, version, "secretAsEnv.Optional", "backend/src/v2/driver/")
    assert bool(optional) == target.optional_env_sources
    main = show(KFP_MIRROR, version, "backend/src/v2/cmd/driver/main.go")
    strict_driver = "jsonpb.UnmarshalString(*k8sExecConfigJson" in main
    container = show(KFP_MIRROR, version, "backend/src/v2/compiler/argocompiler/container.go")
    strict_server = (
        "protojson.Unmarshal([]byte((*kubernetesConfigParam.Value)), k8sExecCfg); err != nil"
        in container
    )
    assert strict_driver == ("driver fails" in target.unknown_fields)
    assert strict_server == ("API server fails" in target.unknown_fields)
    assert _grep(
        KFP_MIRROR, version, "podSpec.ActiveDeadlineSeconds = &timeout", "backend/src/v2/driver/"
    )


@mirror
@pytest.mark.parametrize("version", kfp_versions.SUPPORTED_VERSIONS)
def test_task_final_status_support_matches_the_backend_code(version):
    """`Backend.task_final_status` against the code at that tag: the Argo compiler's refusal
    (backend/src/v2/compiler/argocompiler/dag.go) and the driver's resolution
    (backend/src/v2/driver/resolve.go, resolveInputParameter)."""
    dag = show(KFP_MIRROR, version, "backend/src/v2/compiler/argocompiler/dag.go")
    refused = "task final status not supported yet" in dag
    resolved = bool(
        _grep(
            KFP_MIRROR, version, "case *pipelinespec.TaskInputsSpec_InputParameterSpec_TaskFinalStatus_:",
            "backend/src/v2/driver/resolve.go",
        )
    )  # fmt: skip
    assert kfp_versions.backend(version).task_final_status == (resolved and not refused)


@mirror
def test_the_driver_resolution_rule_we_ported():
    """The ported rule is the code: resolvePodSpecInputRuntimeParameter returns
    ``val.GetStringValue()`` for a channel matching inputPipelineChannelPattern (kubeflow/pipelines
    backend/src/v2/driver/resolve.go and util.go, tag 2.17.0), and upstream's own
    resource-parameter test pipeline passes ``accelerator_limit: str`` (test_data/
    sdk_compiled_pipelines/valid/pipeline_with_string_machine_fields_pipeline_input.py, 2.17.0)."""
    resolve = show(KFP_MIRROR, "2.17.0", "backend/src/v2/driver/resolve.go")
    body = resolve.split("func resolvePodSpecInputRuntimeParameter(", 1)[1].split("\n}\n", 1)[0]
    assert "return val.GetStringValue(), nil" in body
    util = show(KFP_MIRROR, "2.17.0", "backend/src/v2/driver/util.go")
    assert f"inputPipelineChannelPattern = `{_CHANNEL.pattern}`" in util
    sample = show(
        KFP_MIRROR,
        "2.17.0",
        "test_data/sdk_compiled_pipelines/valid/pipeline_with_string_machine_fields_pipeline_input.py",
    )
    assert "accelerator_limit: str = '1'" in sample


@pytest.mark.skipif(not ARGO_MIRROR.is_dir(), reason="no argoproj/argo-workflows mirror here")
@pytest.mark.parametrize("tag", ["v3.4.17", "v3.7.9"])
def test_argo_merges_the_drivers_pod_spec_patch_into_the_pod(tag):
    """Argo applies the template's podSpecPatch (the driver's output, with
    activeDeadlineSeconds and the GPU limit) to the pod by a strategic merge patch
    (argoproj/argo-workflows workflow/controller/workflowpod.go createWorkflowPod; v3.4.17 is
    KFP 2.4's Argo, v3.7.x KFP 2.15's)."""
    source = show(ARGO_MIRROR, tag, "workflow/controller/workflowpod.go")
    assert "strategicpatch.StrategicMergePatch(" in source and "tmpl.PodSpecPatch" in source
