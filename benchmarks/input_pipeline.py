"""Images/second of the two input pipelines on the same images and transforms, side by side.

Both pipelines use the training augmentation of the default config and produce the same
batches (tests/test_input_determinism.py). Compared, per image size:

* ``generator``: the recipe's ``ImageDataAugmentor`` (a keras PyDataset, no cache), read the way
  ``model.fit`` reads it: through Keras' PyDataset adapter with its worker threads;
* ``tf_data``: the default tf.data pipeline (decoded-image cache in memory, parallel map);
* ``tf_data_nocache``: the same without the cache (what the cache adds).

Each variant runs ``--epochs`` epochs; the first (JPEG decoding) and the later ones (steady
state, from the cache) are timed separately. Variants alternate A/B/C/A/B/C so machine noise hits
all; medians of the repeats are reported, with the ratios to the generator and the whole-stage
ratio of stages of 1, 5, 10 and 15 epochs. A quick single-thread profile (decode vs augment vs
cast per image) comes first. The load average is recorded: other jobs share the cores.

    python benchmarks/input_pipeline.py [--quick] [--images 320] [--repeats 3] [--sizes 224 448]

Writes benchmarks/results/input_pipeline.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter  # noqa: E402

from benchmarks.common import environment, write_results  # noqa: E402
from carclassifier.augment import train_transform  # noqa: E402
from carclassifier.config import RunConfig, load_config  # noqa: E402
from carclassifier.data import load_dataset, load_image, make_split  # noqa: E402
from carclassifier.demo_data import demo_dataset_root  # noqa: E402
from carclassifier.inputs import (  # noqa: E402
    ExampleMaker,
    batches_per_epoch,
    cache_megabytes,
    example_seed,
    make_inputs,
)

VARIANTS = {
    "generator": ["input.pipeline=image_data_augmentor", "input.cache=off"],
    "tf_data": ["input.pipeline=tf_data", "input.cache=memory"],
    "tf_data_nocache": ["input.pipeline=tf_data", "input.cache=off"],
}
STAGE_EPOCHS = (1, 5, 10, 15)


def variant_config(variant: str, size: int, batch_size: int, workers: int) -> RunConfig:
    return load_config(
        None,
        [
            *VARIANTS[variant],
            f"input.image_size={size}",
            f"input.batch_size={batch_size}",
            f"input.workers={workers}",
        ],
    )


def epoch_seconds(config: RunConfig, frame, dataset, epochs: int) -> list[float]:
    """Seconds of each of ``epochs`` training epochs, read as ``model.fit`` reads them."""
    batches = make_inputs(config, dataset.root, frame, dataset.class_names, training=True)
    steps = batches_per_epoch(len(frame), config.input.batch_size)
    seconds = []
    if config.input.pipeline == "tf_data":
        iterator = iter(batches)
        for _ in range(epochs):
            started = time.perf_counter()
            count = sum(len(next(iterator)[0]) for _ in range(steps))
            seconds.append(time.perf_counter() - started)
            assert count == len(frame)
        return seconds
    adapter = PyDatasetAdapter(batches, shuffle=False)
    for _ in range(epochs):
        adapter.on_epoch_begin()
        started = time.perf_counter()
        count = sum(len(x) for x, _ in adapter.get_numpy_iterator())
        seconds.append(time.perf_counter() - started)
        adapter.on_epoch_end()
        assert count == len(frame)
    return seconds


def profile(paths: list[str], size: int, config: RunConfig) -> dict[str, float]:
    """Milliseconds per image on one thread: JPEG decode + resize, augmentation, float cast."""
    started = time.perf_counter()
    images = [load_image(p, (size, size)) for p in paths]
    decode = (time.perf_counter() - started) / len(paths)
    maker = ExampleMaker((size, size), train_transform(config.augment, size, 0))
    started = time.perf_counter()
    augmented = [maker.augmented(im, example_seed(0, 0, i)) for i, im in enumerate(images)]
    augment = (time.perf_counter() - started) / len(paths)
    started = time.perf_counter()
    for im in augmented:
        im.astype(np.float32)
    cast = (time.perf_counter() - started) / len(paths)
    return {
        "decode_ms": round(decode * 1e3, 2),
        "augment_ms": round(augment * 1e3, 2),
        "float_cast_ms": round(cast * 1e3, 2),
    }


def summarize(size: int, runs: dict[str, list[list[float]]], n_images: int) -> dict:
    """Medians of first-epoch and steady-state throughput, ratios to the generator."""
    row: dict = {"image_size": size}
    first = {v: statistics.median(r[0] for r in runs[v]) for v in runs}
    steady = {v: statistics.median(statistics.mean(r[1:]) for r in runs[v]) for v in runs}
    for variant in runs:
        row[variant] = {
            "first_epoch_img_s": round(n_images / first[variant], 1),
            "steady_img_s": round(n_images / steady[variant], 1),
            "epoch_seconds": [[round(s, 3) for s in r] for r in runs[variant]],
        }
    base = "generator"
    for variant in runs:
        if variant == base:
            continue
        row[variant]["ratio_first_epoch"] = round(first[base] / first[variant], 2)
        row[variant]["ratio_steady"] = round(steady[base] / steady[variant], 2)
        row[variant]["ratio_stage"] = {
            str(e): round(
                (first[base] + (e - 1) * steady[base])
                / (first[variant] + (e - 1) * steady[variant]),
                2,
            )
            for e in STAGE_EPOCHS
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="96 images, 1 repeat, 2 epochs")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats, args.epochs = 96, 1, 2

    dataset = load_dataset(demo_dataset_root())
    split = make_split(dataset.records, 0.2, 42)
    frame = split[split["subset"] == "train"].head(args.images).reset_index(drop=True)
    paths = [str(Path(dataset.root) / p) for p in frame["path"][:48]]
    env_before = environment()
    rows = []
    for size in args.sizes:
        configs = {v: variant_config(v, size, args.batch_size, args.workers) for v in VARIANTS}
        prof = profile(paths, size, configs["tf_data"])
        epoch_seconds(configs["tf_data"], frame.head(args.batch_size * 2), dataset, 2)  # warm-up
        runs: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for variant, config in configs.items():
                runs[variant].append(epoch_seconds(config, frame, dataset, args.epochs))
        row = summarize(size, runs, len(frame))
        row["profile_one_thread"] = prof
        row["cache_mb"] = round(cache_megabytes(len(frame), size), 1)
        rows.append(row)
        tf_row = row["tf_data"]
        print(
            f"{size}px: profile {prof}; generator {row['generator']['steady_img_s']} img/s, "
            f"tf.data first epoch {tf_row['first_epoch_img_s']} img/s "
            f"(x{tf_row['ratio_first_epoch']}), steady {tf_row['steady_img_s']} img/s "
            f"(x{tf_row['ratio_steady']}), stage ratios {tf_row['ratio_stage']}",
            flush=True,
        )
    result = {
        "benchmark": "input_pipeline",
        "dataset": str(dataset.root),
        "images": len(frame),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "repeats": args.repeats,
        "epochs": args.epochs,
        "environment_before": env_before,
        "environment_after": environment(),
        "results": rows,
    }
    lines = [
        "# Input pipeline throughput (training augmentation, same images, same batches)",
        "",
        f"{len(frame)} images of `{Path(dataset.root).name}`, batch {args.batch_size}, "
        f"{args.workers} workers, {args.epochs} epochs per run, median of {args.repeats} "
        f"alternating runs. {env_before['cpu_count']} CPU cores; load average "
        f"{env_before['loadavg_1m']} before, {result['environment_after']['loadavg_1m']} after "
        "(other jobs shared the cores).",
        "",
        "`generator`: the recipe's ImageDataAugmentor (PyDataset, worker threads, no cache). "
        "`tf_data`: the default pipeline (decoded-image cache, parallel map, uint8 into TF). "
        "First epoch decodes the JPEGs; steady = later epochs (from the cache). "
        "Stage ratio: whole-stage input time of the generator / tf.data for a stage of E epochs.",
        "",
        "| size | variant | first epoch img/s | steady img/s | ratio first | ratio steady | "
        + " | ".join(f"stage {e} ep." for e in STAGE_EPOCHS)
        + " |",
        "|---:|---|---:|---:|---:|---:|" + "---:|" * len(STAGE_EPOCHS),
    ]
    for row in rows:
        for variant in VARIANTS:
            r = row[variant]
            stage = r.get("ratio_stage", {})
            lines.append(
                f"| {row['image_size']} | {variant} | {r['first_epoch_img_s']} | "
                f"{r['steady_img_s']} | {r.get('ratio_first_epoch', '-')} | "
                f"{r.get('ratio_steady', '-')} | "
                + " | ".join(str(stage.get(str(e), "-")) for e in STAGE_EPOCHS)
                + " |"
            )
    lines += [
        "",
        "One-thread profile, ms per image (decode = PIL with draft + bilinear resize; augment = "
        "the albumentations training transform; cast = uint8 to float32):",
        "",
        "| size | decode | augment | float cast | cache MB for these images |",
        "|---:|---:|---:|---:|---:|",
        *[
            f"| {r['image_size']} | {r['profile_one_thread']['decode_ms']} | "
            f"{r['profile_one_thread']['augment_ms']} | "
            f"{r['profile_one_thread']['float_cast_ms']} | {r['cache_mb']} |"
            for r in rows
        ],
        "",
    ]
    write_results("input_pipeline", result, lines)


if __name__ == "__main__":
    main()
