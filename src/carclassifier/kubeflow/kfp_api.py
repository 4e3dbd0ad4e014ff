"""The KFP v2beta1 API through `kfp.Client`, as it is: connect, upload, experiments, schedules.

`connect` first asks the server's healthz endpoint once, with a deadline and no retries (the
API server answers ``{"commit_sha", "tag_name", "multi_user", "pipeline_store"}``:
kubeflow/pipelines backend/src/apiserver/main.go, newHealthzResponse, tag 2.17.0; the same
keys without pipeline_store at 2.4.0), so a dead host, a login page or rejected credentials
end in one line within ``--timeout``; only then is a plain `kfp.Client` built. Later calls are
kfp's own (kfp_server_api sends them without a deadline).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import urllib.parse
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carclassifier.errors import one_line
from carclassifier.kubeflow.package import PipelinePackage, SubmitError

# kfp (0.7 s to import, measured), kfp_server_api and urllib3 are imported in the functions that
# use them: `carclassifier --help` and `python -m pipelines --help` build these commands' parsers.

#: The KFP API of a standard install, as seen from a pod of the same cluster.
IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
#: Where the kubelet projects a KFP service-account token (kfp's own default).
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_DEFAULT_PATH = "/var/run/secrets/kubeflow/pipelines/token"
DEFAULT_TIMEOUT_S = 30.0
_HASH_MARK = "package sha256:"
AUTH_HINT = (
    "pass a bearer token with --existing-token/KFP_TOKEN (e.g. from `kubectl create token "
    "default-editor -n <profile>`) or a login cookie with --cookies/KFP_COOKIES (e.g. "
    "'authservice_session=...' or 'oauth2_proxy_kubeflow=...' copied from the browser)"
)


@dataclass(frozen=True)
class ConnectionOptions:
    """How to reach and authenticate to the KFP API."""

    host: str | None = None
    namespace: str | None = None  # the profile namespace (multi-user Kubeflow)
    existing_token: str | None = None
    cookies: str | None = None
    ui_host: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    ssl_ca_cert: str | None = None  # CA bundle for an https host with a private CA


@dataclass
class KfpConnection:
    """A `kfp.Client` plus what the commands need to know about the server."""

    client: Any  # kfp.Client (kfp is imported lazily)
    host: str
    ui_host: str
    namespace: str | None  # the profile namespace in multi-user mode, else None
    multi_user: bool
    version: str  # the server's tag_name ("unknown" when its build did not set it)


def resolve_host(host: str | None, environ: Mapping[str, str]) -> str:
    """The API base URL: the given one, or the in-cluster service when running in a pod."""
    if not host:
        if environ.get("KUBERNETES_SERVICE_HOST"):
            return IN_CLUSTER_HOST
        raise SubmitError(
            "no Kubeflow Pipelines host: pass --host or set KFP_HOST (e.g. http://localhost:8080 "
            "after `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`)"
        )
    parsed = urllib.parse.urlsplit(host)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SubmitError(f"bad host {host!r}: expected http://HOST[:PORT][/PATH] or https://...")
    return host.rstrip("/")


def _sa_token_path(environ: Mapping[str, str]) -> str | None:
    """kfp's projected service-account token file when there is one (pods), else None."""
    explicit = environ.get(SA_TOKEN_ENV)
    path = explicit or SA_TOKEN_DEFAULT_PATH
    if not Path(path).is_file():
        if explicit:
            raise SubmitError(f"{SA_TOKEN_ENV}={explicit} does not exist or is not a file")
        return None
    return path


def probe_healthz(
    host: str, headers: Mapping[str, str], timeout: float, ssl_ca_cert: str | None = None
) -> dict[str, Any]:
    """One GET of ``/apis/v2beta1/healthz`` with a deadline (redirects followed, as to a login
    page; nothing retried); the JSON it answers."""
    import urllib3

    pool = urllib3.PoolManager(ca_certs=ssl_ca_cert, timeout=urllib3.Timeout(timeout, timeout))
    once = urllib3.Retry(total=None, connect=0, read=0, redirect=5, status=0, other=0)
    response = pool.request(
        "GET", f"{host}/apis/v2beta1/healthz", headers=dict(headers), retries=once
    )
    if response.status in (401, 403):
        reason = "rejected the credentials" if response.status == 401 else "denied access"
        detail = api_message(response.data)
        raise SubmitError(
            f"{host} {reason} (HTTP {response.status} {response.reason}"
            f"{': ' + detail if detail else ''}): {AUTH_HINT}"
        )
    content_type = response.headers.get("content-type", "")
    try:
        data = json.loads(response.data) if "json" in content_type else None
    except ValueError:
        data = None
    if response.status != 200 or not isinstance(data, dict):
        what = f"HTTP {response.status}, {content_type or 'no content type'}"
        raise SubmitError(
            f"{host} answered healthz with {what}, not the KFP API (a login page?): {AUTH_HINT}"
        )
    return data


def connect(options: ConnectionOptions, environ: Mapping[str, str]) -> KfpConnection:
    """Check the API answers and accepts the credentials, then build a `kfp.Client`."""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    host = resolve_host(options.host, environ)
    token_path = None if options.existing_token else _sa_token_path(environ)
    token = options.existing_token or (Path(token_path).read_text().strip() if token_path else "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if options.cookies:
        headers["Cookie"] = options.cookies
    health = probe_healthz(host, headers, options.timeout, options.ssl_ca_cert)
    multi_user = bool(health.get("multi_user"))
    namespace = None
    if multi_user:
        namespace = options.namespace
        if not namespace:
            raise SubmitError(
                f"{host} is a multi-user Kubeflow: pass your profile namespace with "
                "--namespace/KFP_NAMESPACE"
            )
    elif options.namespace:
        note(f"standalone Kubeflow Pipelines at {host}: namespace {options.namespace} unused")
    ui_host = (options.ui_host or host).rstrip("/")
    client = kfp.Client(
        host=host,
        ui_host=ui_host,
        namespace=namespace or "kubeflow",
        existing_token=options.existing_token,
        cookies=options.cookies,
        ssl_ca_cert=options.ssl_ca_cert,
        credentials=ServiceAccountTokenVolumeCredentials(token_path) if token_path else None,
    )
    version = str(health.get("tag_name") or "unknown")
    return KfpConnection(client, host, ui_host, namespace, multi_user, version)


@contextlib.contextmanager
def kfp_session() -> Iterator[None]:
    """Hush kfp's FutureWarning about server versions and send kfp's own prints to stderr."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore", FutureWarning)
        yield


def note(message: str) -> None:
    """A progress line on stderr."""
    print(message, file=sys.stderr)


# ------------------------------------------------------------------------------ server objects


def _name_filter(name: str) -> str:
    # The shape kfp.Client itself sends (operation 1 is EQUALS in backend/api/v2beta1/filter.proto).
    return json.dumps(
        {"predicates": [{"operation": 1, "key": "display_name", "stringValue": name}]}
    )


def _paged(fetch: Callable[[str], Any], items: str) -> Iterator[Any]:
    """All items of a paginated list call (``fetch(page_token)``)."""
    token = ""
    while True:
        response = fetch(token)
        yield from getattr(response, items, None) or []
        token = getattr(response, "next_page_token", None) or ""
        if not token:
            return


def _find_pipeline_id(conn: KfpConnection, name: str) -> str | None:
    pipelines = _paged(
        lambda token: conn.client.list_pipelines(
            page_token=token, page_size=100, filter=_name_filter(name), namespace=conn.namespace
        ),
        "pipelines",
    )
    found = [p.pipeline_id for p in pipelines if name in (p.display_name, p.name)]
    if len(found) > 1:
        raise SubmitError(f"{len(found)} pipelines are called {name!r}: delete the extra ones")
    return found[0] if found else None


def find_version(conn: KfpConnection, pipeline_id: str, version_name: str) -> Any | None:
    """The version called ``version_name`` of a pipeline, or None."""
    versions = _paged(
        lambda token: conn.client.list_pipeline_versions(
            pipeline_id, page_token=token, page_size=100, filter=_name_filter(version_name)
        ),
        "pipeline_versions",
    )
    return next((v for v in versions if version_name in (v.display_name, v.name)), None)


@dataclass(frozen=True)
class PipelineVersionRef:
    """Where a package lives on the server."""

    pipeline_id: str
    version_id: str
    version_name: str


@contextlib.contextmanager
def _unless_conflict() -> Iterator[None]:
    """Swallow an HTTP 409 (it already exists: a concurrent submit), so the caller looks it up."""
    import kfp_server_api

    try:
        yield
    except kfp_server_api.ApiException as exc:
        if exc.status != 409:
            raise
        note(f"already exists (HTTP 409), looking it up: {api_message(exc.body)}")


def ensure_pipeline_version(
    conn: KfpConnection, package: PipelinePackage, pipeline_name: str, version_name: str
) -> PipelineVersionRef:
    """Upload the pipeline (first time) and the version (unless that name is already there).

    A version of the same name whose description records another package hash is an error:
    the server would otherwise run stale code under the requested name.
    """
    description = "Car-model image classifier: staged fine-tuning of a pretrained EfficientNet."
    pipeline_id = _find_pipeline_id(conn, pipeline_name)
    if pipeline_id is None:
        with _unless_conflict():
            pipeline_id = conn.client.upload_pipeline(
                str(package.path),
                pipeline_name=pipeline_name,
                description=f"{description} ({_HASH_MARK}{package.sha256})",
                namespace=conn.namespace,
            ).pipeline_id
            note(f"pipeline {pipeline_name}: created (id {pipeline_id})")
        pipeline_id = pipeline_id or _find_pipeline_id(conn, pipeline_name)
        if pipeline_id is None:
            raise SubmitError(f"pipeline {pipeline_name} could not be created nor found")
    version = find_version(conn, pipeline_id, version_name)
    if version is not None:
        recorded = re.search(re.escape(_HASH_MARK) + r"([0-9a-f]{64})", version.description or "")
        if recorded and recorded.group(1) != package.sha256:
            raise SubmitError(
                f"version {version_name} of pipeline {pipeline_name} already exists with other "
                f"content (sha256 {recorded.group(1)[:12]}, this package {package.sha256[:12]}): "
                "pass a new --version or leave it to the content hash"
            )
        note(f"version {version_name}: already uploaded (id {version.pipeline_version_id})")
    else:
        with _unless_conflict():
            version = conn.client.upload_pipeline_version(
                str(package.path),
                pipeline_version_name=version_name,
                pipeline_id=pipeline_id,
                description=f"{_HASH_MARK}{package.sha256}",
            )
            note(f"version {version_name}: uploaded (id {version.pipeline_version_id})")
        version = version or find_version(conn, pipeline_id, version_name)
        if version is None:
            raise SubmitError(f"version {version_name} could not be uploaded nor found")
    return PipelineVersionRef(pipeline_id, version.pipeline_version_id, version_name)


def ensure_experiment(conn: KfpConnection, name: str) -> str:
    """The id of the experiment ``name`` (kfp.Client.create_experiment gets or creates it)."""
    return str(conn.client.create_experiment(name, namespace=conn.namespace).experiment_id)


def find_recurring_runs(conn: KfpConnection, job_name: str) -> list[Any]:
    """All recurring runs whose display name is ``job_name``."""
    runs = _paged(
        lambda token: conn.client.list_recurring_runs(
            page_token=token, page_size=100, namespace=conn.namespace, filter=_name_filter(job_name)
        ),
        "recurring_runs",
    )
    return [rr for rr in runs if rr.display_name == job_name]


# ------------------------------------------------------------------------------ errors → a line


def api_message(body: Any) -> str:
    """The human part of a KFP error body (grpc-gateway ``message`` or upload ``error_message``)."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return one_line(body) if body else ""
    if isinstance(data, dict):
        for key in ("message", "error_message", "error"):
            if data.get(key):
                return one_line(data[key])
    return one_line(body)


def unreachable(host: str, reason: str) -> str:
    """The line for a host that does not answer."""
    return (
        f"cannot reach Kubeflow Pipelines at {host} ({reason}): check --host/KFP_HOST, "
        "the port-forward or the VPN"
    )


def describe_error(exc: BaseException, host: str | None) -> str | None:
    """The one-line message for a known failure, or None for an unexpected one."""
    import kfp_server_api
    import urllib3

    where = host or "the Kubeflow Pipelines API"
    if isinstance(exc, SubmitError):
        return str(exc)
    if isinstance(exc, kfp_server_api.ApiException):  # after the probe: the server's own word
        message = api_message(exc.body) or "no details"
        hint = f": {AUTH_HINT}" if exc.status in (401, 403) else ""
        return f"{where} answered HTTP {exc.status} {exc.reason}: {message}{hint}"
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return (
            f"{where} accepted the connection but did not answer in time: check the server, "
            "or raise --timeout/KFP_TIMEOUT"
        )
    if isinstance(exc, urllib3.exceptions.SSLError):
        return (
            f"TLS with {where} failed ({one_line(exc, 160)}): use http:// for a plain-HTTP "
            "endpoint such as a port-forward, or pass the CA bundle with --ssl-ca-cert/KFP_SSL_CA_CERT"
        )
    if isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError):
        errno_text = re.search(r"\[Errno -?\d+\] ([^')\]]+)", str(exc))
        return unreachable(where, errno_text.group(1) if errno_text else one_line(exc, 120))
    if isinstance(exc, OSError) and exc.filename:
        return f"cannot read {exc.filename}: {exc.strerror}"
    if isinstance(exc, ValueError):  # kfp's own checks (e.g. duplicate experiment names)
        return one_line(exc)
    return None
