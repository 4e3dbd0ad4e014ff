"""Shared fixtures: small datasets made on the fly, the real demo photos when present, the GCS
emulator and a fresh bucket on it; and the ``integration``, ``kfp`` and ``slow`` markers set
here (`INTEGRATION_MODULES`, `INTEGRATION_FIXTURES`, `KFP_MODULES`, `SLOW_TESTS`), so
``make test-fast`` leaves out what starts servers or processes, compiles the pipeline or trains."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

INTEGRATION_MODULES = frozenset(
    {
        "test_pipeline_local",  # kfp.local runs of the whole pipeline
        "test_preemption",  # stages killed in subprocesses and resumed
        "test_serving_browser",  # headless Chromium
        "test_serving_server",  # the real server in a subprocess
        "test_serving_contract",  # schemathesis against the real server
        "test_images",  # buildah/podman (also marked image)
        "test_idempotent",  # whole runs twice
    }
)
"""Test modules that start processes or servers, or run the pipeline: marked ``integration``."""
INTEGRATION_FIXTURES = frozenset({"gcs_emulator"})
"""A test using one of these (directly or through another fixture) is marked ``integration``."""
KFP_MODULES = frozenset(
    {
        "test_kfp_backend_rules", "test_pipeline_ir", "test_secrets", "test_manifests_istio",
        "test_submit", "test_cli_validation", "test_cluster_rules", "test_preflight",
    }
)  # fmt: skip
"""Test modules that compile the kfp pipeline (seconds per compile): marked ``kfp``."""
SLOW_TESTS = frozenset(
    {
        "test_stages.py::test_all_stages_end_to_end_on_tiny_images",
        "test_stages.py::test_a_killed_stage_resumes_after_its_last_epoch",
        "test_stages.py::test_checkpoint_round_trip_keeps_weights_and_optimizer_state",
        "test_cli.py::test_run_local_end_to_end",
        "test_bad_data.py::test_one_epoch_training_on_the_bad_dataset_ends_normally",
        "test_oom.py::test_out_of_memory_names_the_batch_and_keeps_the_checkpoint",
        "test_chaos.py::test_a_chaos_run_survives_its_faults_with_the_uninterrupted_weights",
    }
)
"""Tests that train whole stages (10-50 s each on 2 cores, measured): marked ``slow``."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the integration tests (see `INTEGRATION_MODULES`, `INTEGRATION_FIXTURES`)."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in INTEGRATION_MODULES or INTEGRATION_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)
        if module in KFP_MODULES:
            item.add_marker(pytest.mark.kfp)
        if f"{module}.py::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


def write_image(
    path: Path,
    size: tuple[int, int] = (48, 40),
    mode: str = "RGB",
    seed: int = 0,
    fmt: str = "JPEG",
) -> Path:
    """A small random image file (``size`` is width, height)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)
    return path


def tiny_dataset(root: Path) -> Path:
    """Two classes of four images and a ``test_upload/`` folder of two."""
    for c, name in enumerate(("audi", "bmw")):
        for i in range(4):
            write_image(root / name / f"img_{i}.jpg", seed=c * 100 + i)
    for i in range(2):
        write_image(root / "test_upload" / f"test_{i}.jpg", seed=500 + i)
    return root


def tiny_model(size: int = 32, num_classes: int = 3):
    """Raw 0..255 RGB in, softmax out, seeded weights; a conv so that augmented views differ.
    For tests where the backbone does not matter."""
    import keras

    init = keras.initializers.GlorotUniform(seed=1)
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", kernel_initializer=init)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=init)(x)
    return keras.Model(inputs, outputs)


@pytest.fixture
def make_folder_dataset(tmp_path: Path):
    """Factory: class folders ``root/<class>/img_<i>.jpg`` with ``per_class`` images each."""

    def make(
        classes: tuple[str, ...] = ("audi", "bmw", "lada"), per_class: int = 5, name: str = "ds"
    ) -> Path:
        root = tmp_path / name
        for c, cls in enumerate(classes):
            for i in range(per_class):
                write_image(root / cls / f"img_{i}.jpg", seed=c * 100 + i)
        return root

    return make


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real cars-ru10 photos when ../shared is there, else generated toy images."""
    from carclassifier.demo_data import demo_dataset_root

    return demo_dataset_root(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real GCS protocol server (gcp-storage-emulator) on 127.0.0.1, in its own process
    (`pipelines.chaos.gcs_emulator`, which the chaos run uses too).

    Sets STORAGE_EMULATOR_HOST for the session; yields the endpoint URL.
    """
    from pipelines.chaos import gcs_emulator

    with gcs_emulator() as endpoint:
        yield endpoint


def write_kubeconfig(path: Path, server: str, token: str = "t") -> Path:
    """A kubeconfig at ``path`` whose one context names the API server at ``server`` with the
    bearer ``token``; returns ``path`` (for ``KUBECONFIG``)."""
    import yaml

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def bucket(gcs_emulator: str):
    """A new, empty bucket on the GCS emulator (a google.cloud.storage ``Bucket``)."""
    from carclassifier.storage import gcs_client

    return gcs_client().create_bucket(f"test-{uuid.uuid4().hex[:8]}")


@contextmanager
def webhook_receiver(path: str = "/hooks/carclassifier") -> Iterator[tuple[str, list[dict]]]:
    """A Slack-style incoming webhook on 127.0.0.1: its URL, and the JSON bodies it was sent."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{path}", received
    finally:
        server.shutdown()
        server.server_close()
