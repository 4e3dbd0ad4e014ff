"""Export the final model for serving (Keras, SavedModel, labels.json)."""

from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components._base import trainer_component


@trainer_component
def export_model(
    dataset: Input[Dataset],
    model: Input[Model],
    evaluation: Input[Artifact],
    checkpoint_root: str,
    run_key: str,
    exported: Output[Model],
) -> str:
    """Export model.keras, saved_model/ and labels.json (evaluation results in its metadata);
    returns the durable copy's URI, <checkpoint_root>/<run_key>/export."""
    from carclassifier import steps

    result = steps.export_step(
        dataset.path, model.path, evaluation.path, exported.path, checkpoint_root, run_key
    )
    exported.metadata.update({"export_uri": result.export_uri, **result.metadata})
    return result.export_uri
