"""The Tune comparison report: winner line, readable numbers, titled matrices, whole curves, failures,
held-out-source figures."""

from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path
from typing import Any

import pytest

from cxrcore.evaluate.comparison import (
    architectures_asked,
    ranked_architectures,
    winner_line,
    write_comparison_report,
)
from cxrcore.evaluate.report import ALERT_OPEN, confusion_matrix_figure, overlaid_curves_figure
from cxrcore.labels import CLASSES
from cxrcore.metrics import accuracy_interval, wilson_interval
from cxrcore.summaries import format_comparison

EPOCHS = {"cnn_lstm": 2, "resnet18": 2, "dual_cnn": 6}
VAL_SCORE = {"cnn_lstm": 0.921, "resnet18": 0.874, "dual_cnn": 0.962}


def _history(epochs: int, top: float) -> list[dict[str, Any]]:
    return [
        {
            "epoch": epoch,
            "train_loss": 1.2 / epoch,
            "val_loss": 1.1 / epoch,
            "train_accuracy": top - 0.1 / epoch,
            "val_accuracy": top - 0.05 / epoch,
            "val_macro_f1": top - 0.05 * (epochs - epoch),
            "val_score": top - 0.05 * (epochs - epoch),
            "lr": 3.2e-4 / epoch,
        }
        for epoch in range(1, epochs + 1)
    ]


def _best(model: str, number: int) -> dict[str, Any]:
    epochs = EPOCHS[model]
    return {
        "trial_id": f"trial_{model}",
        "lr": 3.2e-4,
        "weight_decay": 1.5e-5,
        "batch_size": 32,
        "epochs_run": epochs,
        "best_epoch": epochs,
        "val_score": VAL_SCORE[model],
        "ref": f"{model}:{number}",
        "report": f"/nowhere/reports/{model}/report.html",
        "parameters": 11_689_512,
        "train_images_per_s": 412.37,
        "test_accuracy": 0.95 if model == "dual_cnn" else 0.9,
        "test_macro_f1": 0.94,
        "test_macro_auroc": 0.99,
        "test_per_class_f1": dict.fromkeys(CLASSES, 0.9),
        # 40 test images, the test accuracy's count right: 38 for dual_cnn, 36 for the others
        "confusion_matrix": [[10, 0, 0, 0], [0, 10, 0, 0], [0, 0, 9, 1], [0, 0, 1, 9]]
        if model == "dual_cnn"
        else [[9, 1, 0, 0], [1, 9, 0, 0], [0, 0, 9, 1], [0, 0, 1, 9]],
        "history": _history(epochs, VAL_SCORE[model]),
    }


def _comparison() -> dict[str, Any]:
    best = {model: _best(model, number) for number, model in enumerate(EPOCHS, start=1)}
    best["dual_cnn"].update(
        production=True,
        temperature=1.37,
        test_ece=0.021,
        test_ece_uncalibrated=0.087,
        test_nll=0.18,
        test_nll_uncalibrated=0.25,
        test_ece_floor=0.062,
        test_ece_floor_sd=0.018,
        test_ece_floor_uncalibrated=0.071,
        test_ece_floor_uncalibrated_sd=0.02,
    )
    trials = [
        {
            "trial_id": row["trial_id"],
            "model": model,
            "lr": row["lr"],
            "weight_decay": row["weight_decay"],
            "batch_size": 32,
            "epochs_run": row["epochs_run"],
            "stopped_early": row["epochs_run"] < 6,
            "error": None,
            "val_score": row["val_score"],
            "best_checkpoint": "/nowhere/checkpoint",
            "history": row["history"],
        }
        for model, row in best.items()
    ]
    trials.append(
        {
            "trial_id": "trial_broken",
            "model": "resnet18",
            "lr": 1.1e-3,
            "weight_decay": 2e-4,
            "batch_size": 64,
            "epochs_run": 0,
            "stopped_early": False,
            "error": "RuntimeError: CUDA out of memory <at> layer4",
            "val_score": None,
            "best_checkpoint": None,
            "history": [],
        }
    )
    return {"dataset": "/data/covid19", "segmenter": None, "trials": trials, "best": best}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], str]:
    """One report of three architectures, shared by the tests that only read it."""
    paths = write_comparison_report(tmp_path_factory.mktemp("comparison"), _comparison())
    return paths, paths["html"].read_text(encoding="utf-8")


def best_rows() -> list[tuple[str, dict[str, Any]]]:
    return list(_comparison()["best"].items())


def test_winner_line_names_the_production_model_and_its_margin() -> None:
    assert winner_line(_comparison()["best"]) == (
        "Winner: dual_cnn (registered dual_cnn:3, production) — validation macro-F1 0.962, "
        "0.041 ahead of cnn_lstm (0.921); test accuracy 0.950 (95% CI 0.83–0.99, 40 images)."
    )
    counted = {name: {**row, "val_count": 41} for name, row in _comparison()["best"].items()}
    assert "validation macro-F1 0.962 (41 images), 0.041 ahead" in winner_line(counted)
    # 3 of 12 right, where 4 of the 12 are one class: the test split cannot tell it from a constant answer.
    near_chance = [[1, 0, 2, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]]
    weak = {
        name: {**row, "test_accuracy": 0.25, "confusion_matrix": near_chance} for name, row in best_rows()
    }
    assert winner_line(weak).endswith(
        "test accuracy 0.250 (95% CI 0.09–0.53, 12 images), an interval that reaches 0.333, the score of "
        "always answering the test split's commonest class: not shown to beat it."
    )
    # A re-run that kept production where it was rolled back to: the winner is still the winner.
    best = _comparison()["best"]
    kept = {
        "dual_cnn": {**best["dual_cnn"], "production": False},
        "cnn_lstm": {**best["cnn_lstm"], "production": True},
    }
    line = winner_line(kept)
    assert line.startswith(
        "Winner: dual_cnn (registered dual_cnn:3) — validation macro-F1 0.962, 0.041 ahead"
    )
    assert line.endswith(
        f"Production stays {best['cnn_lstm']['ref']}, where it was moved since; "
        "`cxr models promote dual_cnn:3` serves the winner."
    )
    assert accuracy_interval([[38, 1], [1, 0]]) == pytest.approx(wilson_interval(38, 40))
    assert accuracy_interval([[0, 0], [0, 0]]) is None  # no test images, no interval


def test_winner_line_with_one_architecture_and_with_none() -> None:
    only = {"dual_cnn": _comparison()["best"]["dual_cnn"]}
    assert winner_line(only).startswith("Only one architecture produced a checkpoint: dual_cnn (")
    assert winner_line(only, asked=3).startswith("Only one architecture produced a checkpoint: dual_cnn (")
    assert winner_line(only, asked=1).startswith("One architecture compared: dual_cnn (")  # none failed
    assert architectures_asked({"settings": {"models": "dual_cnn"}}) == 1
    assert architectures_asked({"settings": {"models": "cnn_lstm, dual_cnn"}}) == 2
    assert "ahead" not in winner_line(only)
    assert winner_line({}).startswith("No architecture produced a checkpoint")


def test_ranking_is_by_validation_macro_f1() -> None:
    assert [model for model, _ in ranked_architectures(_comparison()["best"])] == [
        "dual_cnn",
        "cnn_lstm",
        "resnet18",
    ]


def test_report_files(written: tuple[dict[str, Path], str]) -> None:
    paths, _ = written
    out = paths["html"].parent
    assert set(paths) == {"json", "html"}
    assert {path.name for path in out.iterdir()} == {
        "comparison.json",
        "comparison.html",
        *(f"curves_{metric}.png" for metric in ("val_macro_f1", "val_loss", "val_accuracy", "train_loss")),
        *(f"confusion_matrix_{model}.png" for model in EPOCHS),
    }
    assert json.loads(paths["json"].read_text())["best"]["dual_cnn"]["temperature"] == 1.37


def test_html_reads_well(written: tuple[dict[str, Path], str]) -> None:
    _, text = written
    lead = re.search(r'<p class="lead">(.*?)</p>', text)
    assert (
        lead and lead.group(1).startswith("Winner: dual_cnn") and "0.041 ahead of cnn_lstm" in lead.group(1)
    )
    assert text.index('class="lead"') < text.index("<h2>")  # the first thing under the title
    assert '<td class="num">3.2e-04</td>' in text and '<td class="num">1.5e-05</td>' in text
    assert '<td class="num">11,689,512</td>' in text and '<td class="num">412.4</td>' in text
    assert '<td class="num">0.962</td>' in text and ">0.000<" not in text
    assert "A ring marks the epoch whose checkpoint was kept." in text
    assert "test ECE after" in text and '<td class="num">1.370</td>' in text  # calibration shown
    # Each ECE beside its own floor, with the sd that says how far from it is still calibrated.
    assert (
        '<th scope="col">its floor ± sd</th>' in text
        and "<td>0.071 ± 0.020</td>" in text
        and "<td>0.062 ± 0.018</td>" in text
    )
    assert '<th scope="col">test accuracy 95% CI</th>' in text and "<td>0.83–0.99</td>" in text
    assert text.count('<div class="table-wrap">') == 5  # scores, calibration, training, trials, failed
    # each matrix described in words, its counts too, for a reader the picture fails
    assert (
        len(re.findall(r'<img alt="\w+, test counts, rows the true class[^"]*" style="width:360px"', text))
        == 3
    )
    assert "http" not in text.replace("<!DOCTYPE html>", "")


def test_all_trials_table_has_only_the_useful_columns(written: tuple[dict[str, Path], str]) -> None:
    _, text = written
    trials = text.split("<h2>All trials</h2>")[1].split("</section>")[0]
    headers = re.findall(r"<th scope=\"col\">(.*?)</th>", trials)
    assert headers == [
        "trial",
        "model",
        "lr",
        "weight decay",
        "batch",
        "epochs run",
        "stopped early",
        "val macro-F1",
        "error",
    ]
    assert "best_checkpoint" not in trials and "history" not in trials


def test_failed_trials_are_listed_escaped(written: tuple[dict[str, Path], str]) -> None:
    _, text = written
    failed = text.split("<h2>Failed trials (1)</h2>")[1].split("</section>")[0]
    assert "trial_broken" in failed and html.escape("CUDA out of memory <at> layer4") in failed
    assert "<at>" not in text


def test_confusion_matrices_are_titled_by_architecture(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cxrcore.evaluate import comparison

    figures = []

    def spy(matrix: Any, classes: Any, path: Path, normalized: bool, title: str | None = None) -> Path:
        figures.append(confusion_matrix_figure(matrix, classes, normalized, title))
        path.write_bytes(b"\x89PNG")
        return path

    monkeypatch.setattr(comparison, "plot_confusion_matrix", spy)
    write_comparison_report(tmp_path, _comparison())
    titles = [figure.axes[0].get_title() for figure in figures]
    assert titles == [f"{model} — test, counts" for model in ("dual_cnn", "cnn_lstm", "resnet18")]


def test_curves_draw_every_epoch_and_ring_the_kept_one() -> None:
    best = _comparison()["best"]
    histories = {model: row["history"] for model, row in best.items()}
    kept = {"dual_cnn": 4}
    ax = overlaid_curves_figure(histories, "val_macro_f1", kept).axes[0]
    series = {line.get_label(): list(line.get_xdata()) for line in ax.lines}
    assert series == {
        "cnn_lstm": [1, 2],
        "resnet18": [1, 2],
        "dual_cnn": [1, 2, 3, 4, 5, 6],
        "kept checkpoint": [4],
    }
    # every epoch marked, each architecture by its own marker and line style, not by colour alone
    markers = [(line.get_marker(), line.get_linestyle()) for line in ax.lines[:3]]
    assert len(set(markers)) == 3 and all(marker not in (None, "None", "") for marker, _ in markers)
    assert all(float(tick).is_integer() for tick in ax.get_xticks())
    assert [text.get_text() for text in ax.get_legend().get_texts()][-1] == "kept checkpoint"


def test_no_checkpoint_says_so_prominently(tmp_path: Path) -> None:
    empty = _comparison()
    empty["best"] = {}
    paths = write_comparison_report(tmp_path, empty)
    text = paths["html"].read_text()
    assert ALERT_OPEN + "No architecture produced a checkpoint" in text
    assert "Confusion matrices" not in text and "Training curves" not in text and "<img" not in text
    assert "<h2>All trials</h2>" in text and "<h2>Failed trials (1)</h2>" in text
    assert not list(tmp_path.glob("*.png"))


def test_held_out_sources_stand_beside_the_random_split_and_a_large_drop_is_flagged(tmp_path: Path) -> None:
    comparison = _comparison()
    verdict = "Large drop on the held-out sources (site-b.synthetic.cxr): accuracy: held-out sources 0.41"
    comparison["best"]["cnn_lstm"]["source_holdout"] = {
        "random_split": {"accuracy": 0.95, "macro_f1": 0.94},
        "held_out": {"accuracy": 0.41, "macro_f1": 0.37},
        "large_drop": True,
        "verdict": verdict,
    }
    text = write_comparison_report(tmp_path, comparison)["html"].read_text()
    scores = text.split("<h3>Test split</h3>")[1].split("</table>")[0]
    headers = re.findall(r"<th scope=\"col\">(.*?)</th>", scores)
    held_out = ["random-split accuracy", "held-out accuracy", "random-split macro-F1", "held-out macro-F1"]
    assert headers[6:11] == [*held_out, "large drop"]
    assert '<td class="num">0.410</td>' in scores and "<td>yes</td>" in scores
    assert f"{ALERT_OPEN}cnn_lstm: {verdict}</p>" in text
    assert text.index(verdict) < text.index("<h2>")  # under the winner, before any section

    printed = format_comparison({**comparison, "production": "dual_cnn:3", "reports": {}})
    assert "random-split acc  held-out acc" in printed.splitlines()[1]
    assert re.search(r"\ncnn_lstm .* 0\.950 +0\.410\n", printed)
    assert re.search(r"\ndual_cnn .* - +-\n", printed)  # an architecture without the figures gets dashes
    assert f"\nWARNING: cnn_lstm: {verdict}\n" in printed


def test_without_held_out_sources_the_comparison_is_as_before(written: tuple[dict[str, Path], str]) -> None:
    _, text = written
    assert "held-out" not in text and "lead alert" not in text
    printed = format_comparison({**_comparison(), "production": "dual_cnn:3", "reports": {}})
    assert "held-out" not in printed and "WARNING" not in printed
    assert "production moved" not in printed
    # the kept epoch of those run: "epochs 4" had read as the kept checkpoint's
    header = next(line for line in printed.splitlines() if line.startswith("architecture"))
    assert header.split()[-1] == "epoch" and all(
        " of " in line for line in printed.splitlines() if line.split()[:1] in (["cnn_lstm"], ["dual_cnn"])
    )
    moved = format_comparison(
        {**_comparison(), "production": "dual_cnn:3", "production_before": "resnet18:1", "reports": {}}
    )  # a re-run after `cxr models promote resnet18:1`: the user is told, not surprised later
    assert "\nproduction moved from resnet18:1 to dual_cnn:3 (`cxr models promote` moves it)\n" in moved
    unscored = "the val split holds no Viral Pneumonia image"  # what unscored_classes begins with
    printed = format_comparison(
        {**_comparison(), "production": "x:1", "reports": {}, "val_unscored": unscored}
    )
    assert f"\nWARNING: {unscored}\n" in printed


def test_a_tie_on_validation_f1_goes_to_the_lower_validation_loss_and_says_so() -> None:
    best = {
        "cnn_lstm": {"val_score": 1.0, "val_loss": 0.21, "ref": "cnn_lstm:1", "test_accuracy": 0.95},
        "dual_cnn": {"val_score": 1.0, "val_loss": 0.08, "ref": "dual_cnn:1", "test_accuracy": 0.97},
        "resnet18": {"val_score": 0.9, "val_loss": 0.30, "ref": "resnet18:1", "test_accuracy": 0.90},
    }
    assert [model for model, _ in ranked_architectures(best)] == ["dual_cnn", "cnn_lstm", "resnet18"]
    best["dual_cnn"]["production"] = True
    assert "tied with cnn_lstm; chosen for its lower validation loss (0.080 vs 0.210)" in winner_line(best)


def test_a_score_within_one_validation_image_goes_to_the_lower_validation_loss() -> None:
    # 40 validation images: 0.025 is one image; resnet18 is two images behind and stays behind.
    best = {
        "cnn_lstm": {
            "val_score": 0.950,
            "val_loss": 0.25,
            "val_count": 40,
            "ref": "cnn_lstm:1",
            "test_accuracy": 0.85,
        },
        "dual_cnn": {
            "val_score": 0.930,
            "val_loss": 0.19,
            "val_count": 40,
            "ref": "dual_cnn:1",
            "test_accuracy": 0.97,
        },
        "resnet18": {
            "val_score": 0.900,
            "val_loss": 0.05,
            "val_count": 40,
            "ref": "resnet18:1",
            "test_accuracy": 0.90,
        },
    }
    assert [model for model, _ in ranked_architectures(best)] == ["dual_cnn", "cnn_lstm", "resnet18"]
    best["dual_cnn"]["production"] = True
    assert winner_line(best).startswith(
        "Winner: dual_cnn (registered dual_cnn:1, production) — validation macro-F1 0.930 (40 images), "
        "within one validation image of cnn_lstm (0.950); chosen for its lower validation loss "
        "(0.190 vs 0.250)"
    )
    # Without the image count only equal scores are ties: the score decides.
    for row in best.values():
        del row["val_count"]
    assert [model for model, _ in ranked_architectures(best)] == ["cnn_lstm", "dual_cnn", "resnet18"]


def test_a_poor_lung_segmenter_is_named_with_a_warning(tmp_path: Path) -> None:
    """Dual-channel models train and are served on the segmenter's masks: a U-Net of one epoch (Dice 0.50 on
    104 real images) made their figures the segmenter's, unseen in the comparison's output (and, until
    session 52, in comparison.html, which a real-sample study found without it)."""
    segmenter = {"model": "unet", "ref": "unet:2", "val_dice": 0.51, "test": {"dice": 0.496}}
    comparison = {**_comparison(), "production": "dual_cnn:3", "reports": {}, "segmenter": segmenter}
    printed = format_comparison({**comparison, "settings": {"segmenter_epochs": 1}})
    assert "\nlung segmenter: unet:2, test Dice 0.496 (dual-channel models' masks)\n" in printed
    assert "\nWARNING: the lung segmenter's test Dice is 0.50 after 1 epoch, under 0.85: " in printed
    report = {**comparison, "settings": {**comparison.get("settings", {}), "segmenter_epochs": 1}}
    html = write_comparison_report(tmp_path, report)["html"].read_text()
    assert "<strong>Warning:</strong> The lung segmenter&#x27;s test Dice is 0.50 after 1 epoch" in html
    good = format_comparison({**comparison, "segmenter": {"ref": "unet:2", "test": {"dice": 0.96}}})
    assert "lung segmenter: unet:2, test Dice 0.960" in good and "WARNING" not in good


def test_the_winner_is_set_beside_the_runner_up_on_the_same_test_images(tmp_path: Path) -> None:
    """The winner line gave the validation margin and the winner's own interval only: in three seeded
    runs the test split never told the first two apart, and once reversed them."""
    from cxrcore.tune import _pair_with_runner_up

    def predictions(model: str, correct: list[bool]) -> None:
        folder = tmp_path / "reports" / model
        folder.mkdir(parents=True)
        rows = [f"{i}.png,site,COVID,COVID,{right}" for i, right in enumerate(correct)]
        (folder / "predictions.csv").write_text("file,source,label,predicted,correct\n" + "\n".join(rows))

    predictions("tiny_resnet", [True] * 30 + [True] * 9 + [False] * 7 + [False] * 2)
    predictions("tiny_dual_cnn", [True] * 30 + [False] * 9 + [True] * 7 + [False] * 2)
    best = {
        "tiny_resnet": {"val_score": 0.50, "val_loss": 1.0, "val_count": 48},
        "tiny_dual_cnn": {"val_score": 0.35, "val_loss": 1.1, "val_count": 48},
    }
    _pair_with_runner_up(best, tmp_path)
    paired = best["tiny_resnet"]["versus_runner_up"]
    assert paired == {
        "model": "tiny_dual_cnn", "n": 48, "only_this": 9, "only_other": 7,
        "mcnemar_p": pytest.approx(0.804, abs=1e-3),
    }  # fmt: skip
    line = winner_line(
        {name: {**row, "ref": f"{name}:1", "test_accuracy": 0.8} for name, row in best.items()}
    )
    assert "(exact McNemar p = 0.80): the test split does not tell them apart." in line
    # other images in the runner-up's file (an earlier version's report): no pairing, rather than a wrong one
    (tmp_path / "reports/tiny_dual_cnn/predictions.csv").write_text("file,source,label,predicted,correct\n")
    del best["tiny_resnet"]["versus_runner_up"]
    _pair_with_runner_up(best, tmp_path)
    assert "versus_runner_up" not in best["tiny_resnet"]


def test_an_architecture_not_shown_to_beat_the_commonest_class_is_warned_of(tmp_path: Path) -> None:
    """The winner line checked the winner alone: a runner-up at exactly the commonest class's rate (0.250
    on a balanced test split) stood in the table without a word."""
    comparison = _comparison()
    loser = min(comparison["best"], key=lambda model: comparison["best"][model]["val_score"])
    comparison["best"][loser]["confusion_matrix"] = [[3, 3, 3, 3]] * 4  # 12 of 48: a quarter
    printed = format_comparison({**comparison, "production": "dual_cnn:3", "reports": {}})
    warning = f"WARNING: {loser}: test accuracy 0.250 (95% CI 0.15–0.39) reaches 0.250, the score of always"
    assert warning in printed
    text = write_comparison_report(tmp_path, comparison)["html"].read_text()
    assert f"{ALERT_OPEN}{loser}: test accuracy 0.250" in text
    # The winner too: its own line said it in the lead's green box, and production went to it all the same
    winner = max(comparison["best"], key=lambda model: comparison["best"][model]["val_score"])
    comparison["best"][winner] = {**comparison["best"][winner], "confusion_matrix": [[1, 1, 1, 1]] * 4}
    printed = format_comparison({**comparison, "production": "dual_cnn:3", "reports": {}})
    assert f"WARNING: {winner} (" in printed
    assert "on 16 test images; do not serve it on this evidence" in printed


def test_repeats_show_each_architecture_over_the_seeds_and_warn_when_the_winner_is_seed_luck(
    tmp_path: Path,
) -> None:
    """With --repeats, each seed makes its own comparison (its best trial of each architecture, ranked as the
    winner is chosen): the console and report give every architecture's spread and first places, and warn
    where the winner ranked first in at most half of the seeds."""
    from cxrcore.evaluate.comparison import seed_spread, seeds_line

    comparison = _comparison()
    scores = {
        "dual_cnn": (0.962, 0.80, 0.85),
        "cnn_lstm": (0.90, 0.921, 0.88),
        "resnet18": (0.87, 0.874, 0.89),
    }
    trials = [
        {"trial_id": f"{model}-{seed}", "model": model, "seed": seed, "lr": 1e-3, "weight_decay": 1e-4,
         "batch_size": 32, "epochs_run": 6, "stopped_early": False, "error": None, "val_score": score,
         "best_checkpoint": "/nowhere/checkpoint", "history": []}
        for model, values in scores.items()
        for seed, score in enumerate(values)
    ]  # fmt: skip
    spread = seed_spread(trials)
    assert spread is not None and spread["seeds"] == [0, 1, 2]
    firsts = {model: row["first"] for model, row in spread["by_model"].items()}
    assert firsts == {"dual_cnn": 1, "cnn_lstm": 1, "resnet18": 1}
    assert spread["by_model"]["dual_cnn"]["scores"] == [0.962, 0.80, 0.85]  # in the order of spread["seeds"]
    assert spread["by_model"]["dual_cnn"]["mean"] == pytest.approx(0.870667, abs=1e-6)
    assert spread["by_model"]["dual_cnn"]["sd"] == pytest.approx(0.082954, abs=1e-6)
    comparison.update(trials=trials, seeds=spread)
    for model, row in comparison["best"].items():  # as tune records them: the kept trial's seed, of 3
        row.update(seed=scores[model].index(max(scores[model])), seeds_trained=3)
    printed = format_comparison({**comparison, "production": "dual_cnn:3", "reports": {}})
    # The winner line's figures are each architecture's best seed: it says so, and which seed
    assert (
        "validation macro-F1 0.962, its best of 3 seeds (seed 0), 0.041 ahead of cnn_lstm (0.921, its best "
        "of 3)" in printed
    )
    assert "Over 3 seeds (0–2), validation macro-F1 mean ± sd (range): cnn_lstm 0.900 ± 0.021" in printed
    assert "dual_cnn 0.871 ± 0.083 (0.800–0.962), first in 1 of 3" in printed
    assert (
        "WARNING: the winner, dual_cnn, ranked first in 1 of 3 seeds only (cnn_lstm in 1, resnet18 in 1)"
        in printed
    )
    text = write_comparison_report(tmp_path, comparison)["html"].read_text()
    assert "Over seeds (validation macro-F1)" in text and ">1 of 3<" in text
    assert ALERT_OPEN + "the winner, dual_cnn, ranked first in 1 of 3 seeds only" in text
    # A winner first in most seeds is not warned of; one seed makes no spread.
    trials[1]["val_score"] = trials[2]["val_score"] = 0.99
    assert "WARNING: the winner" not in format_comparison(
        {**comparison, "seeds": seed_spread(trials), "production": "dual_cnn:3", "reports": {}}
    )
    assert seed_spread([t for t in trials if t["seed"] == 0]) is None
    # With several configurations per seed, each seed's figure is the best of them, and the line says so
    second = [{**t, "trial_id": t["trial_id"] + "-b", "val_score": 0.1} for t in trials]
    two = seed_spread(trials + second)
    assert two is not None and "(0–2; each seed's figure the best of its 2 configurations)" in seeds_line(two)
    # A first place the loss decided (the same score as the second) is said to be one
    tied = [
        {"model": m, "seed": s, "val_score": 0.9, "val_loss": loss, "best_checkpoint": "c"}
        for m, loss in (("a", 0.2), ("b", 0.3))
        for s in (0, 1)
    ]
    tied[1]["val_score"] = 0.95  # seed 1: a ahead outright
    line = seeds_line(seed_spread(tied) or {})
    assert "a 0.925 ± 0.035 (0.900–0.950), first in 2 of 2 (1 of them within one image of the second" in line


def test_the_seed_spread_ranks_as_the_comparison_does() -> None:
    """--repeats: the seeds line counted resnet's depths as rivals and a failed trial as a seed's winner,
    where the comparison had ranked them otherwise (a verifier, session 48)."""
    from cxrcore.evaluate.comparison import seed_spread

    def trial(model: str, seed: int, score: float, error: str | None = None) -> dict[str, Any]:
        return {"model": model, "seed": seed, "val_score": score, "best_checkpoint": "c", "error": error}

    trials = [trial("a", s, 0.9, error="boom") for s in (0, 1)] + [trial("b", s, 0.5) for s in (0, 1)]
    trials += [trial("resnet18", 0, 0.6), trial("resnet34", 0, 0.7), trial("resnet18", 1, 0.4)]
    spread = seed_spread(trials, lambda model: "resnet" if model.startswith("resnet") else model)
    assert spread is not None and set(spread["by_model"]) == {"a", "b", "resnet"}
    assert spread["by_model"]["a"]["first"] == 0  # failed in both seeds: never a seed's winner
    assert spread["by_model"]["resnet"]["scores"] == [0.7, 0.4]  # its best depth in each seed
    assert spread["by_model"]["resnet"]["first"] == 1 and spread["by_model"]["b"]["first"] == 1


def test_a_dataset_whose_sources_separate_classes_is_warned_of(tmp_path: Path) -> None:
    """Ingest's warning that no source holds both of two classes, where the test scores are read."""
    confound = "no source holds both COVID and Normal: a model can tell these classes apart by their sources"
    comparison = {**_comparison(), "sources_separate_classes": confound}
    printed = format_comparison({**comparison, "production": "dual_cnn:3", "reports": {}})
    assert f"WARNING: in the dataset, {confound}" in printed
    text = write_comparison_report(tmp_path, comparison)["html"].read_text()
    assert f"{ALERT_OPEN}In the dataset, {confound}.</p>" in text
    printed = format_comparison({**_comparison(), "production": "dual_cnn:3", "reports": {}})
    assert "in the dataset," not in printed


def test_trials_patience_stopped_are_told_from_those_asha_stopped(tmp_path: Path) -> None:
    """`cxr tune --patience N`: each trial's Train run stops N epochs after its best; the record, the
    console's trial count and the All trials table say which trials --patience stopped and which ASHA."""
    from types import SimpleNamespace

    from cxrcore.config import ConfigError, TuneConfig
    from cxrcore.tune import _trial_record, experiment_settings, space_settings, trial_train_config

    config = TuneConfig(data="ds", registry="reg", models="cnn_lstm", trials=2, epochs=6, patience=2)
    params = {"trial": {"model": "cnn_lstm", "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 16}}
    assert trial_train_config(config, params, "t", None).patience == 2
    assert experiment_settings(config, {"fingerprint": "f"})["patience"] == 2  # another: another experiment
    unset = dataclasses.replace(config, patience=None)
    assert "patience" not in experiment_settings(unset, {"fingerprint": "f"})  # older experiments resume,
    assert "patience" not in space_settings(unset) and space_settings(config)["patience"] == 2  # in Tune too
    with pytest.raises(ConfigError, match="--patience: must be 1 or more"):
        TuneConfig(data="ds", registry="reg", patience=0)

    def record(metrics: dict[str, Any], error: Exception | None = None) -> dict[str, Any]:
        result = SimpleNamespace(
            config=params, metrics={"trial_id": "t", **metrics}, error=error, path=str(tmp_path / "t"),
            best_checkpoints=[], checkpoint=None,
        )  # fmt: skip
        return _trial_record(config, result)

    patience, asha = record({"epoch": 4, "stopped_early": 2}), record({"epoch": 3})
    full = record({"epoch": 6})
    assert (patience["stopped_by"], asha["stopped_by"], full["stopped_by"]) == ("--patience", "ASHA", None)
    assert patience["stopped_early"] and asha["stopped_early"] and not full["stopped_early"]
    assert record({"epoch": 2}, RuntimeError("boom"))["stopped_by"] is None  # failed, not stopped

    comparison = _comparison()
    first, second, *_ = comparison["trials"]
    first.update(stopped_early=True, stopped_by="--patience", epochs_run=4)
    second.update(stopped_early=True, stopped_by="ASHA", epochs_run=3)
    printed = format_comparison({**comparison, "production": "dual_cnn:3", "reports": {}})
    assert "(1 stopped early by ASHA, 1 by --patience, 1 failed)" in printed
    text = write_comparison_report(tmp_path / "report", comparison)["html"].read_text()
    table = text.split("All trials")[1]
    assert "<td>--patience</td>" in table and "<td>ASHA</td>" in table
