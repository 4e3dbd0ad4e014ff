"""Checks of the image recipes (``docker/``) and the Kubernetes manifests (``manifests/``) that
need no container engine and no cluster.

- The Dockerfiles themselves are checked by building and running them: ``tests/test_images.py``
  (``make image-test``: user, command, labels, locked versions, read-only runs, the pipeline in
  the trainer image). What stays here: the GPU requirement script the trainer build runs, the
  pins, the pinned base-image reference (a build here uses a stand-in base) and the build
  context filter.
- ``manifests/`` is rendered by the real kustomize, ``kubectl kustomize`` (kustomize v5 is built
  into kubectl). Built-in kinds are validated by kubernetes-validate in strict mode; the KServe
  InferenceService, a CRD kubernetes-validate does not know, against
  ``manifests/schemas/kserve-inferenceservice-v1beta1.subset.schema.json``, transcribed from
  KServe's CRD. Negative tests prove both validators can fail.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
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
SERVE_DOCKERFILE = DOCKER_DIR / "serve.Dockerfile"
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


@cache
def gpu_requirements_module() -> ModuleType:
    """``docker/gpu_requirements.py`` imported by path (``docker/`` holds Dockerfiles and is no
    Python package)."""
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
# What the trainer build derives its requirements from (docker/gpu_requirements.py)


def test_gpu_requirements_swap_tensorflow_cpu_for_the_gpu_wheel() -> None:
    assert f'ARG TENSORFLOW_REQUIREMENT="{TF_GPU_REQUIREMENT}"' in DOCKERFILE.read_text()
    module = gpu_requirements_module()
    dependencies = pyproject_dependencies()
    requirements = module.gpu_requirements(dependencies, TF_GPU_REQUIREMENT)
    assert TF_GPU_REQUIREMENT in requirements and len(requirements) == len(dependencies)
    assert set(dependencies) - set(requirements) == {"tensorflow-cpu==2.21.0"}
    constraints = module.gpu_constraints(lock_lines())
    for line in requirements + constraints:
        assert module.requirement_name(line) != "tensorflow-cpu", line


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


def test_gpu_constraints_are_the_lock_without_tensorflow_cpu() -> None:
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
    for dockerfile in (DOCKERFILE, SERVE_DOCKERFILE):  # the venv's pip is the pinned one
        assert f'"pip=={pinned["pip"]}"' in dockerfile.read_text(encoding="utf-8"), dockerfile


def test_real_base_image_is_pinned_by_version_and_digest() -> None:
    """The default ``PYTHON_IMAGE`` (the base of real builds; a build here overrides it with the
    stand-in) is pinned by a full version tag and a digest, the same in both Dockerfiles, and
    the ``base.name`` label names it."""
    bases = set()
    for dockerfile in (DOCKERFILE, SERVE_DOCKERFILE):
        text = dockerfile.read_text(encoding="utf-8")
        (image,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.MULTILINE)
        match = re.fullmatch(r"(python:\d+\.\d+\.\d+-slim-bookworm)@sha256:[0-9a-f]{64}", image)
        assert match, f"{dockerfile.name}: {image} is not pinned by version and digest"
        assert f'base.name="docker.io/library/{match.group(1)}"' in text, dockerfile.name
        assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS base$", text, flags=re.MULTILINE)
        bases.add(image)
    assert len(bases) == 1


DOCKER_IMPORT_CHECK = """
import docker, kfp.local
from kfp.local import task_dispatcher
assert task_dispatcher._DOCKER_AVAILABLE, "kfp.local found no docker SDK"
kfp.local.DockerRunner()
print(docker.__file__)
"""
ONLY_THE_FOLDER = """
import importlib.machinery, sys
class RootOnly:  # resolve `docker` as if the SDK were not installed: only the repo root
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "docker":
            return importlib.machinery.PathFinder.find_spec(name, [sys.argv[1]])
sys.meta_path.insert(0, RootOnly)
import docker
print(type(docker.__spec__.loader).__name__, list(docker.__path__))
from kfp.local import task_dispatcher
"""


def test_import_docker_from_the_repository_root_is_the_docker_sdk() -> None:
    """``docker/`` has no ``__init__.py``, so from the repository root (first on sys.path under
    pytest, ``pythonpath = ["."]``, and for ``python -m pipelines``) it is only a namespace
    package portion; the import system takes a regular package found on *any* later sys.path
    entry before namespace portions (PEP 420; importlib ``PathFinder``). The docker SDK, a
    pinned dependency, therefore wins, and kfp.local's DockerRunner works. Without the SDK the
    folder is what ``import docker`` gives, and kfp.local's task dispatcher then fails for every
    runner: it guards ``from kfp.local import docker_task_handler`` with ``except ImportError``
    only, and that module evaluates ``docker.DockerClient`` at import, an AttributeError
    (kubeflow/pipelines sdk/python/kfp/local/task_dispatcher.py and docker_task_handler.py,
    ``DockerTaskHandler.get_volumes_to_mount``, tag 2.17.0)."""
    assert not (DOCKER_DIR / "__init__.py").exists()
    assert any(re.fullmatch(r"docker==[\d.]+", dep) for dep in pyproject_dependencies())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    sdk = subprocess.run(
        [sys.executable, "-c", DOCKER_IMPORT_CHECK],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert sdk.returncode == 0, sdk.stderr
    assert Path(sdk.stdout.strip()).parent.name == "docker"
    assert "site-packages" in sdk.stdout
    folder = subprocess.run(
        [sys.executable, "-c", ONLY_THE_FOLDER, str(ROOT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert folder.stdout.startswith("NamespaceLoader") and str(DOCKER_DIR) in folder.stdout
    assert "AttributeError: module 'docker' has no attribute 'DockerClient'" in folder.stderr


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


def test_dockerignore_keeps_the_sources_and_nothing_else() -> None:
    """The trainer's build context is an allowlist (that it holds everything the Dockerfile
    copies, the real build in tests/test_images.py shows); here: what must never reach it."""
    patterns = dockerignore_patterns()
    for kept in (
        "pyproject.toml",
        "README.md",
        "requirements/lock.txt",
        "src/carclassifier/cli.py",
    ):
        assert (ROOT / kept).is_file() and not ignored(kept, patterns), kept
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
# The manifests as kustomize renders them

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


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Non-empty YAML documents of a file."""
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc, path
    return docs


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIRECTORY``: the objects ``kubectl apply -k`` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: install kubectl (1.27 or later, kustomize v5 built in)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr.strip()}"
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


@cache
def _rendered() -> str:
    return json.dumps(kustomize(MANIFESTS))


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


def test_kustomize_failures_are_reported(tmp_path: Path) -> None:
    """A broken kustomization fails the render with kustomize's own message."""
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [missing.yaml]\n"
    )
    with pytest.raises(AssertionError, match="missing.yaml"):
        kustomize(tmp_path)


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
