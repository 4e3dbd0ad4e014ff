"""The cost of handing the Dataset artifact from the prepare task to the tasks that read it:
one object per image (the old artifact) against a few tar shards (`carclassifier.shards`).

The KFP v2 launcher moves artifacts with kubeflow/pipelines
backend/src/v2/objectstore/object_store.go (tags 2.2.0 and 2.17.0): ``UploadBlob`` walks the
output folder and writes one object per file, one after another; ``DownloadBlob`` lists the
artifact's prefix and reads every listed object with its own ``NewReader``, one after another
(called from backend/src/v2/component/launcher_v2.go, ``uploadOutputArtifacts`` and
``downloadArtifacts``). The Go launcher cannot run here, so this script repeats that access
pattern with google-cloud-storage against gcp-storage-emulator on 127.0.0.1: a *proxy* for the
launcher (same requests per object, another client), on a server with no network latency.

For each dataset, both layouts are measured in the same run: the upload of the prepare task,
the download of one reading task, and for shards the packing (prepare) and unpacking (reader)
they add. Datasets: the demo data as the prepare step writes it (cars-ru10 + the competition
samples), and ``--files`` small generated JPEGs (default 20,000).

    python -m benchmarks.data_handoff [--quick] [--files 20000]

Writes benchmarks/results/data_handoff.json and .md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import environment, write_results
from benchmarks.gcs_throughput import start_emulator

EMULATOR = (
    sys.executable,
    "-c",
    "import sys; from gcp_storage_emulator import storage; "
    "storage.Storage._write_config_to_file = lambda self: None; "
    "from gcp_storage_emulator.__main__ import main; main(sys.argv[1:])",
)
"""gcp-storage-emulator without its persistence: on every object write it serialises the
metadata of ALL objects into its ``.meta`` file (storage.py, ``Storage._write_config_to_file``,
read back only at start), so 20,000 uploads would cost O(n²) in the emulator alone. It runs in
memory here, so nothing is lost; requests are served as before."""

READING_TASKS = 12
"""Tasks of the B6 recipe's pipeline that take the Dataset artifact as input: validate-and-eda,
7 stages, evaluate, predict, export, gate (configs/recipe_b6.yaml)."""


class RequestCounter:
    """Counts the HTTP requests a google-cloud-storage client sends (a requests hook)."""

    def __init__(self, client: Any) -> None:
        self.count = 0
        client._http.hooks.setdefault("response", []).append(self._hook)

    def _hook(self, response: Any, *args: Any, **kwargs: Any) -> None:
        self.count += 1


def launcher_upload(bucket: Any, local: Path, prefix: str) -> int:
    """UploadBlob's pattern: recurse through the folder, one object write per file, in turn."""
    written = 0
    for entry in sorted(os.scandir(local), key=lambda e: e.name):  # Go's os.ReadDir sorts
        if entry.is_dir():
            written += launcher_upload(bucket, Path(entry.path), f"{prefix}/{entry.name}")
        else:
            bucket.blob(f"{prefix}/{entry.name}").upload_from_filename(entry.path)
            written += 1
    return written


def launcher_download(client: Any, bucket: str, prefix: str, local: Path) -> int:
    """DownloadBlob's pattern: list the prefix, then one object read per listed key, in turn."""
    read = 0
    for blob in client.list_blobs(bucket, prefix=prefix):
        target = local / os.path.relpath(blob.name, prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(target))
        read += 1
    return read


def _timed(func: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = func()
    return time.perf_counter() - started, value


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def measure(client: Any, bucket: Any, name: str, artifact: Path, work: Path) -> dict[str, Any]:
    """Upload ``artifact`` as the launcher would, download it again as a reading task would."""
    counter = RequestCounter(client)
    before = counter.count
    up_s, objects = _timed(lambda: launcher_upload(bucket, artifact, name))
    up_requests = counter.count - before
    before = counter.count
    down = work / f"{name}-down"
    down_s, read = _timed(lambda: launcher_download(client, bucket.name, name, down))
    down_requests = counter.count - before
    assert read == objects, (read, objects)
    assert _size(down) == _size(artifact)
    return {
        "objects": objects,
        "mb": round(_size(artifact) / 2**20, 2),
        "upload_s": round(up_s, 2),
        "upload_requests": up_requests,
        "download_s": round(down_s, 2),
        "download_requests": down_requests,
        "downloaded_to": down,
    }


def demo_artifacts(work: Path) -> tuple[Path, Path, float]:
    """The prepare step's Dataset artifact of the demo data (shards), and the same artifact in
    the old layout (data/, test/ as folders). Returns both and the packing time."""
    from carclassifier import artifacts, steps
    from carclassifier.config import dump_config, load_config

    recipe = dump_config(load_config(None, ["name=bench"]))
    new = work / "demo-new"
    steps.prepare_step(recipe, [], "", str(new))
    old = work / "demo-old"
    shutil.copytree(new, old, ignore=shutil.ignore_patterns(artifacts.SHARD_DIR))
    from carclassifier import shards

    shards.extract_shards(new / artifacts.SHARD_DIR, old)
    pack_s, _ = _timed(lambda: shards.write_shards(old, ["data", "test"], work / "demo-repack"))
    assert (work / "demo-repack" / "index.json").read_bytes() == (
        new / artifacts.SHARD_DIR / "index.json"
    ).read_bytes(), "packing the old layout again must give the very same shards"
    return old, new, pack_s


def small_files_artifacts(work: Path, files: int) -> tuple[Path, Path, float]:
    """``files`` small JPEGs (64x48, 10 class folders) as folders and as shards."""
    from carclassifier import shards

    old = work / "small-old"
    rng = np.random.default_rng(0)
    for i in range(files):
        path = old / "data" / f"class_{i % 10}" / f"img_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path, quality=80)
    new = work / "small-new"
    pack_s, _ = _timed(lambda: shards.write_shards(old, ["data"], new / "shards"))
    return old, new, pack_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 small files")
    parser.add_argument("--files", type=int, default=20_000)
    args = parser.parse_args()
    if args.quick:
        args.files = 2_000
    env_before = environment()
    process, endpoint = start_emulator(EMULATOR)
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    results: dict[str, Any] = {}
    try:
        from carclassifier import artifacts, shards, storage

        client = storage.gcs_client()
        bucket = client.create_bucket("bench")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            cases = {
                "demo": demo_artifacts(work),
                f"small_{args.files}": small_files_artifacts(work, args.files),
            }
            for case, (old, new, pack_s) in cases.items():
                print(f"{case}: measuring the old layout ({old}) and the shards ({new})")
                before = measure(client, bucket, f"{case}-old", old, work)
                after = measure(client, bucket, f"{case}-new", new, work)
                shard_dir = after["downloaded_to"] / artifacts.SHARD_DIR
                started = time.perf_counter()
                shards.extract_shards(shard_dir, work / f"{case}-unpacked")
                unpack_s = time.perf_counter() - started
                for row in (before, after):
                    row.pop("downloaded_to")
                after["pack_s"] = round(pack_s, 2)
                after["unpack_s"] = round(unpack_s, 2)
                reader_old = before["download_s"]
                reader_new = after["download_s"] + unpack_s
                run_old = before["upload_s"] + READING_TASKS * reader_old
                run_new = after["upload_s"] + pack_s + READING_TASKS * reader_new
                results[case] = {
                    "files": before,
                    "shards": after,
                    "reading_task_s": {
                        "files": round(reader_old, 2),
                        "shards": round(reader_new, 2),
                    },
                    "reading_task_speedup": round(reader_old / reader_new, 1),
                    "request_ratio": round(
                        before["download_requests"] / after["download_requests"]
                    ),
                    "pipeline_run_s": {"files": round(run_old, 1), "shards": round(run_new, 1)},
                    "pipeline_run_speedup": round(run_old / run_new, 1),
                }
                print(case, results[case])
    finally:
        process.terminate()
        process.wait(timeout=10)
    result = {
        "benchmark": "data_handoff",
        "proxy_for": "KFP v2 launcher DownloadBlob/UploadBlob (object_store.go, 2.2.0 and 2.17.0)",
        "reading_tasks_per_run": READING_TASKS,
        "cases": results,
        "environment_before": env_before,
        "environment_after": environment(),
    }
    write_results("data_handoff", result, _markdown(result))


def _markdown(result: dict[str, Any]) -> list[str]:
    env = result["environment_before"]
    lines = [
        "# Dataset hand-off: one object per image vs. tar shards (gcp-storage-emulator, local)",
        "",
        "The launcher's access pattern (list + one GET per object to read, one write per file to "
        "upload, in turn; kubeflow/pipelines object_store.go DownloadBlob/UploadBlob at 2.2.0 and "
        "2.17.0) repeated with google-cloud-storage: a proxy for the Go launcher, on a local "
        "emulator with no network latency, so real buckets add a round-trip time per request "
        f"on top. Same run for both layouts; load average {env['loadavg_1m']} on "
        f"{env['cpu_count']} cores ({env['utc']}, commit {env['commit']}).",
        "",
        "| dataset | layout | objects | MB | upload s (requests) | download s (requests) "
        "| pack s | unpack s | one reading task s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, r in result["cases"].items():
        for layout in ("files", "shards"):
            row = r[layout]
            lines.append(
                f"| {case} | {layout} | {row['objects']} | {row['mb']} | {row['upload_s']} "
                f"({row['upload_requests']}) | {row['download_s']} ({row['download_requests']}) "
                f"| {row.get('pack_s', '–')} | {row.get('unpack_s', '–')} "
                f"| {r['reading_task_s'][layout]} |"
            )
    lines += [
        "",
        f"Per pipeline run (one upload + {result['reading_tasks_per_run']} reading tasks):",
        "",
        "| dataset | files s | shards s | speed-up | reading task speed-up | requests per read |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case, r in result["cases"].items():
        lines.append(
            f"| {case} | {r['pipeline_run_s']['files']} | {r['pipeline_run_s']['shards']} "
            f"| {r['pipeline_run_speedup']}x | {r['reading_task_speedup']}x "
            f"| {r['files']['download_requests']} → {r['shards']['download_requests']} "
            f"({r['request_ratio']}x fewer) |"
        )
    lines.append("")
    return lines


if __name__ == "__main__":
    main()
