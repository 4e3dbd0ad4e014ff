"""A run's pipeline parameters checked as its pods will use them, before it is submitted.

`check_arguments` is what ``python -m pipelines submit|schedule|preflight`` and the kfp.local
run call: GPU settings in the form the KFP driver reads (strings), storage locations, and the
overrides applied to the compiled recipe exactly as the prepare task will. `stage_work` is the
measure of a stage's work that its task timeout is compiled from (`pipelines.car_classifier`).
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

from carclassifier.config import RunConfig, StageConfig, check_location, resolve_config
from carclassifier.errors import ConfigError

MAX_GPUS = 16
"""Most GPUs one pod can get (a2-megagpu-16g); a pod asking for more stays Pending forever."""
REFERENCE_IMAGE_SIZE = 224
"""Image size at which `ClusterOptions.epoch_timeout` applies; at size *s* an epoch gets
(*s*/224)² of it (the work per image grows with the pixels)."""
# An extended resource name (k8s.io/apimachinery IsQualifiedName with a domain; not one of
# kubernetes.io) or a Vertex AI accelerator.
_GPU_TYPE = re.compile(
    r"(?!(?:[^/]*\.)?kubernetes\.io/)[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.[a-z]+/"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?|[A-Z][A-Z0-9_]{1,63}"
)
# A KServe InferenceService: ``name`` (KServe's IsvcNameFmt, kserve/kserve pkg/apis/serving/
# v1beta1/inference_service_validation.go, v0.20.0) or ``namespace/name`` (a DNS-1123 label).
_INFERENCE_SERVICE = re.compile(
    r"(?:[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/)?[a-z]([-a-z0-9]*[a-z0-9])?"
)


def check_gpu_type(value: object) -> str:
    """An accelerator type: a Kubernetes extended resource name (``nvidia.com/gpu``,
    ``nvidia.com/mig-1g.5gb``) or a Vertex AI accelerator (``NVIDIA_L4``)."""
    if not (isinstance(value, str) and _GPU_TYPE.fullmatch(value)):
        raise ConfigError(
            f"gpu_type {value!r} is not an accelerator type: use a Kubernetes extended resource "
            "name such as nvidia.com/gpu (Kubeflow) or a Vertex AI accelerator such as NVIDIA_L4"
        )
    return value


def check_gpu_count(value: object) -> str:
    """A GPU count as the pipeline parameter takes it: a whole number as text, "0" (no GPU) to
    `MAX_GPUS` (the KFP driver reads pod-spec placeholders as strings only)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ConfigError(
            f"gpu_count {value!r} is a number, but the KFP driver reads GPU counts only as "
            f"strings (a number gives no GPU): pass it as text, e.g. gpu_count='{value}'"
        )
    if (
        not (isinstance(value, str) and value.isascii() and value.isdigit())
        or int(value) > MAX_GPUS
    ):
        raise ConfigError(
            f"gpu_count {value!r} must be a whole number from 0 to {MAX_GPUS} as text (Kubernetes "
            "requests GPUs in whole units; no node has more than 16)"
        )
    return str(int(value))


def stage_work(config: RunConfig, stage: StageConfig) -> float:
    """A stage's work in epochs at `REFERENCE_IMAGE_SIZE` px: ``epochs x (size/224)²``."""
    size = config.stage_image_size(stage)
    return stage.epochs * (size / REFERENCE_IMAGE_SIZE) ** 2


def _uri(args: Mapping[str, Any], name: str, object_required: bool, on_cluster: bool) -> None:
    value = args.get(name, "")
    if not isinstance(value, str):
        raise ConfigError(f"{name} {value!r} must be a string")
    if value == "" or (name == "data_source" and value == "kaggle"):
        return
    try:
        check_location(value, name, object_required=object_required)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if on_cluster and not value.startswith("gs://"):
        raise ConfigError(
            f"{name} {value!r}: on a cluster it must be a gs://BUCKET/PATH URI (a local path "
            "would be inside one pod and lost with it)"
        )


def check_arguments(
    arguments: Mapping[str, Any],
    recipe: str,
    stage_names: Sequence[str] | None,
    on_cluster: bool = True,
) -> dict[str, Any]:
    """Check a run's pipeline parameters before it starts; raise `ConfigError` naming the
    parameter (absent ones keep their defaults).

    The overrides, ``backbone`` and ``image_size`` are applied to the compiled ``recipe`` (YAML
    text) exactly as the prepare task will (`carclassifier.config.resolve_config`: a typo fails
    here, not in a pod; the stage list must stay ``stage_names``), and no stage may get more
    work than its task timeout was compiled for. ``on_cluster``: storage locations must be
    gs:// (a kfp.local run may use local folders; a data source may be a folder in the image).
    """
    args = dict(arguments)
    _uri(args, "data_source", True, False)
    _uri(args, "checkpoint_root", False, on_cluster)
    _uri(args, "champion_pointer", True, on_cluster)
    if "gpu_type" in args:
        check_gpu_type(args["gpu_type"])
    if "gpu_count" in args:
        check_gpu_count(args["gpu_count"])
    service = args.get("inference_service", "")
    if service and not (isinstance(service, str) and _INFERENCE_SERVICE.fullmatch(service)):
        raise ConfigError(
            f"inference_service {service!r} must be a KServe InferenceService as name or "
            "namespace/name (lower-case letters, digits and '-'), or empty for none"
        )
    margin = args.get("min_improvement", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin <= 1:
        raise ConfigError(f"min_improvement {margin!r} must be a number from 0 to 1")
    overrides = args.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides {overrides!r} must be a list of KEY=VALUE strings")
    config = resolve_config(
        recipe, overrides, args.get("backbone", ""), args.get("image_size", 0), stage_names
    )
    compiled = resolve_config(recipe)
    for stage, before in zip(config.stages, compiled.stages, strict=False):
        if stage_work(config, stage) > stage_work(compiled, before) + 1e-9:
            raise ConfigError(
                f"{stage.name}: the overrides make it {stage.epochs} epochs at "
                f"{config.stage_image_size(stage)} px, more work than its task "
                "timeout was compiled for; compile the pipeline from the changed recipe"
            )
    return args
