"""Static checks of the GPU trainer image recipe (``docker/``) and the Kubernetes manifests
(``manifests/``), with no Docker engine, no cluster and no network.

- The Dockerfile is parsed into instructions (a small parser: comments, line continuations,
  ``--flags``, stages, ``ARG`` defaults) and checked for the properties the image must have:
  pinned base, ``tensorflow[and-cuda]`` and never ``tensorflow-cpu``, the lock file as
  constraints, the package installed, a non-root user, no secrets, a command, OCI labels.
- ``manifests/`` is rendered by a *minimal* kustomize renderer (``resources:`` files and
  directories, ``namespace:``, ``labels:``; anything else is refused rather than ignored, so the
  result cannot silently differ from ``kustomize build``). Built-in kinds are validated by
  kubernetes-validate in strict mode; the KServe InferenceService, a CRD kubernetes-validate does
  not know, against ``manifests/schemas/kserve-inferenceservice-v1beta1.subset.schema.json``,
  transcribed from KServe's CRD. Negative tests prove both validators can fail.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
DOCKERFILE = DOCKER_DIR / "trainer.Dockerfile"
DOCKERIGNORE = DOCKER_DIR / "trainer.Dockerfile.dockerignore"
GPU_CONSTRAINTS = DOCKER_DIR / "gpu-constraints.txt"
MANIFESTS = ROOT / "manifests"
ISVC_SCHEMA = MANIFESTS / "schemas" / "kserve-inferenceservice-v1beta1.subset.schema.json"
SECRET_TEMPLATE = MANIFESTS / "secret-kaggle.template.yaml"
PROFILE = MANIFESTS / "optional" / "kubeflow-profile.yaml"
GKE_SCRIPTS = MANIFESTS / "gke"

TF_GPU_REQUIREMENT = "tensorflow[and-cuda]==2.21.0"
NAMESPACE = "carclassifier"
PIPELINE_SA = "carclassifier-pipeline"
SERVING_SA = "carclassifier-serving"
KAGGLE_SECRET = "kaggle-credentials"
KAGGLE_KEYS = frozenset({"KAGGLE_USERNAME", "KAGGLE_KEY"})
PLACEHOLDER = "REPLACE_ME"
GPU_RESOURCE = "nvidia.com/gpu"

K8S_VERSIONS = ("1.33", kubernetes_validate.latest_version())
"""Kubernetes versions the built-in kinds must be valid for: a GKE release still in support
and the newest schema kubernetes-validate ships."""


# ---------------------------------------------------------------------------------------------
# A small Dockerfile parser


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction after joining continuation lines and dropping comments."""

    keyword: str
    """Upper-case instruction name: FROM, RUN, COPY, ..."""
    flags: tuple[str, ...]
    """Leading ``--name=value`` options (``--from=deps``, ``--mount=...``)."""
    value: str
    """The rest of the instruction, continuation lines joined with a space."""
    line: int
    """1-based line number where the instruction starts."""
    stage: int
    """Index of the build stage (0 = first FROM); -1 for the global ARGs before any FROM."""

    def flag(self, name: str) -> str | None:
        """Value of ``--name=value`` if present."""
        prefix = f"--{name}="
        return next((f[len(prefix) :] for f in self.flags if f.startswith(prefix)), None)

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/RUN, else None."""
        if not self.value.startswith("["):
            return None
        parsed = json.loads(self.value)
        assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), self
        return parsed

    def pairs(self) -> dict[str, str]:
        """``KEY=value`` pairs of ENV / LABEL / ARG (shell-style quoting)."""
        result: dict[str, str] = {}
        for token in shlex.split(self.value):
            key, sep, val = token.partition("=")
            result[key] = val if sep else ""
        return result


@dataclass(frozen=True)
class Stage:
    """A build stage: its FROM image (ARGs resolved), optional name and instructions."""

    index: int
    image: str
    name: str | None
    instructions: tuple[Instruction, ...]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile. Comment lines (also inside continuations) and blank lines
    are dropped, ``\\`` continuations joined; heredocs are not supported (and not used)."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    stage = -1
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        logical = " ".join(p for p in parts if p)
        parts = []
        keyword, _, rest = logical.partition(" ")
        keyword = keyword.upper()
        assert "<<" not in rest or keyword != "RUN", f"line {start}: heredocs are not parsed"
        flags: list[str] = []
        rest = rest.strip()
        while rest.startswith("--"):
            token, _, rest = rest.partition(" ")
            flags.append(token)
            rest = rest.strip()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, tuple(flags), rest, start, stage))
    assert not parts, "the Dockerfile ends inside a line continuation"
    return instructions


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """Defaults of the ARGs declared before the first FROM."""
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.stage == -1 and ins.keyword == "ARG":
            args.update(ins.pairs())
    return args


def substitute(text: str, variables: dict[str, str]) -> str:
    """Replace ``${NAME}`` and ``$NAME`` by their values (unknown names stay)."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: variables.get(m.group(1) or m.group(2), m.group(0)),
        text,
    )


def stages(instructions: list[Instruction]) -> list[Stage]:
    """The build stages in order, FROM images with the global ARG defaults substituted."""
    args = global_args(instructions)
    result: list[Stage] = []
    for ins in instructions:
        if ins.keyword != "FROM":
            continue
        words = shlex.split(substitute(ins.value, args))
        name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
        assert len(words) in (1, 3), f"line {ins.line}: unexpected FROM {ins.value!r}"
        body = tuple(i for i in instructions if i.stage == ins.stage and i is not ins)
        result.append(Stage(ins.stage, words[0], name, body))
    return result


@cache
def dockerfile() -> list[Instruction]:
    """The parsed trainer Dockerfile (parsed once)."""
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def runs(instructions: tuple[Instruction, ...] | list[Instruction]) -> str:
    """All RUN commands of ``instructions`` joined (for substring checks)."""
    return "\n".join(i.value for i in instructions if i.keyword == "RUN")


def stage_named(name: str) -> Stage:
    """The build stage called ``name``."""
    found = [s for s in stages(dockerfile()) if s.name == name]
    assert len(found) == 1, f"expected one stage named {name!r}"
    return found[0]


def final_stage() -> Stage:
    """The stage a plain ``docker build`` produces: the last one."""
    return stages(dockerfile())[-1]


@cache
def gpu_requirements_module() -> ModuleType:
    """``docker/gpu_requirements.py`` imported by path (``docker/`` is no package, and
    importing it as ``docker.*`` would shadow the Docker SDK that kfp.local looks for)."""
    spec = importlib.util.spec_from_file_location(
        "carclassifier_docker_gpu_requirements", DOCKER_DIR / "gpu_requirements.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pyproject_dependencies() -> list[str]:
    """``[project].dependencies`` of pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return list(project["dependencies"])


def lock_lines() -> list[str]:
    """Lines of requirements/lock.txt."""
    return (ROOT / "requirements" / "lock.txt").read_text(encoding="utf-8").splitlines()


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_parser_handles_continuations_comments_flags_and_stages() -> None:
    text = (
        "# syntax=docker/dockerfile:1.7\n"
        "ARG BASE=python:3.11.16-slim@sha256:" + "a" * 64 + "\n"
        "FROM ${BASE} AS one\n"
        "RUN --mount=type=cache,target=/c echo a \\\n"
        "    # a comment inside a continuation\n"
        "    && echo b\n"
        "FROM one\n"
        'ENV A=1 \\\n    B="two words"\n'
        'CMD ["x", "--help"]\n'
    )
    parsed = parse_dockerfile(text)
    assert [i.keyword for i in parsed] == ["ARG", "FROM", "RUN", "FROM", "ENV", "CMD"]
    run = parsed[2]
    assert run.flag("mount") == "type=cache,target=/c" and run.value == "echo a && echo b"
    assert run.line == 4 and run.stage == 0
    assert parsed[4].pairs() == {"A": "1", "B": "two words"}
    assert parsed[5].exec_form() == ["x", "--help"]
    built = stages(parsed)
    assert [(s.image, s.name) for s in built] == [
        ("python:3.11.16-slim@sha256:" + "a" * 64, "one"),
        ("one", None),
    ]


def test_base_image_is_pinned_by_version_and_digest() -> None:
    names = {s.name for s in stages(dockerfile()) if s.name}
    external = [s.image for s in stages(dockerfile()) if s.image not in names]
    assert external, "no base image"
    for image in external:
        reference, _, digest = image.partition("@")
        repository, _, tag = reference.rpartition(":")
        assert repository and tag, f"{image}: no tag"
        assert tag != "latest" and re.match(r"^\d+\.\d+\.\d+(-[a-z0-9.-]+)?$", tag), (
            f"{image}: the tag must be a full version (X.Y.Z[-variant]), not {tag!r}"
        )
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{image}: no sha256 digest"
    # The label naming the base and the FROM must not drift apart.
    labels = final_stage_labels()
    base_label = labels["org.opencontainers.image.base.name"].rpartition("/")[2]
    assert {image.partition("@")[0] for image in external} == {base_label}


def test_stages_chain_deps_before_source() -> None:
    assert [s.name for s in stages(dockerfile())] == [
        "base",
        "requirements",
        "deps",
        "wheel",
        "runtime",
    ]
    # The dependency install never sees the source tree, so source edits keep it cached.
    for name in ("requirements", "deps"):
        copied = " ".join(i.value for i in stage_named(name).instructions if i.keyword == "COPY")
        assert "src" not in copied.split() and "README.md" not in copied, name
    deps_run = runs(stage_named("deps").instructions)
    assert "pip install" in deps_run and "-r /build/gpu/requirements-gpu.txt" in deps_run


def test_tensorflow_with_cuda_is_installed() -> None:
    args = stage_named("requirements").instructions
    declared = [i.pairs() for i in args if i.keyword == "ARG"]
    assert {"TENSORFLOW_REQUIREMENT": TF_GPU_REQUIREMENT} in declared
    run = runs(args)
    assert "gpu_requirements.py" in run and '--tensorflow "${TENSORFLOW_REQUIREMENT}"' in run
    # What the script makes of the real pyproject.toml: tensorflow-cpu swapped, nothing else.
    module = gpu_requirements_module()
    dependencies = pyproject_dependencies()
    requirements = module.gpu_requirements(dependencies, TF_GPU_REQUIREMENT)
    assert TF_GPU_REQUIREMENT in requirements and len(requirements) == len(dependencies)
    assert set(dependencies) - set(requirements) == {"tensorflow-cpu==2.21.0"}


def test_tensorflow_cpu_is_never_installed() -> None:
    module = gpu_requirements_module()
    requirements = module.gpu_requirements(pyproject_dependencies(), TF_GPU_REQUIREMENT)
    constraints = module.gpu_constraints(lock_lines())
    for line in requirements + constraints:
        assert module.requirement_name(line) != "tensorflow-cpu", line
    # The only instruction naming it is the guard that fails the build if it got installed.
    (guard,) = [i for i in dockerfile() if "tensorflow-cpu" in i.value]
    assert guard.keyword == "RUN" and guard.stage == stage_named("deps").index
    assert "if pip show --quiet tensorflow-cpu" in guard.value and "exit 1" in guard.value
    install = [i for i in final_stage().instructions if "carclassifier-*.whl" in i.value]
    assert len(install) == 1 and "--no-deps" in install[0].value


def test_script_refuses_a_tensorflow_version_other_than_the_cpu_pin(tmp_path: Path) -> None:
    module = gpu_requirements_module()
    with pytest.raises(module.RequirementsError, match="change both together"):
        module.gpu_requirements(pyproject_dependencies(), "tensorflow[and-cuda]==2.20.0")
    with pytest.raises(module.RequirementsError, match="must look like"):
        module.gpu_requirements(pyproject_dependencies(), "tensorflow==2.21.0")
    args = [
        "--pyproject",
        str(ROOT / "pyproject.toml"),
        "--lock",
        str(ROOT / "requirements/lock.txt"),
    ]
    assert module.main([*args, "--tensorflow", TF_GPU_REQUIREMENT, "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / module.REQUIREMENTS_FILE).read_text().splitlines()[0] == TF_GPU_REQUIREMENT
    bad = [*args, "--tensorflow", "tensorflow[and-cuda]==9.9.9", "--out-dir", str(tmp_path / "x")]
    assert module.main(bad) == 2


def test_lock_file_is_used_as_constraints() -> None:
    copies = " ".join(i.value for i in stage_named("requirements").instructions)
    assert "requirements/lock.txt" in copies
    deps_run = runs(stage_named("deps").instructions)
    assert "-c /build/gpu/constraints-gpu.txt" in deps_run
    assert "-c /build/gpu/gpu-constraints.txt" in deps_run
    assert "--build-constraint /build/gpu/gpu-constraints.txt" in deps_run
    assert "pip check" in deps_run
    # constraints-gpu.txt = every pin of the lock file except tensorflow-cpu.
    module = gpu_requirements_module()
    pins = [line for line in lock_lines() if "==" in line]
    kept = [line for line in module.gpu_constraints(lock_lines()) if "==" in line]
    assert len(kept) == len(pins) - 1 and set(pins) - set(kept) == {"tensorflow_cpu==2.21.0"}


def test_gpu_constraints_pin_exactly_what_the_lock_cannot() -> None:
    module = gpu_requirements_module()
    locked = {module.requirement_name(line) for line in lock_lines()} - {None}
    pinned: dict[str, str] = {}
    for line in GPU_CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        name = module.requirement_name(line)
        if name is None:
            continue
        version = module.pinned_version(line)
        assert version, f"{line!r}: pin an exact version (==)"
        pinned[name] = version
    assert not locked & set(pinned), "a package pinned twice can only disagree"
    assert {n for n in pinned if n.startswith("nvidia-")} >= {
        "nvidia-cublas-cu12",
        "nvidia-cudnn-cu12",
        "nvidia-cuda-runtime-cu12",
        "nvidia-nccl-cu12",
    }
    assert {"setuptools", "wheel", "pip"} <= set(pinned)
    assert f'"pip=={pinned["pip"]}"' in runs(stage_named("deps").instructions)


def test_package_is_installed_from_a_wheel_of_the_source() -> None:
    wheel = stage_named("wheel")
    copied = " ".join(i.value for i in wheel.instructions if i.keyword == "COPY")
    assert "src" in copied.split() or "src ./src" in copied
    assert "pyproject.toml" in copied and "README.md" in copied  # readme = "README.md"
    assert "pip wheel" in runs(wheel.instructions) and "--no-deps" in runs(wheel.instructions)
    runtime = final_stage()
    assert runtime.name == "runtime"
    venv = [i for i in runtime.instructions if i.keyword == "COPY" and i.flag("from") == "deps"]
    assert venv and venv[0].value.split() == ["/opt/venv", "/opt/venv"]
    mounted = [
        i for i in runtime.instructions if i.flag("mount") and "from=wheel" in i.flag("mount")
    ]
    assert len(mounted) == 1
    assert (
        "pip install --no-cache-dir --no-deps /tmp/wheels/carclassifier-*.whl" in mounted[0].value
    )
    assert "carclassifier --help" in mounted[0].value  # smoke check of the installed CLI


def test_runs_as_a_non_root_user() -> None:
    runtime = final_stage().instructions
    users = [i for i in runtime if i.keyword == "USER"]
    assert users, "no USER in the final stage"
    user = users[-1].value.split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), (
        "USER must be a numeric non-root uid (Kubernetes can only verify runAsNonRoot then)"
    )
    created = runs(runtime)
    assert f"useradd --uid {user}" in created
    last_user = runtime.index(users[-1])
    assert not [i for i in runtime[last_user:] if i.keyword == "RUN"], "RUN after USER"
    assert any(i.keyword == "WORKDIR" for i in runtime)
    # Above the node's own users, and the very ids the pipeline's security context sets.
    from pipelines.car_classifier import RUN_AS_USER, ClusterOptions

    uid, _, gid = users[-1].value.partition(":")
    assert int(uid) >= 10000 and int(uid) == RUN_AS_USER == ClusterOptions().run_as_user
    assert gid and int(gid) == ClusterOptions().run_as_group
    # HOME is the home useradd creates (owned by the user, so writable).
    env: dict[str, str] = {}
    for ins in runtime:
        if ins.keyword == "ENV":
            env.update(ins.pairs())
    assert f"--create-home --home-dir {env['HOME']}" in " ".join(created.split())
    workdir = [i.value for i in runtime if i.keyword == "WORKDIR"][-1]
    assert f"install -d -o {uid} -g {gid}" in created and workdir in created


def test_no_secrets_in_the_image() -> None:
    secretish = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|KAGGLE", re.IGNORECASE)
    for ins in dockerfile():
        if ins.keyword in ("ENV", "ARG"):
            for name in ins.pairs():
                assert not secretish.search(name), f"line {ins.line}: {ins.keyword} {name}"
        if ins.keyword in ("COPY", "ADD"):
            sources = shlex.split(ins.value)[:-1]
            for source in sources:
                assert not re.search(r"kaggle|\.env$|\.pem$|key\.json|credential", source), source
        assert ins.keyword != "ADD", "ADD can fetch URLs and unpack archives: use COPY"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "PRIVATE KEY" not in text and "--secret" not in text


def test_has_a_command_and_no_entrypoint() -> None:
    runtime = final_stage().instructions
    commands = [i for i in runtime if i.keyword == "CMD"]
    assert commands and commands[-1].exec_form() == ["carclassifier", "--help"]
    # kfp sets the container command; an ENTRYPOINT would be prepended to it by Docker (not by
    # Kubernetes, which replaces it), so the image would behave differently in the two.
    assert not [i for i in dockerfile() if i.keyword == "ENTRYPOINT"]


def final_stage_labels() -> dict[str, str]:
    """LABEL pairs of the final stage, with that stage's ARG defaults substituted."""
    runtime = final_stage().instructions
    args: dict[str, str] = {}
    labels: dict[str, str] = {}
    for ins in runtime:
        if ins.keyword == "ARG":
            args.update(ins.pairs())
        if ins.keyword == "LABEL":
            labels.update({k: substitute(v, args) for k, v in ins.pairs().items()})
    return labels


def test_oci_labels() -> None:
    labels = final_stage_labels()
    for key in ("title", "description", "version", "revision", "created", "source", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    # The metadata ARGs come after every RUN, so a new commit does not rebuild any layer.
    runtime = final_stage().instructions
    first_arg = min(runtime.index(i) for i in runtime if i.keyword == "ARG")
    assert not [i for i in runtime[first_arg:] if i.keyword == "RUN"]


def test_layers_stay_small() -> None:
    for ins in dockerfile():
        if ins.keyword != "RUN":
            continue
        for command in re.split(r"&&|;", ins.value):
            if re.search(r"\bpip (install|wheel)\b", command):
                assert "--no-cache-dir" in command, f"line {ins.line}: {command.strip()}"
            if "apt-get install" in command:
                assert "--no-install-recommends" in command, f"line {ins.line}"
        if "apt-get" in ins.value:
            assert "rm -rf /var/lib/apt/lists/*" in ins.value, f"line {ins.line}: apt lists kept"
    # Nothing but the venv is copied from the build stages into the final image.
    runtime = final_stage().instructions
    from_stages = [i for i in runtime if i.keyword == "COPY" and i.flag("from")]
    assert [i.flag("from") for i in from_stages] == ["deps"]


# A minimal .dockerignore matcher (moby/patternmatcher semantics for what is used here).


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """Regex for one .dockerignore pattern: ``**`` any depth, ``*``/``?`` within a path segment,
    ``[...]`` classes; a pattern that matches a directory also matches everything below it."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(f"^{out}(?:/.*)?$")


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (relative to the context) is left out of the build context."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        if _ignore_regex(os.path.normpath(body).lstrip("/")).match(path):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    """Non-comment lines of the trainer's .dockerignore."""
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_what_is_copied_and_nothing_else() -> None:
    patterns = dockerignore_patterns()
    sources: list[str] = []
    for ins in dockerfile():
        if ins.keyword == "COPY" and not ins.flag("from"):
            sources += shlex.split(ins.value)[:-1]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert not ignored(rel, patterns), f"{rel} is copied but ignored"
    for junk in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/local/summary.json",
        "tests/test_cli.py",
        "data/sf-dl-car-classification/train.csv",
        "kaggle.json",
        ".env",
        "key.json",
        "src/carclassifier/__pycache__/cli.cpython-311.pyc",
        "src/carclassifier.egg-info/PKG-INFO",
        "__pycache__/x.pyc",
        # credentials in any form never reach the builder
        "kaggle.env",
        "server.pem",
        "tls/private.key",
        "credentials.json",
        "gcs-credentials/key.json",
        ".kaggle/kaggle.json",
        ".config/gcloud/application_default_credentials.json",
        "secrets/token",
    ):
        assert ignored(junk, patterns), f"{junk} would be sent to the builder"


# ---------------------------------------------------------------------------------------------
# A minimal kustomize renderer

SUPPORTED_KUSTOMIZATION_KEYS = frozenset({"apiVersion", "kind", "namespace", "labels", "resources"})
CLUSTER_SCOPED_KINDS = frozenset(
    {
        "Namespace",
        "PriorityClass",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "StorageClass",
        "PersistentVolume",
        "RuntimeClass",
        "IngressClass",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "Profile",  # kubeflow.org/v1
    }
)


class KustomizeRenderError(Exception):
    """The kustomization uses something the minimal renderer does not implement, or is wrong."""


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Non-empty YAML documents of a file."""
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise KustomizeRenderError(f"{path}: a document without apiVersion/kind")
    return docs


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """``kustomize build directory`` for the features this repository uses, and only those.

    Supported: ``resources`` (files and directories with their own kustomization.yaml),
    ``namespace`` (set on every namespaced object; a Namespace object must already carry that
    name) and ``labels`` with ``pairs`` (added to ``metadata.labels``, never to selectors).
    Any other key (patches, generators, images, commonLabels, ...) raises, so this renderer can
    never silently produce something other than kustomize would.
    """
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unsupported = set(kustomization) - SUPPORTED_KUSTOMIZATION_KEYS
    if unsupported:
        raise KustomizeRenderError(
            f"{directory}: unsupported kustomization keys {sorted(unsupported)}"
        )
    if (kustomization.get("apiVersion"), kustomization.get("kind")) != (
        "kustomize.config.k8s.io/v1beta1",
        "Kustomization",
    ):
        raise KustomizeRenderError(
            f"{directory}: not a kustomize.config.k8s.io/v1beta1 Kustomization"
        )
    docs: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            docs += render_kustomization(path)
        elif path.is_file():
            docs += load_yaml_documents(path)
        else:
            raise KustomizeRenderError(
                f"{directory}: resource {entry!r} not found (no remote refs)"
            )
    namespace = kustomization.get("namespace")
    labels: dict[str, str] = {}
    for entry in kustomization.get("labels", []):
        if set(entry) - {"pairs", "includeSelectors"} or entry.get("includeSelectors"):
            raise KustomizeRenderError(f"{directory}: only labels.pairs without selectors")
        labels.update(entry["pairs"])
    seen: set[tuple[str, str | None, str]] = set()
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if namespace and doc["kind"] == "Namespace" and meta["name"] != namespace:
            raise KustomizeRenderError(f"Namespace {meta['name']} vs namespace: {namespace}")
        if namespace and doc["kind"] not in CLUSTER_SCOPED_KINDS:
            meta["namespace"] = namespace
        if labels:
            meta["labels"] = {**meta.get("labels", {}), **labels}
        key = (doc["kind"], meta.get("namespace"), meta["name"])
        if key in seen:
            raise KustomizeRenderError(f"{key} defined twice")
        seen.add(key)
    return docs


@cache
def _rendered() -> str:
    return json.dumps(render_kustomization(MANIFESTS))


def rendered() -> list[dict[str, Any]]:
    """The rendered manifests (a fresh copy per call, rendered once)."""
    return json.loads(_rendered())


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Documents of one kind."""
    return [d for d in docs if d["kind"] == kind]


def is_builtin(doc: dict[str, Any]) -> bool:
    """Whether the object's API group is Kubernetes' own (core, *.k8s.io, apps, batch, ...)."""
    group = doc["apiVersion"].rpartition("/")[0]
    return group in ("", "apps", "batch", "policy", "autoscaling") or group.endswith(".k8s.io")


@cache
def isvc_validator() -> jsonschema.Draft202012Validator:
    """Validator of the KServe InferenceService subset schema."""
    schema = json.loads(ISVC_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


CRD_VALIDATORS = {("serving.kserve.io/v1beta1", "InferenceService"): isvc_validator}
"""Schema for every custom resource kind in the rendered tree (kubernetes-validate has none)."""


def kserve_webhook_errors(isvc: dict[str, Any]) -> list[str]:
    """Rules of KServe's validating webhook that a JSON Schema cannot express."""
    predictor = isvc["spec"]["predictor"]
    low, high = predictor.get("minReplicas", 1), predictor.get("maxReplicas", 0)
    if high != 0 and low > high:
        return ["'MinReplicas' cannot be greater than MaxReplicas"]
    return []


def test_renderer_applies_namespace_and_labels_and_refuses_the_rest(tmp_path: Path) -> None:
    (tmp_path / "sa.yaml").write_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a}\n")
    (tmp_path / "pc.yaml").write_text(
        "apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: p}\nvalue: 1\n"
    )
    base = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: ns\n"
    body = "labels: [{pairs: {x: y}}]\nresources: [sa.yaml, pc.yaml]\n"
    (tmp_path / "kustomization.yaml").write_text(base + body)
    sa, pc = render_kustomization(tmp_path)
    assert sa["metadata"] == {"name": "a", "namespace": "ns", "labels": {"x": "y"}}
    assert "namespace" not in pc["metadata"]  # cluster-scoped
    for extra in ("patches: []\n", "commonLabels: {a: b}\n", "images: []\n"):
        (tmp_path / "kustomization.yaml").write_text(base + body + extra)
        with pytest.raises(KustomizeRenderError, match="unsupported"):
            render_kustomization(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(base + "resources: [missing.yaml]\n")
    with pytest.raises(KustomizeRenderError, match="not found"):
        render_kustomization(tmp_path)


# ---------------------------------------------------------------------------------------------
# Manifests


def test_kustomization_renders_the_expected_objects() -> None:
    docs = rendered()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [
        ("Deployment", "carclassifier-web"),  # the web app (carclassifier serve)
        ("InferenceService", "carclassifier"),
        ("Namespace", NAMESPACE),
        ("PriorityClass", "carclassifier-serving"),
        ("ResourceQuota", "carclassifier-gpu"),
        ("Role", "carclassifier-pipeline-runner"),
        ("RoleBinding", "carclassifier-pipeline-runner"),
        ("Service", "carclassifier-web"),
        ("ServiceAccount", PIPELINE_SA),
        ("ServiceAccount", SERVING_SA),
    ]
    for doc in docs:
        meta = doc["metadata"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "carclassifier"
        if doc["kind"] in CLUSTER_SCOPED_KINDS:
            assert "namespace" not in meta
        else:
            assert meta["namespace"] == NAMESPACE, doc["kind"]
    # A file that names a namespace itself must name the same one kustomize sets.
    for path in MANIFESTS.glob("*.yaml"):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_documents(path):
            assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE, path.name


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_are_valid_kubernetes(version: str) -> None:
    builtin = [d for d in rendered() if is_builtin(d)]
    assert len(builtin) == 9
    for doc in builtin + load_yaml_documents(SECRET_TEMPLATE):
        kubernetes_validate.validate(doc, desired_version=version, strict=True)


def test_every_custom_resource_has_a_schema() -> None:
    custom = [d for d in rendered() if not is_builtin(d)]
    assert custom, "the InferenceService should be rendered"
    for doc in custom:
        key = (doc["apiVersion"], doc["kind"])
        assert key in CRD_VALIDATORS, f"no schema to validate {key}: add one"
        # kubernetes-validate has no schema for it, hence ours.
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(doc, desired_version=K8S_VERSIONS[0], strict=True)


def test_kubernetes_validation_rejects_mistakes() -> None:
    quota = copy.deepcopy(by_kind(rendered(), "ResourceQuota")[0])
    quota["spec"]["hardd"] = quota["spec"].pop("hard")  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(quota, desired_version=K8S_VERSIONS[0], strict=True)
    priority = copy.deepcopy(by_kind(rendered(), "PriorityClass")[0])
    priority["value"] = "high"  # wrong type
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(priority, desired_version=K8S_VERSIONS[0], strict=True)


def isvc() -> dict[str, Any]:
    """The rendered InferenceService."""
    (found,) = by_kind(rendered(), "InferenceService")
    return found


def test_inferenceservice_matches_kserve_schema() -> None:
    doc = isvc()
    errors = [e.message for e in isvc_validator().iter_errors(doc)]
    assert not errors, errors
    assert not kserve_webhook_errors(doc)
    model = doc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "tensorflow"
    assert model["storageUri"].startswith("gs://") and PLACEHOLDER in model["storageUri"]
    assert not model["storageUri"].rstrip("/").endswith("saved_model"), (
        "TF Serving wants a folder of numbered versions, not the SavedModel folder"
    )
    assert GPU_RESOURCE not in model["resources"]["limits"]  # served on CPU nodes
    # Knative (Serverless mode) refuses pod fields like priorityClassName by default.
    if "priorityClassName" in doc["spec"]["predictor"]:
        mode = doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
        assert mode == "RawDeployment"


def _mutated(path: tuple[str, ...], change: Any) -> dict[str, Any]:
    """A copy of the InferenceService with ``change(parent, last_key)`` applied at ``path``."""
    doc = copy.deepcopy(isvc())
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    change(parent, path[-1])
    return doc


def _rename(new: str) -> Any:
    return lambda parent, key: parent.__setitem__(new, parent.pop(key))


def _set(value: Any) -> Any:
    return lambda parent, key: parent.__setitem__(key, value)


MODEL = ("spec", "predictor", "model")
PREDICTOR = ("spec", "predictor")
BROKEN_ISVCS: dict[str, tuple[tuple[str, ...], Any]] = {
    "storageURI typo": ((*MODEL, "storageUri"), _rename("storageURI")),
    "minReplica typo": ((*PREDICTOR, "minReplicas"), _rename("minReplica")),
    "predicter typo": (PREDICTOR, _rename("predicter")),
    "minReplicas as string": ((*PREDICTOR, "minReplicas"), _set("1")),
    "negative maxReplicas": ((*PREDICTOR, "maxReplicas"), _set(-1)),
    "modelFormat without name": ((*MODEL, "modelFormat"), _set({"version": "2"})),
    "cpu not a quantity": ((*MODEL, "resources", "requests", "cpu"), _set("two")),
    "unknown scaleMetric": ((*PREDICTOR, "scaleMetric"), _set("gpu")),
    "name not DNS-1035": (("metadata", "name"), _set("Car_Classifier")),
    "runtimeVersion as number": ((*MODEL, "runtimeVersion"), _set(2.2)),
}
"""Misspelt fields and wrong types: (path to the changed key, change)."""


@pytest.mark.parametrize("case", sorted(BROKEN_ISVCS))
def test_inferenceservice_schema_rejects_mistakes(case: str) -> None:
    broken = _mutated(*BROKEN_ISVCS[case])
    assert list(isvc_validator().iter_errors(broken)), f"{case} was accepted"


def test_webhook_rule_min_replicas_at_most_max() -> None:
    broken = _mutated(("spec", "predictor", "minReplicas"), _set(5))
    assert not list(isvc_validator().iter_errors(broken))  # the schema cannot see it...
    assert kserve_webhook_errors(broken)  # ...the webhook rule does


def test_names_are_consistent_across_files() -> None:
    docs = rendered()
    (namespace,) = by_kind(docs, "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    accounts = {d["metadata"]["name"]: d for d in by_kind(docs, "ServiceAccount")}
    assert set(accounts) == {PIPELINE_SA, SERVING_SA}
    predictor = isvc()["spec"]["predictor"]
    assert predictor["serviceAccountName"] == SERVING_SA
    priority = {d["metadata"]["name"] for d in by_kind(docs, "PriorityClass")}
    assert predictor["priorityClassName"] in priority
    roles = {d["metadata"]["name"] for d in by_kind(docs, "Role")}
    for binding in by_kind(docs, "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] in roles
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts
            assert subject.get("namespace", NAMESPACE) == NAMESPACE  # none: the binding's
    assert {s["name"] for b in by_kind(docs, "RoleBinding") for s in b["subjects"]} == {PIPELINE_SA}
    # Workload Identity: each KSA maps to the GSA of the same name (workload-identity.sh).
    for name, account in accounts.items():
        gsa = account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        assert gsa == f"{name}@{PLACEHOLDER}.iam.gserviceaccount.com"
    (quota,) = by_kind(docs, "ResourceQuota")
    assert int(quota["spec"]["hard"][f"requests.{GPU_RESOURCE}"]) >= 1
    secret = load_yaml_documents(SECRET_TEMPLATE)[0]
    assert secret["metadata"]["namespace"] == NAMESPACE
    (profile,) = load_yaml_documents(PROFILE)
    assert (profile["apiVersion"], profile["kind"]) == ("kubeflow.org/v1", "Profile")
    assert profile["metadata"]["name"] == NAMESPACE  # the profile creates this namespace
    assert PLACEHOLDER in profile["spec"]["owner"]["name"]


def test_kaggle_secret_is_a_template_with_placeholders_only() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = set(kustomization["resources"])
    assert SECRET_TEMPLATE.name not in listed, "applying the template would clobber the secret"
    assert not by_kind(rendered(), "Secret")
    (secret,) = load_yaml_documents(SECRET_TEMPLATE)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == KAGGLE_SECRET
    assert "data" not in secret, "base64 data looks like a real value: use stringData placeholders"
    assert set(secret["stringData"]) == KAGGLE_KEYS
    assert all(value == PLACEHOLDER for value in secret["stringData"].values())
    text = SECRET_TEMPLATE.read_text(encoding="utf-8")
    assert "kubectl -n carclassifier create secret generic kaggle-credentials" in text


def _all_manifest_text() -> Iterator[tuple[Path, str]]:
    for path in sorted(MANIFESTS.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".sh", ".json", ".md"):
            yield path, path.read_text(encoding="utf-8")


def test_no_real_looking_secrets_anywhere() -> None:
    kaggle_key = re.compile(r"\b[0-9a-f]{32}\b")  # the shape of a Kaggle API key
    for path, text in [*_all_manifest_text(), (DOCKERFILE, DOCKERFILE.read_text())]:
        assert not kaggle_key.search(text), path
        assert "PRIVATE KEY" not in text and '"private_key"' not in text, path


def _run_script(name: str, **env: str) -> str:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    result = subprocess.run(
        [bash, str(GKE_SCRIPTS / name)],
        env={"PATH": os.environ.get("PATH", ""), "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_gpu_node_pool_script() -> None:
    out = _run_script("gpu-node-pool.sh", PROJECT_ID="p", CLUSTER="c", LOCATION="europe-west4")
    (command,) = [line for line in out.splitlines() if line.startswith("+ gcloud")]
    assert "container node-pools create gpu-t4" in command
    # GKE labels the nodes cloud.google.com/gke-accelerator=<type> and taints them nvidia.com/gpu.
    assert "--accelerator type=nvidia-tesla-t4,count=1,gpu-driver-version=latest" in command
    for flag in (
        "--spot",
        "--enable-autoscaling --min-nodes 0",
        "--workload-metadata GKE_METADATA",
    ):
        assert flag in command
    on_demand = _run_script("gpu-node-pool.sh", PROJECT_ID="p", CLUSTER="c", LOCATION="z", SPOT="0")
    assert "--spot" not in on_demand


def test_workload_identity_script_matches_the_service_accounts() -> None:
    out = _run_script("workload-identity.sh", PROJECT_ID=PLACEHOLDER, BUCKET="b")
    accounts = {d["metadata"]["name"]: d for d in by_kind(rendered(), "ServiceAccount")}
    for name, account in accounts.items():
        gsa = account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        assert f"annotation for {NAMESPACE}/{name}: iam.gke.io/gcp-service-account: {gsa}" in out
        assert f"[{NAMESPACE}/{name}]" in out  # the workloadIdentityUser member
    writer = re.search(rf"--member serviceAccount:{PIPELINE_SA}@\S+ --role (\S+)", out)
    reader = re.search(rf"--member serviceAccount:{SERVING_SA}@\S+ --role (\S+)", out)
    assert writer and writer.group(1) == "roles/storage.objectAdmin"
    assert reader and reader.group(1) == "roles/storage.objectViewer"


def test_scripts_parse_and_require_their_settings() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    for script in sorted(GKE_SCRIPTS.glob("*.sh")):
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
        subprocess.run([bash, "-n", str(script)], check=True, timeout=30)
        missing = subprocess.run(
            [bash, str(script)],
            env={"PATH": os.environ.get("PATH", ""), "DRY_RUN": "1"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert missing.returncode != 0 and "set PROJECT_ID" in missing.stderr, script.name


if __name__ == "__main__":  # pragma: no cover - `python tests/test_docker_manifests.py`
    sys.exit(pytest.main([__file__, "-q"]))


# ---------------------------------------------------------------------------------------------
# Pod security: the namespace's Pod Security Admission labels and the pods' security contexts

POD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "Job", "Pod"})


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], list[dict]]]:
    """(name, pod-level spec, containers) of every object that makes pods: built-in workloads
    and the KServe predictor (a PodSpec inlined next to its model container)."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in POD_KINDS:
            spec = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
            yield name, spec, [*spec.get("initContainers", []), *spec["containers"]]
        elif doc["kind"] == "InferenceService":
            predictor = doc["spec"]["predictor"]
            yield name, predictor, [predictor["model"]]


def restricted_violations(spec: dict[str, Any], containers: list[dict]) -> list[str]:
    """Where a pod breaks the Pod Security Standard "restricted" (the checks of
    k8s.io/pod-security-admission that a manifest can show), plus this project's own rules:
    read-only root filesystem and CPU/memory limits on every container."""
    problems = []
    pod = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(key)
    for volume in spec.get("volumes", []):
        if "hostPath" in volume:
            problems.append(f"hostPath volume {volume['name']}")
    for container in containers:
        ctx = container.get("securityContext", {})
        where = container.get("name", "model")
        if ctx.get("privileged"):
            problems.append(f"{where}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        capabilities = ctx.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{where}: capabilities not dropped (drop: [ALL])")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: capabilities added")
        if not ctx.get("runAsNonRoot", pod.get("runAsNonRoot")):
            problems.append(f"{where}: runAsNonRoot not set")
        if ctx.get("runAsUser", pod.get("runAsUser")) == 0:
            problems.append(f"{where}: runAsUser 0")
        seccomp = ctx.get("seccompProfile", pod.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: no RuntimeDefault seccomp profile")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem writable")
        limits = container.get("resources", {}).get("limits", {})
        if not {"cpu", "memory"} <= set(limits):
            problems.append(f"{where}: no cpu and memory limits")
    return problems


def test_namespace_enforces_baseline_and_warns_on_restricted() -> None:
    (namespace,) = by_kind(rendered(), "Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert labels["pod-security.kubernetes.io/audit"] == "restricted"
    for mode in ("enforce", "warn", "audit"):
        assert re.fullmatch(r"v1\.\d+", labels[f"pod-security.kubernetes.io/{mode}-version"])


def test_every_pod_of_the_manifests_meets_restricted_and_runs_read_only() -> None:
    found = list(pod_specs(rendered()))
    assert any(name.startswith("InferenceService/") for name, _, _ in found)
    for name, spec, containers in found:
        assert not restricted_violations(spec, containers), (
            name,
            restricted_violations(spec, containers),
        )
        # A read-only root filesystem needs somewhere to write: /tmp is an emptyDir.
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in containers:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], name


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_predictor_pod_fields_are_valid_kubernetes(version: str) -> None:
    """The predictor's pod and container fields, put in a Pod, pass kubernetes-validate: the
    security context and volume field names and types are Kubernetes' own."""
    predictor = isvc()["spec"]["predictor"]
    model = predictor["model"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "predictor"},
        "spec": {
            "securityContext": predictor["securityContext"],
            "volumes": predictor["volumes"],
            "containers": [
                {
                    "name": "kserve-container",
                    "image": "tensorflow/serving:" + model["runtimeVersion"],
                    "securityContext": model["securityContext"],
                    "volumeMounts": model["volumeMounts"],
                    "resources": model["resources"],
                }
            ],
        },
    }
    kubernetes_validate.validate(pod, desired_version=version, strict=True)


RESTRICTED_BREAKS: dict[str, tuple[tuple[str, ...], Any]] = {
    "root user": ((*PREDICTOR, "securityContext", "runAsUser"), _set(0)),
    "runAsNonRoot off": ((*PREDICTOR, "securityContext", "runAsNonRoot"), _set(False)),
    "no seccomp": ((*PREDICTOR, "securityContext", "seccompProfile"), _set({"type": "Unconfined"})),
    "escalation": ((*MODEL, "securityContext", "allowPrivilegeEscalation"), _set(True)),
    "capabilities kept": ((*MODEL, "securityContext", "capabilities"), _set({"drop": []})),
    "capability added": (
        (*MODEL, "securityContext", "capabilities"),
        _set({"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
    ),
    "writable root": ((*MODEL, "securityContext", "readOnlyRootFilesystem"), _set(False)),
    "privileged": ((*MODEL, "securityContext", "privileged"), _set(True)),
    "no limits": ((*MODEL, "resources", "limits"), _set({})),
    "hostPath": ((*PREDICTOR, "volumes"), _set([{"name": "h", "hostPath": {"path": "/"}}])),
}


@pytest.mark.parametrize("case", sorted(RESTRICTED_BREAKS))
def test_the_restricted_check_catches_each_break(case: str) -> None:
    broken = _mutated(*RESTRICTED_BREAKS[case])
    ((_, spec, containers),) = list(pod_specs([broken]))
    assert restricted_violations(spec, containers), f"{case} was accepted"
