"""Which test-time augmentation (TTA) views help: the robustness report of a trained run with
each candidate TTA, the evidence behind the default `augment.tta` / `augment.tta_views`.

Each candidate runs the real `carclassifier.evaluate.evaluate_classifier` (plain and TTA on the
whole validation split, then the robustness shifts on ``--photos`` of it), so the plain column
is the same for all candidates and the gain is TTA accuracy minus plain accuracy.

    python -m benchmarks.tta_views [--run runs/local] [--photos 157]

Writes benchmarks/results/tta_views.json and .md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.common import environment, write_results  # noqa: E402

CANDIDATES: dict[str, dict[str, Any]] = {
    "random5": {  # the default before this benchmark
        "tta": [
            {"HorizontalFlip": {"p": 0.5}},
            {"Affine": {"translate_percent": [-0.04, 0.04], "scale": [0.95, 1.05], "p": 0.7}},
            {
                "RandomBrightnessContrast": {
                    "brightness_limit": 0.1,
                    "contrast_limit": 0.1,
                    "p": 0.5,
                }
            },
        ],
        "tta_views": 5,
    },
    "flip2": {"tta": [{"HorizontalFlip": {"p": 1.0}}], "tta_views": 2},
}


def evaluate_candidates(run: Path, photos: int) -> dict[str, Any]:
    """evaluate_classifier of the run's last stage's best model once per candidate."""
    from carclassifier.config import load_config
    from carclassifier.evaluate import evaluate_classifier
    from carclassifier.model import load_model
    from carclassifier.prepare import load_prepared, resolve_data_root

    config = load_config(run / "config.yaml")
    prepared = load_prepared(resolve_data_root(config), run / "split.csv")
    model = load_model(str(run / "stages" / config.stages[-1].name / "best.keras"))
    val = prepared.subset("val")
    results: dict[str, Any] = {}
    for name, tta in CANDIDATES.items():
        candidate = config.model_copy(deep=True)
        candidate.augment.tta = tta["tta"]
        candidate.augment.tta_views = tta["tta_views"]
        candidate.evaluate.robustness.max_photos = photos
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = evaluate_classifier(
                model, prepared.dataset.root, val, prepared.dataset.class_names, candidate, tmp
            )
        results[name] = {
            "views": tta["tta_views"],
            "tta": tta["tta"],
            "accuracy": result["accuracy"],
            "accuracy_tta": result["tta"]["accuracy"],
            "robustness": result["robustness"],
            "seconds": round(time.perf_counter() - started, 1),
        }
    return {"run": str(run), "val_photos": len(val), "candidates": results}


def markdown(result: dict[str, Any], env: dict[str, Any]) -> list[str]:
    """The evidence table: plain accuracy and each candidate's TTA gain, clean and per shift."""
    names = list(result["candidates"])
    first = result["candidates"][names[0]]
    head = "| photos | shift | strength | plain | " + " | ".join(f"{n} gain" for n in names) + " |"
    lines = [
        "# TTA views: accuracy gain per shift",
        "",
        f"Run `{result['run']}`, {result['val_photos']} validation photos, commit "
        f"{env['commit']}, load average {env['loadavg_1m']} (2 CPU cores, shared). Gain = TTA "
        "accuracy - plain accuracy on the same photos; candidates: "
        + "; ".join(
            f"**{n}** ({c['views']} views: {c['tta']}, {c['seconds']} s)"
            for n, c in result["candidates"].items()
        )
        + ".",
        "",
        head,
        "|---|---|---:|---:|" + "---:|" * len(names),
    ]
    gains = [c["accuracy_tta"] - c["accuracy"] for c in result["candidates"].values()]
    lines.append(
        f"| all val | clean | 0 | {first['accuracy']:.3f} | "
        + " | ".join(f"{g:+.3f}" for g in gains)
        + " |"
    )
    tables = [c["robustness"]["table"] for c in result["candidates"].values()]
    photos = first["robustness"]["photos"]
    for rows in zip(*tables, strict=True):
        row = rows[0]
        lines.append(
            f"| {photos} | {row['shift']} | {row['strength']:g} | {row['accuracy']:.3f} | "
            + " | ".join(f"{r['tta_gain']:+.3f}" for r in rows)
            + " |"
        )
    mean_gain = [sum(r["tta_gain"] for r in rows) / len(rows) for rows in tables]
    lines.append(
        f"| {photos} | mean over shifts | | | " + " | ".join(f"{g:+.3f}" for g in mean_gain) + " |"
    )
    lines += [
        "",
        "ECE (10 bins, all val photos), plain / TTA: "
        + "; ".join(
            f"{n}: {c['robustness']['ece']:.3f} / {c['robustness']['ece_tta']:.3f}"
            for n, c in result["candidates"].items()
        ),
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/local"))
    parser.add_argument("--photos", type=int, default=157, help="photos shifted (max_photos)")
    args = parser.parse_args()
    result = evaluate_candidates(args.run, args.photos)
    env = environment()
    write_results("tta_views", {"environment": env, **result}, markdown(result, env))


if __name__ == "__main__":
    main()
