"""The exit task: every run ends with its summary, whatever happened, and tells someone."""

from kfp.dsl import PipelineTaskFinalStatus

from components._base import trainer_component


@trainer_component
def run_summary(
    checkpoint_root: str,
    run_id: str,
    webhook_url: str,
    gpu_count: str,
    status: PipelineTaskFinalStatus,
):
    """Write summary.json / summary.md to the run folder (status, failed task, data version,
    stages, gate decision, deployed version, GPU hours) and post it to webhook_url if set."""
    from carclassifier.run_summary import write_summary

    error = (status.error_message or "").strip() or None
    write_summary(
        checkpoint_root, run_id, status.state, status.pipeline_task_name, error, webhook_url,
        int(gpu_count or 0),
    )  # fmt: skip
