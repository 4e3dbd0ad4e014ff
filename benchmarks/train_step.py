"""Training-step throughput: float32 vs mixed_float16, with and without XLA (jit_compile).

Models are the project's classifiers (`build_classifier`, all backbone blocks trainable, BN frozen
as the recipe's later stages) on synthetic batches, trained with ``train_on_batch`` after a
warm-up (tracing / XLA compilation, timed separately). All variants of one (backbone, size) are
built first, then timed in interleaved rounds so machine noise hits each alike.

    python -m benchmarks.train_step [--quick]                       # CPU: Lite0 at 224 px
    python -m benchmarks.train_step --backbones efficientnet_b0 efficientnet_b3 \
        --sizes 224 448 --weights none --out gpu-NAME                 # what benchmarks/gpu.sh runs

Writes benchmarks/results/<out>.json and .md (default ``train_step``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import environment, write_results  # noqa: E402
from carclassifier.config import ModelConfig  # noqa: E402
from carclassifier.model import build_classifier, set_trainable  # noqa: E402

MODES = {  # name: (dtype policy, jit_compile)
    "fp32": ("float32", False),
    "mixed": ("mixed_float16", False),
    "fp32_xla": ("float32", True),
    "mixed_xla": ("mixed_float16", True),
}
NUM_CLASSES = 10


def build(backbone: str, size: int, mode: str, weights: str | None) -> keras.Model:
    """A compiled classifier in ``mode``; the global dtype policy is restored afterwards."""
    policy, jit = MODES[mode]
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = build_classifier(ModelConfig(backbone=backbone, weights=weights), NUM_CLASSES, size)
        set_trainable(model, 1.0)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-5),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=jit,
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model


def measure(
    backbone: str,
    size: int,
    batch: int,
    modes: list[str],
    steps: int,
    rounds: int,
    weights: str | None,
) -> dict:
    """Images/second per mode for one backbone and size; warm-up seconds apart."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    y = np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, batch)]
    models, warmup, errors = {}, {}, {}
    for mode in modes:
        try:
            models[mode] = build(backbone, size, mode, weights)
            started = time.perf_counter()
            models[mode].train_on_batch(x, y)
            models[mode].train_on_batch(x, y)
            warmup[mode] = round(time.perf_counter() - started, 2)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at 448 px: recorded, not fatal
            errors[mode] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            models.pop(mode, None)
    step_seconds: dict[str, list[float]] = {mode: [] for mode in models}
    for _ in range(rounds):
        for mode, model in models.items():
            started = time.perf_counter()
            for _ in range(steps):
                loss = model.train_on_batch(x, y)
            float(np.asarray(loss[0] if isinstance(loss, list) else loss))  # wait for the device
            step_seconds[mode].append((time.perf_counter() - started) / steps)
    row: dict = {"backbone": backbone, "image_size": size, "batch_size": batch, "modes": {}}
    for mode, seconds in step_seconds.items():
        step = statistics.median(seconds)
        row["modes"][mode] = {
            "step_ms": round(step * 1e3, 2),
            "img_s": round(batch / step, 2),
            "ms_per_image": round(step * 1e3 / batch, 3),
            "warmup_s": warmup[mode],
            "rounds_step_ms": [round(s * 1e3, 2) for s in seconds],
        }
    for mode, error in errors.items():
        row["modes"][mode] = {"error": error}
    if "fp32" in step_seconds:
        base = statistics.median(step_seconds["fp32"])
        for mode, seconds in step_seconds.items():
            row["modes"][mode]["speedup_vs_fp32"] = round(base / statistics.median(seconds), 2)
    keras.backend.clear_session()
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 step x 1 round")
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batch-448", type=int, default=None, help="batch at 448 px")
    parser.add_argument(
        "--modes", nargs="+", default=["fp32", "mixed", "fp32_xla"], choices=list(MODES)
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--weights", default="none", help="none (random) or imagenet")
    parser.add_argument("--out", default="train_step")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 1, 1
    weights = None if args.weights == "none" else args.weights
    env_before = environment()
    rows = []
    for backbone in args.backbones:
        for size in args.sizes:
            batch = args.batch_448 if size >= 448 and args.batch_448 else args.batch
            row = measure(backbone, size, batch, args.modes, args.steps, args.rounds, weights)
            print({k: v for k, v in row.items() if k != "modes"},
                  {m: r.get("img_s", r.get("error")) for m, r in row["modes"].items()},
                  flush=True)  # fmt: skip
            rows.append(row)
    result = {
        "benchmark": "train_step",
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "weights": args.weights,
        "environment_before": env_before,
        "environment_after": environment(),
        "results": rows,
    }
    lines = [
        f"# Training step throughput ({env_before['processor']}, {env_before['cpu_count']} "
        f"logical CPUs{', ' + result['environment_before'].get('gpu', '') if 'gpu' in env_before else ''})",
        "",
        f"All backbone blocks trainable (BN frozen), Adam, synthetic batches; median of "
        f"{args.rounds} interleaved rounds of {args.steps} steps after a 2-step warm-up. "
        f"Load average {env_before['loadavg_1m']} before, "
        f"{result['environment_after']['loadavg_1m']} after.",
        "",
        "| backbone | size | batch | mode | step ms | img/s | ms/image | vs fp32 | warm-up s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for mode, r in row["modes"].items():
            if "error" in r:
                lines.append(
                    f"| {row['backbone']} | {row['image_size']} | {row['batch_size']} | {mode} "
                    f"| failed: {r['error'][:80]} | | | | |"
                )
                continue
            lines.append(
                f"| {row['backbone']} | {row['image_size']} | {row['batch_size']} | {mode} | "
                f"{r['step_ms']} | {r['img_s']} | {r['ms_per_image']} | "
                f"{r.get('speedup_vs_fp32', '-')} | {r['warmup_s']} |"
            )
    lines.append("")
    write_results(args.out, result, lines)
    return result


if __name__ == "__main__":
    main()
