"""GPU benchmark (the Python part of benchmarks/gpu.sh): train steps and input vs step time.

1. Train-step throughput of EfficientNet B0/B3/B6 (random weights, no download) at 224 and
   448 px in float32, mixed_float16 and mixed_float16 + XLA (`benchmarks.train_step.measure`),
   at the recipe's batch sizes (32 at 224, 8 at 448).
2. The real input pipeline (tf.data, training augmentation, decoded-image cache, workers = CPU
   count) on the photos in ../shared/data (else generated ones): milliseconds per batch in the
   first epoch and in the steady state, next to the step time per batch: input-bound or not.

A time budget (``--budget-s``) skips what would not fit and records it as skipped.
``--smoke`` runs a tiny version on whatever device there is (the CPU here) to test the logic.

    python -m benchmarks.gpu --device "NVIDIA H100 80GB HBM3" --out gpu-nvidia-h100-80gb-hbm3
    python -m benchmarks.gpu --smoke --out gpu-smoke
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from benchmarks.common import environment, write_results  # noqa: E402
from benchmarks.input_pipeline import epoch_seconds  # noqa: E402
from benchmarks.train_step import measure  # noqa: E402
from carclassifier.config import load_config  # noqa: E402
from carclassifier.data import load_dataset  # noqa: E402
from carclassifier.demo_data import demo_dataset_root  # noqa: E402


def input_timing(size: int, batch: int, images: int, workers: int, epochs: int) -> dict:
    """Per-batch milliseconds of the training input pipeline: first epoch and steady state."""
    dataset = load_dataset(demo_dataset_root())
    frame = dataset.records.head(images).reset_index(drop=True)
    config = load_config(
        None,
        [
            "input.pipeline=tf_data",
            "input.cache=memory",
            f"input.image_size={size}",
            f"input.batch_size={batch}",
            f"input.workers={workers}",
        ],
    )
    seconds = epoch_seconds(config, frame, dataset, epochs)
    batches = -(-len(frame) // batch)
    return {
        "image_size": size,
        "batch_size": batch,
        "images": len(frame),
        "workers": workers,
        "first_epoch_ms_per_batch": round(seconds[0] / batches * 1e3, 2),
        "steady_ms_per_batch": round(sum(seconds[1:]) / (len(seconds) - 1) / batches * 1e3, 2),
        "first_epoch_img_s": round(len(frame) / seconds[0], 1),
        "steady_img_s": round(len(frame) * (len(seconds) - 1) / sum(seconds[1:]), 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="device name (nvidia-smi)")
    parser.add_argument("--out", default=None, help="results name, e.g. gpu-nvidia-t4")
    parser.add_argument("--smoke", action="store_true", help="tiny run that fits a CPU")
    parser.add_argument("--budget-s", type=float, default=420.0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.smoke:
        raise SystemExit(
            "gpu.py: TensorFlow sees no GPU (the development .venv has tensorflow-cpu); run it "
            "where tensorflow[and-cuda]==2.21.0 is installed, e.g. the trainer image "
            "(docker/trainer.Dockerfile), or use --smoke for a CPU dry run"
        )
    details = tf.config.experimental.get_device_details(gpus[0]) if gpus else {}
    device = args.device or details.get("device_name") or ("GPU" if gpus else "CPU")
    if args.smoke:
        plan = [("efficientnet_b0", 64, 4)]
        modes, steps, rounds = ["fp32", "mixed"], 1, 1
        inputs_plan, images, epochs = [(64, 4)], 24, 2
    else:
        plan = [  # the recipe's B6 first: the cost model needs it most
            (backbone, size, 32 if size == 224 else 8)
            for backbone in ("efficientnet_b6", "efficientnet_b0", "efficientnet_b3")
            for size in (224, 448)
        ]
        modes, steps, rounds = ["fp32", "mixed", "mixed_xla"], 10, 2
        inputs_plan, images, epochs = [(224, 32), (448, 8)], 512, 3
    workers = os.cpu_count() or 1
    env = environment()
    env["gpu"] = device
    env["gpu_details"] = {k: str(v) for k, v in details.items()}
    inputs = {}
    for size, batch in inputs_plan:  # first: cheap, and the step comparison needs it
        inputs[size] = input_timing(size, batch, images, workers, epochs)
        print("input", inputs[size], flush=True)
    train, skipped = [], []
    for backbone, size, batch in plan:
        elapsed = time.monotonic() - started
        if elapsed > args.budget_s * 0.85:  # one more (backbone, size) must still fit
            skipped.append({"backbone": backbone, "image_size": size, "elapsed_s": round(elapsed)})
            continue
        row = measure(backbone, size, batch, modes, steps, rounds, weights=None)
        step_input = inputs.get(size)
        for result in row["modes"].values():
            if "step_ms" in result and step_input:
                result["input_steady_ms_per_batch"] = step_input["steady_ms_per_batch"]
                result["input_first_epoch_ms_per_batch"] = step_input["first_epoch_ms_per_batch"]
                result["input_bound_steady"] = step_input["steady_ms_per_batch"] > result["step_ms"]
                result["input_bound_first_epoch"] = (
                    step_input["first_epoch_ms_per_batch"] > result["step_ms"]
                )
        train.append(row)
        print("train", backbone, size, {m: r.get("img_s", r.get("error")) for m, r in
                                        row["modes"].items()}, flush=True)  # fmt: skip
    result = {
        "benchmark": "gpu",
        "device": device,
        "smoke": args.smoke,
        "seconds": round(time.monotonic() - started, 1),
        "environment": env,
        "train_step": train,
        "skipped_for_time": skipped,
        "input_pipeline": list(inputs.values()),
    }
    out = args.out or "gpu-" + "".join(c if c.isalnum() else "-" for c in device.lower())
    lines = [
        f"# GPU benchmark: {device}",
        "",
        f"{env['cpu_count']} CPUs ({env['processor']}), TF {env['tensorflow']}, "
        f"{result['seconds']} s in all{' (smoke run)' if args.smoke else ''}. Random weights; "
        f"median of {rounds} rounds of {steps} steps after a 2-step warm-up.",
        "",
        "| backbone | size | batch | mode | step ms | img/s | vs fp32 | input ms/batch first / "
        "steady | input-bound (first / steady) |",
        "|---|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for row in train:
        for mode, r in row["modes"].items():
            if "error" in r:
                lines.append(f"| {row['backbone']} | {row['image_size']} | "
                             f"{row['batch_size']} | {mode} | failed: {r['error'][:60]} |||||")  # fmt: skip
                continue
            lines.append(
                f"| {row['backbone']} | {row['image_size']} | {row['batch_size']} | {mode} | "
                f"{r['step_ms']} | {r['img_s']} | {r.get('speedup_vs_fp32', '-')} | "
                f"{r.get('input_first_epoch_ms_per_batch', '-')} / "
                f"{r.get('input_steady_ms_per_batch', '-')} | "
                f"{r.get('input_bound_first_epoch', '-')} / {r.get('input_bound_steady', '-')} |"
            )
    if skipped:
        lines += ["", f"Skipped for time: {skipped}"]
    lines.append("")
    write_results(out, result, lines)
    return result


if __name__ == "__main__":
    main()
