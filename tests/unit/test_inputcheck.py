"""The input check: training patterns, the validation threshold, what counts as unusual, and the reference
stored beside a checkpoint's weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrcore import inputcheck
from cxrcore.checkpoint import (
    WEIGHTS_NAME,
    ModelCard,
    load_checkpoint,
    read_beside_weights,
    read_weights,
    save_checkpoint,
)
from cxrcore.data.synthetic import render_phantom
from cxrcore.labels import CLASSES
from cxrcore.models import create_model, get_build_args, get_input_spec

SIZE = 64
ARRAYS = {f"cxr.input_reference.{name}" for name in ("mean", "components", "variances", "thresholds")}


def phantoms(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([render_phantom(CLASSES[i % 4], rng, size=SIZE, mask_size=SIZE)[0] for i in range(count)])


@pytest.fixture(scope="module")
def reference() -> inputcheck.InputReference:
    return inputcheck.fit(phantoms(120, 0), phantoms(40, 1))


def not_xrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    page = np.full((SIZE, SIZE), 240, np.uint8)
    page[4:60:6, 6:58] = 20  # lines of text
    return {
        "noise": rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8),
        "blank": np.zeros((SIZE, SIZE), np.uint8),
        "checkerboard": (((yy // 8 + xx // 8) % 2) * 255).astype(np.uint8),
        "page of text": page,
        "inverted film": 255 - phantoms(1, 9)[0],
    }


def test_phantoms_it_never_saw_pass_and_other_pictures_are_unusual(
    reference: inputcheck.InputReference,
) -> None:
    unseen = reference.scores(phantoms(60, 2))
    assert (unseen <= reference.threshold).mean() >= 0.9  # about 1 in 100 over, by construction
    others = not_xrays()
    scores = dict(zip(others, reference.scores(np.stack(list(others.values()))), strict=True))
    assert all(score > reference.threshold for score in scores.values()), scores
    assert scores["blank"] == 1.0  # nothing to explain: all of it is unexplained


def test_real_xrays_it_never_saw_pass_and_turned_or_inverted_films_do_not(real_sample: Path) -> None:
    """On the real sample at 256 px, over 10 shuffles: patterns from 80 X-rays, the thresholds with 20 more;
    about 1 in 50 of the other 30 is flagged at most (the card's expected share), and the same films
    inverted or turned 90° are unusual (README: "The input check")."""
    import random

    from PIL import Image

    from cxrcore.data.transforms import resize_image

    files = sorted(real_sample.glob("*/images/*.png"))
    films = np.stack([resize_image(np.asarray(Image.open(f).convert("L")), 256) for f in files])
    flagged, expected, turned_flagged = [], [], []
    for seed in range(10):
        order = list(range(len(films)))
        random.Random(seed).shuffle(order)
        fitted = inputcheck.fit(films[order[:80]], films[order[80:100]])
        unseen = films[order[100:]]
        flagged.append(fitted.unusual(unseen)[2].mean())
        expected.append(fitted.summary["expected_share"])
        assert fitted.unusual(255 - unseen[:10])[2].all()
        turned_flagged.append(fitted.unusual(np.stack([np.rot90(f).copy() for f in unseen[:10]]))[2].mean())
    assert np.mean(flagged) <= 0.04 and np.mean(expected) <= 0.03, (flagged, expected)
    assert np.mean(turned_flagged) >= 0.8, turned_flagged


def test_thresholds_come_from_every_image_it_was_not_fitted_on() -> None:
    """A verifier (session 51): a threshold from 13 validation images was their highest score, which 1 in 14
    images like them exceed, not the 1 in 100 said; the training images' out-of-fold statistics join them."""
    train, val = phantoms(80, 3), phantoms(30, 4)
    fitted = inputcheck.fit(train, val)
    summary = fitted.summary
    assert (summary["train_images"], summary["val_images"], summary["components"]) == (80, 30, 8)
    assert summary["out_of_sample_images"] == 110 and 0 < summary["explained"] < 1
    # under 200 pooled: each threshold is the highest out-of-sample value, which 1 in 111 new ones exceed
    assert summary["expected_share"] == pytest.approx(2 / 111, abs=1e-4)
    scores, distances = fitted.statistics(inputcheck.thumbnails(val))
    assert scores.max() <= fitted.threshold and distances.max() <= fitted.distance_threshold
    assert not any(check["unusual"] for check in fitted.checks(val))
    assert summary["median_score"] < summary["threshold"]
    assert summary["threshold"] == pytest.approx(fitted.threshold, abs=1e-6)


def test_a_damaged_reference_is_said_and_checks_nothing(
    reference: inputcheck.InputReference, caplog: pytest.LogCaptureFixture
) -> None:
    """A verifier (session 51): NaN components answered score null and unusual false for every image, and
    arrays lost from the weights file turned the check off without a word."""
    arrays, summary = reference.arrays(), reference.summary
    assert inputcheck.InputReference.from_arrays(arrays, summary) is not None
    nan = {**arrays, "cxr.input_reference.components": arrays["cxr.input_reference.components"] * np.nan}
    scaled = {**arrays, "cxr.input_reference.components": arrays["cxr.input_reference.components"] * 10}
    lost = {k: v for k, v in arrays.items() if not k.endswith("mean")}
    for damaged, why in ((nan, "not finite"), (scaled, "not orthonormal"), (lost, "missing")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="cxrcore.inputcheck"):
            assert inputcheck.InputReference.from_arrays(damaged, summary) is None
        assert why in caplog.text and "images are not checked" in caplog.text
    edited = {**summary, "threshold": 100.0}  # the card's threshold edited: the weights file's is the record
    assert inputcheck.InputReference.from_arrays(arrays, edited) is None
    assert inputcheck.InputReference.from_arrays({}, {}) is None  # a checkpoint without one: nothing said


def test_brightness_contrast_and_size_do_not_count(reference: inputcheck.InputReference) -> None:
    """Another hospital's windowing moves every pixel by a gain and an offset: the score stays."""
    image = phantoms(1, 5)[0]
    dimmer = (image.astype(np.float64) * 0.6 + 40).round().astype(np.uint8)
    twice = np.kron(image, np.ones((2, 2), np.uint8))  # the same picture at 128 px
    base, dim, big = (
        reference.scores(np.stack([image]))[0],
        *reference.scores([dimmer]),
        *reference.scores([twice]),
    )
    assert dim == pytest.approx(base, abs=0.01) and big == pytest.approx(base, abs=1e-9)


def test_too_few_images_fit_no_reference(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    images = {"train": phantoms(10, 0), "val": phantoms(3, 1)}
    asked = []

    def split_thumbnails(dataset: str, split: str, limit: int) -> np.ndarray:
        asked.append((split, limit))
        return inputcheck.thumbnails(images[split])

    monkeypatch.setattr(inputcheck, "split_thumbnails", split_thumbnails)
    with caplog.at_level("INFO", logger="cxrcore.inputcheck"):
        assert inputcheck.fit_dataset("somewhere") is None
    assert asked == [("train", inputcheck.MAX_TRAIN_IMAGES), ("val", inputcheck.MAX_VAL_IMAGES)]
    assert "10 training and 3 validation images are too few" in caplog.text


def checkpoint(
    folder: Path, reference: inputcheck.InputReference | None
) -> tuple[torch.nn.Module, ModelCard]:
    """A tiny untrained classifier saved to `folder` as training saves it, with `reference` if given."""
    torch.manual_seed(0)
    model = create_model("tiny_cnn_lstm")
    card = ModelCard(
        model=get_build_args(model), input_spec=get_input_spec(model).to_dict(), data={"size": SIZE},
        input_reference=reference.summary if reference else {},
    )  # fmt: skip
    save_checkpoint(folder, model, card, beside_weights=reference.arrays() if reference else None)
    return model, card


def test_the_reference_travels_in_the_weights_file(
    tmp_path: Path, reference: inputcheck.InputReference
) -> None:
    model, card = checkpoint(tmp_path, reference)

    # the model's tensors only: any loader of the weights, an earlier cxr's too, loads them strictly
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / WEIGHTS_NAME)) == set(model.state_dict())
    model.load_state_dict(read_weights(tmp_path / WEIGHTS_NAME))
    assert set(read_beside_weights(tmp_path / WEIGHTS_NAME)) == set(ARRAYS)
    loaded = load_checkpoint(tmp_path)
    assert loaded.input_reference is not None
    sample = phantoms(5, 6)
    np.testing.assert_allclose(loaded.input_reference.scores(sample), reference.scores(sample), atol=1e-12)
    card_threshold = json.loads((tmp_path / "card.json").read_text())["input_reference"]["threshold"]
    assert card_threshold == pytest.approx(reference.threshold, rel=1e-5)
    assert loaded.input_reference.threshold == pytest.approx(reference.threshold, rel=1e-6)

    with pytest.raises(ValueError, match="cannot be stored beside the weights"):
        save_checkpoint(tmp_path / "other", model, card, beside_weights={"fc.weight": np.zeros(1)})


def test_a_checkpoint_without_a_reference_checks_nothing(tmp_path: Path) -> None:
    from cxrcore.inference import Predictor

    checkpoint(tmp_path, None)
    predictor = Predictor.from_checkpoint(tmp_path)
    assert predictor.input_reference is None and predictor.input_checks(phantoms(2, 0)) is None
    probabilities, checks = predictor.predict_checked(phantoms(2, 0))
    assert probabilities.shape == (2, 4) and checks is None


def test_predict_checked_scores_the_image_at_the_model_base_size(
    tmp_path: Path, reference: inputcheck.InputReference
) -> None:
    """An upload of any size is checked as the model sees it: resized to the base size first."""
    from cxrcore.data.transforms import resize_image
    from cxrcore.inference import Predictor

    checkpoint(tmp_path, reference)
    predictor = Predictor.from_checkpoint(tmp_path)
    rng = np.random.default_rng(3)
    upload = render_phantom("COVID", rng, size=299, mask_size=64)[0]
    probabilities, checks = predictor.predict_checked([upload])
    np.testing.assert_allclose(probabilities, predictor.predict_proba([upload]), atol=1e-6)
    assert checks is not None
    expected = reference.scores([resize_image(upload, SIZE)])[0]
    assert checks[0]["score"] == pytest.approx(expected, abs=1e-4) and checks[0]["unusual"] is False


def test_equal_weights_and_reference_save_to_equal_bytes(
    tmp_path: Path, reference: inputcheck.InputReference
) -> None:
    """safetensors writes its metadata map in a random order; the registry hashes the file (weights_sha256)
    and finds a checkpoint already registered by it, so the same checkpoint must always be the same bytes."""
    import hashlib

    digests = set()
    for n in range(6):
        checkpoint(tmp_path / str(n), reference)
        digests.add(hashlib.sha256((tmp_path / str(n) / WEIGHTS_NAME).read_bytes()).hexdigest())
    assert len(digests) == 1
    assert set(read_beside_weights(tmp_path / "0" / WEIGHTS_NAME)) == set(ARRAYS)
