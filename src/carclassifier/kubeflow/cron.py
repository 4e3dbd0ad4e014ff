"""Cron expressions for KFP recurring runs.

The KFP API server checks a recurring run's cron with ``cron.Parse`` of robfig/cron v1.2.0
(kubeflow/pipelines backend/src/apiserver/server/api_converter.go, toModelJob, tag 2.17.0;
go.mod pins github.com/robfig/cron v1.2.0), whose default parser wants SIX fields, seconds
first, or a descriptor (``@weekly``, ``@every 1h``). A classic five-field cron would be read
with its minute as the second. So a five-field expression gets ``"0 "`` in front; the syntax
is checked here with croniter (seconds first) so a typo fails before any upload, and the
server's own check stays the authority (its HTTP 400 is reported as one line).
"""

from __future__ import annotations

from croniter import croniter

from carclassifier.kubeflow.package import SubmitError

CRON_HINT = (
    'use 5 fields "minute hour day-of-month month day-of-week" (e.g. "0 3 * * 0": Sundays 03:00) '
    'or 6 with seconds first (e.g. "0 0 3 * * 0")'
)


def to_kfp_cron(expression: str) -> str:
    """``expression`` in KFP's six-field form; `SubmitError` with a hint if it is not a cron.

    ``@every <duration>`` (robfig/cron only) is passed on for the server to check.
    """
    text = " ".join(expression.split())
    if not text:
        raise SubmitError(f"empty cron expression: {CRON_HINT}")
    if text.startswith("@every "):
        return text
    fields = text.split(" ")
    if len(fields) == 5:
        text = "0 " + text
    elif len(fields) != 6 and not text.startswith("@"):
        raise SubmitError(
            f"invalid cron expression {expression!r}: {len(fields)} fields; {CRON_HINT}"
        )
    try:
        croniter(text, second_at_beginning=True)
    except (ValueError, KeyError) as exc:  # croniter's errors are ValueErrors
        raise SubmitError(f"invalid cron expression {expression!r} ({exc}); {CRON_HINT}") from None
    return text
