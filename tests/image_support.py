"""Build and run the project's container images with buildah and podman (no Docker daemon).

Used by ``tests/test_images.py`` (``make image-test``). What these tools need on such machines
(docs/containers.md; checked facts in the project notes):

- ``podman`` runs containers with the ``runc`` runtime (crun fails under a hybrid cgroup setup)
  and with no default ulimits (podman's nofile/nproc defaults exceed what a sandbox allows);
  both are set in a containers.conf that `podman_env` writes and points ``CONTAINERS_CONF`` at.
- No registry is reachable, so the Dockerfiles' ``PYTHON_IMAGE`` build argument names a stand-in
  base built from Debian packages by ``docker/standin-base.sh``.
- pip inside a build may need the machine's CA bundle (a TLS-intercepting proxy): it is passed
  as the build secret ``pip-ca`` (mounted for the RUN steps that reach PyPI, never in a layer).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts" / "images"
RESULTS = ROOT / "benchmarks" / "results"

STANDIN_BASE = os.environ.get("STANDIN_BASE", "localhost/python:3.11-bookworm-standin")
TRAINER_IMAGE = "localhost/carclassifier-trainer:image-test"
SERVE_IMAGE = "localhost/carclassifier-serve:image-test"
DEFAULT_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TOOLS = ("podman", "buildah", "runc", "debootstrap")
MIN_FREE_GB = 25
"""Free disk the trainer build needs while it runs (layers, pip's unpacked wheels, the commit)."""

CONTAINERS_CONF = """\
# Written by tests/image_support.py for make image-test.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
"""


class ImageToolError(RuntimeError):
    """A build or container command failed; the message names the command and its log."""


def missing_tools() -> list[str]:
    """The container tools that are not on PATH."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def free_gb(path: Path = Path("/var/lib/containers")) -> float:
    """Free space in GB where podman keeps its images (or its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free / 1e9


def log_file(name: str) -> Path:
    """A log file under tests/artifacts/images/ (the folder is created)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


def podman_env() -> dict[str, str]:
    """This process's environment plus ``CONTAINERS_CONF`` at the settings podman needs here."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    conf = ARTIFACTS / "containers.conf"
    conf.write_text(CONTAINERS_CONF, encoding="utf-8")
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def run(cmd: Sequence[str], timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``cmd`` with the podman settings; raise `ImageToolError` with its output on failure."""
    result = subprocess.run(
        list(cmd),
        env=kwargs.pop("env", None) or podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )
    if result.returncode != 0:
        raise ImageToolError(
            f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-3000:]}"
            f"\n{result.stderr[-3000:]}"
        )
    return result


def image_exists(image: str) -> bool:
    """Whether ``image`` is in the local image store."""
    env = podman_env()
    probe = subprocess.run(
        ["podman", "image", "exists", image], env=env, capture_output=True, check=False
    )
    return probe.returncode == 0


def image_size(image: str) -> int:
    """Size of ``image`` in bytes (all its layers, uncompressed), as podman reports it."""
    return int(run(["podman", "image", "inspect", "--format", "{{.Size}}", image]).stdout)


def ensure_standin_base() -> float:
    """Build the stand-in base once (``docker/standin-base.sh`` skips an existing one);
    returns the seconds it took (about 0 when it existed)."""
    start = time.monotonic()
    log = log_file("standin-base.log")
    with log.open("w", encoding="utf-8") as out:
        code = subprocess.run(
            ["bash", str(ROOT / "docker" / "standin-base.sh"), STANDIN_BASE],
            env=podman_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1800,
            check=False,
        ).returncode
    if code != 0:
        raise ImageToolError(f"docker/standin-base.sh exited {code}: see {log}")
    return time.monotonic() - start


@dataclass(frozen=True)
class Build:
    """One ``buildah bud`` of an image: how long it took and how much came from the cache."""

    image: str
    dockerfile: str
    seconds: float
    steps: int
    """Dockerfile steps buildah executed or took from its cache (all stages)."""
    cached_steps: int
    """Steps whose layer came from the cache ("Using cache")."""
    size_bytes: int

    @property
    def kind(self) -> str:
        """``cold`` (nothing below the base from the cache), ``cached`` (every step that makes
        a layer from the cache) or ``partial``."""
        if self.cached_steps == 0:
            return "cold"
        return "cached" if self.cached_steps >= self.steps - self.stage_count() else "partial"

    def stage_count(self) -> int:
        """FROM steps: they are never "cached", they select the base of a stage."""
        text = (ROOT / self.dockerfile).read_text(encoding="utf-8")
        return len(re.findall(r"^FROM\s", text, flags=re.MULTILINE))


def ca_bundle() -> Path | None:
    """The CA bundle given to builds as the ``pip-ca`` secret: ``$PIP_CA`` ("" for none), else
    the system bundle when there is one."""
    value = os.environ.get("PIP_CA")
    if value is not None:
        if value == "":
            return None
        path = Path(value)
        if not path.is_file():
            raise ImageToolError(f"PIP_CA={value}: no such file (a PEM CA bundle, or empty)")
        return path
    return DEFAULT_CA_BUNDLE if DEFAULT_CA_BUNDLE.is_file() else None


def build_image(dockerfile: str, image: str, ignorefile: str | None = None) -> Build:
    """``buildah bud --layers`` of ``dockerfile`` (relative to the repository root, which is
    the context) on the stand-in base, tagged ``image``; the log goes to tests/artifacts/images/."""
    cmd = [
        "buildah", "bud", "--layers", "-f", dockerfile, "-t", image,
        "--build-arg", f"PYTHON_IMAGE={STANDIN_BASE}",
    ]  # fmt: skip
    if ignorefile:
        cmd += ["--ignorefile", ignorefile]
    bundle = ca_bundle()
    if bundle is not None:
        cmd += ["--secret", f"id=pip-ca,src={bundle}"]
    log = log_file(f"build-{Path(dockerfile).stem}.log")
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        code = subprocess.run(
            [*cmd, "."],
            cwd=ROOT,
            env=podman_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=3600,
            check=False,
        ).returncode
    seconds = time.monotonic() - start
    text = log.read_text(encoding="utf-8", errors="replace")
    if code != 0:
        tail = "\n".join(text.splitlines()[-40:])
        raise ImageToolError(f"buildah bud -f {dockerfile} exited {code} (log {log}):\n{tail}")
    steps = len(re.findall(r"^(?:\[\d+/\d+\] )?STEP \d+/\d+: ", text, flags=re.MULTILINE))
    cached = len(re.findall(r"^--> Using cache ", text, flags=re.MULTILINE))
    return Build(image, dockerfile, round(seconds, 1), steps, cached, image_size(image))


# ---------------------------------------------------------------------------------------------
# Recording


def record_builds(builds: Sequence[Build], base_seconds: float) -> dict[str, Any]:
    """Merge ``builds`` into benchmarks/results/images.json (the latest build of each image and
    kind is kept, so a cached run leaves the last cold figures in place) and rewrite images.md."""
    path = RESULTS / "images.json"
    previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    images: dict[str, Any] = previous.get("images", {})
    utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load1, load5, _ = os.getloadavg()
    for build in builds:
        if build.kind == "partial":  # neither figure: some layers rebuilt, some cached
            continue
        entry = images.setdefault(Path(build.dockerfile).name, {})
        entry["image"] = build.image
        entry["size_bytes"] = build.size_bytes
        entry[build.kind] = {
            **{k: v for k, v in asdict(build).items() if k in ("seconds", "steps", "cached_steps")},
            "utc": utc,
            "loadavg_1m": round(load1, 2),
            "loadavg_5m": round(load5, 2),
        }
    if base_seconds > 5:  # a real build of the stand-in base, not the "exists" check
        previous["standin_base"] = {"image": STANDIN_BASE, "seconds": round(base_seconds, 1)}
    previous["standin_base_size_bytes"] = image_size(STANDIN_BASE)
    result = {
        **previous,
        "images": images,
        "machine": {"cpu_count": os.cpu_count(), "tools": tool_versions()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "images.md").write_text(images_markdown(result), encoding="utf-8")
    return result


def tool_versions() -> dict[str, str]:
    """``podman --version`` and ``buildah --version`` (first line each)."""
    versions = {}
    for tool in ("podman", "buildah"):
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
        versions[tool] = out.stdout.strip().splitlines()[0] if out.stdout else "unknown"
    return versions


def images_markdown(result: dict[str, Any]) -> str:
    """benchmarks/results/images.md from the JSON."""
    lines = [
        "# Container images: sizes and build times",
        "",
        "Written by `make image-test` (tests/image_support.py): `buildah bud --layers` on the "
        f"stand-in base `{STANDIN_BASE}` (docker/standin-base.sh), "
        f"{result['machine']['cpu_count']} CPU cores shared with other jobs, "
        f"{result['machine']['tools'].get('buildah', '')}. "
        "*cold*: no layer in the cache (everything downloaded and installed); *cached*: every "
        "layer from the cache (an unchanged tree). Sizes are uncompressed, as podman reports.",
        "",
        "| Dockerfile | image | size (GB) | cold build (s) | when | cached build (s) | when |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for name, entry in sorted(result["images"].items()):
        cold, cached = entry.get("cold", {}), entry.get("cached", {})
        lines.append(
            f"| `docker/{name}` | `{entry['image']}` | {entry['size_bytes'] / 1e9:.2f} | "
            f"{cold.get('seconds', 'not measured')} | {cold.get('utc', '')} | "
            f"{cached.get('seconds', 'not measured')} | {cached.get('utc', '')} |"
        )
    base = result.get("standin_base")
    lines += ["", f"Stand-in base: {result['standin_base_size_bytes'] / 1e9:.2f} GB"]
    if base:
        lines[-1] += f", built in {base['seconds']} s (debootstrap from the Debian mirror)."
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Running


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 2xx; raise `ImageToolError` after ``timeout`` seconds or
    when ``process`` ends first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if 200 <= response.status < 300:
                    return
        except OSError:
            pass
        if process is not None and process.poll() is not None:
            raise ImageToolError(f"{url}: the server exited {process.returncode} before answering")
        if time.monotonic() > deadline:
            raise ImageToolError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.5)


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM ``process`` (started by us), then SIGKILL after ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


@contextlib.contextmanager
def podman_service(directory: Path) -> Iterator[str]:
    """podman's Docker-compatible API on a unix socket in ``directory`` (no TCP port), for the
    docker SDK and so kfp.local's DockerRunner; yields ``DOCKER_HOST``. Stopped on exit."""
    socket_path = directory / "podman.sock"
    log = log_file("podman-service.log").open("w", encoding="utf-8")
    process = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
        env=podman_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise ImageToolError(f"podman system service did not start: see {log.name}")
            time.sleep(0.2)
        yield f"unix://{socket_path}"
    finally:
        stop(process)
        log.close()
