"""Extra data sources: more labelled photos for training, from other datasets (``data.extra_sources``).

Each source is a dataset in a layout `carclassifier.data.load_dataset` reads (Kaggle,
``labels.csv``, class folders), locally or under a gs:// prefix, with a ``class_map`` from its
class names to ours. `load_extra_sources` reads and validates it like the primary data; photos
of classes the map does not name are dropped and counted. The photos kept go to TRAINING only
(never validation), so the validation accuracy stays a measure on the primary data;
`carclassifier.prepare` leaves out the ones that are near-duplicates of a validation or test
photo (leaks.csv, with their ``source``), adds them to the data version and writes the
per-source summary ``sources.csv``. In split.csv their ``path`` leads from the primary root to
the photo (``../extra/<name>/<class>/<file>`` in a Dataset artifact) and ``source`` names them.

`sampling_weights` gives each training photo its source's ``weight``; `carclassifier.inputs`
then draws every epoch's photos by weight (`carclassifier.inputs.epoch_order`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from carclassifier import storage
from carclassifier.config import PRIMARY_SOURCE, ExtraSource
from carclassifier.data import (
    RECORD_COLUMNS,
    SOURCE_COLUMN,
    Dataset,
    ValidationReport,
    load_dataset,
    validate_dataset,
)
from carclassifier.errors import DatasetError
from carclassifier.lineage import Leak, SourcePhotos

log = logging.getLogger(__name__)

EXTRA_DIR = "extra"
"""Where gs:// sources are downloaded to (``<out>/extra/<name>``), and where a Dataset artifact
keeps every source's photos."""
SOURCES_FILE = "sources.csv"
SUMMARY_COLUMNS = [
    "source", "root", "layout", "weight", "listed", "unmapped", "unmapped_classes",
    "excluded", "leaked", "train", "val",
]  # fmt: skip


@dataclasses.dataclass
class ExtraData:
    """One extra source, read and validated: the photos it adds to training."""

    source: ExtraSource
    dataset: Dataset
    report: ValidationReport
    records: pd.DataFrame
    """Its usable photos of mapped classes: RECORD_COLUMNS + ``source``, ``subset`` (train);
    ``path`` relative to the primary root, label and class name ours."""
    unmapped: dict[str, int]
    """Photos dropped per class of theirs that ``class_map`` does not name."""

    def version_part(self) -> SourcePhotos:
        """Its part of the data version (`carclassifier.lineage.data_version`)."""
        spec = json.dumps(
            {"weight": self.source.weight, "class_map": self.source.class_map}, sort_keys=True
        )
        usable = self.report.usable
        return SourcePhotos(self.source.name, spec, self.dataset.root, list(usable["path"]),
                            [self.source.class_map[c] for c in usable["class_name"]])  # fmt: skip


def local_root(source: ExtraSource, out_dir: str | Path) -> Path:
    """The source's folder: ``root`` itself, or for a gs:// prefix a fresh copy in
    ``<out_dir>/extra/<name>`` (what was there before is replaced)."""
    if not storage.is_gcs_uri(source.root):
        return Path(source.root)
    target = Path(out_dir) / EXTRA_DIR / source.name
    shutil.rmtree(target, ignore_errors=True)
    return storage.download_tree(source.root, target)


def check_class_map(source: ExtraSource, ours: Sequence[str], theirs: Sequence[str]) -> None:
    """Raise `DatasetError` when ``class_map`` maps to a class we do not have; log the names
    it maps from that the source does not have (nothing to map)."""
    unknown = sorted({v for v in source.class_map.values() if v not in ours})
    if unknown:
        raise DatasetError(
            f"data.extra_sources {source.name!r}: class_map maps to {unknown}, which are not "
            f"classes of data.root (ours: {list(ours)}); fix the map's values"
        )
    absent = sorted(k for k in source.class_map if k not in theirs)
    if absent:
        log.warning(
            "extra source %s: class_map names %s, which it does not have (its classes: %s)",
            source.name, absent, list(theirs),
        )  # fmt: skip


def load_extra_source(
    source: ExtraSource,
    primary: Dataset,
    out_dir: str | Path,
    workers: int = 2,
    progress: bool = False,
) -> ExtraData:
    """Read one extra source, drop (and count) the photos of unmapped classes, validate the
    others (bad files excluded as for the primary data, ``validation-<name>.json`` in
    ``out_dir``) and express the usable ones in the primary data's classes and root."""
    root = local_root(source, out_dir)
    dataset = load_dataset(root, source.layout, what=f"fix data.extra_sources {source.name!r} root")
    check_class_map(source, primary.class_names, dataset.class_names)
    records = dataset.records
    mapped = records["class_name"].isin(list(source.class_map))
    unmapped = {
        str(k): int(v) for k, v in records.loc[~mapped, "class_name"].value_counts().items()
    }
    kept = dataclasses.replace(dataset, records=records.loc[mapped].reset_index(drop=True))
    report = validate_dataset(kept, workers=workers, progress=progress)
    (Path(out_dir) / f"validation-{source.name}.json").write_text(
        json.dumps(report.to_dict(), indent=2), encoding="utf-8"
    )
    usable = report.usable
    ours = [source.class_map[c] for c in usable["class_name"]]
    frame = pd.DataFrame(
        {
            "id": [f"{source.name}/{i}" for i in usable["id"]],
            "path": [
                Path(os.path.relpath(dataset.root / p, primary.root)).as_posix()
                for p in usable["path"]
            ],
            "label": [primary.class_names.index(c) for c in ours],
            "class_name": ours,
            "subset": "train",
            SOURCE_COLUMN: source.name,
        },
        columns=[*RECORD_COLUMNS, "subset", SOURCE_COLUMN],
    ).astype({"label": int})
    log.info(
        "extra source %s (%s layout at %s): %d training photos; %d dropped as unmapped %s; "
        "%d excluded by validation",
        source.name, dataset.layout, dataset.root, len(frame), sum(unmapped.values()),
        unmapped or "", len(report.excluded),
    )  # fmt: skip
    return ExtraData(source, dataset, report, frame, unmapped)


def load_extra_sources(
    sources: Sequence[ExtraSource],
    primary: Dataset,
    out_dir: str | Path,
    workers: int = 2,
    progress: bool = False,
) -> list[ExtraData]:
    """`load_extra_source` for each of ``sources``, in order."""
    return [load_extra_source(s, primary, out_dir, workers, progress) for s in sources]


def summary(
    primary: ValidationReport,
    split: pd.DataFrame,
    extras: Sequence[ExtraData],
    leaks: Sequence[Leak],
) -> pd.DataFrame:
    """One row per source (``primary`` first): photos listed, dropped as unmapped, excluded
    by validation, left out as leaks, and in the split's train and val subsets."""
    subsets = split.groupby([SOURCE_COLUMN, "subset"]).size()
    leaked = pd.Series([x.source for x in {(x.train, x.source): x for x in leaks}.values()])
    leaked_counts = leaked.value_counts() if len(leaked) else pd.Series(dtype=int)

    def row(name: str, root: object, layout: str, weight: float, listed: int,
            unmapped: dict[str, int], excluded: int) -> dict[str, object]:  # fmt: skip
        return {
            "source": name, "root": str(root), "layout": layout, "weight": weight,
            "listed": listed, "unmapped": sum(unmapped.values()),
            "unmapped_classes": ";".join(f"{k}:{v}" for k, v in sorted(unmapped.items())),
            "excluded": excluded, "leaked": int(leaked_counts.get(name, 0)),
            "train": int(subsets.get((name, "train"), 0)), "val": int(subsets.get((name, "val"), 0)),
        }  # fmt: skip

    ds = primary.dataset
    rows = [
        row(PRIMARY_SOURCE, ds.root, ds.layout, 1.0, len(ds.records), {}, len(primary.excluded))
    ]
    rows += [
        row(
            x.source.name,
            x.source.root,
            x.dataset.layout,
            x.source.weight,
            len(x.dataset.records),
            x.unmapped,
            len(x.report.excluded),
        )  # fmt: skip
        for x in extras
    ]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def sampling_weights(frame: pd.DataFrame, sources: Sequence[ExtraSource]) -> np.ndarray | None:
    """Each row's draw weight by its ``source`` (primary 1.0, an extra source its ``weight``);
    None when they are all equal (then every epoch is a plain permutation, as without extra
    sources) or the frame has no ``source`` column."""
    if SOURCE_COLUMN not in frame or not len(frame):
        return None
    weights = {PRIMARY_SOURCE: 1.0, **{s.name: s.weight for s in sources}}
    unknown = sorted(set(frame[SOURCE_COLUMN]) - set(weights))
    if unknown:
        raise DatasetError(
            f"the split names source(s) {unknown} that data.extra_sources does not have "
            f"({sorted(weights)}); prepare the data again with this config"
        )
    values = frame[SOURCE_COLUMN].map(weights).to_numpy(dtype=np.float64)
    return None if np.all(values == values[0]) else values
