"""Kubeflow Pipelines (kfp v2) components, one per kind of step.

Each is a few lines that turn kfp artifacts into calls of `carclassifier.steps`; no logic lives
here. All run on the trainer image (`TRAINER_IMAGE`); `trainer_components(image)` rebuilds them
on another one.
"""

from dataclasses import dataclass, fields

from kfp.dsl.python_component import PythonComponent

from components._base import DEFAULT_IMAGE, IMAGE_ENV, TRAINER_IMAGE, trainer_component, with_image
from components.deploy import deploy_model
from components.eda import validate_and_eda
from components.evaluate import evaluate_model
from components.export import export_model
from components.gate import champion_gate
from components.predict import predict_submission
from components.prepare import prepare_data
from components.summary import run_summary
from components.train import train_stage


@dataclass(frozen=True)
class TrainerComponents:
    """Every component of the pipeline, built on one image."""

    prepare_data: PythonComponent
    validate_and_eda: PythonComponent
    train_stage: PythonComponent
    evaluate_model: PythonComponent
    predict_submission: PythonComponent
    export_model: PythonComponent
    champion_gate: PythonComponent
    deploy_model: PythonComponent
    run_summary: PythonComponent


_DEFAULTS = TrainerComponents(
    prepare_data, validate_and_eda, train_stage, evaluate_model, predict_submission, export_model,
    champion_gate, deploy_model, run_summary,
)  # fmt: skip


def trainer_components(image: str = TRAINER_IMAGE) -> TrainerComponents:
    """The components with ``base_image=image``."""
    return TrainerComponents(
        **{f.name: with_image(getattr(_DEFAULTS, f.name), image) for f in fields(_DEFAULTS)}
    )


__all__ = [
    "DEFAULT_IMAGE",
    "IMAGE_ENV",
    "TRAINER_IMAGE",
    "TrainerComponents",
    "champion_gate",
    "deploy_model",
    "evaluate_model",
    "export_model",
    "predict_submission",
    "prepare_data",
    "run_summary",
    "train_stage",
    "trainer_component",
    "trainer_components",
    "validate_and_eda",
    "with_image",
]
