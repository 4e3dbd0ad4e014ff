"""The trained model for serving: a Keras file, a TensorFlow SavedModel and the label list.

    write_export(model, class_names, "runs/x/export", {"backbone": "efficientnet_lite0"})
    model, labels = load_exported("runs/x/export")

An export folder holds

- ``model.keras``: the Keras model (loads with ``safe_mode=True``: no lambdas, no custom code);
- ``saved_model/1/``: a TensorFlow SavedModel (version folder ``1``, the layout TF Serving and
  KServe's ``storageUri: …/export/saved_model`` expect) whose ``serving_default`` signature takes
  ``image``: float32 ``[N, H, W, 3]`` raw RGB pixels 0..255 and returns ``output_0``: the class
  probabilities ``[N, C]`` (TF Serving, ``tf.saved_model.load``);
- ``labels.json``: class names (index = class id), image size, input description, metadata and
  ``tta``, the recipe's test-time augmentation (`carclassifier.augment.TtaSettings`: transforms,
  views, seed), so that ``predict --tta`` and the server's ``?tta=1`` average the very views the
  evaluation did;
- ``model.onnx`` (optional, `export_onnx`): the same function for ONNX Runtime, input ``image``
  float32 ``[N, H, W, 3]`` 0..255, output ``output_0`` probabilities ``[N, C]``, checked against
  Keras within `ONNX_TOLERANCE` when written.

The folder is written under a temporary sibling name and renamed into place at the end, so a
folder with the final name is always a complete export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from carclassifier.augment import TtaSettings
from carclassifier.config import RunConfig
from carclassifier.errors import CarClassifierError, StorageError
from carclassifier.storage import exists, get_file, is_gcs_uri, join

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
SAVED_MODEL_VERSION = "1"  # TF Serving / KServe load <storageUri>/<version>/saved_model.pb
LABELS_FILE = "labels.json"
SERVING_SIGNATURE = "serving_default"
SERVING_INPUT = "image"
SERVING_OUTPUT = "output_0"
INPUT_DESCRIPTION = "RGB float32 0-255, shape [N,H,W,3]"
ONNX_FILE = "model.onnx"
ONNX_TOLERANCE = 1e-4
"""Largest absolute difference allowed between ONNX Runtime's and Keras' probabilities."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"metadata value {value!r} ({type(value).__name__}) is not JSON-serializable")


def _input_hw(model: keras.Model) -> tuple[int, int]:
    shape = model.input_shape
    if isinstance(shape, list) or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"export needs one image input (batch, H, W, 3); the model has {shape}")
    if shape[1] is None or shape[2] is None:
        raise ValueError(f"export needs a fixed input size; the model input is {shape}")
    return int(shape[1]), int(shape[2])


def labels_document(
    model: keras.Model,
    class_names: list[str],
    metadata: dict | None = None,
    tta: TtaSettings | None = None,
) -> dict[str, Any]:
    """The content of ``labels.json`` for ``model`` (``tta`` recorded when given)."""
    height, width = _input_hw(model)
    num_classes = int(model.output_shape[-1])
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names but the model outputs {num_classes}")
    return {
        "class_names": [str(c) for c in class_names],
        "image_size": height if height == width else [height, width],
        "input": INPUT_DESCRIPTION,
        "serving": {
            "signature": SERVING_SIGNATURE,
            "input": SERVING_INPUT,
            "output": SERVING_OUTPUT,
        },
        "metadata": metadata or {},
    } | ({"tta": tta.to_document()} if tta is not None else {})


def export_metadata(
    config: RunConfig,
    evaluation: dict[str, Any],
    run_key: str | None = None,
    data_version: str | None = None,
) -> dict[str, Any]:
    """The ``metadata`` of an export of the recipe's final model: backbone, run name (and
    ``run_key`` in a pipeline run), the data version it was trained on, last stage, and the
    validation accuracy without and with TTA from ``evaluation``
    (`carclassifier.evaluate.evaluate_classifier`'s result)."""
    metadata: dict[str, Any] = {"backbone": config.model.backbone, "run": config.name}
    if run_key is not None:
        metadata["run_key"] = run_key
    if data_version is not None:
        metadata["data_version"] = data_version
    return metadata | {
        "stage": config.stages[-1].name,
        "val_accuracy": evaluation["accuracy"],
        "val_accuracy_tta": evaluation["tta"]["accuracy"],
    }


def write_export(
    model: keras.Model,
    class_names: list[str],
    out_dir: str | Path,
    metadata: dict | None = None,
    onnx: bool = True,
    tta: TtaSettings | None = None,
) -> Path:
    """Write ``model.keras``, ``saved_model/``, ``labels.json`` and (``onnx``) ``model.onnx``
    into ``out_dir``.

    ``metadata`` (e.g. backbone, metrics; numpy scalars are fine) and ``tta`` (the recipe's,
    `TtaSettings.from_config`; without it readers fall back to the library's) go into
    ``labels.json``.
    ``model.onnx`` is written only when ONNX Runtime matches Keras within `ONNX_TOLERANCE`
    (`export_onnx`); a conversion that fails or differs is logged and left out, and the
    serving app then uses the SavedModel. An existing ``out_dir`` is replaced only once the
    new export is complete. Returns ``out_dir``.
    """
    if is_gcs_uri(out_dir):
        raise StorageError(
            f"export writes to a local folder; {out_dir} is gs:// (export locally, then upload)"
        )
    document = labels_document(model, class_names, metadata, tta)
    text = json.dumps(document, indent=2, default=_jsonable)  # fails before anything is written
    height, width = _input_hw(model)

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        model.save(tmp / MODEL_FILE)
        model.export(
            str(tmp / SAVED_MODEL_DIR / SAVED_MODEL_VERSION),
            format="tf_saved_model",
            verbose=False,
            input_signature=[
                tf.TensorSpec((None, height, width, 3), tf.float32, name=SERVING_INPUT)
            ],
        )
        if onnx:
            _try_onnx(model, tmp)
        (tmp / LABELS_FILE).write_text(text, encoding="utf-8")
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d-class model (%dx%d input) to %s", len(class_names), height, width, out)
    return out


def export_onnx(model: keras.Model, out_dir: str | Path, seed: int = 0) -> Path:
    """Write ``out_dir/model.onnx`` (Keras' ONNX export, tf2onnx underneath) and check it.

    The ONNX model must give Keras' probabilities within `ONNX_TOLERANCE` on a random batch of
    two images, else nothing is written and `CarClassifierError` says by how much they differ.
    """
    # Lazy: ONNX and ONNX Runtime load in about a second and only this writer needs them.
    import onnx
    import onnxruntime as ort

    height, width = _input_hw(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{ONNX_FILE}.partial-{uuid.uuid4().hex[:8]}"
    try:
        model.export(
            str(tmp),
            format="onnx",
            verbose=False,
            input_signature=[
                tf.TensorSpec((None, height, width, 3), tf.float32, name=SERVING_INPUT)
            ],
        )
        graph = onnx.load(str(tmp))
        _rename_output(graph, SERVING_OUTPUT)
        onnx.save(graph, str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        images = np.random.default_rng(seed).uniform(0, 255, (2, height, width, 3))
        images = images.astype(np.float32)
        expected = keras.ops.convert_to_numpy(model(images, training=False))
        (got,) = session.run([SERVING_OUTPUT], {SERVING_INPUT: images})
        error = float(np.abs(got - expected).max())
        if not error <= ONNX_TOLERANCE:
            raise CarClassifierError(
                f"the ONNX model differs from Keras by {error:.2e} (allowed {ONNX_TOLERANCE:.0e}); "
                "not written"
            )
        tmp.rename(out / ONNX_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported ONNX model to %s (max difference to Keras %.1e)", out / ONNX_FILE, error)
    return out / ONNX_FILE


def _try_onnx(model: keras.Model, out_dir: Path) -> None:
    """`export_onnx`, where a failure only costs the faster serving backend (logged)."""
    try:
        export_onnx(model, out_dir)
    except Exception as exc:  # noqa: BLE001 - any converter failure: serve the SavedModel
        log.warning("model.onnx not written (%s); servers use the SavedModel", _short(exc))


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _rename_output(graph: Any, name: str) -> None:
    """Name the single graph output ``name`` (tf2onnx calls it after the TF tensor)."""
    (output,) = graph.graph.output
    old = output.name
    for node in graph.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
    output.name = name


def _local_file(folder: str | Path, name: str, scratch: Path) -> Path:
    """``folder/name`` as a local file: checked in place, or fetched from gs:// into ``scratch``."""
    if is_gcs_uri(folder):
        try:
            return get_file(join(folder, name), scratch / name)
        except StorageError as exc:
            raise StorageError(f"{folder} is not a complete export: {exc}") from exc
    path = Path(folder).expanduser() / name
    if not path.is_file():
        raise StorageError(
            f"{folder} is not a complete export: {name} is missing "
            f"(an export folder holds {MODEL_FILE}, {SAVED_MODEL_DIR}/ and {LABELS_FILE})"
        )
    return path


def read_labels(path: Path, uri: str | Path) -> dict[str, Any]:
    """The ``labels.json`` at local ``path`` (fetched from the export at ``uri``), checked to
    hold a ``class_names`` list."""
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{LABELS_FILE} of {uri} is not readable JSON ({exc})") from None
    if not isinstance(labels, dict) or not isinstance(labels.get("class_names"), list):
        raise StorageError(f"{LABELS_FILE} of {uri} has no class_names list; re-export the model")
    export_tta(labels, uri)  # a broken record fails at load, not at the first ?tta=1
    return labels


def export_tta(labels: dict[str, Any], uri: str | Path) -> TtaSettings | None:
    """The TTA an export was evaluated with (``labels.json``'s ``tta``); None when it records
    none (an export written before it did)."""
    if "tta" not in labels:
        return None
    try:
        return TtaSettings.from_document(labels["tta"], f"{LABELS_FILE} of {uri}")
    except CarClassifierError as exc:
        raise StorageError(str(exc)) from None


def check_outputs(uri: str | Path, labels: dict[str, Any], outputs: int, what: str) -> None:
    """Refuse a model file (``what``) whose class count differs from ``labels.json``'s."""
    if outputs != len(labels["class_names"]):
        raise StorageError(
            f"{uri}: {LABELS_FILE} lists {len(labels['class_names'])} classes but {what} "
            f"outputs {outputs}; the files come from different exports"
        )


def load_exported(uri: str | Path) -> tuple[keras.Model, dict[str, Any]]:
    """Load an export folder written by `write_export`: the Keras model and ``labels.json``.

    ``uri`` is a local folder or a ``gs://`` prefix; from gs:// only ``labels.json`` and
    ``model.keras`` are downloaded, freshly each call (into a temporary folder removed afterwards,
    so a re-export to the same prefix is never shadowed by a cache). The model is loaded with
    ``safe_mode=True`` and without its training configuration (``compile=False``).
    """
    if not is_gcs_uri(uri) and not Path(uri).expanduser().is_dir():
        raise StorageError(f"export folder {uri} does not exist; run the export step first")
    with tempfile.TemporaryDirectory(prefix="carclassifier-export-") as scratch:
        labels = read_labels(_local_file(uri, LABELS_FILE, Path(scratch)), uri)
        model_path = _local_file(uri, MODEL_FILE, Path(scratch))
        try:
            model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise StorageError(f"cannot load {MODEL_FILE} of {uri}: {exc}") from exc
    check_outputs(uri, labels, int(model.output_shape[-1]), "the model")
    return model, labels


class OnnxModel:
    """An export's ``model.onnx`` under ONNX Runtime, with the few attributes of a Keras model
    that `carclassifier.evaluate.predict_proba` uses (``input_shape``, ``output_shape``,
    ``predict_on_batch``), so both formats are run on the same decoded photos."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        try:
            self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise StorageError(f"cannot load {path}: {exc}") from exc
        (image,) = self._session.get_inputs()
        self.input_shape = (None, *image.shape[1:])
        self.output_shape = (None, self._session.get_outputs()[0].shape[-1])

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities of a float32 batch of raw RGB images."""
        return self._session.run([SERVING_OUTPUT], {SERVING_INPUT: batch.astype(np.float32)})[0]


def load_exported_onnx(uri: str | Path, scratch: Path) -> OnnxModel | None:
    """The export's ``model.onnx`` (fetched into ``scratch`` from gs://), or None when the export
    has none (the export leaves it out when it differs from Keras)."""
    if not exists(join(str(uri), ONNX_FILE)):
        return None
    return OnnxModel(_local_file(uri, ONNX_FILE, scratch))
