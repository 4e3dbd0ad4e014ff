"""The whole recipe on one machine: prepare → EDA → every stage → evaluate (TTA) → export →
predict. What `make run-local` runs; the Kubeflow pipeline runs the same library calls as
separate pods."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from carclassifier.config import RunConfig
from carclassifier.demo_data import REAL_SAMPLES, shared_dir
from carclassifier.prepare import PreparedData, prepare_data

log = logging.getLogger(__name__)


def find_test_images(config: RunConfig, prepared: PreparedData) -> Path | None:
    """Unlabelled images to predict: ``data.test_dir``, the dataset's own test folder, or, for
    the demo data, the competition samples in ``../shared/data/sf-competition-samples``."""
    if config.data.test_dir:
        return Path(config.data.test_dir)
    if prepared.dataset.test_dir is not None:
        return prepared.dataset.test_dir
    shared = shared_dir()
    if config.data.root is None and shared is not None and (shared / REAL_SAMPLES).is_dir():
        return shared / REAL_SAMPLES
    return None


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the stages: epochs, best validation accuracy, minutes."""
    lines = [
        "| stage | description | size | epochs | best val accuracy | minutes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['description']} | {r['image_size']} | {r['epochs_run']} | "
            f"{r['best_val_accuracy']:.4f} | {r['minutes']:.1f} |"
        )
    return "\n".join(lines)


def _robustness_line(metrics: dict[str, Any] | None) -> str:
    """The robustness report in one line of summary.md (empty when it is disabled)."""
    if not metrics:
        return ""
    shifted = {
        k: v for k, v in metrics.items() if k.endswith("_accuracy") and k != "robust_clean_accuracy"
    }
    worst = min(shifted, key=shifted.__getitem__)
    return (
        f"\nrobustness ({metrics['robust_photos']} photos, evaluation/robustness.html): clean "
        f"{metrics['robust_clean_accuracy']:.4f}, worst {worst} {shifted[worst]:.4f}; "
        f"ECE {metrics['ece']:.4f} (TTA {metrics['ece_tta']:.4f})\n"
    )


def run_local(config: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Run the recipe end to end under ``config.output_dir``; returns the summary."""
    from carclassifier.eda import write_eda_report
    from carclassifier.evaluate import evaluate_model
    from carclassifier.export import export_model
    from carclassifier.predict import predict_folder
    from carclassifier.stages import load_model, train_recipe

    started = time.perf_counter()
    out = Path(config.output_dir)
    log.info("run-local: %d stages, outputs in %s", len(config.stages), out.resolve())
    prepared = prepare_data(config, out, progress=progress)
    eda = write_eda_report(
        prepared.report, out / "eda", config.augment, config.input.image_size, seed=config.data.seed
    )
    log.info("EDA report: %s", eda)
    results = train_recipe(config, prepared, str(out))
    final = results[-1]
    model = load_model(final.best_model)
    classes = prepared.dataset.class_names
    evaluation = evaluate_model(
        model,
        prepared.dataset.root,
        prepared.subset("val"),
        classes,
        config,
        out / "evaluation",
        progress=progress,
    )
    export_dir = export_model(
        model,
        classes,
        out / "export",
        metadata={
            "backbone": config.model.backbone,
            "run": config.name,
            "stage": final.name,
            "val_accuracy": evaluation["accuracy"],
            "val_accuracy_tta": evaluation["tta"]["accuracy"],
        },
    )
    submission = None
    test_dir = find_test_images(config, prepared)
    if test_dir is not None:
        submission = out / "submission.csv"
        predict_folder(
            model,
            test_dir,
            classes,
            submission,
            sample_submission=prepared.dataset.sample_submission,
            tta=None,
            batch_size=config.input.batch_size,
            progress=progress,
        )
    rows = [r.metrics for r in results]
    summary = {
        "stages": rows,
        "val_accuracy": evaluation["accuracy"],
        "val_accuracy_tta": evaluation["tta"]["accuracy"],
        "tta_gain": evaluation["tta_gain"],
        "robustness": evaluation.get("robustness", {}).get("metrics"),
        "export": str(export_dir),
        "submission": str(submission) if submission else None,
        "eda": str(eda),
        "minutes": round((time.perf_counter() - started) / 60, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    table = summary_table(rows)
    (out / "summary.md").write_text(
        f"{table}\n\nvalidation accuracy {summary['val_accuracy']:.4f}, with TTA "
        f"{summary['val_accuracy_tta']:.4f} (gain {summary['tta_gain']:+.4f}); "
        f"total {summary['minutes']:.1f} min\n" + _robustness_line(summary["robustness"]),
        encoding="utf-8",
    )
    return summary
