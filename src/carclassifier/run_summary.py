"""The summary every pipeline run ends with, whatever happened, and the message it sends.

The pipeline's exit task (``dsl.ExitHandler``) calls `write_summary` with the run's final status
(KFP's ``PipelineTaskFinalStatus``: state, the failed task's name, its error) and the run folder
(``<checkpoint_root>/<run key>``, found through `run_record`). The summary gathers what the
steps left there: the data version, each stage's best validation accuracy and minutes, the
evaluation, the gate's decision, the deployed version, what preemption cost each stage
(attempts, minutes lost to preemption, minutes checkpointing) and the GPU hours the stages used
(their training, redone and checkpointing minutes x GPUs per task). It is written as ``summary.json`` and ``summary.md``
in the run folder and, when a webhook URL is set, posted as Slack-compatible JSON
(``{"text": ...}``; Slack, Mattermost, Rocket.Chat and Google Chat read that field).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from carclassifier import storage
from carclassifier.artifacts import DEPLOY_RECORD

log = logging.getLogger(__name__)

RUNS_DIR = "kfp-runs"
"""Under the checkpoint root: ``<run id>.json`` says which run folder a KFP run wrote."""
WEBHOOK_TIMEOUT_S = 10.0
_STAGE_KEYS = ("best_val_accuracy", "minutes", "epochs_run", "attempts", "preemptions",
               "minutes_lost_to_preemption", "minutes_checkpointing")  # fmt: skip
GPU_MINUTE_KEYS = ("minutes", "minutes_lost_to_preemption", "minutes_checkpointing")
"""The stage metrics that count as time on the stage's GPUs (training, redone, checkpointing)."""


def gpu_minutes(metrics: dict[str, Any]) -> float:
    """A stage's minutes on its task's GPUs across attempts (`GPU_MINUTE_KEYS` summed)."""
    return sum(float(metrics.get(k) or 0) for k in GPU_MINUTE_KEYS)


@dataclass
class RunSummary:
    """What one run did."""

    status: str
    run_id: str
    failed_task: str | None = None
    error: str | None = None
    run_dir: str | None = None
    data_version: str | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    val_accuracy: float | None = None
    gate: dict[str, Any] | None = None
    deployed_version: int | None = None
    gpu_hours: float = 0.0

    def markdown(self) -> str:
        """The summary as a short Markdown text (also the webhook message)."""
        icon = "✅" if self.status == "SUCCEEDED" else "❌"
        lines = [f"{icon} carclassifier run {self.run_id}: **{self.status}**"]
        if self.failed_task:
            lines.append(f"- failed task: `{self.failed_task}`: {self.error or 'no message'}")
        if self.data_version:
            lines.append(f"- data version: `{self.data_version}`")
        for name, stage in self.stages.items():
            acc = stage.get("best_val_accuracy")
            preempted = ""
            if stage.get("attempts") is not None:
                preempted = (
                    f" ({stage['attempts']} attempt(s), "
                    f"{stage.get('minutes_lost_to_preemption') or 0:.1f} min lost to preemption, "
                    f"{stage.get('minutes_checkpointing') or 0:.1f} min checkpointing)"
                )
            lines.append(
                f"- {name}: best val accuracy {'–' if acc is None else f'{acc:.4f}'}, "
                f"{stage.get('minutes', 0):.1f} min{preempted}"
            )
        if self.val_accuracy is not None:
            lines.append(f"- evaluation: val accuracy {self.val_accuracy:.4f}")
        if self.gate is not None:
            verdict = "promoted" if self.gate.get("promoted") else "kept the champion"
            lines.append(f"- gate: {verdict} ({self.gate.get('reason', '')})")
        if self.deployed_version is not None:
            lines.append(f"- deployed: serving version {self.deployed_version}")
        lines.append(f"- GPU hours: {self.gpu_hours:.2f}")
        return "\n".join(lines)


def run_record(checkpoint_root: str, run_id: str) -> str:
    """Where a KFP run records its run folder: ``<checkpoint_root>/kfp-runs/<run id>.json``."""
    return storage.join(checkpoint_root, RUNS_DIR, f"{run_id}.json")


def _json(uri: str) -> dict[str, Any] | None:
    text = storage.read_text(uri)
    return json.loads(text) if text else None


def collect(
    run_dir: str | None,
    status: str,
    run_id: str,
    failed_task: str | None = None,
    error: str | None = None,
    gpus_per_task: int = 1,
) -> RunSummary:
    """The summary of a run from what its steps wrote under ``run_dir`` (None: the run failed
    before it had one, so only the status is known)."""
    summary = RunSummary(status, run_id, failed_task or None, error or None, run_dir)
    if run_dir is None:
        if status != "SUCCEEDED" and _is_group(failed_task):
            summary.failed_task = "prepare-data (the run folder was never recorded)"
        return summary
    dataset = _json(storage.join(run_dir, "dataset.json")) or {}
    summary.data_version = dataset.get("data_version")
    for name in storage.list_names(storage.join(run_dir, "stages")):
        metrics = _json(storage.join(run_dir, "stages", name, "metrics.json"))
        if metrics is not None:
            summary.stages[name] = {k: metrics.get(k) for k in _STAGE_KEYS}
    evaluation = _json(storage.join(run_dir, "evaluation", "metrics.json")) or {}
    summary.val_accuracy = evaluation.get("accuracy")
    summary.gate = _json(storage.join(run_dir, "gate.json"))
    deployed = _json(storage.join(run_dir, DEPLOY_RECORD))
    summary.deployed_version = None if deployed is None else int(deployed["version"])
    minutes = sum(gpu_minutes(stage) for stage in summary.stages.values())
    summary.gpu_hours = round(minutes / 60 * gpus_per_task, 3)
    if status != "SUCCEEDED" and _is_group(failed_task):
        summary.failed_task = _first_unfinished(summary, dataset.get("stages") or [])
    refused = _json(storage.join(run_dir, "budget.json"))
    if refused is not None and status != "SUCCEEDED":
        summary.failed_task, summary.error = refused["stage"], refused["message"]
    return summary


def _is_group(task: str | None) -> bool:
    """True for no task or a task group (KFP reports the exit handler's group, not the task
    inside it that failed)."""
    return not task or task.startswith("exit-handler")


def _first_unfinished(summary: RunSummary, stages: list[str]) -> str:
    """The first step of the run that left no output: the one that failed (or never ran)."""
    for stage in stages:
        if stage not in summary.stages:
            return f"{stage} (first step without its output)"
    if summary.val_accuracy is None:
        return "evaluate (first step without its output)"
    if summary.gate is None:
        return "export or gate (first step without its output)"
    return "deploy (first step without its output)"


def post_webhook(url: str, summary: RunSummary, timeout: float = WEBHOOK_TIMEOUT_S) -> bool:
    """POST ``{"text": <markdown>, "summary": {...}}`` to ``url``; False (logged) on failure, so
    a chat outage never fails the run."""
    body = json.dumps({"text": summary.markdown(), "summary": asdict(summary)}).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            ok = 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("webhook %s failed: %s", url.split("?")[0], exc)
        return False
    if not ok:
        log.warning("webhook %s answered HTTP %s", url.split("?")[0], response.status)
    return ok


def write_summary(
    checkpoint_root: str,
    run_id: str,
    status: str,
    failed_task: str | None = None,
    error: str | None = None,
    webhook_url: str = "",
    gpus_per_task: int = 1,
) -> RunSummary:
    """Collect, write (``summary.json``, ``summary.md`` in the run folder, or beside the run
    record when the run never got a folder) and post the summary of KFP run ``run_id``."""
    record = _json(run_record(checkpoint_root, run_id)) if checkpoint_root else None
    run_dir = None if record is None else record["run_dir"]
    summary = collect(run_dir, status, run_id, failed_task, error, gpus_per_task)
    where = run_dir or (
        storage.join(checkpoint_root, RUNS_DIR, run_id) if checkpoint_root else None
    )
    if where:
        storage.write_text(
            storage.join(where, "summary.json"), json.dumps(asdict(summary), indent=2)
        )
        storage.write_text(storage.join(where, "summary.md"), summary.markdown() + "\n")
    log.info("run summary:\n%s", summary.markdown())
    if webhook_url:
        post_webhook(webhook_url, summary)
    return summary
