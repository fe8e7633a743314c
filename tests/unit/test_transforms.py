"""Decoding any image the real world sends, resizing, masks and perceptual hashes."""

from __future__ import annotations

import io
from collections.abc import Callable

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
    scale_levels_to_uint8,
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


def test_a_big_endian_16_bit_file_decodes_as_its_little_endian_twin() -> None:
    """Scanners write TIFFs in Motorola byte order ("MM", Pillow's "I;16B"): the values, not the bytes."""
    levels = (np.arange(64 * 80).reshape(64, 80) * 7 % 4000).astype(np.uint16)
    big = _encode(Image.fromarray(levels.astype(">u2")), "TIFF")
    assert big[:2] == b"MM"
    decoded = decode_gray(big)
    np.testing.assert_array_equal(decoded, decode_gray(_encode(Image.fromarray(levels))))
    np.testing.assert_array_equal(scale_levels_to_uint8(levels.astype(">u2")), scale_levels_to_uint8(levels))


def test_a_16_bit_tiff_whose_zero_is_white_decodes_as_a_viewer_shows_it() -> None:
    """PhotometricInterpretation 0 (MinIsWhite), as some CR/DR exports write: Pillow inverts 8-bit ones,
    not 16-bit ones, which were stored as negatives (correlation -1 with the viewer's picture)."""
    from PIL import TiffImagePlugin

    levels = (np.arange(64 * 80).reshape(64, 80) * 7 % 4000).astype(np.uint16)
    white_is_zero = TiffImagePlugin.ImageFileDirectory_v2()
    white_is_zero[262] = 0
    stored = io.BytesIO()
    Image.fromarray((4095 - levels).astype(np.uint16)).save(stored, format="TIFF", tiffinfo=white_is_zero)
    decoded = decode_gray(stored.getvalue()).astype(np.float64)
    assert np.corrcoef(decoded.ravel(), levels.ravel())[0, 1] > 0.99


def test_a_tiff_of_several_pages_is_refused_and_its_pyramid_is_not_another_page() -> None:
    """A label sheet, then the X-ray: the first page was taken, silently. A reduced-resolution copy
    (NewSubfileType 1, a pyramid's level) is the same picture, and the file is read."""
    picture, sheet = Image.fromarray(xray(0, 64)), Image.new("L", (64, 64), 128)
    pages = io.BytesIO()
    sheet.save(pages, format="TIFF", save_all=True, append_images=[picture])
    with pytest.raises(ImageDecodeError, match=r"^TIFF of 2 pages: which one is the X-ray cannot be told"):
        decode_gray(pages.getvalue())
    assert decode_gray(_encode(picture, "TIFF")).shape == (64, 64)
    with pytest.raises(ImageDecodeError, match=r"^a TIFF variant Pillow cannot read"):
        decode_gray(b"MM\x00*" + b"\x00" * 64)


def _png_16_bit(pixels: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG of (H, W, C) uint16 pixels, which Pillow cannot write for colour."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_a_16_bit_colour_png_of_detector_values_is_refused_and_one_of_full_range_read() -> None:
    """Pillow reads 8 of a colour PNG's 16 bits a channel: 12-bit values would be a near-black picture."""
    twelve = (np.linspace(0, 4095, 64 * 64).reshape(64, 64, 1) * [1, 1, 1]).astype(np.uint16)
    with pytest.raises(ImageDecodeError, match="16-bit colour PNG whose values lie in its low bits"):
        decode_gray(_png_16_bit(twelve, 2))
    grey_alpha = np.concatenate([twelve[..., :1], np.full_like(twelve[..., :1], 65535)], axis=-1)
    with pytest.raises(ImageDecodeError, match="16 levels here"):
        decode_gray(_png_16_bit(grey_alpha, 4))
    full = twelve * 16  # the same picture over the 16 bits
    np.testing.assert_array_equal(decode_gray(_png_16_bit(full, 2)), (full[..., 0] >> 8).astype(np.uint8))


@pytest.mark.parametrize(("orientation", "turn"), [(3, 2), (6, -1), (8, 1)])
def test_a_jpeg_is_decoded_upright_as_its_exif_orientation_says(orientation: int, turn: int) -> None:
    """A phone or scanner JPEG stored sideways with an EXIF orientation: every viewer shows it upright."""
    image = np.zeros((40, 60), np.uint8)
    image[:10, :10] = 255  # a marker in the top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", exif=exif, quality=95)
    stored = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    np.testing.assert_array_equal(decode_gray(buffer.getvalue()), np.rot90(stored, turn))


@pytest.mark.parametrize(
    ("height", "width", "shared"),
    [
        (300, 250, True),  # within Pillow's block: its memory, not a copy
        (2048, 4096, True),  # exactly one 16 MiB block
        (2049, 4096, False),  # one row over: spread over blocks, copied
    ],
)
def test_a_16_bit_image_decodes_to_the_same_bytes_whether_its_pixels_are_shared_or_copied(
    height: int, width: int, shared: bool
) -> None:
    from cxrcore.data.transforms import _uint16_pixels

    pixels = np.random.default_rng(height).integers(0, 4096, (height, width)).astype(np.uint16)
    pixels[0, :3] = [0, 65535, 1]  # the whole 16-bit range, little-endian bytes that differ
    data = _encode(Image.fromarray(pixels))
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.mode == "I;16"
        read = _uint16_pixels(img)
    assert read.dtype == np.uint16 and np.array_equal(read, pixels)  # still valid after the image closed
    owner = read
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    assert (type(owner).__name__ == "Buffer") is shared  # pyarrow's Buffer over Pillow's memory
    assert np.array_equal(decode_gray(data), scale_to_uint8(pixels))


def test_a_16_bit_image_is_copied_where_pillow_has_no_arrow_export(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa

    from cxrcore.data.transforms import _uint16_pixels

    def no_export(obj: object) -> None:
        raise TypeError(f"Could not convert {obj!r}")  # what pyarrow says of an object it cannot read

    pixels = np.random.default_rng(3).integers(0, 65536, (40, 30)).astype(np.uint16)
    monkeypatch.setattr(pa, "array", no_export)
    assert np.array_equal(_uint16_pixels(Image.fromarray(pixels)), pixels)


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


@pytest.mark.parametrize(
    ("lung", "background"), [(1, 0), (2, 0), (76, 0)], ids=["0/1", "label 2", "red lungs' luma"]
)
def test_a_mask_whose_values_all_lie_below_mid_grey_marks_every_non_zero_pixel(
    lung: int, background: int
) -> None:
    mask = np.full((128, 128), background, np.uint8)
    mask[32:96, 16:48] = lung
    mask[32:96, 80:112] = 1  # the other lung labelled 1
    binary = resize_mask(mask, 64)
    np.testing.assert_array_equal(binary, np.where(mask[::2, ::2] > 0, 255, 0))


def test_scale_to_uint8_constant_input() -> None:
    assert scale_to_uint8(np.full((3, 3), 7.0)).max() == 0
    assert scale_to_uint8(np.full((3, 3), 7, np.uint16)).max() == 0


def _per_pixel(arr: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """What scale_levels_to_uint8 replaces: every pixel through float64, then the range onto 0..255."""
    values = np.asarray(transform(arr) if transform else arr, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


_RNG = np.random.default_rng(7)
_IMAGES = {
    "12-bit": _RNG.integers(0, 4096, (120, 100)).astype(np.uint16),
    "16-bit, narrow": _RNG.integers(30_000, 30_900, (64, 80)).astype(np.uint16),
    "signed, negative": _RNG.integers(-2048, 2047, (90, 70)).astype(np.int16),
    "signed, full span": np.array([[-32768, 32767], [0, -1]], np.int16),
    "8-bit": _RNG.integers(3, 250, (50, 40)).astype(np.uint8),
    "int32, narrow": _RNG.integers(-70_000, -69_000, (40, 40)).astype(np.int32),
    "int32, wider than the table": np.array([[0, 1 << 20], [5, 7]], np.int32),
    "two levels": np.array([[9, 9], [9, 10]], np.uint16),
    "one level": np.full((5, 5), 300, np.uint16),
}
_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray] | None] = {
    "none": None,
    "rescale, negative slope": lambda levels: levels.astype(np.float64) * -0.37 + 1024.0,
    "window": lambda levels: np.clip((levels.astype(np.float64) - 1500.5) / 999 + 0.5, 0, 1) * 255,
    "not monotonic": lambda levels: np.sin(levels.astype(np.float64) / 37.0) * 1000,
    "a lookup table": lambda levels: (levels.astype(np.int64) * 7919) % 4093,
}


@pytest.mark.parametrize("transform", list(_TRANSFORMS), ids=list(_TRANSFORMS))
@pytest.mark.parametrize("image", list(_IMAGES), ids=list(_IMAGES))
def test_levels_through_a_table_give_the_bytes_of_every_pixel_through_float64(
    image: str, transform: str
) -> None:
    arr, function = _IMAGES[image], _TRANSFORMS[transform]
    expected = _per_pixel(arr, function)
    np.testing.assert_array_equal(scale_levels_to_uint8(arr, function), expected)
    if function is None:
        np.testing.assert_array_equal(scale_to_uint8(arr), expected)
    assert expected.max() in (0, 255)  # the cases reach both ends (or are constant), so the range is used


def test_levels_not_in_the_image_do_not_stretch_its_range() -> None:
    """A table that maps an absent level (5) far outside what the image's own levels reach."""
    arr = np.array([[4, 6], [6, 4]], np.uint16)
    table = np.array([0, 0, 0, 0, 100.0, 9_999.0, 200.0])
    np.testing.assert_array_equal(
        scale_levels_to_uint8(arr, lambda levels: table[levels]), [[0, 255], [255, 0]]
    )


def test_perceptual_hash_is_stable_under_resize_and_far_for_other_images() -> None:
    image = xray(3, 256)
    resized = resize_image(resize_image(image, 180), 256)
    words = hash_words([perceptual_hash(image), perceptual_hash(resized), perceptual_hash(xray(4, 256).T)])
    assert words.shape == (3, 4)
    near = int(np.bitwise_count(words[0] ^ words[1]).sum())
    far = int(np.bitwise_count(words[0] ^ words[2]).sum())
    assert near <= 12 < far
