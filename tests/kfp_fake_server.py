"""A small in-memory Kubeflow Pipelines v2beta1 REST server for tests: OUR BELIEF of the API.

It answers the calls :class:`kfp.Client` makes for uploading pipelines and versions, experiments,
runs and recurring runs, and records every request (method, path, query, headers, JSON body,
multipart fields) so tests can assert on exactly what the client sent. Where it follows the
real server, from kubeflow/pipelines at tag 2.17.0:

* JSON uses the proto field names, unpopulated fields left out, and a request body with an
  unknown field is refused (backend/src/apiserver/common/utils.go, CustomMarshaler:
  UseProtoNames, EmitUnpopulated false, DiscardUnknown false); the fields of Run and
  RecurringRun are those of backend/api/v2beta1/run.proto and recurring_run.proto (whose list
  field really is ``recurringRuns``), enums by name (RuntimeState ``PENDING`` ...);
* ``GET /apis/v2beta1/healthz`` answers ``commit_sha``, ``tag_name``, ``multi_user`` and
  ``pipeline_store`` with ``Content-Type: application/json`` (backend/src/apiserver/main.go,
  newHealthzResponse / writeJSONResponse);
* routes are the ``google.api.http`` options of those protos (``GET /runs/{run_id}`` ...).

Stdlib only; runs in a thread on 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API = "/apis/v2beta1"
# HTTP status → grpc code, as grpc-gateway maps them in error bodies.
_GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6}
# The request-settable fields of Run / RecurringRun (backend/api/v2beta1/*.proto, tag 2.17.0).
_FIELDS = {
    "run_id": {
        "experiment_id", "run_id", "display_name", "storage_state", "description",
        "pipeline_version_id", "pipeline_spec", "pipeline_version_reference", "runtime_config",
        "service_account", "created_at", "scheduled_at", "finished_at", "state", "error",
        "run_details", "recurring_run_id", "state_history",
    },
    "recurring_run_id": {
        "recurring_run_id", "display_name", "description", "pipeline_version_id",
        "pipeline_spec", "pipeline_version_reference", "runtime_config", "service_account",
        "max_concurrency", "trigger", "mode", "created_at", "updated_at", "status", "error",
        "no_catchup", "namespace", "experiment_id",
    },
}  # fmt: skip


@dataclass
class Recorded:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    json: Any = None
    fields: dict[str, bytes] = field(default_factory=dict)
    filenames: dict[str, str] = field(default_factory=dict)

    def q(self, name: str) -> str | None:
        """The first value of a query parameter."""
        values = self.query.get(name)
        return values[0] if values else None


class HttpError(Exception):
    """Raised by a route to answer with an error status and a grpc-gateway style body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, bytes], dict[str, str]]:
    """Fields and file names of a multipart/form-data body (enough for urllib3's encoding)."""
    boundary = ""
    for part in content_type.split(";"):
        key, _, value = part.strip().partition("=")
        if key == "boundary":
            boundary = value.strip('"')
    fields: dict[str, bytes] = {}
    filenames: dict[str, str] = {}
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        disposition = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if line.lower().startswith("content-disposition:"):
                for item in line.split(";")[1:]:
                    k, _, v = item.strip().partition("=")
                    disposition[k] = v.strip('"')
        name = disposition.get("name", "")
        fields[name] = content[:-2] if content.endswith(b"\r\n") else content
        if "filename" in disposition:
            filenames[name] = disposition["filename"]
    return fields, filenames


def _matches(item: dict[str, Any], filter_json: str | None) -> bool:
    """Apply a KFP filter (only EQUALS on string keys, as kfp.Client sends)."""
    if not filter_json:
        return True
    for predicate in json.loads(filter_json).get("predicates", []):
        if predicate.get("operation") not in (1, "EQUALS"):
            raise HttpError(400, f"unsupported filter operation {predicate.get('operation')}")
        wanted = predicate.get("stringValue", predicate.get("string_value"))
        if item.get(predicate["key"]) != wanted:
            return False
    return True


class FakeKfpServer:
    """In-memory KFP API.

    ``required_token``: answer 401 unless ``Authorization: Bearer <it>``; ``login_redirect``:
    answer every API call with a 302 to an HTML login page, as an auth proxy (oauth2-proxy,
    dex) does for a request without a session; ``page_size_cap``: force pagination.
    """

    def __init__(
        self,
        *,
        multi_user: bool = False,
        required_token: str | None = None,
        page_size_cap: int | None = None,
        login_redirect: bool = False,
        tag_name: str = "2.17.0",
    ) -> None:
        self.multi_user = multi_user
        self.tag_name = tag_name
        self.login_redirect = login_redirect  # act like an auth proxy: 302 to an HTML login
        self.required_token = required_token
        self.page_size_cap = page_size_cap  # force pagination in tests
        self.requests: list[Recorded] = []
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.packages: dict[str, bytes] = {}  # version id → uploaded bytes
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring_runs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeKfpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeKfpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- helpers for tests ---------------------------------------------------------------------

    def calls(self, method: str, path: str) -> list[Recorded]:
        """Recorded requests with this method and path (path relative to /apis/v2beta1)."""
        return [r for r in self.requests if r.method == method and r.path == API + path]

    def add_recurring_run(self, display_name: str, namespace: str = "") -> str:
        """Pre-existing schedule, as if created earlier by someone else."""
        rr_id = str(uuid.uuid4())
        self.recurring_runs[rr_id] = {
            "recurring_run_id": rr_id,
            "display_name": display_name,
            "namespace": namespace,
            "mode": "ENABLE",
            "status": "ENABLED",
            "trigger": {"cron_schedule": {"cron": "0 0 0 * * *"}},
            "max_concurrency": "1",
        }
        return rr_id

    # ---- routes --------------------------------------------------------------------------------

    def _list(self, items: list[dict[str, Any]], key: str, req: Recorded) -> dict[str, Any]:
        selected = [i for i in items if _matches(i, req.q("filter"))]
        size = int(req.q("page_size") or 0) or len(selected) or 1
        if self.page_size_cap:
            size = min(size, self.page_size_cap)
        start = int(req.q("page_token") or 0)
        page = selected[start : start + size]
        answer: dict[str, Any] = {key: page, "total_size": len(selected)} if page else {}
        if start + size < len(selected):
            answer["next_page_token"] = str(start + size)
        return answer

    def _route(self, req: Recorded) -> tuple[int, Any]:
        path, method = req.path, req.method
        if not path.startswith(API + "/"):
            raise HttpError(404, "Not Found")
        parts = path[len(API) + 1 :].split("/")
        if parts == ["healthz"] and method == "GET":
            return 200, {
                "commit_sha": "unknown",
                "tag_name": self.tag_name,
                "multi_user": self.multi_user,
                "pipeline_store": "database",
            }
        if parts == ["pipelines"] and method == "GET":
            ns = req.q("namespace") or ""
            items = [p for p in self.pipelines.values() if p.get("namespace", "") == ns]
            return 200, self._list(items, "pipelines", req)
        if parts == ["pipelines", "upload"] and method == "POST":
            return 200, self._upload_pipeline(req)
        if parts == ["pipelines", "upload_version"] and method == "POST":
            return 200, self._upload_version(req)
        if len(parts) == 3 and parts[0] == "pipelines" and parts[2] == "versions":
            if parts[1] not in self.pipelines:
                raise HttpError(404, f"pipeline {parts[1]} not found")
            return 200, self._list(self.versions[parts[1]], "pipeline_versions", req)
        if parts == ["experiments"] and method == "GET":
            ns = req.q("namespace") or ""
            items = [e for e in self.experiments.values() if e["namespace"] == ns]
            return 200, self._list(items, "experiments", req)
        if parts == ["experiments"] and method == "POST":
            body = req.json or {}
            if self.multi_user and not body.get("namespace"):
                raise HttpError(400, "namespace is required in multi-user mode")
            exp_id = str(uuid.uuid4())
            experiment = {
                "experiment_id": exp_id,
                "display_name": body["display_name"],
                "namespace": body.get("namespace") or "",
                "storage_state": "AVAILABLE",
            }
            self.experiments[exp_id] = experiment
            return 200, experiment
        if parts == ["runs"] and method == "POST":
            return 200, self._create(req, self.runs, "run_id", {"state": "PENDING"})
        if len(parts) == 2 and parts[0] == "runs" and method == "GET":
            if parts[1] not in self.runs:
                raise HttpError(404, f"run {parts[1]} not found")
            return 200, self.runs[parts[1]]
        if parts == ["recurringruns"] and method == "POST":
            return 200, self._create(
                req, self.recurring_runs, "recurring_run_id", {"status": "ENABLED"}
            )
        if parts == ["recurringruns"] and method == "GET":
            ns = req.q("namespace")
            items = [
                r
                for r in self.recurring_runs.values()
                if ns is None or r.get("namespace", "") == ns
            ]
            # The proto field really is camelCase (``repeated RecurringRun recurringRuns = 1``).
            return 200, self._list(items, "recurringRuns", req)
        if len(parts) == 2 and parts[0] == "recurringruns" and method == "DELETE":
            if self.recurring_runs.pop(parts[1], None) is None:
                raise HttpError(404, f"recurring run {parts[1]} not found")
            return 200, {}
        raise HttpError(404, f"no route {method} {path}")

    def _upload_pipeline(self, req: Recorded) -> dict[str, Any]:
        data = req.fields.get("uploadfile")
        if data is None or not req.filenames.get("uploadfile", "").endswith((".yaml", ".yml")):
            raise HttpError(400, "Failed to read pipeline from file")
        name = req.q("name") or req.filenames["uploadfile"]
        namespace = req.q("namespace") or ""
        if any(p["name"] == name and p["namespace"] == namespace for p in self.pipelines.values()):
            raise HttpError(409, "The pipeline already exists.")
        pipeline_id = str(uuid.uuid4())
        pipeline = {
            "pipeline_id": pipeline_id,
            "name": name,
            "display_name": name,
            "description": req.q("description") or "",
            "namespace": namespace,
        }
        self.pipelines[pipeline_id] = pipeline
        self.versions[pipeline_id] = []
        self._add_version(pipeline_id, name, pipeline["description"], data)
        return pipeline

    def _upload_version(self, req: Recorded) -> dict[str, Any]:
        data = req.fields.get("uploadfile")
        pipeline_id = req.q("pipelineid") or ""
        if data is None or pipeline_id not in self.pipelines:
            raise HttpError(400, "Failed to create a pipeline version")
        name = req.q("name") or req.filenames.get("uploadfile", "")
        if any(v["name"] == name for v in self.versions[pipeline_id]):
            raise HttpError(
                409, "Failed to create a pipeline version. The pipeline already exists."
            )
        return self._add_version(pipeline_id, name, req.q("description") or "", data)

    def _add_version(
        self, pipeline_id: str, name: str, description: str, data: bytes
    ) -> dict[str, Any]:
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": str(uuid.uuid4()),
            "name": name,
            "display_name": name,
            "description": description,
        }
        self.versions[pipeline_id].append(version)
        self.packages[version["pipeline_version_id"]] = data
        return version

    def _create(
        self, req: Recorded, store: dict[str, dict[str, Any]], id_key: str, extra: dict[str, Any]
    ) -> dict[str, Any]:
        body = dict(req.json or {})
        unknown = sorted(set(body) - _FIELDS[id_key])
        if unknown:
            raise HttpError(400, f"unknown field(s) {unknown}")
        experiment = self.experiments.get(body.get("experiment_id", ""))
        if experiment is None:
            raise HttpError(400, "experiment not found")
        reference = body.get("pipeline_version_reference") or {}
        versions = self.versions.get(reference.get("pipeline_id", ""), [])
        if not any(
            v["pipeline_version_id"] == reference.get("pipeline_version_id") for v in versions
        ):
            raise HttpError(400, "pipeline version not found")
        new_id = str(uuid.uuid4())
        body.update(extra)
        if id_key == "recurring_run_id":  # a Run has no namespace field; a RecurringRun does
            body["namespace"] = experiment["namespace"]
        body[id_key] = new_id
        store[new_id] = body
        return body

    # ---- HTTP plumbing ---------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls per keep-alive request
            wbufsize = -1  # headers and body leave in one write (flushed after each request)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _handle(self) -> None:
                split = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                req = Recorded(
                    method=self.command,
                    path=split.path,
                    query=parse_qs(split.query, keep_blank_values=True),
                    headers={k.lower(): v for k, v in self.headers.items()},
                )
                content_type = self.headers.get("Content-Type", "")
                if content_type.startswith("multipart/form-data"):
                    req.fields, req.filenames = parse_multipart(content_type, body)
                elif body:
                    req.json = json.loads(body)
                with server._lock:
                    server.requests.append(req)
                    if server.login_redirect:
                        self._login(req)
                        return
                    try:
                        token = server.required_token
                        if token and req.headers.get("authorization") != f"Bearer {token}":
                            raise HttpError(401, "Unauthorized: missing or invalid token")
                        status, answer = server._route(req)
                    except HttpError as exc:
                        code = _GRPC_CODES.get(exc.status, 2)
                        status, answer = exc.status, {"code": code, "message": exc.message}
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _login(self, req: Recorded) -> None:
                if req.path.startswith(API):
                    self.send_response(302)
                    self.send_header("Location", "/dex/auth?client_id=kubeflow-oidc-authservice")
                    payload = b""
                else:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    payload = b"<html><body><form>Log in to Your Account</form></body></html>"
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _handle

        return Handler
