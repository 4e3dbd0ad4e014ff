"""The Kubeflow pipeline of the recipe: build, compile, run with kfp.local."""

from pipelines.car_classifier import (
    DEFAULT_GPU_TYPE,
    ClusterOptions,
    Resources,
    build_pipeline,
    compile_pipeline,
    pipeline_name,
    run_pipeline_local,
    stage_display_name,
)

__all__ = [
    "DEFAULT_GPU_TYPE",
    "ClusterOptions",
    "Resources",
    "build_pipeline",
    "compile_pipeline",
    "pipeline_name",
    "run_pipeline_local",
    "stage_display_name",
]
