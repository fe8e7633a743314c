"""Classification and segmentation metrics: consistent with each other, with scikit-learn, on edge cases."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from cxrcore.labels import CLASSES
from cxrcore.metrics import (
    best_by_validation,
    brief_test_figures,
    classification_metrics,
    confusion_scores,
    ece_floor,
    one_vs_rest,
    rank_by_validation,
    reliability_bins,
    roc_curves,
    score_resolution,
    segmentation_metrics,
    wilson_interval,
)


def _predictions(
    n: int, seed: int, signal: float = 1.5, num_classes: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities of a noisy classifier that leans towards the true class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), labels] += signal
    probs = np.exp(logits)
    return labels, probs / probs.sum(axis=1, keepdims=True)


def _one_hot(labels: np.ndarray, confidence: float, num_classes: int = 4) -> np.ndarray:
    probs = np.full((len(labels), num_classes), (1 - confidence) / (num_classes - 1))
    probs[np.arange(len(labels)), labels] = confidence
    return probs


def test_metrics_agree_with_each_other_and_with_sklearn() -> None:
    labels, probs = _predictions(600, seed=0)
    predicted = probs.argmax(axis=1)
    metrics = classification_metrics(labels, probs)
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (4, 4) and matrix.sum() == metrics["n"] == 600
    assert metrics["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert metrics["accuracy_ci95"] == wilson_interval(int(np.trace(matrix)), 600)  # for scripts, as shown
    for k, name in enumerate(CLASSES):
        stats = metrics["per_class"][name]
        assert stats["support"] == matrix[k].sum()
        assert stats["recall"] == pytest.approx(matrix[k, k] / matrix[k].sum())
        assert stats["precision"] == pytest.approx(matrix[k, k] / matrix[:, k].sum())
        assert stats["auroc"] == pytest.approx(roc_auc_score(labels == k, probs[:, k]))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert metrics["weighted_f1"] == pytest.approx(f1_score(labels, predicted, average="weighted"))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert metrics["macro_auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    assert metrics["nll"] == pytest.approx(-np.log(probs[np.arange(600), labels]).mean())
    normalized = np.array(metrics["confusion_matrix_normalized"])
    np.testing.assert_allclose(normalized.sum(axis=1), 1.0)
    assert metrics["classes"] == list(CLASSES)
    assert json.loads(json.dumps(metrics)) == metrics  # plain JSON types throughout


def test_auroc_handles_tied_scores_like_sklearn() -> None:
    labels, probs = _predictions(400, seed=1)
    coarse = np.round(probs, 1) + 1e-3  # many ties, rows still near 1 after renormalising
    coarse /= coarse.sum(axis=1, keepdims=True)
    metrics = classification_metrics(labels, coarse)
    for k, name in enumerate(CLASSES):
        assert metrics["per_class"][name]["auroc"] == pytest.approx(roc_auc_score(labels == k, coarse[:, k]))


def test_perfect_confident_classifier() -> None:
    labels = np.tile(np.arange(4), 25)
    metrics = classification_metrics(labels, _one_hot(labels, 0.999))
    assert metrics["accuracy"] == metrics["balanced_accuracy"] == metrics["macro_f1"] == 1.0
    assert metrics["macro_auroc"] == 1.0
    assert metrics["ece"] == pytest.approx(0.001)
    assert metrics["nll"] == pytest.approx(-np.log(0.999))
    assert np.array_equal(metrics["confusion_matrix"], np.diag([25] * 4))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # sklearn's, not ours
def test_absent_class_keeps_its_row_and_column_without_warnings() -> None:
    labels, probs = _predictions(200, seed=2)
    keep = labels != 1  # no Lung_Opacity, like the real sample
    labels, probs = labels[keep], probs[keep]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(labels, probs, with_curves=True)
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (4, 4) and not matrix[1].any()
    assert metrics["confusion_matrix_normalized"][1] == [0.0] * 4
    absent = metrics["per_class"]["Lung_Opacity"]
    assert absent["support"] == 0 and absent["recall"] == 0.0 and absent["auroc"] is None
    assert "Lung_Opacity" not in metrics["roc"]
    defined = [metrics["per_class"][name]["auroc"] for name in CLASSES if name != "Lung_Opacity"]
    assert metrics["macro_auroc"] == pytest.approx(np.mean(defined))
    predicted = probs.argmax(axis=1)
    assert matrix[:, 1].sum() > 0  # the model predicts the absent class: its column shows it ...
    present = [0, 2, 3]  # ... but the macro averages run over the classes the labels hold
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predicted, labels=present, average="macro"))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))


def test_class_never_predicted_nor_present_is_left_out_of_macro_averages() -> None:
    labels = np.array([0, 0, 2, 2])
    probs = _one_hot(np.array([0, 2, 2, 2]), 0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(labels, probs)
    assert metrics["per_class"]["Viral Pneumonia"] == {
        "precision": 0.0,
        "recall": 0.0,
        "recall_ci95": None,
        "specificity": 1.0,  # none of the 4 other images called Viral Pneumonia
        "specificity_ci95": pytest.approx([0.5101, 1.0], abs=1e-4),
        "f1": 0.0,
        "support": 0,
        "auroc": None,
        "auroc_ci95": None,
        "mean_probability": pytest.approx(0.1),  # the 0.3 left over from 0.7, split among three
    }
    assert metrics["per_class"]["COVID"]["mean_probability"] == pytest.approx(probs[:, 0].mean())
    # 1 of the 2 COVID images found: the sensitivity's Wilson interval, as statsmodels' proportion_confint
    low, high = metrics["per_class"]["COVID"]["recall_ci95"]
    assert (round(low, 4), round(high, 4)) == (0.0945, 0.9055)
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(axis=1), average="macro"))


def test_confusion_scores_agree_with_classification_metrics_and_restrict_rows() -> None:
    labels, probs = _predictions(300, seed=4)
    metrics = classification_metrics(labels, probs)
    scores = confusion_scores(metrics["confusion_matrix"])
    for key in ("n", "accuracy", "balanced_accuracy", "macro_f1"):
        assert scores[key] == pytest.approx(metrics[key])
    assert scores["classes"] == list(CLASSES)
    # Restricting the rows scores the images of those classes as if the set held only them.
    keep = np.isin(labels, [0, 2])
    subset = classification_metrics(labels[keep], probs[keep])
    restricted = confusion_scores(metrics["confusion_matrix"], rows=["COVID", "Normal"])
    for key in ("n", "accuracy", "balanced_accuracy", "macro_f1"):
        assert restricted[key] == pytest.approx(subset[key])
    assert restricted["classes"] == ["COVID", "Normal"]
    assert set(restricted["per_class_f1"]) == {"COVID", "Normal"}
    with pytest.raises(ValueError, match="not among the classes"):
        confusion_scores(metrics["confusion_matrix"], rows=["Pneumothorax"])
    with pytest.raises(ValueError, match="empty"):
        confusion_scores(np.zeros((4, 4), dtype=int))


def test_one_vs_rest_sensitivity_and_specificity() -> None:
    # Rows true, columns predicted; Lung_Opacity absent but predicted twice, Viral Pneumonia absent.
    matrix = [[8, 2, 0, 0], [0, 0, 0, 0], [3, 0, 7, 0], [0, 0, 0, 0]]
    result = one_vs_rest(matrix)
    assert set(result) == {"COVID", "Normal"}
    covid = result["COVID"]
    assert (covid["true_positives"], covid["false_negatives"]) == (8, 2)
    assert (covid["true_negatives"], covid["false_positives"]) == (7, 3)
    assert covid["sensitivity"] == 0.8 and covid["specificity"] == 0.7
    assert covid["sensitivity_ci95"] == pytest.approx(wilson_interval(8, 10))
    normal = result["Normal"]
    assert normal["sensitivity"] == 0.7 and normal["specificity"] == 1.0  # never called Normal wrongly
    only_one = one_vs_rest([[5, 1, 0, 0], [0] * 4, [0] * 4, [0] * 4])["COVID"]
    assert only_one["specificity"] is None and only_one["specificity_ci95"] is None  # no negatives


@pytest.mark.parametrize(("successes", "n"), [(8, 10), (0, 10), (10, 10), (57, 100), (1, 3)])
def test_wilson_interval_agrees_with_scipy(successes: int, n: int) -> None:
    expected = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(successes, n) == pytest.approx([expected.low, expected.high], abs=1e-6)


def test_wilson_interval_edge_cases() -> None:
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_test_evidence_of_a_report_says_whether_it_beats_the_commonest_class() -> None:
    labels, probs = _predictions(200, seed=3)
    metrics = classification_metrics(labels, probs)
    metrics["evaluated"] = {"split": "test", "relation": "internal", "fingerprint": "abc"}
    evidence = brief_test_figures(metrics)
    assert evidence is not None and evidence["images"] == 200 and evidence["dataset_fingerprint"] == "abc"
    assert evidence["accuracy"] == metrics["accuracy"] and evidence["macro_f1"] == metrics["macro_f1"]
    assert evidence["accuracy_ci95"] == wilson_interval(round(metrics["accuracy"] * 200), 200)
    assert evidence["commonest_class_accuracy"] == np.bincount(labels).max() / 200
    assert evidence["beats_commonest_class"] is True
    assert evidence["recall"] == {c: metrics["per_class"][c]["recall"] for c in CLASSES}
    # 3 of 4 right where 2 of the 4 are one class: the interval (0.30-0.95) reaches 0.5
    small = classification_metrics(np.array([0, 0, 1, 2]), _one_hot(np.array([0, 0, 1, 0]), 0.9))
    small["evaluated"] = {"split": "test", "relation": "internal"}
    assert brief_test_figures(small)["beats_commonest_class"] is False  # type: ignore[index]
    # figures of another split or of external data are not the model's test figures
    assert brief_test_figures({**metrics, "evaluated": {"split": "val", "relation": "internal"}}) is None
    assert brief_test_figures({**metrics, "evaluated": {"split": "all", "relation": "external"}}) is None


def _delong_by_pairs(positive: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """DeLong's AUROC and variance from every positive-negative pair (O(mn)), the textbook way."""
    pos, neg = scores[positive], scores[~positive]
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = kernel.mean(axis=1), kernel.mean(axis=0)
    return float(kernel.mean()), float(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))


def test_auroc_intervals_are_delongs() -> None:
    labels, probs = _predictions(120, seed=5, signal=1.0)
    probs[:, :3] = np.round(probs[:, :3] * 0.95, 2)  # ties count half, as in the AUROC itself
    probs[:, 3] = 1 - probs[:, :3].sum(axis=1)
    metrics = classification_metrics(labels, probs)
    centres, shares = [], []
    for k, name in enumerate(CLASSES):
        auroc, variance = _delong_by_pairs(labels == k, probs[:, k])
        row = metrics["per_class"][name]
        assert row["auroc"] == pytest.approx(auroc)
        # on the logit scale, mapped back: within 0-1, longer on the side of 0.5
        half = 1.959964 * variance**0.5 / (auroc * (1 - auroc))
        logit = np.log(auroc / (1 - auroc))
        assert row["auroc_ci95"] == pytest.approx(list(1 / (1 + np.exp(-(logit + np.array([-half, half]))))))
        low, high = row["auroc_ci95"]
        assert 0 < low < auroc < high < 1 and (auroc - low > high - auroc) == (auroc > 0.5)
        centres.append(auroc)
        shares.append(high - low)
    low, high = metrics["macro_auroc_ci95"]
    assert low < metrics["macro_auroc"] < high
    # the classes' errors are correlated: the macro interval is no wider than the mean of the per-class
    # ones, and narrower than any single one only as far as averaging four classes allows
    assert high - low < np.mean(shares)
    # scores that separate a class perfectly leave DeLong no variance: no interval rather than 1.00-1.00;
    # one image of a class gives none either
    perfect = classification_metrics(np.array([0, 0, 1, 1]), _one_hot(np.array([0, 0, 1, 1]), 0.9))
    assert (
        perfect["per_class"]["COVID"]["auroc"] == 1.0 and perfect["per_class"]["COVID"]["auroc_ci95"] is None
    )
    assert perfect["macro_auroc_ci95"] is None
    single = classification_metrics(np.array([0, 1, 1, 1]), _one_hot(np.array([1, 1, 0, 1]), 0.9))
    assert single["per_class"]["COVID"]["auroc_ci95"] is None and single["macro_auroc_ci95"] is None
    # one class separated perfectly, the others not: the mean has no interval either (it would narrow it)
    probs = probs.copy()
    probs[:, 0] = np.where(labels == 0, 0.9, 0.02)
    probs[:, 1:] *= ((1 - probs[:, 0]) / probs[:, 1:].sum(axis=1))[:, None]
    mixed = classification_metrics(labels, probs)
    assert mixed["per_class"]["COVID"]["auroc_ci95"] is None and mixed["per_class"]["Normal"]["auroc_ci95"]
    assert mixed["macro_auroc_ci95"] is None


def test_single_class_labels_give_no_auroc() -> None:
    labels = np.zeros(10, dtype=int)
    metrics = classification_metrics(labels, _one_hot(labels, 0.8), with_curves=True)
    assert metrics["macro_auroc"] is None
    assert metrics["roc"] == {}


def test_random_probabilities_score_chance_auroc() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 20_000)
    probs = rng.dirichlet(np.ones(4), size=20_000)
    metrics = classification_metrics(labels, probs)
    assert metrics["macro_auroc"] == pytest.approx(0.5, abs=0.02)
    assert metrics["accuracy"] == pytest.approx(0.25, abs=0.02)


def test_ece_of_an_overconfident_classifier() -> None:
    labels = np.zeros(1000, dtype=int)
    predicted = np.where(np.arange(1000) < 600, 0, 2)  # always 0.9 confident, right 60% of the time
    metrics = classification_metrics(labels, _one_hot(predicted, 0.9))
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["ece"] == pytest.approx(0.3)


def test_reliability_bins() -> None:
    labels, probs = _predictions(500, seed=4)
    bins = reliability_bins(labels, probs)
    assert bins["n_bins"] == len(bins["bins"]) == 15
    assert sum(row["count"] for row in bins["bins"]) == 500
    assert bins["ece"] == pytest.approx(classification_metrics(labels, probs)["ece"])
    confidence = probs.max(axis=1)
    for row in bins["bins"]:
        inside = (confidence > row["lower"]) & (confidence <= row["upper"])
        assert row["count"] == inside.sum()
        if row["count"]:
            assert row["confidence"] == pytest.approx(confidence[inside].mean())
            assert row["lower"] < row["confidence"] <= row["upper"]
        else:
            assert row["confidence"] is None and row["accuracy"] is None
    assert reliability_bins(labels, probs, n_bins=1)["bins"][0]["count"] == 500


def test_ece_floor_is_what_perfectly_calibrated_probabilities_measure() -> None:
    rng = np.random.default_rng(7)
    _, probs = _predictions(600, seed=6)
    floor = ece_floor(probs)
    assert floor == ece_floor(probs)  # a fixed seed: the same figure every time
    # Labels drawn from the probabilities themselves: calibrated by construction, yet their ECE is not 0.
    eces = [
        classification_metrics((rng.random((600, 1)) > probs.cumsum(axis=1)).sum(axis=1).clip(0, 3), probs)[
            "ece"
        ]
        for _ in range(100)
    ]
    assert np.mean(eces) == pytest.approx(floor["ece_floor"], rel=0.1)
    assert np.std(eces) == pytest.approx(floor["ece_floor_sd"], rel=0.3)
    # Fewer images, a higher floor (about 1/sqrt(n)); 24 images show about 0.2 from noise alone.
    assert ece_floor(probs[:24])["ece_floor"] > 3 * floor["ece_floor"]
    # A miscalibrated model stands far above its floor.
    labels = np.where(np.arange(1000) < 600, 0, 1)
    metrics = classification_metrics(labels, _one_hot(np.zeros(1000, dtype=int), 0.9))
    assert metrics["ece"] == pytest.approx(0.3) and metrics["ece_floor"] < 0.03
    bins = reliability_bins(labels, _one_hot(np.zeros(1000, dtype=int), 0.9))
    assert bins["ece_floor"] == metrics["ece_floor"] and bins["ece_floor_sd"] == metrics["ece_floor_sd"]
    with pytest.raises(ValueError, match="at least one"):
        ece_floor(np.zeros((0, 4)))


def test_roc_curves() -> None:
    labels, probs = _predictions(300, seed=5)
    curves = roc_curves(labels, probs)
    assert list(curves) == list(CLASSES)
    for k, name in enumerate(CLASSES):
        fpr, tpr = np.array(curves[name]["fpr"]), np.array(curves[name]["tpr"])
        assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
        assert np.trapezoid(tpr, fpr) == pytest.approx(curves[name]["auc"])
        assert curves[name]["auc"] == pytest.approx(roc_auc_score(labels == k, probs[:, k]))
    assert classification_metrics(labels, probs, with_curves=True)["roc"] == curves


def test_custom_classes() -> None:
    labels = np.array([0, 1, 1, 0])
    metrics = classification_metrics(labels, _one_hot(labels, 0.8, num_classes=2), classes=("a", "b"))
    assert list(metrics["per_class"]) == ["a", "b"] and metrics["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("labels", "probs", "message"),
    [
        (np.array([], dtype=int), np.zeros((0, 4)), "empty"),
        (np.array([0, 4]), np.full((2, 4), 0.25), "labels must lie"),
        (np.array([0, 1]), np.full((2, 3), 1 / 3), "3 columns"),
        (np.array([0, 1]), np.full((3, 4), 0.25), "rows like labels"),
        (np.array([0.0, 1.0]), np.full((2, 4), 0.25), "integer"),
        (np.array([0, 1]), np.array([[3.0, -1.0, 0.5, 0.2]] * 2), "non-negative"),
        (np.array([0, 1]), np.array([[3.0, 1.0, 0.5, 0.2]] * 2), "softmax"),
        (np.array([0, 1]), np.array([[np.nan, 1.0, 0.0, 0.0]] * 2), "finite"),
    ],
)
def test_bad_inputs_raise(labels: np.ndarray, probs: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(labels, probs)


def test_segmentation_metrics_on_known_masks() -> None:
    true = np.zeros((3, 4, 4))
    pred = np.zeros((3, 4, 4))
    true[0, :2] = 1  # 8 pixels; prediction covers 4 of them plus 4 outside
    pred[0, 1:3] = 0.9
    true[1, :, :2] = 255  # 0/255 masks binarise too: a perfect match
    pred[1, :, :2] = 255
    # image 2: both empty, which scores 1
    result = segmentation_metrics(pred, true)
    assert result["n"] == 3
    assert result["dice"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert result["iou"] == pytest.approx((4 / 12 + 1 + 1) / 3)
    missed = segmentation_metrics(np.zeros((4, 4)), true[0])
    assert missed == {"dice": 0.0, "iou": 0.0, "n": 1}
    assert segmentation_metrics(pred[0], true[0], threshold=0.95)["dice"] == 0.0


def test_segmentation_metrics_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="differs"):
        segmentation_metrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="at least one"):
        segmentation_metrics(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))


def test_best_by_validation_prefers_the_lower_loss_among_scores_one_image_apart() -> None:
    # A run's checkpoints as the demo saw them (41 validation images): the early epoch's macro-F1 was one
    # image's luck; its loss was higher and it did worse on 600 other images (0.76 vs 0.87).
    epochs = [
        {"epoch": 2, "val_score": 0.9500, "val_loss": 0.252, "val_confusion_matrix": [[10, 0], [1, 30]]},
        {"epoch": 5, "val_score": 0.9495, "val_loss": 0.198, "val_confusion_matrix": [[10, 0], [1, 30]]},
        {"epoch": 8, "val_score": 0.9273, "val_loss": 0.194, "val_confusion_matrix": [[10, 0], [1, 30]]},
    ]
    assert score_resolution(epochs[0]) == pytest.approx(1 / 41)
    assert best_by_validation(epochs, dict)["epoch"] == 8
    assert [e["epoch"] for e in rank_by_validation(epochs, dict)] == [8, 5, 2]
    clearly_better = {"epoch": 3, "val_score": 0.99, "val_loss": 0.40, "val_count": 41}
    assert best_by_validation([*epochs, clearly_better], dict) is clearly_better
    no_score = {"epoch": 1, "val_score": None, "val_loss": 0.01}
    assert best_by_validation([no_score, *epochs], dict)["epoch"] == 8  # a missing score ranks last
    assert best_by_validation([no_score], dict) is no_score and best_by_validation([], dict) is None


def test_within_one_image_counts_the_images_two_models_differ_on() -> None:
    """1/n ranked two models apart on one image of a rare class (2.7/n of macro-F1); the largest effect one
    image could have (0.14 on 12 images) then tied two models 4 images apart, and the worse one, with the
    lower loss, won. Where both confusion matrices are known, "one image" is one image."""
    from cxrcore.metrics import best_by_validation, images_apart

    good = {"val_score": 0.375, "val_loss": 1.283, "val_confusion_matrix": [[2, 1, 0, 0], [1, 1, 1, 0],
            [0, 1, 1, 1], [0, 0, 1, 2]]}  # fmt: skip
    worse = {"val_score": 0.236, "val_loss": 1.266, "val_confusion_matrix": [[1, 2, 0, 0], [1, 0, 2, 0],
             [0, 2, 0, 1], [1, 0, 1, 1]]}  # fmt: skip
    assert images_apart(good, worse) == 4
    assert best_by_validation([worse, good], dict) is good  # 4 images apart: the score decides
    near = {**worse, "val_score": 0.300, "val_confusion_matrix": [[2, 1, 0, 0], [1, 1, 1, 0],
            [0, 1, 1, 1], [0, 0, 2, 1]]}  # fmt: skip
    assert images_apart(good, near) == 1
    assert best_by_validation([good, near], dict) is near  # one image apart: the lower loss


def test_as_many_images_right_and_a_score_under_one_image_apart_is_a_tie() -> None:
    """Seed 0 of the demo (41 validation images): two models each missed two images, different ones. The
    matrices are two images apart, and macro-F1 0.00006 had picked the one with the higher validation loss."""
    from cxrcore.metrics import images_apart, within_one_image

    resnet = {"val_score": 0.95227, "val_loss": 0.188, "val_confusion_matrix": [[10, 0, 0, 0], [0, 9, 1, 0],
              [0, 0, 11, 0], [0, 0, 1, 9]]}  # fmt: skip
    dual = {"val_score": 0.95221, "val_loss": 0.101, "val_confusion_matrix": [[10, 0, 0, 0], [0, 9, 1, 0],
            [0, 1, 10, 0], [0, 0, 0, 10]]}  # fmt: skip
    assert images_apart(resnet, dual) == 2
    assert best_by_validation([resnet, dual], dict) is dual
    assert [m["val_loss"] for m in rank_by_validation([resnet, dual], dict)] == [0.101, 0.188]
    # One more image wrong is not a tie, however close the score; nor is a score a whole image behind.
    fewer = {**dual, "val_confusion_matrix": [[10, 0, 0, 0], [0, 9, 1, 0], [0, 1, 9, 1], [0, 0, 0, 10]]}
    assert not within_one_image(fewer, resnet) and best_by_validation([resnet, fewer], dict) is resnet
    behind = {**dual, "val_score": 0.95227 - 1.5 / 41}
    assert not within_one_image(behind, resnet) and best_by_validation([resnet, behind], dict) is resnet


def test_a_class_auroc_interval_covers_the_true_auroc_at_few_positives() -> None:
    """A study on 130 real X-rays (session 52) found the per-class AUROC interval too short at 4-5
    positives: on the AUROC's own scale, clipped to 1, it covered a true 0.90 in about 80% of samples. On
    the logit scale it covers it in about 95% (binormal scores, seeded)."""
    from scipy.stats import norm

    from cxrcore.metrics import _auroc_influence, _auroc_interval, _binary_auroc

    rng, true, intervals = np.random.default_rng(3), 0.9, []
    shift = np.sqrt(2) * norm.ppf(true)  # binormal: positives N(shift, 1), negatives N(0, 1)
    positive = np.arange(45) < 5
    for _ in range(400):
        scores = np.concatenate([rng.normal(shift, 1, 5), rng.normal(0, 1, 40)])
        auroc, terms = _binary_auroc(positive, scores), _auroc_influence(positive, scores)
        if (interval := _auroc_interval([auroc], [terms])) is not None:  # none: separated
            intervals.append(interval)
    covered = np.mean([low <= true <= high for low, high in intervals])
    assert len(intervals) > 350 and covered >= 0.9, covered
