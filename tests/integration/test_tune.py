"""Ray Tune comparison, typed as a user would: defaults, relative paths, another working directory.

One trial per architecture ends with all three registered and the best promoted; a re-run with another
search is refused rather than mixed into the same experiment.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrcore.cli import main
from cxrcore.metrics import best_by_validation
from cxrcore.registry import ModelRegistry

pytestmark = pytest.mark.integration
MODELS = ("tiny_cnn_lstm", "tiny_dual_cnn", "tiny_resnet")


def test_tiny_comparison_registers_all_three_and_promotes_the_best(
    synthetic_dataset: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--out` and `--grace-epochs` omitted, `--epochs 1`, relative paths from another directory."""
    monkeypatch.chdir(tmp_path)
    Path("ds").symlink_to(synthetic_dataset)
    command = ["tune", "--data", "ds", "--registry", "reg", "--models", ",".join(MODELS), "--trials", "1"]
    status = main([*command, "--epochs", "1", "--pretrained", "none"])
    out = capsys.readouterr().out
    assert status == 0, out

    registry = ModelRegistry(str(tmp_path / "reg"))
    registered = {v.name for v in registry.versions()}
    assert registered == {*MODELS, "tiny_unet"}  # the segmenter is registered beside the dual-channel model
    production = registry.get("production")
    assert f"production (*): {production.ref}" in out and out.count("Winner: ") == 1
    assert registry.get("tiny_dual_cnn").card.segmenter  # servable without ground-truth masks
    assert registry.get("tiny_dual_cnn").card.training["train_masks"] == "segmenter"  # trained as served
    assert registry.get("tiny_unet").card.metrics["val_dice"] > 0.3  # the segmenter segments

    # The registered dual-channel model, scored through its registered segmenter's masks.
    evaluate = ["evaluate", "--model", "tiny_dual_cnn", "--registry", "reg", "--data", "ds", "--out", "ev"]
    assert main(evaluate) == 0
    scored = json.loads(Path("ev/metrics.json").read_text())
    assert scored["evaluated"]["split"] == "test" and scored["evaluated"]["mask_source"] == "segmenter"
    assert scored["with ground-truth masks"]["n"] == scored["n"]  # the dataset's masks, scored apart
    # Its card's validation figures (which ranked it) are the served model's: the segmenter's masks,
    # the registered weights and temperature, through the Predictor Serve uses.
    assert main([*evaluate[:-1], "ev-val", "--split", "val"]) == 0
    on_val = json.loads(Path("ev-val/metrics.json").read_text())
    card = registry.get("tiny_dual_cnn").card
    assert on_val["n"] == card.metrics["val_count"]
    assert abs(on_val["accuracy"] - card.metrics["val_accuracy"]) <= 1.01 / on_val["n"], on_val
    # The log loss tells masks apart where accuracy may not: the ground truth's would differ.
    nll_served, nll_card = on_val["calibration"]["nll_after"], card.calibration["nll_after"]
    assert nll_served == pytest.approx(nll_card, rel=1e-3), (nll_served, nll_card)

    experiment = tmp_path / "cxr-runs/compare"  # the default --out, under the shell's directory
    comparison = json.loads((experiment / "comparison.json").read_text())
    # The top validation macro-F1, or within one validation image of it the lowest validation loss.
    best_model = best_by_validation(comparison["best"], lambda model: comparison["best"][model])
    assert production.name == best_model and comparison["production"] == production.ref
    assert sorted(t["model"] for t in comparison["trials"]) == sorted(MODELS)
    assert {t["error"] for t in comparison["trials"]} == {None}
    html = (experiment / "comparison.html").read_text()
    assert all(model in html for model in MODELS) and "Winner: " in html
    for row in comparison["best"].values():
        assert sum(map(sum, row["confusion_matrix"])) > 0 and Path(row["report"]).is_file()
        assert len(row["history"]) == 1 and row["best_epoch"] == 1
        assert row["temperature"] > 0 and row["test_ece"] is not None

    # Another search under the same --name is a different experiment: refused, not mixed in.
    assert main([*command, "--epochs", "2", "--pretrained", "none"]) == 2
    assert "epochs 1 → 2" in capsys.readouterr().err
