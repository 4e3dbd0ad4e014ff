"""Evaluation of a trained classifier, with and without test-time augmentation (TTA).

    probs = predict_proba(model, paths, tta=tta_transform(config.augment, 224, seed=0), tta_views=5)
    metrics = evaluate_model(model, root, val_frame, class_names, config, "runs/x/eval")

A model here takes raw RGB pixels in 0..255 (float32) at its own input size
(``model.input_shape[1:3]``) and outputs softmax probabilities. Each image is decoded once per
call; with TTA, view 0 is the plain resized image and views 1.. are draws of the TTA transform on
it, so averaging never loses the plain prediction.

Figures use matplotlib's object API on `Figure` (Agg canvas, no pyplot state), as in `eda`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from carclassifier.augment import tta_transform
from carclassifier.config import RunConfig
from carclassifier.data import load_image
from carclassifier.errors import DatasetError, StorageError
from carclassifier.storage import is_gcs_uri
from carclassifier.tta import tta_predict

log = logging.getLogger(__name__)

Transform = Callable[..., dict[str, Any]]
"""An albumentations transform (or any callable used as ``t(image=...)["image"]``)."""

DECODE_WORKERS = 4
MAX_ANNOTATED_CLASSES = 40  # more classes: the heatmap has no numbers in its cells
DPI = 100

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# --------------------------------------------------------------------------- prediction


def check_class_names(model: Any, class_names: Sequence[str], hint: str = "") -> int:
    """The model's number of classes; `DatasetError` when ``class_names`` has another length."""
    num_classes = int(model.output_shape[-1])
    if len(class_names) != num_classes:
        raise DatasetError(
            f"{len(class_names)} class names but the model outputs {num_classes} classes"
            + (f"; {hint}" if hint else "")
        )
    return num_classes


def model_image_size(model: Any) -> tuple[int, int]:
    """The (height, width) a model takes, from ``model.input_shape``."""
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise ValueError(f"expected a model with one image input, got inputs {shape}")
        shape = shape[0]
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        raise ValueError(f"model input shape {shape} is not (batch, height, width, 3)")
    return int(shape[1]), int(shape[2])


def _decode(path: str, size: tuple[int, int]) -> np.ndarray | str:
    """The resized uint8 image, or the reason it cannot be read."""
    try:
        return load_image(path, size)
    except _DECODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"


def _forward(model: Any, images: list[np.ndarray], batch_size: int) -> np.ndarray:
    """Probabilities of ``images``, at most ``batch_size`` of them per model call (a TTA batch
    holds ``views`` times as many images as the model should see at once)."""
    parts = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    return np.concatenate(
        [np.asarray(model.predict_on_batch(np.stack(part).astype(np.float32))) for part in parts]
    ).astype(np.float64)


def predict_views(
    model: Any,
    paths: Sequence[str | Path],
    batch_size: int = 32,
    tta: Transform | None = None,
    tta_views: int = 1,
    seed: int = 0,
    progress: bool = True,
    skip_unreadable: bool = False,
    workers: int = DECODE_WORKERS,
) -> tuple[np.ndarray, np.ndarray]:
    """Plain and TTA-averaged probabilities in one pass: ``(plain, averaged)``, each (N, C).

    The plain prediction is view 0 of the TTA average, so it costs nothing extra; without
    ``tta`` (or with ``tta_views == 1``) both arrays are equal. See `predict_proba` for the
    arguments; ``workers`` threads decode the next batch while the model runs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if tta_views < 1:
        raise ValueError(f"tta_views must be at least 1, got {tta_views}")
    size = model_image_size(model)
    views = tta_views if tta is not None else 1
    if views > 1 and hasattr(tta, "set_random_seed"):
        tta.set_random_seed(seed)  # the same draws on every call
    paths = [str(p) for p in paths]
    n, num_classes = len(paths), int(model.output_shape[-1])
    plain = np.full((n, num_classes), np.nan, dtype=np.float32)
    averaged = plain.copy()
    chunks = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    unreadable = 0
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(
            total=n,
            desc=f"predicting ({views} view{'s' if views > 1 else ''})",
            unit="img",
            disable=not progress,
        ) as bar,
    ):

        def submit(chunk: range) -> list[Future]:
            return [pool.submit(_decode, paths[i], size) for i in chunk]

        pending = submit(chunks[0]) if chunks else []
        for c, chunk in enumerate(chunks):
            decoded = [f.result() for f in pending]
            pending = submit(chunks[c + 1]) if c + 1 < len(chunks) else []  # overlap decoding
            rows, images = [], []
            for i, result in zip(chunk, decoded, strict=True):
                if isinstance(result, str):
                    if not skip_unreadable:
                        raise DatasetError(f"cannot read image {paths[i]} ({result})")
                    log.warning("skipping unreadable image %s (%s)", paths[i], result)
                    unreadable += 1
                else:
                    rows.append(i)
                    images.append(result)
            if images:
                first, mean = tta_predict(
                    lambda batch: _forward(model, batch, batch_size), images, tta, views
                )
                plain[rows] = first
                averaged[rows] = mean
            bar.update(len(chunk))
    if unreadable:
        log.warning("%d of %d images could not be read; their rows are NaN", unreadable, n)
    return plain, averaged


def predict_proba(
    model: Any,
    paths: Sequence[str | Path],
    batch_size: int = 32,
    tta: Transform | None = None,
    tta_views: int = 1,
    seed: int = 0,
    progress: bool = True,
    skip_unreadable: bool = False,
) -> np.ndarray:
    """Class probabilities (N, C) of the images at ``paths``, in order.

    Each image is decoded once at the model's input size (`model_image_size`). With ``tta``
    (e.g. `carclassifier.augment.tta_transform`) the result is the mean over ``tta_views``
    views: view 0 the plain resized image, views 1.. ``tta(image=...)`` of it; ``tta_views`` is
    ignored without ``tta``. A transform with ``set_random_seed`` (albumentations) is reseeded
    with ``seed`` first and then drawn image by image in order, so results are reproducible and
    do not depend on ``batch_size``. Forward passes take ``batch_size`` images each.

    An unreadable image raises `DatasetError`, or with ``skip_unreadable`` gets a NaN row (and
    a logged warning).
    """
    return predict_views(model, paths, batch_size, tta, tta_views, seed, progress, skip_unreadable)[
        1
    ]


# --------------------------------------------------------------------------- metrics


def _normalized(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    return probs / probs.sum(axis=1, keepdims=True)


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, log loss, macro F1, per-class precision/recall/F1/support and the confusion
    matrix (``"confusion"``, rows true, columns predicted) of probabilities against labels."""
    from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support

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


def evaluate_model(
    model: Any,
    root: str | Path,
    frame: pd.DataFrame,
    class_names: list[str],
    config: RunConfig,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate on ``frame`` (columns ``path`` relative to ``root``, ``label``) without and with
    TTA (``config.augment.tta`` / ``tta_views``, seeded with ``config.data.seed``; batches of
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
    views = config.augment.tta_views
    tta = tta_transform(config.augment, height, config.data.seed) if views > 1 else None
    paths = [Path(root) / p for p in frame["path"]]
    plain, averaged = predict_views(
        model,
        paths,
        config.input.batch_size,
        tta,
        views,
        config.data.seed,
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
        from carclassifier.robustness import robustness_report

        result["robustness"] = robustness_report(
            lambda batch: _forward(model, batch, config.input.batch_size), paths, labels, plain,
            averaged, (height, width), config.evaluate.robustness, tta, views,
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
