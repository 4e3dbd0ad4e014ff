"""Train one stage of the recipe (reused for every stage); resumes from its checkpoints."""

from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components._base import trainer_component


@trainer_component
def train_stage(
    dataset: Input[Dataset],
    stage_name: str,
    checkpoint_root: str,
    run_key: str,
    model: Output[Model],
    metrics: Output[Metrics],
    curves: Output[HTML],
    init_model: Input[Model] = None,
    gpu_type: str = "",
    gpu_count: str = "",
):
    """Train stage stage_name from init_model (none: a fresh model) with per-epoch checkpoints
    under <checkpoint_root>/<run_key>/stages/<stage_name>, so a retried pod resumes mid-stage.
    Outputs the stage's best model, its metrics (with the GPU hours: minutes x gpu_count of
    gpu_type) and the accuracy/loss curves."""
    from carclassifier import reports, steps

    result = steps.train_stage_step(
        dataset.path, stage_name, checkpoint_root, run_key,
        init_model.path if init_model is not None else None, model.path, curves.path,
        gpu_type, gpu_count,
    )  # fmt: skip
    reports.log_metrics(metrics, result.metrics)
    model.metadata.update(result.model)
