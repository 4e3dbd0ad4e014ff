"""The KFP command lines (submit, schedule, unschedule, resume, preflight) and how they fail.

``python -m pipelines`` has them all, ``carclassifier preflight`` the checks. A failure ends in
ONE ``error: ...`` line and exit status 2 (``--debug``: the traceback instead).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from carclassifier.errors import one_line
from carclassifier.kubeflow import preflight, submit
from carclassifier.kubeflow.kfp_api import describe_error

NAMES = ("submit", "schedule", "unschedule", "resume", "preflight")


def add_commands(commands: Any, environ: Mapping[str, str]) -> None:
    """Every KFP sub-command, with defaults from ``environ``."""
    submit.add_commands(commands, environ)
    preflight.add_command(commands, environ)


def run(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO = sys.stdout) -> int:
    """Run the parsed KFP sub-command; its exit status (0, 1: a preflight check failed, 2: error,
    130: interrupted)."""
    try:
        if args.command == "preflight":
            return preflight.run_command(args, environ, out)
        submit.run_command(args, environ, out)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        message = describe_error(exc, getattr(args, "host", None)) or (
            f"unexpected {type(exc).__name__}: {one_line(exc)} (rerun with --debug)"
        )
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
