"""Peak resident memory (RSS) of a training stage and of inference-only processes.

* training: ``carclassifier train-stage`` of the local recipe's ``stage_4`` (all layers
  trainable, Lite0, 224 px, batch 32) with ``train.steps_per_epoch`` capped, in a child process;
  peak RSS sampled with psutil every 0.1 s (child and its children) and the kernel's
  ``ru_maxrss`` of the child;
* inference: one child per backend (Keras, SavedModel, ONNX Runtime without TensorFlow imported)
  loading the export and answering 20 batch-1 and 3 batch-32 requests.

    python -m benchmarks.memory [--quick] [--export runs/local/export]

Writes benchmarks/results/memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

from benchmarks.common import environment, write_results

ROOT = Path(__file__).resolve().parents[1]

INFERENCE_CHILD = textwrap.dedent(
    """
    import json, os, resource, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    backend, export, onnx_path = sys.argv[1:4]
    if backend == "onnxruntime":
        import onnxruntime as ort
        session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        size = session.get_inputs()[0].shape[1]
        predict = lambda x: session.run(["output_0"], {"image": x})[0]
    elif backend == "saved_model":
        import tensorflow as tf
        from pathlib import Path
        folder = Path(export) / "saved_model"
        folder = folder / "1" if (folder / "1").exists() else folder
        signature = tf.saved_model.load(str(folder)).signatures["serving_default"]
        size = signature.structured_input_signature[1]["image"].shape[1]
        predict = lambda x: signature(image=tf.constant(x))["output_0"].numpy()
    else:
        from carclassifier.export import load_exported
        model, _ = load_exported(export)
        size = model.input_shape[1]
        predict = lambda x: model.predict_on_batch(x)
    rng = np.random.default_rng(0)
    for _ in range(20):
        predict(rng.uniform(0, 255, (1, size, size, 3)).astype(np.float32))
    for _ in range(3):
        predict(rng.uniform(0, 255, (32, size, size, 3)).astype(np.float32))
    print(json.dumps({"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
)


def run_and_sample(command: list[str], env: dict | None = None) -> dict:
    """Run ``command``; peak RSS (MB) of it and its children, sampled, plus its ru_maxrss."""
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            rss = watched.memory_info().rss
            rss += sum(c.memory_info().rss for c in watched.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({process.returncode}): {stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "peak_rss_sampled_mb": round(peak / 2**20, 1),
        # max over all waited-for children so far: meaningful when this child is the largest
        "ru_maxrss_children_mb": round(after / 1024, 1) if after > before else None,
        "seconds": round(time.perf_counter() - started, 1),
        "stdout_tail": stdout.strip().splitlines()[-1:] if stdout.strip() else [],
    }


def training(steps: int, work: Path) -> dict:
    cli = str(Path(sys.executable).with_name("carclassifier"))
    command = [
        cli, "train-stage", "--config", "configs/recipe_lite0_local.yaml",
        "--set", f"train.steps_per_epoch={steps}", "--out", str(work / "run"),
        "--stage", "stage_4", "--stage-out", str(work / "stage_4"),
    ]  # fmt: skip
    row = run_and_sample(command)
    row.update(
        {
            "what": "train-stage stage_4 (Lite0, all layers, 224 px, batch 32, 1 epoch)",
            "steps_per_epoch": steps,
        }
    )
    return row


def inference(export: Path, work: Path) -> dict:
    onnx_dir = work / "onnx"
    subprocess.run(
        [sys.executable, "-c",
         "import sys; from carclassifier.export import load_exported, export_onnx; "
         "export_onnx(load_exported(sys.argv[1])[0], sys.argv[2])", str(export), str(onnx_dir)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    rows = {}
    for backend in ("keras", "saved_model", "onnxruntime"):
        row = run_and_sample(
            [sys.executable, "-c", INFERENCE_CHILD, backend, str(export),
             str(onnx_dir / "model.onnx")]
        )  # fmt: skip
        row["ru_maxrss_self_mb"] = round(json.loads(row.pop("stdout_tail")[0])["ru_maxrss_mb"], 1)
        rows[backend] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 training steps")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--export", default="runs/local/export")
    args = parser.parse_args()
    if args.quick:
        args.steps = 2
    env_before = environment()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train = training(args.steps, work)
        infer = inference(Path(args.export), work)
    result = {
        "benchmark": "memory",
        "environment_before": env_before,
        "environment_after": environment(),
        "total_memory_mb": round(psutil.virtual_memory().total / 2**20),
        "training": train,
        "inference": infer,
    }
    print(json.dumps(result, indent=2))
    lines = [
        "# Peak memory (RSS)",
        "",
        f"{env_before['cpu_count']} CPU cores, {result['total_memory_mb']} MB RAM; load average "
        f"{env_before['loadavg_1m']}. Sampled every 0.1 s with psutil (child + its children); "
        "ru_maxrss is the kernel's peak of the child process.",
        "",
        "| process | peak RSS MB (sampled) | ru_maxrss MB | seconds |",
        "|---|---:|---:|---:|",
        f"| training: {train['what']}, {train['steps_per_epoch']} steps | "
        f"{train['peak_rss_sampled_mb']} | {train['ru_maxrss_children_mb']} | {train['seconds']} |",
        *[
            f"| inference only: {name} (20 x batch 1, 3 x batch 32) | {r['peak_rss_sampled_mb']} | "
            f"{r['ru_maxrss_self_mb']} | {r['seconds']} |"
            for name, r in infer.items()
        ],
        "",
    ]
    write_results("memory", result, lines)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
