"""Where a run's pods run, as whom, and read-only Kubernetes checks of that (for preflight).

Namespace: a run created without a namespace goes to the API server's own namespace
(``POD_NAMESPACE``; kubeflow/pipelines backend/src/apiserver/resource/resource_manager.go,
CreateRun, tag 2.17.0), which is ``kubeflow`` in a standalone install; in multi-user mode the
run goes to the experiment's namespace, the user's profile. Service account: the one given
at run creation, else the server's DEFAULTPIPELINERUNNERSERVICEACCOUNT (``pipeline-runner``
standalone, ``default-editor`` multi-user: backend/src/apiserver/template/template.go,
setDefaultServiceAccount, and manifests/kustomize/base/installs/multi-user/api-service/
params.env, tag 2.4.0) — neither of which a Workload Identity binding of ours covers. So every
run names ours (`DEFAULT_SERVICE_ACCOUNT`), which must exist in `run_namespace`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_SERVICE_ACCOUNT = "carclassifier-pipeline"
"""manifests/serviceaccounts.yaml: the account Workload Identity maps to the bucket's GSA."""
PLACEHOLDER_IMAGE = "ghcr.io/carclassifier/trainer:0.1.0"
"""The trainer image a package is compiled with unless told otherwise: no registry has it, so
submit refuses a package that still names it (push yours: make push-image IMAGE=...)."""
STANDALONE_NAMESPACE = "kubeflow"
WORKLOAD_IDENTITY_ANNOTATION = "iam.gke.io/gcp-service-account"
GPU_RESOURCE = "nvidia.com/gpu"


def run_namespace(multi_user: bool, profile: str | None, system_namespace: str) -> str:
    """The namespace the run's pods are created in."""
    return profile if multi_user and profile else system_namespace


def describe_placement(multi_user: bool, namespace: str, service_account: str) -> str:
    """One line saying where the pods run and what must exist there."""
    mode = "multi-user (profile namespace)" if multi_user else "standalone"
    return (
        f"{mode} Kubeflow Pipelines: pods run in namespace {namespace} as service account "
        f"{service_account}, which must exist there with its Workload Identity annotation "
        f"(kubectl apply -n {namespace} -f manifests/serviceaccounts.yaml -f manifests/rbac.yaml)"
    )


def _executors(platform: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The kfp-kubernetes settings of every executor in a PlatformSpec."""
    kubernetes = (platform.get("platforms") or {}).get("kubernetes") or {}
    return list(((kubernetes.get("deploymentSpec") or {}).get("executors") or {}).values())


def secrets_of(platform: Mapping[str, Any]) -> dict[str, bool]:
    """Secret name → optional, for every secret the compiled tasks mount or read as env
    (kfp-kubernetes ``secretAsVolume`` / ``secretAsEnv`` in the PlatformSpec)."""
    found: dict[str, bool] = {}
    for config in _executors(platform):
        for entry in [*(config.get("secretAsVolume") or []), *(config.get("secretAsEnv") or [])]:
            param = (entry.get("secretNameParameter") or {}).get("runtimeValue") or {}
            name = entry.get("secretName") or param.get("constant")
            if name:
                found[name] = found.get(name, True) and bool(entry.get("optional"))
    return found


def node_selectors_of(platform: Mapping[str, Any]) -> list[dict[str, str]]:
    """The distinct node selectors of the compiled tasks (the GPU pool's labels)."""
    selectors = [(c.get("nodeSelector") or {}).get("labels") for c in _executors(platform)]
    return [dict(s) for i, s in enumerate(selectors) if s and s not in selectors[:i]]


def gpu_nodes(core: Any, labels: Mapping[str, str]) -> list[tuple[str, int]]:
    """(node name, allocatable nvidia.com/gpu) of the nodes carrying ``labels`` (read-only)."""
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    nodes = core.list_node(label_selector=selector).items
    return [
        (n.metadata.name, int((n.status.allocatable or {}).get(GPU_RESOURCE, "0"))) for n in nodes
    ]
