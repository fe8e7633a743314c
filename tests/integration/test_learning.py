"""Every architecture learns, every run: the recipe check behind the training defaults (`pytest -m slow`).

For seeds 0, 1 and 2: 60 synthetic phantoms per class ingested at 64 px, `cxr train --epochs 4 --workers 2
--pretrained none` with every other setting at its default, then `cxr evaluate` on the test split.
About 6 minutes on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxrcore.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODELS = ("cnn_lstm", "dual_cnn", "resnet18")


@pytest.fixture(scope="module")
def datasets(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("learning")
    for seed in (0, 1, 2):
        raw, ds = root / f"raw{seed}", root / f"ds{seed}"
        assert main(["data", "synth", str(raw), "--per-class", "60", "--seed", str(seed)]) == 0
        assert main(["data", "ingest", str(raw), str(ds), "--size", "64", "--seed", str(seed)]) == 0
    return {seed: root / f"ds{seed}" for seed in (0, 1, 2)}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("seed", (0, 1, 2))
def test_every_architecture_learns(
    datasets: dict[int, Path], seed: int, model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds, runs = datasets[seed], tmp_path / "runs"
    train = ["train", "--data", str(ds), "--model", model, "--epochs", "4", "--workers", "2"]
    assert main([*train, "--pretrained", "none", "--out", str(runs), "--seed", str(seed)]) == 0
    best = capsys.readouterr().out.split("best checkpoint:")[-1].strip()
    assert main(["evaluate", "--checkpoint", best, "--data", str(ds), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    predicted = int((np.array(metrics["confusion_matrix"]).sum(axis=0) > 0).sum())
    print(f"seed {seed} {model}: test accuracy {metrics['accuracy']:.3f}, {predicted} classes predicted")
    assert metrics["accuracy"] >= 0.5 and predicted >= 3, metrics["confusion_matrix"]
