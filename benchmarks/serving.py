"""Load test of the model server: ``carclassifier serve`` (waitress) in its own process on
127.0.0.1, driven from this process at several concurrency levels.

    .venv/bin/python benchmarks/serving.py                       # runs/local/export, 500 requests per level
    .venv/bin/python benchmarks/serving.py --requests 100 --concurrency 1 4

Each request is ``POST /v1/predict`` with one real car photo (multipart, cycling through the
photos of ``--images``). Per level: throughput, latency percentiles, errors (any status but 200,
or no answer) and the server process's peak RSS (psutil, sampled every 50 ms). Results go to
``benchmarks/results/serving.json`` and ``serving.md``. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """A one-file multipart/form-data body and its content type."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def find_photos(folder: Path, limit: int) -> list[Path]:
    """Up to ``limit`` JPEGs under ``folder`` (sorted, spread over its subfolders)."""
    found = sorted(folder.rglob("*.jpg"))
    if not found:
        raise SystemExit(f"no .jpg photos under {folder}; pass --images")
    step = max(1, len(found) // limit)
    return found[::step][:limit]


class RssSampler(threading.Thread):
    """Peak resident memory of a process, sampled in the background."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(self.interval)

    def stop(self) -> int:
        """Stop sampling; the peak RSS in bytes."""
        self._done.set()
        self.join(timeout=2)
        return self.peak


def start_server(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen:
    """The server process, once ``/readyz`` answers 200."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "carclassifier.cli", "serve", "--model", str(args.model)]
    command += ["--host", HOST, "--port", str(port), "--backend", args.backend]
    command += ["--threads", str(args.threads)]
    with open(log_path, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log_path.read_text()[-3000:]}")
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=2)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit("the server was not ready within 300 s")


def run_level(port: int, bodies: list[tuple[bytes, str]], requests: int, concurrency: int):
    """``requests`` POSTs with ``concurrency`` client threads (one keep-alive connection each)."""
    local = threading.local()

    def one(i: int) -> tuple[float, bool]:
        body, ctype = bodies[i % len(bodies)]
        start = time.perf_counter()
        try:
            if not hasattr(local, "connection"):
                local.connection = http.client.HTTPConnection(HOST, port, timeout=120)
            local.connection.request(
                "POST", "/v1/predict", body=body, headers={"Content-Type": ctype}
            )
            response = local.connection.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            local.__dict__.pop("connection", None)
            ok = False
        return time.perf_counter() - start, ok

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - start
    latencies = np.array([r[0] for r in results]) * 1000
    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": round(elapsed, 2),
        "throughput_rps": round(requests / elapsed, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "mean_ms": round(float(statistics.fmean(latencies)), 1),
        "errors": sum(1 for r in results if not r[1]),
    }


def machine() -> dict:
    """CPU, memory and load of this machine, and the library versions."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    return {
        "cpu": cpu,
        "logical_cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "device": "CPU (no GPU)",
        "python": platform.python_version(),
        "tensorflow": version("tensorflow-cpu"),
        "flask": version("flask"),
        "waitress": version("waitress"),
    }


def markdown(result: dict) -> str:
    """The results as a Markdown page."""
    m, s = result["machine"], result["server"]
    lines = [
        "# Serving load test",
        "",
        f"`benchmarks/serving.py` on {result['date']}: `carclassifier serve` (waitress, "
        f"{s['threads']} threads, backend `{s['backend']}`) with the model `{s['model']}` "
        f"({s['model_name']}, version `{s['version']}`), in its own process on 127.0.0.1; "
        f"the client (one keep-alive connection per thread) in another. Each request: "
        f"`POST /v1/predict` with one real car photo ({result['photos']} photos of "
        f"`{result['images']}`, cycled, {result['mean_photo_kib']} KiB on average).",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB, "
        f"{m['device']}; load average at start {m['load_average_at_start']}. "
        f"Python {m['python']}, TensorFlow {m['tensorflow']}.",
        "",
        "| concurrency | requests | throughput (req/s) | p50 ms | p95 ms | p99 ms | errors "
        "| server peak RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in result["levels"]:
        lines.append(
            f"| {level['concurrency']} | {level['requests']} | {level['throughput_rps']} | "
            f"{level['p50_ms']} | {level['p95_ms']} | {level['p99_ms']} | {level['errors']} | "
            f"{level['server_peak_rss_mib']} |"
        )
    lines += [
        "",
        f"Server RSS once the model was loaded: {result['server_rss_ready_mib']} MiB.",
        "",
    ]
    if result.get("notes"):
        lines += [result["notes"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "runs" / "local" / "export"))
    parser.add_argument(
        "--images", type=Path, default=ROOT.parent / "shared" / "data" / "cars-ru10"
    )
    parser.add_argument("--photos", type=int, default=50, help="distinct photos cycled through")
    parser.add_argument("--requests", type=int, default=500, help="requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--backend",
        default="auto",
        help="auto (onnx when the export has model.onnx), onnx, saved_model, keras",
    )
    parser.add_argument("--threads", type=int, default=4, help="waitress threads")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--notes", default="", help="a sentence added to the results")
    args = parser.parse_args(argv)

    photos = find_photos(args.images, args.photos)
    bodies = [multipart(p.name, p.read_bytes()) for p in photos]
    port = free_port()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.out_dir / ".serving-server.log"
    info = machine()
    process = start_server(args, port, log_path)
    try:
        connection = http.client.HTTPConnection(HOST, port, timeout=10)
        connection.request("GET", "/v1/model")
        model = json.loads(connection.getresponse().read())
        run_level(port, bodies, args.warmup, 1)  # first calls trace the graph
        ready_rss = psutil.Process(process.pid).memory_info().rss
        levels = []
        for concurrency in args.concurrency:
            sampler = RssSampler(process.pid)
            sampler.start()
            level = run_level(port, bodies, args.requests, concurrency)
            level["server_peak_rss_mib"] = round(sampler.stop() / 2**20, 1)
            levels.append(level)
            print(json.dumps(level), flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info,
        "server": {
            "model": os.path.relpath(args.model, ROOT)
            if not str(args.model).startswith("gs://")
            else args.model,
            "model_name": model["name"],
            "version": model["version"],
            "backend": model["backend"],
            "threads": args.threads,
        },
        "images": os.path.relpath(args.images, ROOT),
        "photos": len(photos),
        "mean_photo_kib": round(statistics.fmean(len(b) for b, _ in bodies) / 1024, 1),
        "server_rss_ready_mib": round(ready_rss / 2**20, 1),
        "levels": levels,
        "notes": args.notes,
    }
    (args.out_dir / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "serving.md").write_text(markdown(result))
    log_path.unlink(missing_ok=True)
    print(markdown(result))
    return 0 if all(level["errors"] == 0 for level in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
