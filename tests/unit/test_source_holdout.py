"""Source hold-out: a test split's random-split images scored apart from its held-out sources', the drop
flag, and `cxr evaluate` and the Tune comparison on a dataset whose ingest held a source out (no Ray)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cxrcore.cli import main
from cxrcore.config import TuneConfig
from cxrcore.evaluate.comparison import holdout_warnings
from cxrcore.evaluate.external import LARGE_DROP, source_holdout
from cxrcore.evaluate.report import ALERT_OPEN
from cxrcore.labels import CLASSES
from cxrcore.metrics import difference_interval, wilson_interval
from cxrcore.registry import ModelRegistry
from cxrcore.tune import _best_per_architecture
from tests.unit.test_external_eval import write_biased_checkpoint, write_dataset

SEEN, HELD = "site-a.synthetic.cxr", "site-b.synthetic.cxr"


def _scored(truth: list[int], predicted: list[int], source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, one-hot-ish probabilities of the predicted classes, and one source for every image."""
    probs = np.full((len(truth), len(CLASSES)), 0.1)
    probs[np.arange(len(truth)), predicted] = 0.7
    return np.array(truth), probs, np.array([source] * len(truth))


def _holdout(*sides: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, Any]:
    labels, probs, sources = (np.concatenate(parts) for parts in zip(*sides, strict=True))
    return source_holdout(labels, probs, sources, [HELD], CLASSES)


def _every_class(per_class: int) -> list[int]:
    return [k for k in range(len(CLASSES)) for _ in range(per_class)]


def test_a_model_reading_the_site_is_flagged() -> None:
    # Right on every image of the site it trained on; calls every held-out image COVID.
    seen = _scored(_every_class(5), _every_class(5), SEEN)
    held = _scored(_every_class(10), [0] * 40, HELD)
    block = _holdout(seen, held)
    assert block["test_sources"] == [HELD] and block["restricted_to"] is None
    assert block["random_split"]["sources"] == [SEEN] and block["held_out"]["sources"] == [HELD]
    assert (block["random_split"]["n"], block["held_out"]["n"]) == (20, 40)
    assert block["held_out"]["by_class"] == dict.fromkeys(CLASSES, 10)
    assert (block["random_split"]["accuracy"], block["held_out"]["accuracy"]) == (1.0, 0.25)
    assert block["held_out"]["macro_f1"] == pytest.approx(0.1)  # COVID's F1 0.4, the others' 0
    assert block["held_out"]["accuracy_ci95"] == wilson_interval(10, 40)
    assert block["random_split"]["accuracy_ci95"] == wilson_interval(20, 20)
    assert block["drop"] == {"accuracy": 0.75, "macro_f1": pytest.approx(0.9)}
    assert block["large_drop"] is True and block["drop_threshold"] == LARGE_DROP
    assert block["accuracy_drop_ci95"] == difference_interval(20, 20, 10, 40)
    assert block["accuracy_drop_ci95"][0] > 0 and "chance" not in block["verdict"]
    assert block["verdict"].startswith(
        f"Large drop on the held-out sources ({HELD}): accuracy: held-out sources 0.25 (95% CI 0.14–0.40) "
        "vs random split 1.00 (95% CI 0.84–1.00): a drop of 0.75; macro-F1: held-out sources 0.10 vs random "
        "split 1.00: a drop of 0.90 — the model may be reading the site"
    )


def test_the_flag_starts_at_the_threshold() -> None:
    seen = _scored(_every_class(5), _every_class(5), SEEN)
    # 36 of 40 right, one wrong per class: accuracy and every F1 0.90, a drop of exactly LARGE_DROP.
    truth = _every_class(10)
    at_threshold = [(k + 1) % 4 if i % 10 == 0 else k for i, k in enumerate(truth)]
    block = _holdout(seen, _scored(truth, at_threshold, HELD))
    assert block["drop"]["accuracy"] == pytest.approx(LARGE_DROP) and block["large_drop"] is True
    low, high = block["accuracy_drop_ci95"]  # 20 of 20 against 36 of 40: a drop sampling could make
    assert f"(the accuracy's drop, 95% CI {low:.2f} to {high:.2f}, may be chance)" in block["verdict"]
    just_under = [(k + 1) % 4 if i in (0, 10) else k for i, k in enumerate(truth)]
    block = _holdout(seen, _scored(truth, just_under, HELD))
    assert block["large_drop"] is False
    assert block["verdict"].startswith(f"Held-out sources ({HELD}): accuracy: held-out sources 0.95")
    low, high = block["accuracy_drop_ci95"]  # 19 of 20 against 40 of 40: a fall of 0.17 not ruled out
    assert block["verdict"].endswith(
        f"; within {LARGE_DROP:.2f} of the random split, but the accuracy's drop, 95% CI {low:.2f} to "
        f"{high:.2f}, reaches {LARGE_DROP:.2f}: too few images to rule out a large fall."
    )
    assert "reading the site" not in block["verdict"]
    block = _holdout(_scored(truth, at_threshold, SEEN), _scored(truth, truth, HELD))  # 0.90 against 1.00
    assert block["drop"]["accuracy"] == pytest.approx(-LARGE_DROP) and block["large_drop"] is False
    assert f"higher than the random split by {LARGE_DROP:.2f} or more" in block["verdict"]


def test_the_random_split_is_scored_over_the_classes_the_held_out_sources_hold() -> None:
    # The model gets the seen sources' COVID and Normal right and their other two classes wrong.
    truth = _every_class(5)
    seen = _scored(truth, [k if k in (0, 2) else 2 for k in truth], SEEN)
    held = _scored([0, 0, 2, 2], [0, 0, 2, 2], HELD)
    block = _holdout(seen, held)
    assert block["restricted_to"] == ["COVID", "Normal"] and block["random_split"]["n"] == 10
    assert block["random_split"]["accuracy"] == 1.0 and block["drop"]["accuracy"] == 0.0
    assert block["large_drop"] is False
    assert (
        "scored over its 10 images of the classes the held-out sources hold (COVID, Normal)"
        in block["verdict"]
    )


def test_without_one_side_there_is_nothing_to_compare() -> None:
    seen = _scored(_every_class(2), _every_class(2), SEEN)
    block = _holdout(seen)
    assert block["held_out"]["n"] == 0 and block["held_out"]["accuracy"] is None
    assert block["large_drop"] is None and block["drop"] == {"accuracy": None, "macro_f1": None}
    assert block["verdict"].startswith("No evaluated image comes from the held-out sources")
    block = _holdout(_scored([1, 3], [1, 1], HELD))
    assert block["random_split"]["n"] == 0 and block["large_drop"] is None
    assert "there is no random-split figure to compare with" in block["verdict"]


@pytest.fixture(scope="module")
def site_reader(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A dataset whose ingest held site b out, and a model that answers Lung_Opacity: right on every
    seen-source test image (all Lung_Opacity), on one in four held out (one per class)."""
    root = tmp_path_factory.mktemp("site_reader")
    rows = [("Lung_Opacity", "test", seed) for seed in range(4)]
    rows += [(name, "test", 10 + k) for k, name in enumerate(CLASSES)] + [("Normal", "train", 20)]
    sources = [SEEN] * 4 + [HELD] * 4 + [SEEN]
    own = write_dataset(root / "own", rows, "own", sources=sources, test_sources=[HELD])
    return own, write_biased_checkpoint(root / "checkpoint", own)


def test_evaluate_prints_and_records_both_figures_and_the_flag(
    site_reader: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own, checkpoint = site_reader
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", own, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 8 and metrics["accuracy"] == 0.625  # the whole test split, as before
    block = metrics["source_holdout"]
    assert (block["random_split"]["accuracy"], block["held_out"]["accuracy"]) == (1.0, 0.25)
    assert block["large_drop"] is True
    assert re.search(r"\nrandom split +4 +1\.000 +0\.51–1\.00 +1\.000\n", printed)
    assert re.search(r"\nheld-out sources +4 +0\.250 +0\.05–0\.70 +0\.100\n", printed)
    assert re.search(r"\ndrop +- +0\.750 +- +0\.900\n", printed)
    assert f"WARNING: Large drop on the held-out sources ({HELD})" in printed
    html = (out / "report.html").read_text()
    assert f"{ALERT_OPEN}Large drop on the held-out sources ({HELD})" in html
    assert "<h2>Source hold-out</h2>" in html and f"{SEEN}; images per class: Lung_Opacity 4" in html


def test_the_tune_comparison_carries_the_held_out_figures(
    site_reader: tuple[str, Path], tmp_path: Path
) -> None:
    own, checkpoint = site_reader
    config = TuneConfig(
        data=own, registry=str(tmp_path / "registry"), models="tiny_cnn_lstm", out=str(tmp_path)
    )
    trial = {
        "model": "tiny_cnn_lstm", "trial_id": "t1", "best_checkpoint": str(checkpoint), "val_score": 0.9,
        "lr": 2e-3, "weight_decay": 1e-4, "batch_size": 4, "epochs_run": 1, "train_images_per_s": 10.0,
        "best_epoch": 1, "history": [],
    }  # fmt: skip
    registry = ModelRegistry(tmp_path / "registry")
    weaker = {**trial, "trial_id": "t0", "val_score": 0.5, "best_checkpoint": str(tmp_path / "t0-checkpoint")}
    best = _best_per_architecture(config, [weaker, trial], registry, tmp_path / "experiment")
    assert best["tiny_cnn_lstm"]["trial_id"] == "t1"  # the higher validation score, wherever it is listed
    holdout = best["tiny_cnn_lstm"]["source_holdout"]
    assert (holdout["random_split"]["accuracy"], holdout["held_out"]["accuracy"]) == (1.0, 0.25)
    assert holdout_warnings(best) == [f"tiny_cnn_lstm: {holdout['verdict']}"]


def test_evaluate_warns_where_the_datasets_sources_separate_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ingest warned that no source holds both COVID and Normal; an evaluation on the dataset's own test
    split, where the scores that warning is about are read, said nothing of it."""
    rows = [("COVID", "test", 0), ("COVID", "test", 1), ("Normal", "test", 2), ("Normal", "train", 3)]
    own = write_dataset(tmp_path / "own", rows, "separated", sources=[SEEN, SEEN, HELD, HELD])
    report_file = Path(own) / "ingest_report.json"
    report = json.loads(report_file.read_text())
    report["source_separates"] = [["COVID", "Normal"]]
    report["by_source_class"] = {SEEN: {"COVID": 2}, HELD: {"Normal": 2}}
    report_file.write_text(json.dumps(report))
    checkpoint = write_biased_checkpoint(tmp_path / "checkpoint", own)
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", own, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    warning = "in the dataset, every source holds one class only: a model can tell these classes apart by"
    assert f"WARNING: {warning}" in printed
    evaluated = json.loads((out / "metrics.json").read_text())["evaluated"]
    assert evaluated["sources_separate_classes"].startswith("every source holds one class only")
    html = (out / "report.html").read_text()
    assert ALERT_OPEN + "In the dataset, every source holds one class only" in html
    # A source held out for testing measures it instead (the source hold-out block) where its images hold
    # both classes of the pair: one holding Normal alone cannot (a review, session 52, held out two
    # COVID-only journals of the real sample, and this warning went silent everywhere).
    report["test_sources"] = [HELD]
    report_file.write_text(json.dumps(report))
    evaluate = ["evaluate", "--checkpoint", str(checkpoint), "--data", own]
    assert main([*evaluate, "--out", str(tmp_path / "e2")]) == 0
    printed = capsys.readouterr().out
    assert f"the held-out sources ({HELD}) hold Normal only, so their test images cannot show it" in printed
    report["by_source_class"] = {SEEN: {"COVID": 2}, HELD: {"Normal": 2, "COVID": 1}}
    report_file.write_text(json.dumps(report))
    assert main([*evaluate, "--out", str(tmp_path / "e3")]) == 0
    assert "every source holds one class only" not in capsys.readouterr().out


def test_a_hold_out_of_one_class_cannot_show_a_shortcut_and_has_no_macro_f1() -> None:
    """A real-sample study (session 52): two COVID-only journals held out scored 0.941 "macro-F1 0.970" and
    read as reassuring; over one class macro-F1 is a function of the recall, and a model that tells COVID
    apart by its sources finds it there as well as one reading the lungs."""
    import numpy as np

    from cxrcore.evaluate.external import source_holdout
    from cxrcore.labels import CLASSES

    labels = np.array([0] * 6 + [0, 1, 2, 3] * 3)
    probs = np.eye(4)[labels] * 0.9 + 0.025
    sources = np.array(["journal"] * 6 + ["hospital"] * 12)
    block = source_holdout(labels, probs, sources, ["journal"], list(CLASSES))
    assert block["one_class"] == "COVID" and block["held_out"]["macro_f1"] is None
    assert block["random_split"]["macro_f1"] is None and block["drop"]["macro_f1"] is None
    assert block["verdict"].startswith("Held-out sources (journal): COVID images only, so the accuracy is")
    assert "this hold-out cannot show a source shortcut" in block["verdict"]
