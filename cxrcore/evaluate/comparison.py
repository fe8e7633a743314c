"""The Tune comparison report: every trial, and the best of each architecture side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrcore.evaluate.report import ReportSection, html_table, plot_overlaid_curves, write_html_report

CURVES = ("val_loss", "val_accuracy", "val_macro_f1", "train_loss")


def write_comparison_report(out_dir: str | Path, comparison: dict[str, Any]) -> dict[str, Path]:
    """Write comparison.json, overlaid training curves and comparison.html into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "comparison.json"}
    paths["json"].write_text(json.dumps(comparison, indent=2, default=str) + "\n")
    best = comparison["best"]
    histories = {model: row["history"] for model, row in best.items() if row["history"]}
    curves = [plot_overlaid_curves(histories, metric, out / f"curves_{metric}.png") for metric in CURVES]

    side_by_side = [
        {
            "architecture": model,
            "registered as": row["ref"] + (" (production)" if row.get("production") else ""),
            "val macro-F1": row["val_score"],
            "test accuracy": row["test_accuracy"],
            "test macro-F1": row["test_macro_f1"],
            "test AUROC": row["test_macro_auroc"],
            **{f"F1 {name}": f1 for name, f1 in row["test_per_class_f1"].items()},
            "parameters": row["parameters"],
            "train images/s": row["train_images_per_s"],
            "epochs": row["epochs_run"],
            "lr": row["lr"],
            "batch": row["batch_size"],
        }
        for model, row in best.items()
    ]
    trials = [
        {k: v for k, v in trial.items() if k not in ("history", "best_checkpoint")}
        for trial in comparison["trials"]
    ]
    matrices = [
        Path(row["report"]).parent / "confusion_matrix.png"
        for row in best.values()
        if (Path(row["report"]).parent / "confusion_matrix.png").is_file()
    ]
    sections = [
        ReportSection("Best of each architecture (test split)", table=side_by_side),
        ReportSection(
            "Confusion matrices",
            html="<p>" + ", ".join(best) + " (in this order)</p>",
            images=matrices,
        ),
        ReportSection("Training curves of the best trials", images=curves),
        ReportSection("All trials", table=trials),
    ]
    segmenter = comparison.get("segmenter")
    if segmenter:
        row = {
            "model": segmenter["model"],
            "registered as": segmenter["ref"],
            "val Dice": segmenter["val_dice"],
        }
        row.update({f"test {k}": v for k, v in segmenter["test"].items()})
        sections.insert(
            1,
            ReportSection(
                "Lung segmenter (supplies masks to the dual-channel model)", html=html_table([row])
            ),
        )
    paths["html"] = write_html_report(
        out / "comparison.html", f"Architecture comparison: {comparison['dataset']}", sections
    )
    return paths
