"""What data a run saw: its data version, and training photos that leak into validation or test.

* `data_version`: a content hash of the dataset's file list (relative path, label and the
  SHA-256 of every file's bytes, in sorted order), so photos added to a gs:// prefix give the
  next scheduled run another version, and the same photos always the same one.
* `find_leaks`: training photos that are near-duplicates of a validation or test photo (the same
  car photo re-uploaded, resized, re-compressed or with a watermark), by perceptual hash
  (`imagehash.phash`: a 64-bit DCT hash; at most `LEAK_DISTANCE` differing bits). A run
  validated on photos it trained on reports a too-good accuracy, so these are taken out of
  training and named.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

LEAK_DISTANCE = 6
"""Most differing bits (of 64) for two photos to count as the same photo. Measured on 40
cars-ru10 photos (2026-12-03): a half-size resize or a JPEG re-saved at quality 40 moves the
hash by at most 2 bits, a text watermark by at most 4; two different photos were at least 10
bits apart (median 28). A crop of 5% per side moves it by ~14 bits: such copies are not caught."""


@dataclass(frozen=True)
class SourcePhotos:
    """An extra source's part of the data version: its name, what the run uses it with
    (``spec``: weight and class map, as text) and its photos (relative to ``root``) and labels."""

    name: str
    spec: str
    root: str | Path
    paths: Sequence[str]
    labels: Sequence[object]


def _update(digest: Any, root: str | Path, paths: Sequence[str], labels: Sequence[object],
            prefix: str = "") -> None:  # fmt: skip
    for path, label in sorted(zip(paths, (str(x) for x in labels), strict=True)):
        with open(Path(root) / path, "rb") as handle:
            content = hashlib.file_digest(handle, "sha256").hexdigest()
        digest.update(f"{prefix}{path}\t{label}\t{content}\n".encode())


def data_version(
    root: str | Path,
    paths: Sequence[str],
    labels: Sequence[object],
    extra: Sequence[SourcePhotos] = (),
) -> str:
    """``sha256:<first 16 hex>`` over the sorted (path, label, file SHA-256) of the dataset,
    then, per extra source (by name), its spec and its photos the same way; with no extra
    source the version is the primary data's alone (what it was before extra sources)."""
    digest = hashlib.sha256()
    _update(digest, root, paths, labels)
    for source in sorted(extra, key=lambda s: s.name):
        digest.update(f"source\t{source.name}\t{source.spec}\n".encode())
        _update(digest, source.root, source.paths, source.labels, f"{source.name}:")
    return f"sha256:{digest.hexdigest()[:16]}"


def perceptual_hashes(paths: Sequence[str | Path], progress: bool = False) -> np.ndarray:
    """The 64-bit perceptual hash of each image, as an (N, 64) boolean array."""
    rows = []
    for path in tqdm(paths, desc="perceptual hashes", disable=not progress, unit="img"):
        with Image.open(path) as image:
            rows.append(imagehash.phash(image.convert("RGB")).hash.reshape(-1))
    return np.array(rows, dtype=bool).reshape(len(rows), 64)


@dataclass(frozen=True)
class Leak:
    """A training photo that is (nearly) the same photo as one held out."""

    train: str
    held_out: str
    subset: str  # "val" or "test"
    distance: int
    source: str = "primary"  # where the training photo came from (carclassifier.sources)


def find_leaks(
    root: str | Path,
    train: Sequence[str],
    held_out: dict[str, Sequence[str]],
    max_distance: int = LEAK_DISTANCE,
) -> list[Leak]:
    """Every training photo within ``max_distance`` bits of a photo of ``held_out``
    (``{"val": paths, "test": paths}``, relative to ``root`` or absolute), nearest first."""
    if not train:
        return []
    train_hashes = perceptual_hashes([Path(root) / p for p in train])
    leaks: list[Leak] = []
    for subset, paths in held_out.items():
        if not paths:
            continue
        other = perceptual_hashes([Path(root) / p for p in paths])
        distances = (train_hashes[:, None, :] != other[None, :, :]).sum(axis=2)
        for i, j in zip(*np.nonzero(distances <= max_distance), strict=True):
            leaks.append(Leak(str(train[i]), str(paths[j]), subset, int(distances[i, j])))
    leaks.sort(key=lambda leak: (leak.distance, leak.train))
    if leaks:
        log.warning(
            "%d training photo(s) are near-duplicates of validation/test photos and are left out "
            "of training: %s",
            len({leak.train for leak in leaks}),
            "; ".join(
                f"{x.train} ~ {x.held_out} ({x.subset}, {x.distance} bits)" for x in leaks[:5]
            ),
        )
    return leaks


def without_leaks(frame: pd.DataFrame, leaks: Sequence[Leak]) -> pd.DataFrame:
    """``frame`` (a split with ``path`` and ``subset``) with the leaking training photos left out."""
    leaked = {leak.train for leak in leaks}
    keep = ~((frame["subset"] == "train") & frame["path"].isin(leaked))
    return frame[keep].reset_index(drop=True)
