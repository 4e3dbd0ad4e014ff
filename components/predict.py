"""Predict the submission CSV for the dataset's test images."""

from kfp.dsl import Dataset, Input, Model, Output

from components._base import trainer_component


@trainer_component
def predict_submission(
    dataset: Input[Dataset],
    model: Input[Model],
    checkpoint_root: str,
    run_key: str,
    submission: Output[Dataset],
):
    """The competition's Id,Category CSV for the test images (header only when the dataset has
    none), also copied to <checkpoint_root>/<run_key>/submission.csv."""
    from carclassifier import steps

    submission.metadata.update(
        steps.predict_step(dataset.path, model.path, submission.path, checkpoint_root, run_key)
    )
