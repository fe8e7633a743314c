"""Ray Tune comparison: one trial per architecture ends with all three registered and the best promoted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrcore.config import TuneConfig
from cxrcore.registry import ModelRegistry
from cxrcore.tune import run_comparison

pytestmark = pytest.mark.integration
MODELS = ("tiny_cnn_lstm", "tiny_dual_cnn", "tiny_resnet")


def test_tiny_comparison_registers_all_three_and_promotes_the_best(
    synthetic_dataset: str, tmp_path: Path
) -> None:
    config = TuneConfig(
        data=synthetic_dataset,
        registry=str(tmp_path / "registry"),
        models=",".join(MODELS),
        trials=1,
        epochs=2,
        grace_epochs=1,
        out=str(tmp_path / "runs"),
        name="tiny-compare",
    )
    comparison = run_comparison(config)

    registry = ModelRegistry(config.registry)
    registered = {v.name for v in registry.versions()}
    assert registered == {*MODELS, "tiny_unet"}  # the segmenter is registered beside the dual-channel model
    production = registry.get("production")
    best_model = max(comparison["best"], key=lambda m: comparison["best"][m]["val_score"])
    assert production.name == best_model and comparison["production"] == production.ref
    assert registry.get("tiny_dual_cnn").card.segmenter  # servable without ground-truth masks

    assert [t["model"] for t in sorted(comparison["trials"], key=lambda t: t["model"])] == sorted(MODELS)
    html = Path(comparison["reports"]["html"]).read_text()
    assert all(model in html for model in MODELS)
    saved = json.loads(Path(comparison["reports"]["json"]).read_text())
    assert set(saved["best"]) == set(MODELS)
    for row in saved["best"].values():
        assert sum(map(sum, row["confusion_matrix"])) > 0 and Path(row["report"]).is_file()
