"""``python -m pipelines compile|run-local``.

    python -m pipelines compile --config configs/recipe_b6.yaml --out pipelines/compiled/car_classifier.yaml
    python -m pipelines run-local --config configs/recipe_lite0_local.yaml --root runs/pipeline-local

``run-local`` runs the whole pipeline with kfp.local (each task a subprocess of this Python,
the same component code as on the cluster; no GPU settings apply). Its outputs::

    <root>/kfp/<pipeline>-<time>/<task>/   artifacts and executor_output.json of every task
    <root>/checkpoints/<run key>/          stages, evaluation, export, submission.csv
    <root>/checkpoints/champion.json       the champion pointer
"""

import argparse
import sys
from pathlib import Path

from carclassifier.config import load_config
from carclassifier.errors import CarClassifierError
from pipelines import compile as compile_cli
from pipelines.car_classifier import run_pipeline_local


def run_local(args: argparse.Namespace) -> int:
    """Run the pipeline locally as ``args`` say; print where the outputs are."""
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


def main(argv: list[str] | None = None) -> int:
    """The ``python -m pipelines`` command line."""
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_parser = commands.add_parser("compile", help="compile a recipe to kfp IR YAML")
    compile_cli.add_arguments(compile_parser)
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
    args = parser.parse_args(argv)
    return compile_cli.run(args) if args.command == "compile" else run_local(args)


if __name__ == "__main__":
    sys.exit(main())
