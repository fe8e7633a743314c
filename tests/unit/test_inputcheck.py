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
    """On the real sample at 256 px: patterns from 80 X-rays, the threshold from 20 more; the other 30 pass
    (README: "The input check"), and the same films inverted or turned 90° are unusual."""
    import random

    from PIL import Image

    from cxrcore.data.transforms import resize_image

    files = sorted(real_sample.glob("*/images/*.png"))
    random.Random(0).shuffle(files)
    films = np.stack([resize_image(np.asarray(Image.open(f).convert("L")), 256) for f in files])
    fitted = inputcheck.fit(films[:80], films[80:100])
    unseen = fitted.scores(films[100:])
    assert (unseen <= fitted.threshold).all(), (unseen.max(), fitted.threshold)
    turned = fitted.scores(np.stack([np.rot90(f).copy() for f in films[100:110]]))
    inverted = fitted.scores(255 - films[100:110])
    assert (turned > fitted.threshold).mean() >= 0.8 and (inverted > fitted.threshold).all()


def test_threshold_is_the_validation_scores_99th_percentile() -> None:
    val = phantoms(30, 4)
    fitted = inputcheck.fit(phantoms(80, 3), val)
    scores = fitted.scores(val)
    # fewer than 100 validation images: the highest of their scores, and none of them is unusual
    assert fitted.threshold == pytest.approx(scores.max(), abs=1e-6)
    assert not any(check["unusual"] for check in fitted.checks(val))
    summary = fitted.summary
    assert (summary["train_images"], summary["val_images"], summary["components"]) == (80, 30, 8)
    assert 0 < summary["explained"] < 1 and summary["val_median"] < summary["threshold"]


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
    assert set(read_beside_weights(tmp_path / WEIGHTS_NAME)) == {
        "cxr.input_reference.mean", "cxr.input_reference.components"
    }  # fmt: skip
    loaded = load_checkpoint(tmp_path)
    assert loaded.input_reference is not None
    sample = phantoms(5, 6)
    np.testing.assert_allclose(loaded.input_reference.scores(sample), reference.scores(sample), atol=1e-12)
    assert (
        json.loads((tmp_path / "card.json").read_text())["input_reference"]["threshold"]
        == reference.threshold
    )

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
    assert set(read_beside_weights(tmp_path / "0" / WEIGHTS_NAME)) == {
        "cxr.input_reference.mean", "cxr.input_reference.components"
    }  # fmt: skip
