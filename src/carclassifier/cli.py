"""``carclassifier <command>``: each command is a thin call into the library.

A `CarClassifierError` is printed as one line (``error: ...``) with exit status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from carclassifier.errors import CarClassifierError

log = logging.getLogger("carclassifier")


def _config(args: argparse.Namespace):  # noqa: ANN202 - RunConfig
    from carclassifier.config import load_config

    overrides = list(args.set or [])
    if getattr(args, "data", None):
        overrides.append(f"data.root={args.data}")
    if getattr(args, "out", None):
        overrides.append(f"output_dir={args.out}")
    return load_config(args.config, overrides)


def cmd_prepare(args: argparse.Namespace) -> None:
    from carclassifier.prepare import prepare_data

    config = _config(args)
    prepare_data(config, config.output_dir)


def cmd_validate(args: argparse.Namespace) -> None:
    from carclassifier.data import load_dataset, validate_dataset

    report = validate_dataset(load_dataset(args.data))
    print(report.summary())
    if args.out:
        print(f"report: {report.write(args.out)}")
    report.ensure_trainable()


def cmd_eda(args: argparse.Namespace) -> None:
    from carclassifier.eda import write_eda_report
    from carclassifier.prepare import prepare_data

    config = _config(args)
    prepared = prepare_data(config, config.output_dir)
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


def cmd_run_local(args: argparse.Namespace) -> None:
    from carclassifier.eda import write_eda_report
    from carclassifier.prepare import prepare_data
    from carclassifier.smoke import smoke_forward

    config = _config(args)
    out = Path(config.output_dir)
    log.info("run-local: outputs in %s", out.resolve())
    prepared = prepare_data(config, out)
    eda = write_eda_report(
        prepared.report, out / "eda", config.augment, config.input.image_size, seed=config.data.seed
    )
    log.info("EDA report: %s", eda)
    smoke_forward(config, prepared, out)
    print(f"run-local done: open {eda} ; smoke test in {out / 'smoke.json'}")


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


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="carclassifier", description=__doc__.splitlines()[0])
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

    p = sub.add_parser("run-local", help="prepare + EDA + smoke forward pass on the demo data")
    _add_config_args(p)
    p.set_defaults(func=cmd_run_local)
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
    try:
        args.func(args)
    except CarClassifierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
