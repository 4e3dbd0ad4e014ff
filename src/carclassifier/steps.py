"""One plain function per Kubeflow pipeline step (``<name>_step``): strings and paths in, a dict
out.

The kfp components in ``components/`` are a few lines each: they pass their artifact paths and
parameters to a function here and log what it returns as UI outputs (`carclassifier.reports`).
Everything a step does is testable without kfp, and the same library calls run in
`carclassifier.local_run`. Where the steps keep their files (the Dataset artifact, the run
folder): `carclassifier.artifacts`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pandas as pd

from carclassifier import reports, shards, storage
from carclassifier.artifacts import (
    CHAMPION_FILE,
    CONFIG_FILE,
    DATA_DIR,
    DEPLOY_RECORD,
    EXCLUDED_FILE,
    EXPORT_DIR,
    MANIFEST,
    SHARD_DIR,
    SPLIT_FILE,
    SUBMISSION_FILE,
    TEST_DIR,
    USABLE_FILE,
    VALIDATION_FILE,
    images_root,
    load_dataset_artifact,
    make_run_key,
    run_dir,
    with_data_root,
)
from carclassifier.budget import check_budget
from carclassifier.config import PRIMARY_SOURCE, RunConfig, load_config, resolve_config
from carclassifier.data import Finding, ValidationReport, load_dataset, read_split
from carclassifier.demo_data import demo_dataset_root
from carclassifier.errors import DatasetError
from carclassifier.kaggle_data import download_competition
from carclassifier.predict import predict_folder
from carclassifier.prepare import PreparedData, find_test_images, validate_and_split

# The modules that import TensorFlow or albumentations (eda, stages, model, evaluate, export,
# augment, robustness, gate, deploy) are imported inside the steps that use them: the compiler
# imports this module (GCS_KEY_FILE_ENV), and each step's pod loads only what its step needs.
from carclassifier.run_summary import gpu_minutes, run_record
from carclassifier.sources import EXTRA_DIR, SOURCES_FILE

log = logging.getLogger(__name__)

KAGGLE_SOURCE = "kaggle"
DEMO_SOURCE = "demo data"
GCS_KEY_FILE_ENV = "CARCLASSIFIER_GCS_KEY_FILE"
"""Set by the pipeline to where a service-account key secret may be mounted: used as
``GOOGLE_APPLICATION_CREDENTIALS`` when the file is there and no credentials are set already;
without it the Google client uses Workload Identity / the node's credentials."""

P = ParamSpec("P")
R = TypeVar("R")


def _step(func: Callable[P, R]) -> Callable[P, R]:
    """Log the step's start and duration; use a mounted GCS key (`GCS_KEY_FILE_ENV`) if any."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if not logging.getLogger().handlers:
            logging.basicConfig(
                level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
        key = os.environ.get(GCS_KEY_FILE_ENV)
        if key and Path(key).is_file() and not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = key
        name = func.__name__.removesuffix("_step")
        started = time.perf_counter()
        log.info("step %s started", name)
        result = func(*args, **kwargs)
        log.info("step %s done in %.1f s", name, time.perf_counter() - started)
        return result

    return wrapper


@dataclass(frozen=True)
class StageStepResult:
    """What `train_stage_step` gives its component."""

    metrics: dict[str, float | int]
    """For the kfp Metrics: best val accuracy/loss, epochs, best epoch, minutes, image size."""
    model: dict[str, Any]
    """The Model artifact's metadata: stage, uri, val_accuracy, image_size, backbone, ..."""
    summary: dict[str, Any]
    """The stage's full metrics (`carclassifier.stages.run_stage`'s ``metrics.json``)."""


@dataclass(frozen=True)
class EvaluateStepResult:
    """What `evaluate_step` gives its component."""

    metrics: dict[str, float | int]
    """For the kfp Metrics: accuracy (plain, TTA), gain, loss, macro F1, views, images."""
    class_names: list[str]
    confusion: list[list[int]]
    """Rows true class, columns predicted (plain)."""
    confusion_tta: list[list[int]]
    """The same with TTA."""


@dataclass(frozen=True)
class ExportStepResult:
    """What `export_step` gives its component."""

    export_uri: str
    """The durable copy, ``<run dir>/export``."""
    metadata: dict[str, Any]
    """The export's ``labels.json`` metadata (`carclassifier.export.export_metadata`)."""


# --------------------------------------------------------------------------- prepare


def _fetch_data(source: str, config: RunConfig, dest: Path) -> str:
    """Fill ``dest`` with the dataset; returns a description of where it came from."""
    source = source or config.data.root or ""
    if source == KAGGLE_SOURCE:
        download_competition(dest)
        return "kaggle"
    if not source:
        with tempfile.TemporaryDirectory() as tmp:
            storage.download_tree(str(demo_dataset_root(tmp)), dest)
        return DEMO_SOURCE
    if not storage.is_gcs_uri(source) and not Path(source).is_dir():
        raise DatasetError(
            f"data source {source!r} is neither 'kaggle', a gs:// prefix nor an existing folder"
        )
    storage.download_tree(source, dest)
    return source


@_step
def prepare_step(
    config_yaml: str,
    overrides: list[str],
    data_source: str,
    dataset_dir: str,
    backbone: str = "",
    image_size: int = 0,
    stage_names: list[str] | None = None,
    checkpoint_root: str = "",
    run_id: str = "",
) -> dict[str, Any]:
    """Fetch the data (``data_source``: "" = the config's ``data.root`` or the demo data,
    "kaggle", a gs:// prefix or a folder) into ``dataset_dir/data``, validate it, split it, and
    write the Dataset artifact (see the module docstring).

    ``stage_names``: the stages the pipeline graph was compiled for; overrides that change the
    stage list fail here, before any GPU pod starts. With ``checkpoint_root``, the manifest is
    also written to the run folder and, with the KFP ``run_id``, the run folder is recorded
    where the run's exit task finds it (`carclassifier.run_summary.run_record`). Returns the
    manifest.
    """
    config = resolve_config(config_yaml, overrides, backbone, image_size, stage_names)
    out = Path(dataset_dir)
    data = out / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    source = _fetch_data(data_source, config, data)
    config = _fetch_extra_sources(config, out / EXTRA_DIR)
    prepared = validate_and_split(with_data_root(config, data), out, progress=False)
    assert prepared.report is not None  # a fresh prepare always has its report
    prepared.report.usable.to_csv(out / USABLE_FILE, index=False)
    prepared.report.excluded.to_csv(out / EXCLUDED_FILE, index=False)

    demo = source == DEMO_SOURCE
    test_dir = _copy_test_images(config if demo else with_data_root(config, data), prepared, out)
    folders = [DATA_DIR] + [name for name in (EXTRA_DIR, TEST_DIR) if (out / name).is_dir()]
    packed = shards.write_shards(out, folders, out / SHARD_DIR)
    for folder in folders:
        shutil.rmtree(out / folder)  # the shards hold them; one object per image is what we avoid
    counts = prepared.split["subset"].value_counts()
    manifest = {
        "run_key": make_run_key(config, prepared),
        "source": source,
        "layout": prepared.dataset.layout,
        "class_names": prepared.dataset.class_names,
        "num_classes": len(prepared.dataset.class_names),
        "train_images": int(counts.get("train", 0)),
        "val_images": int(counts.get("val", 0)),
        "excluded_images": len(prepared.report.excluded),
        "leaked_images": len({leak.train for leak in prepared.leaks}),
        "data_version": prepared.data_version,
        "extra_sources": [] if prepared.sources is None else _source_rows(prepared.sources),
        "test_dir": test_dir,
        "stages": [stage.name for stage in config.stages],
        "shards": len(packed),
        "shards_sha256": shards.index_digest(out / SHARD_DIR),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    log.info("dataset artifact %s: %s", out, json.dumps(manifest))
    if checkpoint_root:
        folder = run_dir(checkpoint_root, manifest["run_key"], config)
        storage.write_text(storage.join(folder, MANIFEST), json.dumps(manifest, indent=2))
        if run_id:
            record = {"run_dir": folder, "run_key": manifest["run_key"]}
            storage.write_text(run_record(checkpoint_root, run_id), json.dumps(record))
    return manifest


def _fetch_extra_sources(config: RunConfig, dest: Path) -> RunConfig:
    """Copy every extra source (a folder or gs:// prefix) into ``dest/<name>``, so the Dataset
    artifact carries their photos (split.csv reaches them as ``../extra/<name>/...`` from
    ``data/``); returns ``config`` with their roots there."""
    moved = []
    for extra in config.data.extra_sources:
        if not storage.is_gcs_uri(extra.root) and not Path(extra.root).is_dir():
            raise DatasetError(
                f"data.extra_sources {extra.name!r}: root {extra.root} is neither a gs:// "
                "prefix nor an existing folder; fix its root"
            )
        storage.download_tree(extra.root, dest / extra.name)
        moved.append(extra.model_copy(update={"root": str(dest / extra.name)}))
    if not moved:
        return config
    return config.model_copy(
        update={"data": config.data.model_copy(update={"extra_sources": moved})}
    )


def _source_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The manifest's ``extra_sources``: sources.csv's rows of the extra sources."""
    rows = table[table["source"] != PRIMARY_SOURCE].to_dict(orient="records")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in rows]


def _copy_test_images(config: RunConfig, prepared: PreparedData, out: Path) -> str | None:
    """Make the unlabelled test images part of the artifact; their folder relative to ``out``.
    ``config.data.root`` is None only for the demo data (whose test images are the shared
    competition samples, as in `carclassifier.prepare.find_test_images`)."""
    if config.data.test_dir:  # may be gs://, so not through find_test_images
        storage.download_tree(config.data.test_dir, out / TEST_DIR)
        return TEST_DIR
    found = find_test_images(config, prepared)  # the dataset's own test folder, or demo samples
    if found is None:
        return None
    found = found.resolve()
    if found.is_relative_to(out.resolve()):
        return found.relative_to(out.resolve()).as_posix()
    storage.download_tree(str(found), out / TEST_DIR)
    return TEST_DIR


# --------------------------------------------------------------------------- reading steps


@_step
def eda_step(dataset_dir: str, report_html: str) -> dict[str, Any]:
    """Write the EDA report of the prepared data (from its validation tables, no image is
    decoded twice) to ``report_html``; returns counts for the UI."""
    from carclassifier.eda import write_eda_report

    out = Path(dataset_dir)
    config = load_config(out / CONFIG_FILE)
    text = {"id": str, "path": str, "class_name": str, "mode": str, "reason": str}
    validation = json.loads((out / VALIDATION_FILE).read_text(encoding="utf-8"))
    report = ValidationReport(
        load_dataset(images_root(dataset_dir) / DATA_DIR),
        pd.read_csv(out / USABLE_FILE, dtype=text, keep_default_na=False),
        pd.read_csv(out / EXCLUDED_FILE, dtype=text, keep_default_na=False),
        [Finding(**f) for f in validation["findings"]],
    )
    sources = out / SOURCES_FILE
    with tempfile.TemporaryDirectory() as tmp:
        page = write_eda_report(
            report, tmp, config.augment, config.input.image_size, seed=config.data.seed,
            sources=pd.read_csv(sources, keep_default_na=False) if sources.is_file() else None,
            split=read_split(out / SPLIT_FILE),
        )  # fmt: skip
        Path(report_html).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(page, report_html)
    counts = [n for n in report.class_counts.values() if n > 0]
    return {
        "images": len(report.usable),
        "excluded": len(report.excluded),
        "classes": len(report.dataset.class_names),
        "warnings": sum(f.severity == "warning" for f in report.findings),
        "imbalance": round(max(counts) / min(counts), 3) if counts else 0.0,
    }


@_step
def train_stage_step(
    dataset_dir: str,
    stage_name: str,
    checkpoint_root: str,
    run_key: str,
    init_model: str | None,
    model_out: str,
    curves_html: str,
    gpu_type: str = "",
    gpu_count: str = "",
) -> StageStepResult:
    """Train (or resume, or find finished) stage ``stage_name`` of the run into
    ``<run dir>/stages/<stage>``, starting from ``init_model`` (a ``.keras`` file; None: a fresh
    model). Copies the best model to ``model_out`` and writes the curves page to
    ``curves_html``. Returns a `StageStepResult` (its ``metrics`` with ``gpu_hours``, the
    stage's minutes x ``gpu_count``, the GPUs its task requested)."""
    from carclassifier.stages import run_stage, stage_dir

    config, prepared, _ = load_dataset_artifact(dataset_dir)
    stage = config.stage(stage_name)
    folder = run_dir(checkpoint_root, run_key, config)
    out = stage_dir(folder, stage_name)
    if not storage.exists(storage.join(out, "metrics.json")):  # a finished stage costs nothing
        gpus = int(gpu_count) if gpu_count.isdigit() else 1
        check_budget(folder, stage_name, gpus, config.train.gpu_hours_budget)
    result = run_stage(config, stage_name, prepared, out, init_model)
    storage.get_file(result.best_model, model_out)
    m = result.metrics
    title = f"{stage.name}: {stage.description}" if stage.description else stage.name
    Path(curves_html).parent.mkdir(parents=True, exist_ok=True)
    Path(curves_html).write_text(reports.stage_page(title, m, out, stage.name), encoding="utf-8")
    metrics = {
        "val_accuracy": m.get("best_val_accuracy"),
        "val_loss": m.get("best_val_loss"),
        "epochs": m.get("epochs_run"),
        "best_epoch": m.get("best_epoch"),
        "minutes": m.get("minutes"),
        "image_size": m.get("image_size"),
        "attempts": m.get("attempts"),
        "preemptions": m.get("preemptions"),
        "minutes_lost_to_preemption": m.get("minutes_lost_to_preemption"),
        "minutes_checkpointing": m.get("minutes_checkpointing"),
        "checkpoint_interval_minutes": m.get("checkpoint_interval_minutes"),
        "checkpoint_seconds": m.get("checkpoint_seconds"),
        "mtbf_minutes": m.get("mtbf_minutes"),
        "gpus": int(gpu_count) if gpu_count.isdigit() else None,
        "gpu_hours": round(gpu_minutes(m) / 60 * int(gpu_count), 4)
        if gpu_count.isdigit()
        else None,
    }
    return StageStepResult(
        metrics={k: v for k, v in metrics.items() if v is not None},
        model={
            "stage": stage.name,
            "uri": result.best_model,
            "val_accuracy": m.get("best_val_accuracy"),
            "image_size": m.get("image_size"),
            "backbone": config.model.backbone,
            "framework": "keras",
            "found_finished": result.skipped,
            "accelerator": gpu_type or None,
        },
        summary=m,
    )


def _confusion(path: Path) -> list[list[int]]:
    return pd.read_csv(path, index_col=0).to_numpy().astype(int).tolist()


@_step
def evaluate_step(
    dataset_dir: str,
    model_path: str,
    out_dir: str,
    report_html: str,
    checkpoint_root: str = "",
    run_key: str = "",
) -> EvaluateStepResult:
    """Evaluate the model on the validation split, plain and with TTA, into ``out_dir``
    (`carclassifier.evaluate.evaluate_classifier`'s files, the robustness report included) and
    ``report_html``. Returns an `EvaluateStepResult` (the robustness metrics among its
    ``metrics``); with ``checkpoint_root`` and ``run_key`` the metrics also go to
    ``<run dir>/evaluation/``."""
    from carclassifier.evaluate import evaluate_classifier
    from carclassifier.model import load_model

    config, prepared, _ = load_dataset_artifact(dataset_dir)
    classes = prepared.dataset.class_names
    result = evaluate_classifier(
        load_model(model_path), prepared.dataset.root, prepared.subset("val"), classes, config,
        out_dir, progress=False,
    )  # fmt: skip
    out = Path(out_dir)
    per_class = [
        {"class": p["class"], "precision": p["precision"], "recall": p["recall"], "f1": p["f1"],
         "support": p["support"]}
        for p in result["per_class"]
    ]  # fmt: skip
    metrics = {
        "accuracy": result["accuracy"],
        "accuracy_tta": result["tta"]["accuracy"],
        "tta_gain": result["tta_gain"],
        "loss": result["loss"],
        "macro_f1": result["macro_f1"],
        "tta_views": result["tta"]["views"],
        "images": result["num_images"],
    }
    robustness = ""
    if "robustness" in result:
        from carclassifier.robustness import robustness_html

        metrics.update(result["robustness"]["metrics"])
        robustness = robustness_html(result["robustness"], out)
    Path(report_html).parent.mkdir(parents=True, exist_ok=True)
    Path(report_html).write_text(
        reports.evaluation_page(metrics, per_class, out / "confusion_matrix.png", robustness),
        encoding="utf-8",
    )
    if checkpoint_root and run_key:
        folder = run_dir(checkpoint_root, run_key, config)
        storage.write_text(storage.join(folder, "evaluation", "metrics.json"), json.dumps(metrics))
    return EvaluateStepResult(
        metrics=metrics,
        class_names=classes,
        confusion=_confusion(out / "confusion_matrix.csv"),
        confusion_tta=_confusion(out / "confusion_matrix_tta.csv"),
    )


@_step
def predict_step(
    dataset_dir: str, model_path: str, submission_csv: str, checkpoint_root: str, run_key: str
) -> dict[str, Any]:
    """Write the submission CSV (``Id,Category``) for the dataset's test images to
    ``submission_csv`` and ``<run dir>/submission.csv``; without test images a header-only
    file. Returns ``rows`` and ``uri``."""
    from carclassifier.model import load_model

    config, prepared, manifest = load_dataset_artifact(dataset_dir)
    target = Path(submission_csv)
    target.parent.mkdir(parents=True, exist_ok=True)
    if manifest["test_dir"] is None:
        log.warning("the dataset has no test images: writing an empty submission")
        target.write_text("Id,Category\n", encoding="utf-8")
        rows = 0
    else:
        frame = predict_folder(
            load_model(model_path), images_root(dataset_dir) / manifest["test_dir"],
            prepared.dataset.class_names, target,
            sample_submission=prepared.dataset.sample_submission,
            batch_size=config.input.batch_size, progress=False,
        )  # fmt: skip
        rows = len(frame)
    uri = storage.join(run_dir(checkpoint_root, run_key, config), SUBMISSION_FILE)
    storage.put_file(target, uri)
    return {"rows": rows, "uri": uri}


@_step
def export_step(
    dataset_dir: str,
    model_path: str,
    evaluation_dir: str,
    export_dir: str,
    checkpoint_root: str,
    run_key: str,
) -> ExportStepResult:
    """Export the model (``model.keras``, ``saved_model/``, ``labels.json`` with the evaluation
    in its metadata) to ``export_dir`` and copy it to ``<run dir>/export``, the durable location
    the champion pointer names. Returns an `ExportStepResult`."""
    from carclassifier.augment import TtaSettings
    from carclassifier.export import export_metadata, write_export
    from carclassifier.model import load_model

    config, prepared, manifest = load_dataset_artifact(dataset_dir)
    evaluation = json.loads((Path(evaluation_dir) / "evaluation.json").read_text())
    metadata = export_metadata(config, evaluation, run_key, manifest.get("data_version"))
    write_export(
        load_model(model_path), prepared.dataset.class_names, export_dir, metadata,
        tta=TtaSettings.from_config(config),
    )  # fmt: skip
    uri = storage.join(run_dir(checkpoint_root, run_key, config), EXPORT_DIR)
    storage.upload_tree(export_dir, uri)
    log.info("export copied to %s", uri)
    return ExportStepResult(export_uri=uri, metadata=metadata)


@_step
def gate_step(
    dataset_dir: str,
    export_uri: str,
    champion_pointer: str,
    min_improvement: float,
    checkpoint_root: str,
    report_html: str,
    run_key: str = "",
) -> dict[str, Any]:
    """Champion/challenger on this run's validation split
    (`carclassifier.gate.champion_challenger`); ``champion_pointer`` "" means
    ``<checkpoint_root>/champion.json``. When the pointer already names ``export_uri`` (a
    retried gate, or a rerun of the same recipe and data, which exports to the same place)
    nothing is compared or rewritten, and the answer is "promoted" only when this run's own
    gate moved the pointer there (its ``run_key`` in it) and the run has not deployed yet (no
    ``deploy.json``): a gate killed after its pointer write, then retried, still lets the
    deploy step run; a rerun after a deployment keeps the champion. Writes the decision as an
    HTML page to ``report_html`` (and, with ``run_key``, as ``gate.json`` in the run folder)
    and returns it (``promoted``, accuracies, ``reason``, ``pointer``, UI ``metrics``)."""
    from carclassifier.gate import champion_challenger

    config, prepared, _ = load_dataset_artifact(dataset_dir)
    pointer = champion_pointer or storage.join(checkpoint_root or config.output_dir, CHAMPION_FILE)
    text = storage.read_text(pointer)
    current = json.loads(text) if text else {}
    val = prepared.subset("val")
    disagreements: list[tuple[Path, int, int, int]] = []
    folder = run_dir(checkpoint_root, run_key, config) if run_key else ""
    if current.get("export") == export_uri:
        accuracy = current.get("val_accuracy")
        ours = bool(run_key) and current.get("run_key") == run_key
        undeployed = ours and not storage.exists(storage.join(folder, DEPLOY_RECORD))
        decision: dict[str, Any] = {
            "challenger": export_uri, "challenger_accuracy": accuracy,
            "champion": export_uri, "champion_accuracy": accuracy,
            "promoted": undeployed,
            "reason": "promoted by an earlier attempt of this run, not deployed yet"
            if undeployed else "this export is already the champion",
        }  # fmt: skip
        log.info("gate: %s is already the champion (%s)", export_uri, decision["reason"])
    else:
        result = champion_challenger(
            export_uri, prepared.dataset.root, val, prepared.dataset.class_names, pointer,
            min_improvement, batch_size=config.input.batch_size,
            significance=config.gate.significance, max_recall_drop=config.gate.max_recall_drop,
            formats_tolerance=config.gate.formats_tolerance, promoted_by=run_key,
        )  # fmt: skip
        decision = result.as_dict()
        if result.champion is not None:
            pairs = zip(result.challenger.predicted, result.champion.predicted, strict=True)
            disagreements = [
                (Path(prepared.dataset.root) / val["path"][i], int(val["label"][i]), new, old)
                for i, (new, old) in enumerate(pairs)
                if new != old
            ]
    decision["pointer"] = pointer
    decision["metrics"] = {"promoted": int(decision["promoted"])} | {
        k: decision[k]
        for k in ("challenger_accuracy", "champion_accuracy", "p_value")
        if decision.get(k) is not None
    }
    Path(report_html).parent.mkdir(parents=True, exist_ok=True)
    Path(report_html).write_text(
        reports.gate_page(
            decision, pointer, min_improvement, prepared.dataset.class_names, disagreements
        ),
        encoding="utf-8",
    )
    if run_key:
        storage.write_text(storage.join(folder, "gate.json"), json.dumps(decision, indent=2))
    return decision


@_step
def deploy_step(
    dataset_dir: str,
    export_uri: str,
    serving_root: str,
    checkpoint_root: str,
    run_key: str,
    inference_service: str = "",
) -> dict[str, Any]:
    """Publish the promoted export as the next version under ``serving_root`` ("" =
    ``<checkpoint_root>/serving``) and make it live (`carclassifier.deploy.publish`), with the
    first validation photo as the version's check photo; records ``deploy.json`` in the run
    folder. A retried task whose export is already the live version publishes nothing again.
    With ``inference_service`` (``namespace/name`` or ``name``) the KServe InferenceService
    serving that root is rolled onto the new version (`carclassifier.kubeflow.kserve.roll_out`:
    KServe copies the model into a pod only when it starts). Returns ``version``, ``uri``,
    ``live``, ``serving_root`` and ``rolled_out`` (the InferenceService, or None)."""
    from carclassifier.deploy import SERVING_DIR, pointer_version, publish
    from carclassifier.kubeflow.kserve import roll_out

    config, prepared, manifest = load_dataset_artifact(dataset_dir)
    root = serving_root or storage.join(checkpoint_root or config.output_dir, SERVING_DIR)
    record = storage.join(run_dir(checkpoint_root, run_key, config), DEPLOY_RECORD)
    done_before = json.loads(storage.read_text(record) or "null")
    if (
        done_before
        and done_before.get("export") == export_uri
        and (pointer_version(root) or (None,))[0] == done_before["version"]
    ):
        result = done_before
        log.info("deploy: %s is already live as version %d", export_uri, result["version"])
    else:
        val = prepared.subset("val")
        photo = Path(prepared.dataset.root) / val["path"][0] if len(val) else None
        done = publish(
            export_uri, root, photo, export=export_uri, run_key=run_key,
            data_version=manifest.get("data_version"),
        )  # fmt: skip
        result = {
            "version": done.version, "uri": done.uri, "live": done.live, "serving_root": root,
            "export": export_uri, "rolled_out": None,
        }  # fmt: skip
        storage.write_text(record, json.dumps(result, indent=2))
    if inference_service and result["live"]:
        result["rolled_out"] = roll_out(inference_service, result["version"])
        log.info("deploy: rolling %s onto version %d", result["rolled_out"], result["version"])
        storage.write_text(record, json.dumps(result, indent=2))
    return result
