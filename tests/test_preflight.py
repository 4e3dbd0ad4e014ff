"""``python -m pipelines preflight`` with the real clients against local servers.

* Kubernetes and KFP: the unmodified kubernetes Python client (from a kubeconfig) and kfp.Client
  talk to a server replaying tests/data/preflight_conversation.json, whose Kubernetes objects
  are checked against the Kubernetes 1.33 OpenAPI schema here;
* GCS: google-cloud-storage against gcp-storage-emulator (tests/conftest.py);
* the image: the registry v2 API (``HEAD /v2/<name>/manifests/<tag>`` after a Bearer token
  challenge) of a tiny local registry.

What only a real cluster can confirm: that the GKE metadata server really hands the pods the
annotated Google account (Workload Identity), that the nodes can pull the image (here only
the local credentials are tried), and that the KFP version the healthz reports is the one
whose driver runs the pods.
"""

import copy
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import write_kubeconfig

REPO = Path(__file__).resolve().parents[1]
CONVERSATION = json.loads((REPO / "tests/data/preflight_conversation.json").read_text())
IMAGE_PATH = "carclassifier/trainer"
TAG = "1.0"


class Replay:
    """A local HTTP server answering (method, path?query) from a list of exchanges; it records
    the requests, answers 404 to anything else, and serves a small registry under /v2/."""

    def __init__(self, exchanges: list[dict]) -> None:
        self.exchanges = {(e["method"], e["path"]): e for e in exchanges}
        self.seen: list[tuple[str, str, dict]] = []
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, body: object = None, headers: dict | None = None):
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                replay.seen.append((self.command, self.path, dict(self.headers)))
                if self.path.startswith(("/v2/", "/token")):
                    return self._registry()
                exchange = replay.exchanges.get((self.command, self.path))
                if exchange is None:
                    return self._answer(404, {"kind": "Status", "code": 404, "message": "no such"})
                return self._answer(exchange["status"], exchange["body"])

            do_HEAD = do_GET

            def _registry(self) -> None:
                """Docker token auth: 401 + challenge, token endpoint, then the manifest."""
                if self.path.startswith("/token"):
                    return self._answer(200, {"token": "pull-token"})
                if self.headers.get("Authorization") != "Bearer pull-token":
                    realm = f"http://{self.headers['Host']}/token"
                    challenge = f'Bearer realm="{realm}",service="registry",scope="repository:{IMAGE_PATH}:pull"'
                    return self._answer(401, {"errors": []}, {"WWW-Authenticate": challenge})
                if self.path == f"/v2/{IMAGE_PATH}/manifests/{TAG}":
                    digest = "sha256:" + "0" * 64
                    return self._answer(200, None, {"Docker-Content-Digest": digest})
                return self._answer(404, {"errors": [{"code": "MANIFEST_UNKNOWN"}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.netloc = self.url.removeprefix("http://")
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pipelines.car_classifier import compile_pipeline

    out = tmp_path_factory.mktemp("pf") / "p.yaml"
    return compile_pipeline(REPO / "configs/recipe_b6.yaml", out, "IMAGE-HERE").read_text()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Replay, dict]]:
    server = Replay(copy.deepcopy(CONVERSATION["exchanges"]))
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url, "kube-token")
    yield server, {"KUBECONFIG": str(kubeconfig), "KFP_HOST": server.url}
    server.close()


def run_preflight(package: Path, environ: dict, *args: str) -> tuple[int, list[str]]:
    import contextlib
    import io

    from pipelines.__main__ import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["preflight", "--package", str(package), *args], environ=environ)
    return rc, out.getvalue().splitlines()


def _package(tmp_path: Path, compiled: str, image: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(compiled.replace("IMAGE-HERE", image))
    return path


def test_the_conversation_is_made_of_valid_kubernetes_objects() -> None:
    """Every Kubernetes answer replayed here is a valid object of its kind (strict schema of
    Kubernetes 1.33, kubernetes-validate), so the real client parses what a cluster sends."""
    import kubernetes_validate

    objects = [e["body"] for e in CONVERSATION["exchanges"] if e["path"].startswith("/api/v1")]
    objects = [o for o in objects if o["kind"] != "Status"]
    objects += [item for o in objects if o["kind"].endswith("List") for item in o["items"]]
    for obj in objects:
        kubernetes_validate.validate(obj, desired_version="1.33", strict=True)


def test_a_ready_cluster_passes(
    cluster: tuple[Replay, dict], bucket: Any, compiled: str, tmp_path: Path
) -> None:
    server, environ = cluster
    package = _package(tmp_path, compiled, f"{server.netloc}/{IMAGE_PATH}:{TAG}")
    root = f"gs://{bucket.name}/kfp"
    rc, lines = run_preflight(
        package, environ, "--pipeline-root", root, "--param", "data_source=gs://b-data/cars"
    )
    assert rc == 0, lines
    text = "\n".join(lines)
    expected = [
        "✔ run parameters and defaults fit a cluster run",
        f"✔ Kubeflow Pipelines 2.17.0 at {server.url} (standalone)",
        "✔ IR compiled for KFP 2.17.0 parses on KFP 2.17.0",
        "✔ standalone Kubeflow Pipelines: pods run in namespace kubeflow as service account "
        "carclassifier-pipeline",
        "✔ service account kubeflow/carclassifier-pipeline acts as "
        "carclassifier-pipeline@my-project.iam.gserviceaccount.com (Workload Identity)",
        "✔ secret kubeflow/gcs-credentials absent, not needed",
        "✔ secret kubeflow/kaggle-credentials absent, not needed",
        "✔ 2 node(s) with cloud.google.com/gke-accelerator=nvidia-tesla-t4 and >= 1 allocatable "
        "nvidia.com/gpu",
        f"✔ pipeline root {root} is writable with the local credentials",
        f"✔ checkpoint root {root}/checkpoints is writable with the local credentials",
        f"✔ image {server.netloc}/{IMAGE_PATH}:{TAG} exists in {server.netloc}",
    ]
    for line in expected:
        assert line in text, line
    assert lines[-1] == f"preflight: {len(lines) - 1} ok, 0 unknown, 0 failed"
    kube_calls = [(m, p) for m, p, h in server.seen if p.startswith("/api/v1")]
    assert {m for m, _ in kube_calls} == {"GET"}  # read-only
    assert all(
        h.get("authorization") == "Bearer kube-token"
        for m, p, h in server.seen
        if p.startswith("/api/v1")
    )
    from carclassifier.storage import list_names

    assert list_names(root) == []  # the probe object is gone


def test_carclassifier_preflight_runs_the_same_checks(
    cluster: tuple[Replay, dict],
    bucket: Any,
    compiled: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``carclassifier preflight`` (the library's command line) runs the checks of ``python -m
    pipelines preflight``, with the same environment variables, and fails with status 1 when one
    fails (here: the image is not in the registry)."""
    from carclassifier.cli import main

    server, environ = cluster
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PIPELINE_ROOT", f"gs://{bucket.name}/kfp")
    package = _package(tmp_path, compiled, f"{server.netloc}/{IMAGE_PATH}:no-such-tag")
    with pytest.raises(SystemExit) as exit_info:
        main(["preflight", "--package", str(package), "--param", "data_source=gs://b-data/cars"])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"✔ Kubeflow Pipelines 2.17.0 at {server.url} (standalone)" in lines
    assert any(
        line.startswith(f"✘ image {server.netloc}/{IMAGE_PATH}:no-such-tag") for line in lines
    )
    assert lines[-1].endswith(", 1 failed"), lines


def test_what_is_missing_is_named_with_what_to_do(
    cluster: tuple[Replay, dict], bucket: Any, compiled: str, tmp_path: Path
) -> None:
    server, environ = cluster
    sa = server.exchanges[
        ("GET", "/api/v1/namespaces/kubeflow/serviceaccounts/carclassifier-pipeline")
    ]
    del sa["body"]["metadata"]["annotations"]
    nodes = server.exchanges[
        (
            "GET",
            "/api/v1/nodes?labelSelector=cloud.google.com%2Fgke-accelerator%3Dnvidia-tesla-t4",
        )
    ]
    for node in nodes["body"]["items"]:
        node["status"]["allocatable"].pop("nvidia.com/gpu")
    package = _package(tmp_path, compiled, f"{server.netloc}/{IMAGE_PATH}:0.9")
    rc, lines = run_preflight(
        package,
        environ,
        "--pipeline-root",
        f"gs://{bucket.name}/kfp",
        "--param",
        "data_source=kaggle",
        "--param",
        "checkpoint_root=gs://no-such-bucket/ckpt",
    )
    assert rc == 1
    failed = [line for line in lines if line.startswith("✘")]
    wanted = {
        "no Workload Identity annotation": "workload-identity.sh",
        "secret kubeflow/gcs-credentials is missing": "kubectl -n kubeflow create secret",
        "secret kubeflow/kaggle-credentials is missing": "create secret generic kaggle-credentials",
        "allocatable nvidia.com/gpu": "NVIDIA driver",
        "checkpoint root": "no-such-bucket",
        f"image {server.netloc}/{IMAGE_PATH}:0.9 is not in": "make push-image",
    }
    for what, todo in wanted.items():
        assert any(what in line and todo in line for line in failed), (what, failed)
    assert len(failed) == len(wanted), failed
    ok = len(lines) - 1 - len(wanted)
    assert lines[-1] == f"preflight: {ok} ok, 0 unknown, {len(wanted)} failed"


def test_an_unreachable_kfp_and_cluster_fail_fast(compiled: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    package = _package(tmp_path, compiled, f"127.0.0.1:{port}/{IMAGE_PATH}:{TAG}")
    environ = {
        "KFP_HOST": f"http://127.0.0.1:{port}",
        "KFP_TIMEOUT": "2",
        "KUBECONFIG": str(kubeconfig),
    }
    rc, lines = run_preflight(package, environ)
    assert rc == 1
    assert any(line.startswith("✘ cannot reach Kubeflow Pipelines at") for line in lines), lines
    assert any(line.startswith("✘ Kubernetes API:") for line in lines), lines
    assert any(line.startswith("✘ image 127.0.0.1:") for line in lines), lines
    assert any("data_source is empty" in line for line in lines), lines
