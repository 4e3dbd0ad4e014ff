"""The cost guard: a run's GPU-hour budget, checked before each stage starts.

Every stage keeps its attempt history (`carclassifier.attempts`: each process that trained it,
from its start to the last point it reached, retries and preemptions included). The GPU hours a
run has used are the seconds of all attempts of all its stages times the GPUs per task; a stage
does not start (`BudgetSpentError`, which the run summary shows as the failed step's error)
once they reach ``train.gpu_hours_budget`` (and leaves `BUDGET_FILE` for the summary). A stage already running is not stopped: the budget
is checked at stage boundaries, so a run may exceed it by at most one stage.
"""

from __future__ import annotations

import json
import logging

from carclassifier import storage
from carclassifier.attempts import ATTEMPTS, _duration
from carclassifier.errors import CarClassifierError

log = logging.getLogger(__name__)

BUDGET_FILE = "budget.json"
"""In the run folder when a stage was refused: what the run summary reports."""


class BudgetSpentError(CarClassifierError):
    """The run's GPU-hour budget is spent: no further stage starts."""


def gpu_hours_used(run_dir: str, gpus: int) -> float:
    """GPU hours the stages under ``<run_dir>/stages`` used so far, across all attempts."""
    seconds = 0.0
    for stage in storage.list_names(storage.join(run_dir, "stages")):
        text = storage.read_text(storage.join(run_dir, "stages", stage, ATTEMPTS))
        try:
            attempts = json.loads(text) if text else []
        except ValueError:
            attempts = []
        seconds += sum(_duration(a) for a in attempts)
    return seconds / 3600 * gpus


def check_budget(run_dir: str, stage: str, gpus: int, budget: float | None) -> float:
    """The GPU hours used so far; `BudgetSpentError` naming the budget when they reach it
    (``budget`` None: no limit)."""
    used = gpu_hours_used(run_dir, gpus)
    if budget is not None and used >= budget:
        message = (
            f"{stage} not started: the run has used {used:.2f} of its {budget:g} GPU hours "
            f"(train.gpu_hours_budget; {gpus} GPU(s) per stage task); raise the budget or "
            "resume the run with a larger one"
        )
        record = {"stage": stage, "gpu_hours_used": used, "budget": budget, "message": message}
        storage.write_text(storage.join(run_dir, BUDGET_FILE), json.dumps(record, indent=2))
        raise BudgetSpentError(message)
    log.info("%s: %.2f of %s GPU hours used so far", stage, used, budget if budget else "unlimited")
    return used
