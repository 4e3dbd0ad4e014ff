"""A compiled pipeline package (IR YAML) and the run parameters checked against it, offline.

`load_package` reads the IR; `run_parameters` turns ``--param key=value`` texts into typed
parameters, checks them as the pods will use them and refuses (or fills in) the defaults that
only work on a laptop (`cluster_defaults`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from carclassifier.config import resolve_config, yaml_problem
from carclassifier.errors import CarClassifierError
from carclassifier.kubeflow import kfp_versions
from carclassifier.kubeflow.arguments import check_arguments
from carclassifier.kubeflow.cluster import PLACEHOLDER_IMAGE


class SubmitError(Exception):
    """A failure the user can fix; its message is the one line printed after ``error:``."""


@dataclass(frozen=True)
class PipelinePackage:
    """A compiled KFP pipeline package read from disk."""

    path: Path
    sha256: str
    spec: Mapping[str, Any]  # the PipelineSpec document
    types: Mapping[str, str]  # root input name → parameterType (STRING, NUMBER_INTEGER, ...)
    required: frozenset[str]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    platform: Mapping[str, Any] = field(default_factory=dict)  # the PlatformSpec, if any
    recipe: str | None = None  # the carclassifier recipe compiled in (None: another pipeline)
    stage_names: tuple[str, ...] | None = None

    @property
    def images(self) -> set[str]:
        """The container images of every executor (``deploymentSpec.executors.*.container``)."""
        executors = (self.spec.get("deploymentSpec") or {}).get("executors") or {}
        return {e["container"]["image"] for e in executors.values() if "container" in e}


def load_package(path: str | os.PathLike[str]) -> PipelinePackage:
    """Read and check a compiled pipeline YAML; raise `SubmitError` if it is not one."""
    package = Path(path)
    if package.suffix not in (".yaml", ".yml"):
        raise SubmitError(f"pipeline package {package} must be a compiled .yaml file")
    try:
        data = package.read_bytes()
    except FileNotFoundError:
        raise SubmitError(
            f"pipeline package {package} not found: compile it first "
            "(python -m pipelines compile ... --out PATH) or pass --package PATH"
        ) from None
    except OSError as exc:
        raise SubmitError(f"cannot read pipeline package {package}: {exc.strerror}") from None
    try:
        docs = list(yaml.safe_load_all(data))
    except yaml.YAMLError as exc:
        raise SubmitError(
            f"pipeline package {package} is not valid YAML: {yaml_problem(exc)}"
        ) from None
    spec = docs[0] if docs else None
    if not isinstance(spec, dict) or "root" not in spec or "pipelineInfo" not in spec:
        raise SubmitError(
            f"{package} is not a compiled KFP v2 pipeline (no pipelineInfo/root): "
            "compile it with kfp.compiler.Compiler"
        )
    inputs = ((spec.get("root") or {}).get("inputDefinitions") or {}).get("parameters") or {}
    recipe, stage_names = _recipe_of(spec)
    platform = docs[1] if len(docs) > 1 and isinstance(docs[1], dict) else {}
    return PipelinePackage(
        path=package,
        sha256=hashlib.sha256(data).hexdigest(),
        spec=spec,
        types={name: str(info.get("parameterType", "")) for name, info in inputs.items()},
        required=frozenset(
            n for n, i in inputs.items() if not i.get("isOptional") and "defaultValue" not in i
        ),
        defaults={n: _typed_default(i) for n, i in inputs.items() if "defaultValue" in i},
        platform=platform,
        recipe=recipe,
        stage_names=tuple(stage_names) if stage_names is not None else None,
    )


def _typed_default(info: Mapping[str, Any]) -> Any:
    """A parameter's default as its declared type (the IR writes integers as 1.0)."""
    value = info["defaultValue"]
    if info.get("parameterType") == "NUMBER_INTEGER" and isinstance(value, float):
        return int(value) if value.is_integer() else value
    return value


def _recipe_of(spec: Mapping[str, Any]) -> tuple[str | None, list[str] | None]:
    """The recipe YAML and stage names compiled into a car-classifier pipeline's IR (the
    prepare task's constant inputs, see `pipelines.car_classifier`), or (None, None)."""
    for _, task, _ in kfp_versions.walk_tasks(spec):
        inputs = ((task or {}).get("inputs") or {}).get("parameters") or {}
        recipe = ((inputs.get("config_yaml") or {}).get("runtimeValue") or {}).get("constant")
        if isinstance(recipe, str):
            names = ((inputs.get("stage_names") or {}).get("runtimeValue") or {}).get("constant")
            return recipe, list(names) if isinstance(names, list) else None
    return None, None


def default_version_name(pipeline_name: str, package: PipelinePackage) -> str:
    """Version name from the package content only: the same bytes always give the same name."""
    return f"{pipeline_name}-{package.sha256[:12]}"


_PARAM_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXPECTED = {
    "NUMBER_INTEGER": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "NUMBER_DOUBLE": ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    "BOOLEAN": ("true or false", lambda v: isinstance(v, bool)),
    "LIST": ("a YAML list like [a, b]", lambda v: isinstance(v, list)),
    "STRUCT": ("a YAML mapping like {a: 1}", lambda v: isinstance(v, dict)),
}


def parse_params(items: Sequence[str]) -> dict[str, str]:
    """``["epochs=3", "lr=0.1"]`` → ``{"epochs": "3", "lr": "0.1"}`` (raw text, checked syntax)."""
    raw: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _PARAM_KEY.match(key):
            raise SubmitError(
                f"bad --param {item!r}: expected key=value with a parameter name as key"
            )
        if key in raw:
            raise SubmitError(f"bad --param {item!r}: {key} is given twice")
        raw[key] = value
    return raw


def _yaml_value(key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise SubmitError(
            f"bad --param {key}={text}: not a YAML value ({yaml_problem(exc)})"
        ) from None


def resolve_params(raw: Mapping[str, str], package: PipelinePackage) -> dict[str, Any]:
    """Turn raw ``key=value`` texts into typed runtime parameters.

    Values are YAML scalars (``3`` → int, ``0.1`` → float, ``true`` → bool), checked against
    the package's root inputs and their declared types (a STRING input keeps the text as typed,
    an integer given to a NUMBER_DOUBLE input becomes a float); every required input is given.
    """
    params: dict[str, Any] = {}
    for key, text in raw.items():
        kind = package.types.get(key)
        if kind is None:
            known = ", ".join(sorted(package.types)) or "none"
            raise SubmitError(
                f"bad --param {key}={text}: the pipeline has no parameter {key!r} (it has: {known})"
            )
        value = text if kind == "STRING" else _yaml_value(key, text)
        expected = _EXPECTED.get(kind)
        if expected is not None and not expected[1](value):
            raise SubmitError(f"bad --param {key}={text}: {key} ({kind}) expects {expected[0]}")
        params[key] = float(value) if kind == "NUMBER_DOUBLE" else value
    missing = sorted(package.required - set(params))
    if missing:
        raise SubmitError(
            f"missing required pipeline parameter(s) {', '.join(missing)}: "
            "pass --param NAME=VALUE for each"
        )
    return params


def check_pipeline_root(root: str | None) -> str | None:
    """``None`` (the server's default root) or a URI such as ``gs://bucket/prefix``."""
    if root is None:
        return None
    if not re.match(r"^[a-z][a-z0-9+.-]*://\S+$", root):
        raise SubmitError(
            f"bad pipeline root {root!r}: expected a URI such as gs://BUCKET/kfp-root "
            "(--pipeline-root/PIPELINE_ROOT)"
        )
    return root.rstrip("/")


def cluster_defaults(
    package: PipelinePackage, params: Mapping[str, Any], pipeline_root: str | None
) -> dict[str, Any]:
    """The run's parameters with the defaults that only work on a laptop refused or derived.

    For a car-classifier package on a cluster: a compiled placeholder image (no registry has
    it), ``data_source=""`` when the recipe's ``data.root`` is not gs:// (the folder is not in
    the image), and ``checkpoint_root=""`` (checkpoints inside each pod: no resume, and the gate
    cannot read the export of another pod) are refused, except that ``checkpoint_root`` becomes
    ``<pipeline root>/checkpoints`` when the pipeline root is a gs:// URI.
    """
    if package.recipe is None:
        return dict(params)
    if PLACEHOLDER_IMAGE in package.images:
        raise SubmitError(
            f"{package.path} was compiled with the placeholder image {PLACEHOLDER_IMAGE}, which no "
            "registry has: push yours (make push-image IMAGE=REGISTRY/trainer:TAG) and compile "
            "with it (make compile IMAGE=...)"
        )
    merged = {**package.defaults, **params}
    out = dict(params)
    target = kfp_versions.target_version(package.spec)
    if merged.get("data_source") == "kaggle" and target is not None:
        if not kfp_versions.backend(target).optional_env_sources:
            raise SubmitError(
                f"data_source=kaggle needs the optional Kaggle secret, which a package for KFP "
                f"{target} leaves out (honoured from {kfp_versions.OPTIONAL_ENV_SOURCES_SINCE}): "
                "stage the photos under gs:// (carclassifier download-kaggle, gsutil cp) and pass "
                "--param data_source=gs://BUCKET/PREFIX"
            )
    if merged.get("data_source", "") == "":
        root = resolve_config(
            package.recipe, merged.get("overrides") or [], merged.get("backbone", "")
        ).data.root
        if not (root or "").startswith("gs://"):
            raise SubmitError(
                f"data_source is empty and the recipe's data.root {root!r} is not in the image: "
                "pass --param data_source=gs://BUCKET/PREFIX (or data_source=kaggle)"
            )
    if merged.get("checkpoint_root", "") == "":
        if not (pipeline_root or "").startswith("gs://"):
            raise SubmitError(
                "checkpoint_root is empty and no gs:// pipeline root is given to put it under: "
                "pass --param checkpoint_root=gs://BUCKET/carclassifier or "
                "--pipeline-root gs://BUCKET/kfp-root (checkpoints go to <root>/checkpoints)"
            )
        out["checkpoint_root"] = f"{pipeline_root}/checkpoints"
    return out


def run_parameters(
    package: PipelinePackage, items: Sequence[str], pipeline_root: str | None
) -> dict[str, Any]:
    """The typed, checked parameters of a cluster run from ``--param`` texts (no network).

    A car-classifier package's parameters are checked as its pods will use them
    (`carclassifier.kubeflow.arguments.check_arguments`: GPU settings, gs:// URIs, overrides applied
    to the compiled recipe), then `cluster_defaults` apply.
    """
    params = resolve_params(parse_params(items), package)
    if package.recipe is not None:
        try:
            check_arguments({**package.defaults, **params}, package.recipe, package.stage_names)
        except CarClassifierError as exc:
            raise SubmitError(f"bad pipeline parameter: {exc}") from None
    return cluster_defaults(package, params, pipeline_root)
