"""Classification and segmentation metrics from labels and probabilities: numpy only, cheap per epoch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from cxrcore.labels import CLASSES

T = TypeVar("T")

ECE_BINS = 15
ECE_FLOOR_DRAWS = 200
"""Simulated label draws behind ece_floor."""
NLL_EPSILON = 1e-12
"""Probabilities are clipped to at least this before the log, so one confident mistake stays finite."""
_ROW_SUM_TOLERANCE = 1e-2
WILSON_Z = 1.959964
"""The normal quantile of a two-sided 95% interval."""


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES, *, with_curves: bool = False
) -> dict[str, Any]:
    """Headline, per-class and calibration metrics of predicted class probabilities, as plain JSON types.

    Everything derives from one confusion matrix (rows true, columns predicted), so the numbers agree with
    each other. Macro averages run over the classes present in the labels (support > 0): a class missing
    from an evaluation set (the real sample has no Lung_Opacity) has no F1 to average. The matrix keeps
    every predicted column, so a model that predicts an absent class still shows it there, and each such
    prediction is an error in its true class's recall. macro_auroc averages the classes that have both
    positives and negatives. with_curves adds the reliability bins and ROC curves the report plots (left
    off per epoch to stay cheap).
    """
    labels, probs = _check_inputs(labels, probs, classes)
    n, num_classes = probs.shape
    predicted = probs.argmax(axis=1)
    matrix = np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    true_positives, support, precision, recall, f1 = _per_class(matrix)
    true_negatives, negatives = _negatives(matrix)
    scored = support > 0
    aurocs = [_binary_auroc(labels == k, probs[:, k]) for k in range(num_classes)]
    defined_aurocs = [auroc for auroc in aurocs if auroc is not None]
    influences = [_auroc_influence(labels == k, probs[:, k]) for k in range(num_classes)]
    calibration_bins = _confidence_bins(labels, probs, ECE_BINS)
    true_probs = probs[np.arange(n), labels]

    metrics: dict[str, Any] = {
        "n": n,
        "classes": list(classes),
        "accuracy": float(true_positives.sum() / n),
        "accuracy_ci95": wilson_interval(int(true_positives.sum()), n),  # what n images can tell apart
        "balanced_accuracy": float(recall[scored].mean()),
        "macro_precision": float(precision[scored].mean()),
        "macro_recall": float(recall[scored].mean()),
        "macro_f1": float(f1[scored].mean()),
        "weighted_f1": float((f1 * support).sum() / n),
        "macro_auroc": float(np.mean(defined_aurocs)) if defined_aurocs else None,
        "macro_auroc_ci95": _auroc_interval(aurocs, influences),
        "ece": _expected_calibration_error(*calibration_bins),
        **ece_floor(probs),
        "nll": float(-np.log(np.clip(true_probs, NLL_EPSILON, 1.0)).mean()),
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                # the sensitivity's Wilson 95% interval: 4 of 5 COVID images found is 0.38-0.96
                "recall_ci95": wilson_interval(int(true_positives[k]), int(support[k])),
                # one vs rest, at the argmax: the share of the other classes' images not called this one
                "specificity": float(true_negatives[k] / negatives[k]) if negatives[k] else None,
                "specificity_ci95": wilson_interval(int(true_negatives[k]), int(negatives[k])),
                "f1": float(f1[k]),
                "support": int(support[k]),
                "auroc": aurocs[k],
                "auroc_ci95": _auroc_interval([aurocs[k]], [influences[k]]),
                # beside the class's share of the images: a model trained with class weights lifts the
                # rare classes' probabilities (evaluation.prior_note)
                "mean_probability": float(probs[:, k].mean()) if n else None,
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


def confusion_scores(
    matrix: npt.ArrayLike, classes: Sequence[str] = CLASSES, rows: Sequence[str] | None = None
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 and per-class F1 of a confusion matrix, as classification_metrics
    computes them.

    `rows` keeps only the images of those true classes, every predicted column included: what the model
    scored on the part of a set that holds only those classes. Comparing a model's internal figures (four
    classes) with an external set that has fewer needs exactly that, or the comparison mixes two tasks.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    if counts.ndim != 2 or counts.shape != (len(classes), len(classes)):
        raise ValueError(
            f"matrix must be {len(classes)}x{len(classes)} like classes, got shape {counts.shape}"
        )
    if rows is not None:
        unknown = sorted(set(rows) - set(classes))
        if unknown:
            raise ValueError(f"rows {unknown} are not among the classes {list(classes)}")
        counts = np.where(np.isin(np.asarray(classes), list(rows))[:, None], counts, 0)
    n = int(counts.sum())
    if n == 0:
        raise ValueError("cannot score an empty confusion matrix (no images in the chosen rows)")
    true_positives, support, _, recall, f1 = _per_class(counts)
    scored = support > 0
    return {
        "n": n,
        "classes": [name for name, kept in zip(classes, scored, strict=True) if kept],
        "accuracy": float(true_positives.sum() / n),
        "accuracy_ci95": wilson_interval(int(true_positives.sum()), n),  # what n images can tell apart
        "balanced_accuracy": float(recall[scored].mean()),
        "macro_f1": float(f1[scored].mean()),
        "per_class_f1": {name: float(f1[k]) for k, name in enumerate(classes) if scored[k]},
    }


def one_vs_rest(matrix: npt.ArrayLike, classes: Sequence[str] = CLASSES) -> dict[str, dict[str, Any]]:
    """Sensitivity and specificity of each class present (support > 0) against all the others, with counts.

    The operating point is the one the matrix was made at (argmax of the served probabilities). Both
    come with a 95% Wilson interval, because external sets are often small: a specificity of 6 in 18
    negatives is 0.33 give or take 0.2. Specificity is None when the set holds no other class.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    all_true_negatives, all_negatives = _negatives(counts)
    result: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(classes):
        positives = int(counts[k].sum())
        if positives == 0:
            continue
        true_positives = int(counts[k, k])
        negatives, true_negatives = int(all_negatives[k]), int(all_true_negatives[k])
        false_positives = negatives - true_negatives
        result[name] = {
            "positives": positives,
            "true_positives": true_positives,
            "false_negatives": positives - true_positives,
            "negatives": negatives,
            "true_negatives": true_negatives,
            "false_positives": false_positives,
            "sensitivity": true_positives / positives,
            "sensitivity_ci95": wilson_interval(true_positives, positives),
            "specificity": true_negatives / negatives if negatives else None,
            "specificity_ci95": wilson_interval(true_negatives, negatives),
        }
    return result


def accuracy_interval(confusion_matrix: Sequence[Sequence[int]]) -> list[float] | None:
    """The Wilson 95% interval of the accuracy a confusion matrix records (None when it counts nothing):
    how far a small test set pins the accuracy down (40 images at 0.975: 0.87-1.00)."""
    correct = sum(row[k] for k, row in enumerate(confusion_matrix))
    return wilson_interval(int(correct), int(sum(map(sum, confusion_matrix))))


def beats_commonest_class(confusion_matrix: Sequence[Sequence[int]]) -> bool | None:
    """Whether the accuracy a confusion matrix records is shown to beat always answering its commonest
    class: the lower end of its 95% interval above that score (None when the matrix counts nothing). A
    model at 0.75 on 4 images (interval 0.30-0.95) is not, where half of them are one class.

    >>> beats_commonest_class([[9, 1], [1, 9]]), beats_commonest_class([[3, 1], [0, 0]])
    (True, False)
    """
    interval = accuracy_interval(confusion_matrix) if confusion_matrix else None
    if interval is None:
        return None
    total = sum(map(sum, confusion_matrix))
    return bool(interval[0] > max(map(sum, confusion_matrix)) / total)


def is_test_report(report: Mapping[str, Any]) -> bool:
    """Whether an evaluation's metrics.json scored the test split of the model's own dataset."""
    evaluated = report.get("evaluated") or {}
    if evaluated:
        return bool(evaluated.get("relation") == "internal" and evaluated.get("split") == "test")
    # reports written before the `evaluated` block: the calibration block names the split
    return (report.get("calibration") or {}).get("split") == "test" and "external" not in report


def brief_test_figures(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The figures of a model's test report (its metrics.json) in brief, for what a served model says of
    itself (GET /v1/model, `cxr models show`, `cxr models list`): the images they were measured on, the
    accuracy with its interval, whether that beats always answering the commonest class, and each class's
    recall. None for a report of anything but its own dataset's test split, or one without an accuracy."""
    if not is_test_report(metrics) or metrics.get("accuracy") is None:
        return None
    matrix = metrics.get("confusion_matrix") or []
    n = int(sum(map(sum, matrix))) or metrics.get("n")
    evaluated = metrics.get("evaluated") or {}
    per_class = metrics.get("per_class") or {}
    return {
        "dataset_fingerprint": evaluated.get("fingerprint"),
        "images": n,
        "accuracy": metrics["accuracy"],
        "accuracy_ci95": accuracy_interval(matrix),
        "commonest_class_accuracy": max(map(sum, matrix)) / n if matrix and n else None,
        "beats_commonest_class": beats_commonest_class(matrix),
        "balanced_accuracy": metrics.get("balanced_accuracy"),
        "macro_f1": metrics.get("macro_f1"),
        "macro_auroc": metrics.get("macro_auroc"),
        # none for a class the split holds no image of (a recall of 0 there would read as one never found)
        "recall": {
            name: row.get("recall") if row.get("support", 1) else None for name, row in per_class.items()
        },
    }


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value of two models scored on the same images: `only_a` images the first got
    right and the second wrong, `only_b` the reverse. Were each model as likely as the other to be the one
    right on an image they split, how often a split at least this uneven comes about (images both get
    right, or both wrong, say nothing about which is better). Two models' own accuracy intervals are the
    wrong yardstick for their difference: on the same images, their errors are paired.

    >>> round(mcnemar_exact(9, 7), 3), round(mcnemar_exact(6, 1), 3), mcnemar_exact(0, 0)
    (0.804, 0.125, 1.0)
    """
    n = only_a + only_b
    # P(X <= min) = P(X >= n - min) at p = 1/2, summed in logs: exact big-integer sums took 8.4 s for 12,300
    # discordant images (a review, session 56)
    return min(1.0, 2.0 * binomial_tail(n - min(only_a, only_b), n, 0.5))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how often as many events as `k` or more come about by chance (the
    input check's unusual images among usual ones). Summed in logs, so large n neither overflows nor loses
    the small tails to cancellation.

    >>> round(binomial_tail(2, 4, 0.02), 6), binomial_tail(0, 10, 0.3), binomial_tail(11, 10, 0.3)
    (0.002336, 1.0, 0.0)
    """
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0 or p >= 1:
        return float(p >= 1)
    log_p, log_q = math.log(p), math.log1p(-p)
    scale = math.lgamma(n + 1)
    terms = [
        scale - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def wilson_interval(successes: int, n: int, z: float = WILSON_Z) -> list[float] | None:
    """The Wilson score interval [low, high] of a proportion successes / n (None when n is 0).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0 or n successes,
    which matters for the small counts of an external validation set.
    """
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def difference_interval(
    successes_a: int, n_a: int, successes_b: int, n_b: int, z: float = WILSON_Z
) -> list[float] | None:
    """The 95% interval [low, high] of the difference of two independent proportions, a - b (Newcombe's
    hybrid score interval, built from each side's Wilson interval); None when either side counts nothing.

    Whether two accuracies differ beyond sampling is whether this interval excludes 0. Reading it from
    the two accuracies' own intervals overlapping is far too cautious: 32/45 internal against 66/130
    external overlap (0.57-0.82 and 0.42-0.59), yet the difference, 0.20, lies in 0.04-0.34 (Fisher's
    p = 0.023).

    >>> [round(x, 3) for x in difference_interval(32, 45, 66, 130)]
    [0.036, 0.344]
    """
    a, b = wilson_interval(successes_a, n_a, z), wilson_interval(successes_b, n_b, z)
    if a is None or b is None:
        return None
    p_a, p_b = successes_a / n_a, successes_b / n_b
    difference = p_a - p_b
    low = difference - math.sqrt((p_a - a[0]) ** 2 + (b[1] - p_b) ** 2)
    high = difference + math.sqrt((a[1] - p_a) ** 2 + (p_b - b[0]) ** 2)
    return [max(-1.0, low), min(1.0, high)]


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
    return {"n_bins": n_bins, "ece": ece, **ece_floor(probs, n_bins), "bins": bins}


def roc_curves(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES
) -> dict[str, dict[str, Any]]:
    """One-vs-rest ROC curve (fpr, tpr) and AUC per class; classes without both outcomes are left out."""
    from sklearn.metrics import roc_curve  # here: sklearn takes 1 s to import, and training never needs it

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


def _per_class(matrix: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per class of a confusion matrix (rows true): true positives, support, precision, recall, F1."""
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted_count = matrix.sum(axis=0)
    precision = _safe_divide(true_positives, predicted_count)
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * true_positives, support + predicted_count)
    return true_positives, support, precision, recall, f1


def _negatives(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class of a confusion matrix (rows true), one vs rest: the true negatives (other classes' images
    not called this one) and the negatives (every other class's images), specificity's two counts."""
    negatives = matrix.sum() - matrix.sum(axis=1)
    false_positives = matrix.sum(axis=0) - np.diag(matrix)
    return negatives - false_positives, negatives


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


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they occupy."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def _auroc_influence(positive: np.ndarray, scores: np.ndarray) -> np.ndarray | None:
    """Each image's share of the one-vs-rest AUROC's DeLong variance, as a signed term whose squares sum to
    it: a positive image's share of negatives it outscores (ties half), less the AUROC, over sqrt(m(m-1)),
    and likewise a negative's share of positives that outscore it over sqrt(n(n-1)) (DeLong, DeLong and
    Clarke-Pearson 1988; the midrank form of Sun and Xu 2014). Summed over classes image by image, the
    terms give the macro AUROC's variance with the classes' covariance in it. None with fewer than two
    images on either side."""
    m = int(positive.sum())
    n = len(positive) - m
    if m < 2 or n < 2:
        return None
    ranks = _midranks(np.concatenate([scores[positive], scores[~positive]]))
    outscored = (ranks[:m] - _midranks(scores[positive])) / n
    outscoring = 1.0 - (ranks[m:] - _midranks(scores[~positive])) / m
    auroc = outscored.mean()
    terms = np.empty(len(positive), dtype=np.float64)
    terms[positive] = (outscored - auroc) / math.sqrt(m * (m - 1))
    terms[~positive] = (outscoring - auroc) / math.sqrt(n * (n - 1))
    return terms


def _auroc_interval(
    aurocs: Sequence[float | None], influences: Sequence[np.ndarray | None]
) -> list[float] | None:
    """The DeLong 95% interval of the mean of the defined AUROCs (one class's: its own AUROC's), taken on
    the logit scale and mapped back (Pepe 2003, section 5.2), so that it stays within 0-1 and widens
    towards 0.5 where the AUROC lies near 1. On the AUROC's own scale, clipped to 1, it had covered a true
    AUROC of 0.90 in 78% of samples of 4 positives and 40 negatives, 86% of 10, 92% of 30; on the logit
    scale in 95%, 94% and 95% (binormal scores, 3,000 samples each; the README's "Evaluation").
    None where a class has one image on a side, or a variance of 0: scores that separate it perfectly (an
    interval of 1.00-1.00 would claim a certainty that a few images cannot give, and in the mean it would
    narrow the others' interval)."""
    defined = [(auroc, terms) for auroc, terms in zip(aurocs, influences, strict=True) if auroc is not None]
    shares = [terms for _, terms in defined if terms is not None]
    if not defined or len(shares) < len(defined) or not all(np.any(terms) for terms in shares):
        return None  # a class without a variance of its own would narrow the mean's interval without cause
    spread = math.sqrt(float(np.square(np.mean(shares, axis=0)).sum()))
    centre = float(np.mean([auroc for auroc, _ in defined]))
    if not 0.0 < centre < 1.0:  # every class's AUROC 0 (or 1, which has no variance): no logit
        return None
    logit, half = math.log(centre / (1.0 - centre)), WILSON_Z * spread / (centre * (1.0 - centre))
    return [1.0 / (1.0 + math.exp(-(logit + sign * half))) for sign in (-1.0, 1.0)]


def ece_floor(probs: np.ndarray, n_bins: int = ECE_BINS, draws: int = ECE_FLOOR_DRAWS) -> dict[str, float]:
    """The ECE that perfectly calibrated probabilities would show on this many images: the sampling floor.

    ECE's plug-in estimate is biased upwards: with few images per bin, |accuracy - confidence| is
    positive even when every confidence is exact. Here each prediction is called right with exactly its
    confidence, `draws` times (a fixed seed, so the figure is reproducible), and ECE measured as usual:
    `ece_floor` is the mean, `ece_floor_sd` the spread. An ECE within a standard deviation or two of
    the floor is as calibrated as this many images can show; on 24 images the floor is about 0.2.
    """
    confidence = np.asarray(probs, dtype=np.float64).max(axis=1)
    n = len(confidence)
    if n == 0:
        raise ValueError("ece_floor needs at least one prediction")
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    correct = np.random.default_rng(0).random((draws, n)) < confidence
    gap = correct - confidence  # per draw and image; summed per bin, |sum| / N is that draw's ECE
    cells = (np.arange(draws)[:, None] * n_bins + index).ravel()
    per_bin = np.bincount(cells, weights=gap.ravel(), minlength=draws * n_bins).reshape(draws, n_bins)
    eces = np.abs(per_bin).sum(axis=1) / n
    return {"ece_floor": float(eces.mean()), "ece_floor_sd": float(eces.std())}


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


def score_resolution(metrics: Mapping[str, Any]) -> float:
    """One validation image's worth of val_score where no confusion matrix tells more (`within_one_image`):
    1 / the number of validation images (`val_count`, else the sum of `val_confusion_matrix`); 0.0 when
    neither is known, so that only equal scores count as tied."""
    count = metrics.get("val_count")
    if count is None and metrics.get("val_confusion_matrix") is not None:
        count = int(np.asarray(metrics["val_confusion_matrix"]).sum())
    return 1.0 / count if count else 0.0


def images_apart(a: Mapping[str, Any], b: Mapping[str, Any]) -> int | None:
    """The fewest validation images two results' predictions differ on: half the summed absolute difference
    of their `val_confusion_matrix` (one image predicted otherwise moves one count between two cells of its
    row); None without both matrices, or for matrices of different splits.

    >>> images_apart({"val_confusion_matrix": [[3, 0], [0, 3]]}, {"val_confusion_matrix": [[2, 1], [0, 3]]})
    1
    """
    first, second = a.get("val_confusion_matrix"), b.get("val_confusion_matrix")
    if first is None or second is None:
        return None
    one, other = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    if one.shape != other.shape or not np.array_equal(one.sum(axis=1), other.sum(axis=1)):
        return None
    return int(np.abs(one - other).sum()) // 2


def within_one_image(metrics: Mapping[str, Any], top: Mapping[str, Any]) -> bool:
    """Whether `metrics` lies within one validation image of the higher-scoring `top`: the same val_score;
    else, where both have their confusion matrix, predictions that differ on at most one image, however
    far that image moves macro-F1 (one of a class of 3 in 40 images moves it by 2.7/40, and 1/40 had
    ranked two models apart on it), or as many images right and a score within score_resolution (two
    models that each miss one image, a different one, are two images apart but one image's luck from
    each other: macro-F1 0.95227 and 0.95221 on 41 images had decided a demo); else a score within
    score_resolution. A margin of one image's largest effect had tied two models 4 images apart on 12.

    >>> top = {"val_score": 1.0, "val_confusion_matrix": np.diag([7, 11, 19, 3]).tolist()}
    >>> rare = [[7, 0, 0, 0], [0, 11, 0, 0], [0, 0, 19, 0], [0, 0, 1, 2]]  # one of 3 images missed
    >>> within_one_image({"val_score": 0.933, "val_confusion_matrix": rare}, top)
    True
    >>> four = [[6, 1, 0, 0], [0, 10, 1, 0], [0, 0, 18, 1], [1, 0, 0, 2]]  # one missed in every class
    >>> within_one_image({"val_score": 0.86, "val_confusion_matrix": four}, top)
    False
    >>> other = [[7, 0, 0, 0], [0, 11, 0, 0], [0, 0, 18, 1], [0, 0, 0, 3]]  # another single miss
    >>> within_one_image({"val_score": 0.97, "val_confusion_matrix": other}, {"val_score": 0.98,
    ...                  "val_confusion_matrix": rare})  # two images apart, as many right: tied
    True
    """
    gap = float(top["val_score"]) - float(metrics["val_score"])
    if gap <= _SCORE_EPSILON:
        return True
    apart = images_apart(metrics, top)
    close = gap <= score_resolution(metrics) + _SCORE_EPSILON
    if apart is not None:
        right = (int(np.trace(np.asarray(m["val_confusion_matrix"]))) for m in (metrics, top))
        return apart <= 1 or (close and len(set(right)) == 1)
    return close


def best_by_validation(items: Iterable[T], metrics_of: Callable[[T], Mapping[str, Any]]) -> T | None:
    """The checkpoint, trial or architecture whose validation figures are best; None for none.

    Among the items within one validation image of the top score (`within_one_image`), the one with the
    lowest validation loss. On a split of a few dozen images, scores closer
    than that are one image's luck: picked by the score alone, the best of a run's epochs was often an
    early one whose validation loss was still high and that did worse on other images. In a `cxr demo` run
    (41 validation images, 8 epochs), the checkpoints chosen by score alone for cnn_lstm / dual_cnn /
    resnet18 scored 0.79 / 0.76 / 0.91 on 600 independent phantoms; those chosen by this rule, 0.92 / 0.87
    / 0.91. In the 7 trials of two other runs it chose the same checkpoint or one as good.
    The loss is continuous and tells such near-ties apart; a missing figure ranks last.

    >>> early = {"val_score": 0.950, "val_loss": 0.25, "val_count": 41}
    >>> final = {"val_score": 0.927, "val_loss": 0.19, "val_count": 41}
    >>> best_by_validation([early, final], dict) is final  # 0.023 apart: under one image in 41
    True
    >>> best_by_validation([early, {**final, "val_score": 0.900}], dict) is early  # two images behind
    True
    """
    pool = [(item, metrics_of(item)) for item in items]
    scored = [(item, metrics) for item, metrics in pool if metrics.get("val_score") is not None]
    if not scored:
        return pool[0][0] if pool else None
    top = max(float(metrics["val_score"]) for _, metrics in scored)
    leaders = [metrics for _, metrics in scored if float(metrics["val_score"]) >= top - _SCORE_EPSILON]
    close = [(item, m) for item, m in scored if any(within_one_image(m, lead) for lead in leaders)]

    def loss_then_score(entry: tuple[T, Mapping[str, Any]]) -> tuple[float, float]:
        loss = entry[1].get("val_loss")
        return (math.inf if loss is None else float(loss), -float(entry[1]["val_score"]))

    return min(close, key=loss_then_score)[0]


STOPPED_EARLY = "stopped_early"
"""In the last report of a run that `--patience` stopped: the epoch of its best by validation."""

RESUMED_AFTER = "resumed_after"
"""In the first report after a resume: the last epoch of the checkpoint the run went on from. A run given
more --epochs restarts its learning rate there (LR_REPLANNED): the curves mark it, as the card's history."""

LR_REPLANNED = "lr_replanned"
"""Beside RESUMED_AFTER: whether the learning-rate schedule was planned anew (other --epochs, --workers or
--batch-size), so that the rate jumped where the run went on, or continued where it stood."""

KEEP_SCORE = "val_keep"
"""What Ray Train keeps a run's best checkpoints by (`keep_score`). By val_score alone, Ray kept the
latest of tied epochs: on 13 validation images 15 of 30 epochs scored 1.000, the three kept were the last
three, and the one best_by_validation would have chosen among all (the lowest loss of the 15) was gone
(a review, session 53)."""


def keep_score(metrics: dict[str, Any]) -> float:
    """val_score, its exact ties broken by the lower validation loss, as best_by_validation breaks them:
    the loss counts for a billionth of itself, under any real difference in score.

    >>> keep_score({"val_score": 1.0, "val_loss": 0.05}) > keep_score({"val_score": 1.0, "val_loss": 0.08})
    True
    >>> keep_score({"val_score": 0.999, "val_loss": 0.0}) < keep_score({"val_score": 1.0, "val_loss": 9.0})
    True
    """
    loss = float(metrics.get("val_loss", math.inf))
    return float(metrics["val_score"]) - 1e-9 * (min(loss, 1e3) if math.isfinite(loss) else 1e3)


def rank_by_validation(items: Iterable[T], metrics_of: Callable[[T], Mapping[str, Any]]) -> list[T]:
    """`items` best first, each the best_by_validation of those after it: the first is the one chosen."""
    remaining, ranked = list(items), []
    while remaining:
        best = best_by_validation(remaining, metrics_of)
        index = next(i for i, item in enumerate(remaining) if item is best)
        ranked.append(remaining.pop(index))
    return ranked


_SCORE_EPSILON = 1e-9
"""Float slack in the one-image comparison: a score exactly one image behind still counts as close."""
