"""Training curves, as the recipe drew them: ``Train_Val_acc_<stage>.png`` and
``Train_Val_loss_<stage>.png`` (matplotlib object API, no global pyplot state)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _curve(history: pd.DataFrame, metric: str, title: str, path: Path) -> Path:
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot()
    epochs = history["epoch"] if "epoch" in history else range(1, len(history) + 1)
    for column, label, style in ((metric, "train", "-o"), (f"val_{metric}", "validation", "-s")):
        if column in history:
            ax.plot(epochs, history[column], style, label=label, markersize=4)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_history(history: pd.DataFrame, stage: str, out_dir: str | Path) -> list[Path]:
    """Accuracy and loss curves (train vs validation) of one stage; returns the two PNG paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        _curve(history, "accuracy", f"{stage}: accuracy", out / f"Train_Val_acc_{stage}.png"),
        _curve(history, "loss", f"{stage}: loss", out / f"Train_Val_loss_{stage}.png"),
    ]
