"""What a run shows people: the kfp UI outputs of the pipeline steps and the run summaries.

- `log_metrics`, `log_confusion`: values on kfp ``Metrics`` / ``ClassificationMetrics``
  artifacts (also written as JSON files);
- `html_page`, `stage_page`, `evaluation_page`: self-contained HTML pages (inline CSS, images
  as data URIs, `png_data_uri`) for kfp HTML artifacts;
- `gate_page`: the champion/challenger decision, both models side by side, for a kfp HTML artifact;
- `summary_table`: the Markdown table of the stages (``carclassifier train`` / ``run-local``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from carclassifier import storage

# --------------------------------------------------------------------------- kfp UI outputs


def log_metrics(artifact: Any, values: dict[str, float | int]) -> None:
    """Log ``values`` on a kfp ``Metrics`` artifact and also write them as JSON to its path.

    The file makes the artifact exist as a file: kfp.local keeps metrics only in
    executor_output.json and treats an output artifact without a file as a cache miss, and on
    a cluster the metrics become readable in the pipeline root too.
    """
    for name, value in values.items():
        artifact.log_metric(name, value)
    _write_json(artifact.path, values)


def log_confusion(artifact: Any, class_names: list[str], matrix: list[list[int]]) -> None:
    """`log_confusion_matrix` on a kfp ``ClassificationMetrics`` artifact, plus the JSON file
    (see `log_metrics`)."""
    artifact.log_confusion_matrix(class_names, matrix)
    _write_json(artifact.path, {"class_names": class_names, "confusion_matrix": matrix})


def _write_json(path: str, value: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(value, indent=2), encoding="utf-8")


# --------------------------------------------------------------------------- HTML


def png_data_uri(path: Path) -> str:
    """A PNG file as a data URI, for self-contained HTML pages."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _img(path: Path, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{png_data_uri(path)}">'


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(f'{v:.4f}' if isinstance(v, float) else str(v))}</td>"
            for v in row.values()
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, body: str) -> str:
    """A self-contained HTML page (inline CSS, images as data URIs) for a kfp HTML artifact."""
    style = (
        "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1f2430}"
        "table{border-collapse:collapse;margin:.5rem 0 1rem}"
        "td,th{border:1px solid #d0d4dc;padding:.25rem .6rem;text-align:right}"
        "th{background:#f0f2f6}img{max-width:100%;margin:.5rem 0}"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{style}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def stage_page(title: str, metrics: dict[str, Any], out: str, stage: str) -> str:
    """A stage's page: its metrics, the accuracy/loss curves and the history found in its
    output folder ``out`` (local or gs://)."""
    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for prefix, what in (("Train_Val_acc", "accuracy"), ("Train_Val_loss", "loss")):
            name = f"{prefix}_{stage}.png"
            uri = storage.join(out, name)
            if storage.exists(uri):
                images.append(_img(storage.get_file(uri, Path(tmp) / name), what))
        history_text = storage.read_text(storage.join(out, "history.csv"))
    history = ""
    if history_text:
        history = _table(pd.read_csv(io.StringIO(history_text)).to_dict(orient="records"))
    shown = {k: v for k, v in metrics.items() if k != "description"}
    return html_page(
        title,
        f"{_table([shown])}{''.join(images)}<h2>History</h2>{history}"
        f"<p>Outputs: <code>{html.escape(out)}</code></p>",
    )


def evaluation_page(
    metrics: dict[str, Any],
    per_class: list[dict[str, Any]],
    confusion_png: Path,
    robustness_html: str = "",
) -> str:
    """The evaluation's page: the headline metrics (the ``robust_*`` ones are in the
    robustness section), the confusion matrices, the plain per-class table, then the
    robustness report's section (`carclassifier.robustness.robustness_html`)."""
    headline = {k: v for k, v in metrics.items() if not k.startswith("robust_")}
    return html_page(
        "Evaluation on the validation split",
        _table([headline]) + _img(confusion_png, "confusion matrices")
        + "<h2>Per class (plain)</h2>" + _table(per_class) + robustness_html,
    )  # fmt: skip


# --------------------------------------------------------------------------- Markdown


def _thumbnail(path: Path, size: int = 112) -> str:
    """A small JPEG of the photo at ``path`` as a data URI."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gate_page(
    decision: dict[str, Any],
    pointer: str,
    min_improvement: float,
    class_names: list[str],
    disagreements: list[tuple[Path, int, int, int]],
    max_photos: int = 24,
) -> str:
    """The champion/challenger decision (`carclassifier.gate.GateDecision.as_dict`) as an HTML
    page: the verdict and its reason, both models side by side (accuracy with its 95% interval,
    per-class recall), and thumbnails of the photos they disagree on (``disagreements``:
    photo, true label, challenger's and champion's prediction)."""

    def acc(key: str) -> str:
        value, interval = decision.get(f"{key}_accuracy"), decision.get(f"{key}_interval")
        if value is None:
            return "–"
        return f"{value:.4f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    def recall(key: str, k: int) -> str:
        values = decision.get(f"{key}_recalls")
        return "–" if not values or values[k] is None else f"{values[k]:.3f}"

    verdict = "promoted: the challenger is the new champion" if decision["promoted"] else (
        "kept the current champion"
    )  # fmt: skip
    e = html.escape
    rows = "".join(
        f"<tr><th>{e(name)}</th><td>{recall('challenger', k)}</td><td>{recall('champion', k)}</td></tr>"
        for k, name in enumerate(class_names)
    )
    p_value = decision.get("p_value")
    tests = (
        f"<p>McNemar's exact test (one-sided) on the photos only one model gets right: "
        f"{decision.get('challenger_only', 0)} only the challenger, "
        f"{decision.get('champion_only', 0)} only the champion, p = {p_value:.3g}.</p>"
        if p_value is not None
        else ""
    )
    if decision.get("formats_difference") is not None:
        tests += (
            f"<p>model.onnx vs model.keras: at most {decision['formats_difference']:.1e} apart.</p>"
        )
    cards = "".join(
        f'<figure style="display:inline-block;margin:.3rem;text-align:center">'
        f'<img src="{_thumbnail(photo)}" alt="{e(photo.name)}"><figcaption>{e(class_names[true])}<br>'
        f"challenger: {e(class_names[new])}<br>champion: {e(class_names[old])}</figcaption></figure>"
        for photo, true, new, old in disagreements[:max_photos]
    )
    shown = f" ({max_photos} shown)" if len(disagreements) > max_photos else ""
    body = (
        f"<p><strong>{verdict}</strong>: {e(decision['reason'])}.</p>{tests}"
        f"<table><tr><th></th><th>challenger</th><th>champion</th></tr>"
        f"<tr><th>export</th><td>{e(str(decision['challenger']))}</td>"
        f"<td>{e(str(decision.get('champion') or '–'))}</td></tr>"
        f"<tr><th>accuracy [95% CI]</th><td>{acc('challenger')}</td><td>{acc('champion')}</td></tr>"
        f"{rows}</table><p>Pointer: {e(pointer)}; required improvement &gt; {min_improvement:+.4f}.</p>"
        f"<h2>Photos they disagree on: {len(disagreements)}{shown}</h2>{cards}"
    )
    return html_page("Champion/challenger gate", body)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the stages: epochs, best validation accuracy, minutes, and what
    preemption cost them (attempts, minutes lost to preemption, minutes checkpointing)."""
    lines = [
        "| stage | description | size | epochs | best val accuracy | minutes | attempts "
        "| minutes lost to preemption | minutes checkpointing |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['description']} | {r['image_size']} | {r['epochs_run']} | "
            f"{r['best_val_accuracy']:.4f} | {r['minutes']:.1f} | {r.get('attempts', 1)} | "
            f"{r.get('minutes_lost_to_preemption', 0.0):.1f} | "
            f"{r.get('minutes_checkpointing', 0.0):.1f} |"
        )
    return "\n".join(lines)
