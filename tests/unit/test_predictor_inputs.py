"""What a Predictor takes from Python: every image as ingest and `cxr serve` would read it, or a clear error.

A uint8 cast had wrapped a 16-bit image's values modulo 256, read a [0, 1] float image as black, and
scored one (H, W) image as H images, all without a word."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrcore.decode import decode_upload
from cxrcore.inference import Predictor, gray_image
from tests.conftest import xray
from tests.e2e.uploads import write_checkpoint


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.from_checkpoint(write_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny_cnn_lstm", 0))


def png(array: np.ndarray, path: Path | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_every_form_of_one_picture_scores_as_its_decoded_upload(predictor: Predictor, tmp_path: Path) -> None:
    gray = xray(3, size=96)
    expected = predictor.predict_proba([decode_upload(png(gray, tmp_path / "x.png"))])
    rgb = np.repeat(gray[..., None], 3, axis=2)
    forms = {
        "path": tmp_path / "x.png",
        "str path": str(tmp_path / "x.png"),
        "PIL": Image.fromarray(gray),
        "RGB array": rgb,
        "(1, H, W) tensor": torch.from_numpy(gray)[None],
        "(H, W, 1) array": gray[..., None],
        "[0, 1] floats": gray / 255.0,
        "int64 levels": gray.astype(np.int64),
    }
    for name, image in forms.items():
        np.testing.assert_allclose(predictor.predict_proba([image]), expected, atol=1e-6, err_msg=name)
    stacked = predictor.predict_proba(np.stack([gray, gray]))  # a (B, H, W) array is a batch
    np.testing.assert_allclose(stacked, np.concatenate([expected, expected]), atol=1e-6)


def test_a_16_bit_image_is_read_from_its_range_as_its_file_is(predictor: Predictor, tmp_path: Path) -> None:
    detector = (xray(4, size=96).astype(np.uint16) * 16 + 100).astype(np.uint16)  # 12-bit values
    path = tmp_path / "x16.png"
    Image.fromarray(detector).save(path)  # mode I;16
    decoded = decode_upload(path.read_bytes())
    np.testing.assert_array_equal(gray_image(detector), decoded)
    np.testing.assert_array_equal(gray_image(path), decoded)
    np.testing.assert_allclose(
        predictor.predict_proba([detector]), predictor.predict_proba([decoded]), atol=1e-6
    )


def test_what_is_not_a_batch_of_images_is_refused_saying_what_it_got(predictor: Predictor) -> None:
    gray = xray(5, size=64)
    with pytest.raises(ValueError, match=r"takes a batch of images: pass one image as \[image\]"):
        predictor.predict_proba(gray)  # had been scored as 64 images, one per row
    for alone in ("x.png", np.repeat(gray[..., None], 3, axis=2), gray[..., None], torch.from_numpy(gray)):
        with pytest.raises(ValueError, match=r"pass one image as \[image\]"):
            predictor.predict_proba(alone)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no images to predict"):
        predictor.predict_proba([])
    with pytest.raises(ValueError, match=r"an image of shape \(64, 64, 3\): .* as uint8"):
        predictor.predict_proba([np.zeros((64, 64, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="NaN or infinite"):
        predictor.predict_proba([np.full((64, 64), np.nan)])
    with pytest.raises(ValueError, match=r"shape \(2, 64, 64\)"):
        predictor.predict_proba([np.zeros((2, 64, 64), dtype=np.uint8)])


def test_weights_that_hold_nan_are_refused_where_they_are_loaded(tmp_path: Path) -> None:
    """A review (session 57): a checkpoint whose weights were NaN was registered, promoted and served, and
    every request got HTTP 500; `cxr evaluate` ended in a traceback. Loading it now fails in one sentence."""
    from cxrcore.checkpoint import NonFiniteWeightsError, load_model, save_checkpoint

    good = write_checkpoint(tmp_path / "good", "tiny_cnn_lstm", 0)
    model, card = load_model(good)
    with torch.no_grad():
        next(iter(model.parameters()))[0].fill_(float("nan"))
    blown = save_checkpoint(tmp_path / "blown", model, card)
    for load in (lambda: load_model(blown), lambda: Predictor.from_checkpoint(blown)):
        with pytest.raises(
            NonFiniteWeightsError, match=r"blown/model\.safetensors: its weights hold NaN or infinite"
        ):
            load()
    assert Predictor.from_checkpoint(good).predict_proba([np.zeros((64, 64), np.uint8)]).shape == (1, 4)
