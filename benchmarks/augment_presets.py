"""Augmentation presets (and backbones) side by side on the demo data: validation accuracy and
the robustness report (zoom-out, off-centre, occlusion, ...) of the same short recipe trained
with each preset on each backbone.

Each preset (``augment.preset``: `carclassifier.config.AUGMENT_PRESETS`) trains each
``--backbones`` (default Lite0) with the
harness of `benchmarks.backbones` (``configs/recipe_lite0_local.yaml``'s data, input and head
settings; ``stage_1`` head only, then ``stage_2`` all layers, one image size), on one split
prepared once; only the training augmentation differs. The final model is then evaluated with
`carclassifier.evaluate.evaluate_classifier` and its robustness report (every shift at
strengths 0.5 and 1, on all validation photos, seed 0).

    python -m benchmarks.augment_presets                  # cropped, uncropped: 2 + 1 epochs, 224 px
    python -m benchmarks.augment_presets --head-epochs 1 --full-epochs 0 --image-size 64 --out x
    python -m benchmarks.augment_presets --full-epochs 3 --out backbones_presets \
        --backbones efficientnet_lite0 efficientnet_lite1 efficientnet_lite2

Writes benchmarks/results/<out>.json and .md (default ``augment_presets``); the runs go under
``--runs`` (default runs/bench-augment-presets, replaced).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.backbones import FULL_LR, HEAD_LR, prepare_split, recipe  # noqa: E402
from benchmarks.common import environment, write_results  # noqa: E402
from carclassifier.config import AUGMENT_PRESETS, RunConfig  # noqa: E402
from carclassifier.evaluate import evaluate_classifier  # noqa: E402
from carclassifier.prepare import PreparedData  # noqa: E402
from carclassifier.stages import load_model, train_recipe  # noqa: E402

BACKBONE = "efficientnet_lite0"
FRAMING = ("zoom_out", "off_centre", "occlusion")
"""The shifts the presets are about, shown in their own columns."""


def preset_recipe(
    preset: str,
    image_size: int,
    head_epochs: int,
    full_epochs: int,
    tta_views: int,
    backbone: str = BACKBONE,
) -> RunConfig:
    """`benchmarks.backbones.recipe` for ``backbone`` with ``augment.preset`` = ``preset`` and
    the robustness report on every validation photo at strengths 0.5 and 1."""
    data = recipe(backbone, image_size, head_epochs, full_epochs).model_dump(mode="json")
    data["name"] = f"bench-augment-{backbone}-{preset}"
    data["augment"] = {"preset": preset, "tta": data["augment"]["tta"], "tta_views": tta_views}
    data["evaluate"]["robustness"].update(strengths=[0.5, 1.0], max_photos=100_000, seed=0)
    return RunConfig.model_validate(data)


def measure(
    preset: str,
    prepared: PreparedData,
    runs: Path,
    args: argparse.Namespace,
    backbone: str = BACKBONE,
) -> dict[str, Any]:
    """Train ``backbone`` with ``preset``, evaluate with the robustness report; one row."""
    config = preset_recipe(
        preset, args.image_size, args.head_epochs, args.full_epochs, args.tta_views, backbone
    )
    runs = runs / backbone
    started = time.perf_counter()
    results = train_recipe(config, prepared, str(runs / preset))
    minutes = (time.perf_counter() - started) / 60
    model = load_model(results[-1].best_model)
    val = prepared.subset("val")
    evaluation = evaluate_classifier(
        model,
        prepared.dataset.root,
        val,
        list(prepared.dataset.class_names),
        config,
        runs / preset / "evaluation",
        progress=False,
    )
    keras.backend.clear_session()
    robustness = evaluation["robustness"]
    table = robustness["table"]
    by_shift = {
        f"{row['shift']}_{round(row['strength'] * 100)}": round(row["accuracy"], 4) for row in table
    }
    return {
        "backbone": backbone,
        "preset": preset,
        "train": config.augment.train,
        "stages": {
            r.name: {k: r.metrics.get(k) for k in ("epochs_run", "best_val_accuracy", "minutes")}
            for r in results
        },
        "val_accuracy": round(evaluation["accuracy"], 4),
        "val_accuracy_tta": round(evaluation["tta"]["accuracy"], 4),
        "robustness_photos": robustness["photos"],
        "robustness_mean": round(float(np.mean([row["accuracy"] for row in table])), 4),
        "robustness_by_shift": by_shift,
        "ece": round(robustness["ece"], 4),
        "train_minutes": round(minutes, 2),
    }


def markdown(result: dict[str, Any]) -> list[str]:
    """The results as the table docs/robustness.md quotes."""
    env = result["environment_before"]
    lines = [
        f"# Augmentation presets on the demo data ({env['processor']}, {env['cpu_count']} CPUs)",
        "",
        f"`benchmarks/augment_presets.py` on {env['utc']}, commit {env['commit']}: "
        f"{', '.join(result['backbones'])} at "
        f"{result['image_size']} px, {result['train_images']} training / {result['val_images']} "
        f"validation images (one split for every preset), stage_1 head only "
        f"{result['head_epochs']} epoch(s) at LR {HEAD_LR:g}, stage_2 all layers "
        f"{result['full_epochs']} epoch(s) at LR {FULL_LR:g}. Robustness: every shift at "
        "strengths 0.5 and 1 on all validation photos (plain predictions); *mean* is over "
        f"those rows. Load average {env['loadavg_1m']} before, "
        f"{result['environment_after']['loadavg_1m']} after (shared machine).",
        "",
        "| backbone | preset | val accuracy | robustness mean | zoom_out 0.5 / 1 | "
        "off_centre 0.5 / 1 | occlusion 0.5 / 1 | train minutes |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        acc = r["robustness_by_shift"]
        framing = " | ".join(
            f"{acc.get(f'{s}_50', float('nan')):.3f} / {acc.get(f'{s}_100', float('nan')):.3f}"
            for s in FRAMING
        )
        lines.append(
            f"| {r.get('backbone', BACKBONE)} | {r['preset']} | {r['val_accuracy']:.4f} | "
            f"{r['robustness_mean']:.4f} | "
            f"{framing} | {r['train_minutes']} |"
        )
    names = list(result["rows"][0]["robustness_by_shift"]) if result["rows"] else []
    lines += [
        "",
        "Accuracy by shift and strength (shift_<strength %>):",
        "",
        "| backbone | preset | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    for r in result["rows"]:
        acc = r["robustness_by_shift"]
        lines.append(
            f"| {r.get('backbone', BACKBONE)} | {r['preset']} | "
            + " | ".join(f"{acc[n]:.3f}" for n in names)
            + " |"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (arguments: ``--help``) and write its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(AUGMENT_PRESETS))
    parser.add_argument("--backbones", nargs="+", default=[BACKBONE])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--head-epochs", type=int, default=2)
    parser.add_argument("--full-epochs", type=int, default=1)
    parser.add_argument("--tta-views", type=int, default=1, help="1: plain predictions only")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-augment-presets"))
    parser.add_argument("--out", default="augment_presets")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    env_before = environment()
    base = preset_recipe(
        args.presets[0], args.image_size, args.head_epochs, args.full_epochs, args.tta_views
    )
    prepared = prepare_split(base, args.runs)
    rows = []
    for backbone in args.backbones:
        for preset in args.presets:
            row = measure(preset, prepared, args.runs, args, backbone)
            print(row, flush=True)
            rows.append(row)
    result = {
        "benchmark": "augment_presets",
        "backbones": args.backbones,
        "image_size": args.image_size,
        "head_epochs": args.head_epochs,
        "full_epochs": args.full_epochs,
        "tta_views": args.tta_views,
        "train_images": len(prepared.subset("train")),
        "val_images": len(prepared.subset("val")),
        "rows": rows,
        "environment_before": env_before,
        "environment_after": environment(),
    }
    write_results(args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
