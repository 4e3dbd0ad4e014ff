"""The container images for real: built with buildah, run with podman (``make image-test``).

Marked ``image``: ``make test`` leaves them out (they build two images, ~25 GB of disk and ~10
minutes cold); ``make image-test`` runs them. What they do (docs/containers.md):

1. build the stand-in base (cached), the GPU trainer image (``docker/trainer.Dockerfile`` as
   shipped, ``tensorflow[and-cuda]``; TensorFlow falls back to the CPU here) and the serving
   image, then rebuild both from the layer cache; sizes and times go to benchmarks/results/;
2. check what the images are: user, command, labels, the locked versions, caches under /tmp;
3. in the trainer image as uid 10001 with a read-only root and a tmpfs /tmp: the CLI, and one
   stage of a tiny recipe writing its checkpoints to the GCS emulator on the host;
4. the compiled pipeline with kfp.local's DockerRunner over podman's Docker API, every task in
   the trainer image with the command and arguments of the compiled IR, then again from the
   cache;
5. the serving image answering over HTTP from the host.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import image_support as images
import pytest
import yaml
from conftest import tiny_dataset

from carclassifier import storage
from carclassifier.config import dump_config, load_config

pytestmark = pytest.mark.image

ROOT = images.ROOT
TINY = [
    "name=image-test",
    "model.weights=null",
    "input.image_size=32",
    "input.batch_size=4",
    "augment.tta_views=2",
    "stages=[{name: stage_1, description: head only, epochs: 1, unfreeze: 0.0, "
    "learning_rate: 0.01}, {name: stage_2, description: all layers, epochs: 1, unfreeze: 1.0, "
    "learning_rate: 0.001}]",
]
"""The tiny recipe: two one-epoch stages of Lite0 at 32 px from random weights (no download)."""
READ_ONLY = ["--user", "10001:10001", "--read-only", "--tmpfs", "/tmp", "--network", "host"]
"""How the trainer runs here: the image's uid, the pod's read-only root with /tmp writable
(an emptyDir in the pod), the host's loopback for the GCS emulator."""


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def built() -> dict[str, images.Build]:
    """Both images built (from the cache when nothing changed) and rebuilt once more to time a
    cached build; the figures are written to benchmarks/results/images.{json,md}."""
    missing = images.missing_tools()
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: apt-get install podman buildah runc debootstrap"
        )
    have = images.image_exists(images.TRAINER_IMAGE)
    if not have and images.free_gb() < images.MIN_FREE_GB:
        pytest.fail(
            f"{images.free_gb():.0f} GB free under /var/lib/containers; building the trainer "
            f"image needs about {images.MIN_FREE_GB} GB"
        )
    base_seconds = images.ensure_standin_base()
    recipes = {
        "trainer": ("docker/trainer.Dockerfile", images.TRAINER_IMAGE, "docker/trainer.Dockerfile.dockerignore"),
        "serve": ("docker/serve.Dockerfile", images.SERVE_IMAGE, None),
    }  # fmt: skip
    first = {name: images.build_image(*recipe) for name, recipe in recipes.items()}
    # A build that ran steps is built once more, which must come from the cache entirely.
    again = {
        name: images.build_image(*recipes[name])
        for name, build in first.items()
        if build.kind != "cached"
    }
    images.record_builds([*first.values(), *again.values()], base_seconds)
    for name, build in again.items():
        assert build.kind == "cached", f"{name}: an unchanged tree rebuilt layers: {build}"
    return first


def podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``podman ARGS`` with the settings of this machine (runc, no default ulimits)."""
    return images.run(["podman", *args], timeout=timeout)


def inspect(image: str) -> dict[str, Any]:
    """``podman image inspect`` of ``image``."""
    return json.loads(podman("image", "inspect", image).stdout)[0]


@pytest.fixture(scope="session")
def trainer(built: dict[str, images.Build]) -> str:
    return built["trainer"].image


@pytest.fixture(scope="session")
def serve_image(built: dict[str, images.Build]) -> str:
    return built["serve"].image


def new_bucket(prefix: str) -> str:
    """A fresh bucket on the emulator."""
    return storage.gcs_client().create_bucket(f"{prefix}-{uuid.uuid4().hex[:8]}").name


def blob_names(bucket: str) -> set[str]:
    return {b.name for b in storage.gcs_client().list_blobs(bucket)}


# ---------------------------------------------------------------------------------------------
# What the images are


def test_images_build_and_their_figures_are_recorded(built: dict[str, images.Build]) -> None:
    result = json.loads((images.RESULTS / "images.json").read_text(encoding="utf-8"))
    for name in ("trainer.Dockerfile", "serve.Dockerfile"):
        entry = result["images"][name]
        assert entry["size_bytes"] > 500e6 and "cached" in entry
    assert built["trainer"].size_bytes > built["serve"].size_bytes  # CUDA wheels
    assert "| `docker/trainer.Dockerfile` |" in (images.RESULTS / "images.md").read_text()


def test_trainer_image_config(trainer: str) -> None:
    """User, command, workdir and labels as Kubernetes and kfp rely on them: kfp replaces the
    container command (no ENTRYPOINT to prepend), the pipeline's runAsUser is the image's uid."""
    from pipelines.car_classifier import RUN_AS_USER, ClusterOptions

    config = inspect(trainer)["Config"]
    assert config["User"] == f"{RUN_AS_USER}:{ClusterOptions().run_as_group}"
    assert config["Cmd"] == ["carclassifier", "--help"] and not config.get("Entrypoint")
    assert config["WorkingDir"] == "/workspace"
    env = dict(item.split("=", 1) for item in config["Env"])
    for name in ("MPLCONFIGDIR", "KERAS_HOME", "CARCLASSIFIER_CACHE"):
        assert env[name].startswith("/tmp/"), name
    assert "PIP_CERT" not in env
    labels = config["Labels"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    for key in ("title", "description", "revision", "created", "source", "base.name"):
        assert labels[f"org.opencontainers.image.{key}"], key


def installed_packages(image: str) -> dict[str, str]:
    """Normalized name -> version of every distribution in the image's venv (``pip list``)."""
    listed = podman(
        "run", "--rm", *READ_ONLY, "--entrypoint", "pip", image, "list", "--format", "json"
    )
    return {
        re.sub(r"[-_.]+", "-", p["name"]).lower(): p["version"] for p in json.loads(listed.stdout)
    }


def test_trainer_image_has_the_locked_versions_and_no_tensorflow_cpu(trainer: str) -> None:
    """Every installed package that the lock names has the lock's version; the GPU TensorFlow
    of the same version as the tensorflow-cpu pin, and not tensorflow-cpu (same package dir)."""
    installed = installed_packages(trainer)
    lock = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            lock[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    assert "tensorflow-cpu" not in installed
    assert installed["tensorflow"] == lock["tensorflow-cpu"]
    assert installed["carclassifier"] == "0.1.0"
    drift = {n: (v, lock[n]) for n, v in installed.items() if n in lock and lock[n] != v}
    assert not drift, drift
    gpu_pins = {}
    for line in (ROOT / "docker" / "gpu-constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            gpu_pins[name.lower()] = version
    assert {n: installed.get(n) for n in gpu_pins} == gpu_pins


def test_the_build_ca_bundle_is_not_in_the_image(trainer: str, serve_image: str) -> None:
    """The ``pip-ca`` build secret is mounted for single RUN steps only: no file, no layer
    copied from it, no pip setting pointing at it."""
    for image in (trainer, serve_image):
        podman(
            "run",
            "--rm",
            *READ_ONLY,
            "--entrypoint",
            "sh",
            image,
            "-c",
            "test ! -e /run/secrets/pip-ca",
        )
        for entry in inspect(image).get("History", []):
            step = entry.get("created_by", "")
            if re.search(r"\b(COPY|ADD)\b", step):
                assert "pip-ca" not in step and "ca-certificates" not in step, step
        env = inspect(image)["Config"]["Env"]
        assert not [e for e in env if e.startswith(("PIP_CERT=", "REQUESTS_CA_BUNDLE="))]


def test_serve_image_config(serve_image: str) -> None:
    from carclassifier.cli import build_parser

    config = inspect(serve_image)["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["carclassifier", "serve"]
    parsed = build_parser().parse_args(["serve", *config["Cmd"]])
    assert (parsed.host, parsed.port, parsed.model) == ("0.0.0.0", 8080, "/models/export")
    assert "8080/tcp" in config["ExposedPorts"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HOME"] == "/tmp" and env["KERAS_HOME"].startswith("/tmp/")
    installed = installed_packages(serve_image)
    assert installed["tensorflow-cpu"] == "2.21.0" and not [n for n in installed if "nvidia" in n]


def test_importing_the_library_makes_no_network_request(trainer: str, serve_image: str) -> None:
    """albumentations asks PyPI for a newer release at import unless NO_ALBUMENTATIONS_UPDATE
    is set (albumentations/__init__.py and check_version.py, 2.0.8): every task and server
    start would reach out to the internet, and warn where it cannot."""
    for image in (trainer, serve_image):
        result = images.run(
            ["podman", "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", "none",
             "--entrypoint", "python", image, "-c", "import albumentations, carclassifier.augment"],
        )  # fmt: skip
        assert "Error fetching version info" not in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# The trainer image runs read-only as uid 10001


def test_trainer_cli_runs_read_only_as_the_image_user(trainer: str) -> None:
    out = podman("run", "--rm", *READ_ONLY, trainer, "carclassifier", "--help").stdout
    assert "usage: carclassifier" in out and "train-stage" in out
    ids = podman("run", "--rm", *READ_ONLY, trainer, "id").stdout
    assert ids.startswith("uid=10001(carclassifier) gid=10001(carclassifier)")
    # Nothing but /tmp is writable: the root filesystem really is read-only.
    denied = subprocess.run(
        ["podman", "run", "--rm", *READ_ONLY, trainer, "touch", "/workspace/x"],
        env=images.podman_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr


def test_one_stage_in_the_trainer_image_checkpoints_to_the_emulator(
    trainer: str, gcs_emulator: str, tmp_path: Path
) -> None:
    """``carclassifier train-stage`` of the tiny recipe's first stage, the data mounted
    read-only, every output to gs:// on the GCS emulator of the host."""
    data = tiny_dataset(tmp_path / "cars")
    bucket = new_bucket("stage")
    stage_out = f"gs://{bucket}/image-test/stages/stage_1"
    sets = [arg for override in TINY for arg in ("--set", override)]
    result = podman(
        "run", "--rm", *READ_ONLY, "-e", f"STORAGE_EMULATOR_HOST={gcs_emulator}",
        "-v", f"{data}:/data:ro", trainer,
        "carclassifier", "train-stage", *sets, "--data", "/data", "--out", "/tmp/out",
        "--stage", "stage_1", "--stage-out", stage_out,
    )  # fmt: skip
    metrics = json.loads(result.stdout[result.stdout.index("{") :])
    # The caches live under /tmp (MPLCONFIGDIR, KERAS_HOME): nothing wanted to write to HOME.
    for complaint in ("is not a writable directory", "temporary cache directory"):
        assert complaint not in result.stderr, result.stderr[-2000:]
    assert metrics["epochs_run"] == 1 and 0.0 <= metrics["best_val_accuracy"] <= 1.0
    assert metrics["best_model"] == f"{stage_out}/best.keras"
    names = blob_names(bucket)
    prefix = "image-test/stages/stage_1/"
    for leaf in (
        "checkpoints/epoch-0001/model.keras",
        "checkpoints/latest.json",
        "best.keras",
        "metrics.json",
    ):
        assert prefix + leaf in names, sorted(names)


# ---------------------------------------------------------------------------------------------
# The compiled pipeline, every task in the trainer image (kfp.local DockerRunner over podman)


@pytest.fixture(scope="session")
def docker_host(trainer: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """podman's Docker API on a unix socket (no TCP port), ``DOCKER_HOST`` set for the docker
    SDK while the tests run; the service is stopped afterwards."""
    with images.podman_service(tmp_path_factory.mktemp("podman")) as host:
        previous = os.environ.get("DOCKER_HOST")
        os.environ["DOCKER_HOST"] = host
        try:
            yield host
        finally:
            if previous is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = previous


def uid_writable_dir(path: Path, uid: int = 10001) -> Path:
    """``path`` created and owned by ``uid``: kfp.local's DockerRunner bind-mounts the pipeline
    root, and the tasks run as the image's user (10001), not as the caller."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    return path


def run_compiled(
    package: Path, root: Path, emulator: str, started: list[dict[str, Any]], **arguments: object
) -> Path:
    """Run the compiled pipeline ``package`` with kfp.local's DockerRunner (cache on); return
    the run's folder under ``root``. The image and command of every container kfp.local starts
    are appended to ``started`` (the docker SDK call is wrapped, and still made)."""
    from kfp import components, local
    from kfp.local import docker_task_handler

    real = docker_task_handler.run_docker_container

    def recording(client: Any, image: str, command: list[str], **kwargs: Any) -> int:
        started.append({"image": image, "command": list(command)})
        return real(client=client, image=image, command=command, **kwargs)

    pipeline = components.load_component_from_file(str(package))
    before = set(root.iterdir())
    docker_task_handler.run_docker_container = recording
    local.init(
        runner=local.DockerRunner(
            network_mode="host",
            read_only=True,
            tmpfs={"/tmp": ""},
            environment={"STORAGE_EMULATOR_HOST": emulator},
        ),
        pipeline_root=str(root),
        enable_caching=True,
    )
    try:
        pipeline(**arguments)
    finally:
        local.config.LocalExecutionConfig.instance = None
        docker_task_handler.run_docker_container = real
    (run,) = [p for p in set(root.iterdir()) - before if p.is_dir() and p.name != ".kfp_cache"]
    return run


@pytest.fixture(scope="session")
def pipeline_runs(
    trainer: str, docker_host: str, gcs_emulator: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Compile the tiny recipe's pipeline on the trainer image, run it twice in containers."""
    from pipelines import compile_pipeline

    work = tmp_path_factory.mktemp("image-pipeline")
    recipe = work / "recipe.yaml"
    recipe.write_text(dump_config(load_config(None, TINY)), encoding="utf-8")
    package = compile_pipeline(recipe, work / "pipeline.yaml", image=trainer)
    data = new_bucket("data")
    client = storage.gcs_client()
    for path in sorted(tiny_dataset(work / "cars").rglob("*.jpg")):
        relative = path.relative_to(work).as_posix()
        client.bucket(data).blob(relative).upload_from_filename(str(path))
    checkpoints, champions = new_bucket("ckpt"), new_bucket("champ")
    arguments = {
        "data_source": f"gs://{data}/cars",
        "checkpoint_root": f"gs://{checkpoints}/runs",
        "champion_pointer": f"gs://{champions}/champion.json",
    }
    root = uid_writable_dir(ROOT / "tests" / "artifacts" / "images" / f"kfp-{uuid.uuid4().hex[:6]}")
    started: list[dict[str, Any]] = []
    first = run_compiled(package, root, gcs_emulator, started, **arguments)
    pointer = storage.read_text(arguments["champion_pointer"])
    again = run_compiled(package, root, gcs_emulator, started, **arguments)
    return {
        "package": package,
        "started": started,
        "first": first,
        "again": again,
        "checkpoints": checkpoints,
        "pointer": pointer,
    }


def executor_output(task: Path) -> dict[str, Any]:
    return json.loads((task / "executor_output.json").read_text(encoding="utf-8"))


def test_every_container_got_the_image_command_and_arguments_of_the_ir(
    pipeline_runs: dict[str, Any], trainer: str
) -> None:
    """The containers run exactly what the compiled IR says: kfp.local hands each executor's
    image and ``command + args`` (placeholders such as ``{{$}}`` resolved to the executor
    input) to the docker SDK's ``containers.run`` (kubeflow/pipelines
    sdk/python/kfp/local/task_dispatcher.py ``_run_single_task_implementation`` and
    docker_task_handler.py ``run_docker_container``, tag 2.17.0)."""
    spec = next(yaml.safe_load_all(pipeline_runs["package"].read_text(encoding="utf-8")))
    by_function = {}  # the function an executor runs -> its container spec
    for executor in spec["deploymentSpec"]["executors"].values():
        container = executor["container"]
        assert container["image"] == trainer
        assert container["command"][:2] == ["sh", "-ec"]
        assert "python3 -m kfp.dsl.executor_main" in container["command"][2]
        by_function[container["args"][-1]] = container
    started = pipeline_runs["started"]
    # every task (the deploy: the first model is promoted), then the gate and the exit task
    # alone (the rest from the cache; nothing promoted, nothing deployed)
    assert len(started) == 10 + 2
    assert [s["command"][-1] for s in started[-2:]] == ["champion_gate", "run_summary"]
    for container in started:
        ir = by_function[container["command"][-1]]
        assert container["image"] == ir["image"]
        n = len(ir["command"])
        assert container["command"][:n] == ir["command"]  # the IR's command, unchanged
        args = container["command"][n:]  # the IR's args, {{$}} filled with the executor input
        assert len(args) == len(ir["args"])
        for got, want in zip(args, ir["args"], strict=True):
            if want == "{{$}}":
                assert "outputs" in json.loads(got)
            else:
                assert got == want


def test_every_task_ran_in_the_image_and_wrote_its_outputs(pipeline_runs: dict[str, Any]) -> None:
    """SUCCESS is not enough: kfp.local logs SUCCESS for a task whose executor could not write
    its outputs (a pipeline root the image's uid cannot write), so check the outputs."""
    first = pipeline_runs["first"]
    names = {p.name for p in first.iterdir() if p.is_dir()}
    assert names == {
        "prepare-data", "validate-and-eda", "train-stage", "train-stage-2", "evaluate-model",
        "predict-submission", "export-model", "champion-gate", "deploy-model", "run-summary",
    }  # fmt: skip
    for name in names:
        assert (first / name / "executor_output.json").is_file(), name
    for task in ("train-stage", "train-stage-2"):
        assert (first / task / "model").stat().st_size > 0
        assert "data:image/png;base64," in (first / task / "curves").read_text()
    run_key = executor_output(first / "prepare-data")["parameterValues"]["run_key"]
    written = blob_names(pipeline_runs["checkpoints"])
    for stage in ("stage_1", "stage_2"):
        assert f"runs/{run_key}/stages/{stage}/best.keras" in written
    lines = (first / "predict-submission" / "submission").read_text().splitlines()
    assert lines[0] == "Id,Category" and len(lines) == 3
    export = executor_output(first / "export-model")["parameterValues"]["Output"]
    assert storage.exists(storage.join(export, "labels.json"))
    assert json.loads(pipeline_runs["pointer"])["export"] == export
    # Written by uid 10001, the image's user, not by this (root) process.
    assert (first / "train-stage" / "model").stat().st_uid == 10001


def test_the_second_run_hits_the_cache(pipeline_runs: dict[str, Any]) -> None:
    again = pipeline_runs["again"]
    assert {p.name for p in again.iterdir() if p.is_dir()} == {"champion-gate", "run-summary"}
    assert executor_output(again / "champion-gate")["parameterValues"]["Output"] is False


# ---------------------------------------------------------------------------------------------
# The serving image over HTTP


@pytest.fixture(scope="session")
def serving(serve_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The serving image with its default command, an export mounted read-only at
    /models/export, port 8080 published on 127.0.0.1; yields the base URL. Removed after."""
    from serving_support import export_fixture

    export = export_fixture(tmp_path_factory.mktemp("serve"))
    for path in [export, *export.rglob("*")]:  # readable by the image's uid
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = images.free_port()
    name = f"carclassifier-serve-test-{uuid.uuid4().hex[:6]}"
    podman(
        "run", "-d", "--rm", "--name", name, "--read-only", "--tmpfs", "/tmp",
        "-p", f"127.0.0.1:{port}:8080", "-v", f"{export}:/models/export:ro", serve_image,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        images.wait_http(f"{url}/readyz", timeout=180)
        yield url
    finally:
        logs = subprocess.run(
            ["podman", "logs", name], env=images.podman_env(), capture_output=True, text=True
        )
        images.log_file("serve-container.log").write_text(logs.stdout + logs.stderr)
        subprocess.run(
            ["podman", "rm", "-f", "-t", "10", name],
            env=images.podman_env(),
            capture_output=True,
            check=False,
            timeout=60,
        )


def post_file(url: str, filename: str, content: bytes, ctype: str) -> tuple[int, dict[str, Any]]:
    """multipart/form-data POST of one file; status and JSON body."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_serving_image_answers_readyz_a_photo_and_refuses_text(
    serving: str, tmp_path: Path
) -> None:
    from serving_support import CLASSES, photos

    with urllib.request.urlopen(f"{serving}/readyz", timeout=10) as response:
        assert response.status == 200
    (photo,) = photos(tmp_path, 1)
    assert "shared" in photo.parts, (
        "no real photo found: put the shared data at ../shared beside the repository or set "
        "CARCLASSIFIER_SHARED_DATA to its folder"
    )
    status, body = post_file(f"{serving}/v1/predict", photo.name, photo.read_bytes(), "image/jpeg")
    assert status == 200, body
    (prediction,) = body["predictions"]
    assert prediction["file"] == photo.name
    assert {t["class"] for t in prediction["top"]} <= set(CLASSES)
    status, body = post_file(f"{serving}/v1/predict", "notes.txt", b"not a photo", "text/plain")
    assert 400 <= status < 500 and body["error"]["code"] == "not_an_image"
