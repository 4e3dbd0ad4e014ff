"""Backbones side by side on the demo data: validation accuracy, robustness, seconds per epoch.

Every backbone trains the same short recipe from its ImageNet weights, on the same split of the
demo data (``configs/recipe_lite0_local.yaml``'s data, input and head settings): ``stage_1``
head only, then ``stage_2`` all layers, all at one image size (default 224 px, so only the
backbone differs). The final model is then scored on the validation images as they are and
under fixed corruptions (blur, noise, JPEG, dark, low resolution; albumentations, seeded).

    python -m benchmarks.backbones                    # Lite0, Lite1, Lite2: 2 + 1 epochs, 224 px
    python -m benchmarks.backbones --head-epochs 1 --full-epochs 0 --image-size 64 --out x

Writes benchmarks/results/<out>.json and .md (default ``backbones``); the runs go under
``--runs`` (default runs/bench-backbones, replaced).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import albumentations as A  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import environment, write_results  # noqa: E402
from carclassifier.augment import build_transform  # noqa: E402
from carclassifier.config import RunConfig, TransformSpec, load_config  # noqa: E402
from carclassifier.data import load_image  # noqa: E402
from carclassifier.prepare import PreparedData, validate_and_split  # noqa: E402
from carclassifier.stages import load_model, train_recipe  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recipe_lite0_local.yaml"
BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
HEAD_LR, FULL_LR = 5.0e-3, 1.0e-4  # the recipe's stage_1 and stage_3 learning rates
# Fixed, moderate corruptions of the kind phone photos of cars suffer (each applied alone, p=1).
CORRUPTIONS: dict[str, TransformSpec] = {
    "blur": {"GaussianBlur": {"sigma_limit": [2.0, 2.0], "blur_limit": 0, "p": 1.0}},
    "noise": {"GaussNoise": {"std_range": [0.08, 0.08], "p": 1.0}},
    "jpeg": {"ImageCompression": {"quality_range": [10, 10], "p": 1.0}},
    "dark": {
        "RandomBrightnessContrast": {
            "brightness_limit": [-0.35, -0.35],
            "contrast_limit": [-0.35, -0.35],
            "p": 1.0,
        }
    },
    "low_res": {"Downscale": {"scale_range": [0.25, 0.25], "p": 1.0}},
}


def recipe(backbone: str, image_size: int, head_epochs: int, full_epochs: int) -> RunConfig:
    """The local recipe with ``backbone`` and the short two-stage schedule."""
    data = load_config(RECIPE).model_dump(mode="json")
    data["name"] = f"bench-{backbone}"
    data["model"]["backbone"] = backbone
    data["input"]["image_size"] = image_size
    stages = [
        {"name": "stage_1", "description": "head only", "epochs": head_epochs,
         "unfreeze": 0.0, "learning_rate": HEAD_LR},
        {"name": "stage_2", "description": "all layers", "epochs": full_epochs,
         "unfreeze": 1.0, "learning_rate": FULL_LR},
    ]  # fmt: skip
    data["stages"] = [s for s in stages if s["epochs"] > 0]
    return RunConfig.model_validate(data)


def prepare_split(config: RunConfig, runs: Path) -> PreparedData:
    """An emptied ``runs`` folder and the one split of ``config``'s data every row trains on."""
    shutil.rmtree(runs, ignore_errors=True)
    config = config.model_copy(update={"output_dir": str(runs)})
    return validate_and_split(config, runs / "prepare", progress=False)


def corrupted_accuracy(
    model: keras.Model, prepared: PreparedData, image_size: int, seed: int
) -> dict[str, float]:
    """Accuracy of ``model`` on the validation images: ``clean`` and each of `CORRUPTIONS`."""
    val = prepared.subset("val")
    images = np.stack(
        [load_image(prepared.dataset.root / p, (image_size, image_size)) for p in val["path"]]
    )
    labels = val["label"].to_numpy()
    views = {"clean": images}
    for name, spec in CORRUPTIONS.items():
        transform = A.Compose([build_transform(spec, image_size)], seed=seed)
        views[name] = np.stack([transform(image=image)["image"] for image in images])
    return {
        name: round(
            float((model.predict(x.astype(np.float32), verbose=0).argmax(1) == labels).mean()), 4
        )
        for name, x in views.items()
    }


def measure(
    backbone: str, prepared: PreparedData, runs: Path, image_size: int, head: int, full: int
) -> dict[str, Any]:
    """Train ``backbone`` with the short recipe; its stages' figures and its robustness."""
    config = recipe(backbone, image_size, head, full)
    started = time.perf_counter()
    results = train_recipe(config, prepared, str(runs / backbone))
    minutes = (time.perf_counter() - started) / 60
    model = load_model(results[-1].best_model)
    scores = corrupted_accuracy(model, prepared, image_size, config.data.seed)
    keras.backend.clear_session()
    corrupted = [v for k, v in scores.items() if k != "clean"]
    stages = {
        r.name: {
            k: r.metrics.get(k)
            for k in (
                "epochs_run",
                "best_val_accuracy",
                "seconds_per_epoch",
                "minutes",
                "train_images_per_second",
            )
        }  # fmt: skip
        for r in results
    }
    return {
        "backbone": backbone,
        "image_size": image_size,
        "params": int(model.count_params()),
        "stages": stages,
        "val_accuracy": scores["clean"],
        "corrupted_accuracy_mean": round(float(np.mean(corrupted)), 4),
        "accuracy_by_corruption": scores,
        "train_minutes": round(minutes, 2),
    }


def markdown(result: dict[str, Any]) -> list[str]:
    env = result["environment_before"]
    head, full = result["head_epochs"], result["full_epochs"]
    names = list(CORRUPTIONS)
    lines = [
        f"# Backbones on the demo data ({env['processor']}, {env['cpu_count']} logical CPUs)",
        "",
        f"`benchmarks/backbones.py` on {env['utc']}, commit {env['commit']}: "
        f"{result['train_images']} training / {result['val_images']} validation images "
        f"(demo data, one split), {result['image_size']} px for every backbone, batch "
        f"{result['batch_size']}; stage_1 head only {head} epoch(s) at LR {HEAD_LR:g}, "
        f"stage_2 all layers {full} epoch(s) at LR {FULL_LR:g}, from the embedded ImageNet "
        f"weights. Load average {env['loadavg_1m']} before, "
        f"{result['environment_after']['loadavg_1m']} after: the machine was shared, so the "
        "seconds compare the backbones with each other, not with other machines.",
        "",
        "| backbone | params | val accuracy | corrupted (mean) | s/epoch head only | "
        "s/epoch all layers | train img/s all layers | train minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        s1, s2 = r["stages"].get("stage_1", {}), r["stages"].get("stage_2", {})
        lines.append(
            f"| {r['backbone']} | {r['params']:,} | {r['val_accuracy']:.4f} | "
            f"{r['corrupted_accuracy_mean']:.4f} | {s1.get('seconds_per_epoch')} | "
            f"{s2.get('seconds_per_epoch')} | {s2.get('train_images_per_second')} | "
            f"{r['train_minutes']} |"
        )
    lines += [
        "",
        "Validation accuracy by corruption (each alone, fixed strength, seeded):",
        "",
        "| backbone | clean | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for r in result["rows"]:
        acc = r["accuracy_by_corruption"]
        lines.append(
            f"| {r['backbone']} | {acc['clean']:.4f} | "
            + " | ".join(f"{acc[n]:.4f}" for n in names)
            + " |"
        )
    lines += ["", "Corruptions: " + "; ".join(f"{k} `{v}`" for k, v in CORRUPTIONS.items()), ""]
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=BACKBONES)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--head-epochs", type=int, default=2)
    parser.add_argument("--full-epochs", type=int, default=1)
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-backbones"))
    parser.add_argument("--out", default="backbones")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    env_before = environment()
    base = recipe(args.backbones[0], args.image_size, args.head_epochs, args.full_epochs)
    prepared = prepare_split(base, args.runs)
    rows = []
    for backbone in args.backbones:
        row = measure(
            backbone, prepared, args.runs, args.image_size, args.head_epochs, args.full_epochs
        )
        print(row, flush=True)
        rows.append(row)
    result = {
        "benchmark": "backbones",
        "image_size": args.image_size,
        "batch_size": base.input.batch_size,
        "head_epochs": args.head_epochs,
        "full_epochs": args.full_epochs,
        "train_images": len(prepared.subset("train")),
        "val_images": len(prepared.subset("val")),
        "corruptions": CORRUPTIONS,
        "rows": rows,
        "environment_before": env_before,
        "environment_after": environment(),
    }
    write_results(args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
