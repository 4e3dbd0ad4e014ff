"""Submission files: predict every image of a folder into the competition's ``Id,Category`` CSV.

    predict_folder(model, "data/test_upload", class_names, "runs/x/submission.csv",
                   sample_submission=Path("data/sample_submission.csv"))

``Id`` is the image path relative to the folder (posix), so for a flat folder the file name;
``Category`` is the integer label index (the position in ``class_names``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from carclassifier.data import is_image_name
from carclassifier.errors import DatasetError, StorageError
from carclassifier.inference import Transform, check_class_names, predict_proba
from carclassifier.storage import is_gcs_uri

log = logging.getLogger(__name__)

SubmissionFormat = Literal["competition", "full"]
SHOWN = 5  # ids listed in an error message


def _shown(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(repr(i) for i in items[:SHOWN]) + more


def find_images(images_dir: str | Path) -> dict[str, Path]:
    """Image files under ``images_dir`` (recursively, hidden files and folders skipped) by id:
    the path relative to ``images_dir`` in posix form, sorted."""
    base = Path(images_dir)
    if not base.is_dir():
        raise DatasetError(f"image folder {base} does not exist; pass the unpacked test folder")
    found = {}
    for path in base.rglob("*"):
        rel = path.relative_to(base)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and is_image_name(path):
            found[rel.as_posix()] = path
    return dict(sorted(found.items()))


def read_sample_ids(sample_submission: str | Path) -> list[str]:
    """The ``Id`` column of a sample submission CSV, in order."""
    path = Path(sample_submission)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DatasetError(f"sample submission {path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"sample submission {path} is not a readable CSV ({exc})") from None
    if "Id" not in frame.columns:
        raise DatasetError(
            f"sample submission {path} has no Id column (columns: {list(frame.columns)})"
        )
    return frame["Id"].tolist()


def _top_k_columns(probs: np.ndarray, class_names: list[str], top_k: int) -> dict[str, np.ndarray]:
    k = max(1, min(top_k, len(class_names)))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    names = np.asarray(class_names, dtype=object)
    columns: dict[str, np.ndarray] = {}
    for j in range(k):
        columns[f"top{j + 1}_class"] = names[order[:, j]]
        columns[f"top{j + 1}_prob"] = np.take_along_axis(probs, order[:, j : j + 1], 1)[:, 0]
    return columns


def predict_folder(
    model: Any,
    images_dir: str | Path,
    class_names: list[str],
    out_csv: str | Path,
    sample_submission: Path | None = None,
    tta: Transform | None = None,
    tta_views: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    fmt: SubmissionFormat = "competition",
    top_k: int = 3,
    progress: bool = True,
) -> pd.DataFrame:
    """Predict every image under ``images_dir`` and write the submission CSV ``out_csv``.

    Columns are exactly ``Id,Category`` (``fmt="competition"``); ``fmt="full"`` adds
    ``class_name`` and ``top{k}_class``, ``top{k}_prob`` for k in 1..``top_k``. Without
    ``sample_submission`` rows are sorted by Id; with it (a CSV with an ``Id`` column) rows follow
    its order, an Id without an image (or with an unreadable one) is a `DatasetError`, and images
    the sample does not list are left out with a warning. Otherwise unreadable images are left
    out with a warning. ``tta``/``tta_views``/``seed``/``batch_size`` are as in
    `carclassifier.inference.predict_proba`. Returns the frame written.
    """
    if fmt not in ("competition", "full"):
        raise ValueError(f"fmt must be 'competition' or 'full', got {fmt!r}")
    if is_gcs_uri(out_csv):
        raise StorageError(
            f"submissions are written to a local file; {out_csv} is gs:// (write locally, then upload)"
        )
    check_class_names(model, class_names)
    images = find_images(images_dir)
    if not images:
        raise DatasetError(
            f"no images under {images_dir} (looked for .jpg, .png and other image files, "
            "recursively); check the test folder path"
        )

    sample_ids: list[str] | None = None
    if sample_submission is not None:
        sample_ids = read_sample_ids(sample_submission)
        missing = [i for i in dict.fromkeys(sample_ids) if i not in images]
        if missing:
            raise DatasetError(
                f"{len(missing)} id(s) of {Path(sample_submission).name} have no image under "
                f"{images_dir}: {_shown(missing)} (found e.g. {_shown(list(images)[:3])}); "
                "point at the folder the sample's ids are relative to"
            )
        wanted = set(sample_ids)
        extra = [i for i in images if i not in wanted]
        if extra:
            log.warning(
                "%d image(s) not in %s left out of the submission: %s",
                len(extra),
                Path(sample_submission).name,
                _shown(extra),
            )
        images = {i: p for i, p in images.items() if i in wanted}

    ids = list(images)
    probs = predict_proba(
        model,
        list(images.values()),
        batch_size=batch_size,
        tta=tta,
        tta_views=tta_views,
        seed=seed,
        progress=progress,
        skip_unreadable=True,
    )
    readable = ~np.isnan(probs).any(axis=1)
    unreadable = [i for i, ok in zip(ids, readable, strict=True) if not ok]
    if unreadable and sample_ids is not None:
        raise DatasetError(
            f"{len(unreadable)} image(s) listed in {Path(sample_submission).name} cannot be "
            f"read: {_shown(unreadable)}; replace the files (the submission needs every id)"
        )
    if unreadable:
        log.warning("%d unreadable image(s) left out: %s", len(unreadable), _shown(unreadable))
    ids = [i for i, ok in zip(ids, readable, strict=True) if ok]
    probs = probs[readable]
    if not ids:
        raise DatasetError(f"none of the images under {images_dir} could be read")

    top = probs.argmax(axis=1)
    frame = pd.DataFrame({"Id": ids, "Category": top.astype(int)})
    if fmt == "full":
        frame["class_name"] = np.asarray(class_names, dtype=object)[top]
        for name, values in _top_k_columns(probs, class_names, top_k).items():
            frame[name] = values
    if sample_ids is not None:
        frame = frame.set_index("Id").loc[sample_ids].reset_index()

    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    log.info("submission: %d rows (%s format) written to %s", len(frame), fmt, out)
    return frame
