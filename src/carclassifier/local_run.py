"""The whole recipe on one machine: prepare → EDA → every stage → evaluate (TTA) → export →
predict. What `make run-local` runs; the Kubeflow pipeline runs the same library calls as
separate pods."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from carclassifier.augment import TtaSettings
from carclassifier.config import RunConfig
from carclassifier.eda import write_eda_report
from carclassifier.evaluate import evaluate_classifier
from carclassifier.export import export_metadata, write_export
from carclassifier.model import load_model
from carclassifier.predict import predict_folder
from carclassifier.prepare import find_test_images, validate_and_split
from carclassifier.reports import summary_table
from carclassifier.stages import train_recipe

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class RunSummary:
    """What a local run did (also written as ``summary.json``)."""

    stages: list[dict[str, Any]]
    """Each stage's metrics (`carclassifier.stages.StageResult.metrics`), in order."""
    val_accuracy: float
    val_accuracy_tta: float
    tta_gain: float
    robustness: dict[str, Any] | None
    """The robustness metrics (`carclassifier.robustness`); None when it is disabled."""
    export: str
    """The export folder."""
    submission: str | None
    """The submission CSV; None without test images."""
    eda: str
    """The EDA report."""
    minutes: float
    data_version: str | None
    """`carclassifier.lineage`'s content hash of the file list."""
    leaked_images: int
    """Training photos left out as near-duplicates of validation/test photos."""

    def headline(self) -> str:
        """``validation accuracy A, with TTA B (gain +C)``."""
        return (
            f"validation accuracy {self.val_accuracy:.4f}, with TTA {self.val_accuracy_tta:.4f} "
            f"(gain {self.tta_gain:+.4f})"
        )


def run_local(config: RunConfig, progress: bool = True) -> RunSummary:
    """Run the recipe end to end under ``config.output_dir``; returns the summary."""
    started = time.perf_counter()
    out = Path(config.output_dir)
    log.info("run-local: %d stages, outputs in %s", len(config.stages), out.resolve())
    prepared = validate_and_split(config, out, progress=progress)
    eda = write_eda_report(
        prepared.report,
        out / "eda",
        config.augment,
        config.input.image_size,
        seed=config.data.seed,
        sources=prepared.sources,
        split=prepared.split,
    )
    log.info("EDA report: %s", eda)
    results = train_recipe(config, prepared, str(out))
    final = results[-1]
    model = load_model(final.best_model)
    classes = prepared.dataset.class_names
    evaluation = evaluate_classifier(
        model,
        prepared.dataset.root,
        prepared.subset("val"),
        classes,
        config,
        out / "evaluation",
        progress=progress,
    )
    export_dir = write_export(
        model,
        classes,
        out / "export",
        metadata=export_metadata(config, evaluation, data_version=prepared.data_version),
        tta=TtaSettings.from_config(config),
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
    summary = RunSummary(
        stages=[r.metrics for r in results],
        val_accuracy=evaluation["accuracy"],
        val_accuracy_tta=evaluation["tta"]["accuracy"],
        tta_gain=evaluation["tta_gain"],
        robustness=evaluation.get("robustness", {}).get("metrics"),
        export=str(export_dir),
        submission=str(submission) if submission else None,
        eda=str(eda),
        minutes=round((time.perf_counter() - started) / 60, 2),
        data_version=prepared.data_version,
        leaked_images=len({leak.train for leak in prepared.leaks}),
    )
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2), encoding="utf-8")
    (out / "summary.md").write_text(
        f"{summary_table(summary.stages)}\n\n{summary.headline()}; "
        f"total {summary.minutes:.1f} min\n\ndata version `{summary.data_version}`; "
        f"{summary.leaked_images} training photo(s) left out as near-duplicates of "
        "validation/test photos (leaks.csv)\n" + _robustness_line(summary.robustness),
        encoding="utf-8",
    )
    return summary
