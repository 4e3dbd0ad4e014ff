"""Serving versions (carclassifier.deploy): numbered versions, the live pointer, rollback, and a
running server that follows the pointer without failing a request."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model
from serving_support import CLASSES, METADATA, SIZE, photos, running_server
from test_serving_server import multipart, post

from carclassifier import deploy, storage


def _export(folder: Path, flip: bool = False) -> Path:
    """An export of the tiny model; ``flip`` reverses its output layer (other answers)."""
    from carclassifier.export import write_export

    model = tiny_model(SIZE, len(CLASSES))
    if flip:
        dense = model.layers[-1]
        kernel, bias = dense.get_weights()
        dense.set_weights([-kernel[:, ::-1] * 5, bias[::-1]])
    return write_export(model, CLASSES, folder, METADATA)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("deploy-exports")
    return {"a": _export(base / "a"), "b": _export(base / "b", flip=True)}


def test_versions_are_numbered_live_and_rolled_back(exports, tmp_path):
    """Each publish is the next number with the SavedModel at its top (TF Serving's layout);
    the pointer names the newest; a rollback republishes an old version's files as the next
    number, so TF Serving (highest number) and the pointer both serve them."""
    root = str(tmp_path / "serving")
    first = deploy.publish(str(exports["a"]), root, export="a")
    assert (first.version, first.live) == (1, True)
    version = Path(root) / "1"
    for name in ("saved_model.pb", "variables", "labels.json", "model.keras", "model.onnx"):
        assert (version / name).exists(), name
    second = deploy.publish(str(exports["b"]), root, export="b")
    pointer, _ = deploy.read_pointer(root)
    assert (second.version, pointer["version"], pointer["previous"]) == (2, 2, 1)
    assert deploy.versions(root) == [1, 2]
    back = deploy.rollback(root, 1)
    pointer, _ = deploy.read_pointer(root)
    assert (back.version, pointer["version"], pointer["rollback_of"]) == (3, 3, 1)
    assert (Path(root) / "3" / "model.keras").read_bytes() == (version / "model.keras").read_bytes()
    with pytest.raises(deploy.DeployError, match="no version 7"):
        deploy.rollback(root, 7)


def test_both_servers_load_a_published_version(exports, tmp_path):
    """A version folder serves with every backend of the web app and as a TF Serving version
    (tf.saved_model.load of <root>/<N>, the path TF Serving loads)."""
    import tensorflow as tf

    from carclassifier.serving.predictor import Predictor

    root = str(tmp_path / "serving")
    folder = deploy.publish(str(exports["a"]), root).uri
    image = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    probs = [
        Predictor.load(folder, b).predict([image])[0] for b in ("onnx", "saved_model", "keras")
    ]
    assert np.abs(probs[0] - probs[1]).max() < 1e-4 and np.abs(probs[1] - probs[2]).max() < 1e-4
    signature = tf.saved_model.load(folder).signatures["serving_default"]
    assert signature is not None


def test_racing_deployments_keep_the_newest_live_on_gcs(exports, bucket, gcs_emulator, monkeypatch):
    """Deployments racing on GCS: numbers are claimed once each, and a pointer write based on a
    stale read fails its generation precondition instead of overwriting: it is read again, so
    a newer version is never replaced by an older one and no update is lost. The emulator
    ignores ifGenerationMatch; tests/gcs_fault_proxy.py in front of it enforces it as GCS does
    (HTTP 412: cloud.google.com/storage/docs/request-preconditions)."""
    from gcs_fault_proxy import FaultProxy

    with FaultProxy(gcs_emulator) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        root = f"gs://{bucket.name}/serving"
        deploy.publish(str(exports["a"]), root)  # version 1
        stale = deploy.read_pointer(root)  # what slow runs read before others moved the pointer
        deploy.publish(str(exports["b"]), root)  # version 2, live
        late, later = deploy._claim(root, {}), deploy._claim(root, {})
        assert (late, later) == (3, 4)
        real = deploy.read_pointer
        reads = iter([stale])
        monkeypatch.setattr(deploy, "read_pointer", lambda r: next(reads, None) or real(r))
        assert deploy._move_pointer(root, late, f"{root}/{late}", {}) is True
        pointer, _ = real(root)
        assert (pointer["version"], pointer["previous"]) == (3, 2)  # 2 was seen, not lost
        assert deploy._move_pointer(root, later, f"{root}/{later}", {}) is True
        reads = iter([stale])
        assert deploy._move_pointer(root, late, f"{root}/{late}", {}) is False  # 4 stays live
        assert deploy.pointer_version(root) == (4, f"{root}/4")
        assert storage.list_names(f"{root}/.claims") == [f"{n}.json" for n in (1, 2, 3, 4)]
        assert any("412" in str(seen) for seen in proxy.seen), proxy.seen[-5:]


@pytest.mark.slow
def test_a_running_server_switches_versions_without_failing_a_request(exports, tmp_path):
    """`carclassifier serve --model <serving root>` under a steady load: deploy a new version,
    every request is answered 200, the answers change from the old model's to the new one's,
    and a version whose check photo does not match is refused (the new one stays)."""
    root = tmp_path / "serving"
    photo = photos(tmp_path, 1)[0]
    deploy.publish(str(exports["a"]), str(root), photo)
    body, ctype = multipart([(photo.name, photo.read_bytes())])
    statuses: list[int] = []
    answers: list[list[float]] = []
    stop = threading.Event()

    with running_server(root, tmp_path / "server.log", "--poll-seconds", "0.5") as server:

        def load() -> None:
            while not stop.is_set():
                status, _, raw = post(f"{server.url}/v1/predict?top_k=3", body, ctype)
                statuses.append(status)
                if status == 200:
                    top = json.loads(raw)["predictions"][0]["top"]
                    answers.append(
                        [t["probability"] for t in sorted(top, key=lambda t: t["index"])]
                    )

        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        before = len(answers)
        deploy.publish(str(exports["b"]), str(root), photo)
        deadline = time.monotonic() + 60
        while "switched from version 1 to 2" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)
        # a version whose stored check does not match its model is not served
        staging = tmp_path / "staging"
        broken = deploy.publish(str(exports["a"]), str(staging), photo)
        expected = Path(broken.uri) / "check" / "expected.json"
        check = json.loads(expected.read_text())
        check["probabilities"] = list(reversed(check["probabilities"]))
        expected.write_text(json.dumps(check))
        deploy.publish(broken.uri, str(root))  # version 3, check copied as it is
        time.sleep(3)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        log = server.log()

    assert statuses and set(statuses) == {200}, (set(statuses), log[-2000:])
    assert "switched from version 1 to 2" in log, log[-2000:]
    first, last = np.array(answers[0]), np.array(answers[-1])
    assert np.abs(first - np.array(answers[before - 1])).max() < 1e-5  # old model before
    assert np.abs(first - last).max() > 0.05  # the new model's answers after
    assert "keeping version 2" in log and "check photo differs" in log, log[-2000:]
