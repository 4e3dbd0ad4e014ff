"""Where a pipeline run keeps its files: the Dataset artifact and the run folder.

The Dataset artifact written by `carclassifier.steps.prepare_step` is the hand-over between pods::

    <dataset>/shards/images-NNNNN.tar, index.json
                                 the images, packed by `carclassifier.shards`: the tars hold
                                 data/... (the dataset in its own layout: Kaggle, labels.csv,
                                 folders), extra/<name>/... (each extra source, as read) and
                                 test/... (unlabelled test images, when they came from outside
                                 data/)
    <dataset>/config.yaml        the effective config (recipe YAML + overrides + parameters)
    <dataset>/split.csv          the train/validation split every stage uses (extra sources'
                                 photos, training only, under extra/<name>/ in the shards)
    <dataset>/sources.csv        with data.extra_sources: photos per source (carclassifier.sources)
    <dataset>/validation.json    the validation report; usable.csv, excluded.csv: its tables
    <dataset>/dataset.json       manifest: run key, class names, test folder, counts

The launcher copies an input artifact object by object (one GET each), so the images travel as a
few shards instead of one object per image; each reading step unpacks them once into a scratch
folder (`images_root`). Why, and what it costs either way: docs/data-handoff.md.

A run's durable outputs live under ``<checkpoint root>/<run key>/`` (`run_dir`; local folder or
gs://), laid out like a local run's output folder: ``stages/<stage>/`` (per-epoch checkpoints,
best.keras, metrics, curves), ``export/`` (what the champion pointer names) and
``submission.csv``; the other outputs are kfp artifacts in the pipeline root. The run key is
derived from the effective config and the data (`make_run_key`), so a retried or preempted pod of
the same run resumes from its stage's checkpoints, and a new run with the same config and data
finds its finished stages instead of training them again. To train afresh with an unchanged
recipe, give the run another name (override ``name=...``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from carclassifier import shards, storage
from carclassifier.config import RunConfig, dump_config, load_config
from carclassifier.prepare import PreparedData, load_prepared

log = logging.getLogger(__name__)

DATA_DIR = "data"
TEST_DIR = "test"
MANIFEST = "dataset.json"
CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.csv"
VALIDATION_FILE = "validation.json"
USABLE_FILE = "usable.csv"
EXCLUDED_FILE = "excluded.csv"
SHARD_DIR = "shards"
SCRATCH_ENV = "CARCLASSIFIER_SCRATCH"
"""Where reading steps unpack the image shards (default: the system temp folder)."""
CHAMPION_FILE = "champion.json"
"""The champion pointer's name under the checkpoint root (when the gate is given none)."""
DEPLOY_RECORD = "deploy.json"
"""The deploy step's record in the run folder (version, uri, export, rolled_out)."""
EXPORT_DIR = "export"
SUBMISSION_FILE = "submission.csv"


def run_dir(checkpoint_root: str, run_key: str, config: RunConfig) -> str:
    """Where a run's durable outputs go: ``<checkpoint_root>/<run_key>`` (a local folder or
    gs:// prefix); an empty root means the config's ``output_dir``."""
    return storage.join(checkpoint_root or config.output_dir, run_key)


def make_run_key(config: RunConfig, prepared: PreparedData) -> str:
    """``<config name>-<12 hex>``: a digest of the effective config (without its local paths),
    the split and the size of every usable image. Same recipe and data, same key."""
    neutral = config.model_copy(
        update={
            "output_dir": "",
            "data": config.data.model_copy(
                update={
                    "root": None,
                    "test_dir": None,
                    "extra_sources": [
                        s.model_copy(update={"root": ""}) for s in config.data.extra_sources
                    ],
                }
            ),
        }
    )
    digest = hashlib.sha256(dump_config(neutral).encode())
    digest.update(prepared.split_path.read_bytes())
    if prepared.report is not None:
        usable = prepared.report.usable
        for path, size in zip(usable["path"], usable["bytes"], strict=True):
            digest.update(f"{path}\t{size}\n".encode())
    return f"{config.name}-{digest.hexdigest()[:12]}"


def with_data_root(config: RunConfig, root: Path) -> RunConfig:
    """``config`` with ``data.root`` set to ``root``."""
    return config.model_copy(update={"data": config.data.model_copy(update={"root": str(root)})})


def images_root(dataset_dir: str) -> Path:
    """The folder that holds the Dataset artifact's ``data/`` and ``test/``: its shards unpacked
    (verified) into ``$CARCLASSIFIER_SCRATCH`` or the temp folder, once per shard set (a folder
    named by `shards.index_digest`, so a second call in the same pod reuses it); an artifact
    written before shards existed is its own root."""
    out = Path(dataset_dir)
    if not (out / SHARD_DIR).is_dir():
        return out
    scratch = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir())
    target = scratch / f"carclassifier-images-{shards.index_digest(out / SHARD_DIR)[:16]}"
    if target.is_dir():
        log.info("images of %s already unpacked in %s", dataset_dir, target)
        return target
    scratch.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=scratch))
    shards.extract_shards(out / SHARD_DIR, partial)
    try:
        partial.rename(target)  # atomic: a folder at target is always complete
    except OSError:  # another process of this pod got there first, with the same bytes
        shutil.rmtree(partial, ignore_errors=True)
    return target


def load_dataset_artifact(dataset_dir: str) -> tuple[RunConfig, PreparedData, dict[str, Any]]:
    """The effective config, the prepared data (its root: the unpacked images, `images_root`)
    and the manifest of a Dataset artifact."""
    out = Path(dataset_dir)
    data = images_root(dataset_dir) / DATA_DIR
    config = with_data_root(load_config(out / CONFIG_FILE), data)
    prepared = load_prepared(data, out / SPLIT_FILE)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    return config, prepared, manifest
