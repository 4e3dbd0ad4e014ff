"""Validate + EDA: the validation findings and the EDA report of the prepared data."""

from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from components._base import trainer_component


@trainer_component
def validate_and_eda(dataset: Input[Dataset], report: Output[HTML], metrics: Output[Metrics]):
    """The EDA report (class balance, sizes, aspect ratios, samples, augmentations, findings;
    self-contained HTML) and the validation counts."""
    from carclassifier import reports, steps

    reports.log_metrics(metrics, steps.eda_step(dataset.path, report.path))
