"""The model server as a real process (``carclassifier serve``, waitress on 127.0.0.1), and its
deployment: the Deployment + Service manifests (the image: tests/test_images.py)."""

from __future__ import annotations

import copy
import io
import json
import re
import socket
import subprocess
import sys
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import kubernetes_validate
import pytest
import yaml
from serving_support import (
    CLASSES,
    ROOT,
    export_fixture,
    get_json,
    jpeg_bytes,
    photos,
    running_server,
)
from test_docker_manifests import (
    K8S_VERSIONS,
    MANIFESTS,
    NAMESPACE,
    SERVING_SA,
    load_yaml_documents,
    rendered,
)

SERVE_DOCKERFILE = ROOT / "docker" / "serve.Dockerfile"
DEPLOYMENT = MANIFESTS / "serving-deployment.yaml"
SERVICE = MANIFESTS / "serving-service.yaml"


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body with one ``file`` part per item, and its content type."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, data in files:
        body.write(f"--{boundary}\r\n".encode())
        body.write(f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'.encode())
        body.write(b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def post(url: str, body: bytes, content_type: str) -> tuple[int, str, bytes]:
    """Status, content type and body of a POST (error statuses included)."""
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    export = export_fixture(folder)
    with running_server(
        export, folder / "server.log", "--max-upload-mib", "1", "--max-files", "4"
    ) as running:
        yield running


def test_serves_real_photos_and_logs_start_up_and_requests(server, tmp_path):
    pictures = photos(tmp_path, 3)
    body, ctype = multipart([(p.name, p.read_bytes()) for p in pictures])
    status, _, raw = post(f"{server.url}/v1/predict", body, ctype)
    assert status == 200, raw
    predictions = json.loads(raw)["predictions"]
    assert [p["file"] for p in predictions] == [p.name for p in pictures]
    for prediction in predictions:
        probs = [t["probability"] for t in prediction["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        assert {t["class"] for t in prediction["top"]} <= set(CLASSES)
    assert get_json(f"{server.url}/v1/model")[1]["classes"] == CLASSES
    log = server.log()
    assert re.search(r"model \S+export, backend auto", log), log
    assert re.search(r"ready: serving \S+export \(onnx backend\)", log), log
    assert re.search(r"POST /v1/predict 200 [\d.]+ ms 3 images", log), log
    assert "Serving on" in log or "listening on http://127.0.0.1" in log


def test_bad_input_over_http_and_the_server_keeps_answering(server):
    url = f"{server.url}/v1/predict"
    cases = [
        (multipart([("notes.txt", b"plain text, not a photo")]), 400, "not_an_image"),
        (multipart([("cut.jpg", jpeg_bytes((400, 300))[:2000])]), 400, "corrupt_image"),
        (multipart([(f"{i}.jpg", jpeg_bytes(seed=i)) for i in range(5)]), 413, "too_many_files"),
        (multipart([("big.jpg", b"\xff" * 1_200_000)]), 413, "upload_too_large"),
        ((b"", "image/jpeg"), 400, "empty_body"),
        ((jpeg_bytes(), "image/jpeg"), 415, "unsupported_media_type"),
    ]
    for (body, ctype), status, code in cases:
        got, content_type, raw = post(url, body, ctype)
        assert (got, content_type) == (status, "application/json"), (code, raw[:200])
        assert json.loads(raw)["error"]["code"] == code
    # Far beyond the limit waitress refuses the body from its Content-Length, before reading it.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 500000000\r\n\r\n" + b"\0" * 1000
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 413 ")
    assert get_json(f"{server.url}/healthz") == (200, {"status": "ok"})
    assert post(url, *multipart([("ok.jpg", jpeg_bytes())]))[0] == 200
    text = urllib.request.urlopen(f"{server.url}/metrics", timeout=5).read().decode()
    assert 'carclassifier_http_errors_total{code="too_many_files",route="/v1/predict"} 1.0' in text


def test_concurrent_requests_all_answered(server):
    body, ctype = multipart([("a.jpg", jpeg_bytes(seed=7))])
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: post(f"{server.url}/v1/predict", body, ctype), range(16)))
    assert [r[0] for r in results] == [200] * 16
    assert len({r[2] for r in results}) == 1  # the same image, the same answer


def test_sigterm_stops_the_server_cleanly(server):
    """Last of the tests on the module's server: Kubernetes stops a pod with SIGTERM."""
    server.process.terminate()
    assert server.process.wait(timeout=30) == 0
    assert server.log().rstrip().endswith("stopped")


def test_a_model_that_cannot_load_stops_the_server_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "carclassifier.cli", "serve", "--model", str(tmp_path / "none")]
        + ["--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "error: export folder" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_load_failure_after_start_up_stops_serve_with_the_error(tmp_path, monkeypatch):
    """The model loads in the background while the server already listens; when loading fails,
    serve() stops and raises the loader's error (the CLI prints it in one line)."""
    from PIL import Image

    from carclassifier.errors import StorageError
    from carclassifier.serving.config import ServingConfig
    from carclassifier.serving.server import serve

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # serve() sets it
    (tmp_path / "labels.json").write_text("{not json")
    with pytest.raises(StorageError, match="labels.json of .* is not readable JSON"):
        serve(ServingConfig(model=str(tmp_path), port=0))


# --------------------------------------------------------------------------- manifests


def rendered_serving() -> tuple[dict, dict]:
    docs = rendered()
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    return deployment, service


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_serving_manifests_are_valid_kubernetes(version):
    for doc in rendered_serving():
        kubernetes_validate.validate(doc, desired_version=version, strict=True)
    deployment, _ = rendered_serving()
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFS"] = True  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, desired_version=version, strict=True)


def test_deployment_is_locked_down_and_probed():
    deployment, service = rendered_serving()
    assert deployment["metadata"]["namespace"] == NAMESPACE
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == SERVING_SA
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    resources = container["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert f"--port={port}" in container["args"] and "--host=0.0.0.0" in container["args"]
    model = [a for a in container["args"] if a.startswith("--model=")]
    assert model == ["--model=gs://REPLACE_ME/carclassifier/serving"]
    # The Service reaches these pods by the pod labels, on the named port.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_the_cli_accepts_the_deployment_arguments_and_the_image_defaults():
    from carclassifier.cli import build_parser

    deployment, _ = rendered_serving()
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = build_parser().parse_args(["serve", *args])
    assert parsed.model == "gs://REPLACE_ME/carclassifier/serving" and parsed.port == 8080
    # The image's own defaults: tests/test_images.py::test_serve_image_config (the built image).


def test_both_servers_read_the_same_export_layout(tmp_path):
    """The web app takes the export folder; the InferenceService a folder of numbered SavedModel
    versions, which the export's saved_model/ is."""
    export = export_fixture(tmp_path)
    assert (export / "saved_model" / "1" / "saved_model.pb").is_file()
    assert (export / "model.keras").is_file() and (export / "labels.json").is_file()
    (isvc,) = load_yaml_documents(MANIFESTS / "inferenceservice.yaml")
    assert isvc["spec"]["predictor"]["model"]["modelFormat"]["name"] == "tensorflow"
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert {DEPLOYMENT.name, SERVICE.name} <= set(kustomization["resources"])
