"""Images/second of the two input pipelines on the same images and transforms, side by side.

Both pipelines use the training augmentation of the default config. The recipe's generator
(`ImageDataAugmentor`, a keras PyDataset) is read the way ``model.fit`` reads it: through
Keras' PyDataset adapter with its worker threads. Runs alternate A/B/A/B so machine noise
hits both; the median of the repeats is reported, and the ratio tf.data / generator.

    python benchmarks/input_pipeline.py [--images 160] [--repeats 3] [--sizes 224 448]

Writes benchmarks/results/input_pipeline.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter  # noqa: E402

from carclassifier.config import load_config  # noqa: E402
from carclassifier.data import load_dataset, make_split  # noqa: E402
from carclassifier.demo_data import demo_dataset_root  # noqa: E402
from carclassifier.inputs import make_inputs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def images_per_second(pipeline: str, size: int, frame, dataset, batch_size: int) -> float:
    config = load_config(
        None,
        [
            f"input.pipeline={pipeline}",
            f"input.image_size={size}",
            f"input.batch_size={batch_size}",
            "input.workers=2",
        ],
    )
    batches = make_inputs(config, dataset.root, frame, dataset.class_names, training=True)
    if pipeline == "tf_data":
        iterator = batches.as_numpy_iterator()
    else:
        iterator = PyDatasetAdapter(batches, shuffle=False).get_numpy_iterator()
    started = time.perf_counter()
    count = sum(len(x) for x, _ in iterator)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    args = parser.parse_args()

    dataset = load_dataset(demo_dataset_root())
    split = make_split(dataset.records, 0.2, 42)
    frame = split[split["subset"] == "train"].head(args.images).reset_index(drop=True)
    rows = []
    for size in args.sizes:
        runs: dict[str, list[float]] = {"tf_data": [], "image_data_augmentor": []}
        images_per_second(
            "tf_data", size, frame.head(args.batch_size), dataset, args.batch_size
        )  # warm-up
        for _ in range(args.repeats):
            for pipeline in runs:
                runs[pipeline].append(
                    images_per_second(pipeline, size, frame, dataset, args.batch_size)
                )
        fast, recipe = (statistics.median(runs[p]) for p in ("tf_data", "image_data_augmentor"))
        rows.append(
            {
                "image_size": size,
                "tf_data_img_s": round(fast, 1),
                "image_data_augmentor_img_s": round(recipe, 1),
                "ratio": round(fast / recipe, 2),
                "runs": runs,
            }
        )
        print(
            f"{size}px: tf.data {fast:.1f} img/s, ImageDataAugmentor {recipe:.1f} img/s, "
            f"ratio {fast / recipe:.2f}"
        )
    result = {
        "benchmark": "input_pipeline",
        "dataset": str(dataset.root),
        "images": len(frame),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "tensorflow": tf.__version__,
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "input_pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Input pipeline throughput (training augmentation, same images)",
        "",
        f"{len(frame)} images of `{Path(dataset.root).name}`, batch {args.batch_size}, "
        f"median of {args.repeats} alternating runs, {os.cpu_count()} CPU cores.",
        "",
        "| image size | tf.data img/s | ImageDataAugmentor img/s | ratio |",
        "|---:|---:|---:|---:|",
        *[
            f"| {r['image_size']} | {r['tf_data_img_s']} | {r['image_data_augmentor_img_s']} | "
            f"{r['ratio']} |"
            for r in rows
        ],
        "",
    ]
    (RESULTS / "input_pipeline.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
