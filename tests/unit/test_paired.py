"""`cxr compare`: two `cxr evaluate` folders of the same images, compared image by image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrcore.cli import main
from cxrcore.evaluate.paired import ComparisonError, compare_evaluations
from cxrcore.labels import CLASSES
from cxrcore.metrics import mcnemar_exact


def write_evaluation(
    folder: Path, labels: list[str], predicted: list[str], weights: str = "a" * 64, fingerprint: str = "f1"
) -> Path:
    """A folder as `cxr evaluate --out` writes it, reduced to what `cxr compare` reads."""
    folder.mkdir(parents=True)
    hashes = [f"{i:064x}" for i in range(len(labels))]
    pd.DataFrame({"file": [f"{i}.png" for i in range(len(labels))], "sha256": hashes, "label": labels,
                  "predicted": predicted}).to_csv(folder / "predictions.csv", index=False)  # fmt: skip
    evaluated = {"model": f"model-{folder.name}", "weights_sha256": weights, "dataset": "/data/site",
                 "fingerprint": fingerprint, "split": "test", "relation": "external"}  # fmt: skip
    metrics = {"classes": list(CLASSES), "per_class": {}, "evaluated": evaluated}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_a_candidate_right_where_production_was_wrong_is_shown_better_with_a_paired_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """40 images, each class 10: both right on 24, the candidate alone on 12, production alone on 2."""
    labels = [CLASSES[i % 4] for i in range(40)]
    wrong = {label: CLASSES[(CLASSES.index(label) + 1) % 4] for label in CLASSES}
    first = [label if i < 26 else wrong[label] for i, label in enumerate(labels)]  # right: 0-25
    second = [label if i < 24 or (i >= 26 and i < 38) else wrong[label] for i, label in enumerate(labels)]
    a = write_evaluation(tmp_path / "production", labels, first)
    b = write_evaluation(tmp_path / "candidate", labels, second, weights="b" * 64)
    result = compare_evaluations(a, b)
    assert (result["n"], result["only_first_right"], result["only_second_right"]) == (40, 2, 12)
    assert result["mcnemar_p"] == pytest.approx(mcnemar_exact(2, 12)) and result["mcnemar_p"] < 0.05
    assert result["accuracy"] == {"first": 26 / 40, "second": 36 / 40}
    low, high = result["accuracy_difference_ci95"]
    assert 0 < low < 0.25 < high  # the difference, +0.25, inside its interval, which excludes 0
    assert result["verdict"].startswith("The second model is better on these images")
    assert sum(row["only_second"] for row in result["per_class"].values()) == 12
    # one test per class: adjusted for there being four (Holm), never below the class's own p
    rows = result["per_class"].values()
    assert all(row["mcnemar_p"] <= row["mcnemar_p_holm"] <= 1 for row in rows)
    assert min(row["mcnemar_p_holm"] for row in rows) == pytest.approx(
        4 * min(row["mcnemar_p"] for row in rows)
    )
    assert compare_evaluations(a, b) == result  # the same intervals again: a fixed seed

    assert main(["compare", str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    assert "images both scored: 40" in printed and "McNemar exact p = 0.0129" in printed
    assert "The second model is better on these images" in printed
    assert main(["compare", str(a), str(b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["only_second_right"] == 12


def test_two_models_apart_on_few_images_are_not_called_different(tmp_path: Path) -> None:
    labels = [CLASSES[i % 4] for i in range(12)]
    first = list(labels)
    first[0] = first[1] = CLASSES[3]
    second = list(labels)
    second[2] = CLASSES[0]
    result = compare_evaluations(
        write_evaluation(tmp_path / "a", labels, first), write_evaluation(tmp_path / "b", labels, second)
    )
    assert (result["only_first_right"], result["only_second_right"]) == (1, 2)
    assert result["verdict"].startswith("No difference shown on these images (McNemar exact p = 1)")
    assert "12 images: only a large difference can show" in result["notes"]
    assert "both evaluations scored the same weights: one model, not two" in result["notes"]


def test_the_images_are_paired_by_their_hash_and_other_images_left_out(tmp_path: Path) -> None:
    """The second evaluation scored the same images in another order, and two more."""
    labels = [CLASSES[i % 4] for i in range(8)]
    a = write_evaluation(tmp_path / "a", labels, labels)
    b = write_evaluation(
        tmp_path / "b", [*labels, "COVID", "Normal"], [*labels, "COVID", "COVID"], fingerprint="f2"
    )
    frame = pd.read_csv(b / "predictions.csv", dtype=str).iloc[::-1]  # reversed: joined by sha256, not by row
    frame.to_csv(b / "predictions.csv", index=False)
    result = compare_evaluations(a, b)
    assert (result["n"], result["only_in_first"], result["only_in_second"]) == (8, 0, 2)
    assert result["accuracy"] == {"first": 1.0, "second": 1.0}
    assert any(note.startswith("the datasets differ (fingerprints f1 and f2)") for note in result["notes"])


def test_evaluations_that_cannot_be_compared_are_refused_saying_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = [CLASSES[i % 4] for i in range(8)]
    a = write_evaluation(tmp_path / "a", labels, labels)
    relabelled = write_evaluation(tmp_path / "relabelled", [CLASSES[(i + 1) % 4] for i in range(8)], labels)
    with pytest.raises(ComparisonError, match="8 of the 8 images both scored carry another true class"):
        compare_evaluations(a, relabelled)
    other = write_evaluation(tmp_path / "other", labels, labels)
    frame = pd.read_csv(other / "predictions.csv", dtype=str)
    frame["sha256"] = [f"{i + 100:064x}" for i in range(8)]
    frame.to_csv(other / "predictions.csv", index=False)
    with pytest.raises(ComparisonError, match="no image is in both evaluations"):
        compare_evaluations(a, other)
    assert main(["compare", str(a), str(tmp_path / "nowhere")]) == 2
    assert "metrics.json is missing: give a folder `cxr evaluate --out` wrote" in capsys.readouterr().err
    old = write_evaluation(tmp_path / "old", labels, labels)
    frame = pd.read_csv(old / "predictions.csv", dtype=str)
    frame.drop(columns="sha256").to_csv(old / "predictions.csv", index=False)
    with pytest.raises(ComparisonError, match="lacks the columns sha256"):
        compare_evaluations(a, old)
    assert np.isfinite(compare_evaluations(a, a)["mcnemar_p"])


def test_the_accuracy_interval_agrees_with_the_test_and_the_warnings_are_kept(tmp_path: Path) -> None:
    """A review (session 52) on 13 real test images: a percentile bootstrap printed +0.308 (+0.077 to +0.538)
    beside "No difference shown (p = 0.125)", and the comparison dropped what each evaluation had said of
    the model having trained on some of the images and of sources that separate the classes."""
    labels = [CLASSES[i % 4] for i in range(13)]
    first = [CLASSES[(CLASSES.index(label) + 1) % 4] if i < 4 else label for i, label in enumerate(labels)]
    a = write_evaluation(tmp_path / "a", labels, first)
    b = write_evaluation(tmp_path / "b", labels, labels, weights="b" * 64)
    metrics = json.loads((b / "metrics.json").read_text())
    metrics["evaluated"]["sources_separate_classes"] = "every source holds one class only"
    overlap = {"in_split": {"train": 5}}
    metrics["external"] = {"dataset": "/data/site", "n": 13, "overlap_with_training_data": overlap}
    (b / "metrics.json").write_text(json.dumps(metrics))
    result = compare_evaluations(a, b)
    assert (result["only_first_right"], result["only_second_right"], result["mcnemar_p"]) == (0, 4, 0.125)
    low, high = result["accuracy_difference_ci95"]
    assert 0 < low < 4 / 13 < high and result["verdict"].startswith("No difference shown")
    # the interval and the exact test disagree at this edge: said, not left for the reader to reconcile
    assert any(note.startswith("the accuracy difference's interval excludes 0 while McNemar's exact test")
               for note in result["notes"])  # fmt: skip
    assert "the evaluations' data: every source holds one class only" in result["notes"]
    said = "the second evaluation: Not a clean external validation: the model was trained or validated on"
    assert any(note.startswith(said) for note in result["notes"])


def test_the_accuracy_difference_interval_covers_the_true_difference_and_is_never_0_wide() -> None:
    """A review (session 56): the interval exact and conditional on the images exactly one model got right
    could not reach past ±m/n, was 0 wide where m was 0, and covered the true difference 75-84 % of the time
    at 8-40 images (46 % at 50). Newcombe's paired interval, simulated here on pairs of models whose answers
    are correlated as two classifiers' are: at least 95 % at every size, and 0 wide never."""
    from cxrcore.evaluate.paired import paired_difference_interval

    rng = np.random.default_rng(0)
    cases = [(8, 0.05, 0.15, 0.6), (13, 0.05, 0.15, 0.6), (40, 0.02, 0.08, 0.8), (50, 0.0, 0.05, 0.8)]
    for n, only_first, only_second, both in [*cases, (100, 0.05, 0.10, 0.7)]:
        true, covered = only_second - only_first, 0
        for _ in range(1000):
            draw = rng.random(n)
            b = int((draw < only_first).sum())
            c = int(((draw >= only_first) & (draw < only_first + only_second)).sum())
            a = int(((draw >= only_first + only_second) & (draw < only_first + only_second + both)).sum())
            low, high = paired_difference_interval(b, c, n, both_right=a)
            assert high > low  # never 0 wide: the old one was, whenever no image was right in one only
            covered += low - 1e-12 <= true <= high + 1e-12
        assert covered >= 950, (n, covered)
    assert paired_difference_interval(0, 0, 10, both_right=10) == pytest.approx((-0.2775, 0.2775), abs=1e-3)


def test_a_predictions_file_naming_unknown_classes_is_refused(tmp_path: Path) -> None:
    labels = [CLASSES[i % 4] for i in range(8)]
    a = write_evaluation(tmp_path / "a", labels, labels)
    b = write_evaluation(tmp_path / "b", labels, [*labels[:7], "Pneumothorax"])
    with pytest.raises(ComparisonError, match=r"the second evaluation's predictions\.csv names .*Pneumoth"):
        compare_evaluations(a, b)
    frame = pd.read_csv(a / "predictions.csv", dtype=str)
    frame.loc[0, "label"] = ""  # a cell emptied: read as missing
    frame.to_csv(a / "predictions.csv", index=False)
    with pytest.raises(ComparisonError, match=r"the first evaluation's predictions\.csv names"):
        compare_evaluations(a, write_evaluation(tmp_path / "c", labels, labels))


def test_a_macro_f1_interval_of_no_width_is_explained_without_claiming_the_answers_agreed(
    tmp_path: Path,
) -> None:
    """A verifier (session 56): eight images both models got wrong, each with another wrong class, gave a
    0-wide macro-F1 interval (0 for both in every resample) under a note saying they answered alike."""
    labels = [CLASSES[i % 4] for i in range(8)]
    wrong_once = [CLASSES[(CLASSES.index(label) + 1) % 4] for label in labels]
    wrong_twice = [CLASSES[(CLASSES.index(label) + 2) % 4] for label in labels]
    a = write_evaluation(tmp_path / "a", labels, wrong_once)
    differ = compare_evaluations(a, write_evaluation(tmp_path / "b", labels, wrong_twice, weights="b" * 64))
    alike = compare_evaluations(a, write_evaluation(tmp_path / "c", labels, wrong_once, weights="c" * 64))
    for result, same in ((differ, False), (alike, True)):
        low, high = result["macro_f1_difference_ci95"]
        assert low == high == 0.0 and result["same_answers"] is same
        (note,) = [n for n in result["notes"] if "bootstrap interval is 0 wide" in n]
        assert note.startswith("the two models gave the same answer on every image") is same
