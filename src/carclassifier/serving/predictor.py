"""The exported model loaded once, predicting batches of uploaded images.

    predictor = Predictor.load("runs/local/export", backend="saved_model")
    images = [decode_image(data, predictor.image_size, max_pixels=40_000_000) for data in uploads]
    probs = predictor.predict(images)            # (N, C), one forward pass

A backend is one entry of `LOADERS`: a function from a local export folder to a `Loaded`
(a forward function on float32 ``[N, H, W, 3]`` RGB 0..255 batches, the labels document, a version
string). ``onnx`` runs ``model.onnx`` in ONNX Runtime (the fastest on CPU:
benchmarks/results/inference.md; written by the export only when it matches Keras within 1e-4);
``saved_model`` the TensorFlow SavedModel's ``serving_default`` signature; ``keras`` loads
``model.keras`` (``safe_mode=True``). ``auto`` picks ``onnx`` when the export has it, else
``saved_model``.

Images are decoded exactly as in training and evaluation (`carclassifier.data.load_image`:
RGB, bilinear resize to the model's size); the pixel count is checked from the header before
anything is decoded.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from carclassifier.augment import TtaSettings
from carclassifier.data import load_image
from carclassifier.errors import CarClassifierError, StorageError
from carclassifier.export import (
    LABELS_FILE,
    MODEL_FILE,
    ONNX_FILE,
    SAVED_MODEL_DIR,
    SAVED_MODEL_VERSION,
    SERVING_INPUT,
    SERVING_OUTPUT,
    SERVING_SIGNATURE,
    check_outputs,
    export_tta,
    load_exported,
    read_labels,
)
from carclassifier.storage import download_tree, exists, get_file, is_gcs_uri, join
from carclassifier.tta import tta_predict

log = logging.getLogger(__name__)

Forward = Callable[[np.ndarray], np.ndarray]


class ImageInputError(CarClassifierError):
    """An uploaded file that cannot be used as an image; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 400, code: str = "not_an_image") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Loaded:
    """What a backend loader returns."""

    forward: Forward
    labels: dict[str, Any]
    version: str


# --------------------------------------------------------------------------- loaders


def _digest(paths: Sequence[Path]) -> str:
    """First 12 hex digits of the SHA-256 over the files' bytes (the model version)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def _load_keras(folder: Path) -> Loaded:
    model, labels = load_exported(folder)

    def forward(batch: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict_on_batch(batch))

    return Loaded(forward, labels, _digest([folder / MODEL_FILE]))


def _read_labels(folder: Path) -> dict[str, Any]:
    return read_labels(folder / LABELS_FILE, folder)


def _load_saved_model(folder: Path) -> Loaded:
    path = folder / SAVED_MODEL_DIR / SAVED_MODEL_VERSION
    if (folder / "saved_model.pb").is_file():  # a published version (carclassifier.deploy)
        path = folder
    labels = _read_labels(folder)
    if not (path / "saved_model.pb").is_file() and (path.parent / "saved_model.pb").is_file():
        log.warning(
            "%s has the SavedModel without its version folder %s/ (an older export); serving "
            "it, but re-export for TF Serving/KServe",
            folder,
            SAVED_MODEL_VERSION,
        )
        path = path.parent
    if not (path / "saved_model.pb").is_file():
        raise StorageError(
            f"{folder} is not a complete export: "
            f"{SAVED_MODEL_DIR}/{SAVED_MODEL_VERSION}/saved_model.pb is missing"
        )
    try:
        signature = tf.saved_model.load(str(path)).signatures[SERVING_SIGNATURE]
    except (OSError, ValueError, KeyError) as exc:
        raise StorageError(f"cannot load the SavedModel of {folder}: {exc}") from exc
    outputs = int(signature.structured_outputs[SERVING_OUTPUT].shape[-1])
    check_outputs(folder, labels, outputs, "the SavedModel")

    def forward(batch: np.ndarray) -> np.ndarray:
        return signature(**{SERVING_INPUT: tf.constant(batch)})[SERVING_OUTPUT].numpy()

    files = sorted(p for p in path.rglob("*") if p.is_file())
    return Loaded(forward, labels, _digest(files))


def _load_onnx(folder: Path) -> Loaded:
    # Lazy: ONNX Runtime is needed by this backend only (TensorFlow comes with the export module).
    import onnxruntime as ort

    path = folder / ONNX_FILE
    labels = _read_labels(folder)
    if not path.is_file():
        raise StorageError(
            f"{folder} has no {ONNX_FILE} (the export leaves it out when the conversion fails "
            "or differs from Keras); use --backend saved_model"
        )
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        raise StorageError(f"cannot load {ONNX_FILE} of {folder}: {exc}") from exc
    check_outputs(folder, labels, int(session.get_outputs()[0].shape[-1]), ONNX_FILE)

    def forward(batch: np.ndarray) -> np.ndarray:
        return session.run([SERVING_OUTPUT], {SERVING_INPUT: batch.astype(np.float32)})[0]

    return Loaded(forward, labels, _digest([path]))


LOADERS: dict[str, Callable[[Path], Loaded]] = {
    "onnx": _load_onnx,
    "saved_model": _load_saved_model,
    "keras": _load_keras,
}
"""Backend name -> loader of a local export folder."""

_REMOTE_FILES: dict[str, tuple[str, ...]] = {
    "onnx": (LABELS_FILE, ONNX_FILE),
    "keras": (LABELS_FILE, MODEL_FILE),
    "saved_model": (LABELS_FILE, f"{SAVED_MODEL_DIR}/{SAVED_MODEL_VERSION}/"),
}
"""What each backend needs from a gs:// export (a trailing / is a folder)."""


def _fetch(uri: str, backend: str, scratch: Path) -> Path:
    """The export at ``uri`` as a local folder (gs://: only the files ``backend`` needs)."""
    if not is_gcs_uri(uri):
        folder = Path(uri).expanduser()
        if not folder.is_dir():
            raise StorageError(f"export folder {uri} does not exist; run the export step first")
        return folder
    names = _REMOTE_FILES.get(backend, (LABELS_FILE, MODEL_FILE))
    if backend == "saved_model" and exists(join(uri, "saved_model.pb")):
        names = ("",)  # a published version: the SavedModel is the folder itself
    for name in names:
        try:
            if name == "" or name.endswith("/"):
                download_tree(join(uri, name) if name else uri, scratch / name)
            else:
                get_file(join(uri, name), scratch / name)
        except StorageError as exc:
            raise StorageError(f"{uri} is not a complete export: {exc}") from exc
    return scratch


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """``data`` decoded as RGB uint8 at ``size`` (height, width), as in training.

    Raises `ImageInputError`: 400 for empty, non-image or truncated/corrupt data, 413 for an
    image of more than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    if not data:
        raise ImageInputError("the file is empty", 400, "empty_file")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
            fmt = probe.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (Image.MAX_IMAGE_PIXELS); the warning only when filtered to error
        raise ImageInputError(
            f"the image has too many pixels to decode ({exc}); the limit is {max_pixels}",
            413,
            "image_too_large",
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageInputError(
            "not an image (JPEG, PNG, WebP, BMP, GIF or TIFF expected)", 400, "not_an_image"
        ) from None
    if width * height > max_pixels:
        raise ImageInputError(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            413,
            "image_too_large",
        )
    try:
        return load_image(io.BytesIO(data), size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageInputError(
            f"the {fmt or 'image'} data is truncated or corrupt ({exc})", 400, "corrupt_image"
        ) from None


# --------------------------------------------------------------------------- predictor


def auto_backend(uri: str) -> str:
    """``onnx`` when the export at ``uri`` holds ``model.onnx``, else ``saved_model``."""
    if is_gcs_uri(uri):
        has_onnx = exists(join(uri, ONNX_FILE))
    else:
        has_onnx = (Path(uri).expanduser() / ONNX_FILE).is_file()
    return "onnx" if has_onnx else "saved_model"


class Predictor:
    """An exported model loaded once; `predict` runs one forward pass per call.

    Forward passes are serialized by a lock (TensorFlow already spreads one pass over every
    core); decoding and TTA views are prepared outside it.
    """

    def __init__(self, loaded: Loaded, uri: str, backend: str) -> None:
        self._forward = loaded.forward
        self.labels = loaded.labels
        self.version = loaded.version
        self.uri = uri
        self.backend = backend
        self.class_names: list[str] = [str(c) for c in loaded.labels["class_names"]]
        size = loaded.labels.get("image_size")
        if isinstance(size, int):
            self.image_size: tuple[int, int] = (size, size)
        elif isinstance(size, list) and len(size) == 2:
            self.image_size = (int(size[0]), int(size[1]))
        else:
            raise StorageError(f"{LABELS_FILE} of {uri} has no image_size; re-export the model")
        self.tta: TtaSettings = export_tta(loaded.labels, uri) or TtaSettings()
        """The views ``?tta=1`` makes: as the export's evaluation did (the library's defaults
        for an export that records none)."""
        self._lock = threading.Lock()

    @classmethod
    def load(cls, uri: str | Path, backend: str = "auto") -> Predictor:
        """Load the export at ``uri`` (local folder or gs:// prefix) with ``backend``
        (``auto``: ``onnx`` when the export has ``model.onnx``, else ``saved_model``)."""
        uri = str(uri)
        if backend == "auto":
            backend = auto_backend(uri)
        if backend not in LOADERS:
            raise StorageError(
                f"unknown backend {backend!r}; choose one of {['auto', *sorted(LOADERS)]}"
            )
        with tempfile.TemporaryDirectory(prefix="carclassifier-serve-") as scratch:
            loaded = LOADERS[backend](_fetch(uri, backend, Path(scratch)))
        predictor = cls(loaded, uri, backend)
        log.info(
            "model %s loaded with backend %s: %d classes, %dx%d input, version %s",
            uri,
            backend,
            len(predictor.class_names),
            *predictor.image_size,
            predictor.version,
        )
        return predictor

    @property
    def name(self) -> str:
        """A human name: the export's backbone, run and stage when it recorded them."""
        meta = self.labels.get("metadata") or {}
        parts = [str(meta[k]) for k in ("run", "backbone", "stage") if meta.get(k)]
        return " / ".join(parts) or Path(self.uri.rstrip("/")).name or self.uri

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities (N, C) of uint8 ``[H, W, 3]`` images at `image_size`, one forward pass."""
        if not images:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        batch = np.stack(images).astype(np.float32)
        expected = (*self.image_size, 3)
        if batch.shape[1:] != expected:
            raise ValueError(f"images must be {expected}, got {batch.shape[1:]}")
        with self._lock:
            probs = self._forward(batch)
        return np.asarray(probs, dtype=np.float32)

    def predict_tta(self, images: Sequence[np.ndarray], transform: Any, views: int) -> np.ndarray:
        """Mean probabilities over ``views`` views per image (view 0 the image itself, the others
        ``transform(image=...)``), all ``N * views`` images in one forward pass
        (`carclassifier.tta.tta_predict`)."""
        return tta_predict(self.predict, images, transform, views)[1]


def top_k(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """Per image, the ``k`` most probable classes: ``{"class", "index", "probability"}``."""
    k = max(1, min(k, len(class_names)))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [
            {"class": class_names[int(i)], "index": int(i), "probability": float(row[int(i)])}
            for i in ranks
        ]
        for row, ranks in zip(probs, order, strict=True)
    ]
