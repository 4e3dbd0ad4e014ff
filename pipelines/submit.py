"""Submit, schedule and unschedule the compiled car-classifier pipeline on Kubeflow Pipelines.

Usage::

    python -m pipelines.submit submit     --host URL [--param key=value ...]
    python -m pipelines.submit schedule   --host URL --cron "0 3 * * 0"
    python -m pipelines.submit unschedule --host URL

Every option has an environment variable (``KFP_HOST``, ``KFP_NAMESPACE``, ``EXPERIMENT``,
``PIPELINE_ROOT``, ``CRON``, ``KFP_TOKEN``, ``KFP_COOKIES`` ...; an empty value counts as unset),
so the Makefile can pass its variables straight through.

All three talk to the KFP v2beta1 REST API through :class:`kfp.Client`:

* ``submit`` uploads the compiled package as a pipeline (first time) or as a new version of it
  (skipped when a version of that name exists: the default name is derived from the package's
  SHA-256, so re-submitting an unchanged package uploads nothing), gets or creates the
  experiment, starts a run with the runtime parameters and prints the run id and its UI link.
* ``schedule`` does the same upload, then replaces any recurring run of the job name by a new
  one (cron trigger, max concurrency 1, no catch-up), so running it twice leaves one schedule.
* ``unschedule`` deletes the recurring run(s) of the job name.

Authentication is kfp's: ``--existing-token`` (a bearer token), ``--cookies`` (e.g. the
``authservice_session`` cookie of a Kubeflow login), a projected service-account token at
``KF_PIPELINES_SA_TOKEN_PATH`` (default ``/var/run/secrets/kubeflow/pipelines/token``) when
it exists, and kfp's own IAP / context-file mechanisms. Failures (unreachable host, rejected
credentials, a missing package, a bad parameter or cron) end with ONE ``error: ...`` line on
stderr and exit status 2; network waits are bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import socket
import sys
import urllib.parse
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

DEFAULT_PACKAGE = "pipelines/compiled/car_classifier.yaml"
DEFAULT_PIPELINE_NAME = "car-classifier"
DEFAULT_EXPERIMENT = "carclassifier"
DEFAULT_JOB_NAME = "car-classifier-retrain"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_DESCRIPTION = "Car-model image classifier: staged fine-tuning of a pretrained EfficientNet."
#: The KFP API of a standard (single-user) install, as seen from a pod of the same cluster.
IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
#: Where the kubelet projects a KFP service-account token (kfp's own default).
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_DEFAULT_PATH = "/var/run/secrets/kubeflow/pipelines/token"
EXIT_ERROR = 2
_PAGE_SIZE = 100
_HASH_MARK = "package sha256:"

_AUTH_HINT = (
    "pass a bearer token with --existing-token/KFP_TOKEN (e.g. from `kubectl create token "
    "default-editor -n <profile>`) or a login cookie with --cookies/KFP_COOKIES (e.g. "
    "'authservice_session=...' or 'oauth2_proxy_kubeflow=...' copied from the browser)"
)


class SubmitError(Exception):
    """A failure the user can fix; its message is the one line printed after ``error:``."""


# --------------------------------------------------------------------------------------------
# The package and its parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterSpec:
    """One root input parameter of a compiled pipeline."""

    name: str
    type: str  # STRING, NUMBER_INTEGER, NUMBER_DOUBLE, BOOLEAN, LIST, STRUCT
    optional: bool


@dataclass(frozen=True)
class PipelinePackage:
    """A compiled KFP pipeline package (IR YAML) read from disk."""

    path: Path
    sha256: str
    name: str  # pipelineInfo.name
    parameters: Mapping[str, ParameterSpec]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Default values of the root input parameters."""
    recipe: str | None = None
    """The carclassifier recipe compiled into the package (None: another pipeline)."""
    stage_names: tuple[str, ...] | None = None


def load_package(path: str | os.PathLike[str]) -> PipelinePackage:
    """Read and check a compiled pipeline YAML; raise :class:`SubmitError` if it is not one."""
    package = Path(path)
    if package.suffix not in (".yaml", ".yml"):
        raise SubmitError(f"pipeline package {package} must be a compiled .yaml file")
    try:
        data = package.read_bytes()
    except FileNotFoundError:
        raise SubmitError(
            f"pipeline package {package} not found: compile it first "
            "(python -m pipelines.compile ... --out PATH) or pass --package PATH"
        ) from None
    except OSError as exc:
        raise SubmitError(f"cannot read pipeline package {package}: {exc.strerror}") from None
    try:
        docs = list(yaml.safe_load_all(data))
    except yaml.YAMLError as exc:
        raise SubmitError(
            f"pipeline package {package} is not valid YAML: {_yaml_problem(exc)}"
        ) from None
    spec = docs[0] if docs else None
    if not isinstance(spec, dict) or "root" not in spec or "pipelineInfo" not in spec:
        raise SubmitError(
            f"{package} is not a compiled KFP v2 pipeline (no pipelineInfo/root): "
            "compile it with kfp.compiler.Compiler"
        )
    definitions = (spec.get("root") or {}).get("inputDefinitions") or {}
    parameters = {
        name: ParameterSpec(
            name=name,
            type=str(info.get("parameterType", "")),
            optional=bool(info.get("isOptional")) or "defaultValue" in info,
        )
        for name, info in (definitions.get("parameters") or {}).items()
    }
    recipe, stage_names = recipe_of(spec)
    return PipelinePackage(
        path=package,
        sha256=hashlib.sha256(data).hexdigest(),
        name=str((spec.get("pipelineInfo") or {}).get("name", "")),
        parameters=parameters,
        defaults={
            name: _typed_default(info)
            for name, info in (definitions.get("parameters") or {}).items()
            if isinstance(info, dict) and "defaultValue" in info
        },
        recipe=recipe,
        stage_names=tuple(stage_names) if stage_names is not None else None,
    )


def _typed_default(info: Mapping[str, Any]) -> Any:
    """A parameter's default as its declared type (the IR writes integers as 1.0)."""
    value = info["defaultValue"]
    if info.get("parameterType") == "NUMBER_INTEGER" and isinstance(value, float):
        return int(value) if value.is_integer() else value
    return value


def check_run_parameters(package: PipelinePackage, params: Mapping[str, Any]) -> None:
    """For a car-classifier package, check the run's parameters as its pods will use them
    (`pipelines.car_classifier.check_arguments`: GPU count and type, gs:// URIs, image size,
    overrides applied to the compiled recipe); raise :class:`SubmitError` naming the problem."""
    if package.recipe is None:
        return
    from carclassifier.errors import CarClassifierError
    from pipelines.car_classifier import check_arguments

    try:
        check_arguments({**package.defaults, **params}, package.recipe, package.stage_names)
    except CarClassifierError as exc:
        raise SubmitError(f"bad pipeline parameter: {exc}") from None


def recipe_of(spec: Mapping[str, Any]) -> tuple[str | None, list[str] | None]:
    """The recipe YAML and stage names compiled into a car-classifier pipeline's IR (the
    prepare task's constant inputs, see `pipelines.car_classifier`), or (None, None)."""
    tasks = ((spec.get("root") or {}).get("dag") or {}).get("tasks") or {}
    for task in tasks.values():
        inputs = ((task or {}).get("inputs") or {}).get("parameters") or {}
        recipe = ((inputs.get("config_yaml") or {}).get("runtimeValue") or {}).get("constant")
        if isinstance(recipe, str):
            names = ((inputs.get("stage_names") or {}).get("runtimeValue") or {}).get("constant")
            return recipe, list(names) if isinstance(names, list) else None
    return None, None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The short reason of a YAML error (``problem`` of a marked error), on one line."""
    return _one_line(getattr(exc, "problem", None) or exc, 120)


def default_version_name(pipeline_name: str, package: PipelinePackage) -> str:
    """Version name from the package content only: the same bytes always give the same name."""
    return f"{pipeline_name}-{package.sha256[:12]}"


_PARAM_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
            f"bad --param {key}={text}: not a YAML value ({_yaml_problem(exc)})"
        ) from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def resolve_params(raw: Mapping[str, str], package: PipelinePackage | None) -> dict[str, Any]:
    """Turn raw ``key=value`` texts into typed runtime parameters.

    Values are YAML scalars (``3`` → int, ``0.1`` → float, ``true`` → bool). With a package the
    names are checked against its root inputs, values against their declared types (a STRING
    input keeps the text as typed, an integer given to a NUMBER_DOUBLE input becomes a float)
    and every required input must be given.
    """
    if package is None:
        return {key: _yaml_value(key, text) for key, text in raw.items()}
    params: dict[str, Any] = {}
    known = ", ".join(sorted(package.parameters)) or "none"
    for key, text in raw.items():
        spec = package.parameters.get(key)
        if spec is None:
            raise SubmitError(
                f"bad --param {key}={text}: the pipeline has no parameter {key!r} (it has: {known})"
            )
        if spec.type == "STRING":
            params[key] = text
            continue
        value = _yaml_value(key, text)
        expected = {
            "NUMBER_INTEGER": (
                "an integer",
                lambda v: isinstance(v, int) and not isinstance(v, bool),
            ),
            "NUMBER_DOUBLE": ("a number", _is_number),
            "BOOLEAN": ("true or false", lambda v: isinstance(v, bool)),
            "LIST": ("a YAML list like [a, b]", lambda v: isinstance(v, list)),
            "STRUCT": ("a YAML mapping like {a: 1}", lambda v: isinstance(v, dict)),
        }.get(spec.type)
        if expected is not None and not expected[1](value):
            raise SubmitError(
                f"bad --param {key}={text}: {key} ({spec.type}) expects {expected[0]}"
            )
        params[key] = float(value) if spec.type == "NUMBER_DOUBLE" else value
    missing = sorted(n for n, s in package.parameters.items() if not s.optional and n not in params)
    if missing:
        raise SubmitError(
            "missing required pipeline parameter(s) "
            + ", ".join(missing)
            + ": pass --param NAME=VALUE for each"
        )
    return params


_URI = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")


def check_pipeline_root(root: str | None) -> str | None:
    """``None`` (KFP's default root) or a URI such as ``gs://bucket/prefix``."""
    if root is None:
        return None
    if not _URI.match(root):
        raise SubmitError(
            f"bad pipeline root {root!r}: expected a URI such as gs://BUCKET/kfp-root "
            "(--pipeline-root/PIPELINE_ROOT)"
        )
    return root.rstrip("/")


# --------------------------------------------------------------------------------------------
# Cron (robfig/cron as used by the KFP scheduled-workflow controller: 6 fields, seconds first)
# --------------------------------------------------------------------------------------------

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CRON_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate(_MONTHS)}),
    ("day-of-week", 0, 6, {d: i for i, d in enumerate(_DAYS)}),
)
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_EVERY = re.compile(r"^@every (\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
_CRON_HINT = (
    'use 5 fields "minute hour day-of-month month day-of-week" (e.g. "0 3 * * 0": Sundays 03:00) '
    'or 6 with seconds first (e.g. "0 0 3 * * 0")'
)


class CronError(SubmitError):
    """An invalid cron expression."""


def _cron_number(text: str, names: Mapping[str, int], what: str) -> int:
    if text.isdigit():
        return int(text)
    if text.lower() in names:
        return names[text.lower()]
    raise CronError(f"{what} {text!r} is not a number" + (" or a name" if names else ""))


def _check_cron_field(value: str, what: str, low: int, high: int, names: Mapping[str, int]) -> None:
    for part in value.split(","):
        range_text, slash, step_text = part.partition("/")
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{what} step {step_text!r} must be a positive number")
        bounds = range_text.split("-")
        if bounds[0] in ("*", "?") and len(bounds) == 1:
            continue
        if len(bounds) > 2:
            raise CronError(f"{what} range {range_text!r} is malformed")
        start = _cron_number(bounds[0], names, what)
        end = _cron_number(bounds[1], names, what) if len(bounds) == 2 else start
        for number in (start, end):
            if not low <= number <= high:
                raise CronError(f"{what} {number} is out of range {low}-{high}")
        if start > end:
            raise CronError(f"{what} range {range_text!r} runs backwards")


def to_kfp_cron(expression: str) -> str:
    """Validate a cron expression and return it in KFP's 6-field form (seconds first).

    A classic 5-field expression gets ``"0 "`` prefixed (at second 0). ``@daily``-style
    descriptors and ``@every 1h30m`` pass unchanged, as robfig/cron accepts them.
    Raises :class:`CronError` with a one-line explanation otherwise.
    """
    text = " ".join(expression.split())
    if not text:
        raise CronError(f"empty cron expression: {_CRON_HINT}")
    if text.startswith("@"):
        if text.lower() in _DESCRIPTORS or _EVERY.match(text):
            return text
        raise CronError(f"invalid cron expression {expression!r}: unknown descriptor; {_CRON_HINT}")
    fields = text.split(" ")
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise CronError(
            f"invalid cron expression {expression!r}: {len(fields)} fields; {_CRON_HINT}"
        )
    for value, (what, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        try:
            _check_cron_field(value, what, low, high, names)
        except CronError as exc:
            raise CronError(
                f"invalid cron expression {expression!r}: {exc}; {_CRON_HINT}"
            ) from None
    return " ".join(fields)


# --------------------------------------------------------------------------------------------
# Connection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionOptions:
    """How to reach and authenticate to the KFP API."""

    host: str | None = None
    namespace: str | None = None
    existing_token: str | None = None
    cookies: str | None = None
    ui_host: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    ssl_ca_cert: str | None = None  # CA bundle for an https host with a private CA


@dataclass
class KfpConnection:
    """A checked :class:`kfp.Client` plus what the commands need to know about the server."""

    client: Any  # kfp.Client (typed loosely: kfp is imported lazily)
    host: str
    ui_host: str
    namespace: str | None  # the profile namespace in multi-user mode, else None
    multi_user: bool


def resolve_host(host: str | None, environ: Mapping[str, str] = os.environ) -> str:
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


def _check_reachable(host: str, timeout: float) -> None:
    """One TCP connect with a deadline, so a dead or filtered host fails fast and clearly."""
    parsed = urllib.parse.urlsplit(host)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise SubmitError(_unreachable(host, reason)) from None


def _unreachable(host: str, reason: str) -> str:
    return (
        f"cannot reach Kubeflow Pipelines at {host} ({reason}): check --host/KFP_HOST, "
        "the port-forward or the VPN"
    )


def _service_account_credentials(environ: Mapping[str, str]) -> Any | None:
    """kfp's projected-token credentials when a token file is there (pods), else None."""
    explicit = environ.get(SA_TOKEN_ENV)
    path = explicit or SA_TOKEN_DEFAULT_PATH
    if not Path(path).is_file():
        if explicit:
            raise SubmitError(f"{SA_TOKEN_ENV}={explicit} does not exist or is not a file")
        return None
    from kfp.client import ServiceAccountTokenVolumeCredentials

    return ServiceAccountTokenVolumeCredentials(path)


def _bounded_client_class() -> type:
    """A kfp.Client whose every request has a deadline and whose health check is one try.

    Out of the box, kfp_server_api sends ``timeout=None`` (wait forever) on every request, its
    urllib3 pool retries reads three times, and ``kfp.Client()`` calls ``get_kfp_healthz``,
    which retries 5 times 5 s apart (logging a traceback each time) on any HTTP error such as
    a 401. This subclass defers that check until construction is over, then swaps in a REST
    client that applies ``(timeout, timeout)`` (connect, read) to each request and does not
    retry reads, and answers ``get_kfp_healthz`` with one such request, checked to be JSON.
    """
    import kfp
    import kfp_server_api
    import urllib3
    from kfp_server_api.rest import RESTClientObject

    class DeadlineRESTClient(RESTClientObject):  # type: ignore[misc]
        """RESTClientObject whose requests default to a (connect, read) timeout."""

        def __init__(self, configuration: Any, timeout: float) -> None:
            super().__init__(configuration)
            self._deadline = (timeout, timeout)

        def request(
            self,
            method: str,
            url: str,
            query_params: Any = None,
            headers: Any = None,
            body: Any = None,
            post_params: Any = None,
            _preload_content: bool = True,
            _request_timeout: Any = None,
        ) -> Any:
            return super().request(
                method,
                url,
                query_params=query_params,
                headers=headers,
                body=body,
                post_params=post_params,
                _preload_content=_preload_content,
                _request_timeout=_request_timeout or self._deadline,
            )

    class BoundedClient(kfp.Client):  # type: ignore[misc]
        """kfp.Client with request deadlines and a single, checked ``get_kfp_healthz``."""

        def __init__(self, *, request_timeout: float, **kwargs: Any) -> None:
            self._healthz: Any = None
            self._constructing = True
            super().__init__(**kwargs)
            self._constructing = False
            api_client = self._healthz_api.api_client  # shared by every service API
            api_client.configuration.retries = urllib3.Retry(
                total=None, connect=2, read=0, redirect=5, status=0, other=0
            )
            api_client.rest_client = DeadlineRESTClient(api_client.configuration, request_timeout)

        def get_kfp_healthz(self, sleep_duration: int = 5) -> Any:
            if self._constructing:  # kfp.Client.__init__ asks; the real check comes after
                return kfp_server_api.V2beta1GetHealthzResponse(multi_user=False)
            if self._healthz is None:
                response = self._healthz_api.healthz_service_get_healthz(_preload_content=False)
                body = response.data or b""
                content_type = response.headers.get("content-type", "")
                try:
                    data = json.loads(body) if "json" in content_type else None
                except ValueError:
                    data = None
                if not isinstance(data, dict):
                    raise SubmitError(
                        f"{self._existing_config.host} answered with "
                        f"{content_type or 'no content type'}, not the KFP API "
                        "(a login page?): " + _AUTH_HINT
                    )
                self._healthz = kfp_server_api.V2beta1GetHealthzResponse(
                    multi_user=bool(data.get("multi_user", False)),
                    pipeline_store=data.get("pipeline_store"),
                )
            return self._healthz

    return BoundedClient


def _pod_namespace() -> str | None:
    """The namespace of the pod this runs in (what kfp.Client uses in multi-user mode)."""
    import kfp

    try:
        return Path(kfp.Client._NAMESPACE_PATH).read_text().strip() or None
    except OSError:
        return None


def connect(options: ConnectionOptions, environ: Mapping[str, str] = os.environ) -> KfpConnection:
    """Build a :class:`kfp.Client`, check the API answers and the credentials are accepted."""
    host = resolve_host(options.host, environ)
    _check_reachable(host, options.timeout)
    kwargs: dict[str, Any] = {
        "host": host,
        "ui_host": options.ui_host or host,
        "existing_token": options.existing_token,
        "cookies": options.cookies,
        "ssl_ca_cert": options.ssl_ca_cert,
    }
    if not options.existing_token:
        kwargs["credentials"] = _service_account_credentials(environ)
    # The namespace is handed to each call instead (and only in multi-user mode), so the
    # client's own default ('kubeflow') stays: it is only used for the in-cluster DNS name.
    client = _bounded_client_class()(request_timeout=options.timeout, **kwargs)
    healthz = client.get_kfp_healthz()
    multi_user = bool(healthz.multi_user)
    namespace: str | None = None
    if multi_user:
        namespace = options.namespace or client.get_user_namespace() or _pod_namespace()
        if not namespace:
            raise SubmitError(
                f"{host} is a multi-user Kubeflow: pass your profile namespace with "
                "--namespace/KFP_NAMESPACE"
            )
    elif options.namespace:
        _note(f"single-user Kubeflow Pipelines at {host}: namespace {options.namespace} unused")
    ui_host = (options.ui_host or host).rstrip("/")
    return KfpConnection(client, host, ui_host, namespace, multi_user)


@contextlib.contextmanager
def _kfp_session() -> Iterator[None]:
    """Hush kfp's FutureWarning about server versions and send kfp's own prints to stderr."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _note(message: str) -> None:
    print(message, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Pipeline, version, experiment, recurring runs
# --------------------------------------------------------------------------------------------


def _name_filter(name: str) -> str:
    # The exact shape kfp.Client sends (operation 1 is EQUALS in filter.proto).
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


def find_pipeline_id(conn: KfpConnection, name: str) -> str | None:
    """The id of the pipeline called ``name`` (in the profile namespace in multi-user mode)."""
    found = [
        p.pipeline_id
        for p in _paged(
            lambda token: conn.client.list_pipelines(
                page_token=token,
                page_size=_PAGE_SIZE,
                filter=_name_filter(name),
                namespace=conn.namespace,
            ),
            "pipelines",
        )
        if name in (p.display_name, p.name)
    ]
    if len(found) > 1:
        raise SubmitError(f"{len(found)} pipelines are called {name!r}: delete the extra ones")
    return found[0] if found else None


def find_version(conn: KfpConnection, pipeline_id: str, version_name: str) -> Any | None:
    """The version called ``version_name`` of a pipeline, or None."""
    for version in _paged(
        lambda token: conn.client.list_pipeline_versions(
            pipeline_id,
            page_token=token,
            page_size=_PAGE_SIZE,
            filter=_name_filter(version_name),
        ),
        "pipeline_versions",
    ):
        if version_name in (version.display_name, version.name):
            return version
    return None


@dataclass(frozen=True)
class PipelineVersionRef:
    """Where a package lives on the server."""

    pipeline_id: str
    version_id: str
    version_name: str
    uploaded_pipeline: bool
    uploaded_version: bool


@contextlib.contextmanager
def _unless_conflict() -> Iterator[None]:
    """Swallow an HTTP 409 (it already exists), so the caller looks it up instead."""
    import kfp_server_api

    try:
        yield
    except kfp_server_api.ApiException as exc:
        if exc.status != 409:
            raise
        _note(f"already exists (HTTP 409), looking it up: {_api_message(exc.body)}")


def ensure_pipeline_version(
    conn: KfpConnection,
    package: PipelinePackage,
    pipeline_name: str,
    version_name: str,
    description: str = DEFAULT_DESCRIPTION,
) -> PipelineVersionRef:
    """Upload the pipeline (first time) and the version (unless that name is already there).

    A version of the same name whose description records another package hash is an error:
    the server would otherwise run stale code under the requested name.
    """
    client = conn.client
    pipeline_id: str | None = find_pipeline_id(conn, pipeline_name)
    uploaded_pipeline = False
    if pipeline_id is None:
        with _unless_conflict():  # 409: a concurrent submit created it meanwhile
            pipeline = client.upload_pipeline(
                str(package.path),
                pipeline_name=pipeline_name,
                description=f"{description} ({_HASH_MARK}{package.sha256})",
                namespace=conn.namespace,
            )
            pipeline_id = pipeline.pipeline_id
            uploaded_pipeline = True
            _note(f"pipeline {pipeline_name}: created (id {pipeline_id})")
        pipeline_id = pipeline_id or find_pipeline_id(conn, pipeline_name)
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
        _note(f"version {version_name}: already uploaded (id {version.pipeline_version_id})")
        return PipelineVersionRef(
            pipeline_id, version.pipeline_version_id, version_name, uploaded_pipeline, False
        )
    uploaded = None
    with _unless_conflict():
        uploaded = client.upload_pipeline_version(
            str(package.path),
            pipeline_version_name=version_name,
            pipeline_id=pipeline_id,
            description=f"{_HASH_MARK}{package.sha256}",
        )
        _note(f"version {version_name}: uploaded (id {uploaded.pipeline_version_id})")
    version = uploaded or find_version(conn, pipeline_id, version_name)
    if version is None:
        raise SubmitError(f"version {version_name} could not be uploaded nor found")
    return PipelineVersionRef(
        pipeline_id, version.pipeline_version_id, version_name, uploaded_pipeline, bool(uploaded)
    )


def ensure_experiment(conn: KfpConnection, name: str) -> str:
    """The id of the experiment ``name``, created when missing."""
    experiment = conn.client.create_experiment(name, namespace=conn.namespace)
    return str(experiment.experiment_id)


def find_recurring_runs(conn: KfpConnection, job_name: str) -> list[Any]:
    """All recurring runs whose display name is ``job_name``."""
    return [
        rr
        for rr in _paged(
            lambda token: conn.client.list_recurring_runs(
                page_token=token,
                page_size=_PAGE_SIZE,
                namespace=conn.namespace,
                filter=_name_filter(job_name),
            ),
            "recurring_runs",
        )
        if rr.display_name == job_name
    ]


# --------------------------------------------------------------------------------------------
# The three commands
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineOptions:
    """What to upload and how to run it."""

    package: str = DEFAULT_PACKAGE
    pipeline_name: str = DEFAULT_PIPELINE_NAME
    version: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    pipeline_root: str | None = None
    params: Sequence[str] = field(default_factory=tuple)
    service_account: str | None = None


@dataclass(frozen=True)
class SubmitResult:
    """A started run."""

    run_id: str
    run_url: str
    experiment_id: str
    version: PipelineVersionRef


@dataclass(frozen=True)
class ScheduleResult:
    """A created recurring run and the ones it replaced."""

    recurring_run_id: str
    url: str
    cron: str
    replaced: tuple[str, ...]
    version: PipelineVersionRef


def _prepare(pipeline: PipelineOptions) -> tuple[PipelinePackage, dict[str, Any], str | None]:
    """Everything checkable offline, before any network call."""
    package = load_package(pipeline.package)
    params = resolve_params(parse_params(pipeline.params), package)
    check_run_parameters(package, params)
    return package, params, check_pipeline_root(pipeline.pipeline_root)


def submit_pipeline(
    connection: ConnectionOptions,
    pipeline: PipelineOptions,
    run_name: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> SubmitResult:
    """Upload (if needed) and start one run; see the module docstring."""
    package, params, root = _prepare(pipeline)
    version_name = pipeline.version or default_version_name(pipeline.pipeline_name, package)
    with _kfp_session():
        conn = connect(connection, environ)
        ref = ensure_pipeline_version(conn, package, pipeline.pipeline_name, version_name)
        experiment_id = ensure_experiment(conn, pipeline.experiment)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        run = conn.client.run_pipeline(
            experiment_id=experiment_id,
            job_name=run_name or f"{pipeline.pipeline_name}-{stamp}",
            params=params,
            pipeline_id=ref.pipeline_id,
            version_id=ref.version_id,
            pipeline_root=root,
            service_account=pipeline.service_account,
        )
    run_id = str(run.run_id)
    return SubmitResult(run_id, f"{conn.ui_host}/#/runs/details/{run_id}", experiment_id, ref)


def schedule_pipeline(
    connection: ConnectionOptions,
    pipeline: PipelineOptions,
    cron: str,
    job_name: str = DEFAULT_JOB_NAME,
    environ: Mapping[str, str] = os.environ,
) -> ScheduleResult:
    """Upload (if needed) and replace the recurring run ``job_name`` by one on ``cron``."""
    kfp_cron = to_kfp_cron(cron)
    package, params, root = _prepare(pipeline)
    version_name = pipeline.version or default_version_name(pipeline.pipeline_name, package)
    with _kfp_session():
        conn = connect(connection, environ)
        ref = ensure_pipeline_version(conn, package, pipeline.pipeline_name, version_name)
        experiment_id = ensure_experiment(conn, pipeline.experiment)
        replaced = []
        for old in find_recurring_runs(conn, job_name):
            conn.client.delete_recurring_run(old.recurring_run_id)
            replaced.append(str(old.recurring_run_id))
            _note(f"recurring run {job_name}: deleted the previous one (id {old.recurring_run_id})")
        recurring = conn.client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=job_name,
            description=f"{pipeline.pipeline_name} {version_name} on cron {kfp_cron!r}",
            cron_expression=kfp_cron,
            max_concurrency=1,
            no_catchup=True,
            params=params,
            pipeline_id=ref.pipeline_id,
            version_id=ref.version_id,
            enabled=True,
            pipeline_root=root,
            service_account=pipeline.service_account,
        )
    rr_id = str(recurring.recurring_run_id)
    url = f"{conn.ui_host}/#/recurringrun/details/{rr_id}"
    return ScheduleResult(rr_id, url, kfp_cron, tuple(replaced), ref)


def unschedule_pipeline(
    connection: ConnectionOptions,
    job_name: str = DEFAULT_JOB_NAME,
    environ: Mapping[str, str] = os.environ,
) -> list[str]:
    """Delete every recurring run called ``job_name``; return their ids (empty: none found)."""
    with _kfp_session():
        conn = connect(connection, environ)
        deleted = []
        for old in find_recurring_runs(conn, job_name):
            conn.client.delete_recurring_run(old.recurring_run_id)
            deleted.append(str(old.recurring_run_id))
    return deleted


# --------------------------------------------------------------------------------------------
# Errors → one line
# --------------------------------------------------------------------------------------------


def _one_line(value: object, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _api_message(body: Any) -> str:
    """The human part of a KFP error body (grpc-gateway ``message`` or upload ``error_message``)."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return _one_line(body) if body else ""
    if isinstance(data, dict):
        for key in ("message", "error_message", "error"):
            if data.get(key):
                return _one_line(data[key])
    return _one_line(body)


def describe_error(exc: BaseException, host: str | None) -> str | None:
    """The one-line message for a known failure, or None for an unexpected one."""
    import kfp_server_api
    import urllib3

    where = host or "the Kubeflow Pipelines API"
    if isinstance(exc, SubmitError):
        return str(exc)
    if isinstance(exc, AttributeError) and isinstance(exc.__context__, kfp_server_api.ApiException):
        exc = exc.__context__  # kfp_server_api fails decoding the None body of a TLS error
    if isinstance(exc, kfp_server_api.ApiException):
        status = exc.status or 0
        message = _api_message(exc.body)
        if status in (401, 403):
            reason = "rejected the credentials" if status == 401 else "denied access"
            return f"{where} {reason} (HTTP {status} {exc.reason}{': ' + message if message else ''}): {_AUTH_HINT}"
        if status == 0:
            reason = _one_line(exc.reason, 160)
            hint = (
                " (pass the CA bundle with --ssl-ca-cert/KFP_SSL_CA_CERT)"
                if "SSL" in reason
                else ""
            )
            return f"request to {where} failed: {reason}{hint}"
        if status == 404:
            return f"{where} has no such KFP v2beta1 endpoint (HTTP 404): is --host the KFP API of Kubeflow Pipelines >= 2.0?{' ' + message if message else ''}"
        return f"{where} answered HTTP {status} {exc.reason}: {message or 'no details'}"
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return (
            f"{where} accepted the connection but did not answer in time: check the server, "
            "or raise --timeout/KFP_TIMEOUT"
        )
    if isinstance(exc, urllib3.exceptions.SSLError):
        return (
            f"TLS with {where} failed ({_one_line(exc, 160)}): use http:// for a plain-HTTP "
            "endpoint such as a port-forward, or pass the CA bundle with --ssl-ca-cert/KFP_SSL_CA_CERT"
        )
    if isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError):
        errno_text = re.search(r"\[Errno -?\d+\] ([^')\]]+)", str(exc))
        return _unreachable(where, errno_text.group(1) if errno_text else _one_line(exc, 120))
    if isinstance(exc, OSError) and exc.filename:
        return f"cannot read {exc.filename}: {exc.strerror}"
    if isinstance(exc, ValueError):  # kfp's own checks (e.g. duplicate experiment names)
        return _one_line(exc)
    return None


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _env(environ: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = environ.get(name, "")
    return value if value.strip() else default


def build_parser(environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    """The ``submit`` / ``schedule`` / ``unschedule`` CLI; defaults come from ``environ``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.submit",
        description="Submit, schedule or unschedule the compiled car-classifier pipeline on "
        "Kubeflow Pipelines (KFP v2 API).",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one error line"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def connection_args(sub: argparse.ArgumentParser) -> None:
        group = sub.add_argument_group("connection")
        group.add_argument(
            "--host",
            default=_env(environ, "KFP_HOST"),
            help="KFP API base URL, e.g. http://localhost:8080 (env KFP_HOST; in a pod default "
            f"{IN_CLUSTER_HOST})",
        )
        group.add_argument(
            "--namespace",
            default=_env(environ, "KFP_NAMESPACE"),
            help="profile namespace for multi-user Kubeflow (env KFP_NAMESPACE)",
        )
        group.add_argument(
            "--existing-token",
            default=_env(environ, "KFP_TOKEN"),
            help="bearer token sent as 'Authorization: Bearer ...' (env KFP_TOKEN)",
        )
        group.add_argument(
            "--cookies",
            default=_env(environ, "KFP_COOKIES"),
            help="Cookie header, e.g. 'authservice_session=...' (env KFP_COOKIES)",
        )
        group.add_argument(
            "--ui-host",
            default=_env(environ, "KFP_UI_HOST"),
            help="base URL of the KFP UI for printed links (env KFP_UI_HOST; default --host)",
        )
        group.add_argument(
            "--ssl-ca-cert",
            default=_env(environ, "KFP_SSL_CA_CERT"),
            help="CA bundle to verify an https host (env KFP_SSL_CA_CERT)",
        )
        group.add_argument(
            "--timeout",
            type=float,
            default=_env(environ, "KFP_TIMEOUT", str(DEFAULT_TIMEOUT_S)),
            help="seconds to wait on the network per step (env KFP_TIMEOUT; default %(default)s)",
        )

    def pipeline_args(sub: argparse.ArgumentParser) -> None:
        group = sub.add_argument_group("pipeline")
        group.add_argument(
            "--package",
            default=_env(environ, "PIPELINE_PACKAGE", DEFAULT_PACKAGE),
            help="compiled pipeline YAML (env PIPELINE_PACKAGE; default %(default)s)",
        )
        group.add_argument(
            "--pipeline-name",
            default=_env(environ, "PIPELINE_NAME", DEFAULT_PIPELINE_NAME),
            help="pipeline name on the server (env PIPELINE_NAME; default %(default)s)",
        )
        group.add_argument(
            "--version",
            default=_env(environ, "PIPELINE_VERSION"),
            help="pipeline version name (env PIPELINE_VERSION; default NAME-<sha256 of the "
            "package, 12 hex>, so an unchanged package is not uploaded again)",
        )
        group.add_argument(
            "--experiment",
            default=_env(environ, "EXPERIMENT", DEFAULT_EXPERIMENT),
            help="experiment, created if missing (env EXPERIMENT; default %(default)s)",
        )
        group.add_argument(
            "--pipeline-root",
            default=_env(environ, "PIPELINE_ROOT"),
            help="artifact root URI, e.g. gs://BUCKET/kfp-root (env PIPELINE_ROOT; default: "
            "the server's)",
        )
        group.add_argument(
            "--param",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="pipeline parameter, repeatable; VALUE is a YAML scalar (3, 0.5, true, text)",
        )
        group.add_argument(
            "--service-account",
            default=_env(environ, "KFP_SERVICE_ACCOUNT"),
            help="Kubernetes service account of the run's pods (env KFP_SERVICE_ACCOUNT)",
        )

    def job_arg(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--job-name",
            default=_env(environ, "JOB_NAME", DEFAULT_JOB_NAME),
            help="recurring run name (env JOB_NAME; default %(default)s)",
        )

    submit = commands.add_parser("submit", help="upload the package if needed and start a run")
    connection_args(submit)
    pipeline_args(submit)
    submit.add_argument("--run-name", help="run name (default PIPELINE-NAME-<UTC time>)")

    schedule = commands.add_parser(
        "schedule", help="upload if needed and (re)create the recurring run on a cron"
    )
    connection_args(schedule)
    pipeline_args(schedule)
    schedule.add_argument(
        "--cron",
        default=_env(environ, "CRON"),
        help='cron, 5 fields ("0 3 * * 0") or KFP\'s 6 with seconds first (env CRON)',
    )
    job_arg(schedule)

    unschedule = commands.add_parser("unschedule", help="delete the recurring run(s) of a name")
    connection_args(unschedule)
    job_arg(unschedule)
    return parser


def _connection_options(args: argparse.Namespace) -> ConnectionOptions:
    if not args.timeout > 0:
        raise SubmitError(f"bad --timeout {args.timeout}: must be a positive number of seconds")
    return ConnectionOptions(
        host=args.host,
        namespace=args.namespace,
        existing_token=args.existing_token,
        cookies=args.cookies,
        ui_host=args.ui_host,
        timeout=args.timeout,
        ssl_ca_cert=args.ssl_ca_cert,
    )


def _pipeline_options(args: argparse.Namespace) -> PipelineOptions:
    return PipelineOptions(
        package=args.package,
        pipeline_name=args.pipeline_name,
        version=args.version,
        experiment=args.experiment,
        pipeline_root=args.pipeline_root,
        params=tuple(args.param),
        service_account=args.service_account,
    )


def _run(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> None:
    connection = _connection_options(args)
    if args.command == "submit":
        result = submit_pipeline(connection, _pipeline_options(args), args.run_name, environ)
        print(f"run id: {result.run_id}", file=out)
        print(f"run link: {result.run_url}", file=out)
    elif args.command == "schedule":
        if not args.cron:
            raise SubmitError(f"no schedule: pass --cron or set CRON; {_CRON_HINT}")
        scheduled = schedule_pipeline(
            connection, _pipeline_options(args), args.cron, args.job_name, environ
        )
        verb = "replaced" if scheduled.replaced else "created"
        print(f"recurring run {args.job_name} {verb}: cron {scheduled.cron!r}", file=out)
        print(f"recurring run id: {scheduled.recurring_run_id}", file=out)
        print(f"recurring run link: {scheduled.url}", file=out)
    else:
        deleted = unschedule_pipeline(connection, args.job_name, environ)
        if deleted:
            print(f"deleted recurring run {args.job_name}: {', '.join(deleted)}", file=out)
        else:
            print(f"no recurring run named {args.job_name}: nothing to delete", file=out)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 error)."""
    environ = os.environ if environ is None else environ
    args = build_parser(environ).parse_args(argv)
    try:
        _run(args, environ, sys.stdout)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        host = getattr(args, "host", None)
        message = describe_error(exc, host)
        if message is None:
            message = (
                f"unexpected {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the "
                "traceback)"
            )
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
