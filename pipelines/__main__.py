"""``python -m pipelines compile|run-local|submit|schedule|unschedule|resume|preflight``.

    python -m pipelines compile --config configs/recipe_b6.yaml --out pipelines/compiled/car_classifier.yaml
    python -m pipelines run-local --config configs/recipe_lite0_local.yaml --root runs/pipeline-local
    python -m pipelines submit --host URL --pipeline-root gs://BUCKET/kfp-root --param data_source=gs://...
    python -m pipelines resume --host URL --run-id RUN_ID
    python -m pipelines preflight --host URL --pipeline-root gs://BUCKET/kfp-root

``run-local`` runs the whole pipeline with kfp.local (each task a subprocess of this Python,
the same component code as on the cluster; no GPU settings apply). Its outputs::

    <root>/kfp/<pipeline>-<time>/<task>/   artifacts and executor_output.json of every task
    <root>/checkpoints/<run key>/          stages, evaluation, export, submission.csv
    <root>/checkpoints/champion.json       the champion pointer

The KFP commands (`carclassifier.kubeflow.commands`) end a failure with one ``error: ...`` line
and exit status 2 (``--debug`` shows the traceback instead).
"""

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from carclassifier.kubeflow import commands as kfp_commands
from pipelines import compile as compile_cli


def run_local(args: argparse.Namespace) -> int:
    """Run the pipeline locally as ``args`` say; print where the outputs are."""
    from carclassifier.config import load_config
    from carclassifier.errors import CarClassifierError
    from pipelines.car_classifier import run_pipeline_local

    root = args.root.resolve()
    arguments = {
        "data_source": args.data or "",
        "overrides": list(args.set or []),
        "checkpoint_root": args.checkpoint_root or str(root / "checkpoints"),
    }
    try:
        run = run_pipeline_local(
            load_config(args.config), root / "kfp", enable_caching=not args.no_cache, **arguments
        )
    except CarClassifierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"task outputs: {run}\nrun outputs: {arguments['checkpoint_root']}")
    return 0


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """Every sub-command; defaults of the KFP ones come from ``environ``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one line")
    commands = parser.add_subparsers(dest="command", required=True)
    compile_cli.add_arguments(commands.add_parser("compile", help="compile a recipe to kfp IR"))
    local = commands.add_parser("run-local", help="run the pipeline with kfp.local")
    local.add_argument("--config", type=Path, required=True, help="recipe YAML")
    local.add_argument("--root", type=Path, default=Path("runs/pipeline-local"))
    local.add_argument(
        "--data", help="data source: a folder, gs:// prefix or kaggle (default: the recipe's)"
    )
    local.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)"
    )
    local.add_argument("--checkpoint-root", help="default <root>/checkpoints (a folder or gs://)")
    local.add_argument("--no-cache", action="store_true", help="run every task again")
    kfp_commands.add_commands(commands, environ)
    return parser


def compile_main(argv: list[str]) -> int:
    """``python -m pipelines compile ARGV...``; returns the exit status."""
    return main(["compile", *argv], {})


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The ``python -m pipelines`` command line; returns the exit status."""
    environ = os.environ if environ is None else environ
    args = build_parser(environ).parse_args(argv)
    if args.command == "compile":
        return compile_cli.run(args)
    if args.command == "run-local":
        return run_local(args)
    return kfp_commands.run(args, environ, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
