"""Serving versions: a promoted export published as ``<serving_root>/<N>/``, and the pointer
``<serving_root>/champion.json`` that says which version is live.

A version folder is what both servers read:

* TensorFlow Serving (KServe's ``tensorflow`` runtime, ``storageUri: <serving_root>``) serves
  the highest numbered child of its base path; under KServe that base path is a copy made when
  the pod starts, so the deploy step rolls the predictor (`carclassifier.kubeflow.kserve`). The SavedModel sits at the
  top of ``<N>/`` (``saved_model.pb``, ``variables/``; uploaded last, so a half-copied version
  has no ``saved_model.pb`` to load yet). Extra files beside it are ignored.
* ``carclassifier serve --model <serving_root>`` follows the pointer (`pointer_version`), and
  checks a new version on the photo stored with it (``check/``) before switching to it.

Version numbers are claimed with a create-only write (``.claims/<N>.json``: two racing
deployments never get the same number), and the pointer is moved with a conditional write on
its GCS generation, retried on a conflict and never moved back to a lower version, so two runs
racing end with the higher version live and no update lost (on gs://; a local folder has the
create-only claims but no conditional pointer write). A rollback publishes an older
version's files again as the next number (so TF Serving, which always serves the highest number,
follows too) and moves the pointer there.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from carclassifier import storage
from carclassifier.data import load_image
from carclassifier.errors import CarClassifierError
from carclassifier.export import (
    LABELS_FILE,
    MODEL_FILE,
    ONNX_FILE,
    SAVED_MODEL_DIR,
    SAVED_MODEL_VERSION,
    load_exported,
)
from carclassifier.inference import predict_proba
from carclassifier.storage import PreconditionFailedError

log = logging.getLogger(__name__)

POINTER_FILE = "champion.json"
SERVING_DIR = "serving"
"""Default serving root under the checkpoint root (the pipeline's ``serving_root=""``)."""
CLAIMS_DIR = ".claims"
CHECK_DIR = "check"
CHECK_EXPECTED = "expected.json"
SAVED_MODEL_PB = "saved_model.pb"
MAX_POINTER_ATTEMPTS = 10


class DeployError(CarClassifierError):
    """A deployment or rollback that cannot be done as asked."""


@dataclass(frozen=True)
class Deployed:
    """A published version and whether the pointer now names it."""

    version: int
    uri: str
    live: bool


def versions(serving_root: str) -> list[int]:
    """The published version numbers under ``serving_root``, ascending."""
    return sorted(int(n) for n in storage.list_names(serving_root) if n.isdigit())


def read_pointer(serving_root: str) -> tuple[dict[str, Any] | None, int | None]:
    """The pointer's content and its GCS generation ((None, None) when nothing is live)."""
    text, generation = storage.read_versioned(storage.join(serving_root, POINTER_FILE))
    return (json.loads(text) if text else None), generation


def pointer_version(serving_root: str) -> tuple[int, str] | None:
    """(version, folder URI) the pointer names, or None when ``serving_root`` has no pointer."""
    pointer, _ = read_pointer(serving_root)
    return None if pointer is None else (int(pointer["version"]), str(pointer["uri"]))


def _claim(serving_root: str, note: dict[str, Any]) -> int:
    """The next free version number, claimed so that no racing deployment gets it too."""
    number = max([0, *versions(serving_root)]) + 1
    # A claim's text is unique (a nonce): create_text takes an identical text already there
    # for its own retried write, so two runs deploying the same export must still differ.
    text = json.dumps({**note, "claim": uuid.uuid4().hex})
    while not storage.create_text(storage.join(serving_root, CLAIMS_DIR, f"{number}.json"), text):
        number += 1
    return number


def _stage_files(source: str, scratch: Path) -> Path:
    """The files of a version folder, laid out locally: the SavedModel at the top, labels.json,
    model.keras, model.onnx and check/. ``source`` is an export folder (SavedModel under
    ``saved_model/1/``) or an already published version folder."""
    fetched = storage.download_tree(source, scratch / "fetched")
    nested = fetched / SAVED_MODEL_DIR / SAVED_MODEL_VERSION
    if not (fetched / SAVED_MODEL_PB).is_file() and not (nested / SAVED_MODEL_PB).is_file():
        raise DeployError(f"{source} has no SavedModel ({SAVED_MODEL_DIR}/{SAVED_MODEL_VERSION}/)")
    out = scratch / "version"
    out.mkdir()
    if (nested / SAVED_MODEL_PB).is_file():
        shutil.copytree(nested, out, dirs_exist_ok=True)
    for name in (
        LABELS_FILE,
        MODEL_FILE,
        ONNX_FILE,
        SAVED_MODEL_PB,
        "variables",
        "assets",
        CHECK_DIR,
    ):
        item = fetched / name
        if item.is_dir():
            shutil.copytree(item, out / name, dirs_exist_ok=True)
        elif item.is_file():
            shutil.copy2(item, out / name)
    if not (out / LABELS_FILE).is_file():
        raise DeployError(f"{source} has no {LABELS_FILE}: not an export")
    return out


def write_check(folder: Path, photo: str | Path) -> None:
    """Store ``photo`` and model.keras's probabilities for it in ``folder/check/``, so a server
    can check a new version before it answers with it."""
    model, _ = load_exported(folder)
    probs = predict_proba(model, [str(photo)], progress=False)[0]
    check = folder / CHECK_DIR
    check.mkdir(exist_ok=True)
    name = f"photo{Path(photo).suffix.lower() or '.jpg'}"
    shutil.copy2(photo, check / name)
    (check / CHECK_EXPECTED).write_text(
        json.dumps({"photo": name, "probabilities": [float(p) for p in probs]}, indent=2)
    )


def _move_pointer(serving_root: str, version: int, uri: str, note: dict[str, Any]) -> bool:
    """Point at ``version`` unless a higher one is already live; True when the pointer names it."""
    target = storage.join(serving_root, POINTER_FILE)
    for _ in range(MAX_POINTER_ATTEMPTS):
        current, generation = read_pointer(serving_root)
        if current is not None and int(current["version"]) >= version:
            log.warning(
                "version %s is already live (>= %s): the pointer stays", current["version"], version
            )
            return int(current["version"]) == version
        body = {
            "version": version,
            "uri": uri,
            "previous": None if current is None else int(current["version"]),
            "deployed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **note,
        }
        try:
            storage.write_text(
                target, json.dumps(body, indent=2), if_generation_match=generation or 0
            )
        except PreconditionFailedError:
            continue  # another deployment moved it in between: read it again
        return True
    raise DeployError(f"{target} keeps changing: are many deployments racing?")


def publish(
    source: str, serving_root: str, check_photo: str | Path | None = None, **note: Any
) -> Deployed:
    """Publish the export (or version folder) ``source`` as the next version under
    ``serving_root`` and make it live. ``check_photo`` (local) is stored with it for the web
    app's check; ``note`` goes into the pointer (e.g. ``export=``, ``val_accuracy=``)."""
    number = _claim(serving_root, {"source": source, **note})
    uri = storage.join(serving_root, str(number))
    with tempfile.TemporaryDirectory(prefix="carclassifier-deploy-") as tmp:
        staged = _stage_files(source, Path(tmp))
        if check_photo is not None:
            write_check(staged, check_photo)
        last = staged / SAVED_MODEL_PB
        held = Path(tmp) / SAVED_MODEL_PB
        shutil.move(last, held)  # uploaded last: TF Serving loads a version once it is there
        if storage.is_gcs_uri(uri):
            storage.upload_tree(staged, uri)
            storage.put_file(held, storage.join(uri, SAVED_MODEL_PB))
        else:
            shutil.copytree(staged, uri, dirs_exist_ok=True)
            shutil.copy2(held, Path(uri) / SAVED_MODEL_PB)
    live = _move_pointer(serving_root, number, uri, {"source": source, **note})
    log.info(
        "deployed %s as version %d at %s%s", source, number, uri, "" if live else " (not live)"
    )
    return Deployed(number, uri, live)


def rollback(serving_root: str, version: int) -> Deployed:
    """Make ``version``'s files live again, published as the next number."""
    if version not in versions(serving_root):
        raise DeployError(
            f"no version {version} under {serving_root}; versions: {versions(serving_root) or 'none'}"
        )
    return publish(storage.join(serving_root, str(version)), serving_root, rollback_of=version)


def check_version(predictor: Any, folder: str) -> str | None:
    """Why the loaded ``predictor`` of version ``folder`` should not serve (None: it answers its
    stored check photo as model.keras did, within 1e-3; a version without a check passes)."""
    with tempfile.TemporaryDirectory(prefix="carclassifier-check-") as tmp:
        expected_uri = storage.join(folder, CHECK_DIR, CHECK_EXPECTED)
        if not storage.exists(expected_uri):
            return None
        expected = json.loads(storage.read_text(expected_uri) or "{}")
        photo = storage.get_file(
            storage.join(folder, CHECK_DIR, expected["photo"]), Path(tmp) / "p"
        )
        image = load_image(photo, predictor.image_size)
    got = predictor.predict([image])[0]
    want = np.asarray(expected["probabilities"])
    if got.shape != want.shape:
        return f"it outputs {got.shape[0]} classes, its check expects {want.shape[0]}"
    error = float(np.abs(got - want).max())
    return None if error <= 1e-3 else f"its check photo differs from model.keras by {error:.2e}"
