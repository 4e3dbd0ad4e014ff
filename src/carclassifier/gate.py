"""Champion/challenger gate for scheduled retraining: progress, not noise.

The champion is named by a small JSON pointer (local path or gs:// object) holding the URI of
its export folder. The champion is evaluated again on the challenger's validation photos, so
both are measured on the same images, and the decision is a paired one:

* **McNemar's exact test** on the photos the two models disagree on: ``b`` photos only the
  challenger gets right, ``c`` only the champion. Under "equally good" each such photo is a fair
  coin, so the one-sided p-value is P(X >= b) for X ~ Binomial(b + c, 1/2)
  (`scipy.stats.binomtest`). With ~150 validation photos one photo is 0.6 points of accuracy: a
  plain accuracy difference promotes and demotes models on noise, this test does not.
* **A per-class recall floor**: no class may lose more than ``max_recall_drop`` of recall.
* **The export formats agree**: when the challenger's export has ``model.onnx`` (what serving
  uses first), it must give ``model.keras``'s probabilities within ``formats_tolerance`` on the
  gate's photos.

The challenger is promoted (the pointer rewritten) when there is no champion yet, or when it is
more accurate by more than ``min_improvement``, significantly so, and passes both checks.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from carclassifier import storage
from carclassifier.export import load_exported, load_exported_onnx
from carclassifier.inference import predict_proba

log = logging.getLogger(__name__)

CONFIDENCE = 0.95
"""Level of the accuracy intervals shown (Wilson score intervals)."""


def mcnemar_exact(challenger_only: int, champion_only: int) -> float:
    """One-sided p-value of McNemar's exact test that the challenger is better: P(X >= b) for
    X ~ Binomial(b + c, 1/2), ``b`` = photos only the challenger gets right, ``c`` = photos only
    the champion gets right (1.0 when they never disagree)."""
    n = challenger_only + champion_only
    if n == 0:
        return 1.0
    return float(binomtest(challenger_only, n, 0.5, alternative="greater").pvalue)


def accuracy_interval(correct: int, total: int) -> tuple[float, float]:
    """The `CONFIDENCE` Wilson score interval of an accuracy of ``correct`` of ``total``."""
    ci = binomtest(correct, total).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return float(ci.low), float(ci.high)


def class_recalls(
    predicted: np.ndarray, labels: np.ndarray, num_classes: int
) -> list[float | None]:
    """Recall of each class (None for a class without photos)."""
    return [
        float(np.mean(predicted[labels == k] == k)) if np.any(labels == k) else None
        for k in range(num_classes)
    ]


@dataclass
class ModelResult:
    """One model on the gate's photos."""

    export: str
    accuracy: float
    interval: tuple[float, float]
    recalls: list[float | None]
    predicted: list[int] = field(repr=False)


@dataclass
class GateDecision:
    """What the gate decided, and every number it decided on."""

    promoted: bool
    reason: str
    challenger: ModelResult
    champion: ModelResult | None = None
    challenger_only: int = 0
    champion_only: int = 0
    p_value: float | None = None
    worst_recall_drop: float | None = None
    worst_recall_class: str | None = None
    formats_difference: float | None = None

    @property
    def challenger_accuracy(self) -> float:
        """The challenger's accuracy on the gate's photos."""
        return self.challenger.accuracy

    @property
    def champion_accuracy(self) -> float | None:
        """The champion's accuracy on the same photos (None: no champion compared)."""
        return None if self.champion is None else self.champion.accuracy

    def as_dict(self) -> dict[str, Any]:
        """The decision as flat JSON-ready data: ``challenger``/``champion`` are the export URIs,
        each model's numbers are ``<model>_accuracy``, ``_interval``, ``_recalls``."""
        data = {k: v for k, v in asdict(self).items() if k not in ("challenger", "champion")}
        for key in ("challenger", "champion"):
            result: ModelResult | None = getattr(self, key)
            data[key] = None if result is None else result.export
            data[f"{key}_accuracy"] = None if result is None else result.accuracy
            data[f"{key}_interval"] = None if result is None else list(result.interval)
            data[f"{key}_recalls"] = None if result is None else result.recalls
        return data


def _result(export: str, probs: np.ndarray, labels: np.ndarray, num_classes: int) -> ModelResult:
    predicted = probs.argmax(axis=1)
    correct = int(np.sum(predicted == labels))
    return ModelResult(
        export=export,
        accuracy=correct / len(labels),
        interval=accuracy_interval(correct, len(labels)),
        recalls=class_recalls(predicted, labels, num_classes),
        predicted=[int(p) for p in predicted],
    )


def formats_difference(export_uri: str, paths: list[str], keras_probs: np.ndarray) -> float | None:
    """Largest difference between the export's ``model.onnx`` and ``model.keras`` probabilities
    on ``paths``; None when the export has no ``model.onnx``."""
    with tempfile.TemporaryDirectory(prefix="carclassifier-gate-") as scratch:
        onnx_model = load_exported_onnx(export_uri, Path(scratch))
        if onnx_model is None:
            return None
        onnx_probs = predict_proba(onnx_model, paths, progress=False)
    return float(np.abs(onnx_probs - keras_probs).max())


def compare(
    challenger: ModelResult,
    champion: ModelResult,
    labels: np.ndarray,
    class_names: list[str],
    min_improvement: float = 0.0,
    significance: float = 0.05,
    max_recall_drop: float = 0.05,
) -> GateDecision:
    """The paired decision between two models' predictions on the same photos."""
    right_new = np.asarray(challenger.predicted) == labels
    right_old = np.asarray(champion.predicted) == labels
    only_new, only_old = int(np.sum(right_new & ~right_old)), int(np.sum(right_old & ~right_new))
    p_value = mcnemar_exact(only_new, only_old)
    drops = [
        (old - new, name)
        for new, old, name in zip(challenger.recalls, champion.recalls, class_names, strict=True)
        if new is not None and old is not None
    ]
    worst_drop, worst_class = max(drops, default=(0.0, None))
    gain = challenger.accuracy - champion.accuracy
    numbers = (
        f"challenger {challenger.accuracy:.4f} vs champion {champion.accuracy:.4f}, "
        f"{only_new} photos only it gets right vs {only_old}, McNemar p={p_value:.3g}"
    )
    if gain <= min_improvement:
        promoted, why = False, f"not more accurate by > {min_improvement:.4f}"
    elif p_value >= significance:
        promoted, why = False, f"the gain is within noise (p >= {significance:g})"
    elif worst_drop > max_recall_drop:
        promoted, why = (
            False,
            (f"recall of {worst_class} falls by {worst_drop:.3f} (> {max_recall_drop:g})"),
        )
    else:
        promoted, why = True, "significantly better and no class falls behind"
    return GateDecision(
        promoted=promoted,
        reason=f"{why}: {numbers}",
        challenger=challenger,
        champion=champion,
        challenger_only=only_new,
        champion_only=only_old,
        p_value=p_value,
        worst_recall_drop=float(worst_drop),
        worst_recall_class=worst_class,
    )


def champion_challenger(
    challenger_export: str,
    root: str | Path,
    frame: pd.DataFrame,
    class_names: list[str],
    champion_pointer: str,
    min_improvement: float = 0.0,
    batch_size: int = 32,
    significance: float = 0.05,
    max_recall_drop: float = 0.05,
    formats_tolerance: float = 1e-4,
    promoted_by: str = "",
) -> GateDecision:
    """Compare the challenger export with the current champion on ``frame`` (columns path,
    label) and promote the challenger (rewrite the pointer) as the module docstring says; a
    non-empty ``promoted_by`` (the run key) is written into the pointer as ``run_key``, so a
    retried gate of that run can tell its own promotion from a champion it found."""
    paths = [str(Path(root) / p) for p in frame["path"]]
    labels = frame["label"].to_numpy()
    num = len(class_names)
    model, exported = load_exported(challenger_export)
    probs = predict_proba(model, paths, batch_size=batch_size, progress=False)
    challenger = _result(challenger_export, probs, labels, num)
    difference = formats_difference(challenger_export, paths, probs)
    text = storage.read_text(champion_pointer)
    if difference is not None and difference > formats_tolerance:
        decision = GateDecision(
            False,
            f"model.onnx and model.keras differ by {difference:.2e} (> {formats_tolerance:g}) on "
            "the gate's photos: serving would not answer as evaluated",
            challenger,
        )
    elif text is None:
        decision = GateDecision(True, "no champion yet", challenger)
    else:
        current = json.loads(text)
        champion_model, champion_labels = load_exported(current["export"])
        if champion_labels["class_names"] != list(class_names) or exported["class_names"] != list(
            class_names
        ):
            decision = GateDecision(
                False, "class lists differ: compare and promote by hand", challenger
            )
        else:
            champion_probs = predict_proba(
                champion_model, paths, batch_size=batch_size, progress=False
            )
            champion = _result(current["export"], champion_probs, labels, num)
            decision = compare(
                challenger, champion, labels, list(class_names),
                min_improvement, significance, max_recall_drop,
            )  # fmt: skip
    decision.formats_difference = difference
    if decision.promoted:
        pointer = {
            "export": challenger_export,
            "val_accuracy": challenger.accuracy,
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        } | ({"run_key": promoted_by} if promoted_by else {})
        storage.write_text(champion_pointer, json.dumps(pointer, indent=2))
    log.info("gate: %s (%s)", "PROMOTED" if decision.promoted else "kept champion", decision.reason)
    return decision
