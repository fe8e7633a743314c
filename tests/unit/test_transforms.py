"""Decoding any image the real world sends, resizing, masks and perceptual hashes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxrcore.data.transforms import (
    ImageDecodeError,
    decode_gray,
    hash_words,
    perceptual_hash,
    resize_image,
    resize_mask,
    scale_to_uint8,
)
from tests.conftest import xray


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_decode_gray_modes() -> None:
    gray = xray(0, 64)
    assert np.array_equal(decode_gray(_encode(Image.fromarray(gray))), gray)
    rgb = decode_gray(_encode(Image.fromarray(gray).convert("RGB")))
    assert rgb.shape == (64, 64) and np.abs(rgb.astype(int) - gray).max() <= 1
    jpeg = decode_gray(_encode(Image.fromarray(gray), "JPEG"))
    assert jpeg.dtype == np.uint8 and jpeg.shape == (64, 64)


def test_decode_16_bit_uses_the_full_range() -> None:
    sixteen = (np.linspace(0, 4095, 64 * 64).reshape(64, 64)).astype(np.uint16)  # 12-bit detector data
    decoded = decode_gray(_encode(Image.fromarray(sixteen)))
    assert decoded.min() == 0 and decoded.max() == 255
    assert np.all(np.diff(decoded.flatten().astype(int)) >= 0)  # monotonic, not clipped at 255


def test_decode_rgba_composites_on_black() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:4, :, 3] = 255  # top half opaque, bottom half transparent
    decoded = decode_gray(_encode(Image.fromarray(rgba, "RGBA")))
    assert decoded[0, 0] == 200 and decoded[7, 0] == 0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, not an image", "not an image"),
        (_encode(Image.fromarray(xray(1, 64)))[:300], "corrupt or truncated"),
    ],
)
def test_decode_errors_say_what_is_wrong(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason):
        decode_gray(data)


def test_decompression_bomb_is_refused() -> None:
    huge = Image.new("L", (9000, 9000))
    data = _encode(huge)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_gray(data)


def test_resize_and_mask_binarisation() -> None:
    assert resize_image(xray(2, 299), 64).shape == (64, 64)
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[64:192, 32:96] = 200  # a non-binary mask, as after lossy resizing
    small = resize_mask(mask, 64)
    assert small.shape == (64, 64) and set(np.unique(small)) == {0, 255}
    assert small[32, 16] == 255 and small[0, 0] == 0


def test_scale_to_uint8_constant_input() -> None:
    assert scale_to_uint8(np.full((3, 3), 7.0)).max() == 0


def test_perceptual_hash_is_stable_under_resize_and_far_for_other_images() -> None:
    image = xray(3, 256)
    resized = resize_image(resize_image(image, 180), 256)
    words = hash_words([perceptual_hash(image), perceptual_hash(resized), perceptual_hash(xray(4, 256).T)])
    assert words.shape == (3, 4)
    near = int(np.bitwise_count(words[0] ^ words[1]).sum())
    far = int(np.bitwise_count(words[0] ^ words[2]).sum())
    assert near <= 12 < far
