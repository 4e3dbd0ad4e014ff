"""One plain function per Kubeflow pipeline step: strings and paths in, a dict out.

The kfp components in ``components/`` are a few lines each: they pass their artifact paths and
parameters to a function here and log what it returns as UI outputs. Everything a step does is
testable without kfp, and the same library calls run in `carclassifier.local_run`.

The Dataset artifact written by `prepare` is the hand-over between pods::

    <dataset>/shards/images-NNNNN.tar, index.json
                                 the images, packed by `carclassifier.shards`: the tars hold
                                 data/... (the dataset in its own layout: Kaggle, labels.csv,
                                 folders) and test/... (unlabelled test images, when they came
                                 from outside data/)
    <dataset>/config.yaml        the effective config (recipe YAML + overrides + parameters)
    <dataset>/split.csv          the train/validation split every stage uses
    <dataset>/validation.json    the validation report; usable.csv, excluded.csv: its tables
    <dataset>/dataset.json       manifest: run key, class names, test folder, counts

The launcher copies an input artifact object by object (one GET each), so the images travel as a
few shards instead of one object per image; each reading step unpacks them once into a scratch
folder (`images_root`). Why, and what it costs either way: docs/data-handoff.md.

A run's durable outputs live under ``<checkpoint root>/<run key>/`` (local folder or gs://), laid
out like a local run's output folder: ``stages/<stage>/`` (per-epoch checkpoints, best.keras,
metrics, curves), ``export/`` (what the champion pointer names) and ``submission.csv``; the
other outputs are kfp artifacts in the pipeline root. The run key is derived from
the effective config and the data (`make_run_key`), so a retried or preempted pod of the same run
resumes from its stage's checkpoints, and a new run with the same config and data finds its
finished stages instead of training them again. To train afresh with an unchanged recipe, give
the run another name (override ``name=...``).
"""

from __future__ import annotations

import functools
import hashlib
import html
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pandas as pd

from carclassifier import shards, storage
from carclassifier.config import RunConfig, dump_config, load_config, parse_config
from carclassifier.eda import png_data_uri
from carclassifier.errors import ConfigError, DatasetError
from carclassifier.prepare import PreparedData, load_prepared

log = logging.getLogger(__name__)

DATA_DIR = "data"
TEST_DIR = "test"
MANIFEST = "dataset.json"
CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.csv"
SHARD_DIR = "shards"
SCRATCH_ENV = "CARCLASSIFIER_SCRATCH"
"""Where reading steps unpack the image shards (default: the system temp folder)."""
USABLE_FILE = "usable.csv"
EXCLUDED_FILE = "excluded.csv"
KAGGLE_SOURCE = "kaggle"
DEMO_SOURCE = "demo data"
CHAMPION_FILE = "champion.json"
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
        started = time.perf_counter()
        log.info("step %s started", func.__name__)
        result = func(*args, **kwargs)
        log.info("step %s done in %.1f s", func.__name__, time.perf_counter() - started)
        return result

    return wrapper


# --------------------------------------------------------------------------- config and locations


def resolve_config(
    config_yaml: str,
    overrides: list[str] | None = None,
    backbone: str = "",
    image_size: int = 0,
    stage_names: list[str] | tuple[str, ...] | None = None,
) -> RunConfig:
    """The recipe YAML text with ``KEY=VALUE`` overrides applied, then the pipeline's
    ``backbone`` ("" = the recipe's) and ``image_size`` (0 = the recipe's ``input.image_size``;
    stages with their own size keep it). The backbone must be a registered one, and with
    ``stage_names`` (the stages the pipeline graph was compiled for) the overrides may not
    change the stage list: both fail here, before any download or GPU pod."""
    from carclassifier.backbones import get_backbone

    if not isinstance(backbone, str):
        raise ConfigError(f"backbone {backbone!r} must be a string ('' keeps the recipe's)")
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ConfigError(f"image_size {image_size!r} must be a whole number (0: the recipe's)")
    extra = list(overrides or [])
    if backbone:
        extra.append(f"model.backbone={backbone}")
    if image_size:
        extra.append(f"input.image_size={image_size}")
    config = parse_config(config_yaml, extra, "(the pipeline's recipe)")
    get_backbone(config.model.backbone)
    names = [stage.name for stage in config.stages]
    if stage_names is not None and names != list(stage_names):
        raise ConfigError(
            f"the overrides make the stages {names}, but this pipeline was compiled for "
            f"{list(stage_names)}; compile it from the changed recipe (python -m pipelines compile)"
        )
    return config


def run_dir(checkpoint_root: str, run_key: str, config: RunConfig) -> str:
    """Where a run's durable outputs go: ``<checkpoint_root>/<run_key>`` (a local folder or
    gs:// prefix); an empty root means the config's ``output_dir``."""
    return storage.join(checkpoint_root or config.output_dir, run_key)


def make_run_key(config: RunConfig, prepared: PreparedData) -> str:
    """``<config name>-<12 hex>``: a digest of the effective config (without its local paths),
    the split and the size of every usable image. Same recipe and data, same key."""
    neutral = config.model_copy(
        update={
            "output_dir": "",
            "data": config.data.model_copy(update={"root": None, "test_dir": None}),
        }
    )
    digest = hashlib.sha256(dump_config(neutral).encode())
    digest.update(prepared.split_path.read_bytes())
    if prepared.report is not None:
        usable = prepared.report.usable
        for path, size in zip(usable["path"], usable["bytes"], strict=True):
            digest.update(f"{path}\t{size}\n".encode())
    return f"{config.name}-{digest.hexdigest()[:12]}"


def _with_data_root(config: RunConfig, root: Path) -> RunConfig:
    return config.model_copy(update={"data": config.data.model_copy(update={"root": str(root)})})


def _fetch_data(source: str, config: RunConfig, dest: Path) -> str:
    """Fill ``dest`` with the dataset; returns a description of where it came from."""
    from carclassifier.demo_data import demo_dataset_root

    source = source or config.data.root or ""
    if source == KAGGLE_SOURCE:
        from carclassifier.kaggle_data import download_competition

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
def prepare(
    config_yaml: str,
    overrides: list[str],
    data_source: str,
    dataset_dir: str,
    backbone: str = "",
    image_size: int = 0,
    stage_names: list[str] | None = None,
) -> dict[str, Any]:
    """Fetch the data (``data_source``: "" = the config's ``data.root`` or the demo data,
    "kaggle", a gs:// prefix or a folder) into ``dataset_dir/data``, validate it, split it, and
    write the Dataset artifact (see the module docstring).

    ``stage_names``: the stages the pipeline graph was compiled for; overrides that change the
    stage list fail here, before any GPU pod starts. Returns the manifest.
    """
    from carclassifier.prepare import prepare_data

    config = resolve_config(config_yaml, overrides, backbone, image_size, stage_names)
    out = Path(dataset_dir)
    data = out / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    source = _fetch_data(data_source, config, data)
    prepared = prepare_data(_with_data_root(config, data), out, progress=False)
    assert prepared.report is not None  # a fresh prepare always has its report
    prepared.report.usable.to_csv(out / USABLE_FILE, index=False)
    prepared.report.excluded.to_csv(out / EXCLUDED_FILE, index=False)

    demo = source == DEMO_SOURCE
    test_dir = _copy_test_images(config if demo else _with_data_root(config, data), prepared, out)
    folders = [DATA_DIR] + ([TEST_DIR] if (out / TEST_DIR).is_dir() else [])
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
        "test_dir": test_dir,
        "stages": [stage.name for stage in config.stages],
        "shards": len(packed),
        "shards_sha256": shards.index_digest(out / SHARD_DIR),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    log.info("dataset artifact %s: %s", out, json.dumps(manifest))
    return manifest


def _copy_test_images(config: RunConfig, prepared: PreparedData, out: Path) -> str | None:
    """Make the unlabelled test images part of the artifact; their folder relative to ``out``.
    ``config.data.root`` is None only for the demo data (whose test images are the shared
    competition samples, as in `carclassifier.local_run.find_test_images`)."""
    from carclassifier.local_run import find_test_images

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


def images_root(dataset_dir: str) -> Path:
    """The folder that holds the Dataset artifact's ``data/`` and ``test/``: its shards unpacked
    (verified) into ``$CARCLASSIFIER_SCRATCH`` or the temp folder, once per shard set (a folder
    named by `shards.index_digest`, so a second call in the same pod reuses it); an artifact
    written before shards existed is its own root."""
    out = Path(dataset_dir)
    if not (out / SHARD_DIR).is_dir():
        return out
    scratch = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir())
    target = scratch / f"carclassifier-images-{shards.index_digest(out / SHARD_DIR)[:16]}"
    if target.is_dir():
        log.info("images of %s already unpacked in %s", dataset_dir, target)
        return target
    scratch.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=scratch))
    shards.extract_shards(out / SHARD_DIR, partial)
    try:
        partial.rename(target)  # atomic: a folder at target is always complete
    except OSError:  # another process of this pod got there first, with the same bytes
        shutil.rmtree(partial, ignore_errors=True)
    return target


def load_dataset_artifact(dataset_dir: str) -> tuple[RunConfig, PreparedData, dict[str, Any]]:
    """The effective config, the prepared data (its root: the unpacked images, `images_root`)
    and the manifest of a Dataset artifact."""
    out = Path(dataset_dir)
    data = images_root(dataset_dir) / DATA_DIR
    config = _with_data_root(load_config(out / CONFIG_FILE), data)
    prepared = load_prepared(data, out / SPLIT_FILE)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    return config, prepared, manifest


# --------------------------------------------------------------------------- kfp UI outputs


def log_metrics(artifact: Any, values: dict[str, float | int]) -> None:
    """Log ``values`` on a kfp ``Metrics`` artifact and also write them as JSON to its path.

    The file makes the artifact exist as a file: kfp.local keeps metrics only in
    executor_output.json and treats an output artifact without a file as a cache miss, and on
    a cluster the metrics become readable in the pipeline root too.
    """
    for name, value in values.items():
        artifact.log_metric(name, value)
    _write_json(artifact.path, values)


def log_confusion(artifact: Any, class_names: list[str], matrix: list[list[int]]) -> None:
    """`log_confusion_matrix` on a kfp ``ClassificationMetrics`` artifact, plus the JSON file
    (see `log_metrics`)."""
    artifact.log_confusion_matrix(class_names, matrix)
    _write_json(artifact.path, {"class_names": class_names, "confusion_matrix": matrix})


def _write_json(path: str, value: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(value, indent=2), encoding="utf-8")


def _img(path: Path, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{png_data_uri(path)}">'


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(f'{v:.4f}' if isinstance(v, float) else str(v))}</td>"
            for v in row.values()
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, body: str) -> str:
    """A self-contained HTML page (inline CSS, images as data URIs) for a kfp HTML artifact."""
    style = (
        "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1f2430}"
        "table{border-collapse:collapse;margin:.5rem 0 1rem}"
        "td,th{border:1px solid #d0d4dc;padding:.25rem .6rem;text-align:right}"
        "th{background:#f0f2f6}img{max-width:100%;margin:.5rem 0}"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{style}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


# --------------------------------------------------------------------------- steps


@_step
def validate_and_eda(dataset_dir: str, report_html: str) -> dict[str, Any]:
    """Write the EDA report of the prepared data (from its validation tables, no image is
    decoded twice) to ``report_html``; returns counts for the UI."""
    from carclassifier.data import Finding, ValidationReport, load_dataset
    from carclassifier.eda import write_eda_report

    out = Path(dataset_dir)
    config = load_config(out / CONFIG_FILE)
    text = {"id": str, "path": str, "class_name": str, "mode": str, "reason": str}
    validation = json.loads((out / "validation.json").read_text(encoding="utf-8"))
    report = ValidationReport(
        load_dataset(images_root(dataset_dir) / DATA_DIR),
        pd.read_csv(out / USABLE_FILE, dtype=text, keep_default_na=False),
        pd.read_csv(out / EXCLUDED_FILE, dtype=text, keep_default_na=False),
        [Finding(**f) for f in validation["findings"]],
    )
    with tempfile.TemporaryDirectory() as tmp:
        page = write_eda_report(
            report, tmp, config.augment, config.input.image_size, seed=config.data.seed
        )
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


def _stage_html(title: str, metrics: dict[str, Any], out: str, stage: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for prefix, what in (("Train_Val_acc", "accuracy"), ("Train_Val_loss", "loss")):
            name = f"{prefix}_{stage}.png"
            uri = storage.join(out, name)
            if storage.exists(uri):
                images.append(_img(storage.get_file(uri, Path(tmp) / name), what))
        history_text = storage.read_text(storage.join(out, "history.csv"))
    history = ""
    if history_text:
        history = _table(pd.read_csv(io.StringIO(history_text)).to_dict(orient="records"))
    shown = {k: v for k, v in metrics.items() if k != "description"}
    return html_page(
        title,
        f"{_table([shown])}{''.join(images)}<h2>History</h2>{history}"
        f"<p>Outputs: <code>{html.escape(out)}</code></p>",
    )


@_step
def train_stage(
    dataset_dir: str,
    stage_name: str,
    checkpoint_root: str,
    run_key: str,
    init_model: str | None,
    model_out: str,
    curves_html: str,
) -> dict[str, Any]:
    """Train (or resume, or find finished) stage ``stage_name`` of the run into
    ``<run dir>/stages/<stage>``, starting from ``init_model`` (a ``.keras`` file; None: a fresh
    model). Copies the best model to ``model_out`` and writes the curves page to
    ``curves_html``. Returns ``metrics`` (for the UI), ``model`` (Model metadata) and the
    stage's full ``summary``."""
    from carclassifier.stages import run_stage, stage_dir

    config, prepared, _ = load_dataset_artifact(dataset_dir)
    stage = config.stage(stage_name)
    out = stage_dir(run_dir(checkpoint_root, run_key, config), stage_name)
    result = run_stage(config, stage_name, prepared, out, init_model)
    storage.get_file(result.best_model, model_out)
    m = result.metrics
    title = f"{stage.name}: {stage.description}" if stage.description else stage.name
    Path(curves_html).parent.mkdir(parents=True, exist_ok=True)
    Path(curves_html).write_text(_stage_html(title, m, out, stage.name), encoding="utf-8")
    metrics = {
        "val_accuracy": m.get("best_val_accuracy"),
        "val_loss": m.get("best_val_loss"),
        "epochs": m.get("epochs_run"),
        "best_epoch": m.get("best_epoch"),
        "minutes": m.get("minutes"),
        "image_size": m.get("image_size"),
    }
    return {
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        "model": {
            "stage": stage.name,
            "uri": result.best_model,
            "val_accuracy": m.get("best_val_accuracy"),
            "image_size": m.get("image_size"),
            "backbone": config.model.backbone,
            "framework": "keras",
            "found_finished": result.skipped,
        },
        "summary": m,
    }


def _confusion(path: Path) -> list[list[int]]:
    return pd.read_csv(path, index_col=0).to_numpy().astype(int).tolist()


@_step
def evaluate(dataset_dir: str, model_path: str, out_dir: str, report_html: str) -> dict[str, Any]:
    """Evaluate the model on the validation split, plain and with TTA, into ``out_dir``
    (`carclassifier.evaluate.evaluate_model`'s files, the robustness report included) and
    ``report_html``. Returns ``metrics`` (the robustness metrics among them),
    ``class_names``, ``confusion`` and ``confusion_tta`` (rows true, columns predicted)."""
    from carclassifier.evaluate import evaluate_model
    from carclassifier.stages import load_model

    config, prepared, _ = load_dataset_artifact(dataset_dir)
    classes = prepared.dataset.class_names
    result = evaluate_model(
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
        html_page(
            "Evaluation on the validation split",
            _table([{k: v for k, v in metrics.items() if not k.startswith("robust_")}])
            + _img(out / "confusion_matrix.png", "confusion matrices")
            + "<h2>Per class (plain)</h2>" + _table(per_class) + robustness,
        ),
        encoding="utf-8",
    )  # fmt: skip
    return {
        "metrics": metrics,
        "class_names": classes,
        "confusion": _confusion(out / "confusion_matrix.csv"),
        "confusion_tta": _confusion(out / "confusion_matrix_tta.csv"),
    }


@_step
def predict(
    dataset_dir: str, model_path: str, submission_csv: str, checkpoint_root: str, run_key: str
) -> dict[str, Any]:
    """Write the submission CSV (``Id,Category``) for the dataset's test images to
    ``submission_csv`` and ``<run dir>/submission.csv``; without test images a header-only
    file. Returns ``rows`` and ``uri``."""
    from carclassifier.predict import predict_folder
    from carclassifier.stages import load_model

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
    uri = storage.join(run_dir(checkpoint_root, run_key, config), "submission.csv")
    storage.put_file(target, uri)
    return {"rows": rows, "uri": uri}


@_step
def export(
    dataset_dir: str,
    model_path: str,
    evaluation_dir: str,
    export_dir: str,
    checkpoint_root: str,
    run_key: str,
) -> dict[str, Any]:
    """Export the model (``model.keras``, ``saved_model/``, ``labels.json`` with the evaluation
    in its metadata) to ``export_dir`` and copy it to ``<run dir>/export``, the durable location
    the champion pointer names. Returns ``export_uri`` and the ``metadata``."""
    from carclassifier.export import export_model
    from carclassifier.stages import load_model

    config, prepared, manifest = load_dataset_artifact(dataset_dir)
    evaluation = json.loads((Path(evaluation_dir) / "evaluation.json").read_text())
    metadata = {
        "backbone": config.model.backbone,
        "run": config.name,
        "run_key": run_key,
        "stage": config.stages[-1].name,
        "val_accuracy": evaluation["accuracy"],
        "val_accuracy_tta": evaluation["tta"]["accuracy"],
    }
    export_model(load_model(model_path), prepared.dataset.class_names, export_dir, metadata)
    uri = storage.join(run_dir(checkpoint_root, run_key, config), "export")
    storage.upload_tree(export_dir, uri)
    log.info("export copied to %s", uri)
    return {"export_uri": uri, "metadata": metadata}


@_step
def gate(
    dataset_dir: str,
    export_uri: str,
    champion_pointer: str,
    min_improvement: float,
    checkpoint_root: str,
    decision_md: str,
) -> dict[str, Any]:
    """Champion/challenger on this run's validation split
    (`carclassifier.gate.champion_challenger`); ``champion_pointer`` "" means
    ``<checkpoint_root>/champion.json``. When the pointer already names ``export_uri`` (a
    retried gate, or a rerun of the same recipe and data, which exports to the same place)
    nothing is compared or rewritten. Writes the decision as Markdown to ``decision_md`` and
    returns it (``promoted``, accuracies, ``reason``, ``pointer``, UI ``metrics``)."""
    from carclassifier.gate import champion_challenger

    config, prepared, _ = load_dataset_artifact(dataset_dir)
    pointer = champion_pointer or storage.join(checkpoint_root or config.output_dir, CHAMPION_FILE)
    text = storage.read_text(pointer)
    current = json.loads(text) if text else {}
    if current.get("export") == export_uri:
        accuracy = current.get("val_accuracy")
        decision: dict[str, Any] = {
            "challenger": export_uri, "challenger_accuracy": accuracy,
            "champion": export_uri, "champion_accuracy": accuracy,
            "promoted": False, "reason": "this export is already the champion",
        }  # fmt: skip
        log.info("gate: %s is already the champion", export_uri)
    else:
        decision = champion_challenger(
            export_uri, prepared.dataset.root, prepared.subset("val"),
            prepared.dataset.class_names, pointer, min_improvement,
            batch_size=config.input.batch_size,
        )  # fmt: skip
    decision["pointer"] = pointer
    decision["metrics"] = {"promoted": int(decision["promoted"])} | {
        k: decision[k]
        for k in ("challenger_accuracy", "champion_accuracy")
        if decision[k] is not None
    }

    def acc(value: float | None) -> str:
        return "–" if value is None else f"{value:.4f}"

    verdict = "**promoted**: the challenger is the new champion" if decision["promoted"] else (
        "**kept** the current champion"
    )  # fmt: skip
    Path(decision_md).parent.mkdir(parents=True, exist_ok=True)
    Path(decision_md).write_text(
        f"# Champion/challenger gate\n\n{verdict} ({decision['reason']}).\n\n"
        f"| | export | validation accuracy |\n|---|---|---:|\n"
        f"| challenger | `{decision['challenger']}` | {acc(decision['challenger_accuracy'])} |\n"
        f"| champion | `{decision['champion'] or '–'}` | {acc(decision['champion_accuracy'])} |\n\n"
        f"Pointer: `{pointer}`; required improvement > {min_improvement:+.4f}.\n",
        encoding="utf-8",
    )
    return decision
