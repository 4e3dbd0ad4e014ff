"""The Flask app: the web page, the JSON API, health, readiness and Prometheus metrics.

    app = create_app(ServingConfig(model="runs/local/export"), predictor)   # or a ModelSlot

Routes (all JSON errors are ``{"error": {"code": ..., "message": ...}}`` with a 4xx/5xx status):

- ``GET /``: the page (upload or drop photos, top-k bars, the model's classes and metrics);
- ``POST /v1/predict``: ``multipart/form-data`` with one or more ``file`` parts, or
  ``application/json`` ``{"images": [{"name": "a.jpg", "data": "<base64>"}, ...]}``;
  ``?top_k=N`` and ``?tta=1``; all images of a request in one forward pass;
- ``GET /v1/model``: name, version, backend, classes, input size, metrics, limits;
- ``GET /healthz`` (the process answers), ``GET /readyz`` (the model is loaded: 200, else 503);
- ``GET /metrics``: Prometheus text format; ``GET /openapi.yaml``: the API description.

Uploads are read into memory only (never written to disk), bounded by ``max_upload_mib``
(``MAX_CONTENT_LENGTH``); no route takes a path from the request.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from importlib import resources
from typing import Any

import yaml
from flask import Flask, Response, g, jsonify, render_template, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from carclassifier.augment import TtaSettings
from carclassifier.serving.config import MIB, ServingConfig
from carclassifier.serving.predictor import ImageInputError, Predictor, decode_image, top_k

log = logging.getLogger(__name__)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
"""Sent with every response; the page loads nothing from outside the app."""

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiError(Exception):
    """A request the API refuses: HTTP ``status``, a short ``code`` and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ModelSlot:
    """Holds the predictor once it is loaded (``/readyz`` is 503 until then)."""

    def __init__(self, predictor: Predictor | None = None) -> None:
        self._predictor = predictor
        self.error: str | None = None
        self._ready = threading.Event()
        if predictor is not None:
            self._ready.set()

    def set(self, predictor: Predictor) -> None:
        """Make ``predictor`` the served model."""
        self._predictor = predictor
        self._ready.set()

    @property
    def predictor(self) -> Predictor | None:
        """The loaded predictor, or None while loading."""
        return self._predictor if self._ready.is_set() else None


class Metrics:
    """Prometheus metrics of one app, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "carclassifier_http_requests",
            "HTTP requests by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "carclassifier_http_request_duration_seconds",
            "Request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "carclassifier_http_errors",
            "Requests answered with an error status, by route and error code",
            ["route", "code"],
            registry=self.registry,
        )
        self.images = Counter(
            "carclassifier_images_predicted",
            "Images classified",
            registry=self.registry,
        )
        self.model_loaded = Gauge(
            "carclassifier_model_loaded", "1 once the model is loaded", registry=self.registry
        )


def _error(status: int, code: str, message: str) -> tuple[Response, int]:
    g.error_code = code
    return jsonify({"error": {"code": code, "message": message}}), status


def _flag(name: str) -> bool:
    """A 0/1 query flag (absent: 0), as ``/openapi.yaml`` declares it."""
    value = request.args.get(name, "0")
    if value not in ("0", "1"):
        raise ApiError(400, "bad_parameter", f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter of at least ``low`` (absent: ``default``); larger values than
    ``high`` are clamped to it (``top_k`` above the class count gives every class)."""
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_parameter", f"{name} must be an integer, got {raw!r}") from None
    if value < low:
        raise ApiError(400, "bad_parameter", f"{name} must be at least {low}, got {value}")
    return min(value, high)


def _uploads(config: ServingConfig) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every image in the request, in order."""
    mimetype = request.mimetype
    if not request.content_length:
        raise ApiError(
            400,
            "empty_body",
            "the request body is empty; send image(s) as multipart/form-data 'file' parts "
            'or as JSON {"images": [{"data": "<base64>"}]}',
        )
    if mimetype == "multipart/form-data":
        unexpected = sorted(k for k in request.files if k != "file")
        if unexpected:
            raise ApiError(400, "bad_field", f"unexpected form field(s) {unexpected}; use 'file'")
        files = request.files.getlist("file")
        if not files:
            raise ApiError(400, "no_files", "no 'file' part in the form; attach image(s) as 'file'")
        if len(files) > config.max_files:
            raise ApiError(
                413, "too_many_files", f"{len(files)} files; at most {config.max_files} per request"
            )
        return [(f.filename or f"file{i}", f.read()) for i, f in enumerate(files)]
    if mimetype == "application/json":
        body = request.get_json(silent=True)
        images = body.get("images") if isinstance(body, dict) else None
        if not isinstance(images, list) or not images:
            raise ApiError(
                400,
                "bad_json",
                'JSON body must be {"images": [{"name": "a.jpg", "data": "<base64>"}, ...]}',
            )
        if len(images) > config.max_files:
            raise ApiError(
                413,
                "too_many_files",
                f"{len(images)} images; at most {config.max_files} per request",
            )
        result = []
        for i, item in enumerate(images):
            if not isinstance(item, dict) or not isinstance(item.get("data"), str):
                raise ApiError(400, "bad_json", f"images[{i}] needs a base64 string 'data'")
            try:
                data = base64.b64decode(item["data"], validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "bad_base64", f"images[{i}].data is not valid base64") from None
            result.append((str(item.get("name") or f"image{i}"), data))
        return result
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {mimetype or 'missing'}; send multipart/form-data or application/json",
    )


def openapi_spec(config: ServingConfig) -> str:
    """``openapi.yaml`` with this server's limits filled in (images per request), so that the
    served description admits exactly the requests the server accepts."""
    spec = yaml.safe_load(
        resources.files("carclassifier.serving").joinpath("openapi.yaml").read_text()
    )
    content = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    content["multipart/form-data"]["schema"]["properties"]["file"]["maxItems"] = config.max_files
    content["application/json"]["schema"]["properties"]["images"]["maxItems"] = config.max_files
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)


def create_app(config: ServingConfig, model: Predictor | ModelSlot) -> Flask:
    """The Flask app serving ``model`` with the limits of ``config``."""
    slot = model if isinstance(model, ModelSlot) else ModelSlot(model)
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=config.max_upload_bytes,
        JSON_SORT_KEYS=False,
        DEBUG=False,
        TESTING=False,
    )
    metrics = Metrics()
    app.extensions["carclassifier"] = {"config": config, "slot": slot, "metrics": metrics}

    def ready() -> Predictor:
        predictor = slot.predictor
        if predictor is None:
            raise ApiError(503, "loading", slot.error or "the model is still loading; retry")
        return predictor

    @app.before_request
    def _start() -> None:
        g.start = time.perf_counter()
        g.images = 0

    @app.after_request
    def _finish(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.endpoint in ("index", "model_info", "predict"):
            response.headers.setdefault("Cache-Control", "no-store")
        elapsed = time.perf_counter() - g.get("start", time.perf_counter())
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.requests.labels(request.method, route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(elapsed)
        if response.status_code >= 400:
            metrics.errors.labels(route, g.get("error_code", str(response.status_code))).inc()
        log.info(
            "%s %s %d %.1f ms %d images",
            request.method,
            request.path,
            response.status_code,
            elapsed * 1000,
            g.get("images", 0),
        )
        return response

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> tuple[Response, int]:
        return _error(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        if status == 413 and (request.content_length or 0) > config.max_upload_bytes:
            return _error(
                413,
                "upload_too_large",
                f"the request is {request.content_length / MIB:.1f} MiB; the limit is "
                f"{config.max_upload_mib:g} MiB",
            )
        code = (exc.name or "error").lower().replace(" ", "_")
        response, status = _error(status, code, exc.description or exc.name)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))  # RFC 9110 15.5.6
        return response, status

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, "internal_error", "internal error; see the server log")

    @app.get("/")
    def index() -> str:
        predictor = slot.predictor
        tta_views = _tta(predictor, config).views if predictor is not None else config.tta_views
        return render_template(
            "index.html", config=config, model=_model_document(predictor), tta_views=tta_views
        )

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        predictor = slot.predictor
        metrics.model_loaded.set(1 if predictor is not None else 0)
        if predictor is None:
            return _error(503, "loading", slot.error or "the model is still loading")
        return jsonify({"status": "ready", "version": predictor.version}), 200

    @app.get("/metrics")
    def prometheus() -> Response:
        metrics.model_loaded.set(1 if slot.predictor is not None else 0)
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    spec_text = openapi_spec(config)

    @app.get("/openapi.yaml")
    def openapi() -> Response:
        return Response(spec_text, mimetype="application/yaml")

    @app.get("/v1/model")
    def model_info() -> Response:
        return jsonify(_model_document(ready(), config))

    @app.post("/v1/predict")
    def predict() -> Response:
        predictor = ready()
        k = _int_arg("top_k", config.top_k, 1, len(predictor.class_names))
        tta = _flag("tta")
        uploads = _uploads(config)
        images = []
        for name, data in uploads:
            try:
                images.append(decode_image(data, predictor.image_size, config.max_image_pixels))
            except ImageInputError as exc:
                raise ApiError(exc.status, exc.code, f"{name}: {exc}") from None
        g.images = len(images)
        settings = _tta(predictor, config)
        if tta:
            transform = settings.transform(predictor.image_size[0])
            probs = predictor.predict_tta(images, transform, settings.views)
        else:
            probs = predictor.predict(images)
        metrics.images.inc(len(images))
        return jsonify(
            {
                "model": {"name": predictor.name, "version": predictor.version},
                "tta": tta,
                "tta_views": settings.views if tta else 1,
                "predictions": [
                    {"file": name, "top": top}
                    for (name, _), top in zip(
                        uploads, top_k(probs, predictor.class_names, k), strict=True
                    )
                ],
            }
        )

    return app


def _tta(predictor: Predictor, config: ServingConfig) -> TtaSettings:
    """The TTA of ``?tta=1``: the export's (`Predictor.tta`), with the server's ``tta_views`` /
    ``seed`` where they are set."""
    return predictor.tta.overridden(config.tta_views, config.seed)


def _model_document(predictor: Predictor | None, config: ServingConfig | None = None) -> dict:
    """What ``/v1/model`` and the page show about the served model."""
    if predictor is None:
        return {}
    meta = dict(predictor.labels.get("metadata") or {})
    metrics = {k: v for k, v in meta.items() if isinstance(v, int | float) and k != "image_size"}
    document: dict[str, Any] = {
        "name": predictor.name,
        "version": predictor.version,
        "backend": predictor.backend,
        "uri": predictor.uri,
        "classes": predictor.class_names,
        "image_size": list(predictor.image_size),
        "input": predictor.labels.get("input"),
        "metrics": metrics,
        "metadata": meta,
    }
    if config is not None:
        document["limits"] = {
            "max_upload_mib": config.max_upload_mib,
            "max_files": config.max_files,
            "max_image_pixels": config.max_image_pixels,
            "top_k": config.top_k,
            "tta_views": _tta(predictor, config).views,
        }
    return document
