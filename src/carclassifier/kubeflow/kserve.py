"""Rolling a KServe InferenceService onto a newly published serving version.

KServe does not watch ``storageUri``: its storage initializer is an init container that copies
the URI into the pod's ``/mnt/models`` once, before the model server starts
(kserve/kserve python/storage-initializer/scripts/initializer-entrypoint, injected by
pkg/webhook/admission/pod/storage_initializer_injector.go, ``InjectStorageInitializer``;
v0.20). TensorFlow Serving then polls ``/mnt/models`` — a pod-local copy that never changes.
So a version published to ``<serving_root>/<N>/`` reaches a running predictor only through new
pods: `roll_out` changes one annotation of ``spec.predictor``, which KServe copies onto the
predictor Deployment's pod template (pkg/controller/v1beta1/inferenceservice/components/
predictor.go ``buildObjectMeta``; reconcilers/deployment/deployment_reconciler.go
``createRawDefaultDeployment``), and the Deployment replaces its pods one by one. Each new pod
downloads the serving root again and TF Serving serves its highest number (tensorflow/serving
sources/storage_path/file_system_storage_path_source.cc, ``AspireLatestVersions``, 2.20.0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from carclassifier.errors import CarClassifierError

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
ROLLOUT_ANNOTATION = "carclassifier.io/serving-version"
"""The predictor annotation `roll_out` sets to the version number (a new value = new pods)."""
POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class RolloutError(CarClassifierError):
    """The InferenceService could not be rolled onto the new version."""


def kube_client(context: str | None = None, config_file: str | None = None) -> Any:
    """A kubernetes ApiClient from the kubeconfig (``$KUBECONFIG`` or ~/.kube/config), else
    the pod's in-cluster service account."""
    # kubernetes takes 0.6 s to import (measured): only where a call is made.
    from kubernetes import client, config

    # kubernetes reads $KUBECONFIG once, at import (kube_config.KUBE_CONFIG_DEFAULT_LOCATION):
    # read it at the call, so a changed environment is seen (a ':'-list is merged as kubectl does).
    config_file = config_file or os.environ.get("KUBECONFIG") or None
    try:
        return config.new_client_from_config(config_file=config_file, context=context)
    except config.ConfigException:
        config.load_incluster_config()
        return client.ApiClient()


def parse_target(target: str, namespace_file: Path = POD_NAMESPACE_FILE) -> tuple[str, str]:
    """``namespace/name`` or ``name`` (the pod's own namespace) -> (namespace, name)."""
    namespace, _, name = target.rpartition("/")
    if not namespace:
        if not namespace_file.is_file():
            raise RolloutError(
                f"inference_service {target!r} names no namespace and this is not a pod: "
                "give it as namespace/name"
            )
        namespace = namespace_file.read_text().strip()
    if not name or "/" in namespace:
        raise RolloutError(f"inference_service {target!r} must be name or namespace/name")
    return namespace, name


def roll_out(target: str, version: int, api_client: Any | None = None) -> str:
    """Set ``spec.predictor.annotations[ROLLOUT_ANNOTATION]`` of the InferenceService
    ``target`` to ``version`` (a JSON merge patch: other fields untouched), so that its
    predictor pods are replaced and load the serving root's highest version. Returns
    ``namespace/name``; `RolloutError` says what to do when the API refuses."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    namespace, name = parse_target(target)
    api = client.CustomObjectsApi(api_client or kube_client())
    body = {"spec": {"predictor": {"annotations": {ROLLOUT_ANNOTATION: str(version)}}}}
    try:
        api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body)
    except ApiException as exc:
        hint = {
            403: "grant patch on inferenceservices to the pipeline's service account "
            "(manifests/rbac.yaml)",
            404: "create it first (kubectl apply -k manifests/) or fix inference_service",
        }.get(exc.status, "see the API server's answer")
        raise RolloutError(
            f"InferenceService {namespace}/{name}: the API answered {exc.status} {exc.reason}: "
            f"{hint}; version {version} is published, the predictor still serves the old one"
        ) from None
    return f"{namespace}/{name}"
