"""The evaluation report: the exact files written, valid PNGs, escaped self-contained HTML, metrics.json."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cxrcore.evaluate.external import DatasetRelation, compare_with_internal, external_block
from cxrcore.evaluate.report import (
    ReportSection,
    confusion_matrix_figure,
    evaluation_lead,
    external_sections,
    format_number,
    html_table,
    interval_text,
    metrics_table,
    plot_overlaid_curves,
    plot_training_curves,
    resume_note,
    training_curves_figure,
    write_evaluation_report,
    write_html_report,
)
from cxrcore.labels import CLASSES
from cxrcore.metrics import accuracy_interval, classification_metrics, segmentation_metrics

PLOTS = {"confusion_matrix", "confusion_matrix_normalized", "roc_curves", "reliability"}
CARD = {
    "architecture": "tiny_dual_cnn",
    "learning_rate": 3e-4,
    "note": "<script>alert('x')</script> & more",
    "input_spec": {"channels": ["image", "mask"], "size": 64},
}
HISTORY = [
    {"epoch": 1, "train_loss": 1.3, "val_loss": 1.2, "train_accuracy": 0.4, "val_accuracy": 0.45},
    {"epoch": 2, "train_loss": 0.9, "val_loss": 1.0, "train_accuracy": 0.6, "val_macro_f1": 0.5},
    {"epoch": 3, "train_loss": 0.7, "val_loss": None, "val_accuracy": 0.7, "val_macro_f1": 0.66},
]


def _metrics(seed: int, drop_class: int | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 300)
    if drop_class is not None:
        labels[labels == drop_class] = 0
    logits = rng.normal(size=(300, 4))
    logits[np.arange(300), labels] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return classification_metrics(labels, probs, with_curves=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One full report, shared by the tests that only read it (plotting is the slow part)."""
    extra = {
        "held-out source: <kermany>": _metrics(1, drop_class=3),
        "lung masks": segmentation_metrics(np.ones((2, 8, 8)), np.ones((2, 8, 8))),
        "calibration": {"temperature": 1.5, "note": None, "prior_note": "B: lifted <2.7×>"},
    }
    return write_evaluation_report(tmp_path_factory.mktemp("report"), _metrics(0), HISTORY, CARD, extra)


def test_report_writes_exactly_the_expected_files(report: dict[str, Path]) -> None:
    out = report["report"].parent
    expected = {*PLOTS, "training_curves", "metrics", "report"}
    assert set(report) == expected
    assert {path.name for path in out.iterdir()} == {
        *(f"{name}.png" for name in PLOTS),
        "training_curves.png",
        "metrics.json",
        "report.html",
    }
    for name, path in report.items():
        assert path.parent == out and path.stem == name


def test_plots_are_valid_pngs(report: dict[str, Path]) -> None:
    for path in report.values():
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
                assert image.format == "PNG" and min(image.size) > 200


def test_metrics_json_round_trips_with_extra_results(report: dict[str, Path]) -> None:
    saved = json.loads(report["metrics"].read_text())
    metrics = _metrics(0)
    assert {key: saved[key] for key in metrics} == json.loads(json.dumps(metrics))
    assert saved["held-out source: <kermany>"]["n"] == 300
    assert saved["lung masks"] == {"dice": 1.0, "iou": 1.0, "n": 2}


def test_html_is_self_contained_and_escaped(report: dict[str, Path]) -> None:
    text = report["report"].read_text(encoding="utf-8")
    for name in CLASSES:
        assert html.escape(name) in text
    assert "<script" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in text
    assert "tiny_dual_cnn" in text and "0.0003" in text  # card numbers to 6 significant figures
    # the card in words, one row per nested entry, lists joined
    assert (
        '<th scope="row">input › channels</th><td>image, mask</td>' in text
        and "&quot;channels&quot;" not in text
    )
    assert "held-out source: &lt;kermany&gt;" in text and "lung masks" in text
    # a block's sentences are paragraphs above its figures, not columns of them
    assert "<p>B: lifted &lt;2.7×&gt;</p>" in text and "<th>prior_note</th>" not in text
    assert "No ROC curve for Viral Pneumonia" not in text  # the main metrics have every class
    headers = re.findall(r"<th scope=\"col\">(.*?)</th>", text)
    assert headers[headers.index("accuracy") + 1] == "accuracy 95% CI"  # beside the accuracy
    assert {"balanced accuracy", "macro-F1", "ECE", "images", "F1", "Dice"} <= set(headers)
    # in words, not metric keys (a class's own name aside)
    assert not [header for header in headers if "_" in header.replace("Lung_Opacity", "")]
    assert '<th scope="col">predicted COVID</th>' in text  # the confusion matrix as text too
    assert 'alt="ROC curves, each class against the rest: COVID AUC' in text
    matrix = _metrics(0)["confusion_matrix"]
    assert f"<td>{interval_text(accuracy_interval(matrix))}</td>" in text
    sources = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(sources) == 5 and all(src.startswith("data:image/png;base64,") for src in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1]).startswith(b"\x89PNG")
    assert "http" not in text.replace("<!DOCTYPE html>", "")  # no external assets


def test_no_history_means_no_training_curves(tmp_path: Path) -> None:
    paths = write_evaluation_report(tmp_path, _metrics(2, drop_class=1))
    assert set(paths) == {*PLOTS, "metrics", "report"}
    assert not (tmp_path / "training_curves.png").exists()
    text = paths["report"].read_text()
    assert "Model card" not in text and "Training curves" not in text
    assert "No ROC curve for Lung_Opacity" in text


def test_a_resumed_run_is_marked_where_it_went_on_and_whether_its_learning_rate_jumped(
    tmp_path: Path,
) -> None:
    """A run given more --epochs goes on with its learning-rate schedule planned anew: the rate jumps up
    where it went on. The curves draw a dotted line there, and the report says which it was."""
    resumed = [*HISTORY[:2], {**HISTORY[2], "resumed_after": 2, "lr_replanned": True}]
    figure = training_curves_figure(resumed)
    for ax in figure.axes:
        (line,) = [
            line for line in ax.lines if line.get_linestyle() == ":" and len(set(line.get_xdata())) == 1
        ]
        assert line.get_xdata()[0] == 2.5 and line.get_label() == "resumed, learning rate re-planned"
        assert "resumed, learning rate re-planned" in [
            text.get_text() for text in ax.get_legend().get_texts()
        ]
    assert not [
        line
        for ax in training_curves_figure(HISTORY).axes
        for line in ax.lines
        if len(set(line.get_xdata())) == 1
    ]
    assert resume_note(HISTORY) is None
    again = [*resumed, {"epoch": 4, "resumed_after": 3, "lr_replanned": False}]
    assert resume_note(again) == (
        "Resumed after epoch 2, the learning-rate schedule planned anew (more --epochs, or other --workers "
        "or --batch-size): its rate jumps there; after epoch 3, the learning-rate schedule where it stood. "
        "Dotted lines mark them."
    )
    paths = write_evaluation_report(tmp_path, _metrics(3), resumed, CARD)
    assert f"<p>{html.escape(resume_note(resumed) or '')}</p>" in paths["report"].read_text()
    assert (
        "Resumed after"
        not in write_evaluation_report(tmp_path / "b", _metrics(3), HISTORY, CARD)["report"].read_text()
    )


def test_report_needs_curves_and_distinct_extra_names(tmp_path: Path) -> None:
    labels = np.array([0, 1, 2, 3])
    cheap = classification_metrics(labels, np.eye(4)[labels])
    with pytest.raises(ValueError, match="with_curves=True"):
        write_evaluation_report(tmp_path, cheap)
    with pytest.raises(ValueError, match="clash"):
        write_evaluation_report(tmp_path, _metrics(3), extra={"accuracy": {"n": 1}})
    with pytest.raises(ValueError, match="clash"):
        write_evaluation_report(tmp_path, _metrics(3), extra={"evaluated": {}}, evaluated={"split": "all"})


def test_external_sections_escape_and_lead_with_the_verdict() -> None:
    """The external validation's HTML without plotting, from the blocks cxrcore.evaluate.external writes."""
    metrics = classification_metrics(np.array([0, 0, 2, 2]), np.eye(4)[[0, 1, 2, 2]])
    relation = DatasetRelation("external", "f00", {"dataset": "own", "fingerprint": "abc"})
    overlap = {"checked": False, "reason": "cannot read it here: <gone>"}
    external = external_block(
        metrics, dataset="/data/<hospital>", split="all", relation=relation, overlap=overlap,
        temperature=1.5, masks="none",
    )  # fmt: skip
    reference = {"kind": "test", "source": "report", "accuracy": 0.99, "macro_f1": 0.99, "ece": 0.02}
    comparison = compare_with_internal(external, reference, CLASSES, ece=metrics["ece"])
    text = "".join(section.html for section in external_sections(external, comparison))
    assert "/data/&lt;hospital&gt;" in text and "&lt;gone&gt;" in text and "<gone>" not in text
    assert "Lung_Opacity: 1" in text  # predicted although absent
    assert '<th scope="col">internal (test)</th>' in text
    lead = evaluation_lead({"note": None}, comparison)
    assert lead.startswith('<p class="lead alert">Large drop') and lead.count("<p") == 1
    calm = compare_with_internal(external, {**reference, "accuracy": 0.8, "macro_f1": 0.7}, CLASSES, ece=0.1)
    note, verdict = evaluation_lead({"note": "includes <training> images"}, calm).split("\n")
    assert note.startswith('<p class="lead alert">This evaluation includes &lt;training&gt; images.')
    # within reach of the internal figures, but on 4 images not shown to beat chance: an alert all the same
    assert verdict.startswith('<p class="lead alert">Accuracy 0.80 internal (test)')
    assert "Not shown to beat chance on these images: accuracy 0.75 (95% CI 0.30–0.95) reaches" in verdict
    assert calm["no_better_than_chance"] is True


def test_metrics_table_rows() -> None:
    metrics = _metrics(4)
    rows = metrics_table(metrics)
    assert [row["class"] for row in rows] == [*CLASSES, "macro"]
    assert rows[-1] == {
        "class": "macro",
        "precision": metrics["macro_precision"],
        "recall": metrics["macro_recall"],
        "f1": metrics["macro_f1"],
        "support": 300,
        "auroc": metrics["macro_auroc"],
    }
    assert sum(row["support"] for row in rows[:-1]) == 300


def test_a_class_without_images_shows_no_recall_or_f1_and_the_macro_row_averages_the_others() -> None:
    """The real sample has no Lung_Opacity: its recall and F1 are undefined (a dash), not 0.000, and the
    macro row averages the three rows shown with figures."""
    labels = np.array([0, 0, 2, 2, 3, 3])
    probs = np.full((6, 4), 0.1)
    probs[np.arange(6), [0, 1, 2, 1, 3, 3]] = 0.7  # two images called Lung_Opacity, which has none here
    metrics = classification_metrics(labels, probs)
    rows = {row["class"]: row for row in metrics_table(metrics)}
    absent = rows["Lung_Opacity (no images here)"]
    assert absent["support"] == 0 and absent["recall"] is None and absent["f1"] is None
    assert absent["precision"] == 0.0  # both predictions of it were wrong
    labels, probs = labels[[0, 2, 4]], probs[[0, 2, 4]]  # now no image is called Lung_Opacity either
    absent = {row["class"]: row for row in metrics_table(classification_metrics(labels, probs))}[
        "Lung_Opacity (no images here)"
    ]
    assert absent["precision"] is None  # no call of it to be right or wrong: a dash, not 0.000
    shown = [rows[name]["f1"] for name in ("COVID", "Normal", "Viral Pneumonia")]
    assert rows["macro"]["f1"] == pytest.approx(np.mean(shown))


def test_html_table_formats_and_escapes() -> None:
    table = html_table([{"a": 0.12345, "b": 7, "c": None, "e": True}, {"a": "<b>", "d": [1, 2], "e": False}])
    assert table.startswith('<div class="table-wrap"><table>')  # wide tables scroll, not the page
    assert "".join(f'<th scope="col">{c}</th>' for c in "abced") in table
    # each row's first cell is its header: a screen reader names the row with every cell it reads
    assert '<th scope="row" class="num">0.123</th>' in table and '<td class="num">7</td>' in table
    assert "<td>—</td>" in table and '<th scope="row">&lt;b&gt;</th>' in table and "<pre>[" in table
    assert "<td>yes</td>" in table and "<td>no</td>" in table
    assert '<td class="num">3.2e-04</td>' in html_table([{"k": "lr", "lr": 3.2e-4}])


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (3.2e-4, "3.2e-04"),
        (1e-5, "1.0e-05"),
        (-0.004, "-4.0e-03"),
        (0.0, "0.000"),
        (0.01, "0.010"),
        (0.91349, "0.913"),
        (1.0, "1.000"),
        (12.345, "12.35"),
        (412.37, "412.4"),
        (1234.5, "1,234"),
        (2.5e9, "2.5e+09"),
        (float("nan"), "nan"),
        (11_689_512, "11,689,512"),
        (np.int64(300), "300"),
        (np.float32(0.5), "0.500"),
    ],
)
def test_format_number_uses_the_notation_the_magnitude_needs(value: Any, shown: str) -> None:
    assert format_number(value) == shown


def test_html_report_sections(tmp_path: Path) -> None:
    image = plot_training_curves([{"epoch": 1}], tmp_path / "empty.png")  # no known keys: "no data"
    section = ReportSection("A & B", html="<p>trusted</p>", images=[image], table=[{"x": 1.0}])
    path = write_html_report(tmp_path / "r.html", "T <1>", [section])
    text = path.read_text()
    assert "<h1>T &lt;1&gt;</h1>" in text and "<h2>A &amp; B</h2>" in text and "<p>trusted</p>" in text
    assert text.count("data:image/png;base64,") == 1 and "1.000" in text
    assert 'style="width:' not in text


def test_html_report_lead_and_image_width(tmp_path: Path) -> None:
    image = plot_training_curves([{"epoch": 1}], tmp_path / "empty.png")
    section = ReportSection("Plots", images=[image, image], image_width=300)
    text = write_html_report(tmp_path / "r.html", "T", [section], lead='<p class="lead">Won</p>').read_text()
    assert text.index("<h1>T</h1>") < text.index('<p class="lead">Won</p>') < text.index("<h2>Plots</h2>")
    assert text.count('<img alt="empty" style="width:300px" src="data:image/png;base64,') == 2


def test_confusion_matrix_title() -> None:
    matrix = np.eye(len(CLASSES), dtype=int) * 5
    assert confusion_matrix_figure(matrix, CLASSES, False).axes[0].get_title() == "Confusion matrix (counts)"
    titled = confusion_matrix_figure(matrix, CLASSES, False, title="dual_cnn — test, counts")
    assert titled.axes[0].get_title() == "dual_cnn — test, counts"


def test_a_class_with_no_image_has_no_fractions_in_the_normalised_matrix() -> None:
    counts = np.array([[5, 1, 0, 0], [0, 0, 0, 0], [0, 2, 4, 0], [0, 0, 0, 3]])
    normalized = counts / np.maximum(counts.sum(axis=1), 1)[:, None]  # as classification_metrics writes it
    ax = confusion_matrix_figure(normalized, CLASSES, True).axes[0]
    texts = [text.get_text() for text in ax.texts]
    assert texts[4:8] == ["–"] * 4 and texts[:4] == ["0.83", "0.17", "0.00", "0.00"]
    labels = [label.get_text() for label in ax.get_yticklabels()]
    assert labels[1].endswith("(no images)") and not any(
        "no images" in label for label in labels[:1] + labels[2:]
    )
    # The counts are counts: an absent class's row is its zeros.
    counted = confusion_matrix_figure(counts, CLASSES, False).axes[0]
    assert [text.get_text() for text in counted.texts][4:8] == ["0"] * 4
    assert not any("no images" in label.get_text() for label in counted.get_yticklabels())


def test_overlaid_curves(tmp_path: Path) -> None:
    histories = {
        "cnn_lstm": HISTORY,
        "resnet18": [{"epoch": e, "val_accuracy": 0.5 + e / 10} for e in range(4)],
    }
    path = plot_overlaid_curves(histories, "val_accuracy", tmp_path / "overlay.png")
    with Image.open(path) as image:
        assert image.format == "PNG"


def test_the_reports_model_card_counts_epochs_from_1_as_its_history_does() -> None:
    from cxrcore.evaluate.evaluation import _card_summary

    summary = _card_summary({"epoch": 2, "history": [{"epoch": 3}], "metrics": {}, "classes": ["a"]})
    assert summary == {"epoch": "3 (card.json: 2, counted from 0)", "classes": ["a"]}


def test_chance_is_judged_on_a_set_of_several_classes_and_by_the_ranking() -> None:
    """A hospital's COVID cases alone: always answering COVID scores 1.0, and no accuracy reaches past it;
    their accuracy is the sensitivity, not a score to hold against chance. An AUROC at 0.5 is chance."""
    from cxrcore.evaluate.external import no_better_than_chance

    one = {"classes_present": ["COVID"], "accuracy": 0.8, "accuracy_ci95": [0.6, 0.9],
           "commonest_class_accuracy": 1.0, "macro_auroc": None}  # fmt: skip
    assert no_better_than_chance(one) is None
    several = {**one, "classes_present": ["COVID", "Normal"], "commonest_class_accuracy": 0.7}
    assert "accuracy 0.80 (95% CI 0.60–0.90) reaches 0.70" in (no_better_than_chance(several) or "")
    assert "macro AUROC 0.48, where 0.5 is chance" in (
        no_better_than_chance({**one, "macro_auroc": 0.48}) or ""
    )
    # by its interval where it has one: 0.58 on a few images is not shown to beat 0.5; 0.58 on many is
    wide = {**one, "macro_auroc": 0.58, "macro_auroc_ci95": [0.45, 0.71]}
    assert "macro AUROC 0.58 (95% CI 0.45–0.71), where 0.5 is chance" in (no_better_than_chance(wide) or "")
    assert no_better_than_chance({**wide, "macro_auroc_ci95": [0.55, 0.61]}) is None
    # wholly below: not "reaches", and the likeliest cause said (a review, session 56: 0.023 on the real
    # sample, interval 0.01-0.07, had "reaches 0.385")
    worse = {**several, "accuracy": 0.023, "accuracy_ci95": [0.01, 0.07], "commonest_class_accuracy": 0.385}
    said = no_better_than_chance({**worse, "macro_auroc": 0.39, "macro_auroc_ci95": [0.34, 0.44]}) or ""
    assert "accuracy 0.02 (95% CI 0.01–0.07) lies wholly below 0.39" in said and "reaches" not in said
    assert "macro AUROC 0.39 (95% CI 0.34–0.44), wholly below 0.5, chance: its ranking is reversed" in said
    assert "It does worse than chance: are its classes and labels those of these images?" in said
    assert "does worse" not in (no_better_than_chance(several) or "")
    # below the commonest class's score on a set 90 % one class, with a ranking well above chance: not
    # "worse than chance" (a verifier, session 56: sensitivity and specificity 0.8, AUROC 0.88)
    imbalanced = {**several, "accuracy": 0.8, "accuracy_ci95": [0.77, 0.82], "commonest_class_accuracy": 0.9}
    said = no_better_than_chance({**imbalanced, "macro_auroc": 0.88, "macro_auroc_ci95": [0.85, 0.91]}) or ""
    assert "lies wholly below 0.90" in said and "worse than chance" not in said


def test_a_finished_run_says_what_its_best_checkpoint_has_against_it() -> None:
    """A review (session 57): `--lr 1e3` ended at chance (validation accuracy 0.25 with four classes) and
    exited 0 without a word. A verifier: a demo-sized run learning (0.44 on 16 images, not shown to beat
    0.25 by its interval) must not be told it may have learned nothing."""
    from types import SimpleNamespace

    from cxrcore.summaries import train_warnings

    chance = [[3, 0, 0, 0], [3, 0, 0, 0], [3, 0, 0, 0], [3, 0, 0, 0]]
    (at_chance,) = train_warnings(SimpleNamespace(metrics={"val_confusion_matrix": chance}))
    assert at_chance.startswith(
        "the best checkpoint's validation accuracy, 0.250 (95% CI 0.09–0.53) on 12 images, is no higher "
        "than always answering the commonest class (0.250): the model may have learned nothing"
    )
    learning = [[2, 1, 1, 0], [1, 2, 1, 0], [1, 0, 2, 1], [1, 1, 1, 1]]  # 7 of 16: 0.44, CI 0.23–0.67
    assert train_warnings(SimpleNamespace(metrics={"val_confusion_matrix": learning})) == []
    assert train_warnings(SimpleNamespace(metrics={"val_dice": 0.8})) == []  # a segmenter's run
