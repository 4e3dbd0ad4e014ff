"""Champion/challenger gate: promote the new export only when it beats the champion."""

from kfp.dsl import Dataset, Input, Markdown, Metrics, Output

from components._base import trainer_component


@trainer_component
def champion_gate(
    dataset: Input[Dataset],
    export_uri: str,
    champion_pointer: str,
    min_improvement: float,
    checkpoint_root: str,
    metrics: Output[Metrics],
    decision: Output[Markdown],
) -> bool:
    """Compare the challenger export with the current champion on this run's validation images;
    rewrite the champion pointer when the challenger wins by more than min_improvement (or
    there is no champion). Returns whether it was promoted."""
    from carclassifier import reports, steps

    result = steps.gate_step(
        dataset.path, export_uri, champion_pointer, min_improvement, checkpoint_root, decision.path
    )
    reports.log_metrics(metrics, result["metrics"])
    return result["promoted"]
