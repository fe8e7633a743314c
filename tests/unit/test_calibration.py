"""Temperature scaling: the fit, its report against metrics, the card fields, Predictor and evaluation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

import cxrcore.data.ingest
from cxrcore.calibration import (
    MAX_TEMPERATURE,
    apply_temperature,
    calibration_report,
    fit_temperature,
)
from cxrcore.checkpoint import CARD_NAME, ModelCard, load_card, save_checkpoint
from cxrcore.config import EvaluateConfig
from cxrcore.evaluate.evaluation import evaluate_checkpoint
from cxrcore.inference import Predictor
from cxrcore.metrics import classification_metrics
from cxrcore.models import create_model, get_build_args, get_input_spec
from tests.conftest import xray


def overconfident(n: int = 4000, classes: int = 4, scale: float = 3.0, seed: int = 0) -> tuple[Any, Any]:
    """Labels drawn from softmax(z), and logits scale * z: calibrated at temperature `scale`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, (n, classes))
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(classes, p=row) for row in probs])
    return scale * z, labels


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def write_classifier(directory: Path, temperature: float | None = None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = create_model("tiny_cnn_lstm")
    card = ModelCard(
        model=get_build_args(model), input_spec=get_input_spec(model).to_dict(), data={"size": 64}
    )
    if temperature is not None:
        card.temperature = temperature
        card.calibration = {"temperature": temperature, "ece_before": 0.2, "ece_after": 0.05}
    return save_checkpoint(directory, model, card)


@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_fit_recovers_a_known_temperature(scale: float) -> None:
    logits, labels = overconfident(scale=scale)
    assert fit_temperature(logits, labels) == pytest.approx(scale, rel=0.1)


def test_fit_is_the_same_on_log_probabilities_and_deterministic() -> None:
    logits, labels = overconfident()
    fitted = fit_temperature(logits, labels)
    log_probs = np.log(softmax(logits) + 1e-12)  # what the training loop passes
    assert fit_temperature(log_probs, labels) == pytest.approx(fitted, rel=1e-3)
    assert fit_temperature(logits, labels) == fitted
    assert fit_temperature(logits + 7.0, labels) == pytest.approx(fitted, rel=1e-6)  # per-row shift


def test_without_the_prior_the_fit_minimises_the_nll() -> None:
    logits, labels = overconfident(n=500, seed=3)
    fitted = fit_temperature(logits, labels, prior_log_sd=None)
    best = calibration_report(logits, labels, fitted)["nll_after"]
    for t in (fitted * 0.9, fitted * 1.1, 1.0):
        assert calibration_report(logits, labels, t)["nll_after"] >= best - 1e-9


@pytest.mark.parametrize(
    ("logits", "labels"),
    [
        (np.zeros((0, 4)), np.zeros(0, dtype=np.int64)),  # empty
        (np.array([[3.0, 0.0, 0.0, 0.0]]), np.array([0])),  # one sample
        (np.random.default_rng(0).normal(size=(20, 4)), np.full(20, 2)),  # one class
        (np.zeros((20, 4)), np.arange(20) % 4),  # flat logits: every temperature is the same
        (np.full((20, 4), np.nan), np.arange(20) % 4),  # nothing finite
    ],
)
def test_fit_returns_one_on_degenerate_input(logits: np.ndarray, labels: np.ndarray) -> None:
    assert fit_temperature(logits, labels) == 1.0


def test_a_small_error_free_validation_set_does_not_sharpen_the_probabilities() -> None:
    """24 images all right: the NLL says "sharper" without end, down to any bound, and the prior alone held
    T at 0.6-0.7; a clinician's review saw such a T (0.647 on 41 faultless images) make the served
    probabilities more confident and the NLL on other hospitals' images worse. Nothing to sharpen on: 1.0.
    One mistake among them, and the data has a say again."""
    logits, labels = overconfident(n=24, scale=0.5, seed=5)
    logits[np.arange(24), labels] += 4.0  # every prediction right
    assert fit_temperature(logits, labels, prior_log_sd=None) == 1.0
    assert fit_temperature(logits, labels) == 1.0
    logits[0] = np.roll(logits[0], 1)  # one confident mistake: softening is what the data asks for
    assert fit_temperature(logits, labels) > 1.0
    # On thousands of images the prior is negligible: the fit is the NLL's.
    many, many_labels = overconfident(n=4000, scale=2.0, seed=6)
    assert fit_temperature(many, many_labels) == pytest.approx(
        fit_temperature(many, many_labels, prior_log_sd=None), rel=0.02
    )


def test_fit_stays_within_bounds_and_finite() -> None:
    separable = np.eye(4)[np.arange(40) % 4] * 5.0  # every prediction right: sharper is always "better"
    fitted = fit_temperature(separable, np.arange(40) % 4, prior_log_sd=None)
    assert fitted == 1.0  # ... on no evidence: kept
    noise = np.random.default_rng(1).normal(size=(400, 4)) * 50.0  # logits unrelated to the labels
    fitted = fit_temperature(noise, np.arange(400) % 4)
    assert np.isfinite(fitted) and 1.0 < fitted <= MAX_TEMPERATURE
    with_nan = np.vstack([overconfident()[0], [[np.nan, 0.0, 0.0, 0.0]]])
    labels = np.r_[overconfident()[1], 0]
    assert fit_temperature(with_nan, labels) == pytest.approx(3.0, rel=0.1)


def test_fit_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="shapes"):
        fit_temperature(np.zeros((3, 4)), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="lie in"):
        fit_temperature(np.zeros((3, 4)), np.array([0, 1, 4]))


def test_report_halves_the_ece_and_agrees_with_classification_metrics() -> None:
    logits, labels = overconfident()
    temperature = fit_temperature(logits, labels)
    report = calibration_report(logits, labels, temperature)
    floors = {f"ece_floor{sd}_{when}" for sd in ("", "_sd") for when in ("before", "after")}
    assert set(report) == {
        "n",
        "temperature",
        "ece_before",
        "ece_after",
        "nll_before",
        "nll_after",
        "note",
        *floors,
    }
    assert report["temperature"] == temperature and report["note"] is None and report["n"] == len(labels)
    assert report["ece_after"] <= report["ece_before"] / 2
    assert report["nll_after"] < report["nll_before"]
    before = classification_metrics(labels, softmax(logits))
    after = classification_metrics(labels, softmax(logits / temperature))
    assert report["ece_before"] == pytest.approx(before["ece"], abs=1e-9)
    assert report["nll_before"] == pytest.approx(before["nll"], abs=1e-9)
    assert report["ece_after"] == pytest.approx(after["ece"], abs=1e-9)
    assert report["nll_after"] == pytest.approx(after["nll"], abs=1e-9)
    assert (
        report["ece_floor_after"] == after["ece_floor"]
        and report["ece_floor_sd_before"] == before["ece_floor_sd"]
    )
    assert report["ece_after"] < report["ece_floor_after"] + 3 * report["ece_floor_sd_after"]
    assert after["accuracy"] == before["accuracy"]  # temperature never changes the argmax
    json.dumps(report)  # plain types: it goes on the card
    with pytest.raises(ValueError, match="temperature"):
        calibration_report(logits, labels, 0.0)


def test_report_says_when_the_validation_temperature_made_a_split_worse() -> None:
    logits, labels = overconfident()
    report = calibration_report(logits, labels, 0.5)  # sharpening probabilities already too confident
    assert report["nll_after"] > report["nll_before"]
    assert report["note"].startswith("the temperature 0.50, fitted on the validation split, made the NLL")
    assert f"{report['nll_before']:.3f} -> {report['nll_after']:.3f}" in report["note"]
    assert calibration_report(logits, labels, 1.0)["note"] is None


def test_apply_temperature() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    torch.testing.assert_close(apply_temperature(logits, 2.0), torch.softmax(logits / 2, dim=1))
    assert apply_temperature(logits.half(), 1.0).dtype == torch.float32
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, float("nan"))


def test_predictor_divides_logits_by_the_card_temperature(tmp_path: Path) -> None:
    predictor = Predictor.from_checkpoint(write_classifier(tmp_path / "ckpt", temperature=2.0))
    assert predictor.card.temperature == predictor.temperature == 2.0
    images = [xray(seed, size=80) for seed in range(3)]
    logits = predictor.predict_logits(images)
    assert logits.shape == (3, 4) and logits.dtype == np.float32
    expected = softmax(logits.astype(np.float64) / 2.0)
    np.testing.assert_allclose(predictor.predict_proba(images), expected, atol=1e-6)
    np.testing.assert_allclose(
        predictor.predict_proba(images, calibrated=False), softmax(logits.astype(np.float64)), atol=1e-6
    )


def test_a_card_without_the_fields_loads_with_temperature_one(tmp_path: Path) -> None:
    directory = write_classifier(tmp_path / "old")
    data = json.loads((directory / CARD_NAME).read_text())
    assert data["temperature"] == 1.0 and data["calibration"] == {}
    del data["temperature"], data["calibration"]
    (directory / CARD_NAME).write_text(json.dumps(data))
    card = load_card(directory)
    assert card.temperature == 1.0 and card.calibration == {}
    predictor = Predictor.from_checkpoint(directory)
    images = [xray(7, size=64)]
    np.testing.assert_allclose(
        predictor.predict_proba(images),
        softmax(predictor.predict_logits(images).astype(np.float64)),
        atol=1e-6,
    )


def test_card_round_trips_the_fields_and_rejects_a_bad_temperature(tmp_path: Path) -> None:
    card = load_card(write_classifier(tmp_path / "new", temperature=1.7))
    assert card.temperature == 1.7 and card.calibration["ece_after"] == 0.05
    data = card.to_dict()
    assert ModelCard.from_dict({**data, "temperature": None}).temperature == 1.0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            ModelCard.from_dict({**data, "temperature": bad})


def test_evaluation_reports_calibration_before_and_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = write_classifier(tmp_path / "ckpt", temperature=2.5)
    n = 12
    images = [xray(seed, size=64) for seed in range(n)]
    table = pa.table(
        {
            "image": [image.ravel() for image in images],
            "mask": [np.zeros(64 * 64, dtype=np.uint8)] * n,
            "has_mask": [False] * n,
            "label_index": np.arange(n, dtype=np.int64) % 4,
            "source": ["synthetic"] * n,
            "file": [f"{i}.png" for i in range(n)],
        }
    )
    monkeypatch.setattr(cxrcore.data.ingest, "read_table", lambda *args, **kwargs: table)

    def chunks(data: str, columns: list[str], split: str | None = None, rows: int = 0) -> Iterator[pa.Table]:
        yield from (table.slice(start, 5).select(columns) for start in range(0, n, 5))  # 3 chunks: 5, 5, 2

    monkeypatch.setattr(cxrcore.data.ingest, "read_chunks", chunks)
    out = tmp_path / "eval"
    paths = evaluate_checkpoint(EvaluateConfig(checkpoint=str(checkpoint), data="unused", out=str(out)))

    metrics = json.loads(paths["metrics"].read_text())
    block = metrics["calibration"]
    assert block["split"] == "test" and block["temperature"] == 2.5
    predictor = Predictor.from_checkpoint(checkpoint)
    labels = np.arange(n) % 4
    expected = calibration_report(predictor.predict_logits(images), labels, 2.5)
    for key in ("ece_before", "ece_after", "nll_before", "nll_after"):
        assert block[key] == pytest.approx(expected[key], abs=1e-6)
    # The headline metrics are the calibrated (served) probabilities'.
    served = classification_metrics(labels, predictor.predict_proba(images))
    assert metrics["ece"] == pytest.approx(block["ece_after"], abs=1e-6)
    assert metrics["nll"] == pytest.approx(served["nll"], abs=1e-6)
    assert metrics["accuracy"] == served["accuracy"]
    html = paths["report"].read_text()
    assert (
        "<h2>calibration</h2>" in html
        and '<th scope="col">ECE before</th>' in html
        and '<th scope="col">NLL after</th>' in html
    )


def test_a_dozen_validation_images_never_sharpen_the_served_probabilities() -> None:
    """A real-sample study (session 52): on 13 validation images every fitted T was 0.55-0.61, and the test
    NLL rose each time. The same evidence on 52 images (the dozen repeated four times) sharpens."""
    from cxrcore.calibration import MIN_IMAGES_TO_SHARPEN, fit_temperature

    rng = np.random.default_rng(0)
    labels = np.arange(13) % 4
    logits = rng.normal(0, 0.3, size=(13, 4))
    logits[np.arange(13), labels] += 1.0  # right, under-confident
    logits[0] = [0.0, 1.0, 0.0, 0.0]  # and one mistake: the NLL asks for T < 1
    assert fit_temperature(logits, labels) == fit_temperature(logits, labels, prior_log_sd=None) == 1.0
    many = np.tile(logits, (4, 1))
    assert len(many) >= MIN_IMAGES_TO_SHARPEN and fit_temperature(many, np.tile(labels, 4)) < 0.5
