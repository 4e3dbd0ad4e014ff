"""The Kubeflow Pipelines backend releases we compile for, and what each one can read.

A compiled package is read by three parts of the KFP backend (kubeflow/pipelines):

* the API server's Argo compiler (``backend/src/v2/compiler``), which turns the IR into an Argo
  Workflow: it reads the container spec leniently (``visitor.go``, ``GetDeploymentConfig``:
  unknown fields dropped) and, from 2.14.0 on, the kubernetes executor config strictly
  (``argocompiler/container.go``, ``containerExecutorTask``: ``protojson.Unmarshal``, an unknown
  field fails the run);
* the driver (``backend/src/v2/cmd/driver/main.go``), which parses the kubernetes executor config
  strictly up to 2.4.0 (``jsonpb.UnmarshalString``: "failed to unmarshal Kubernetes config") and
  ignores unknown fields from 2.4.1 on (``util.UnmarshalString``), then builds the pod spec patch
  (``driver.go``, ``initPodSpecPatch``);
* Argo, which merges that patch into the pod.

So every field of the kubernetes config must be in the kfp-kubernetes proto the release was built
with (``kubernetes_platform/proto/kubernetes_executor_config.proto`` at the revision its go.mod
names; field lists in `FIELDS_FILE`, derived by ``python -m tests.kfp_protos``), and two rules come
from the driver's code:

* resource placeholders (``{{$.inputs.parameters[...]}}`` in CPU, memory, accelerator) are resolved
  from 2.4.0 on (``resolvePodSpecInputRuntimeParameter``); 2.2.0 and 2.3.0 read only the old
  numeric fields, so a parameterised GPU is no GPU there;
* ``optional`` of a secret or config map set as env vars is honoured from 2.15.0 on (``k8s.go``,
  ``extendPodSpecPatch``); before, the field is unknown;
* an exit task's ``PipelineTaskFinalStatus`` input (``taskFinalStatus``) is resolved from 2.14.0
  on (``resolve.go``, ``resolveInputParameter``; without its error message: "TODO: Implement
  fields Message and Code"); up to 2.5.0 the API server's Argo compiler refuses the package
  ("task final status not supported yet", ``argocompiler/dag.go``, ``addImplicitDependencies``).

docs/kfp-backend.md has the matrix and the upstream sources of each rule.
"""

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from carclassifier.errors import ConfigError

SUPPORTED_VERSIONS: tuple[str, ...] = (
    "2.2.0", "2.3.0", "2.4.0", "2.4.1", "2.5.0", "2.14.0", "2.14.3", "2.14.4", "2.15.0",
    "2.16.0", "2.16.1", "2.17.0",
)  # fmt: skip
"""KFP backend tags whose protos and driver code were read (Kubeflow 1.9 ships 2.2.0, Kubeflow
1.10 the 2.4/2.5 line; the API server's image tag says which one a cluster runs)."""
DEFAULT_VERSION = SUPPORTED_VERSIONS[-1]
"""The newest supported backend: what ``compile`` targets without ``--kfp-version``."""
FIELDS_FILE = Path(__file__).with_name("kfp_backend_fields.json")
"""Committed field lists of the kubernetes executor config per backend (from the protos)."""

RESOURCE_PLACEHOLDERS_SINCE = "2.4.0"
OPTIONAL_ENV_SOURCES_SINCE = "2.15.0"
STRICT_DRIVER_UNTIL = "2.4.0"
STRICT_API_SERVER_SINCE = "2.14.0"
TASK_FINAL_STATUS_SINCE = "2.14.0"

_STAMP = "Compiled for the KFP backend {version}."
_STAMP_RE = re.compile(r"Compiled for the KFP backend (\d+\.\d+\.\d+)\.\s*$")
_PLACEHOLDER = re.compile(r"\$\.inputs\.parameters\['(.+?)'\]")
"""The driver's ``inputPipelineChannelPattern`` (backend/src/v2/driver/util.go)."""
Resolver = Callable[[str], str | None]
"""A task input's name -> the pipeline parameter it comes from (`walk_tasks`)."""
_ENV_SOURCES = {"secretAsEnv": "secretName", "configMapAsEnv": "configMapName"}


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclass(frozen=True)
class Backend:
    """What one KFP backend release reads of a compiled package."""

    version: str
    kubernetes_proto: str
    """Revision (tag or commit) of the kfp-kubernetes proto it was built with."""
    resource_placeholders: bool
    """The driver resolves placeholders in CPU, memory and accelerator (else: old fields only)."""
    optional_env_sources: bool
    """``optional`` of ``secretAsEnv``/``configMapAsEnv`` exists and is honoured."""
    unknown_fields: str
    """What happens to a kubernetes-config field it does not know."""
    task_final_status: bool = False
    """An exit task may take ``PipelineTaskFinalStatus`` (else the run is refused)."""

    @property
    def kubernetes_fields(self) -> Mapping[str, Mapping[str, str]]:
        """``{message: {field: type}}`` of its KubernetesExecutorConfig proto."""
        return _fields()["kubernetes_executor_config"][self.kubernetes_proto]


@cache
def _fields() -> dict[str, Any]:
    return json.loads(FIELDS_FILE.read_text())


def backend(version: str) -> Backend:
    """The `Backend` of a supported ``version``; `ConfigError` naming the supported ones else."""
    if version not in SUPPORTED_VERSIONS:
        raise ConfigError(
            f"KFP backend version {version!r} is not supported: use one of "
            f"{', '.join(SUPPORTED_VERSIONS)} (the API server's version: kubectl -n kubeflow get "
            "deploy ml-pipeline -o jsonpath='{..image}')"
        )
    key = _key(version)
    if key <= _key(STRICT_DRIVER_UNTIL):
        unknown = "the driver fails the task (failed to unmarshal Kubernetes config)"
    elif key >= _key(STRICT_API_SERVER_SINCE):
        unknown = "the API server fails the run (failed to unmarshal kubernetes config)"
    else:
        unknown = "the driver silently ignores it"
    return Backend(
        version=version,
        kubernetes_proto=_fields()["kubernetes_platform_rev"][version],
        resource_placeholders=key >= _key(RESOURCE_PLACEHOLDERS_SINCE),
        optional_env_sources=key >= _key(OPTIONAL_ENV_SOURCES_SINCE),
        unknown_fields=unknown,
        task_final_status=key >= _key(TASK_FINAL_STATUS_SINCE),
    )


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _resolve_type(schema: Mapping[str, Any], scope: str, type_name: str) -> str | None:
    """The message a field's type names, looked up as protoc does (innermost scope first);
    None for scalars, enums, maps, google.protobuf.* and imported messages (not walked)."""
    parts = scope.split(".")
    while parts:
        candidate = ".".join([*parts, type_name])
        if candidate in schema:
            return candidate
        parts.pop()
    return type_name if type_name in schema else None


def _unknown_fields(
    schema: Mapping[str, Any], message: str, value: Any, path: str
) -> list[tuple[str, str]]:
    """(path, field) of every key of ``value`` that ``message`` does not have, recursively."""
    if isinstance(value, list):
        return [hit for item in value for hit in _unknown_fields(schema, message, item, path)]
    if not isinstance(value, Mapping):
        return []
    fields = schema[message]
    found: list[tuple[str, str]] = []
    for key, item in value.items():
        field = key if key in fields else _snake(key)
        if field not in fields:
            found.append((path, key))
            continue
        inner = _resolve_type(schema, message, fields[field])
        if inner is not None:
            found += _unknown_fields(schema, inner, item, f"{path}.{key}" if path else key)
    return found


def _drop(value: Any, path: list[str], key: str) -> None:
    """Remove ``key`` from the mapping(s) at ``path`` (lists are entered item by item)."""
    if isinstance(value, list):
        for item in value:
            _drop(item, path, key)
    elif isinstance(value, dict):
        if path:
            if path[0] in value:
                _drop(value[path[0]], path[1:], key)
        else:
            value.pop(key, None)


def fit_kubernetes_config(
    config: Mapping[str, Any], version: str
) -> tuple[dict[str, Any], list[str]]:
    """The kubernetes executor config of one task made readable by ``version``, and a short
    note per thing left out.

    Optional env secrets/config maps are left out where ``optional`` is not honoured (the pod
    would wait forever for a missing one, in CreateContainerConfigError); then every field the
    release's proto lacks is left out (its driver or API server would reject it).
    """
    target = backend(version)
    fitted = json.loads(json.dumps(config))
    lost: list[str] = []
    if not target.optional_env_sources:
        for kind, name_key in _ENV_SOURCES.items():
            kept = [e for e in fitted.get(kind, []) if not e.get("optional")]
            for entry in fitted.get(kind, []):
                if entry.get("optional"):
                    lost.append(f"optional {kind} {entry.get(name_key)}")
            if kind in fitted:
                fitted[kind] = kept
                if not kept:
                    del fitted[kind]
    for path, key in _unknown_fields(
        target.kubernetes_fields, "KubernetesExecutorConfig", fitted, ""
    ):
        _drop(fitted, path.split(".") if path else [], key)
        lost.append(f"{path}.{key}" if path else key)
    return fitted, list(dict.fromkeys(lost))


def stamp(description: str, version: str) -> str:
    """``description`` with the target backend appended (read back by `target_version`)."""
    backend(version)
    return f"{description.rstrip()} {_STAMP.format(version=version)}".lstrip()


def target_version(spec: Mapping[str, Any]) -> str | None:
    """The KFP backend a package was compiled for (`stamp` in ``pipelineInfo.description``), or
    None for a package compiled without one."""
    description = ((spec.get("pipelineInfo") or {}).get("description")) or ""
    match = _STAMP_RE.search(description) if isinstance(description, str) else None
    return match.group(1) if match else None


def walk_tasks(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any], Resolver]]:
    """``(name, task, root_of)`` for every task of a pipeline spec, those inside groups (exit
    handler, conditions) included. ``root_of(input)`` names the pipeline (root) parameter a
    task's ``componentInputParameter`` comes from, through the groups' inputs (None: not a
    pipeline parameter)."""
    components = spec.get("components") or {}

    def visit(dag: Mapping[str, Any], root_of: Resolver) -> Iterator[tuple[str, Mapping, Resolver]]:
        for name, task in (((dag.get("dag") or {}).get("tasks")) or {}).items():
            yield name, task, root_of
            group = components.get((task.get("componentRef") or {}).get("name")) or {}
            if "dag" in group:
                sources = ((task.get("inputs") or {}).get("parameters")) or {}

                def inner(
                    key: str, sources: Mapping = sources, outer: Resolver = root_of
                ) -> str | None:
                    parent = (sources.get(key) or {}).get("componentInputParameter")
                    return outer(parent) if parent else None

                yield from visit(group, inner)

    yield from visit(spec.get("root") or {}, lambda key: key)


def _input_type(
    spec: Mapping[str, Any], task: Mapping[str, Any], name: str, root_of: Resolver
) -> str | None:
    """The type a task input parameter arrives with: the declared type of the pipeline
    parameter it comes from, or a constant's JSON type (None: neither)."""
    source = ((task.get("inputs") or {}).get("parameters") or {}).get(name) or {}
    if "runtimeValue" in source:
        value = source["runtimeValue"].get("constant")
        return "STRING" if isinstance(value, str) else type(value).__name__
    parent = (
        root_of(source["componentInputParameter"]) if "componentInputParameter" in source else None
    )
    params = ((spec.get("root") or {}).get("inputDefinitions") or {}).get("parameters") or {}
    return str(params[parent].get("parameterType", "")) if parent in params else None


def _resource_values(resources: Mapping[str, Any]) -> dict[str, Any]:
    values = {k: v for k, v in resources.items() if k != "accelerator"}
    for key, value in (resources.get("accelerator") or {}).items():
        values[f"accelerator.{key}"] = value
    return values


def _check_resources(spec: Mapping[str, Any], target: Backend) -> list[str]:
    problems: list[str] = []
    executors = (spec.get("deploymentSpec") or {}).get("executors") or {}
    for task_name, task, root_of in walk_tasks(spec):
        component = spec.get("components", {}).get(task.get("componentRef", {}).get("name")) or {}
        container = (executors.get(component.get("executorLabel")) or {}).get("container") or {}
        resources = _resource_values(container.get("resources") or {})
        for field, value in resources.items():
            match = _PLACEHOLDER.search(value) if isinstance(value, str) else None
            if not match:
                continue
            if not target.resource_placeholders:
                problems.append(
                    f"task {task_name}: resources {field} is a placeholder, which KFP "
                    f"{target.version} does not resolve (from {RESOURCE_PLACEHOLDERS_SINCE} on): "
                    "compile it in as a constant"
                )
                continue
            kind = _input_type(spec, task, match.group(1), root_of)
            if kind != "STRING":
                source = ((task.get("inputs") or {}).get("parameters") or {}).get(match.group(1))
                parent = (source or {}).get("componentInputParameter")
                origin = (root_of(parent) if parent else None) or match.group(1)
                problems.append(
                    f"task {task_name}: resources {field} comes from {origin} of type "
                    f"{kind}; the driver reads only string values (GetStringValue), so it "
                    "becomes empty: make that pipeline parameter a str"
                )
        accelerator = (container.get("resources") or {}).get("accelerator") or {}
        if accelerator and not target.resource_placeholders and not accelerator.get("count"):
            problems.append(
                f"task {task_name}: no accelerator count KFP {target.version} reads (only "
                "accelerator.count): the task gets no GPU"
            )
    return problems


def _final_status_inputs(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(task, input) of every ``taskFinalStatus`` parameter input."""
    return [
        (name, param)
        for name, task, _ in walk_tasks(spec)
        for param, source in (((task.get("inputs") or {}).get("parameters")) or {}).items()
        if "taskFinalStatus" in (source or {})
    ]


def check_package(
    spec: Mapping[str, Any], version: str, platform: Mapping[str, Any] | None = None
) -> list[str]:
    """The problems a KFP backend ``version`` would have with a compiled package: ``spec`` its
    pipeline spec (first YAML document), ``platform`` its platform spec (second document, with
    ``platforms.kubernetes``). Empty when it would read everything as meant."""
    target = backend(version)
    problems: list[str] = []
    stamped = target_version(spec)
    if stamped is not None and stamped != version:
        problems.append(
            f"the package was compiled for KFP {stamped}, not {version}: "
            f"compile it with --kfp-version {version}"
        )
    problems += _check_resources(spec, target)
    if not target.task_final_status:
        problems += [
            f"task {name}: input {param} is a PipelineTaskFinalStatus, which KFP {version} "
            f"cannot resolve (from {TASK_FINAL_STATUS_SINCE} on): leave the exit task out"
            for name, param in _final_status_inputs(spec)
        ]
    kubernetes = ((platform or {}).get("platforms") or {}).get("kubernetes") or {}
    executors = (kubernetes.get("deploymentSpec") or {}).get("executors") or {}
    for name, config in sorted(executors.items()):
        for path, key in _unknown_fields(
            target.kubernetes_fields, "KubernetesExecutorConfig", config, ""
        ):
            field = f"{path}.{key}" if path else key
            problems.append(
                f"{name}: kubernetes config field {field} is unknown to KFP {version} "
                f"(kfp-kubernetes proto at {target.kubernetes_proto}): {target.unknown_fields}"
            )
        if not target.optional_env_sources:
            for kind, name_key in _ENV_SOURCES.items():
                for entry in config.get(kind) or []:
                    if entry.get("optional"):
                        problems.append(
                            f"{name}: {kind} {entry.get(name_key)} is optional, which KFP "
                            f"{version} cannot honour (from {OPTIONAL_ENV_SOURCES_SINCE} on): "
                            "the pod stays in CreateContainerConfigError while it is missing"
                        )
    return problems
