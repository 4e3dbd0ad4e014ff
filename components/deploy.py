"""Deploy: publish the promoted export as the next serving version and make it live."""

from kfp.dsl import Dataset, Input

from components._base import trainer_component


@trainer_component
def deploy_model(
    dataset: Input[Dataset],
    export_uri: str,
    serving_root: str,
    checkpoint_root: str,
    run_key: str,
    inference_service: str,
) -> int:
    """Copy the export to <serving_root>/<N>/ (TF Serving's layout; "" = <checkpoint_root>/serving),
    move <serving_root>/champion.json to it with a conditional write and, if inference_service is
    set, roll that KServe InferenceService onto it. Returns N."""
    from carclassifier import steps

    return steps.deploy_step(
        dataset.path, export_uri, serving_root, checkpoint_root, run_key, inference_service
    )["version"]
