"""Classification and segmentation metrics from labels and probabilities: numpy only, cheap per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from cxrcore.labels import CLASSES

ECE_BINS = 15
NLL_EPSILON = 1e-12
"""Probabilities are clipped to at least this before the log, so one confident mistake stays finite."""
_ROW_SUM_TOLERANCE = 1e-2


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES, *, with_curves: bool = False
) -> dict[str, Any]:
    """Headline, per-class and calibration metrics of predicted class probabilities, as plain JSON types.

    Everything derives from one confusion matrix (rows true, columns predicted), so the numbers agree with
    each other. Macro averages run over the classes present in labels or predictions, as scikit-learn's do,
    so a class missing from an evaluation set (the real sample has no Lung_Opacity) is not scored as 0;
    macro_auroc averages the classes that have both positives and negatives. with_curves adds the
    reliability bins and ROC curves the report plots (left off per epoch to stay cheap).
    """
    labels, probs = _check_inputs(labels, probs, classes)
    n, num_classes = probs.shape
    predicted = probs.argmax(axis=1)
    matrix = np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted_count = matrix.sum(axis=0)
    precision = _safe_divide(true_positives, predicted_count)
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * true_positives, support + predicted_count)
    scored = (support > 0) | (predicted_count > 0)
    aurocs = [_binary_auroc(labels == k, probs[:, k]) for k in range(num_classes)]
    defined_aurocs = [auroc for auroc in aurocs if auroc is not None]
    calibration_bins = _confidence_bins(labels, probs, ECE_BINS)
    true_probs = probs[np.arange(n), labels]

    metrics: dict[str, Any] = {
        "n": n,
        "classes": list(classes),
        "accuracy": float(true_positives.sum() / n),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "macro_precision": float(precision[scored].mean()),
        "macro_recall": float(recall[scored].mean()),
        "macro_f1": float(f1[scored].mean()),
        "weighted_f1": float((f1 * support).sum() / n),
        "macro_auroc": float(np.mean(defined_aurocs)) if defined_aurocs else None,
        "ece": _expected_calibration_error(*calibration_bins),
        "nll": float(-np.log(np.clip(true_probs, NLL_EPSILON, 1.0)).mean()),
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
                "auroc": aurocs[k],
            }
            for k, name in enumerate(classes)
        },
        "confusion_matrix": matrix.tolist(),
        "confusion_matrix_normalized": (matrix / np.maximum(support, 1)[:, None]).tolist(),
    }
    if with_curves:
        metrics["reliability"] = reliability_bins(labels, probs)
        metrics["roc"] = roc_curves(labels, probs, classes)
    return metrics


def reliability_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Accuracy against mean confidence in equal-width confidence bins, for the reliability diagram.

    Bin k holds confidences in (k/n_bins, (k+1)/n_bins] (0 goes to the first); empty bins report count 0
    and None for confidence and accuracy. The ECE is their count-weighted gap.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    labels, probs = _check_inputs(labels, probs, None)
    counts, confidence_sums, correct_sums = _confidence_bins(labels, probs, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = [
        {
            "lower": float(edges[k]),
            "upper": float(edges[k + 1]),
            "confidence": float(confidence_sums[k] / counts[k]) if counts[k] else None,
            "accuracy": float(correct_sums[k] / counts[k]) if counts[k] else None,
            "count": int(counts[k]),
        }
        for k in range(n_bins)
    ]
    ece = _expected_calibration_error(counts, confidence_sums, correct_sums)
    return {"n_bins": n_bins, "ece": ece, "bins": bins}


def roc_curves(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES
) -> dict[str, dict[str, Any]]:
    """One-vs-rest ROC curve (fpr, tpr) and AUC per class; classes without both outcomes are left out."""
    labels, probs = _check_inputs(labels, probs, classes)
    curves: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(classes):
        positive = labels == k
        auroc = _binary_auroc(positive, probs[:, k])
        if auroc is None:
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, k])
        curves[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": auroc}
    return curves


def segmentation_metrics(
    pred_masks: np.ndarray, true_masks: np.ndarray, threshold: float = 0.5
) -> dict[str, Any]:
    """Mean per-image Dice and IoU of masks binarised at `threshold` (> threshold is foreground).

    Both arrays are (N, H, W), or one (H, W) image; the same threshold binarises both, so 0/1, 0/255 and
    probability masks all work. An image where both masks are empty scores 1 (nothing to find, nothing found).
    """
    pred, true = np.asarray(pred_masks), np.asarray(true_masks)
    if pred.shape != true.shape:
        raise ValueError(f"pred_masks shape {pred.shape} differs from true_masks shape {true.shape}")
    if pred.ndim == 2:
        pred, true = pred[None], true[None]
    if pred.ndim != 3:
        raise ValueError(f"masks must be (N, H, W) or (H, W), got shape {pred.shape}")
    if len(pred) == 0:
        raise ValueError("segmentation_metrics needs at least one mask pair, got none")
    pred_fg = (pred > threshold).reshape(len(pred), -1)
    true_fg = (true > threshold).reshape(len(true), -1)
    intersection = (pred_fg & true_fg).sum(axis=1)
    pred_area, true_area = pred_fg.sum(axis=1), true_fg.sum(axis=1)
    union = pred_area + true_area - intersection
    both_empty = union == 0
    dice = np.where(both_empty, 1.0, _safe_divide(2.0 * intersection, pred_area + true_area))
    iou = np.where(both_empty, 1.0, _safe_divide(intersection.astype(np.float64), union))
    return {"dice": float(dice.mean()), "iou": float(iou.mean()), "n": len(pred)}


def _check_inputs(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: int labels (N,), float probs (N, C) whose rows are probability distributions."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {labels.shape}")
    if len(labels) == 0:
        raise ValueError("cannot compute metrics of an empty set: labels has no samples")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if probs.ndim != 2 or probs.shape[0] != len(labels):
        raise ValueError(
            f"probs must be (N, C) with N={len(labels)} rows like labels, got shape {probs.shape}"
        )
    num_classes = probs.shape[1]
    if classes is not None and num_classes != len(classes):
        raise ValueError(f"probs has {num_classes} columns but there are {len(classes)} classes")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probs must be finite and non-negative")
    if np.abs(probs.sum(axis=1) - 1.0).max() > _ROW_SUM_TOLERANCE:
        raise ValueError("probs rows must sum to 1 (were logits passed? apply a softmax first)")
    return labels.astype(np.int64, copy=False), probs


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    return np.divide(
        numerator, denominator, out=np.zeros(np.shape(numerator), dtype=np.float64), where=denominator > 0
    )


def _binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve via the Mann-Whitney rank sum (ties count half); None without both classes."""
    n_positive = int(positive.sum())
    n_negative = len(positive) - n_positive
    if n_positive == 0 or n_negative == 0:
        return None
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts_group = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    group_starts = np.flatnonzero(starts_group)
    group_ends = np.r_[group_starts[1:], len(scores)]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Tied scores share the average of the 1-based ranks start+1 .. end their group occupies.
    ranks[order] = ((group_starts + group_ends + 1) / 2.0)[np.cumsum(starts_group) - 1]
    rank_sum = ranks[positive].sum()
    return float((rank_sum - n_positive * (n_positive + 1) / 2.0) / (n_positive * n_negative))


def _confidence_bins(
    labels: np.ndarray, probs: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per top-class confidence bin (k/n, (k+1)/n]: sample count, sum of confidences, number correct."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    confidence_sums = np.bincount(index, weights=confidence, minlength=n_bins)
    correct_sums = np.bincount(index, weights=correct.astype(np.float64), minlength=n_bins)
    return counts, confidence_sums, correct_sums


def _expected_calibration_error(
    counts: np.ndarray, confidence_sums: np.ndarray, correct_sums: np.ndarray
) -> float:
    """Count-weighted mean over bins of |accuracy - mean confidence|, i.e. sum |correct - confidence| / N."""
    return float(np.abs(correct_sums - confidence_sums).sum() / counts.sum())
