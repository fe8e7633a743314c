"""Two models scored on the same images, compared image by image: `cxr compare EVAL_A EVAL_B`.

Each folder is what `cxr evaluate` wrote (metrics.json, predictions.csv). The images are joined by their
content hash (`sha256`), so the comparison is paired: the figures are the two models' on the images both
scored; the test of "is one better" is McNemar's exact test on the images exactly one of them got right,
the accuracy difference's 95% interval Newcombe's for paired proportions (`paired_difference_interval`), and
the macro-F1 difference's a paired bootstrap's (F1 has no exact counterpart). Two models' own
accuracy intervals are the wrong yardstick for their difference: on the same images their errors are
correlated, and two overlapping intervals can hide a difference the paired test finds (or the reverse).

This is what a site asks before promoting a fine-tune over the shipped model, or a candidate over
production: `cxr evaluate` both on the same split of its own data, then compare.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrcore.metrics import confusion_scores, mcnemar_exact

RESAMPLES = 2000
"""Paired bootstrap resamples of the images for the macro-F1 difference's 95% interval (fixed seed: the same
two folders give the same interval)."""
SIGNIFICANCE = 0.05


class ComparisonError(ValueError):
    """Two evaluation folders that cannot be compared (missing files, other classes, no image in common)."""


def compare_evaluations(first: str | Path, second: str | Path, resamples: int = RESAMPLES) -> dict[str, Any]:
    """The paired comparison of two `cxr evaluate` folders: what each scored, the images both scored,
    each model's accuracy and macro-F1 on them, the differences (second minus first) with 95% intervals,
    McNemar's exact p on the images exactly one got right, per class the recalls and those images, and
    a verdict in words."""
    a, b = _read(Path(first)), _read(Path(second))
    if a["classes"] != b["classes"]:
        raise ComparisonError(
            f"the two evaluations score other classes ({', '.join(a['classes'])} against "
            f"{', '.join(b['classes'])}): they are not of the same task"
        )
    classes = a["classes"]
    joined = a["rows"].merge(b["rows"], on="sha256", suffixes=("_a", "_b"))
    if joined.empty:
        raise ComparisonError(
            f"no image is in both evaluations ({len(a['rows'])} and {len(b['rows'])} images, joined by their "
            "sha256): score both models on the same dataset and split"
        )
    index = {name: k for k, name in enumerate(classes)}
    for column in ("label_a", "label_b", "predicted_a", "predicted_b"):
        if unknown := sorted({str(value) for value in joined[column] if value not in index}):
            which = "first" if column.endswith("_a") else "second"
            raise ComparisonError(
                f"the {which} evaluation's predictions.csv names classes its metrics.json does not "
                f"({', '.join(unknown[:5])}): it was edited or cut short; run `cxr evaluate` again"
            )
    relabelled = int((joined["label_a"] != joined["label_b"]).sum())
    if relabelled:
        raise ComparisonError(
            f"{relabelled} of the {len(joined)} images both scored carry another true class in each: the "
            "evaluations read differently labelled datasets, so their scores cannot be compared"
        )
    labels = joined["label_a"].map(index).to_numpy()
    predicted_a = joined["predicted_a"].map(index).to_numpy()
    predicted_b = joined["predicted_b"].map(index).to_numpy()
    right_a, right_b = predicted_a == labels, predicted_b == labels
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    n = len(labels)
    rng = np.random.default_rng(0)
    draws = (rng.integers(0, n, size=n) for _ in range(resamples))  # one at a time: n may be thousands
    accuracy = {"first": float(right_a.mean()), "second": float(right_b.mean())}
    macro_f1 = {
        "first": _macro_f1(labels, predicted_a, classes),
        "second": _macro_f1(labels, predicted_b, classes),
    }
    f1_diffs = np.asarray(
        [
            _macro_f1(labels[draw], predicted_b[draw], classes)
            - _macro_f1(labels[draw], predicted_a[draw], classes)
            for draw in draws
        ]
    )
    p_value = mcnemar_exact(only_a, only_b)
    per_class = {}
    for k, name in enumerate(classes):
        mine = labels == k
        if not mine.any():
            continue
        first_only = int((right_a & ~right_b & mine).sum())
        second_only = int((right_b & ~right_a & mine).sum())
        per_class[name] = {
            "n": int(mine.sum()),
            "recall_first": float(right_a[mine].mean()),
            "recall_second": float(right_b[mine].mean()),
            "only_first": first_only,
            "only_second": second_only,
            "mcnemar_p": mcnemar_exact(first_only, second_only),
        }
    # one test per class: Holm's adjustment keeps the chance of any false "differs" at 5 % across them
    for name, adjusted in holm([row["mcnemar_p"] for row in per_class.values()], list(per_class)).items():
        per_class[name]["mcnemar_p_holm"] = adjusted
    result: dict[str, Any] = {
        "first": a["described"],
        "second": b["described"],
        "classes": classes,
        "n": n,
        "only_in_first": len(a["rows"]) - n,
        "only_in_second": len(b["rows"]) - n,
        "accuracy": accuracy,
        "accuracy_difference": accuracy["second"] - accuracy["first"],
        "accuracy_difference_ci95": paired_difference_interval(
            only_a, only_b, n, int((right_a & right_b).sum())
        ),
        "macro_f1": macro_f1,
        "macro_f1_difference": macro_f1["second"] - macro_f1["first"],
        "macro_f1_difference_ci95": _interval(f1_diffs),
        "same_answers": bool((predicted_a == predicted_b).all()),
        "only_first_right": only_a,
        "only_second_right": only_b,
        "mcnemar_p": p_value,
        "per_class": per_class,
        "resamples": resamples,
    }
    result["notes"] = _notes(a, b, result)
    result["verdict"] = _verdict(result)
    return result


def format_comparison(result: Mapping[str, Any]) -> str:
    """The comparison as `cxr compare` prints it: what was compared, a table, the verdict, the notes."""
    from cxrcore.tables import format_table

    first, second = result["first"], result["second"]
    lines = [
        f"first:  {first['model']} on {first['dataset']} (split {first['split']})",
        f"second: {second['model']} on {second['dataset']} (split {second['split']})",
        f"images both scored: {result['n']}",
    ]
    low, high = result["accuracy_difference_ci95"]
    f1_low, f1_high = result["macro_f1_difference_ci95"]
    rows = [
        ["accuracy", _f(result["accuracy"]["first"]), _f(result["accuracy"]["second"]),
         f"{result['accuracy_difference']:+.3f} ({low:+.3f} to {high:+.3f})"],
        ["macro-F1", _f(result["macro_f1"]["first"]), _f(result["macro_f1"]["second"]),
         f"{result['macro_f1_difference']:+.3f} ({f1_low:+.3f} to {f1_high:+.3f})"],
    ]  # fmt: skip
    for name, row in result["per_class"].items():
        rows.append(
            [f"recall {name} (n={row['n']})", _f(row["recall_first"]), _f(row["recall_second"]),
             f"{row['recall_second'] - row['recall_first']:+.3f}; right in one only: "
             f"{row['only_first']} / {row['only_second']}"]
        )  # fmt: skip
    lines.append(format_table(["", "first", "second", "second − first (95% CI where given)"], rows))
    lines.append(
        f"right in one only: first {result['only_first_right']}, second {result['only_second_right']} "
        f"(McNemar exact p = {result['mcnemar_p']:.3g})"
    )
    lines.append(result["verdict"])
    lines += [f"NOTE: {note}" for note in result["notes"]]
    return "\n".join(lines)


def _read(folder: Path) -> dict[str, Any]:
    import pandas as pd

    metrics_path, predictions_path = folder / "metrics.json", folder / "predictions.csv"
    for path in (metrics_path, predictions_path):
        if not path.is_file():
            raise ComparisonError(f"{path} is missing: give a folder `cxr evaluate --out` wrote")
    try:
        metrics = json.loads(metrics_path.read_text())
        # as text: a hash of digits alone (or a class named "1") must not be read as a number
        rows = pd.read_csv(predictions_path, dtype={"sha256": str, "label": str, "predicted": str})
    except (OSError, ValueError) as exc:
        raise ComparisonError(f"{folder}: cannot read its evaluation ({exc})") from exc
    if "per_class" not in metrics or "classes" not in metrics:
        raise ComparisonError(f"{folder} is not a classifier's evaluation (a segmenter's has no classes)")
    missing = {"sha256", "label", "predicted"} - set(rows.columns)
    if missing:
        raise ComparisonError(
            f"{predictions_path} lacks the columns {', '.join(sorted(missing))} (an older cxr wrote it?): "
            "run `cxr evaluate` again"
        )
    total = len(rows)
    rows = rows.drop_duplicates("sha256")  # an image kept twice in a dataset counts once in the pairing
    evaluated = metrics.get("evaluated") or {}
    described = {
        "folder": str(folder),
        "model": evaluated.get("model", "?"),
        "weights_sha256": evaluated.get("weights_sha256"),
        "dataset": evaluated.get("dataset", "?"),
        "fingerprint": evaluated.get("fingerprint"),
        "split": evaluated.get("split", "?"),
        "relation": evaluated.get("relation"),
        "note": evaluated.get("note"),
        "sources_separate_classes": evaluated.get("sources_separate_classes"),
        "seen_in_training": _seen(metrics),
        "images": total,
        "repeated": total - len(rows),  # rows of an image scored before (the same content): counted once
    }
    classes = [str(name) for name in metrics["classes"]]
    return {"rows": rows[["sha256", "label", "predicted"]], "classes": classes, "described": described}


def paired_difference_interval(
    only_first: int, only_second: int, n: int, both_right: int | None = None
) -> tuple[float, float]:
    """A 95% interval of the accuracy difference (second minus first) on `n` paired images: Newcombe's
    square-and-add interval for paired proportions (his method 10, Stat Med 1998;17:2635; Fagerland et al.,
    Statistical Analysis of Contingency Tables, ch. 8), from each model's Wilson interval and the correlation
    of their answers (with its continuity correction). `both_right` (the images both got right) defaults to
    every image that only one did not get right, as if no image were missed by both.

    It replaced an interval exact and conditional on the m images exactly one model got right (McNemar's
    own), which could never reach past ±m/n and was 0 wide where m was 0: a review (session 56) measured it
    covering the true difference 75-84 % of the time at 8-40 images, 46 % at 50; this one 95.9-99.7 % in
    simulations at 8-100 images, 94.9-100 % enumerated exactly at 8, 20 and 40 (a verifier, session 56). A
    percentile bootstrap before it had excluded 0 beside "no difference shown" (session 52: with none of the
    discordant images on one side it can never reach below 0). The verdict is McNemar's exact test; where the
    two disagree at the edge, `cxr compare` says so.

    >>> [round(x, 3) for x in paired_difference_interval(2, 12, 40, both_right=24)]  # McNemar p = 0.013
    [0.068, 0.415]
    >>> [round(x, 3) for x in paired_difference_interval(0, 0, 10, both_right=8)]  # alike on 10: not 0 wide
    [-0.236, 0.236]
    """
    from cxrcore.metrics import wilson_interval

    if n <= 0:
        return 0.0, 0.0
    a = n - only_first - only_second if both_right is None else both_right
    b, c = only_first, only_second  # the first's own hits, the second's
    d = n - a - b - c  # both wrong
    second, first = (a + c) / n, (a + b) / n
    second_interval, first_interval = wilson_interval(a + c, n), wilson_interval(a + b, n)
    assert second_interval is not None and first_interval is not None  # n > 0
    (l1, u1), (l2, u2) = second_interval, first_interval
    # the correlation of the two models' answers, continuity-corrected towards 0 where positive
    margins = (a + c) * (b + d) * (a + b) * (c + d)
    agreement = a * d - b * c
    if margins == 0 or 0 <= agreement <= n / 2:
        psi = 0.0
    else:
        psi = (agreement - n / 2 if agreement > n / 2 else agreement) / math.sqrt(margins)
    estimate = second - first
    below = (second - l1) ** 2 + (u2 - first) ** 2 - 2 * psi * (second - l1) * (u2 - first)
    above = (first - l2) ** 2 + (u1 - second) ** 2 - 2 * psi * (first - l2) * (u1 - second)
    return max(-1.0, estimate - math.sqrt(max(0.0, below))), min(1.0, estimate + math.sqrt(max(0.0, above)))


def holm(p_values: Sequence[float], names: Sequence[str]) -> dict[str, float]:
    """Holm's step-down adjustment of several p-values (one per class): each adjusted p is compared with the
    level as it is, and the chance of any false rejection among them stays at that level.

    >>> holm([0.01, 0.04, 0.03], ["a", "b", "c"])
    {'a': 0.03, 'c': 0.06, 'b': 0.06}
    """
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = {}, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[names[i]] = round(running, 12)
    return adjusted


def _seen(metrics: Mapping[str, Any]) -> str | None:
    """What the evaluation said of the model having trained on some of its images (its `external` block's
    verdict: not a clean validation), or None."""
    from cxrcore.evaluate.external import _not_clean

    external = metrics.get("external")
    if not isinstance(external, Mapping) or "overlap_with_training_data" not in external:
        return None
    try:
        said = _not_clean(external)
    except (KeyError, TypeError):  # an evaluation another cxr wrote, its block otherwise shaped
        return None
    return said[0] if said else None


def _macro_f1(labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> float:
    """Macro-F1 as `cxr evaluate` computes it (`metrics.confusion_scores`: the classes among `labels`)."""
    k = len(classes)
    matrix = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    return float(confusion_scores(matrix, classes)["macro_f1"])


def _interval(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _f(value: float) -> str:
    return f"{value:.3f}"


def _notes(a: Mapping[str, Any], b: Mapping[str, Any], result: Mapping[str, Any]) -> list[str]:
    first, second = a["described"], b["described"]
    notes = []
    if first["weights_sha256"] and first["weights_sha256"] == second["weights_sha256"]:
        notes.append("both evaluations scored the same weights: one model, not two")
    if first["fingerprint"] != second["fingerprint"]:
        notes.append(
            f"the datasets differ (fingerprints {first['fingerprint']} and {second['fingerprint']}): "
            f"compared on the {result['n']} images both scored"
        )
    if result["only_in_first"] or result["only_in_second"]:
        notes.append(
            f"{result['only_in_first']} images only the first scored and {result['only_in_second']} only the "
            "second are left out"
        )
    for which, described in (("first", first), ("second", second)):
        if described["note"]:
            notes.append(f"the {which} evaluation {described['note']}")
        if described["seen_in_training"]:  # the comparison is then of a model on some of its own images
            notes.append(f"the {which} evaluation: {described['seen_in_training']}")
    confounds = {d["sources_separate_classes"] for d in (first, second) if d["sources_separate_classes"]}
    notes += [f"the evaluations' data: {confound}" for confound in sorted(confounds)]
    if result["n"] < 30:
        notes.append(f"{result['n']} images: only a large difference can show")
    for which, described in (("first", first), ("second", second)):
        if described.get("repeated"):
            notes.append(
                f"the {which} evaluation has {described['repeated']} row(s) of an image it had already "
                "scored (the same content in another file): each image counts once here"
            )
    f1_low, f1_high = result["macro_f1_difference_ci95"]
    if f1_low == f1_high:
        alike = "the two models gave the same answer on every image: " if result["same_answers"] else ""
        notes.append(
            f"{alike}the macro-F1 difference's bootstrap interval is 0 wide (every resample gave the same "
            "difference), which says nothing of how they would differ on other images"
        )
    low, high = result["accuracy_difference_ci95"]
    excludes, m = low > 0 or high < 0, result["only_first_right"] + result["only_second_right"]
    if excludes != (result["mcnemar_p"] < SIGNIFICANCE):
        notes.append(
            "the accuracy difference's interval "
            + (
                "excludes 0 while McNemar's exact test does not reach"
                if excludes
                else "reaches 0 while McNemar's exact test finds"
            )
            + f" p < {SIGNIFICANCE} on the {m} images exactly one model got right: the two disagree at the "
            "edge (the exact test is the stricter on few such images, the interval allows for every image's "
            "chance); more images would settle it"
        )
    return notes


def _verdict(result: Mapping[str, Any]) -> str:
    only_a, only_b, p = result["only_first_right"], result["only_second_right"], result["mcnemar_p"]
    if only_a == only_b == 0:
        return "The two models got the same images right: no difference on these images."
    if p < SIGNIFICANCE:
        better = "second" if only_b > only_a else "first"
        return (
            f"The {better} model is better on these images: of the {only_a + only_b} images exactly one got "
            f"right, the {better} got {max(only_a, only_b)} (McNemar exact p = {p:.3g} < {SIGNIFICANCE})."
        )
    return (
        f"No difference shown on these images (McNemar exact p = {p:.3g}): of the {only_a + only_b} images "
        f"exactly one got right, the first got {only_a} and the second {only_b}; more images, or a larger "
        "difference, would be needed to tell them apart."
    )
