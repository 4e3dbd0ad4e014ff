"""Istio sidecar injection against Pod Security "baseline", rendered by ``kubectl kustomize``.

The rules these tests port, each from its source:

- Kubeflow profile namespaces get ``istio-injection: enabled`` (kubeflow/dashboard
  components/profile-controller/controllers/profile_controller.go,
  ``setNamespaceLabelsAndServiceMesh``, sidecar mode, the default).
- Istio's injection webhook is called for pods in such a namespace unless the pod has the LABEL
  ``sidecar.istio.io/inject: "false"`` (kubeflow/manifests v1.10.0
  common/istio-1-24/istio-install/base/install.yaml, MutatingWebhookConfiguration
  ``namespace.sidecar-injector.istio.io``: namespaceSelector + objectSelector NotIn 'false');
  the injector then decides from that label, else the ANNOTATION of the same name: y/yes/true/on
  inject, empty means the namespace default, anything else does not (istio/istio
  pkg/kube/inject/inject.go, ``injectRequired``, tag 1.24.0).
- What is injected (the istio-sidecar-injector template in the same install.yaml): without CNI
  (``pilot.cni.enabled: false``, Kubeflow v1.9/v1.10) an init container ``istio-init`` with
  ``capabilities.add: [NET_ADMIN, NET_RAW]`` as root; with CNI (``pilot.cni.enabled: true``,
  kubeflow/manifests v1.11.0 common/istio/istio-install/base/install.yaml) ``istio-validation``
  with no added capability, non-root; the ``istio-proxy`` container drops ALL in both.
- Pod Security "baseline" allows only these added capabilities: AUDIT_WRITE, CHOWN,
  DAC_OVERRIDE, FOWNER, FSETID, KILL, MKNOD, NET_BIND_SERVICE, SETFCAP, SETGID, SETPCAP, SETUID,
  SYS_CHROOT (kubernetes/website content/en/docs/concepts/security/pod-security-standards.md,
  "Capabilities"); istio.io docs/setup/additional-setup/pod-security-admission: "baseline"
  needs Istio CNI for meshed pods.
- The KFP API server sets ``sidecar.istio.io/inject: "false"`` on every template of a run's
  workflow unless the template already has that annotation (kubeflow/pipelines
  backend/src/apiserver/template/v2_template.go, ``RunWorkflowSpec`` and
  ``ScheduledWorkflow``, calling backend/src/common/util/workflow.go
  ``SetAnnotationsToAllTemplatesIfKeyNotExist``; tags 2.2.0 and 2.17.0).
- KServe puts ``spec.predictor.labels`` on the predictor pods (kserve/kserve
  pkg/controller/v1beta1/inferenceservice/components/predictor.go, ``buildObjectMeta``: labels
  = union of runtime, InferenceService and predictor labels; reconcilers/deployment/
  deployment_reconciler.go uses them as the pod template's metadata; tag v0.19.0).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
COMPONENT = MANIFESTS / "components" / "istio-sidecar-without-cni"
ISVC_SCHEMA = MANIFESTS / "schemas" / "kserve-inferenceservice-v1beta1.subset.schema.json"
KUBECTL = shutil.which("kubectl")
INJECT = "sidecar.istio.io/inject"
PROFILE_NAMESPACE = {"istio-injection": "enabled"}
BASELINE_CAPABILITIES = frozenset(
    {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
     "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
)  # fmt: skip

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is needed to render kustomize")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize directory``: the objects kubectl apply -k would send."""
    done = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def overlay(tmp_path: Path, *components: Path) -> list[dict[str, Any]]:
    """An overlay of the base with ``components``, as manifests/README.md shows, rendered."""
    where = tmp_path / "overlay"
    where.mkdir(exist_ok=True)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(MANIFESTS, where)],
        "components": [os.path.relpath(c, where) for c in components],
    }
    (where / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(where)


def pods(objects: list[dict[str, Any]]) -> dict[str, tuple[dict, dict, dict]]:
    """(labels, annotations, pod spec) of the pods each workload makes; for the
    InferenceService as KServe builds the predictor pod (see the module docstring)."""
    found = {}
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Deployment":
            meta = obj["spec"]["template"]["metadata"]
            spec = obj["spec"]["template"]["spec"]
            found[name] = (meta.get("labels", {}), meta.get("annotations", {}), spec)
        elif obj["kind"] == "InferenceService":
            predictor = obj["spec"]["predictor"]
            labels = {**obj["metadata"].get("labels", {}), **predictor.get("labels", {})}
            annotations = {**obj["metadata"].get("annotations", {}),
                           **predictor.get("annotations", {})}  # fmt: skip
            model = predictor["model"]
            container = {"name": "kserve-container", "securityContext": model["securityContext"]}
            spec = {"securityContext": predictor["securityContext"], "containers": [container]}
            found[name] = (labels, annotations, spec)
    return found


def injection_required(namespace: dict, labels: dict, annotations: dict) -> bool:
    """Istio's decision for one pod (webhook selectors, then ``injectRequired``)."""
    if namespace.get("istio-injection") != "enabled" or labels.get(INJECT) == "false":
        return False  # the webhook is not called
    value = labels.get(INJECT, annotations.get(INJECT, ""))
    if value == "":
        return True  # namespace default: enabled
    return value.lower() in ("y", "yes", "true", "on")


def inject(spec: dict, cni: bool) -> dict:
    """The pod after Istio's injection template (only the fields Pod Security reads)."""
    spec = copy.deepcopy(spec)

    def context(uid: int, add: tuple[str, ...] = ()) -> dict:
        caps: dict = {"drop": ["ALL"], **({"add": list(add)} if add else {})}
        return {"allowPrivilegeEscalation": False, "privileged": False, "runAsUser": uid,
                "runAsNonRoot": uid != 0, "capabilities": caps}  # fmt: skip

    if cni:
        init = {"name": "istio-validation", "securityContext": context(1337)}
    else:
        init = {"name": "istio-init", "securityContext": context(0, ("NET_ADMIN", "NET_RAW"))}
    proxy = {"name": "istio-proxy", "securityContext": context(1337)}
    spec["initContainers"] = [init, *spec.get("initContainers", [])]
    spec["containers"] = [*spec["containers"], proxy]
    return spec


def baseline_violations(spec: dict) -> list[str]:
    """What Pod Security "baseline" rejects among the fields injection changes: added
    capabilities outside its list, privileged containers, host namespaces, hostPath."""
    problems = [f"spec.{f}" for f in ("hostNetwork", "hostPID", "hostIPC") if spec.get(f)]
    problems += [f"hostPath volume {v['name']}" for v in spec.get("volumes", []) if "hostPath" in v]
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        context = container.get("securityContext", {})
        added = set(context.get("capabilities", {}).get("add", [])) - BASELINE_CAPABILITIES
        if added:
            problems.append(f"{container['name']} adds {sorted(added)}")
        if context.get("privileged"):
            problems.append(f"{container['name']} is privileged")
    return problems


def admitted(objects: list[dict], namespace: dict, cni: bool) -> dict[str, list[str]]:
    """Per pod: what baseline would reject after Istio's injection in ``namespace``."""
    result = {}
    for name, (labels, notes, spec) in pods(objects).items():
        if injection_required(namespace, labels, notes):
            spec = inject(spec, cni)
        result[name] = baseline_violations(spec)
    return result


def _namespace(objects: list[dict]) -> dict:
    (namespace,) = [o for o in objects if o["kind"] == "Namespace"]
    return namespace


# --------------------------------------------------------------------------- the checks


def test_the_checks_see_what_baseline_rejects() -> None:
    """The port is not vacuous: istio-init without CNI breaks baseline, with CNI it does not,
    and an explicit "false" label or annotation stops injection."""
    spec = {"containers": [{"name": "app"}]}
    assert baseline_violations(inject(spec, cni=False)) == [
        "istio-init adds ['NET_ADMIN', 'NET_RAW']"
    ]
    assert baseline_violations(inject(spec, cni=True)) == []
    assert injection_required(PROFILE_NAMESPACE, {}, {})
    assert not injection_required(PROFILE_NAMESPACE, {INJECT: "false"}, {})
    assert not injection_required(PROFILE_NAMESPACE, {}, {INJECT: "false"})
    assert injection_required(PROFILE_NAMESPACE, {INJECT: "true"}, {INJECT: "false"})  # label wins
    assert not injection_required({}, {}, {INJECT: "true"})  # webhook not called


def test_the_base_is_rejected_in_a_profile_namespace_without_cni() -> None:
    """Why the component exists: on Kubeflow 1.9/1.10 (no CNI) the base's serving pods get
    istio-init, and the namespace's enforced baseline rejects them."""
    base = kustomize(MANIFESTS)
    rejected = admitted(base, PROFILE_NAMESPACE, cni=False)
    assert set(rejected) == {"Deployment/carclassifier-web", "InferenceService/carclassifier"}
    assert all(problems for problems in rejected.values()), rejected


def test_the_component_makes_every_pod_admissible_without_cni(tmp_path: Path) -> None:
    """Fails before this change (the component did not exist): sidecar injection without CNI."""
    objects = overlay(tmp_path, COMPONENT)
    assert admitted(objects, PROFILE_NAMESPACE, cni=False) == {
        "Deployment/carclassifier-web": [],
        "InferenceService/carclassifier": [],
    }
    assert _namespace(objects)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
        "baseline"
    )


@pytest.mark.parametrize("namespace", [PROFILE_NAMESPACE, {}], ids=["istio-cni", "no-mesh"])
def test_the_base_is_admissible_with_istio_cni_or_no_mesh(namespace: dict) -> None:
    base = kustomize(MANIFESTS)
    assert all(not p for p in admitted(base, namespace, cni=True).values())
    for labels, notes, _ in pods(base).values():  # with CNI the serving pods stay meshed
        assert injection_required(namespace, labels, notes) == bool(namespace)


def test_the_component_only_adds_the_opt_out_labels(tmp_path: Path) -> None:
    base, objects = kustomize(MANIFESTS), overlay(tmp_path, COMPONENT)
    for obj in objects:
        if obj["kind"] == "Deployment":
            assert obj["spec"]["template"]["metadata"]["labels"].pop(INJECT) == "false"
        if obj["kind"] == "InferenceService":
            assert obj["spec"]["predictor"].pop("labels") == {INJECT: "false"}
    assert objects == base


@pytest.mark.parametrize("version", ["1.33", kubernetes_validate.latest_version()])
def test_the_overlay_is_valid_kubernetes_and_kserve(tmp_path: Path, version: str) -> None:
    schema = json.loads(ISVC_SCHEMA.read_text())
    for obj in overlay(tmp_path, COMPONENT):
        if obj["kind"] == "InferenceService":
            jsonschema.validate(obj, schema)
        else:
            kubernetes_validate.validate(obj, desired_version=version, strict=True)


def set_annotation_if_key_not_exist(templates: list[dict], key: str, value: str) -> None:
    """kubeflow/pipelines backend/src/common/util/workflow.go,
    ``SetAnnotationsToAllTemplatesIfKeyNotExist`` (tags 2.2.0, 2.17.0)."""
    for template in templates:
        annotations = template.setdefault("metadata", {}).setdefault("annotations", {})
        annotations.setdefault(key, value)


def test_pipeline_task_pods_keep_the_servers_no_injection_default(tmp_path: Path) -> None:
    """The compiled pipeline sets no sidecar.istio.io/inject pod label or annotation
    (kfp-kubernetes ``add_pod_label``/``add_pod_annotation`` become ``podMetadata``), so the
    API server's "false" applies to every task pod and a profile namespace's baseline admits
    them with or without CNI. A pipeline that set "true" would lose that default."""
    from pipelines import compile_pipeline

    package = compile_pipeline(
        ROOT / "configs" / "recipe_b6.yaml", tmp_path / "p.yaml", "registry.example/t:1"
    )
    _, platform = yaml.safe_load_all(package.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    templates = []
    for name, config in executors.items():
        metadata = config.get("podMetadata", {})
        assert INJECT not in metadata.get("labels", {}), name
        assert INJECT not in metadata.get("annotations", {}), name
        templates.append({"metadata": {"annotations": dict(metadata.get("annotations", {}))}})
    set_annotation_if_key_not_exist(templates, INJECT, "false")
    task_pod = {"containers": [{"name": "main"}]}
    for template in templates:
        annotations = template["metadata"]["annotations"]
        assert not injection_required(PROFILE_NAMESPACE, {}, annotations)
    opted_in = [{"metadata": {"annotations": {INJECT: "true"}}}]
    set_annotation_if_key_not_exist(opted_in, INJECT, "false")
    assert injection_required(PROFILE_NAMESPACE, {}, opted_in[0]["metadata"]["annotations"])
    assert baseline_violations(inject(task_pod, cni=False))  # what "true" would cost
