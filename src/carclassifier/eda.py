"""The recipe's short EDA: class balance, image sizes, samples and augmentations as PNGs, and one
self-contained HTML page (figures embedded, inline CSS, no external resources) to look at them.

    report = validate_dataset(load_dataset("data/cars"))
    write_eda_report(report, "runs/eda")  # -> runs/eda/eda.html

Figures use matplotlib's object API on `Figure` (Agg canvas, no pyplot state, nothing to close).
"""

from __future__ import annotations

import html
import logging
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from carclassifier.augment import train_transform
from carclassifier.config import AUGMENT_PRESETS, PRIMARY_SOURCE, AugmentConfig
from carclassifier.data import SOURCE_COLUMN, Finding, ValidationReport, load_image
from carclassifier.reports import png_data_uri

log = logging.getLogger(__name__)

PRESET_FIGURES = tuple(f"augmentations_{name}" for name in AUGMENT_PRESETS)
"""One figure per ``augment.preset``: the same sample photos through that preset."""
FIGURES = (
    "class_balance", "image_sizes", "aspect_ratios", "samples", "augmentations", *PRESET_FIGURES
)  # fmt: skip
MAX_FINDING_ROWS = 200
MAX_EXCLUDED_ROWS = 200
THUMB = 160  # longest side of a sample thumbnail, px
DPI = 100


def _first_line(doc: str | None) -> str:
    """A docstring's text after its ``Preset name:`` lead, on one line."""
    text = " ".join((doc or "").replace("`", "").split())
    return text.split(": ", 1)[-1]


def _mpl(text: object) -> str:
    """Text safe for matplotlib (a ``$`` in a file or class name would start mathtext)."""
    return str(text).replace("$", r"\$")


def _colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white")
    log.info("EDA: wrote %s", path)
    return path


def _blank(ax: Axes, text: str = "", ylabel: str | None = None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if text:
        ax.text(0.5, 0.5, text, ha="center", va="center", color="#888", transform=ax.transAxes)
    if ylabel is not None:
        ax.set_ylabel(_mpl(ylabel), rotation=0, ha="right", va="center", fontsize=10)


def _imbalance(counts: dict[str, int]) -> tuple[float | None, int]:
    nonzero = [n for n in counts.values() if n > 0]
    ratio = max(nonzero) / min(nonzero) if nonzero else None
    return ratio, len(counts) - len(nonzero)


def plot_class_balance(report: ValidationReport, path: Path) -> Path:
    """Horizontal bars of usable images per class, counts on the bars, imbalance in the title."""
    counts = report.class_counts
    names = [f"{name} ({label})" for label, name in enumerate(counts)]
    fig = Figure(figsize=(9, 1.2 + 0.38 * max(len(names), 1)), layout="constrained")
    ax = fig.add_subplot()
    values = list(counts.values())
    bars = ax.barh(range(len(names)), values, color=_colors(len(names)))
    ax.bar_label(bars, padding=3, fontsize=9)
    ax.set_yticks(range(len(names)), [_mpl(n) for n in names])
    for tick, value in zip(ax.get_yticklabels(), values, strict=True):
        tick.set_color("#c0392b" if value == 0 else "black")
    ax.invert_yaxis()
    ax.set_xlim(0, max(values + [1]) * 1.12)
    ax.set_xlabel("usable images")
    ratio, empty = _imbalance(counts)
    title = "Usable images per class"
    title += f" — imbalance max/min = {ratio:.2f}" if ratio else ""
    title += f" ({empty} class{'es' if empty > 1 else ''} empty)" if empty else ""
    ax.set_title(title, loc="left", fontsize=12)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def plot_sources(split: pd.DataFrame, class_names: list[str], path: Path) -> Path:
    """Horizontal bars of the split's photos per class, one colour per source (``primary``
    first, then the extra sources), validation photos (primary only) hatched."""
    names = [f"{name} ({label})" for label, name in enumerate(class_names)]
    sources = [PRIMARY_SOURCE] + sorted(set(split[SOURCE_COLUMN]) - {PRIMARY_SOURCE})
    fig = Figure(figsize=(9, 1.6 + 0.38 * max(len(names), 1)), layout="constrained")
    ax = fig.add_subplot()
    left = np.zeros(len(names))
    colors = _colors(len(sources))
    parts = [(source, "train") for source in sources] + [(PRIMARY_SOURCE, "val")]
    for source, subset in parts:
        rows = split[(split[SOURCE_COLUMN] == source) & (split["subset"] == subset)]
        counts = rows["label"].astype(int).value_counts()
        values = np.array([counts.get(i, 0) for i in range(len(names))], dtype=float)
        ax.barh(range(len(names)), values, left=left, label=_mpl(f"{source} ({subset})"),
                color=colors[sources.index(source)], hatch="//" if subset == "val" else None,
                edgecolor="white")  # fmt: skip
        left += values
    ax.set_yticks(range(len(names)), [_mpl(n) for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("photos in split.csv")
    ax.legend(loc="lower right", fontsize=9, frameon=False)
    ax.set_title("Photos per class by source (training; validation hatched)", loc="left",
                 fontsize=12)  # fmt: skip
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def plot_image_sizes(report: ValidationReport, path: Path) -> Path:
    """Width vs height scatter coloured by class, with marginal histograms."""
    usable, names = report.usable, report.dataset.class_names
    fig = Figure(figsize=(10, 7), layout="constrained")
    grid = fig.add_gridspec(2, 3, width_ratios=(4, 1, 1.4), height_ratios=(1, 4))
    ax = fig.add_subplot(grid[1, 0])
    top, right = fig.add_subplot(grid[0, 0], sharex=ax), fig.add_subplot(grid[1, 1], sharey=ax)
    legend = fig.add_subplot(grid[:, 2])
    legend.set_axis_off()
    if usable.empty:
        _blank(ax, "no usable images")
        return _save(fig, path)
    colors = _colors(len(names))
    for label, name in enumerate(names):
        part = usable[usable["label"] == label]
        if len(part):
            ax.scatter(
                part["width"],
                part["height"],
                s=14,
                alpha=0.6,
                color=colors[label],
                label=_mpl(name),
                edgecolors="none",
            )
    width, height = usable["width"], usable["height"]
    if max(width.max() / width.min(), height.max() / height.min()) > 4:  # spread: log axes
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        bins_w, bins_h = (
            np.geomspace(width.min(), width.max(), 41),
            np.geomspace(height.min(), height.max(), 41),
        )
    else:
        bins_w = bins_h = 40
    top.hist(width, bins=bins_w, color="#4c72b0")
    right.hist(height, bins=bins_h, color="#4c72b0", orientation="horizontal")
    top.tick_params(labelbottom=False)
    right.tick_params(labelleft=False)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    top.set_title(f"Image sizes of {len(usable)} usable images", loc="left", fontsize=12)
    if len(names) <= 20:
        legend.legend(
            *ax.get_legend_handles_labels(),
            loc="center left",
            frameon=False,
            fontsize=9,
            title="class",
            markerscale=1.5,
        )
    return _save(fig, path)


def plot_aspect_ratios(report: ValidationReport, path: Path) -> Path:
    """Histogram of width / height with common photo ratios marked."""
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.add_subplot()
    usable = report.usable
    if usable.empty:
        _blank(ax, "no usable images")
        return _save(fig, path)
    ratio = usable["width"] / usable["height"]
    pad = max(0.05, 0.1 * (ratio.max() - ratio.min()))
    low, high = ratio.min() - pad, ratio.max() + pad
    ax.hist(ratio, bins=np.linspace(low, high, 60), color="#55a868")
    ax.set_xlim(low, high)
    for value, name in (
        (1.0, "1:1"),
        (5 / 4, "5:4"),
        (4 / 3, "4:3"),
        (3 / 2, "3:2"),
        (16 / 9, "16:9"),
    ):
        if not low <= value <= high:
            continue
        ax.axvline(value, color="#999", linestyle="--", linewidth=0.8)
        ax.text(
            value,
            1.0,
            name,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="#666",
        )
    ax.set_xlabel("aspect ratio (width / height)")
    ax.set_ylabel("images")
    ax.set_title(
        f"Aspect ratios — median {ratio.median():.2f}, range {ratio.min():.2f} to "
        f"{ratio.max():.2f}",
        loc="left",
        fontsize=12,
        pad=14,
    )
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def _thumbnail(path: Path, width: int, height: int) -> np.ndarray | None:
    scale = THUMB / max(width, height, 1)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    try:
        return load_image(path, size)
    except OSError as exc:  # validated earlier, but the file may have changed since
        log.warning("EDA: cannot read %s: %s", path, exc)
        return None


def plot_samples(report: ValidationReport, path: Path, per_class: int, seed: int) -> Path:
    """A grid with one row per class of ``per_class`` random usable images."""
    names, root = report.dataset.class_names, report.dataset.root
    rows, cols = max(len(names), 1), max(per_class, 1)
    fig = Figure(figsize=(1.6 * cols + 1.6, 1.3 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.suptitle(f"{per_class} random usable images per class", fontsize=12, x=0.02, ha="left")
    for label in range(rows):
        name = names[label] if names else ""
        part = report.usable[report.usable["label"] == label]
        chosen = part.sample(n=min(per_class, len(part)), random_state=seed)
        for col, ax in enumerate(axes[label]):
            ylabel = name if col == 0 else None
            if col >= len(chosen):
                _blank(ax, "no usable images" if col == 0 else "", ylabel)
                continue
            row = chosen.iloc[col]
            image = _thumbnail(root / row["path"], int(row["width"]), int(row["height"]))
            _blank(ax, "unreadable" if image is None else "", ylabel)
            if image is not None:
                ax.imshow(image)
    return _save(fig, path)


def plot_augmentations(
    report: ValidationReport,
    path: Path,
    augment: AugmentConfig,
    image_size: int,
    n_images: int,
    views: int,
    seed: int,
    title: str = "Training augmentation",
) -> Path:
    """Originals at ``image_size`` next to ``views`` draws of the training augmentation
    ``augment`` (the same photos for the same ``seed``, whatever ``augment`` is)."""
    usable = report.usable.sample(frac=1.0, random_state=seed)
    # one image per class first, then fill from the rest
    chosen = pd.concat([usable.drop_duplicates("label"), usable]).drop_duplicates("path")
    chosen = chosen.head(n_images)
    rows, cols = max(len(chosen), 1), 1 + views
    fig = Figure(figsize=(1.6 * cols + 1.6, 1.6 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.suptitle(title, fontsize=12, x=0.02, ha="left")
    if chosen.empty:
        for ax in axes.flat:
            _blank(ax)
        _blank(axes[0, 0], "no images to show")
        return _save(fig, path)
    transform = train_transform(augment, image_size, seed)
    for r, (_, row) in enumerate(chosen.iterrows()):
        label = f"{row['class_name']}\n{Path(row['path']).name}"
        original = load_image(report.dataset.root / row["path"], (image_size, image_size))
        for c, ax in enumerate(axes[r]):
            image = original if c == 0 else transform(image=original)["image"]
            _blank(ax, ylabel=label if c == 0 else None)
            ax.imshow(image)
            if r == 0:
                ax.set_title(
                    f"original {image_size}×{image_size}" if c == 0 else f"augmented {c}",
                    fontsize=9,
                )
    return _save(fig, path)


# --------------------------------------------------------------------------- HTML

CSS = """
body{margin:0;background:#f5f6f8;color:#1f2430;
 font:15px/1.5 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:32px 24px 48px}
h1{font-size:28px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 12px}
.sub{color:#667;margin:0 0 24px;word-break:break-all}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(125px,1fr));gap:12px}
.card{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 3px #0001}
.card b{display:block;font-size:26px;line-height:1.2}.card span{color:#667;font-size:13px}
.card.bad b{color:#c0392b}.card.warn b{color:#b7791f}
table{border-collapse:collapse;width:100%;background:#fff;border-radius:10px;overflow:hidden;
 box-shadow:0 1px 3px #0001;font-size:14px}
th,td{text-align:left;padding:7px 12px;border-bottom:1px solid #eef0f3;vertical-align:top}
th{background:#fafbfc;color:#556;font-weight:600}td.num,th.num{text-align:right}
tr.group th{background:#eef1f6;color:#1f2430}tr.error td{background:#fdf0ef}
tr.error td:first-child{border-left:3px solid #c0392b}tr.zero td{color:#c0392b}
td.path{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;word-break:break-all}
.bar{background:#e3e8f0;border-radius:4px;height:10px;min-width:120px}
.bar i{display:block;height:10px;border-radius:4px;background:#4c72b0}
.badge{border-radius:999px;padding:1px 8px;font-size:12px;font-weight:600}
.badge.error{background:#c0392b;color:#fff}.badge.warning{background:#f6e05e;color:#5f4b00}
figure{margin:0 0 20px;background:#fff;border-radius:10px;padding:12px;box-shadow:0 1px 3px #0001}
figure img{max-width:100%;display:block;margin:0 auto}
figcaption{color:#556;font-size:13px;margin-top:6px}.note{color:#667;font-size:13px}
"""

E = html.escape


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _card(value: object, label: str, cls: str = "") -> str:
    return f'<div class="card {cls}"><b>{E(str(value))}</b><span>{E(label)}</span></div>'


def _table(head: list[str], rows: list[str], attrs: str = "") -> str:
    cells = "".join(
        f"<th{' class=num' if h.startswith('#') else ''}>{E(h.lstrip('#'))}</th>" for h in head
    )
    return f"<table {attrs}><thead><tr>{cells}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _class_rows(report: ValidationReport) -> list[str]:
    counts = report.class_counts
    total, top = max(len(report.usable), 1), max([*counts.values(), 1])
    return [
        f'<tr{" class=zero" if n == 0 else ""}><td>{E(name)}</td><td class="num">{label}</td>'
        f'<td class="num">{n}</td><td class="num">{n / total:.1%}</td>'
        f'<td><div class="bar"><i style="width:{100 * n / top:.1f}%"></i></div></td></tr>'
        for label, (name, n) in enumerate(counts.items())
    ]


def _source_rows(sources: pd.DataFrame) -> list[str]:
    """One row per source of `carclassifier.sources.summary` (sources.csv)."""
    rows = []
    for row in sources.to_dict(orient="records"):
        unmapped = f"{row['unmapped']}" + (
            f" ({row['unmapped_classes']})" if row.get("unmapped_classes") else ""
        )
        cells = [
            f"<td>{E(str(row['source']))}</td>",
            f'<td class="path">{E(str(row["root"]))}</td>',
            f"<td>{E(str(row['layout']))}</td>",
            f'<td class="num">{float(row["weight"]):g}</td>',
            *(f'<td class="num">{int(row[k])}</td>' for k in ("listed",)),
            f'<td class="num">{E(unmapped)}</td>',
            *(
                f'<td class="num">{int(row[k])}</td>'
                for k in ("excluded", "leaked", "train", "val")
            ),
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return rows


def _sources_section(sources: pd.DataFrame | None) -> str:
    if sources is None:
        return ""
    head = ["source", "root", "layout", "#weight", "#listed", "#dropped (unmapped)", "#excluded",
            "#leaks left out", "#train", "#val"]  # fmt: skip
    return (
        "<h2>Sources</h2>"
        + _table(head, _source_rows(sources), 'id="sources"')
        + '<p class="note">Extra sources (data.extra_sources) add training photos only; photos '
        "of classes their class_map does not name are dropped, near-duplicates of validation "
        "or test photos are left out (leaks.csv); weight: how often each photo is drawn per "
        "epoch relative to a primary photo. The cards and figures above and below describe the "
        "primary data.</p>"
    )


def _stats_rows(usable: pd.DataFrame) -> list[str]:
    if usable.empty:
        return ['<tr><td colspan="4">no usable images</td></tr>']
    series = {
        "width (px)": usable["width"],
        "height (px)": usable["height"],
        "aspect ratio (w/h)": usable["width"] / usable["height"],
    }
    rows = [
        f"<tr><td>{E(k)}</td>"
        + "".join(
            f'<td class="num">{v:.{2 if k.startswith("aspect") else 0}f}</td>'
            for v in (s.min(), s.median(), s.max())
        )
        + "</tr>"
        for k, s in series.items()
    ]
    size = usable["bytes"]
    rows.append(
        "<tr><td>file size</td>"
        + "".join(
            f'<td class="num">{_fmt_bytes(v)}</td>' for v in (size.min(), size.median(), size.max())
        )
        + "</tr>"
    )
    return rows


def _finding_rows(findings: list[Finding]) -> list[str]:
    has_error = {f.kind for f in findings if f.severity == "error"}  # those kinds come first
    order = sorted(
        findings, key=lambda f: (f.kind not in has_error, f.kind, f.severity != "error", f.path)
    )
    counts: dict[str, int] = {}
    for f in order:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    rows, kind = [], None
    for f in order[:MAX_FINDING_ROWS]:
        if f.kind != kind:
            kind = f.kind
            rows.append(f'<tr class="group"><th colspan="4">{E(kind)} · {counts[kind]}</th></tr>')
        rows.append(
            f'<tr class="{E(f.severity)}"><td><span class="badge {E(f.severity)}">'
            f"{E(f.severity)}</span></td><td>{E(f.kind)}</td>"
            f'<td class="path">{E(f.path)}</td><td>{E(f.message)}</td></tr>'
        )
    return rows


def _more(total: int, cap: int, what: str) -> str:
    if total <= cap:
        return ""
    return f'<p class="note">… and {total - cap} more {what} (see validation.json).</p>'


def render_html(
    report: ValidationReport,
    figures: dict[str, tuple[Path, str]],
    sources: pd.DataFrame | None = None,
) -> str:
    """The EDA page: summary cards, class table, the sources table (``sources``: sources.csv,
    with extra sources), figures, image statistics, findings, exclusions."""
    ds, usable = report.dataset, report.usable
    ratio, empty = _imbalance(report.class_counts)
    errors = sum(f.severity == "error" for f in report.findings)
    warnings = len(report.findings) - errors
    median = (
        f"{usable['width'].median():.0f}×{usable['height'].median():.0f}" if len(usable) else "—"
    )
    cards = "".join(
        [
            _card(len(ds.class_names), "classes"),
            _card(len(usable), "usable images"),
            _card(len(report.excluded), "excluded", "bad" if len(report.excluded) else ""),
            _card(errors, "errors", "bad" if errors else ""),
            _card(warnings, "warnings", "warn" if warnings else ""),
            _card(f"{ratio:.2f}" if ratio else "—", "imbalance max/min", "bad" if empty else ""),
            _card(median, "median size (px)"),
        ]
    )
    figs = "".join(
        f'<figure><img src="{png_data_uri(p)}" alt="{E(name)}">'
        f"<figcaption>{E(caption)}</figcaption></figure>"
        for name, (p, caption) in figures.items()
    )
    modes = usable["mode"].value_counts()
    modes_text = " · ".join(f"{m} {n}" for m, n in modes.items()) or "—"
    total_bytes = _fmt_bytes(float(usable["bytes"].sum())) if len(usable) else "—"
    finding_rows = _finding_rows(report.findings)
    findings = (
        _table(["severity", "kind", "file", "message"], finding_rows, 'id="findings"')
        if finding_rows
        else '<p class="note">No findings: every file is usable.</p>'
    )
    findings += _more(len(report.findings), MAX_FINDING_ROWS, "findings")
    excluded_rows = [
        f'<tr class="error"><td class="path">{E(str(p))}</td><td>{E(str(r))}</td></tr>'
        for p, r in report.excluded[["path", "reason"]]
        .head(MAX_EXCLUDED_ROWS)
        .itertuples(index=False)
    ]
    excluded = (
        _table(["file", "reason"], excluded_rows, 'id="excluded"')
        if excluded_rows
        else '<p class="note">No files were excluded.</p>'
    )
    excluded += _more(len(report.excluded), MAX_EXCLUDED_ROWS, "excluded files")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>EDA · {E(ds.root.name)}</title><style>{CSS}</style></head>
<body><main>
<h1>Dataset EDA · {E(ds.root.name)}</h1>
<p class="sub">{E(str(ds.root))} · layout <b>{E(ds.layout)}</b> · {len(ds.class_names)} classes ·
{len(usable)} usable images · {len(report.excluded)} excluded ·
generated {datetime.now():%Y-%m-%d %H:%M}</p>
<section class="cards">{cards}</section>
<h2>Classes</h2>
{
        _table(
            ["class", "#label", "#images", "#share", "distribution"],
            _class_rows(report),
            'id="classes"',
        )
    }
{_sources_section(sources)}
<h2>Figures</h2>{figs}
<h2>Image statistics</h2>
{_table(["", "#min", "#median", "#max"], _stats_rows(usable), 'id="stats"')}
<p class="note">Modes: {E(modes_text)} (all converted to RGB when loaded) · total size of usable
files: {E(total_bytes)}</p>
<h2>Validation findings</h2>{findings}
<h2>Excluded files</h2>{excluded}
</main></body></html>
"""


def write_eda_report(
    report: ValidationReport,
    out_dir: str | Path,
    augment: AugmentConfig | None = None,
    image_size: int = 224,
    samples_per_class: int = 6,
    augmented_images: int = 3,
    augmented_views: int = 5,
    seed: int = 0,
    sources: pd.DataFrame | None = None,
    split: pd.DataFrame | None = None,
) -> Path:
    """Write the EDA figures (`FIGURES`, PNG) and ``eda.html`` (figures embedded) into
    ``out_dir``.

    With extra sources, ``sources`` (`carclassifier.sources.summary`, sources.csv) adds the
    per-source table, and ``split`` (split.csv) the ``sources`` figure: photos per class by source.

    ``augment`` defaults to `AugmentConfig()`; the augmentation figure uses
    ``train_transform(augment, image_size, seed)``, and one figure per augmentation preset
    (`PRESET_FIGURES`) shows the same photos through that preset's ``train`` list, to compare
    them. Returns the path of ``eda.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("EDA: writing report for %s into %s", report.dataset.root, out)
    size, views = image_size, augmented_views
    figures = {
        "class_balance": (
            plot_class_balance(report, out / "class_balance.png"),
            "Usable images per class (label id in brackets); imbalance = largest / "
            "smallest non-empty class.",
        ),
        "image_sizes": (
            plot_image_sizes(report, out / "image_sizes.png"),
            "Width against height of every usable image, with marginal histograms.",
        ),
        "aspect_ratios": (
            plot_aspect_ratios(report, out / "aspect_ratios.png"),
            f"Width / height; common photo ratios dashed. Training resizes every "
            f"image to {size}×{size}.",
        ),
        "samples": (
            plot_samples(report, out / "samples.png", samples_per_class, seed),
            f"{samples_per_class} random usable images per class (seed {seed}).",
        ),
        "augmentations": (
            plot_augmentations(
                report,
                out / "augmentations.png",
                augment or AugmentConfig(),
                size,
                augmented_images,
                views,
                seed,
            ),
            f"Each image as training loads it ({size}×{size}) and {views} draws "
            "of the training augmentation"
            + (f" (preset {augment.preset})." if augment and augment.preset else "."),
        ),
    }
    for name in AUGMENT_PRESETS:
        figures[f"augmentations_{name}"] = (
            plot_augmentations(
                report,
                out / f"augmentations_{name}.png",
                AugmentConfig(preset=name),
                size,
                augmented_images,
                views,
                seed,
                title=f"Augmentation preset {name}",
            ),
            f"The same images through augment.preset {name}: "
            + _first_line(AUGMENT_PRESETS[name].__doc__),
        )
    if sources is not None and split is not None:
        figures["sources"] = (
            plot_sources(split, report.dataset.class_names, out / "sources.png"),
            "Photos of split.csv per class and source: extra sources train only.",
        )
    path = out / "eda.html"
    path.write_text(render_html(report, figures, sources), encoding="utf-8")
    log.info("EDA: wrote %s", path)
    return path
