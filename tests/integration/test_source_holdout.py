"""The shortcut a source hold-out exposes, end to end: phantoms from two sites whose burned-in marker follows
the class at site a only, site b held out at ingest, a tiny model trained briefly on site a, then
`cxr evaluate`: high on the random split, low on the held-out site, and flagged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cxrcore.cli import main
from cxrcore.data.synthetic import write_synthetic_dataset
from cxrcore.evaluate.report import ALERT_OPEN
from cxrcore.metrics import wilson_interval

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]
SITE_A, SITE_B = "site-a.synthetic.cxr", "site-b.synthetic.cxr"


def test_a_model_reading_the_site_is_high_on_the_random_split_and_flagged_on_the_held_out_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw, data, runs, out = tmp_path / "raw", tmp_path / "dataset", tmp_path / "runs", tmp_path / "eval"
    write_synthetic_dataset(raw, per_class=60, seed=0, image_size=64, mask_size=32, sites=2)
    # A test fraction of 0.3 leaves the random split 40 site-a images, enough for its figure to mean
    # something; site b's 107 images all go to test.
    ingest = ["data", "ingest", str(raw), str(data), "--size", "64", "--test-fraction", "0.3"]
    assert main([*ingest, "--test-sources", SITE_B]) == 0
    # Without augmentation the tiny CNN picks up the marker in 4 epochs, before the lungs' patterns: 0.88-0.93
    # on the random split and 0.32-0.33 held out in 4 runs here (training is not bit-for-bit repeatable;
    # with 40 images per class, 1 run in 5 stopped short at 0.64).
    train = ["train", "--data", str(data), "--model", "tiny_dual_cnn", "--epochs", "4", "--workers", "1"]
    assert main([*train, "--no-augment", "--out", str(runs)]) == 0
    best = capsys.readouterr().out.split("best checkpoint:")[-1].strip()
    assert main(["evaluate", "--checkpoint", best, "--data", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    block = json.loads((out / "metrics.json").read_text())["source_holdout"]
    seen, held = block["random_split"], block["held_out"]
    print(printed)  # the figures the README quotes
    assert seen["sources"] == [SITE_A] and held["sources"] == [SITE_B]
    assert seen["n"] >= 30 and held["n"] >= 90 and block["restricted_to"] is None
    assert seen["accuracy"] >= 0.75, seen  # the marker follows the class at site a
    assert held["accuracy"] <= 0.45, held  # at site b it is random: about chance (0.25) without the lungs
    assert block["drop"]["accuracy"] >= 0.3 and block["large_drop"] is True
    assert f"WARNING: Large drop on the held-out sources ({SITE_B})" in printed
    assert "the model may be reading the site" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    interval = wilson_interval(round(metrics["accuracy"] * metrics["n"]), metrics["n"])
    assert interval is not None
    low, high = interval
    assert re.search(rf"accuracy 95% CI +{low:.2f}–{high:.2f}\n", printed), printed  # beside the accuracy
    html = (out / "report.html").read_text()
    assert f"{ALERT_OPEN}Large drop on the held-out sources ({SITE_B})" in html
