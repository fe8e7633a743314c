"""Offline evaluation of a checkpoint on a dataset split, through the same Predictor as Serve."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cxrcore.config import EvaluateConfig

log = logging.getLogger(__name__)
# A source needs this many test images before its own results mean anything.
MIN_SOURCE_IMAGES = 10


def evaluate_checkpoint(config: EvaluateConfig) -> dict[str, Path]:
    """Write metrics.json, plots and report.html for `config.checkpoint` on `config.split`."""
    from cxrcore.data.ingest import read_table, tensor_column
    from cxrcore.inference import Predictor

    predictor = Predictor.from_checkpoint(config.checkpoint, config.device, segmenter=config.segmenter)
    columns = ["image", "mask", "has_mask", "label_index", "source", "file"]
    frame = read_table(config.data, columns, split=config.split).to_pandas()
    if frame.empty:
        raise ValueError(f"the {config.split} split of {config.data} is empty")
    images = tensor_column(frame["image"])
    masks = tensor_column(frame["mask"])
    has_mask = frame["has_mask"].to_numpy(dtype=bool)
    card = predictor.card.to_dict()
    if predictor.spec.task == "segment":
        return _segmentation_report(config, predictor, images[has_mask], masks[has_mask], card)

    import torch

    from cxrcore.calibration import apply_temperature, calibration_report
    from cxrcore.evaluate.report import write_evaluation_report
    from cxrcore.metrics import classification_metrics

    labels = frame["label_index"].to_numpy()
    given = (
        [m if ok else None for m, ok in zip(masks, has_mask, strict=True)] if predictor.needs_mask else None
    )
    # One forward pass: the served (calibrated) probabilities are predict_proba's softmax(logits / T).
    logits = _predict(predictor.predict_logits, images, given, config.batch_size)
    probs = apply_temperature(torch.from_numpy(logits), predictor.temperature).numpy()
    metrics = classification_metrics(labels, probs, predictor.card.classes, with_curves=True)
    extra: dict[str, dict[str, Any]] = {
        # ECE and NLL on this split before (T = 1) and after the card's temperature (fitted on validation).
        "calibration": {"split": config.split, **calibration_report(logits, labels, predictor.temperature)}
    }
    if predictor.needs_mask and predictor.segmenter is not None:
        predicted = _predict(predictor.predict_proba, images, [None] * len(images), config.batch_size)
        extra["with predicted masks"] = classification_metrics(labels, predicted, predictor.card.classes)
    sources = frame["source"].to_numpy()
    if len(set(sources)) > 1:
        for source in sorted(set(sources)):
            rows = sources == source
            if rows.sum() >= MIN_SOURCE_IMAGES:
                extra[f"source: {source}"] = classification_metrics(
                    labels[rows], probs[rows], predictor.card.classes
                )
    log.info(
        "accuracy %.3f, macro-F1 %.3f on %d images", metrics["accuracy"], metrics["macro_f1"], len(labels)
    )
    cal = extra["calibration"]
    log.info(
        "temperature %.3f: ECE %.3f -> %.3f, NLL %.3f -> %.3f",
        cal["temperature"], cal["ece_before"], cal["ece_after"], cal["nll_before"], cal["nll_after"],
    )  # fmt: skip
    return write_evaluation_report(
        config.out, metrics, history=card["history"], card=_card_summary(card), extra=extra,
        title=f"{predictor.card.name} on {config.split}",
    )  # fmt: skip


def _predict(
    predict: Callable[..., np.ndarray], images: np.ndarray, masks: list[Any] | None, batch_size: int
) -> np.ndarray:
    """predict(images, masks) (a Predictor's predict_proba or predict_logits) over batches, concatenated."""
    return np.concatenate(
        [
            predict(images[i : i + batch_size], masks[i : i + batch_size] if masks else None)
            for i in range(0, len(images), batch_size)
        ]
    )


def _segmentation_report(
    config: EvaluateConfig, predictor: Any, images: np.ndarray, masks: np.ndarray, card: dict[str, Any]
) -> dict[str, Path]:
    import json

    from cxrcore.evaluate.report import ReportSection, html_table, plot_training_curves, write_html_report
    from cxrcore.metrics import segmentation_metrics

    if len(images) == 0:
        raise ValueError(f"no image in the {config.split} split has a ground-truth mask to compare against")
    predicted = np.concatenate(
        [
            predictor.segment(images[i : i + config.batch_size])
            for i in range(0, len(images), config.batch_size)
        ]
    )
    metrics = segmentation_metrics(predicted, masks, threshold=127)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json"}
    paths["metrics"].write_text(json.dumps(metrics, indent=2) + "\n")
    sections = [
        ReportSection("Model card", table=[{"key": k, "value": v} for k, v in _card_summary(card).items()]),
        ReportSection("Segmentation", html=html_table([metrics])),
    ]
    if card["history"]:
        paths["training_curves"] = plot_training_curves(card["history"], out / "training_curves.png")
        sections.append(ReportSection("Training curves", images=[paths["training_curves"]]))
    paths["report"] = write_html_report(
        out / "report.html", f"{predictor.card.name} on {config.split}", sections
    )
    return paths


def _card_summary(card: dict[str, Any]) -> dict[str, Any]:
    """The card without its bulky parts (history is plotted, metrics are tabulated)."""
    return {k: v for k, v in card.items() if k not in ("history", "metrics")}
