"""Evaluate the final model on the validation split, plain and with TTA."""

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components._base import trainer_component


@trainer_component
def evaluate_model(
    dataset: Input[Dataset],
    model: Input[Model],
    checkpoint_root: str,
    run_key: str,
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    confusion_tta: Output[ClassificationMetrics],
    report: Output[HTML],
    evaluation: Output[Artifact],
):
    """Accuracy, loss and macro F1 without and with test-time augmentation, confusion matrices
    (UI and CSV), per-class metrics and validation predictions."""
    from carclassifier import reports, steps

    result = steps.evaluate_step(
        dataset.path, model.path, evaluation.path, report.path, checkpoint_root, run_key
    )
    reports.log_metrics(metrics, result.metrics)
    reports.log_confusion(confusion, result.class_names, result.confusion)
    reports.log_confusion(confusion_tta, result.class_names, result.confusion_tta)
