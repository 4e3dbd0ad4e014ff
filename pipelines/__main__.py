"""``python -m pipelines compile|run-local|chaos|submit|schedule|unschedule|resume|preflight``.

    python -m pipelines compile --config configs/recipe_b6.yaml --out pipelines/compiled/car_classifier.yaml
    python -m pipelines run-local --config configs/recipe_lite0_local.yaml --root runs/pipeline-local
    python -m pipelines chaos --faults 12 --seed 1 --root runs/chaos --json runs/chaos/report.json
    python -m pipelines submit --host URL --pipeline-root gs://BUCKET/kfp-root --param data_source=gs://...
    python -m pipelines resume --host URL --run-id RUN_ID
    python -m pipelines preflight --host URL --pipeline-root gs://BUCKET/kfp-root

``run-local`` runs the whole pipeline with kfp.local (each task a subprocess of this Python,
the same component code as on the cluster; no GPU settings apply). Its outputs::

    <root>/kfp/<pipeline>-<time>/<task>/   artifacts and executor_output.json of every task
    <root>/checkpoints/<run key>/          stages, evaluation, export, submission.csv
    <root>/checkpoints/champion.json       the champion pointer

``chaos`` runs the same kfp.local pipeline (a small recipe unless ``--config``) under a seeded
fault schedule that kills task processes, lets kfp.local's retries resume them, and compares
the final weights with an uninterrupted run (`pipelines.chaos`); exit status 1 when a fault
was not survived or the weights differ.

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


def chaos(args: argparse.Namespace) -> int:
    """A chaos run as ``args`` say; prints the counts, writes ``--json``."""
    import json

    from carclassifier.errors import CarClassifierError
    from pipelines import chaos as chaos_run

    try:
        config = chaos_run.chaos_config(
            args.config, [f"output_dir={args.root / 'out'}", *(args.set or [])]
        )
        report, summary = chaos_run.main_chaos(
            config, args.root.resolve(), args.faults, args.seed, args.data, args.reference,
            args.grace,
        )  # fmt: skip
    except CarClassifierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {**report.to_dict(), **summary}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    counts = report.counts()
    print(f"status {report.status} in {report.wall_seconds:.0f}s; reference: {summary}")
    for key, row in counts.items():
        print(f"  {key:16} " + ", ".join(f"{k} {v}" for k, v in row.items()))
    skipped = set(summary.get("tasks_not_succeeded", [])) - set(
        summary.get("reference_tasks_not_succeeded", summary.get("tasks_not_succeeded", []))
    )
    if skipped:
        print(f"warning: the uninterrupted run ran {sorted(skipped)}, this run did not")
    ok = (
        report.status == "SUCCESS"
        and len(report.injected) == len(report.survived)
        and summary.get("weights_equal") is not False
    )
    return 0 if ok else 1


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
    noisy = commands.add_parser("chaos", help="kfp.local run under a seeded fault schedule")
    noisy.add_argument("--config", type=Path, help="recipe YAML (default: a small chaos recipe)")
    noisy.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    noisy.add_argument("--faults", type=int, default=4, help="faults to schedule (default 4)")
    noisy.add_argument("--seed", type=int, default=0, help="seed of the schedule")
    noisy.add_argument("--root", type=Path, default=Path("runs/chaos"))
    noisy.add_argument("--data", help="data folder (default: generated toy images under --root)")
    noisy.add_argument("--grace", type=float, default=3.0, help="SIGTERM to SIGKILL, seconds")
    noisy.add_argument(
        "--reference",
        choices=("steps", "pipeline", "none"),
        default="steps",
        help="uninterrupted run to compare with (default steps: stages in-process)",
    )
    noisy.add_argument("--json", type=Path, help="write the report here")
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
    if args.command == "chaos":
        return chaos(args)
    return kfp_commands.run(args, environ, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
