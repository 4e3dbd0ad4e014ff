"""Evaluation of a trained classifier on the validation split, with and without test-time
augmentation (TTA): metrics, confusion matrices, predictions.

    result = evaluate_classifier(model, root, val_frame, class_names, config, "runs/x/eval")

The probabilities come from `carclassifier.inference.predict_views` (plain and TTA in one pass).
Figures use matplotlib's object API on `Figure` (Agg canvas, no pyplot state), as in `eda`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support

from carclassifier.augment import TtaSettings
from carclassifier.config import RunConfig
from carclassifier.errors import DatasetError, StorageError
from carclassifier.inference import check_class_names, forward, model_image_size, predict_views
from carclassifier.robustness import robustness_report
from carclassifier.storage import is_gcs_uri

log = logging.getLogger(__name__)

MAX_ANNOTATED_CLASSES = 40  # more classes: the heatmap has no numbers in its cells
DPI = 100


# --------------------------------------------------------------------------- metrics


def _normalized(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    return probs / probs.sum(axis=1, keepdims=True)


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, log loss, macro F1, per-class precision/recall/F1/support and the confusion
    matrix (``"confusion"``, rows true, columns predicted) of probabilities against labels."""
    classes = list(range(len(class_names)))
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "loss": float(log_loss(labels, _normalized(probs), labels=classes)),
        "macro_f1": float(np.mean(f1)),
        "per_class": [
            {
                "class": str(name),
                "precision": float(p),
                "recall": float(r),
                "f1": float(f),
                "support": int(s),
            }
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        ],
        "confusion": confusion_matrix(labels, predicted, labels=classes),
    }


# --------------------------------------------------------------------------- figure


def _mpl(text: object) -> str:
    """Text safe for matplotlib (a ``$`` would start mathtext)."""
    return str(text).replace("$", r"\$")


def _heatmap(ax: Axes, matrix: np.ndarray, names: Sequence[str], title: str) -> None:
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    ax.imshow(share, cmap=colormaps["Blues"], vmin=0.0, vmax=1.0)
    labels = [_mpl(n) for n in names]
    ticks = range(len(names))
    ax.set_xticks(ticks, labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, loc="left", fontsize=11)
    if len(names) <= MAX_ANNOTATED_CLASSES:
        fontsize = 9 if len(names) <= 15 else 7
        for (r, c), count in np.ndenumerate(matrix):
            if count or r == c:
                ax.text(
                    c,
                    r,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if share[r, c] > 0.55 else "#1f2430",
                )


def plot_confusion(
    matrices: dict[str, np.ndarray], class_names: Sequence[str], path: str | Path
) -> Path:
    """Side-by-side heatmaps (title -> matrix): counts in the cells, colour = share of the row
    (recall per true class), class names on both axes. Written as PNG to ``path``."""
    n = max(len(class_names), 1)
    side = 2.2 + 0.42 * n
    fig = Figure(figsize=(side * len(matrices) + 0.5, side + 0.6), layout="constrained")
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    for ax, (title, matrix) in zip(axes, matrices.items(), strict=True):
        _heatmap(ax, matrix, class_names, title)
    fig.suptitle(
        "Confusion matrices (rows: true class, columns: predicted; colour: share of the row)",
        fontsize=12,
        x=0.01,
        ha="left",
    )
    path = Path(path)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


# --------------------------------------------------------------------------- evaluation


def _check_frame(frame: pd.DataFrame, num_classes: int) -> np.ndarray:
    missing = [c for c in ("path", "label") if c not in frame.columns]
    if missing:
        raise DatasetError(f"evaluation frame lacks column(s) {missing}; it needs path and label")
    if frame.empty:
        raise DatasetError("no validation images to evaluate on; check the split's val subset")
    labels = frame["label"].to_numpy().astype(np.int64)
    bad = sorted({int(v) for v in labels if not 0 <= v < num_classes})
    if bad:
        raise DatasetError(
            f"labels {bad[:5]} are outside the {num_classes} classes 0..{num_classes - 1}"
        )
    return labels


def _confusion_frame(matrix: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    frame = pd.DataFrame(matrix, index=list(class_names), columns=list(class_names))
    frame.index.name = "true_class"
    return frame


def evaluate_classifier(
    model: Any,
    root: str | Path,
    frame: pd.DataFrame,
    class_names: list[str],
    config: RunConfig,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate on ``frame`` (columns ``path`` relative to ``root``, ``label``) without and with
    TTA (`TtaSettings.from_config`: ``config.augment.tta`` / ``tta_views``, seeded with
    ``config.data.seed``; batches of
    ``config.input.batch_size``), and write into ``out_dir``:

    - ``evaluation.json``: accuracy, loss, macro_f1, per_class, ``tta`` (views, accuracy, loss,
      macro_f1, per_class), tta_gain (TTA accuracy - plain accuracy), num_images, image_size,
      class_names;
    - ``confusion_matrix.csv`` / ``confusion_matrix_tta.csv``: rows true class names, columns
      predicted class names;
    - ``confusion_matrix.png``: plain and TTA heatmaps side by side;
    - ``predictions_val.csv``: path, label, true_class, predicted, predicted_class, prob,
      predicted_tta, predicted_tta_class, prob_tta (prob = probability of the top class).
    - with ``config.evaluate.robustness.enabled``, the robustness report
      (`carclassifier.robustness`: accuracy under shifts with and without TTA, calibration;
      ``robustness.html`` and its CSVs and PNGs), summarized in ``evaluation.json`` as
      ``robustness`` (its ``metrics`` are flat, for the UI).

    Returns the content of ``evaluation.json``. An unreadable image raises `DatasetError`.
    """
    if is_gcs_uri(out_dir):
        raise StorageError(
            f"evaluation writes to a local folder; {out_dir} is gs:// (write locally, then upload)"
        )
    num_classes = check_class_names(
        model, class_names, "evaluate with the model trained on this dataset"
    )
    labels = _check_frame(frame, num_classes)
    height, width = model_image_size(model)
    tta = TtaSettings.from_config(config)
    views = tta.views
    paths = [Path(root) / p for p in frame["path"]]
    plain, averaged = predict_views(
        model,
        paths,
        config.input.batch_size,
        tta.transform(height),
        views,
        tta.seed,
        progress,
    )
    base = classification_metrics(labels, plain, class_names)
    boosted = classification_metrics(labels, averaged, class_names)
    result: dict[str, Any] = {
        "accuracy": base["accuracy"],
        "loss": base["loss"],
        "macro_f1": base["macro_f1"],
        "tta": {
            "views": views,
            "accuracy": boosted["accuracy"],
            "loss": boosted["loss"],
            "macro_f1": boosted["macro_f1"],
            "per_class": boosted["per_class"],
        },
        "tta_gain": boosted["accuracy"] - base["accuracy"],
        "per_class": base["per_class"],
        "num_images": len(frame),
        "image_size": height if height == width else [height, width],
        "class_names": list(class_names),
    }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.evaluate.robustness.enabled:
        result["robustness"] = robustness_report(
            lambda batch: forward(model, batch, config.input.batch_size), paths, labels, plain,
            averaged, (height, width), config.evaluate.robustness, tta.transform(height), views,
            config.input.batch_size, out,
        )  # fmt: skip
    (out / "evaluation.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    _confusion_frame(base["confusion"], class_names).to_csv(out / "confusion_matrix.csv")
    _confusion_frame(boosted["confusion"], class_names).to_csv(out / "confusion_matrix_tta.csv")
    plot_confusion(
        {
            f"plain — accuracy {base['accuracy']:.2%}": base["confusion"],
            f"TTA, {views} views — accuracy {boosted['accuracy']:.2%}": boosted["confusion"],
        },
        class_names,
        out / "confusion_matrix.png",
    )
    names = np.asarray(class_names, dtype=object)
    top, top_tta = plain.argmax(axis=1), averaged.argmax(axis=1)
    pd.DataFrame(
        {
            "path": frame["path"].astype(str).to_numpy(),
            "label": labels,
            "true_class": names[labels],
            "predicted": top,
            "predicted_class": names[top],
            "prob": plain.max(axis=1),
            "predicted_tta": top_tta,
            "predicted_tta_class": names[top_tta],
            "prob_tta": averaged.max(axis=1),
        }
    ).to_csv(out / "predictions_val.csv", index=False)
    log.info(
        "evaluation on %d images: accuracy %.4f, TTA (%d views) %.4f, gain %+.4f; written to %s",
        len(frame),
        result["accuracy"],
        views,
        result["tta"]["accuracy"],
        result["tta_gain"],
        out,
    )
    return result
