"""What each ``carclassifier`` command does, and the checks of its arguments (`check_args`).

`carclassifier.cli` parses the command line and imports this module only then, so that
``carclassifier --help`` and a usage error load neither pandas nor pydantic. Each
``cmd_<command>`` is a thin call into the library.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from pydantic import ValidationError
from yaml import YAMLError

from carclassifier.config import RunConfig, check_location, load_config
from carclassifier.data import load_dataset, validate_dataset
from carclassifier.errors import ConfigError
from carclassifier.inference import model_image_size
from carclassifier.kaggle_data import download_competition
from carclassifier.kubeflow import commands as kubeflow_commands
from carclassifier.predict import predict_folder
from carclassifier.prepare import PreparedData, load_prepared, resolve_data_root, validate_and_split
from carclassifier.reports import summary_table
from carclassifier.serving.config import ServingConfig, check_model_location

# Lazy imports, kept inside the commands that need them: the modules that import TensorFlow
# (stages, model, evaluate, export, deploy, local_run, serving.server) or albumentations and
# matplotlib (augment, eda) take seconds to load, and a command without a model (validate,
# prepare, preflight, a bad argument) should not wait for them.

log = logging.getLogger("carclassifier")

CONFIG_ERRORS = (ValidationError, YAMLError)
"""An invalid configuration that the config loader did not turn into a `ConfigError`."""


def _config(args: argparse.Namespace) -> RunConfig:
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
    config = _config(args)
    validate_and_split(config, config.output_dir)


def cmd_validate(args: argparse.Namespace) -> None:
    report = validate_dataset(load_dataset(args.data))
    print(report.summary())
    if args.out:
        print(f"report: {report.write(args.out)}")
    report.ensure_trainable()


def cmd_eda(args: argparse.Namespace) -> None:
    from carclassifier.eda import write_eda_report

    config = _config(args)
    prepared = validate_and_split(config, config.output_dir)
    path = write_eda_report(
        prepared.report,
        Path(config.output_dir) / "eda",
        config.augment,
        config.input.image_size,
        seed=config.data.seed,
        sources=prepared.sources,
        split=prepared.split,
    )
    print(f"EDA report: {path}")


def cmd_download_kaggle(args: argparse.Namespace) -> None:
    dataset = download_competition(args.dest, args.competition, force=args.force)
    report = validate_dataset(dataset)
    print(report.summary())
    report.write(args.dest)


def _prepared(args: argparse.Namespace, config: RunConfig) -> PreparedData:
    if args.split:
        return load_prepared(resolve_data_root(config), args.split)
    return validate_and_split(config, config.output_dir)


def cmd_train(args: argparse.Namespace) -> None:
    config = _config(args)  # before the TensorFlow imports: a bad config fails at once
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
    from carclassifier.export import export_tta, load_exported

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

    summary = run_local(_config(args))
    print(summary_table(summary.stages))
    print(
        f"\n{summary.headline()} in {summary.minutes:.1f} min\nEDA report: {summary.eda}\n"
        f"exported model: {summary.export}\nsubmission: {summary.submission}"
    )


def cmd_serve(args: argparse.Namespace) -> None:
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
    if done.live:
        _roll_out(args.inference_service, done.version)


def cmd_rollback(args: argparse.Namespace) -> None:
    from carclassifier.deploy import rollback

    done = rollback(args.serving_root, args.version)
    print(f"version {args.version} is live again as version {done.version}: {done.uri}")
    _roll_out(args.inference_service, done.version)


def _roll_out(inference_service: str, version: int) -> None:
    """Roll the KServe InferenceService (``namespace/name``; "" = none) onto ``version``."""
    if inference_service:
        from carclassifier.kubeflow.kserve import roll_out

        print(f"rolling InferenceService {roll_out(inference_service, version)} onto it")


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


def cmd_preflight(args: argparse.Namespace) -> None:
    """The same checks as ``python -m pipelines preflight`` (`carclassifier.kubeflow.preflight`)."""
    status = kubeflow_commands.run(args, os.environ, sys.stdout)
    if status:
        raise SystemExit(status)


def run(args: argparse.Namespace) -> None:
    """Check the arguments and run ``cmd_<args.command>``."""
    check_args(args)
    globals()["cmd_" + args.command.replace("-", "_")](args)
