"""Robustness report: validation accuracy under controlled shifts of the photos, with and
without test-time augmentation (TTA), and the calibration of the predictions.

    report = robustness_report(forward, paths, labels, plain, averaged, (224, 224),
                               config.evaluate.robustness, tta, views, 32, "runs/x/evaluation")

The demo photos are tightly cropped front views; real photos are not. Each shift is an
albumentations transform built for one strength in (0, 1] (1 = strongest, `SHIFTS` says what
it means per shift) and seeded, so a report is reproducible pixel for pixel: the same seed gives
the same shifted photos and the same TTA draws. A seeded sample of at most ``max_photos``
validation photos is decoded once at the model's size, shifted, and predicted plain and with
the run's TTA views (view 0 is the shifted photo itself), so a table shows where the model
breaks and whether TTA helps there. The calibration (reliability diagram, expected calibration
error) is computed on the whole evaluation's plain and TTA probabilities.

Files written into ``out_dir``: ``robustness.csv`` (shift, strength, accuracy, accuracy_tta,
tta_gain, drop), ``robustness_<shift>.png`` (accuracy against strength, and one photo at each
strength), ``reliability.png``, ``calibration.csv`` and ``robustness.html`` (a page of it all).
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from carclassifier.augment import ZoomOut
from carclassifier.config import RobustnessConfig
from carclassifier.data import load_image
from carclassifier.reports import png_data_uri
from carclassifier.tta import Forward, tta_predict

log = logging.getLogger(__name__)

ECE_BINS = 10
"""Equal-width confidence bins of the expected calibration error and the reliability diagram."""
DPI = 100


def _either_sign(make: Callable[[float], Any], magnitude: float) -> A.OneOf:
    """``make(+magnitude)`` or ``make(-magnitude)``, one of the two per photo (seeded)."""
    return A.OneOf([make(magnitude), make(-magnitude)], p=1.0)


def _corner_crops(size: int, strength: float) -> A.OneOf:
    side = round(size * (1.0 - 0.4 * strength))
    far = size - side
    corners = [(0, 0), (far, 0), (0, far), (far, far)]
    return A.OneOf(
        [A.Crop(x_min=x, y_min=y, x_max=x + side, y_max=y + side) for x, y in corners], p=1.0
    )


@dataclass(frozen=True)
class ShiftKind:
    """One kind of shift: what strength ``s`` does, and its albumentations transform."""

    description: str
    build: Callable[[float, int], list[Any]]  # (strength, image size) -> transforms
    graded: bool = True  # False: one strength only (a flip is a flip)


SHIFTS: dict[str, ShiftKind] = {
    "zoom_out": ShiftKind(
        "car smaller in the frame: side x (1 - 0.6 s), blurred reflected border",
        lambda s, size: [ZoomOut((1.0 - 0.6 * s,) * 2, position="centre", sigma=0.04, p=1.0)],
    ),
    "off_centre": ShiftKind(
        "crop of side x (1 - 0.4 s) from a corner, resized back",
        lambda s, size: [_corner_crops(size, s)],
    ),
    "occlusion": ShiftKind(
        "one black cut-out of side x 0.5 s at a random place",
        lambda s, size: [
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(0.5 * s, 0.5 * s),
                hole_width_range=(0.5 * s, 0.5 * s),
                fill=0,
                p=1.0,
            )
        ],
    ),
    "jpeg": ShiftKind(
        "JPEG quality 95 - 85 s",
        lambda s, size: [
            A.ImageCompression(quality_range=(round(95 - 85 * s),) * 2, p=1.0)  # type: ignore[arg-type]
        ],
    ),
    "blur": ShiftKind(
        "Gaussian blur, sigma 1.5 % of the side x s",
        lambda s, size: [A.GaussianBlur(blur_limit=0, sigma_limit=(0.015 * size * s,) * 2, p=1.0)],  # type: ignore[arg-type]
    ),
    "brightness": ShiftKind(
        "brightness +- 0.4 s of full scale (sign per photo)",
        lambda s, size: [
            _either_sign(
                lambda b: A.RandomBrightnessContrast(
                    brightness_limit=(b, b), contrast_limit=(0.0, 0.0), p=1.0
                ),
                0.4 * s,
            )
        ],
    ),
    "colour": ShiftKind(
        "hue +- 0.1 s turn and saturation x (1 -+ 0.6 s) (sign per photo)",
        lambda s, size: [
            _either_sign(
                lambda h: A.ColorJitter(
                    brightness=(1.0, 1.0),
                    contrast=(1.0, 1.0),
                    saturation=(1.0 - 6 * h,) * 2,
                    hue=(h, h),
                    p=1.0,
                ),
                0.1 * s,
            )
        ],
    ),
    "rotation": ShiftKind(
        "rotation by +- 15 s degrees (sign per photo), reflected corners",
        lambda s, size: [
            _either_sign(
                lambda a: A.Rotate(limit=(a, a), border_mode=cv2.BORDER_REFLECT_101, p=1.0),
                15.0 * s,
            )
        ],
    ),
    "hflip": ShiftKind(
        "horizontal flip (no strength)", lambda s, size: [A.HorizontalFlip(p=1.0)], graded=False
    ),
}


def shift_transform(name: str, strength: float, size: int, seed: int) -> A.Compose:
    """The seeded transform of shift ``name`` at ``strength`` for ``size`` x ``size`` images
    (uint8 RGB in, same shape out); `SHIFTS` describes each."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; shifts are {sorted(SHIFTS)}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"shift strength must be in (0, 1], got {strength}")
    transforms = SHIFTS[name].build(strength, size)
    return A.Compose([*transforms, A.Resize(size, size)], seed=seed)


def shift_grid(settings: RobustnessConfig) -> list[tuple[str, float]]:
    """(shift, strength) pairs the report evaluates: every strength of each graded shift, once
    at strength 1 for the others."""
    return [
        (name, strength)
        for name in settings.shifts
        for strength in (settings.strengths if SHIFTS[name].graded else [1.0])
    ]


def metric_name(shift: str, strength: float, tta: bool = False) -> str:
    """``robust_<shift>_<percent>_accuracy[_tta]`` (``robust_hflip_accuracy``: no strength)."""
    level = f"_{round(strength * 100)}" if SHIFTS[shift].graded else ""
    return f"robust_{shift}{level}_accuracy" + ("_tta" if tta else "")


# --------------------------------------------------------------------------- calibration


def calibration_table(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """Top-label reliability: for each of ``bins`` equal-width confidence bins ``(lower,
    upper]`` (the first includes 0) its photo count, mean confidence and accuracy."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.digitize(confidence, edges[1:-1], right=True)
    grouped = (
        pd.DataFrame({"bin": which, "confidence": confidence, "correct": correct})
        .groupby("bin")
        .agg(
            count=("correct", "size"),
            confidence=("confidence", "mean"),
            accuracy=("correct", "mean"),
        )
        .reindex(range(bins))
    )
    grouped["count"] = grouped["count"].fillna(0).astype(int)
    grouped.insert(0, "lower", edges[:-1])
    grouped.insert(1, "upper", edges[1:])
    return grouped.reset_index(drop=True)


def expected_calibration_error(
    labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE: the photo-weighted mean over confidence bins of |accuracy - mean confidence|."""
    table = calibration_table(labels, probs, bins)
    filled = table[table["count"] > 0]
    gap = (filled["accuracy"] - filled["confidence"]).abs()
    return float((gap * filled["count"]).sum() / filled["count"].sum())


# --------------------------------------------------------------------------- figures


def _plot_shift(
    name: str,
    rows: pd.DataFrame,
    clean: tuple[float, float],
    examples: list[np.ndarray],
    path: Path,
) -> Path:
    """Accuracy (plain and TTA) against strength, strength 0 = clean, and one photo per level."""
    keys = [f"p{i}" for i in range(len(examples))]
    fig = Figure(figsize=(max(7.0, 1.8 * len(examples)), 5.0), layout="constrained")
    axes = fig.subplot_mosaic([keys, ["acc"] * len(keys)], height_ratios=[1.0, 1.6])
    levels = ["clean", *(f"s={s:g}" for s in rows["strength"])]
    for key, image, level in zip(keys, examples, levels, strict=True):
        axes[key].imshow(image)
        axes[key].set_title(level, fontsize=9)
        axes[key].axis("off")
    ax = axes["acc"]
    x = [0.0, *rows["strength"]]
    ax.plot(x, [clean[0], *rows["accuracy"]], "-o", label="plain")
    ax.plot(x, [clean[1], *rows["accuracy_tta"]], "-s", label="TTA")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("strength (0 = clean photos)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.suptitle(f"{name}: {SHIFTS[name].description}", fontsize=10, x=0.01, ha="left")
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def plot_reliability(tables: dict[str, pd.DataFrame], eces: dict[str, float], path: Path) -> Path:
    """Reliability diagram (accuracy against mean confidence per bin, the diagonal is perfect
    calibration) with the photo count per bin below; one line per name (e.g. plain, TTA)."""
    fig = Figure(figsize=(6.0, 6.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="#999999", linestyle="--", label="perfectly calibrated")
    width = 1.0 / (len(next(iter(tables.values()))) * (len(tables) + 1))
    for i, (name, table) in enumerate(tables.items()):
        filled = table[table["count"] > 0]
        top.plot(
            filled["confidence"], filled["accuracy"], "-o", label=f"{name} (ECE {eces[name]:.3f})"
        )
        centres = (table["lower"] + table["upper"]) / 2 + (i - (len(tables) - 1) / 2) * width
        bottom.bar(centres, table["count"], width=width, label=name)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=9)
    top.set_title("Calibration of the top class (validation photos)", loc="left", fontsize=11)
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("photos")
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


# --------------------------------------------------------------------------- report


def _sample(n: int, max_photos: int, seed: int) -> np.ndarray:
    """Indices of a seeded sample of at most ``max_photos`` of ``n``, in their original order."""
    if n <= max_photos:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_photos, replace=False))


def _accuracies(
    forward: Forward,
    images: list[np.ndarray],
    labels: np.ndarray,
    tta: Any | None,
    views: int,
    seed: int,
    batch_size: int,
) -> tuple[float, float]:
    """Plain and TTA accuracy of ``images``; the TTA transform is reseeded first, so every
    shift is averaged over the same draws."""
    if tta is not None and hasattr(tta, "set_random_seed"):
        tta.set_random_seed(seed)
    plain, averaged = [], []
    for start in range(0, len(images), batch_size):
        first, mean = tta_predict(forward, images[start : start + batch_size], tta, views)
        plain.append(first)
        averaged.append(mean)
    return (
        float(np.mean(np.concatenate(plain).argmax(axis=1) == labels)),
        float(np.mean(np.concatenate(averaged).argmax(axis=1) == labels)),
    )


def robustness_report(
    forward: Forward,
    paths: Sequence[str | Path],
    labels: np.ndarray,
    plain: np.ndarray,
    averaged: np.ndarray,
    size: tuple[int, int],
    settings: RobustnessConfig,
    tta: Any | None,
    views: int,
    batch_size: int,
    out_dir: str | Path,
) -> dict[str, Any]:
    """Evaluate the shifts of ``settings`` on a seeded sample of ``paths`` (labels ``labels``)
    and the calibration of the whole evaluation's ``plain`` and ``averaged`` (TTA)
    probabilities; write the files (module docstring) into ``out_dir``.

    ``forward`` maps a list of uint8 images at ``size`` (height, width) to probabilities; ``tta``
    and ``views`` are the evaluation's TTA. Returns ``metrics`` (flat, for the UI: one
    `metric_name` per shift, strength and plain/TTA, ``robust_clean_accuracy[_tta]`` on the
    sample, ``ece``, ``ece_tta``, ``robust_photos``), ``table`` (rows of ``robustness.csv``),
    ``calibration`` and ``html`` (the page's file name).
    """
    if size[0] != size[1]:
        raise ValueError(f"the robustness shifts need a square model input, got {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    chosen = _sample(len(paths), settings.max_photos, settings.seed)
    sample_labels = labels[chosen]
    images = [load_image(paths[i], size) for i in chosen]
    clean = (
        float(np.mean(plain[chosen].argmax(axis=1) == sample_labels)),
        float(np.mean(averaged[chosen].argmax(axis=1) == sample_labels)),
    )
    gain = float(
        np.mean(averaged.argmax(axis=1) == labels) - np.mean(plain.argmax(axis=1) == labels)
    )
    if gain < 0:
        log.warning(
            "TTA (%d views) lowers validation accuracy by %.4f on the clean photos; the "
            "robustness table shows where it helps, else set augment.tta_views: 1",
            views,
            -gain,
        )
    grid = shift_grid(settings)
    log.info(
        "robustness: %d shifted versions of %d validation photos, %d view%s each",
        len(grid),
        len(images),
        views,
        "s" if views > 1 else "",
    )
    rows, examples = [], {name: [images[0]] for name in settings.shifts}
    for k, (name, strength) in enumerate(grid):
        transform = shift_transform(name, strength, size[0], seed=settings.seed + k)
        shifted = [transform(image=image)["image"] for image in images]
        accuracy, accuracy_tta = _accuracies(
            forward, shifted, sample_labels, tta, views, settings.seed, batch_size
        )
        rows.append(
            {
                "shift": name,
                "strength": strength,
                "accuracy": accuracy,
                "accuracy_tta": accuracy_tta,
                "tta_gain": accuracy_tta - accuracy,
                "drop": clean[0] - accuracy,
            }
        )
        examples[name].append(shifted[0])
        log.info(
            "robustness: %s at %g: accuracy %.3f, TTA %.3f", name, strength, accuracy, accuracy_tta
        )
    table = pd.DataFrame(rows)
    table.to_csv(out / "robustness.csv", index=False)
    for name, group in table.groupby("shift", sort=False):
        _plot_shift(str(name), group, clean, examples[str(name)], out / f"robustness_{name}.png")

    calibration = {
        "plain": calibration_table(labels, plain),
        "TTA": calibration_table(labels, averaged),
    }
    eces = {
        "plain": expected_calibration_error(labels, plain),
        "TTA": expected_calibration_error(labels, averaged),
    }
    pd.concat(calibration, names=["predictions", "bin"]).to_csv(out / "calibration.csv")
    plot_reliability(calibration, eces, out / "reliability.png")

    metrics: dict[str, float | int] = {
        "robust_photos": len(images),
        "robust_clean_accuracy": clean[0],
        "robust_clean_accuracy_tta": clean[1],
    }
    for row in rows:
        metrics[metric_name(row["shift"], row["strength"])] = row["accuracy"]
        metrics[metric_name(row["shift"], row["strength"], tta=True)] = row["accuracy_tta"]
    metrics["ece"], metrics["ece_tta"] = eces["plain"], eces["TTA"]
    summary = {
        "photos": len(images),
        "seed": settings.seed,
        "views": views,
        "clean_accuracy": clean[0],
        "clean_accuracy_tta": clean[1],
        "table": rows,
        "ece": eces["plain"],
        "ece_tta": eces["TTA"],
        "metrics": metrics,
        "html": "robustness.html",
    }
    (out / "robustness.html").write_text(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>Robustness report</title></head><body>"
        f"{robustness_html(summary, out)}</body></html>\n",
        encoding="utf-8",
    )
    worst = table.loc[table["accuracy"].idxmin()]
    log.info(
        "robustness: clean %.3f, worst %s at %g: %.3f; ECE %.3f (TTA %.3f); report %s",
        clean[0],
        worst["shift"],
        worst["strength"],
        worst["accuracy"],
        eces["plain"],
        eces["TTA"],
        out / "robustness.html",
    )
    return summary


def robustness_html(summary: dict[str, Any], out_dir: str | Path) -> str:
    """The report as an HTML fragment (one table and one figure per shift, then calibration),
    figures inlined as data URIs from the PNGs `robustness_report` wrote into ``out_dir``."""
    out = Path(out_dir)
    table = pd.DataFrame(summary["table"])

    def img(name: str, alt: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="{png_data_uri(out / name)}">'

    parts = [
        "<h2>Robustness under shifts of the photos</h2>",
        f"<p>{summary['photos']} validation photos (seed {summary['seed']}), each shifted and "
        f"predicted plain and with TTA ({summary['views']} views). On the clean photos: accuracy "
        f"{summary['clean_accuracy']:.3f}, with TTA {summary['clean_accuracy_tta']:.3f}.</p>",
    ]
    for name, group in table.groupby("shift", sort=False):
        shown = group.drop(columns="shift")
        parts.append(
            f"<h3>{html.escape(str(name))}: {html.escape(SHIFTS[str(name)].description)}</h3>"
        )
        parts.append(shown.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0))
        parts.append(img(f"robustness_{name}.png", f"accuracy under {name}"))
    parts.append("<h2>Calibration</h2>")
    parts.append(
        f"<p>Expected calibration error ({ECE_BINS} bins, all validation photos): plain "
        f"{summary['ece']:.3f}, TTA {summary['ece_tta']:.3f} (0 = confidence matches accuracy).</p>"
    )
    parts.append(img("reliability.png", "reliability diagram"))
    return "".join(parts)
