"""The Kubeflow pipeline, generated from a recipe's stage list.

    prepare ─► validate + EDA ─► stage_1 ─Model─► stage_2 ─Model─► … ─► last stage ─► evaluate
                                                                        ├─► predict (submission)
                                                                        └─► export ─► gate

`build_pipeline(config, image)` makes one training task per entry of ``config.stages`` (the
same component each time), each from the previous stage's Model artifact: a recipe with other
stages gives another graph, and no stage name is written here. The recipe itself is compiled
into the pipeline (the graph depends on it); run-time changes go through the ``overrides``
parameter (``KEY=VALUE``, e.g. ``stages.stage_2.epochs=3``), which may change anything but the
stage list.

Every task that runs a model (the stages, evaluate, predict, gate) requests ``gpu_count`` GPUs
of ``gpu_type`` and is scheduled on the GPU node pool (node selector + toleration); every task
is retried with exponential backoff (a preempted stage resumes from its checkpoints), has a
timeout (a stage's from its epochs, see `stage_timeout_seconds`) and gets the GCS key secret,
the prepare task the Kaggle secret; every container runs as the image's non-root user with
``runAsNonRoot`` (kfp-kubernetes ``set_security_context``; the KFP driver also drops all
capabilities). `ClusterOptions` holds these settings and is checked when the pipeline is built;
`check_arguments` checks a run's parameters before it is submitted.

The package is compiled for one KFP backend release (``kfp_version``, `pipelines.kfp_versions`):
what that release cannot read is left out of the kubernetes config (one warning line says
what), and where its driver cannot resolve resource placeholders (before 2.4.0) the GPU type and
count are compiled in from `ClusterOptions` instead of being run parameters. Values that reach
the pod spec through a placeholder are string parameters: the driver reads them with
``GetStringValue()`` (``resolvePodSpecInputRuntimeParameter``), which gives "" for a number.
"""

# No `from __future__ import annotations`: kfp reads the pipeline function's annotations as types.
import inspect
import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kfp
import yaml
from kfp import compiler, dsl, kubernetes
from kfp.dsl import PipelineTask

from carclassifier.config import (
    MAX_IMAGE_SIZE,
    SIZE_MULTIPLE,
    RunConfig,
    StageConfig,
    check_location,
    dump_config,
    load_config,
)
from carclassifier.errors import ConfigError
from carclassifier.steps import GCS_KEY_FILE_ENV
from components import TRAINER_IMAGE, trainer_components
from pipelines import kfp_versions

log = logging.getLogger(__name__)

DEFAULT_GPU_TYPE = "nvidia.com/gpu"
"""The accelerator type kfp puts in the pod's resource limits. On Kubeflow Pipelines (Argo
backend) it is the Kubernetes resource name: ``nvidia.com/gpu``; on Vertex AI Pipelines a
machine accelerator such as ``NVIDIA_TESLA_T4`` or ``NVIDIA_L4``."""
MAX_GPUS = 16
"""Most GPUs one pod can get: the largest GPU machines (a2-megagpu-16g) have 16; a pod asking
for more than any node has stays Pending forever."""
REFERENCE_IMAGE_SIZE = 224
"""Image size at which `ClusterOptions.epoch_timeout` applies; an epoch at size *s* gets
(*s*/224)² of it (the work per image grows with the pixels)."""
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
"""Longest task timeout accepted (a week)."""
RUN_AS_USER = 10001
"""The trainer image's non-root uid/gid (docker/trainer.Dockerfile ``USER``)."""

# Kubernetes name syntax (k8s.io/apimachinery validation): label keys and values, DNS-1123
# names, quantities, and extended resource names (``domain/name``, e.g. ``nvidia.com/gpu``).
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DURATION = re.compile(r"^\d+(\.\d+)?(ms|s|m|h)$")
_VERTEX_ACCELERATOR = re.compile(r"^[A-Z][A-Z0-9_]{1,63}$")
_QUANTITY_SCALE = {"m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
                   "E": 1e18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
                   "Ei": 2**60}  # fmt: skip


def _label_key_ok(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and not (len(prefix) <= 253 and _DNS_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _label_value_ok(value: str) -> bool:
    return value == "" or (len(value) <= 63 and bool(_LABEL_NAME.match(value)))


def _quantity(text: str, what: str) -> float:
    match = _QUANTITY.match(text)
    if not match:
        raise ConfigError(f"{what} {text!r} is not a Kubernetes quantity (e.g. 2, 500m, 8Gi)")
    return (
        float(text[: len(text) - len(match.group(2) or "")]) * _QUANTITY_SCALE[match.group(2) or ""]
    )


def check_gpu_type(value: object) -> str:
    """An accelerator type: a Kubernetes extended resource name (``nvidia.com/gpu``,
    ``amd.com/gpu``, ``nvidia.com/mig-1g.5gb``) or a Vertex AI accelerator (``NVIDIA_L4``)."""
    text = str(value) if isinstance(value, str) else ""
    prefix, slash, name = text.partition("/")
    extended = (
        slash
        and "." in prefix
        and not prefix.endswith("kubernetes.io")
        and len(prefix) <= 253
        and _DNS_SUBDOMAIN.match(prefix)
        and len(name) <= 63
        and _LABEL_NAME.match(name)
    )
    if not (extended or _VERTEX_ACCELERATOR.match(text)):
        raise ConfigError(
            f"gpu_type {value!r} is not an accelerator type: use a Kubernetes extended resource "
            "name such as nvidia.com/gpu (Kubeflow) or a Vertex AI accelerator such as NVIDIA_L4"
        )
    return text


def check_gpu_count(value: object) -> str:
    """A GPU count as the pipeline parameter takes it: a string of a whole number, "0" (no GPU)
    up to `MAX_GPUS` (the KFP driver reads pod-spec placeholders as strings only)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ConfigError(
            f"gpu_count {value!r} is a number, but the KFP driver reads GPU counts only as "
            f"strings (a number gives no GPU): pass it as text, e.g. gpu_count='{value}'"
        )
    if not (isinstance(value, str) and value.isascii() and value.isdigit()) or not (
        0 <= int(value) <= MAX_GPUS
    ):
        raise ConfigError(
            f"gpu_count {value!r} must be a whole number from 0 to {MAX_GPUS} as text (Kubernetes "
            "requests GPUs in whole units; no node has more than 16)"
        )
    return str(int(value))


def duration_seconds(text: str, what: str) -> int:
    """Seconds of a duration like ``90s``, ``30m``, ``2h`` (at least 1 s, at most a week)."""
    if not isinstance(text, str) or not _DURATION.match(text):
        raise ConfigError(f"{what} {text!r} is not a duration like 60s, 30m or 2h")
    scale = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    unit = "ms" if text.endswith("ms") else text[-1]
    seconds = math.ceil(float(text[: -len(unit)]) * scale[unit])
    if not 1 <= seconds <= MAX_TIMEOUT_SECONDS:
        raise ConfigError(f"{what} {text} must be from 1s to {MAX_TIMEOUT_SECONDS // 3600}h")
    return seconds


@dataclass(frozen=True)
class Resources:
    """CPU and memory of a task's container (Kubernetes quantities)."""

    cpu_request: str
    memory_request: str
    cpu_limit: str
    memory_limit: str


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how the tasks run on the cluster; compiled into the pipeline.

    ``kfp.local`` ignores all of this except the retry policy.
    """

    gpu_node_selector: dict[str, str] = field(
        default_factory=lambda: {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
    )
    """Labels of the GPU nodes (GKE labels every GPU node with its accelerator)."""
    gpu_toleration_key: str = "nvidia.com/gpu"
    """The taint GKE puts on GPU nodes (``nvidia.com/gpu=present:NoSchedule``), tolerated."""
    gpu_resources: Resources = Resources("6", "20Gi", "8", "26Gi")
    """Model tasks; the requests fit an n1-standard-8 + T4 node (manifests/gke/gpu-node-pool.sh)."""
    cpu_resources: Resources = Resources("2", "8Gi", "4", "16Gi")
    """prepare, EDA and export (no GPU)."""
    kaggle_secret: str = "kaggle-credentials"
    """Secret with keys KAGGLE_USERNAME and KAGGLE_KEY, set as env vars of the same names
    (optional: only the ``kaggle`` data source needs it)."""
    gcs_secret: str = "gcs-credentials"
    """Secret with a service-account key ``key.json``, for clusters without Workload Identity
    (optional: the manifests use Workload Identity and create no such secret)."""
    gcs_key_dir: str = "/var/secrets/google"
    retries: int = 3
    backoff_duration: str = "60s"
    backoff_factor: float = 2.0
    backoff_max_duration: str = "86400s"
    """Argo's backoff.maxDuration, counted from the first attempt's start: a day, so a stage
    preempted after hours of training is still retried (kfp's default 3600s would not)."""
    run_as_user: int | None = RUN_AS_USER
    """uid of every container (with ``runAsNonRoot``); None leaves the security context unset.
    Compiling for a KFP backend before 2.16.0 (``kfp_version``) leaves it out anyway: its proto
    has no ``securityContext`` (docs/kfp-backend.md)."""
    run_as_group: int | None = RUN_AS_USER
    gpu_type: str = DEFAULT_GPU_TYPE
    """Default of the ``gpu_type`` parameter (compiled in where the backend cannot resolve it)."""
    gpu_count: str = "1"
    """Default of the ``gpu_count`` parameter, as text (likewise)."""
    epoch_timeout: str = "15m"
    """Time budget of one training epoch at `REFERENCE_IMAGE_SIZE` px; a stage may run
    ``stage_setup_timeout + epochs x epoch_timeout x (size/224)²`` before it is stopped. The
    default is ~6x what a T4 needs for EfficientNet-B6 (docs/performance.md), and far less than
    the same epoch on CPUs takes (a task that lost its GPU is stopped)."""
    stage_setup_timeout: str = "30m"
    """Per stage, for pulling the image, loading the data and the checkpoints."""
    task_timeout: str = "1h"
    """Every other task (prepare, EDA, evaluate, predict, export, gate)."""

    def check(self) -> None:
        """Raise `ConfigError` for a setting Kubernetes or Argo would reject at run time."""
        for key, value in self.gpu_node_selector.items():
            if not _label_key_ok(key) or not _label_value_ok(value):
                raise ConfigError(f"GPU node label {key}={value} is not a valid Kubernetes label")
        if not _label_key_ok(self.gpu_toleration_key):
            raise ConfigError(
                f"toleration key {self.gpu_toleration_key!r} is not a valid taint key"
            )
        for resources in (self.gpu_resources, self.cpu_resources):
            for kind in ("cpu", "memory"):
                request = _quantity(getattr(resources, f"{kind}_request"), f"{kind} request")
                limit = _quantity(getattr(resources, f"{kind}_limit"), f"{kind} limit")
                if not 0 < request <= limit:
                    raise ConfigError(
                        f"{kind} request {getattr(resources, f'{kind}_request')} must be positive "
                        f"and at most the limit {getattr(resources, f'{kind}_limit')}"
                    )
        for secret in (self.kaggle_secret, self.gcs_secret):
            if not (len(secret) <= 253 and _DNS_SUBDOMAIN.match(secret)):
                raise ConfigError(f"secret name {secret!r} is not a DNS-1123 name")
        if not self.gcs_key_dir.startswith("/"):
            raise ConfigError(f"gcs_key_dir {self.gcs_key_dir!r} must be an absolute path")
        if not 0 <= self.retries <= 10:
            raise ConfigError(f"retries {self.retries} must be between 0 and 10")
        for name in ("backoff_duration", "backoff_max_duration"):
            if not _DURATION.match(getattr(self, name)):
                raise ConfigError(f"{name} {getattr(self, name)!r} is not a duration like 60s")
        if not (math.isfinite(self.backoff_factor) and self.backoff_factor >= 1):
            raise ConfigError(f"backoff_factor {self.backoff_factor} must be at least 1")
        for name in ("run_as_user", "run_as_group"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not 0 < value < 2**31):
                raise ConfigError(f"{name} {value!r} must be a non-root id (1 to 2147483647)")
        check_gpu_type(self.gpu_type)
        check_gpu_count(self.gpu_count)
        for name in ("epoch_timeout", "stage_setup_timeout", "task_timeout"):
            duration_seconds(getattr(self, name), name)


def pipeline_name(config: RunConfig) -> str:
    """``car-classifier-<config name>`` in the lower-case, dash-separated form kfp wants."""
    return "car-classifier-" + re.sub(r"[^a-z0-9]+", "-", config.name.lower()).strip("-")


def stage_display_name(stage: StageConfig) -> str:
    """``Stage 2 — unfreeze 1/2`` (``stage_5_1`` → ``Stage 5.1``; other names kept)."""
    match = re.fullmatch(r"stage_(\d+(?:_\d+)*)", stage.name)
    title = f"Stage {match.group(1).replace('_', '.')}" if match else stage.name
    return f"{title} — {stage.description}" if stage.description else title


def stage_work(config: RunConfig, stage: StageConfig) -> float:
    """A stage's work in epochs at `REFERENCE_IMAGE_SIZE` px: ``epochs x (size/224)²``."""
    size = stage.image_size or config.input.image_size
    return stage.epochs * (size / REFERENCE_IMAGE_SIZE) ** 2


def stage_timeout_seconds(config: RunConfig, stage: StageConfig, options: ClusterOptions) -> int:
    """The timeout of a stage's task: setup + its `stage_work` x the epoch budget (capped at
    `MAX_TIMEOUT_SECONDS`)."""
    epoch = duration_seconds(options.epoch_timeout, "epoch_timeout")
    setup = duration_seconds(options.stage_setup_timeout, "stage_setup_timeout")
    return min(MAX_TIMEOUT_SECONDS, setup + math.ceil(stage_work(config, stage) * epoch))


def _common(
    task: PipelineTask,
    options: ClusterOptions,
    resources: Resources,
    timeout_seconds: int | None = None,
) -> PipelineTask:
    """Resources, retries, the timeout (``timeout_seconds``, else the short
    ``options.task_timeout``) and the GCS credentials, for every task."""
    task.set_cpu_request(resources.cpu_request).set_cpu_limit(resources.cpu_limit)
    task.set_memory_request(resources.memory_request).set_memory_limit(resources.memory_limit)
    task.set_retry(
        num_retries=options.retries,
        backoff_duration=options.backoff_duration,
        backoff_factor=options.backoff_factor,
        backoff_max_duration=options.backoff_max_duration,
    )
    kubernetes.use_secret_as_volume(
        task, secret_name=options.gcs_secret, mount_path=options.gcs_key_dir, optional=True
    )
    task.set_env_variable(GCS_KEY_FILE_ENV, f"{options.gcs_key_dir}/key.json")
    task.set_env_variable("PYTHONUNBUFFERED", "1")
    if timeout_seconds is None:
        timeout_seconds = duration_seconds(options.task_timeout, "task_timeout")
    kubernetes.set_timeout(task, timeout_seconds)
    if options.run_as_user is not None:
        kubernetes.set_security_context(
            task,
            run_as_user=options.run_as_user,
            run_as_group=options.run_as_group,
            run_as_non_root=True,
        )
    return task


def _on_gpu(
    task: PipelineTask,
    options: ClusterOptions,
    gpu_type: object,
    gpu_count: object,
    timeout_seconds: int | None = None,
) -> PipelineTask:
    """Request the GPUs (from pipeline parameters) and schedule on the GPU node pool."""
    _common(task, options, options.gpu_resources, timeout_seconds)
    task.set_accelerator_type(gpu_type).set_accelerator_limit(gpu_count)
    for key, value in options.gpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_toleration(
        task, key=options.gpu_toleration_key, operator="Exists", effect="NoSchedule"
    )
    return task


def build_pipeline(
    config: RunConfig | str | Path,
    image: str = TRAINER_IMAGE,
    cache_data: bool = True,
    options: ClusterOptions | None = None,
    kfp_version: str = kfp_versions.DEFAULT_VERSION,
) -> dsl.graph_component.GraphComponent:
    """The ``@dsl.pipeline`` of the recipe ``config`` (a `RunConfig` or a YAML path) on the
    trainer ``image``, for the KFP backend ``kfp_version``.

    ``cache_data=False`` turns caching off for the prepare task, for scheduled retraining on
    the latest data; the stages, EDA, evaluate, predict and export stay cached (same inputs,
    same outputs) and the gate never is (it reads the current champion).
    """
    if not isinstance(config, RunConfig):
        config = load_config(config)
    options = options or ClusterOptions()
    options.check()
    target = kfp_versions.backend(kfp_version)
    tasks: list[PipelineTask] = []
    lost: dict[str, int] = {}  # what the backend cannot read: left out, counted per task
    ops = trainer_components(image)
    recipe = dump_config(config)
    stages = list(config.stages)
    stage_names = [stage.name for stage in stages]
    summary = ", ".join(f"{s.name} ({s.description})" if s.description else s.name for s in stages)

    def car_classifier(
        data_source: str = "",
        overrides: list = [],  # noqa: B006 - kfp reads the parameter's default from here
        backbone: str = "",
        image_size: int = 0,
        checkpoint_root: str = "",
        champion_pointer: str = "",
        min_improvement: float = 0.0,
        gpu_type: str = options.gpu_type,
        gpu_count: str = options.gpu_count,
    ) -> None:
        """Train the recipe stage by stage, evaluate, predict, export and gate.

        Args:
            data_source: "" (the recipe's data.root, else the demo data), "kaggle" (download the competition with the kaggle secret), a gs:// prefix or a folder in the image.
            overrides: Config overrides KEY=VALUE, e.g. stages.stage_2.epochs=3 (not the stage list).
            backbone: Backbone name ("" keeps the recipe's).
            image_size: Base input size in px, a multiple of 32 (0 keeps the recipe's; stages with their own size keep it).
            gpu_type: Accelerator type: nvidia.com/gpu on Kubeflow, e.g. NVIDIA_TESLA_T4 on Vertex AI.
            gpu_count: GPUs per model task (stages, evaluate, predict, gate), as text ("1").
            checkpoint_root: gs://bucket/prefix for checkpoints and run outputs ("" = the recipe's output_dir, local to each pod).
            champion_pointer: gs:// JSON object naming the champion export ("" = <checkpoint_root>/champion.json).
            min_improvement: Accuracy margin by which the challenger must beat the champion.
        """
        prepare = ops.prepare_data(
            config_yaml=recipe,
            overrides=overrides,
            data_source=data_source,
            backbone=backbone,
            image_size=image_size,
            stage_names=stage_names,
        ).set_display_name("Prepare data")
        tasks.append(prepare)
        _common(prepare, options, options.cpu_resources).set_caching_options(cache_data)
        kubernetes.use_secret_as_env(
            prepare,
            secret_name=options.kaggle_secret,
            secret_key_to_env={"KAGGLE_USERNAME": "KAGGLE_USERNAME", "KAGGLE_KEY": "KAGGLE_KEY"},
            optional=True,
        )
        dataset = prepare.outputs["dataset"]
        run_key = prepare.outputs["run_key"]

        eda = ops.validate_and_eda(dataset=dataset).set_display_name("Validate + EDA")
        _common(eda, options, options.cpu_resources).set_caching_options(True)
        tasks.append(eda)

        previous: PipelineTask | None = None
        for stage in stages:
            init = {} if previous is None else {"init_model": previous.outputs["model"]}
            task = ops.train_stage(
                dataset=dataset,
                stage_name=stage.name,
                checkpoint_root=checkpoint_root,
                run_key=run_key,
                **init,
            ).set_display_name(stage_display_name(stage))
            timeout = stage_timeout_seconds(config, stage, options)
            _on_gpu(task, options, gpu_type, gpu_count, timeout).set_caching_options(True)
            tasks.append(task)
            if previous is None:
                task.after(eda)  # no GPU time before the data passed validation and EDA
            previous = task
        assert previous is not None  # a RunConfig has at least one stage
        final = previous.outputs["model"]

        evaluate = ops.evaluate_model(dataset=dataset, model=final)
        evaluate.set_display_name("Evaluate (TTA)")
        _on_gpu(evaluate, options, gpu_type, gpu_count).set_caching_options(True)
        tasks.append(evaluate)

        predict = ops.predict_submission(
            dataset=dataset, model=final, checkpoint_root=checkpoint_root, run_key=run_key
        ).set_display_name("Predict submission")
        _on_gpu(predict, options, gpu_type, gpu_count).set_caching_options(True)
        predict.after(evaluate)
        tasks.append(predict)

        export = ops.export_model(
            dataset=dataset,
            model=final,
            evaluation=evaluate.outputs["evaluation"],
            checkpoint_root=checkpoint_root,
            run_key=run_key,
        ).set_display_name("Export model")
        _common(export, options, options.cpu_resources).set_caching_options(True)
        tasks.append(export)

        gate = ops.champion_gate(
            dataset=dataset,
            export_uri=export.outputs["Output"],
            champion_pointer=champion_pointer,
            min_improvement=min_improvement,
            checkpoint_root=checkpoint_root,
        ).set_display_name("Champion/challenger gate")
        _on_gpu(gate, options, gpu_type, gpu_count).set_caching_options(False)
        tasks.append(gate)
        for each in tasks:  # kfp builds the platform spec right after this function returns
            fitted, dropped = kfp_versions.fit_kubernetes_config(
                each.platform_config.get("kubernetes", {}), kfp_version
            )
            each.platform_config["kubernetes"] = fitted
            for item in dropped:
                lost[item] = lost.get(item, 0) + 1

    if not target.resource_placeholders:
        # kfp calls the pipeline function with one channel per parameter of its signature,
        # positionally: without the last two, gpu_type and gpu_count keep their defaults and are
        # compiled in as constants (the old numeric fields this backend's driver reads).
        signature = inspect.signature(car_classifier)
        car_classifier.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=list(signature.parameters.values())[:-2]
        )
    description = f"Staged fine-tuning of {config.model.backbone} ({config.name}): {summary}."
    pipeline = dsl.pipeline(
        name=pipeline_name(config), description=kfp_versions.stamp(description, kfp_version)
    )(car_classifier)
    if not target.resource_placeholders:
        fixed = f"{options.gpu_count} x {options.gpu_type}"
        lost[f"the gpu_type/gpu_count parameters (compiled in: {fixed})"] = 1
    if lost:
        log.warning(
            "KFP %s cannot read all that kfp %s writes; left out: %s",
            kfp_version,
            kfp.__version__,
            "; ".join(f"{item} ({n} tasks)" if n > 1 else item for item, n in lost.items()),
        )
    return pipeline


def compile_pipeline(
    config_path: str | Path,
    out_path: str | Path,
    image: str = TRAINER_IMAGE,
    cache_data: bool = True,
    options: ClusterOptions | None = None,
    kfp_version: str = kfp_versions.DEFAULT_VERSION,
) -> Path:
    """Compile the recipe at ``config_path`` to kfp IR YAML at ``out_path`` for the KFP backend
    ``kfp_version`` (same inputs, same bytes), then check the result with
    `kfp_versions.check_package` (`ConfigError` on a problem). Returns ``out_path``."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(config_path, image, cache_data, options, kfp_version)
    compiler.Compiler().compile(pipeline, package_path=str(out))
    spec, platform = yaml.safe_load_all(out.read_text())
    problems = kfp_versions.check_package(spec, kfp_version, platform)
    if problems:
        raise ConfigError(f"{out} would not run on KFP {kfp_version}: {problems[0]}")
    return out


PARAMETERS = (
    "data_source", "overrides", "backbone", "image_size", "checkpoint_root", "champion_pointer",
    "min_improvement", "gpu_type", "gpu_count",
)  # fmt: skip
"""The pipeline's run-time parameters (the arguments of the ``car_classifier`` function; the
last two only where the backend resolves resource placeholders, from KFP 2.4.0 on)."""


def _uri(value: object, name: str, object_required: bool, on_cluster: bool) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} {value!r} must be a string")
    if value == "":
        return value
    try:
        check_location(value, name, object_required=object_required)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if on_cluster and not value.startswith("gs://"):
        raise ConfigError(
            f"{name} {value!r}: on a cluster it must be a gs://BUCKET/PATH URI (a local path "
            "would be inside one pod and lost with it)"
        )
    return value


def check_arguments(
    arguments: Mapping[str, Any],
    recipe: str | None = None,
    stage_names: Sequence[str] | None = None,
    on_cluster: bool = True,
) -> dict[str, Any]:
    """Check a run's pipeline parameters before it starts; raise `ConfigError` naming the
    parameter. Only names of `PARAMETERS` are checked; absent ones keep their defaults.

    With the compiled ``recipe`` (YAML text) the overrides, ``backbone`` and ``image_size`` are
    applied to it exactly as the prepare task will (so a typo fails here, not in a pod), and
    with ``stage_names`` the overrides may not change the stage list. ``on_cluster``: storage
    locations must be gs:// (a kfp.local run may use local folders).
    """
    args = dict(arguments)
    if "data_source" in args:
        source = args["data_source"]
        if source not in ("", "kaggle"):
            _uri(source, "data_source", True, False)  # a folder in the image is allowed
    overrides = args.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides {overrides!r} must be a list of KEY=VALUE strings")
    backbone = args.get("backbone", "")
    if not isinstance(backbone, str):
        raise ConfigError(f"backbone {backbone!r} must be a string ('' keeps the recipe's)")
    image_size = args.get("image_size", 0)
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or not (image_size == 0 or SIZE_MULTIPLE <= image_size <= MAX_IMAGE_SIZE)
        or image_size % SIZE_MULTIPLE
    ):
        raise ConfigError(
            f"image_size {image_size!r} must be 0 (the recipe's) or a multiple of {SIZE_MULTIPLE} "
            f"from {SIZE_MULTIPLE} to {MAX_IMAGE_SIZE}"
        )
    if "gpu_type" in args:
        check_gpu_type(args["gpu_type"])
    if "gpu_count" in args:
        check_gpu_count(args["gpu_count"])
    if "checkpoint_root" in args:
        _uri(args["checkpoint_root"], "checkpoint_root", False, on_cluster)
    if "champion_pointer" in args:
        _uri(args["champion_pointer"], "champion_pointer", True, on_cluster)
    if "min_improvement" in args:
        margin = args["min_improvement"]
        if (
            isinstance(margin, bool)
            or not isinstance(margin, int | float)
            or not (math.isfinite(margin) and 0 <= margin <= 1)
        ):
            raise ConfigError(f"min_improvement {margin!r} must be a number from 0 to 1")
    if recipe is not None:
        from carclassifier.backbones import get_backbone
        from carclassifier.steps import resolve_config

        config = resolve_config(recipe, overrides, backbone, image_size)
        get_backbone(config.model.backbone)
        names = [stage.name for stage in config.stages]
        if stage_names is not None and names != list(stage_names):
            raise ConfigError(
                f"the overrides make the stages {names}, but this pipeline was compiled for "
                f"{list(stage_names)}; compile it from the changed recipe"
            )
        compiled = resolve_config(recipe)
        for stage, before in zip(config.stages, compiled.stages, strict=False):
            if stage_work(config, stage) > stage_work(compiled, before) + 1e-9:
                raise ConfigError(
                    f"{stage.name}: the overrides make it {stage.epochs} epochs at "
                    f"{stage.image_size or config.input.image_size} px, more work than its task "
                    "timeout was compiled for; compile the pipeline from the changed recipe"
                )
    return args


def run_pipeline_local(
    config: RunConfig | str | Path,
    pipeline_root: str | Path,
    image: str = TRAINER_IMAGE,
    enable_caching: bool = False,
    **arguments: object,
) -> Path:
    """Run the pipeline with ``kfp.local``'s SubprocessRunner in this environment (every task a
    subprocess of this Python; images, resources, GPUs and kubernetes settings are ignored,
    retries honoured). ``arguments`` are pipeline parameters; ``enable_caching`` turns on
    kfp.local's task cache (under ``pipeline_root/.kfp_cache``; the tasks' caching options
    apply, as on a cluster). Returns the run's folder under ``pipeline_root``: one subfolder
    per executed task with its artifacts and ``executor_output.json``."""
    from kfp import local

    if not isinstance(config, RunConfig):
        config = load_config(config)
    check_arguments(
        arguments, dump_config(config), [s.name for s in config.stages], on_cluster=False
    )
    root = Path(pipeline_root)
    root.mkdir(parents=True, exist_ok=True)
    name = pipeline_name(config)
    before = set(root.glob(f"{name}-*"))
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        enable_caching=enable_caching,
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*non-Python base image.*")
            warnings.filterwarnings("ignore", message=r".*no effect in the current local runner.*")
            build_pipeline(config, image)(**arguments)
    finally:
        local.config.LocalExecutionConfig.instance = None
    (run,) = set(root.glob(f"{name}-*")) - before
    return run
