"""Datasets: reading the three layouts, validating every image, and the train/validation split.

Layouts understood by `load_dataset`:

- **kaggle** (sf-dl-car-classification): ``train.csv`` (``Id,Category``), ``train/<Category>/<Id>``,
  a test folder (``test_upload/`` or ``test/``) and ``sample_submission.csv``;
- **labels_csv**: ``labels.csv`` with ``path,class_name,class_id`` (paths relative to the root);
- **folders**: one subfolder per class (labels in alphabetical order of the folder names).

Every record keeps the image path *relative to the root*, so a split written here is valid in
any pod that has the same dataset at another place. The split's ``source`` column says where
each photo came from (``primary``, or an extra source of `carclassifier.sources`, whose photos
are training-only and whose paths lead from the root to the source's folder).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from carclassifier.config import PRIMARY_SOURCE
from carclassifier.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
RECORD_COLUMNS = ["id", "path", "label", "class_name"]
SOURCE_COLUMN = "source"
"""split.csv's column naming where a photo came from: ``primary`` (data.root) or an extra
source's name (`carclassifier.sources`)."""
TEST_DIR_NAMES = ("test_upload", "test")
MAX_IMAGE_PIXELS = 80_000_000  # larger images are excluded: decompression-bomb guard

Layout = Literal["kaggle", "labels_csv", "folders"]
Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem found in a dataset. ``error`` excludes the file; ``warning`` keeps it."""

    kind: str
    severity: Severity
    path: str
    message: str


@dataclass
class Dataset:
    """A labelled image dataset: records plus what was noticed while reading its layout."""

    root: Path
    layout: Layout
    class_names: list[str]
    records: pd.DataFrame  # RECORD_COLUMNS; path relative to root
    test_dir: Path | None = None
    sample_submission: Path | None = None
    findings: list[Finding] = field(default_factory=list)

    def absolute_paths(self, frame: pd.DataFrame | None = None) -> list[str]:
        """Absolute file paths of ``frame`` (default: all records)."""
        frame = self.records if frame is None else frame
        return [str(self.root / p) for p in frame["path"]]


def is_image_name(path: Path) -> bool:
    """True when the file name has an image extension."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _records(rows: Iterable[tuple[str, str, int, str]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=RECORD_COLUMNS)
    return frame.astype({"id": str, "path": str, "label": int, "class_name": str})


def _files_in_class_folders(base: Path, class_names: list[str]) -> dict[str, list[Path]]:
    return {
        name: sorted(
            p for p in (base / name).iterdir() if p.is_file() and not p.name.startswith(".")
        )
        for name in class_names
        if (base / name).is_dir()
    }


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not a readable CSV ({exc}); fix or regenerate it") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"{path} lacks column(s) {', '.join(missing)}; expected header {','.join(required)}"
        )
    return frame


def _find_test_dir(root: Path) -> Path | None:
    for name in TEST_DIR_NAMES:
        candidate = root / name
        if candidate.is_dir():
            nested = candidate / name  # Kaggle zips often unpack into test_upload/test_upload
            return nested if nested.is_dir() else candidate
    return None


def _check_duplicates(
    frame: pd.DataFrame, column: str, label: str, csv: Path, findings: list[Finding]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows listed more than once: with one label they are kept once (a warning); with
    different labels nobody knows the truth, so every row of that id is dropped (an error).
    Returns (rows kept, rows dropped for conflicting labels)."""
    repeated = frame[frame[column].duplicated(keep=False)]
    conflicting: set[str] = set()
    for value, group in repeated.groupby(column, sort=True):
        labels = sorted(set(group[label]))
        if len(labels) > 1:
            conflicting.add(value)
            findings.append(
                Finding(
                    "conflicting_labels",
                    "error",
                    str(value),
                    f"{csv.name} lists {value!r} {len(group)} times with different labels "
                    f"{labels}: excluded",
                )
            )
        else:
            findings.append(
                Finding(
                    "duplicate_id",
                    "warning",
                    str(value),
                    f"{csv.name} lists {value!r} {len(group)} times; used once",
                )
            )
    dropped = frame[column].isin(conflicting)
    kept = frame.loc[~dropped]
    return kept.loc[~kept[column].duplicated(keep="first")], frame.loc[dropped]


def _unsafe_name(value: str) -> str | None:
    """Why an id from a CSV cannot name a file inside the dataset, or None."""
    if not value.strip():
        return "empty"
    if "/" in value or "\\" in value or value in (".", "..") or "\x00" in value:
        return "not a plain file name"
    return None


def _inside(root: Path, rel: str) -> Path | None:
    """``root / rel`` when it stays inside ``root`` (no absolute path, no ``..`` escape)."""
    if not rel.strip() or "\x00" in rel or Path(rel).is_absolute():
        return None
    path = root / rel
    return path if path.resolve().is_relative_to(root.resolve()) else None


def _orphans(
    files: dict[str, list[Path]], listed: set[Path], root: Path, csv: Path
) -> list[Finding]:
    findings = []
    for paths in files.values():
        for path in paths:
            if path not in listed:
                kind, msg = (
                    ("file_without_id", f"not listed in {csv.name}: excluded (add a row to use it)")
                    if is_image_name(path)
                    else ("not_an_image", "not an image file: ignored")
                )
                findings.append(Finding(kind, "warning", str(path.relative_to(root)), msg))
    return findings


def _load_kaggle(root: Path) -> Dataset:
    csv = root / "train.csv"
    frame = _read_csv(csv, ["Id", "Category"])
    train_dir = root / "train"
    if (train_dir / "train").is_dir():  # unzipped as train/train/<class>
        train_dir = train_dir / "train"
    if not train_dir.is_dir():
        raise DatasetError(
            f"{root} has train.csv but no train/ folder; unzip train.zip into {root}"
        )
    folders = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    labels = sorted(
        {*folders, *frame["Category"]},
        key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v),
    )
    class_names = [c for c in labels if c.isdigit() and c in folders] or folders
    findings: list[Finding] = []
    frame, conflicting = _check_duplicates(frame, "Id", "Category", csv, findings)
    files = _files_in_class_folders(train_dir, class_names)
    rows, listed = [], set()
    for image_id, category in zip(conflicting["Id"], conflicting["Category"], strict=True):
        if not _unsafe_name(image_id) and category in class_names:
            listed.add(train_dir / category / image_id)  # reported as conflicting, not orphan
    for image_id, category in zip(frame["Id"], frame["Category"], strict=True):
        problem = _unsafe_name(image_id)
        if problem:
            findings.append(
                Finding(
                    "bad_id",
                    "error",
                    repr(image_id),
                    f"Id {image_id!r} in {csv.name} is {problem}; the row is skipped",
                )
            )
            continue
        if not category.strip():
            listed.update(train_dir / c / image_id for c in class_names)  # no orphan report
            findings.append(
                Finding(
                    "missing_label",
                    "error",
                    image_id,
                    f"no Category given in {csv.name}: excluded",
                )
            )
            continue
        if category not in class_names:
            findings.append(
                Finding(
                    "unknown_label",
                    "error",
                    image_id,
                    f"Category {category!r} is not one of the classes {class_names}",
                )
            )
            continue
        path = train_dir / category / image_id
        if not path.is_file():
            findings.append(
                Finding(
                    "missing_file",
                    "error",
                    image_id,
                    f"listed in train.csv but {path.relative_to(root)} does not exist",
                )
            )
            continue
        listed.add(path)
        rows.append((image_id, str(path.relative_to(root)), class_names.index(category), category))
    findings += _orphans(files, listed, root, csv)
    sample = root / "sample_submission.csv"
    return Dataset(
        root,
        "kaggle",
        class_names,
        _records(rows),
        _find_test_dir(root),
        sample if sample.is_file() else None,
        findings,
    )


def _load_labels_csv(root: Path) -> Dataset:
    csv = root / "labels.csv"
    frame = _read_csv(csv, ["path", "class_name", "class_id"])
    findings: list[Finding] = []
    frame, conflicting = _check_duplicates(frame, "path", "class_name", csv, findings)
    ids = pd.to_numeric(frame["class_id"], errors="coerce")
    pairs = frame.assign(class_id=ids).dropna(subset=["class_id"])
    mapping = pairs.groupby("class_id")["class_name"].agg(lambda s: s.mode().iloc[0])
    class_names = [mapping[i] for i in sorted(mapping.index)]
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows, listed = [], {root / rel for rel in conflicting["path"] if _inside(root, rel)}
    for rel, name, class_id in zip(frame["path"], frame["class_name"], ids, strict=True):
        if _inside(root, rel) is None:
            findings.append(
                Finding(
                    "bad_path",
                    "error",
                    repr(rel),
                    f"path {rel!r} in {csv.name} is empty or points outside {root}; skipped",
                )
            )
            continue
        if not name.strip() and pd.isna(class_id):
            findings.append(
                Finding("missing_label", "error", rel, f"no class given in {csv.name}: excluded")
            )
            continue
        if pd.isna(class_id) or name not in class_names or class_names.index(name) != int(class_id):
            findings.append(
                Finding(
                    "unknown_label",
                    "error",
                    rel,
                    f"class {name!r}/{class_id} does not match the class list {class_names}",
                )
            )
            continue
        path = root / rel
        if not path.is_file():
            findings.append(
                Finding("missing_file", "error", rel, f"listed in {csv.name} but does not exist")
            )
            continue
        listed.add(path)
        rows.append((Path(rel).stem, rel, int(class_id), name))
    findings += _orphans(_files_in_class_folders(root, folders), listed, root, csv)
    return Dataset(
        root, "labels_csv", class_names, _records(rows), _find_test_dir(root), None, findings
    )


def _load_folders(root: Path) -> Dataset:
    class_names = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in TEST_DIR_NAMES
    )
    if not class_names:
        raise DatasetError(
            f"{root} has no class subfolders, train.csv or labels.csv; "
            "put each class's images in a folder named after the class"
        )
    findings: list[Finding] = []
    rows = []
    for label, (name, paths) in enumerate(_files_in_class_folders(root, class_names).items()):
        for path in paths:
            rel = str(path.relative_to(root))
            if is_image_name(path):
                rows.append((path.stem, rel, label, name))
            else:
                findings.append(
                    Finding("not_an_image", "warning", rel, "not an image file: ignored")
                )
    return Dataset(
        root, "folders", class_names, _records(rows), _find_test_dir(root), None, findings
    )


LAYOUT_FILES = {"kaggle": "train.csv", "labels_csv": "labels.csv"}
"""The file that marks a layout (class folders have none)."""


def detect_layout(root: Path) -> Layout:
    """The layout of a dataset folder: ``train.csv`` = kaggle, ``labels.csv`` = labels_csv,
    else folders."""
    for layout, name in LAYOUT_FILES.items():
        if (root / name).is_file():
            return layout  # type: ignore[return-value]
    return "folders"


def load_dataset(
    root: str | Path, layout: Layout | None = None, what: str = "pass --data DIR or set data.root"
) -> Dataset:
    """Read a dataset folder in any supported layout (see the module docstring). ``layout``:
    the one expected (a different one fails, saying what was found); None: detected.
    ``what``: how to fix a missing folder, for the error message."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; {what}")
    found = detect_layout(root)
    if layout is not None and layout != found:
        marker = LAYOUT_FILES.get(layout)
        raise DatasetError(
            f"{root} is not in the {layout} layout ("
            + (f"no {marker}" if marker else f"it has {LAYOUT_FILES[found]}")
            + f"; it looks like {found}): fix the layout setting or the folder"
        )
    loaders = {"kaggle": _load_kaggle, "labels_csv": _load_labels_csv, "folders": _load_folders}
    dataset = loaders[found](root)
    for name in dataset.class_names:
        if not (dataset.records["class_name"] == name).any():
            dataset.findings.append(
                Finding(
                    "empty_class",
                    "error",
                    name,
                    f"class {name!r} has no images; add images or remove the class",
                )
            )
    log.info(
        "dataset %s: layout %s, %d classes, %d images listed",
        root,
        dataset.layout,
        len(dataset.class_names),
        len(dataset.records),
    )
    return dataset


# --------------------------------------------------------------------------- image validation


@dataclass(frozen=True)
class ImageInfo:
    """What validation learned about one file; ``kind`` names the problem when ``error`` is set
    (``empty_file``, ``not_an_image``, ``too_large``, ``corrupt_image``, ``unreadable``)."""

    width: int = 0
    height: int = 0
    mode: str = ""
    bytes: int = 0
    error: str | None = None
    kind: str = ""


def _too_large(width: int, height: int) -> str:
    return (
        f"{width}x{height} px is over the {MAX_IMAGE_PIXELS:,} pixel limit "
        "(decompression-bomb guard)"
    )


def inspect_image(path: str | Path) -> ImageInfo:
    """Fully decode one image and describe it; ``error`` says why it cannot be used.

    The pixel count is checked from the header before anything is decoded, so an image that
    declares huge dimensions (a decompression bomb) costs nothing.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        return ImageInfo(error=f"unreadable: {exc.strerror}", kind="unreadable")
    if size == 0:
        return ImageInfo(error="empty file (0 bytes)", kind="empty_file")
    try:
        with Image.open(path) as image:
            width, height, mode = image.width, image.height, image.mode
            if width * height > MAX_IMAGE_PIXELS:
                return ImageInfo(width, height, mode, size, _too_large(width, height), "too_large")
            image.load()  # a truncated or corrupt file fails here
    except Image.DecompressionBombError as exc:  # PIL's own guard, past twice its limit
        return ImageInfo(
            bytes=size,
            error=f"over the pixel limit (decompression-bomb guard): {exc}",
            kind="too_large",
        )
    except UnidentifiedImageError:
        return ImageInfo(bytes=size, error="not an image (unknown format)", kind="not_an_image")
    except PermissionError as exc:
        return ImageInfo(bytes=size, error=f"unreadable: {exc.strerror}", kind="unreadable")
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        return ImageInfo(
            bytes=size, error=f"corrupt or truncated image: {exc}", kind="corrupt_image"
        )
    return ImageInfo(width, height, mode, size)


@dataclass
class ValidationReport:
    """The outcome of `validate_dataset`: usable records, excluded ones, and all findings."""

    dataset: Dataset
    usable: pd.DataFrame  # RECORD_COLUMNS + width, height, mode, bytes
    excluded: pd.DataFrame  # RECORD_COLUMNS + reason
    findings: list[Finding]

    @property
    def class_counts(self) -> dict[str, int]:
        """Usable images per class, in label order."""
        counts = self.usable["class_name"].value_counts()
        return {name: int(counts.get(name, 0)) for name in self.dataset.class_names}

    def errors(self) -> list[Finding]:
        """Findings that excluded something."""
        return [f for f in self.findings if f.severity == "error"]

    def summary(self) -> str:
        """A few human lines: counts, then one line per kind of finding."""
        lines = [
            f"{len(self.usable)} usable images in {len(self.dataset.class_names)} classes "
            f"({self.dataset.layout} layout at {self.dataset.root}); {len(self.excluded)} excluded"
        ]
        by_kind: dict[tuple[str, str], list[Finding]] = {}
        for finding in self.findings:
            by_kind.setdefault((finding.severity, finding.kind), []).append(finding)
        for (severity, kind), items in sorted(by_kind.items()):
            shown = ", ".join(f.path for f in items[:5]) + (" ..." if len(items) > 5 else "")
            lines.append(f"  {severity}: {kind} x{len(items)} ({items[0].message}): {shown}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready form (written as validation.json)."""
        return {
            "root": str(self.dataset.root),
            "layout": self.dataset.layout,
            "class_names": self.dataset.class_names,
            "class_counts": self.class_counts,
            "usable": len(self.usable),
            "excluded": self.excluded[["path", "reason"]].to_dict(orient="records"),
            "findings": [asdict(f) for f in self.findings],
        }

    def write(self, out_dir: str | Path) -> Path:
        """Write ``validation.json`` into ``out_dir`` and return its path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "validation.json"
        path.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        return path

    def ensure_trainable(self, min_images_per_class: int = 2) -> None:
        """Raise `DatasetError` when too little is left to train on: the message says how many
        usable images are left, how many were excluded, and the minimum."""
        counts = self.class_counts
        left = f"{len(self.usable)} usable image(s) left, {len(self.excluded)} excluded"
        nonempty = [name for name, n in counts.items() if n > 0]
        if len(nonempty) < 2:
            raise DatasetError(
                f"only {len(nonempty)} class(es) with usable images in {self.dataset.root} "
                f"({left}); a classifier needs at least 2 classes — see validation.json"
            )
        short = {name: n for name, n in counts.items() if n < min_images_per_class}
        if short:
            raise DatasetError(
                f"too few usable images in class(es) {short} ({left}); the minimum is "
                f"{min_images_per_class} per class (data.min_images_per_class) for a "
                "train/validation split: add images, fix the excluded files listed in "
                "validation.json, or lower data.min_images_per_class"
            )


def validate_dataset(dataset: Dataset, workers: int = 4, progress: bool = True) -> ValidationReport:
    """Decode every listed image; exclude and report what cannot be used. Never raises on bad files."""
    paths = dataset.absolute_paths()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        infos = list(
            tqdm(
                pool.map(inspect_image, paths),
                total=len(paths),
                desc="validating images",
                disable=not progress,
                unit="img",
            )
        )
    findings = list(dataset.findings)
    records = dataset.records.copy()
    records["width"] = [i.width for i in infos]
    records["height"] = [i.height for i in infos]
    records["mode"] = [i.mode for i in infos]
    records["bytes"] = [i.bytes for i in infos]
    bad = [i.error is not None for i in infos]
    for rel, info in zip(records["path"], infos, strict=True):
        if info.error is not None:
            findings.append(Finding(info.kind, "error", rel, f"{info.error}: excluded"))
        elif info.mode != "RGB":
            findings.append(
                Finding(
                    "not_rgb",
                    "warning",
                    rel,
                    f"mode {info.mode} (not RGB): converted to RGB when loaded",
                )
            )
    excluded_prior = [
        f for f in dataset.findings if f.severity == "error" and f.kind != "empty_class"
    ]
    excluded = pd.DataFrame(
        [{"path": f.path, "reason": f.message} for f in excluded_prior]
        + [
            {"path": r, "reason": i.error}
            for r, i in zip(records["path"], infos, strict=True)
            if i.error
        ],
        columns=["path", "reason"],
    )
    usable = records.loc[[not b for b in bad]].reset_index(drop=True)
    report = ValidationReport(dataset, usable, excluded, findings)
    for name, count in report.class_counts.items():
        if count == 0 and (dataset.records["class_name"] == name).any():
            findings.append(
                Finding(
                    "empty_class",
                    "error",
                    name,
                    f"class {name!r} has no usable images left after exclusions",
                )
            )
    log.info(
        "validation: %d usable, %d excluded, %d warnings",
        len(usable),
        len(excluded),
        sum(f.severity == "warning" for f in findings),
    )
    return report


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: grayscale, palette, CMYK and alpha modes through PIL's own
    conversion (alpha dropped); 16-bit and 32-bit integer and float grayscale scaled into
    0..255 first (PIL would clip them to white or black)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            top = 65535.0 if values.max(initial=0) <= 65535 else float(values.max())
        else:
            top = 1.0 if image.mode == "F" and values.max(initial=0) <= 1.0 else 255.0
        scaled = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, target_size: tuple[int, int]) -> np.ndarray:
    """Decode an image as RGB uint8 resized to ``target_size`` (height, width).

    JPEGs are decoded at a reduced scale first (PIL ``draft``) when the photo is much larger
    than the target, which is both faster and as sharp after the bilinear resize.
    """
    height, width = target_size
    with Image.open(path) as image:
        image.draft("RGB", (width, height))
        rgb = to_rgb(image)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


# --------------------------------------------------------------------------- split


def make_split(records: pd.DataFrame, val_fraction: float = 0.2, seed: int = 42) -> pd.DataFrame:
    """Stratified train/validation split: each class keeps ``val_fraction`` of its images for
    validation (at least one when it has two or more). Adds a ``subset`` column, and a
    ``source`` column (``primary``) when ``records`` has none; deterministic."""
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    frame = records.sort_values(["label", "path"]).reset_index(drop=True)
    frame["subset"] = "train"
    if SOURCE_COLUMN not in frame:
        frame[SOURCE_COLUMN] = PRIMARY_SOURCE
    for _, group in frame.groupby("label"):
        n = len(group)
        n_val = min(max(round(n * val_fraction), 1 if n >= 2 else 0), n - 1) if n else 0
        chosen = group.sample(n=n_val, random_state=seed).index
        frame.loc[chosen, "subset"] = "val"
    return frame


def write_split(split: pd.DataFrame, path: str | Path) -> Path:
    """Write a split as CSV (paths relative to the dataset root)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = split if SOURCE_COLUMN in split else split.assign(**{SOURCE_COLUMN: PRIMARY_SOURCE})
    frame[[*RECORD_COLUMNS, "subset", SOURCE_COLUMN]].to_csv(path, index=False)
    return path


def read_split(path: str | Path) -> pd.DataFrame:
    """Read a split written by `write_split` (one written before extra sources existed, without
    a ``source`` column, reads as all ``primary``)."""
    frame = _read_csv(Path(path), [*RECORD_COLUMNS, "subset"])
    if SOURCE_COLUMN not in frame:
        frame[SOURCE_COLUMN] = PRIMARY_SOURCE
    return frame.astype({"label": int})


def list_test_images(test_dir: str | Path) -> list[Path]:
    """Image files of an unlabelled test folder, sorted by name."""
    test_dir = Path(test_dir)
    if not test_dir.is_dir():
        raise DatasetError(f"test folder {test_dir} does not exist")
    return sorted(p for p in test_dir.iterdir() if p.is_file() and is_image_name(p))
