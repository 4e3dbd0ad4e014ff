"""Inference speed of the exported model: Keras vs the SavedModel signature vs ONNX Runtime.

Latency of batch 1 and throughput of batch 32 on this CPU, the three backends interleaved
round by round (the machine is shared and noisy); each backend's probabilities are checked
against Keras first. The ONNX model is made by `carclassifier.export.export_onnx` (checked within
1e-4 when written) into a temporary folder.

    python -m benchmarks.inference [--quick] [--export runs/local/export]

Writes benchmarks/results/inference.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from benchmarks.common import environment, write_results  # noqa: E402

Predict = Callable[[np.ndarray], np.ndarray]


def saved_model_dir(export: Path) -> Path:
    """``saved_model/1`` (current layout) or ``saved_model`` (exports made before it)."""
    versioned = export / "saved_model" / "1"
    return versioned if (versioned / "saved_model.pb").exists() else export / "saved_model"


def backends(export: Path, onnx_dir: Path) -> tuple[dict[str, Predict], int]:
    """Predict functions of the three backends for the export folder, and its image size."""
    import onnxruntime as ort
    import tensorflow as tf

    from carclassifier.export import export_onnx, load_exported

    model, labels = load_exported(export)
    size = int(model.input_shape[1])
    signature = tf.saved_model.load(str(saved_model_dir(export))).signatures["serving_default"]
    onnx_path = export_onnx(model, onnx_dir)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def keras_predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict_on_batch(x))

    def saved_model_predict(x: np.ndarray) -> np.ndarray:
        return signature(image=tf.constant(x))["output_0"].numpy()

    def onnx_predict(x: np.ndarray) -> np.ndarray:
        return session.run(["output_0"], {"image": x})[0]

    return {
        "keras": keras_predict,
        "saved_model": saved_model_predict,
        "onnxruntime": onnx_predict,
    }, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--export", default="runs/local/export")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20, help="batch-1 calls per round")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.calls = 2, 5
    export = Path(args.export)
    env_before = environment()
    with tempfile.TemporaryDirectory() as onnx_dir:
        predict, size = backends(export, Path(onnx_dir))
        rng = np.random.default_rng(0)
        single = rng.uniform(0, 255, (1, size, size, 3)).astype(np.float32)
        batch = rng.uniform(0, 255, (args.batch, size, size, 3)).astype(np.float32)
        reference = predict["keras"](batch)
        max_diff = {
            name: float(np.abs(fn(batch) - reference).max()) for name, fn in predict.items()
        }
        for fn in predict.values():  # warm-up: graph tracing, allocations
            fn(single), fn(batch)
        latency: dict[str, list[float]] = {name: [] for name in predict}
        throughput: dict[str, list[float]] = {name: [] for name in predict}
        for _ in range(args.rounds):
            for name, fn in predict.items():
                for _ in range(args.calls):
                    started = time.perf_counter()
                    fn(single)
                    latency[name].append((time.perf_counter() - started) * 1e3)
                started = time.perf_counter()
                fn(batch)
                throughput[name].append(args.batch / (time.perf_counter() - started))
    rows = {
        name: {
            "batch1_latency_ms_median": round(statistics.median(latency[name]), 2),
            "batch1_latency_ms_p90": round(float(np.percentile(latency[name], 90)), 2),
            f"batch{args.batch}_img_s_median": round(statistics.median(throughput[name]), 1),
            "max_abs_diff_vs_keras": max_diff[name],
        }
        for name in predict
    }
    exact = [n for n in rows if rows[n]["max_abs_diff_vs_keras"] <= 1e-4]
    fastest_latency = min(exact, key=lambda n: rows[n]["batch1_latency_ms_median"])
    fastest_throughput = max(exact, key=lambda n: rows[n][f"batch{args.batch}_img_s_median"])
    result = {
        "benchmark": "inference",
        "export": str(export),
        "image_size": size,
        "rounds": args.rounds,
        "batch1_calls": args.rounds * args.calls,
        "environment_before": env_before,
        "environment_after": environment(),
        "results": rows,
        "fastest_exact_batch1": fastest_latency,
        f"fastest_exact_batch{args.batch}": fastest_throughput,
    }
    print(result)
    lines = [
        "# Inference: Keras vs SavedModel signature vs ONNX Runtime (CPU)",
        "",
        f"Export `{export}` ({size} px). {args.rounds} interleaved rounds of {args.calls} "
        f"batch-1 calls and one batch-{args.batch} call per backend. "
        f"{env_before['cpu_count']} CPU cores, load average {env_before['loadavg_1m']} before, "
        f"{result['environment_after']['loadavg_1m']} after (other jobs shared the cores).",
        "",
        f"| backend | batch 1 latency ms (median) | p90 | batch {args.batch} img/s | "
        "max abs diff vs Keras |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {name} | {r['batch1_latency_ms_median']} | {r['batch1_latency_ms_p90']} | "
            f"{r[f'batch{args.batch}_img_s_median']} | {r['max_abs_diff_vs_keras']:.1e} |"
            for name, r in rows.items()
        ],
        "",
        f"Fastest backend within 1e-4 of Keras: **{fastest_latency}** at batch 1, "
        f"**{fastest_throughput}** at batch {args.batch}.",
        "",
    ]
    write_results("inference", result, lines)


if __name__ == "__main__":
    main()
