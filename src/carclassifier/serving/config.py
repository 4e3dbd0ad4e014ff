"""The serving settings: one validated object, defaults here, overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from carclassifier.errors import StorageError

Backend = Literal["auto", "onnx", "saved_model", "keras"]
DEFAULT_BACKEND: Backend = "auto"
"""``onnx`` when the export has ``model.onnx`` (ONNX Runtime: 1.3x faster than the SavedModel at
batch 1 and 2.1x at batch 32 on the Lite0 export, benchmarks/results/inference.md; the export
writes it only when it matches Keras within 1e-4), else ``saved_model`` (a little faster than
``keras``, benchmarks/results/serving.md). All give the same probabilities within 1e-4
(tests/test_serving_api.py)."""

MIB = 1024 * 1024


class ServingConfig(BaseModel):
    """Limits and defaults of the model server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        "runs/local/export",
        description="Export folder, or a serving root (numbered versions + champion.json) whose "
        "live version is followed; local or gs://.",
    )
    backend: Backend = Field(
        DEFAULT_BACKEND, description="auto, onnx (model.onnx), saved_model or keras (model.keras)."
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in a container).")
    port: int = Field(8080, ge=0, le=65535, description="Port (0: any free port).")
    threads: int = Field(4, ge=1, le=64, description="waitress worker threads.")
    max_upload_mib: float = Field(20.0, gt=0, description="Largest request body in MiB.")
    max_files: int = Field(16, ge=1, description="Most images in one request.")
    top_k: int = Field(3, ge=1, description="Classes returned per image (default of ?top_k).")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest width x height decoded (decompression-bomb guard)."
    )
    tta_views: int | None = Field(
        None,
        ge=2,
        le=32,
        description="Views averaged with ?tta=1 (default: as the export was evaluated, else 5).",
    )
    poll_seconds: float = Field(
        30.0, gt=0, le=86400, description="How often a serving root's pointer is checked."
    )
    seed: int | None = Field(
        None,
        description="Seed of the TTA draws (the same image gives the same result; default: the "
        "export's, else 0).",
    )

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mib`` in bytes."""
        return int(self.max_upload_mib * MIB)


def check_model_location(uri: str) -> None:
    """Fail fast, before TensorFlow is imported, on a local export folder that is not there
    (a gs:// prefix is checked when the model is loaded)."""
    if uri.startswith("gs://"):
        return
    folder = Path(uri).expanduser()
    if not folder.is_dir():
        raise StorageError(f"export folder {uri} does not exist; run the export step first")
    if not (folder / "labels.json").is_file() and not (folder / "champion.json").is_file():
        raise StorageError(
            f"{uri} is not an export folder (no labels.json) nor a serving root (no "
            "champion.json); pass the folder export wrote or the one deploy publishes to"
        )
