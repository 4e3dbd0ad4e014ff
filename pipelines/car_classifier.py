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
`carclassifier.kubeflow.arguments.check_arguments` checks a run's parameters before it is submitted.

The package is compiled for one KFP backend release (``kfp_version``, `carclassifier.kubeflow.kfp_versions`):
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
from dataclasses import dataclass, field
from pathlib import Path

import kfp
import yaml
from kfp import compiler, dsl, kubernetes
from kfp.dsl import PipelineTask
from kubernetes.utils import parse_quantity

from carclassifier.config import RunConfig, StageConfig, dump_config, load_config
from carclassifier.errors import ConfigError
from carclassifier.kubeflow import kfp_versions
from carclassifier.kubeflow.arguments import (
    check_arguments,
    check_gpu_count,
    check_gpu_type,
    stage_work,
)
from carclassifier.steps import GCS_KEY_FILE_ENV
from components import TRAINER_IMAGE, trainer_components

log = logging.getLogger(__name__)

DEFAULT_GPU_TYPE = "nvidia.com/gpu"
"""The accelerator type kfp puts in the pod's resource limits: the Kubernetes resource name on
Kubeflow Pipelines, a machine accelerator such as ``NVIDIA_L4`` on Vertex AI Pipelines."""
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
RUN_AS_USER = 10001
"""The trainer image's non-root uid/gid (docker/trainer.Dockerfile ``USER``)."""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(s|m|h)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def duration_seconds(text: str, what: str) -> int:
    """Seconds of a duration like ``90s``, ``30m``, ``2h`` (at least 1 s, at most a week)."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ConfigError(f"{what} {text!r} is not a duration like 60s, 30m or 2h")
    seconds = math.ceil(float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
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

    ``kfp.local`` ignores all of this except the retry policy. Names (labels, taint, secrets)
    are checked by the Kubernetes API server (``make preflight`` lists the GPU nodes by these
    labels), quantities by kfp when the pipeline is built.
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
    """uid of every container (with ``runAsNonRoot``); None leaves the security context unset
    (and so does a KFP backend before 2.16.0, whose proto has no ``securityContext``)."""
    run_as_group: int | None = RUN_AS_USER
    gpu_type: str = DEFAULT_GPU_TYPE
    """Default of the ``gpu_type`` parameter (compiled in where the backend cannot resolve it)."""
    gpu_count: str = "1"
    """Default of the ``gpu_count`` parameter, as text (likewise)."""
    epoch_timeout: str = "15m"
    """Time budget of one training epoch at 224 px (`carclassifier.kubeflow.arguments.stage_work`); a stage may run
    ``stage_setup_timeout + epochs x epoch_timeout x (size/224)²``: ~6x what a T4 needs for
    EfficientNet-B6 (docs/performance.md), far less than the same epoch on CPUs (a task that
    lost its GPU is stopped)."""
    stage_setup_timeout: str = "30m"
    """Per stage, for pulling the image, loading the data and the checkpoints."""
    task_timeout: str = "1h"
    """Every other task (prepare, EDA, evaluate, predict, export, gate)."""

    def check(self) -> None:
        """Raise `ConfigError` for a setting Argo or the pod spec would reject at run time."""
        for resources in (self.gpu_resources, self.cpu_resources):
            for kind in ("cpu", "memory"):
                request, limit = (getattr(resources, f"{kind}_{e}") for e in ("request", "limit"))
                try:
                    ok = 0 < parse_quantity(request) <= parse_quantity(limit)
                except ValueError:
                    raise ConfigError(
                        f"{kind} {request}/{limit} is not a Kubernetes quantity (e.g. 2, 500m, 8Gi)"
                    ) from None
                if not ok:
                    raise ConfigError(
                        f"{kind} request {request} must be positive and at most the limit {limit}"
                    )
        for name in ("run_as_user", "run_as_group"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not 0 < value < 2**31):
                raise ConfigError(f"{name} {value!r} must be a non-root id (1 to 2147483647)")
        check_gpu_type(self.gpu_type)
        check_gpu_count(self.gpu_count)
        names = ("backoff_duration", "backoff_max_duration", "epoch_timeout",
                 "stage_setup_timeout", "task_timeout")  # fmt: skip
        for name in names:
            duration_seconds(getattr(self, name), name)


def pipeline_name(config: RunConfig) -> str:
    """``car-classifier-<config name>`` in the lower-case, dash-separated form kfp wants."""
    return "car-classifier-" + re.sub(r"[^a-z0-9]+", "-", config.name.lower()).strip("-")


def stage_display_name(stage: StageConfig) -> str:
    """``Stage 2 — unfreeze 1/2`` (``stage_5_1`` → ``Stage 5.1``; other names kept)."""
    match = re.fullmatch(r"stage_(\d+(?:_\d+)*)", stage.name)
    title = f"Stage {match.group(1).replace('_', '.')}" if match else stage.name
    return f"{title} — {stage.description}" if stage.description else title


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
        serving_root: str = "",
        inference_service: str = "",
        webhook_url: str = "",
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
            min_improvement: Accuracy margin by which the challenger must beat the champion (and significantly: the recipe's gate section).
            serving_root: gs:// prefix of the numbered serving versions and their champion.json pointer ("" = <checkpoint_root>/serving).
            inference_service: KServe InferenceService (namespace/name, or name in the run's namespace) whose storageUri is serving_root: rolled onto each deployed version, since KServe copies the model only when a pod starts ("" = none).
            webhook_url: Slack-compatible incoming webhook the run summary is posted to ("" = none).
        """
        arguments = (
            data_source, overrides, backbone, image_size, checkpoint_root, champion_pointer,
            min_improvement, serving_root, inference_service, gpu_type, gpu_count,
        )  # fmt: skip
        if not target.task_final_status:
            _tasks(*arguments)  # no exit task: this backend cannot give it the run's status
            return
        summary = ops.run_summary(
            checkpoint_root=checkpoint_root,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            webhook_url=webhook_url,
            gpu_count=gpu_count,
        ).set_display_name("Run summary")
        _common(summary, options, options.cpu_resources).set_caching_options(False)
        tasks.append(summary)
        with dsl.ExitHandler(summary, name="carclassifier-run"):
            _tasks(*arguments)

    def _tasks(
        data_source: str, overrides: list, backbone: str, image_size: int, checkpoint_root: str,
        champion_pointer: str, min_improvement: float, serving_root: str, inference_service: str,
        gpu_type: str, gpu_count: str,
    ) -> None:  # fmt: skip
        """Every task but the exit task, in the exit handler's group."""
        prepare = ops.prepare_data(
            config_yaml=recipe,
            overrides=overrides,
            data_source=data_source,
            backbone=backbone,
            image_size=image_size,
            stage_names=stage_names,
            checkpoint_root=checkpoint_root,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
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
                gpu_type=gpu_type,  # also threads both into the exit handler's group (the kfp
                gpu_count=gpu_count,  # compiler passes a group only the channels tasks read)
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

        evaluate = ops.evaluate_model(
            dataset=dataset, model=final, checkpoint_root=checkpoint_root, run_key=run_key
        )
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
            run_key=run_key,
        ).set_display_name("Champion/challenger gate")
        _on_gpu(gate, options, gpu_type, gpu_count).set_caching_options(False)
        tasks.append(gate)

        with dsl.If(gate.outputs["Output"] == True, name="promoted"):  # noqa: E712 - a kfp condition
            deploy = ops.deploy_model(
                dataset=dataset,
                export_uri=export.outputs["Output"],
                serving_root=serving_root,
                checkpoint_root=checkpoint_root,
                run_key=run_key,
                inference_service=inference_service,
            ).set_display_name("Deploy (new serving version)")
            _common(deploy, options, options.cpu_resources).set_caching_options(False)
            tasks.append(deploy)
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
    try:
        pipeline = dsl.pipeline(
            name=pipeline_name(config), description=kfp_versions.stamp(description, kfp_version)
        )(car_classifier)
    except ValueError as exc:  # kfp's own checks of the task settings (quantities, ...)
        raise ConfigError(f"kfp refused the cluster options: {exc}") from None
    if not target.task_final_status:
        since = kfp_versions.TASK_FINAL_STATUS_SINCE
        lost[f"the run summary exit task (PipelineTaskFinalStatus, from {since})"] = 1
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


def run_pipeline_local(
    config: RunConfig | str | Path,
    pipeline_root: str | Path,
    image: str = TRAINER_IMAGE,
    enable_caching: bool = False,
    options: ClusterOptions | None = None,
    **arguments: object,
) -> Path:
    """Run the pipeline with ``kfp.local``'s SubprocessRunner in this environment (every task a
    subprocess of this Python; images, resources, GPUs and kubernetes settings are ignored).
    Retries are honoured: kfp 2.17.3 reruns a failed task as its ``set_retry`` policy says
    (``options.retries``, with the backoff; ``kfp/local/orchestrator/task_executor.py``,
    ``execute_single_task``; tests/test_chaos.py kills tasks and checks it). ``arguments`` are
    pipeline parameters; ``enable_caching`` turns on
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
            build_pipeline(config, image, options=options)(**arguments)
    finally:
        local.config.LocalExecutionConfig.instance = None
    (run,) = set(root.glob(f"{name}-*")) - before
    return run
