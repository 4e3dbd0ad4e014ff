"""Champion/challenger gate for scheduled retraining.

The champion is named by a small JSON pointer (local path or gs:// object) holding the URI of
its export folder. A challenger is promoted only when it beats the champion *on the same
validation images*: the champion is evaluated again on the challenger's split, so a changed
dataset never compares numbers measured on different images.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carclassifier import storage
from carclassifier.export import load_exported
from carclassifier.inference import predict_proba

log = logging.getLogger(__name__)


def accuracy_on(model: Any, root: str | Path, frame: pd.DataFrame, batch_size: int = 32) -> float:
    """Plain (no TTA) accuracy of ``model`` on ``frame`` (columns path, label)."""
    paths = [str(Path(root) / p) for p in frame["path"]]
    probs = predict_proba(model, paths, batch_size=batch_size, progress=False)
    return float(np.mean(probs.argmax(axis=1) == frame["label"].to_numpy()))


def champion_challenger(
    challenger_export: str,
    root: str | Path,
    frame: pd.DataFrame,
    class_names: list[str],
    champion_pointer: str,
    min_improvement: float = 0.0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Compare the challenger export with the current champion on ``frame``; promote the
    challenger (rewrite the pointer) when there is no champion or it wins by more than
    ``min_improvement``. Returns the decision with both accuracies and the reason."""
    challenger, labels = load_exported(challenger_export)
    challenger_acc = accuracy_on(challenger, root, frame, batch_size)
    decision: dict[str, Any] = {
        "challenger": challenger_export,
        "challenger_accuracy": challenger_acc,
        "champion": None,
        "champion_accuracy": None,
    }
    text = storage.read_text(champion_pointer)
    if text is None:
        decision.update(promoted=True, reason="no champion yet")
    else:
        current = json.loads(text)
        decision["champion"] = current["export"]
        champion, champion_labels = load_exported(current["export"])
        if champion_labels["class_names"] != list(class_names) or labels["class_names"] != list(
            class_names
        ):
            decision.update(
                promoted=False, reason="class lists differ: compare and promote by hand"
            )
        else:
            champion_acc = accuracy_on(champion, root, frame, batch_size)
            decision["champion_accuracy"] = champion_acc
            wins = challenger_acc > champion_acc + min_improvement
            decision.update(
                promoted=wins,
                reason=f"challenger {challenger_acc:.4f} vs champion {champion_acc:.4f} "
                f"(needs > +{min_improvement:.4f})",
            )
    if decision["promoted"]:
        pointer = {
            "export": challenger_export,
            "val_accuracy": challenger_acc,
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        storage.write_text(champion_pointer, json.dumps(pointer, indent=2))
    log.info(
        "gate: %s (%s)", "PROMOTED" if decision["promoted"] else "kept champion", decision["reason"]
    )
    return decision
