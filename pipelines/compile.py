"""``python -m pipelines compile``: the pipeline of a recipe as kfp IR YAML.

    python -m pipelines compile --config configs/recipe_b6.yaml \
        --out pipelines/compiled/car_classifier.yaml [--image REGISTRY/trainer:TAG] \
        [--kfp-version 2.5.0]

The same recipe and options always give the same bytes (the IR holds no timestamps), so the
compiled file can be committed and diffed. ``--kfp-version`` is the KFP backend (API server)
the package will run on: what it cannot read is left out, with one warning line saying what
(docs/kfp-backend.md).
"""

import argparse
import logging
import sys
from pathlib import Path

from carclassifier.errors import CarClassifierError
from carclassifier.kubeflow import kfp_versions
from components import IMAGE_ENV, TRAINER_IMAGE
from pipelines.car_classifier import ClusterOptions, compile_pipeline

DEFAULT_OUT = Path("pipelines/compiled/car_classifier.yaml")
_OPTION_FLAGS = (
    ("gpu_type", "default of the gpu_type parameter, compiled in before KFP 2.4.0"),
    ("gpu_count", "default of the gpu_count parameter, compiled in before KFP 2.4.0"),
    ("epoch_timeout", "time budget per training epoch at 224 px, scaled by (size/224)^2"),
    ("task_timeout", "timeout of every task but the stages"),
)
"""The `ClusterOptions` fields ``compile`` takes as ``--flag`` (defaults: the dataclass's)."""


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m pipelines compile``."""
    defaults = ClusterOptions()
    parser.add_argument("--config", type=Path, required=True, help="recipe YAML")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    parser.add_argument(
        "--image",
        default=TRAINER_IMAGE,
        help=f"trainer image (default ${IMAGE_ENV} or {TRAINER_IMAGE})",
    )
    parser.add_argument(
        "--no-cache-data",
        action="store_true",
        help="never cache the prepare task (scheduled retraining on the latest data)",
    )
    parser.add_argument(
        "--gpu-node-label",
        type=_label,
        action="append",
        metavar="KEY=VALUE",
        help="node selector of the GPU tasks (repeatable; default "
        + ", ".join(f"{k}={v}" for k, v in defaults.gpu_node_selector.items())
        + ")",
    )
    parser.add_argument(
        "--kfp-version",
        choices=kfp_versions.SUPPORTED_VERSIONS,
        default=kfp_versions.DEFAULT_VERSION,
        metavar="VERSION",
        help="KFP backend release the package is for (default %(default)s; one of "
        + ", ".join(kfp_versions.SUPPORTED_VERSIONS)
        + ")",
    )
    for name, text in _OPTION_FLAGS:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag, default=getattr(defaults, name), help=f"{text}; default %(default)s"
        )


def run(args: argparse.Namespace) -> int:
    """Compile as ``args`` say; print the output path."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    settings = {name: getattr(args, name) for name, _ in _OPTION_FLAGS}
    if args.gpu_node_label:
        settings["gpu_node_selector"] = dict(args.gpu_node_label)
    try:
        out = compile_pipeline(
            args.config,
            args.out,
            args.image,
            not args.no_cache_data,
            ClusterOptions(**settings),
            args.kfp_version,
        )
    except CarClassifierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0
