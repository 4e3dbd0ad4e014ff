"""Prepare data: fetch (Kaggle, gs://, folder or demo data), validate, split → Dataset."""

from typing import NamedTuple

from kfp.dsl import Dataset, Output

from components._base import trainer_component


@trainer_component
def prepare_data(
    config_yaml: str,
    overrides: list,
    data_source: str,
    backbone: str,
    image_size: int,
    stage_names: list,
    checkpoint_root: str,
    run_id: str,
    dataset: Output[Dataset],
) -> NamedTuple("PrepareOutputs", [("run_key", str), ("num_classes", int)]):
    """Fetch the data, validate every image, split it and write the Dataset artifact (the
    images as a few tar shards, split.csv, validation.json and the effective config) that every
    later step reads; its metadata names the shard set (shards_sha256) and the data version.
    run_key names the run's folder under the checkpoint root, recorded for the KFP run run_id."""
    from carclassifier import steps

    manifest = steps.prepare_step(
        config_yaml, overrides, data_source, dataset.path, backbone, image_size, stage_names,
        checkpoint_root, run_id,
    )  # fmt: skip
    dataset.metadata.update({k: v for k, v in manifest.items() if k != "class_names"})
    return (manifest["run_key"], manifest["num_classes"])
