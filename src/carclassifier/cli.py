"""``carclassifier <command>``: each command is a thin call into the library.

Arguments are checked before anything runs (paths that must exist, gs:// URI shapes, names). A
bad argument, a `CarClassifierError`, an invalid config (pydantic, YAML) or an unreadable /
unwritable path the user named is printed as one line (``error: ...``) with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from carclassifier.errors import (
    PREEMPTED_EXIT_CODE,
    CarClassifierError,
    ConfigError,
    StagePreempted,
    one_line,
)
from carclassifier.kubeflow import commands, preflight

log = logging.getLogger("carclassifier")


def _config(args: argparse.Namespace):  # noqa: ANN202 - RunConfig
    from carclassifier.config import load_config

    overrides = list(args.set or [])
    if getattr(args, "data", None):
        overrides.append(f"data.root={args.data}")
    if getattr(args, "out", None):
        overrides.append(f"output_dir={args.out}")
    config = load_config(args.config, overrides)
    if "://" in config.output_dir:
        raise ConfigError(
            f"output_dir {config.output_dir} is a URI, but this command writes local files: pass "
            "--out DIR (a stage's outputs go to gs:// with train-stage --stage-out)"
        )
    return config


def cmd_prepare(args: argparse.Namespace) -> None:
    from carclassifier.prepare import validate_and_split

    config = _config(args)
    validate_and_split(config, config.output_dir)


def cmd_validate(args: argparse.Namespace) -> None:
    from carclassifier.data import load_dataset, validate_dataset

    report = validate_dataset(load_dataset(args.data))
    print(report.summary())
    if args.out:
        print(f"report: {report.write(args.out)}")
    report.ensure_trainable()


def cmd_eda(args: argparse.Namespace) -> None:
    from carclassifier.eda import write_eda_report
    from carclassifier.prepare import validate_and_split

    config = _config(args)
    prepared = validate_and_split(config, config.output_dir)
    path = write_eda_report(
        prepared.report,
        Path(config.output_dir) / "eda",
        config.augment,
        config.input.image_size,
        seed=config.data.seed,
    )
    print(f"EDA report: {path}")


def cmd_download_kaggle(args: argparse.Namespace) -> None:
    from carclassifier.data import validate_dataset
    from carclassifier.kaggle_data import download_competition

    dataset = download_competition(args.dest, args.competition, force=args.force)
    report = validate_dataset(dataset)
    print(report.summary())
    report.write(args.dest)


def _prepared(args: argparse.Namespace, config):  # noqa: ANN001, ANN202 - RunConfig -> PreparedData
    from carclassifier.prepare import load_prepared, resolve_data_root, validate_and_split

    if args.split:
        return load_prepared(resolve_data_root(config), args.split)
    return validate_and_split(config, config.output_dir)


def cmd_train(args: argparse.Namespace) -> None:
    config = _config(args)  # before the TensorFlow imports: a bad config fails at once
    from carclassifier.reports import summary_table
    from carclassifier.stages import train_recipe

    results = train_recipe(config, _prepared(args, config), config.output_dir)
    print(summary_table([r.metrics for r in results]))


def cmd_train_stage(args: argparse.Namespace) -> None:
    config = _config(args)
    config.stage(args.stage)  # an unknown stage fails before the data is prepared
    from carclassifier.stages import run_stage

    result = run_stage(config, args.stage, _prepared(args, config), args.stage_out, args.init)
    print(json.dumps(result.metrics, indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from carclassifier.evaluate import evaluate_classifier
    from carclassifier.model import load_model

    config = _config(args)
    prepared = _prepared(args, config)
    out = Path(config.output_dir) / "evaluation"
    result = evaluate_classifier(
        load_model(args.model), prepared.dataset.root, prepared.subset("val"),
        prepared.dataset.class_names, config, out,
    )  # fmt: skip
    print(f"val accuracy {result['accuracy']:.4f}, with TTA {result['tta']['accuracy']:.4f} "
          f"(gain {result['tta_gain']:+.4f})")  # fmt: skip
    if "robustness" in result:
        print(f"robustness report: {out / result['robustness']['html']} "
              f"(ECE {result['robustness']['ece']:.4f})")  # fmt: skip


def cmd_export(args: argparse.Namespace) -> None:
    from carclassifier.export import write_export
    from carclassifier.model import load_model

    labels = _read_labels(Path(args.labels)) if args.labels else None
    if labels is None:
        config = _config(args)
        labels = _prepared(args, config).dataset.class_names
    print(f"exported to {write_export(load_model(args.model), list(labels), args.export_dir)}")


def cmd_predict(args: argparse.Namespace) -> None:
    from carclassifier.augment import TtaSettings
    from carclassifier.config import load_config
    from carclassifier.export import export_tta, load_exported
    from carclassifier.inference import model_image_size
    from carclassifier.predict import predict_folder

    model, labels = load_exported(args.model)
    config = load_config(args.config, args.set)
    tta = TtaSettings(views=1)
    if args.tta:
        tta = export_tta(labels, args.model) or TtaSettings.from_config(config)
        log.info("TTA: %d views, seed %d (%s)", tta.views, tta.seed,
                 "as the export was evaluated" if "tta" in labels else "from the config")  # fmt: skip
    frame = predict_folder(
        model, args.images, labels["class_names"], args.output, sample_submission=args.sample_submission,
        tta=tta.transform(model_image_size(model)[0]), tta_views=tta.views, seed=tta.seed,
        batch_size=config.input.batch_size, fmt=args.format,
    )  # fmt: skip
    print(f"{len(frame)} predictions -> {args.output}")


def cmd_run_local(args: argparse.Namespace) -> None:
    from carclassifier.local_run import run_local
    from carclassifier.reports import summary_table

    summary = run_local(_config(args))
    print(summary_table(summary["stages"]))
    print(
        f"\nvalidation accuracy {summary['val_accuracy']:.4f}, with TTA {summary['val_accuracy_tta']:.4f} "
        f"(gain {summary['tta_gain']:+.4f}) in {summary['minutes']:.1f} min\n"
        f"EDA report: {summary['eda']}\nexported model: {summary['export']}\nsubmission: {summary['submission']}"
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from carclassifier.errors import ConfigError
    from carclassifier.serving.config import ServingConfig, check_model_location

    fields = ServingConfig.model_fields
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    try:
        config = ServingConfig(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = str(first["loc"][0]).replace("_", "-")
        raise ConfigError(f"serve: --{flag}: {first['msg']}") from None
    check_model_location(config.model)
    from carclassifier.serving.server import serve  # imports TensorFlow

    serve(config)


def cmd_deploy(args: argparse.Namespace) -> None:
    from carclassifier.deploy import publish

    done = publish(args.export, args.serving_root, args.check_photo, export=args.export)
    print(f"version {done.version}: {done.uri}" + ("" if done.live else " (a newer one is live)"))


def cmd_rollback(args: argparse.Namespace) -> None:
    from carclassifier.deploy import rollback

    done = rollback(args.serving_root, args.version)
    print(f"version {args.version} is live again as version {done.version}: {done.uri}")


def _read_labels(path: Path) -> list[str]:
    """A JSON list of class names (export --labels)."""
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--labels {path}: not a readable JSON file ({exc})") from None
    if not (
        isinstance(labels, list)
        and len(labels) >= 2
        and all(isinstance(x, str) and x for x in labels)
        and len(set(labels)) == len(labels)
    ):
        raise ConfigError(
            f'--labels {path}: expected a JSON list of 2 or more distinct class names, e.g. ["audi", "bmw"]'
        )
    return labels


# --------------------------------------------------------------------------- argument checks

_COMPETITION = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")
_EXISTING_DIRS = ("data", "images")
_EXISTING_FILES = ("config", "split", "sample_submission", "labels", "check_photo")
_LOCAL_OUTPUTS = ("out", "export_dir", "dest", "output")
_MODEL_INPUTS = ("init", "model", "export")
_UNCHECKED_COMMANDS = ("serve", "preflight")  # check their own arguments (serving.config, kubeflow)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args: argparse.Namespace) -> None:
    """Check the arguments of a command before it runs; raise `ConfigError` naming the flag."""
    from carclassifier.config import check_location

    if args.command in _UNCHECKED_COMMANDS:
        return
    values = vars(args)
    for name in _EXISTING_DIRS:
        if values.get(name) is not None and not Path(values[name]).expanduser().is_dir():
            raise ConfigError(f"{_flag(name)} {values[name]}: no such folder")
    for name in _EXISTING_FILES:
        if values.get(name) is not None and not Path(values[name]).expanduser().is_file():
            raise ConfigError(f"{_flag(name)} {values[name]}: no such file")
    for name in _LOCAL_OUTPUTS:
        value = values.get(name)
        if value is None:
            continue
        if "://" in str(value) or str(value).startswith("gs:"):
            raise ConfigError(f"{_flag(name)} {value}: must be a local path, not a URI")
        try:
            check_location(str(value), _flag(name))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        target = Path(value).expanduser()
        if name == "output" and target.is_dir():
            raise ConfigError(f"--output {value}: is a folder; name the CSV file to write")
        if name != "output" and target.exists() and not target.is_dir():
            raise ConfigError(f"{_flag(name)} {value}: exists and is not a folder")
    for name in _MODEL_INPUTS:
        value = values.get(name)
        if value is None:
            continue
        try:
            check_location(str(value), _flag(name), object_required=True)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if "://" not in str(value) and not Path(value).expanduser().exists():
            raise ConfigError(f"{_flag(name)} {value}: no such file or folder")
    for name in ("stage_out", "serving_root"):
        if values.get(name) is not None:
            try:
                check_location(str(values[name]), _flag(name), object_required=True)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    if values.get("labels") is not None:
        _read_labels(Path(values["labels"]))
    competition = values.get("competition")
    if competition is not None and not _COMPETITION.match(competition):
        raise ConfigError(
            f"--competition {competition!r}: not a Kaggle competition name (lower-case letters, "
            "digits and '-', as in the competition's URL)"
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
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("validate", help="check every image of a dataset and report problems")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--out", help="folder for validation.json")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("eda", help="write the EDA report (HTML + PNGs) of a dataset")
    _add_config_args(p)
    p.set_defaults(func=cmd_eda)

    p = sub.add_parser(
        "download-kaggle", help="download sf-dl-car-classification with the kaggle package"
    )
    p.add_argument("--dest", required=True, help="folder to download and unzip into")
    p.add_argument("--competition", default="sf-dl-car-classification")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.set_defaults(func=cmd_download_kaggle)

    p = sub.add_parser("train", help="run every stage of the recipe in order")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-stage", help="run one stage (resumes from its checkpoints)")
    _add_config_args(p)
    p.add_argument("--stage", required=True, help="stage name from the config, e.g. stage_2")
    p.add_argument(
        "--init", help=".keras model to start from (local or gs://); none for the first stage"
    )
    p.add_argument("--stage-out", required=True, help="the stage's output folder or gs:// prefix")
    p.set_defaults(func=cmd_train_stage)

    p = sub.add_parser("evaluate", help="validation metrics, confusion matrix, TTA gain")
    _add_config_args(p)
    p.add_argument("--model", required=True, help=".keras model (local or gs://)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="SavedModel + model.keras + labels.json for serving")
    _add_config_args(p)
    p.add_argument("--model", required=True, help=".keras model (local or gs://)")
    p.add_argument("--export-dir", required=True, help="folder to write the export into")
    p.add_argument("--labels", help="JSON list of class names (default: from the dataset)")
    p.set_defaults(func=cmd_export)

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
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "run-local", help="the whole recipe here: prepare, EDA, stages, evaluate, export, predict"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_run_local)

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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("deploy", help="publish an export as the next serving version, make it live")
    p.add_argument("--export", required=True, help="export folder or gs:// prefix")
    p.add_argument("--serving-root", required=True, help="folder or gs:// prefix of the versions")
    p.add_argument("--check-photo", help="a photo stored with the version for the server's check")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("rollback", help="make an earlier serving version live again")
    p.add_argument("--serving-root", required=True, help="folder or gs:// prefix of the versions")
    p.add_argument("--version", type=int, required=True, help="the version to serve again")
    p.set_defaults(func=cmd_rollback)

    preflight.add_command(sub, os.environ)
    sub.choices["preflight"].set_defaults(func=cmd_preflight)
    return parser


def cmd_preflight(args: argparse.Namespace) -> None:
    """The same checks as ``python -m pipelines preflight`` (`carclassifier.kubeflow.preflight`)."""
    status = commands.run(args, os.environ, sys.stdout)
    if status:
        raise SystemExit(status)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``carclassifier`` command."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from pydantic import ValidationError
    from yaml import YAMLError

    try:
        check_args(args)
        args.func(args)
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
    except (ValidationError, YAMLError) as exc:
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
