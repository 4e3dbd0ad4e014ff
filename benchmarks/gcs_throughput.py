"""Checkpoint upload/download throughput through the project's storage layer (gs://).

Uploads and downloads a file of ``--mb`` MB (random bytes, incompressible) with
`carclassifier.storage.put_file` / `get_file` — the calls stages use for checkpoints — against
a local gcp-storage-emulator (the one the tests use), alternating upload and download, and
extrapolates the time for a B6-sized checkpoint. The emulator is a single-threaded Python
server on this machine: the figure bounds the client-side cost (chunking, hashing, HTTP), not
a real bucket's network; see docs/performance.md.

    python -m benchmarks.gcs_throughput [--quick] [--mb 100] [--repeats 3]

Writes benchmarks/results/gcs_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import environment, write_results

B6_CHECKPOINT_MB = (170, 300)
"""A B6 .keras checkpoint: ~41M parameters x 4 bytes = 165 MB of weights, plus Adam's two
moment slots for the trainable share (0 to 2 x 165 MB): ~170 MB (head only) to ~300+ MB."""


def start_emulator(
    command: tuple[str, ...] = (sys.executable, "-m", "gcp_storage_emulator"),
) -> tuple[subprocess.Popen, str]:
    """gcp-storage-emulator (``command``) on a free local port, in memory (as tests/conftest.py
    starts it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [*command, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b?project=test", timeout=1)
            return process, endpoint
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("gcp-storage-emulator did not start") from None
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 MB, 1 repeat")
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.mb, args.repeats = 20, 1
    env_before = environment()
    process, endpoint = start_emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    try:
        from carclassifier import storage

        storage.gcs_client().create_bucket("bench")
        up, down = [], []
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "checkpoint.bin"
            source.write_bytes(os.urandom(args.mb * 2**20))
            for i in range(args.repeats):
                uri = f"gs://bench/stage/checkpoints/epoch-{i:04d}/model.keras"
                started = time.perf_counter()
                storage.put_file(source, uri)
                up.append(args.mb / (time.perf_counter() - started))
                started = time.perf_counter()
                storage.get_file(uri, Path(tmp) / "back.bin")
                down.append(args.mb / (time.perf_counter() - started))
                assert (Path(tmp) / "back.bin").stat().st_size == source.stat().st_size
    finally:
        process.terminate()
        process.wait(timeout=10)
    up_mb_s, down_mb_s = statistics.median(up), statistics.median(down)
    b6 = {
        f"{mb}MB": {"upload_s": round(mb / up_mb_s, 1), "download_s": round(mb / down_mb_s, 1)}
        for mb in B6_CHECKPOINT_MB
    }
    result = {
        "benchmark": "gcs_throughput",
        "file_mb": args.mb,
        "repeats": args.repeats,
        "upload_mb_s": round(up_mb_s, 1),
        "download_mb_s": round(down_mb_s, 1),
        "upload_runs_mb_s": [round(x, 1) for x in up],
        "download_runs_mb_s": [round(x, 1) for x in down],
        "b6_checkpoint_extrapolated": b6,
        "environment_before": env_before,
        "environment_after": environment(),
    }
    print(result)
    lines = [
        "# Checkpoint transfer through carclassifier.storage (gcp-storage-emulator, local)",
        "",
        f"{args.mb} MB random file, median of {args.repeats} upload/download pairs; load average "
        f"{env_before['loadavg_1m']}. The emulator is a single-threaded Python server on the same "
        "2 cores, so these figures are a floor set by this machine, not a real bucket's speed.",
        "",
        "| direction | MB/s | B6 checkpoint 170 MB | B6 checkpoint 300 MB |",
        "|---|---:|---:|---:|",
        f"| upload (put_file, resumable 32 MB chunks) | {result['upload_mb_s']} | "
        f"{b6['170MB']['upload_s']} s | {b6['300MB']['upload_s']} s |",
        f"| download (get_file) | {result['download_mb_s']} | "
        f"{b6['170MB']['download_s']} s | {b6['300MB']['download_s']} s |",
        "",
    ]
    write_results("gcs_throughput", result, lines)


if __name__ == "__main__":
    main()
