"""A deployed version reaches KServe's predictor: the deploy step rolls the InferenceService.

Upstream facts this relies on (read in the sources, pinned below where a mirror is at hand:
``fetch github:kserve/kserve`` / ``github:tensorflow/serving`` put them under /work/.mirror):

* KServe v0.20.0 copies ``storageUri`` into the pod once: the storage initializer is an init
  container (pkg/webhook/admission/pod/storage_initializer_injector.go,
  ``InjectStorageInitializer``) whose entry point downloads and exits
  (python/storage-initializer/scripts/initializer-entrypoint, ``Storage.download_files``), to
  ``constants.DefaultModelLocalMountPath`` = /mnt/models, the TF Serving runtime's
  ``--model_base_path`` (config/runtimes/kserve-tensorflow-serving.yaml). A version published
  to GCS later is never seen by a running pod.
* Predictor annotations go onto the predictor Deployment's pod template
  (pkg/controller/v1beta1/inferenceservice/components/predictor.go ``buildObjectMeta``: union
  of runtime, isvc and predictor annotations; reconcilers/deployment/deployment_reconciler.go
  ``createRawDefaultDeployment``: ``Template.ObjectMeta`` = that metadata), so a new value is a
  rolling update; ``setDefaultDeploymentSpec`` gives RollingUpdate 25%/25% (one replica: a new
  pod first, the old one until the new is ready).
* TensorFlow Serving 2.20.0 serves the highest numbered child of its base path
  (tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc,
  ``AspireLatestVersions`` over ``IndexChildrenByVersion``, names parsed by
  ``ParseVersionNumber``; the default policy is Latest with one version).
"""

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import tiny_dataset, write_kubeconfig
from test_deploy import _export

from carclassifier import deploy, steps
from carclassifier.config import dump_config, load_config
from carclassifier.errors import ConfigError
from carclassifier.kubeflow import kserve
from carclassifier.kubeflow.arguments import check_arguments

MIRRORS = Path("/work/.mirror")
KSERVE = MIRRORS / "kserve+kserve" / "repo"
TF_SERVING = MIRRORS / "tensorflow+serving" / "repo"


def _upstream(repo: Path, tag: str, path: str) -> str:
    if not repo.is_dir():
        pytest.skip(f"no mirror of {repo.parent.name} here (fetch it to run this check)")
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"{tag}:{path}"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


class ApiServer:
    """A local HTTP server standing in for the Kubernetes API: it records every request and
    answers PATCH of an InferenceService with ``status`` (200: the patched object)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[tuple[str, str, str, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_PATCH(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(
                    (self.command, self.path, self.headers["Content-Type"], body)
                )
                reply = (
                    {"kind": "InferenceService", **body}
                    if server.status == 200
                    else {"kind": "Status", "code": server.status, "reason": "Forbidden"}
                )
                data = json.dumps(reply).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiServer]:
    """The real kubernetes client, configured by a kubeconfig naming the local server."""
    server = ApiServer()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


PATH = "/apis/serving.kserve.io/v1beta1/namespaces/ml/inferenceservices/carclassifier"


def test_roll_out_sends_a_merge_patch_of_one_predictor_annotation(api: ApiServer) -> None:
    assert kserve.roll_out("ml/carclassifier", 7) == "ml/carclassifier"
    ((method, path, content_type, body),) = api.requests
    assert (method, path, content_type) == ("PATCH", PATH, "application/merge-patch+json")
    assert body == {"spec": {"predictor": {"annotations": {kserve.ROLLOUT_ANNOTATION: "7"}}}}


@pytest.mark.parametrize(("status", "hint"), [(403, "manifests/rbac.yaml"), (404, "create it")])
def test_a_refused_roll_out_says_what_to_do(api: ApiServer, status: int, hint: str) -> None:
    api.status = status
    with pytest.raises(kserve.RolloutError, match=f"answered {status}.*{hint}.*version 3 is"):
        kserve.roll_out("ml/carclassifier", 3)


def test_a_bare_name_is_in_the_pods_namespace(tmp_path: Path) -> None:
    namespace = tmp_path / "namespace"
    namespace.write_text("team-a\n")
    assert kserve.parse_target("cars", namespace) == ("team-a", "cars")
    assert kserve.parse_target("ml/cars", namespace) == ("ml", "cars")
    with pytest.raises(kserve.RolloutError, match="give it as namespace/name"):
        kserve.parse_target("cars", tmp_path / "absent")


@pytest.mark.parametrize("bad", ["Cars", "1cars", "ml/", "a/b/c", "cars_1", "-ml/cars"])
def test_a_malformed_inference_service_is_refused_before_the_run(bad: str) -> None:
    recipe = dump_config(load_config(None, ["name=kserve-test"]))
    with pytest.raises(ConfigError, match="inference_service"):
        check_arguments({"inference_service": bad}, recipe, None, on_cluster=False)
    assert check_arguments({"inference_service": "ml/cars-2"}, recipe, None, on_cluster=False)


def test_the_deploy_step_publishes_once_and_rolls_the_service(
    api: ApiServer, tmp_path: Path
) -> None:
    """A retried deploy task (same export, still live) publishes no second version but rolls
    the InferenceService again; a step without inference_service calls no API."""
    recipe = dump_config(load_config(None, ["name=kserve-test"]))
    dataset = tmp_path / "dataset"
    steps.prepare_step(recipe, [], str(tiny_dataset(tmp_path / "cars")), str(dataset))
    export = str(_export(tmp_path / "export"))
    serving, checkpoints = str(tmp_path / "serving"), str(tmp_path / "ckpt")

    first = steps.deploy_step(str(dataset), export, serving, checkpoints, "k1", "ml/carclassifier")
    again = steps.deploy_step(str(dataset), export, serving, checkpoints, "k1", "ml/carclassifier")
    assert first["version"] == again["version"] == 1
    assert first["rolled_out"] == again["rolled_out"] == "ml/carclassifier"
    assert deploy.versions(serving) == [1]
    assert [body for *_, body in api.requests] == [
        {"spec": {"predictor": {"annotations": {kserve.ROLLOUT_ANNOTATION: "1"}}}}
    ] * 2

    other = str(_export(tmp_path / "other", flip=True))
    plain = steps.deploy_step(str(dataset), other, serving, checkpoints, "k2")
    assert (plain["version"], plain["rolled_out"]) == (2, None) and len(api.requests) == 2


def test_rollback_from_the_command_line_rolls_the_service_too(
    api: ApiServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``carclassifier rollback --inference-service`` republishes version 1 as 3 and rolls
    the predictor onto 3 (without the flag a KServe predictor would keep serving 2)."""
    from carclassifier.cli import main

    serving = str(tmp_path / "serving")
    for name, flip in (("a", False), ("b", True)):
        deploy.publish(str(_export(tmp_path / name, flip=flip)), serving, None)
    argv = ["rollback", "--serving-root", serving, "--version", "1"]
    assert main([*argv, "--inference-service", "ml/carclassifier"]) == 0
    assert "rolling InferenceService ml/carclassifier onto it" in capsys.readouterr().out
    assert deploy.versions(serving) == [1, 2, 3]
    assert [body for *_, body in api.requests] == [
        {"spec": {"predictor": {"annotations": {kserve.ROLLOUT_ANNOTATION: "3"}}}}
    ]


# ------------------------------------------------------------------------- upstream, pinned


def test_kserve_copies_the_model_only_when_a_pod_starts() -> None:
    entry = _upstream(
        KSERVE, "v0.20.0", "python/storage-initializer/scripts/initializer-entrypoint"
    )
    assert "Storage.download_files(src_uris, dest_paths)" in entry
    assert "while" not in entry  # downloads once and exits: no watching
    injector = _upstream(
        KSERVE, "v0.20.0", "pkg/webhook/admission/pod/storage_initializer_injector.go"
    )
    assert "params.PodSpec.InitContainers = append(params.PodSpec.InitContainers" in injector
    constants = _upstream(KSERVE, "v0.20.0", "pkg/constants/constants.go")
    assert 'DefaultModelLocalMountPath = "/mnt/models"' in constants
    runtime = _upstream(KSERVE, "v0.20.0", "config/runtimes/kserve-tensorflow-serving.yaml")
    assert "--model_base_path=/mnt/models" in runtime


def test_predictor_annotations_reach_the_pod_template() -> None:
    predictor = _upstream(
        KSERVE, "v0.20.0", "pkg/controller/v1beta1/inferenceservice/components/predictor.go"
    )
    start = predictor.index("func (p *Predictor) buildObjectMeta(")
    body = predictor[start : predictor.index("\n}\n", start)]
    assert "Annotations: utils.Union(" in body and "predictorAnnotations," in body
    reconciler = _upstream(
        KSERVE,
        "v0.20.0",
        "pkg/controller/v1beta1/inferenceservice/reconcilers/deployment/deployment_reconciler.go",
    )
    start = reconciler.index("func createRawDefaultDeployment(")
    body = reconciler[start : reconciler.index("\n}\n", start)]
    assert "podMetadata := componentMeta" in body and "ObjectMeta: podMetadata," in body
    assert 'StrVal: "25%"' in reconciler  # setDefaultDeploymentSpec: RollingUpdate 25%/25%


def test_inference_service_names_follow_kserve() -> None:
    validation = _upstream(
        KSERVE, "v0.20.0", "pkg/apis/serving/v1beta1/inference_service_validation.go"
    )
    assert 'IsvcNameFmt                         string = "[a-z]([-a-z0-9]*[a-z0-9])?"' in validation


def test_tf_serving_serves_the_highest_numbered_child() -> None:
    source = _upstream(
        TF_SERVING,
        "2.20.0",
        "tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc",
    )
    latest = source[source.index("bool AspireLatestVersions(") :]
    latest = latest[: latest.index("\n}\n")]
    assert "children_by_version.rbegin()" in latest  # from the highest number down
    assert "std::max(servable.servable_version_policy().latest().num_versions(), 1U)" in latest
    assert "absl::SimpleAtoi(version_path.c_str(), version_number)" in source
    assert "Default policy is kLatest" in source
