"""Champion/challenger gate: promote the new export only when it beats the champion by more
than noise (McNemar's exact test), with no class falling behind."""

from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from components._base import trainer_component


@trainer_component
def champion_gate(
    dataset: Input[Dataset],
    export_uri: str,
    champion_pointer: str,
    min_improvement: float,
    checkpoint_root: str,
    run_key: str,
    metrics: Output[Metrics],
    report: Output[HTML],
) -> bool:
    """Compare the challenger export with the current champion on this run's validation images
    (paired test, per-class recall floor, ONNX vs Keras); rewrite the champion pointer when the
    challenger is promoted (or there is no champion). Returns whether it was promoted."""
    from carclassifier import reports, steps

    result = steps.gate_step(
        dataset.path, export_uri, champion_pointer, min_improvement, checkpoint_root,
        report.path, run_key,
    )  # fmt: skip
    reports.log_metrics(metrics, result["metrics"])
    return result["promoted"]
