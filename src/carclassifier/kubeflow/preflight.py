"""``python -m pipelines preflight``: check, before a run, what a run would only show hours later.

Each check prints one line: ``✔`` it holds, ``✘`` it does not (with what to do), ``⚠`` it
cannot be told from here (with why). Exit status 1 when any ``✘``. Every call is read-only,
except one small object written to and deleted from each storage root, to prove the local
credentials may write there.
"""

from __future__ import annotations

import argparse
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from carclassifier.errors import one_line
from carclassifier.kubeflow import cluster, kfp_versions
from carclassifier.kubeflow.kfp_api import KfpConnection, connect, describe_error, kfp_session
from carclassifier.kubeflow.kserve import kube_client
from carclassifier.kubeflow.package import (
    PipelinePackage,
    SubmitError,
    load_package,
    run_parameters,
)
from carclassifier.kubeflow.submit import (
    _connection,
    connection_arguments,
    env,
    pipeline_arguments,
)

# kubernetes (0.6 s to import, measured), urllib3 and google.auth are imported in the checks that
# use them: `carclassifier --help` builds this command's parser.

MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


@dataclass(frozen=True)
class Check:
    """One result: ``ok`` True (✔), False (✘) or None (⚠, cannot tell)."""

    ok: bool | None
    text: str

    def line(self) -> str:
        """The printed line."""
        return f"{ {True: '✔', False: '✘', None: '⚠'}[self.ok] } {self.text}"


# ----------------------------------------------------------------------------- the image


def split_image(image: str) -> tuple[str, str, str]:
    """``(registry, repository, tag or digest)`` of an image reference (Docker's defaults)."""
    name, ref = (image.split("@", 1) + [""])[:2] if "@" in image else (image, "")
    if not ref:
        head, colon, tag = name.rpartition(":")
        name, ref = (head, tag) if colon and "/" not in tag else (name, "latest")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first, rest, ref
    return "registry-1.docker.io", name if slash else f"library/{name}", ref


def _google_token() -> str | None:
    """An OAuth access token of the local Google credentials (for gcr.io / *-docker.pkg.dev)."""
    import google.auth
    import google.auth.transport.requests

    credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    credentials.refresh(google.auth.transport.requests.Request())
    return credentials.token


def image_exists(image: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Whether the registry has ``image``: the registry v2 API's ``HEAD /v2/<name>/manifests/
    <reference>`` (distribution spec, "Checking if content exists"), after the token
    challenge of a 401 answer (the Docker token authentication spec) when there is one."""
    import urllib3

    registry, repository, reference = split_image(image)
    local = registry.split(":")[0] in ("localhost", "127.0.0.1")
    url = f"{'http' if local else 'https'}://{registry}/v2/{repository}/manifests/{reference}"
    http = urllib3.PoolManager(timeout=urllib3.Timeout(timeout, timeout), retries=False)
    headers = {"Accept": MANIFEST_TYPES}
    answer = http.request("HEAD", url, headers=headers)
    challenge = answer.headers.get("www-authenticate", "")
    if answer.status == 401 and challenge.lower().startswith("bearer "):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        query = {k: fields[k] for k in ("service", "scope") if k in fields}
        auth = {}
        if registry.endswith(("gcr.io", "pkg.dev")):
            auth = urllib3.make_headers(basic_auth=f"oauth2accesstoken:{_google_token()}")
        token = http.request("GET", fields.get("realm", ""), fields=query, headers=auth)
        if token.status == 200:
            body = json.loads(token.data)
            headers["Authorization"] = f"Bearer {body.get('token') or body.get('access_token')}"
            answer = http.request("HEAD", url, headers=headers)
    if answer.status == 200:
        return True, f"image {image} exists in {registry}"
    if answer.status == 404:
        return False, f"image {image} is not in {registry}: make push-image IMAGE={image}"
    return False, (
        f"registry {registry} answered HTTP {answer.status} for {image}: check the name and "
        "that the cluster's nodes may pull it (Artifact Registry reader for the node account)"
    )


# ----------------------------------------------------------------------------- the checks


def _try(check: Callable[[], Check | list[Check]], what: str) -> list[Check]:
    try:
        result = check()
    except SubmitError as exc:
        return [Check(False, str(exc))]
    except Exception as exc:  # one ✘ line per failed check, whatever failed
        return [Check(False, f"{what}: {one_line(exc, 240)}")]
    return result if isinstance(result, list) else [result]


def check_ir(package: PipelinePackage, server_version: str) -> Check:
    """The compiled IR parses for the server's KFP version (`carclassifier.kubeflow.kfp_versions`)."""
    target = kfp_versions.target_version(package.spec)
    if not re.fullmatch(r"\d+\.\d+\.\d+", server_version):
        return Check(None, f"server version {server_version!r} unknown: IR compiled for {target}")
    problems = kfp_versions.check_package(package.spec, server_version) or []
    if problems:
        return Check(False, f"IR (for KFP {target}) on KFP {server_version}: {'; '.join(problems)}"
                     f": compile with --kfp-version {server_version}")  # fmt: skip
    return Check(True, f"IR compiled for KFP {target} parses on KFP {server_version}")


def check_identity(core: Any, namespace: str, account: str) -> list[Check]:
    """The run's service account exists in ``namespace`` with a Workload Identity annotation."""
    from kubernetes.client.exceptions import ApiException

    try:
        sa = core.read_namespaced_service_account(account, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        return [Check(False, f"service account {namespace}/{account} is missing: kubectl apply "
                             f"-n {namespace} -f manifests/serviceaccounts.yaml -f manifests/rbac.yaml")]  # fmt: skip
    gsa = (sa.metadata.annotations or {}).get(cluster.WORKLOAD_IDENTITY_ANNOTATION)
    if not gsa or "REPLACE_ME" in gsa:
        return [Check(False, f"service account {namespace}/{account} has no Workload Identity "
                             f"annotation {cluster.WORKLOAD_IDENTITY_ANNOTATION}: run "
                             "manifests/gke/workload-identity.sh and set it (manifests/README.md)")]  # fmt: skip
    return [Check(True, f"service account {namespace}/{account} acts as {gsa} (Workload Identity)")]


def check_secrets(
    core: Any, namespace: str, package: PipelinePackage, params: Mapping[str, Any], wi: bool
) -> list[Check]:
    """The secrets the run reads: required ones, kaggle for data_source=kaggle, the GCS key
    when there is no Workload Identity."""
    from kubernetes.client.exceptions import ApiException

    needed = {
        name: not optional
        or (name == "kaggle-credentials" and params.get("data_source") == "kaggle")
        or (name == "gcs-credentials" and not wi)
        for name, optional in cluster.secrets_of(package.platform).items()
    }
    checks = []
    for name, required in sorted(needed.items()):
        try:
            core.read_namespaced_secret(name, namespace)
            checks.append(Check(True, f"secret {namespace}/{name} exists"))
        except ApiException as exc:
            if exc.status != 404:
                raise
            if required:
                checks.append(Check(False, f"secret {namespace}/{name} is missing and this run "
                                           f"needs it: kubectl -n {namespace} create secret generic "
                                           f"{name} ... (manifests/README.md)"))  # fmt: skip
            else:
                checks.append(Check(True, f"secret {namespace}/{name} absent, not needed"))
    return checks


def check_gpu_nodes(core: Any, package: PipelinePackage, gpus: int) -> list[Check]:
    """Nodes with the GPU tasks' node labels, and their allocatable nvidia.com/gpu."""
    checks = []
    for labels in cluster.node_selectors_of(package.platform):
        text = ",".join(f"{k}={v}" for k, v in labels.items())
        nodes = cluster.gpu_nodes(core, labels)
        enough = [name for name, n in nodes if n >= gpus]
        if enough:
            checks.append(Check(True, f"{len(enough)} node(s) with {text} and >= {gpus} "
                                      f"allocatable {cluster.GPU_RESOURCE}"))  # fmt: skip
        elif nodes:
            checks.append(Check(False, f"nodes with {text} have < {gpus} allocatable "
                                       f"{cluster.GPU_RESOURCE}: install the NVIDIA driver "
                                       "(GKE: --accelerator ...,gpu-driver-version=default)"))  # fmt: skip
        else:
            checks.append(Check(None, f"no node with {text} now: fine if the GPU pool "
                                      "autoscales from 0 (manifests/gke/gpu-node-pool.sh), else "
                                      "create it"))  # fmt: skip
    return checks


def check_writable(uri: str, what: str) -> Check:
    """Write and delete one object under ``uri`` with the local credentials."""
    if not uri.startswith("gs://"):
        return Check(False, f"{what} {uri!r} is not a gs:// URI")
    from carclassifier import storage  # google-cloud-storage: kept off `carclassifier --help`

    folder = storage.join(uri, f".preflight-{uuid.uuid4().hex}")
    storage.write_text(storage.join(folder, "probe.txt"), "carclassifier preflight\n")
    storage.delete_tree(folder)
    return Check(True, f"{what} {uri} is writable with the local credentials")


def preflight(args: argparse.Namespace, environ: Mapping[str, str]) -> list[Check]:
    """All checks (see the module docstring), in the order a run meets them."""
    checks: list[Check] = []
    package = load_package(args.package)
    params: dict[str, Any] = {}
    try:
        params = run_parameters(package, args.param, args.pipeline_root)
        checks.append(Check(True, "run parameters and defaults fit a cluster run"))
    except SubmitError as exc:
        checks.append(Check(False, str(exc)))
    merged = {**package.defaults, **params}

    conn: list[KfpConnection] = []

    def kfp() -> Check:
        try:
            with kfp_session():
                conn.append(connect(_connection(args), environ))
        except Exception as exc:
            raise SubmitError(describe_error(exc, args.host) or one_line(exc)) from None
        c = conn[0]
        mode = f"multi-user, profile {c.namespace}" if c.multi_user else "standalone"
        return Check(True, f"Kubeflow Pipelines {c.version} at {c.host} ({mode})")

    checks += _try(kfp, "Kubeflow Pipelines")
    if conn:
        checks += _try(lambda: check_ir(package, conn[0].version), "compiled IR")
    namespace = cluster.run_namespace(
        bool(conn and conn[0].multi_user),
        conn[0].namespace if conn else None,
        args.system_namespace,
    )
    checks.append(Check(True if conn else None, cluster.describe_placement(
        bool(conn and conn[0].multi_user), namespace, args.service_account)))  # fmt: skip

    def kubernetes_checks() -> list[Check]:
        from kubernetes import client

        core = client.CoreV1Api(kube_client(args.kube_context, environ.get("KUBECONFIG")))
        found = check_identity(core, namespace, args.service_account)
        found += check_secrets(core, namespace, package, merged, wi=found[0].ok is True)
        return found + check_gpu_nodes(core, package, int(merged.get("gpu_count") or 1))

    checks += _try(kubernetes_checks, "Kubernetes API")
    roots = [
        ("pipeline root", args.pipeline_root),
        ("checkpoint root", merged.get("checkpoint_root")),
    ]
    for what, uri in roots:
        if uri:
            checks += _try(lambda u=uri, w=what: check_writable(u, w), what)
    for image in sorted(package.images):
        checks += _try(lambda i=image: Check(*image_exists(i)), f"image {image}")
    return checks


def add_command(commands: Any, environ: Mapping[str, str]) -> None:
    """The ``preflight`` sub-command."""
    sub = commands.add_parser("preflight", help="check cluster, identity, storage, image, IR")
    connection_arguments(sub, environ)
    pipeline_arguments(sub, environ)
    sub.add_argument(
        "--system-namespace",
        default=env(environ, "KFP_SYSTEM_NAMESPACE", cluster.STANDALONE_NAMESPACE),
        help="namespace of a standalone KFP install (env KFP_SYSTEM_NAMESPACE; default %(default)s)",
    )
    sub.add_argument(
        "--kube-context", default=env(environ, "KUBE_CONTEXT"), help="kubeconfig context"
    )


def run_command(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    """Print every check; 0 when none failed, else 1."""
    checks = preflight(args, environ)
    for check in checks:
        print(check.line(), file=out)
    count = {state: sum(c.ok is state for c in checks) for state in (True, None, False)}
    print(f"preflight: {count[True]} ok, {count[None]} unknown, {count[False]} failed", file=out)
    failed = count[False]
    return 1 if failed else 0
