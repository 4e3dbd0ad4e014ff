"""``carclassifier <command>``: each command is a thin call into the library.

This module is the command line (`build_parser`, `main`); what each command does, and the
checks of its arguments, is `carclassifier.cli_commands`.

Arguments are checked before anything runs (paths that must exist, gs:// URI shapes, names). A
bad argument, a `CarClassifierError`, an invalid config (pydantic, YAML) or an unreadable /
unwritable path the user named is printed as one line (``error: ...``) with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from carclassifier.errors import (
    PREEMPTED_EXIT_CODE,
    CarClassifierError,
    StagePreempted,
    one_line,
)
from carclassifier.kubeflow import preflight

ROLL_HELP = (
    "KServe InferenceService namespace/name to roll onto the new live version (KServe copies "
    "the model into a pod only when it starts); needs patch on inferenceservices"
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error:`` line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="run config YAML (default: built-in defaults)")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set input.batch_size=8 (repeatable)",
    )
    parser.add_argument("--data", help="dataset folder (overrides data.root)")
    parser.add_argument("--out", help="output folder (overrides output_dir)")
    parser.add_argument("--split", help="split.csv from an earlier prepare (default: prepare now)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = _Parser(prog="carclassifier", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="validate the dataset and write split.csv")
    _add_config_args(p)

    p = sub.add_parser("validate", help="check every image of a dataset and report problems")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--out", help="folder for validation.json")

    p = sub.add_parser("eda", help="write the EDA report (HTML + PNGs) of a dataset")
    _add_config_args(p)

    p = sub.add_parser(
        "download-kaggle", help="download sf-dl-car-classification with the kaggle package"
    )
    p.add_argument("--dest", required=True, help="folder to download and unzip into")
    p.add_argument("--competition", default="sf-dl-car-classification")
    p.add_argument("--force", action="store_true", help="download again even if present")

    p = sub.add_parser("train", help="run every stage of the recipe in order")
    _add_config_args(p)

    p = sub.add_parser("train-stage", help="run one stage (resumes from its checkpoints)")
    _add_config_args(p)
    p.add_argument("--stage", required=True, help="stage name from the config, e.g. stage_2")
    p.add_argument(
        "--init", help=".keras model to start from (local or gs://); none for the first stage"
    )
    p.add_argument("--stage-out", required=True, help="the stage's output folder or gs:// prefix")

    p = sub.add_parser("evaluate", help="validation metrics, confusion matrix, TTA gain")
    _add_config_args(p)
    p.add_argument("--model", required=True, help=".keras model (local or gs://)")

    p = sub.add_parser("export", help="SavedModel + model.keras + labels.json for serving")
    _add_config_args(p)
    p.add_argument("--model", required=True, help=".keras model (local or gs://)")
    p.add_argument("--export-dir", required=True, help="folder to write the export into")
    p.add_argument("--labels", help="JSON list of class names (default: from the dataset)")

    p = sub.add_parser("predict", help="a folder of images -> submission CSV")
    p.add_argument("--model", required=True, help="exported model folder (from export / run-local)")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--output", required=True, help="CSV to write")
    p.add_argument("--sample-submission", help="sample_submission.csv: rows follow its order")
    p.add_argument(
        "--tta",
        action="store_true",
        help="average test-time-augmented views, made as in the export's evaluation",
    )
    p.add_argument("--format", choices=["competition", "full"], default="competition")
    p.add_argument(
        "--config", type=Path, help="config for the batch size (and the TTA of an export without)"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE")

    p = sub.add_parser(
        "run-local", help="the whole recipe here: prepare, EDA, stages, evaluate, export, predict"
    )
    _add_config_args(p)

    p = sub.add_parser("serve", help="web page + JSON API for an exported model (waitress)")
    p.add_argument(
        "--model",
        help="export folder, or a serving root whose live version is followed (local or gs://; "
        "default runs/local/export)",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8080; 0 = any free port)")
    p.add_argument(
        "--backend",
        choices=["auto", "onnx", "saved_model", "keras"],
        help="default auto: onnx when the export has model.onnx, else saved_model",
    )
    p.add_argument("--threads", type=int, help="waitress worker threads (default 4)")
    p.add_argument("--max-upload-mib", type=float, help="largest request body (default 20)")
    p.add_argument("--max-files", type=int, help="most images per request (default 16)")
    p.add_argument("--top-k", type=int, help="classes returned per image (default 3)")
    p.add_argument("--max-image-pixels", type=int, help="largest image decoded (default 40e6)")
    p.add_argument(
        "--tta-views", type=int, help="views averaged with ?tta=1 (default: the export's, else 5)"
    )
    p.add_argument(
        "--poll-seconds", type=float, help="how often a serving root's pointer is read (default 30)"
    )

    p = sub.add_parser("deploy", help="publish an export as the next serving version, make it live")
    p.add_argument("--export", required=True, help="export folder or gs:// prefix")
    p.add_argument("--serving-root", required=True, help="folder or gs:// prefix of the versions")
    p.add_argument("--check-photo", help="a photo stored with the version for the server's check")
    p.add_argument("--inference-service", default="", help=ROLL_HELP)

    p = sub.add_parser("rollback", help="make an earlier serving version live again")
    p.add_argument("--serving-root", required=True, help="folder or gs:// prefix of the versions")
    p.add_argument("--version", type=int, required=True, help="the version to serve again")
    p.add_argument("--inference-service", default="", help=ROLL_HELP)

    preflight.add_command(sub, os.environ)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``carclassifier`` command."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Imported only now, so that --help and usage errors load nothing more: the commands import
    # pandas, pydantic and the GCS client (about a second), some of them TensorFlow.
    from carclassifier import cli_commands

    try:
        cli_commands.run(args)
    except StagePreempted:
        # Stopped by SIGTERM with its checkpoint stored. Leave at once: a normal interpreter
        # shutdown with tf.data threads still running can abort ("terminate called without an
        # active exception", status -6) instead of exiting with the preemption status.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(PREEMPTED_EXIT_CODE)
    except CarClassifierError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except cli_commands.CONFIG_ERRORS as exc:
        print(f"error: invalid configuration: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:
            raise  # not about a path the user named: a bug, keep the traceback
        print(f"error: {exc.filename}: {exc.strerror or one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
