"""Helpers of the serving tests: a small exported model, real photos, the server as a process."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from conftest import tiny_model, write_image
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["honda_civic", "kia_rio", "lada_kalina"]
SIZE = 32
METADATA = {"backbone": "tiny", "run": "serving-test", "stage": "stage_1", "val_accuracy": 0.75}


def export_fixture(folder: Path) -> Path:
    """A 3-class, 32 px model exported like the pipeline does (model.keras, saved_model/1/)."""
    from carclassifier.export import write_export

    return write_export(tiny_model(SIZE, len(CLASSES)), CLASSES, folder / "export", METADATA)


def photos(folder: Path, n: int = 4) -> list[Path]:
    """``n`` real car photos (``shared/data/sf-competition-samples`` or cars-ru10) when present,
    else generated JPEGs in ``folder``."""
    from carclassifier.demo_data import shared_dir

    shared = shared_dir()
    found: list[Path] = []
    if shared is not None:
        for name in ("sf-competition-samples", "cars-ru10"):
            found += sorted((shared / "data" / name).rglob("*.jpg"))
    if len(found) >= n:
        return found[:n]
    return [write_image(folder / f"photo_{i}.jpg", (320, 240), seed=i) for i in range(n)]


def jpeg_bytes(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    """A random RGB JPEG of ``size`` (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def png_bytes(size: tuple[int, int]) -> bytes:
    """A flat grey PNG: tiny on the wire, ``size[0] * size[1]`` pixels once decoded."""
    buffer = io.BytesIO()
    Image.new("L", size, 128).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = 5) -> tuple[int, dict]:
    """Status and JSON body of a GET (error statuses included)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class ServerProcess:
    """``carclassifier serve`` running in its own process on 127.0.0.1."""

    def __init__(self, process: subprocess.Popen, port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        """What the server wrote to stdout/stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@contextmanager
def running_server(
    model: Path | str, log_path: Path, *extra: str, timeout: float = 120
) -> Iterator[ServerProcess]:
    """Start the server on a free port, wait until ``/readyz`` is 200, stop it afterwards."""
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "carclassifier.cli", "serve", "--model", str(model)]
            + ["--host", "127.0.0.1", "--port", str(port), *extra],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    server = ServerProcess(process, port, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log()}")
            try:
                if get_json(f"{server.url}/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready in {timeout} s:\n{server.log()}")
            time.sleep(0.3)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
