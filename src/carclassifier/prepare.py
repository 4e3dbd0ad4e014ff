"""Prepare a run's data: find the dataset, validate every image, split, write the artefacts.

This is what `carclassifier prepare` and the pipeline's prepare step call; every later stage
reads the ``split.csv`` written here, so all stages train and validate on the very same images.
Training photos that are near-duplicates of validation or test photos are left out of it and
listed in ``leaks.csv``; the data version (`carclassifier.lineage`) names the photos used.
Extra sources (``data.extra_sources``, `carclassifier.sources`) add training photos only; their
per-source counts go to ``sources.csv``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from carclassifier.config import RunConfig, dump_config
from carclassifier.data import (
    SOURCE_COLUMN,
    Dataset,
    ValidationReport,
    is_image_name,
    load_dataset,
    make_split,
    read_split,
    validate_dataset,
    write_split,
)
from carclassifier.demo_data import REAL_SAMPLES, demo_dataset_root, shared_dir
from carclassifier.errors import DatasetError
from carclassifier.lineage import Leak, data_version, find_leaks, without_leaks
from carclassifier.sources import SOURCES_FILE, load_extra_sources
from carclassifier.sources import summary as sources_summary

log = logging.getLogger(__name__)

LEAKS_FILE = "leaks.csv"


@dataclass
class PreparedData:
    """A validated dataset and its split."""

    dataset: Dataset
    report: ValidationReport | None  # None when read back from a split written earlier
    split: pd.DataFrame
    split_path: Path
    data_version: str | None = None  # carclassifier.lineage.data_version of the usable photos
    leaks: list[Leak] = field(default_factory=list)  # training photos left out (leaks.csv)
    sources: pd.DataFrame | None = None  # with extra sources: sources.csv (sources.summary)

    def subset(self, name: str) -> pd.DataFrame:
        """Rows of the split in subset ``train`` or ``val``."""
        return self.split[self.split["subset"] == name].reset_index(drop=True)


def resolve_data_root(config: RunConfig) -> Path:
    """``config.data.root``, or the demo dataset when it is None."""
    if config.data.root is None:
        return demo_dataset_root(Path(config.output_dir).parent / "demo-data")
    return Path(config.data.root)


def validate_and_split(
    config: RunConfig, out_dir: str | Path, progress: bool = True
) -> PreparedData:
    """Load, validate (bad files excluded and listed), check trainability and write
    ``config.yaml``, ``validation.json`` and ``split.csv`` into ``out_dir``."""
    root = resolve_data_root(config)
    if "://" in str(config.data.root or ""):
        raise DatasetError(
            f"data.root {config.data.root} is a URI: prepare reads a local folder (the pipeline's "
            "prepare step downloads gs:// data first); copy the data here or pass --data DIR"
        )
    dataset = load_dataset(root)  # a missing folder fails before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    report = validate_dataset(dataset, workers=max(2, config.input.workers), progress=progress)
    log.info("validation report: %s", report.write(out))
    for line in report.summary().splitlines():
        log.info("%s", line)
    report.ensure_trainable(config.data.min_images_per_class)
    split = make_split(report.usable, config.data.val_fraction, config.data.seed)
    extras = load_extra_sources(
        config.data.extra_sources, dataset, out, max(2, config.input.workers), progress
    )
    version = data_version(
        dataset.root,
        report.usable["path"],
        report.usable["label"],
        [x.version_part() for x in extras],
    )
    if extras:  # training only: appended after the primary split, which they do not change
        split = pd.concat([split, *(x.records for x in extras)], ignore_index=True)
    leaks: list[Leak] = []
    if config.data.leak_check:
        leaks = _leaks(config, PreparedData(dataset, report, split, out / "split.csv"))
        split = without_leaks(split, leaks)
    pd.DataFrame([asdict(x) for x in leaks], columns=list(Leak.__dataclass_fields__)).to_csv(
        out / LEAKS_FILE, index=False
    )
    split_path = write_split(split, out / "split.csv")
    table = sources_summary(report, split, extras, leaks) if extras else None
    if table is not None:
        table.to_csv(out / SOURCES_FILE, index=False)
        for row in table.itertuples(index=False):
            log.info(
                "source %s: %d train / %d val; %d dropped as unmapped (%s), %d excluded, "
                "%d leaks left out",
                row.source, row.train, row.val, row.unmapped, row.unmapped_classes or "none",
                row.excluded, row.leaked,
            )  # fmt: skip
    counts = split["subset"].value_counts()
    log.info(
        "split: %d train / %d val images -> %s",
        counts.get("train", 0),
        counts.get("val", 0),
        split_path,
    )
    log.info("data version %s", version)
    return PreparedData(dataset, report, split, split_path, version, leaks, table)


def _leaks(config: RunConfig, prepared: PreparedData) -> list[Leak]:
    """Training photos that are near-duplicates of a validation or test photo."""
    test = find_test_images(config, prepared)
    test_paths = sorted(str(p) for p in test.rglob("*") if is_image_name(p)) if test else []
    train = prepared.subset("train")
    source_of = dict(zip(train["path"], train[SOURCE_COLUMN], strict=True))
    found = find_leaks(
        prepared.dataset.root,
        list(train["path"]),
        {"val": list(prepared.subset("val")["path"]), "test": test_paths},
    )
    return [replace(x, source=source_of[x.train]) for x in found]


def load_prepared(data_root: str | Path, split_csv: str | Path) -> PreparedData:
    """A dataset with the split an earlier `validate_and_split` wrote (every stage reads this)."""
    dataset = load_dataset(data_root)
    split = read_split(split_csv)
    missing = [p for p in split["path"] if not (dataset.root / p).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) of {split_csv} are not under {dataset.root} "
            f"(e.g. {missing[:3]}); pass the dataset the split was made from (and keep the "
            "extra sources' folders where they were when it was made)"
        )
    table = Path(split_csv).with_name(SOURCES_FILE)
    sources = pd.read_csv(table, keep_default_na=False) if table.is_file() else None
    return PreparedData(dataset, None, split, Path(split_csv), sources=sources)


def find_test_images(config: RunConfig, prepared: PreparedData) -> Path | None:
    """Unlabelled images to predict: ``data.test_dir``, the dataset's own test folder, or, for
    the demo data, the competition samples in ``../shared/data/sf-competition-samples``."""
    if config.data.test_dir:
        return Path(config.data.test_dir)
    if prepared.dataset.test_dir is not None:
        return prepared.dataset.test_dir
    shared = shared_dir()
    if config.data.root is None and shared is not None and (shared / REAL_SAMPLES).is_dir():
        return shared / REAL_SAMPLES
    return None
