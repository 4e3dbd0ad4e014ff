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
is retried with exponential backoff (a preempted stage resumes from its checkpoints) and gets
the GCS key secret, the prepare task the Kaggle secret. `ClusterOptions` holds these settings.
"""

# No `from __future__ import annotations`: kfp reads the pipeline function's annotations as types.
import importlib.util
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import PipelineTask

from carclassifier.config import RunConfig, StageConfig, dump_config, load_config
from carclassifier.steps import GCS_KEY_FILE_ENV
from components import TRAINER_IMAGE, trainer_components

DEFAULT_GPU_TYPE = "nvidia.com/gpu"
"""The accelerator type kfp puts in the pod's resource limits. On Kubeflow Pipelines (Argo
backend) it is the Kubernetes resource name: ``nvidia.com/gpu``; on Vertex AI Pipelines a
machine accelerator such as ``NVIDIA_TESLA_T4`` or ``NVIDIA_L4``."""


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
    backoff_max_duration: str = "3600s"


def pipeline_name(config: RunConfig) -> str:
    """``car-classifier-<config name>`` in the lower-case, dash-separated form kfp wants."""
    return "car-classifier-" + re.sub(r"[^a-z0-9]+", "-", config.name.lower()).strip("-")


def stage_display_name(stage: StageConfig) -> str:
    """``Stage 2 — unfreeze 1/2`` (``stage_5_1`` → ``Stage 5.1``; other names kept)."""
    match = re.fullmatch(r"stage_(\d+(?:_\d+)*)", stage.name)
    title = f"Stage {match.group(1).replace('_', '.')}" if match else stage.name
    return f"{title} — {stage.description}" if stage.description else title


def _common(task: PipelineTask, options: ClusterOptions, resources: Resources) -> PipelineTask:
    """Resources, retries and the GCS credentials, for every task."""
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
    return task


def _on_gpu(
    task: PipelineTask, options: ClusterOptions, gpu_type: object, gpu_count: object
) -> PipelineTask:
    """Request the GPUs (from pipeline parameters) and schedule on the GPU node pool."""
    _common(task, options, options.gpu_resources)
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
) -> dsl.graph_component.GraphComponent:
    """The ``@dsl.pipeline`` of the recipe ``config`` (a `RunConfig` or a YAML path) on the
    trainer ``image``.

    ``cache_data=False`` turns caching off for the prepare task, for scheduled retraining on
    the latest data; the stages, EDA, evaluate, predict and export stay cached (same inputs,
    same outputs) and the gate never is (it reads the current champion).
    """
    if not isinstance(config, RunConfig):
        config = load_config(config)
    options = options or ClusterOptions()
    ops = trainer_components(image)
    recipe = dump_config(config)
    stages = list(config.stages)
    stage_names = [stage.name for stage in stages]
    summary = ", ".join(f"{s.name} ({s.description})" if s.description else s.name for s in stages)

    @dsl.pipeline(
        name=pipeline_name(config),
        description=f"Staged fine-tuning of {config.model.backbone} ({config.name}): {summary}.",
    )
    def car_classifier(
        data_source: str = "",
        overrides: list = [],  # noqa: B006 - kfp reads the parameter's default from here
        backbone: str = "",
        image_size: int = 0,
        gpu_type: str = DEFAULT_GPU_TYPE,
        gpu_count: int = 1,
        checkpoint_root: str = "",
        champion_pointer: str = "",
        min_improvement: float = 0.0,
    ) -> None:
        """Train the recipe stage by stage, evaluate, predict, export and gate.

        Args:
            data_source: "" (the recipe's data.root, else the demo data), "kaggle" (download the competition with the kaggle secret), a gs:// prefix or a folder in the image.
            overrides: Config overrides KEY=VALUE, e.g. stages.stage_2.epochs=3 (not the stage list).
            backbone: Backbone name ("" keeps the recipe's).
            image_size: Base input size in px, a multiple of 32 (0 keeps the recipe's; stages with their own size keep it).
            gpu_type: Accelerator type: nvidia.com/gpu on Kubeflow, e.g. NVIDIA_TESLA_T4 on Vertex AI.
            gpu_count: GPUs per model task (stages, evaluate, predict, gate).
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
            _on_gpu(task, options, gpu_type, gpu_count).set_caching_options(True)
            if previous is None:
                task.after(eda)  # no GPU time before the data passed validation and EDA
            previous = task
        assert previous is not None  # a RunConfig has at least one stage
        final = previous.outputs["model"]

        evaluate = ops.evaluate_model(dataset=dataset, model=final)
        evaluate.set_display_name("Evaluate (TTA)")
        _on_gpu(evaluate, options, gpu_type, gpu_count).set_caching_options(True)

        predict = ops.predict_submission(
            dataset=dataset, model=final, checkpoint_root=checkpoint_root, run_key=run_key
        ).set_display_name("Predict submission")
        _on_gpu(predict, options, gpu_type, gpu_count).set_caching_options(True)
        predict.after(evaluate)

        export = ops.export_model(
            dataset=dataset,
            model=final,
            evaluation=evaluate.outputs["evaluation"],
            checkpoint_root=checkpoint_root,
            run_key=run_key,
        ).set_display_name("Export model")
        _common(export, options, options.cpu_resources).set_caching_options(True)

        gate = ops.champion_gate(
            dataset=dataset,
            export_uri=export.outputs["Output"],
            champion_pointer=champion_pointer,
            min_improvement=min_improvement,
            checkpoint_root=checkpoint_root,
        ).set_display_name("Champion/challenger gate")
        _on_gpu(gate, options, gpu_type, gpu_count).set_caching_options(False)

    return car_classifier


def compile_pipeline(
    config_path: str | Path,
    out_path: str | Path,
    image: str = TRAINER_IMAGE,
    cache_data: bool = True,
    options: ClusterOptions | None = None,
) -> Path:
    """Compile the recipe at ``config_path`` to kfp IR YAML at ``out_path`` (same inputs, same
    bytes). Returns ``out_path``."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(config_path, image, cache_data, options)
    compiler.Compiler().compile(pipeline, package_path=str(out))
    return out


def _unshadow_docker_sdk() -> None:
    """kfp.local imports the ``docker`` SDK when it can; run from the repository root, the
    ``docker/`` folder (Dockerfiles) is found instead, as a namespace package, and kfp.local
    fails on ``docker.DockerClient``. Without the real SDK, make ``import docker`` fail as
    kfp.local expects (only its DockerRunner needs the SDK)."""
    if "docker" in sys.modules:
        return
    spec = importlib.util.find_spec("docker")
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and not any((Path(p) / "client.py").is_file() for p in locations):
        sys.modules["docker"] = None  # type: ignore[assignment]  # not the docker SDK


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
    _unshadow_docker_sdk()
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
