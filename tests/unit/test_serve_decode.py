"""Decoding uploads: every supported format and depth, DICOM photometrics, and how bad files are refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cxrcore.data.transforms import decode_gray, scale_to_uint8
from cxrcore.decode import ImageDecodeError, UnsupportedImageTypeError, decode_upload, sniff_format
from tests.e2e.uploads import (
    chest,
    dicom_bytes,
    jpeg_bytes,
    png_bytes,
    png_header_only,
    rgb_dicom,
    xray_dicom,
)

GRAY = scale_to_uint8(chest(0))
TINY = np.zeros((4, 4), np.uint16)


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (png_bytes(GRAY), "image/png"),
        (png_bytes(GRAY, "RGB"), None),
        (png_bytes(GRAY, "RGBA"), "application/octet-stream"),
        (png_bytes(GRAY.astype(np.uint16) * 257), "image/png"),  # GRAY spans 0..255: scaling is exact
        (png_bytes(GRAY), "application/x-www-form-urlencoded"),  # curl --data-binary's default
    ],
    ids=["gray", "rgb", "rgba", "16-bit", "mislabelled"],
)
def test_png_variants_decode_to_the_same_pixels(data: bytes, content_type: str | None) -> None:
    np.testing.assert_array_equal(decode_upload(data, content_type), GRAY)


def test_a_png_curl_sent_with_data_is_told_to_use_data_binary() -> None:
    """`curl --data @x.png` strips the file's line breaks (the PNG signature holds one) and sends it form-
    encoded: the answer names the mistake, not only the content type."""
    from cxrcore.decode import UnsupportedImageTypeError

    stripped = png_bytes(GRAY).replace(b"\r", b"").replace(b"\n", b"")
    with pytest.raises(UnsupportedImageTypeError, match=r"--data-binary @file"):
        decode_upload(stripped, "application/x-www-form-urlencoded")


def test_jpeg_decodes_like_ingest() -> None:
    data = jpeg_bytes(GRAY)
    image = decode_upload(data, "image/jpeg")
    np.testing.assert_array_equal(image, decode_gray(data))
    assert np.abs(image.astype(int) - GRAY).mean() < 5


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_dicom_rescaled_and_inverted_to_look_like_the_png(photometric: str) -> None:
    image = decode_upload(xray_dicom(0, photometric), None)
    assert image.shape == GRAY.shape and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255
    # Bone (the bright frame) stays bright whichever way the file stores it.
    expected = (chest(0) - chest(0).min()) / np.ptp(chest(0)) * 255
    assert np.abs(image - expected).max() <= 1.0


def test_colour_dicom_reads_as_the_same_colour_png_does() -> None:
    rgb = np.stack([GRAY, 255 - GRAY, GRAY // 2], axis=-1)
    from PIL import Image

    as_png = scale_to_uint8(np.asarray(Image.fromarray(rgb).convert("L")))  # the DICOM's range is stretched
    assert np.abs(decode_upload(rgb_dicom(rgb), None).astype(int) - as_png).max() <= 1


def test_a_large_colour_dicom_decodes_within_a_few_bytes_a_pixel() -> None:
    """An 8192² RGB DICOM of 3 MB (RLE) once took 2.3 GB to decode: its luma was computed whole in float64."""
    import tracemalloc

    side = 2048
    rgb = np.zeros((side, side, 3), np.uint8)
    rgb[: side // 2, :, 0] = 255
    data = rgb_dicom(rgb)
    tracemalloc.start()
    try:
        image = decode_upload(data, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.shape == (side, side) and image[0, 0] == 255 and image[-1, -1] == 0
    # 41 bytes a pixel in float64; the pixels themselves are 3
    assert peak < 12 * side * side, f"{peak / side / side:.1f} bytes a pixel"


def test_dicom_without_preamble_needs_its_content_type() -> None:
    data = dicom_bytes(np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) % 4096, preamble=False)
    assert sniff_format(data) is None
    assert decode_upload(data, "application/dicom").shape == (64, 80)
    with pytest.raises(ImageDecodeError, match="unrecognised"):
        decode_upload(data, None)


def test_dicom_window_is_applied_when_present() -> None:
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    pixels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096).astype(np.uint16)
    ds = dcmread(DicomBytesIO(dicom_bytes(pixels)))
    ds.WindowCenter, ds.WindowWidth = 1000, 500
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    windowed = decode_upload(buffer.getvalue(), None)
    raw = decode_upload(buffer.getvalue(), None, window=False)
    assert (windowed == 0).mean() > (raw == 0).mean()  # values below the window clip to black


def _with(data: bytes, **attributes: Any) -> bytes:
    """The DICOM `data` with `attributes` set (None deletes one), saved again."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    ds = dcmread(DicomBytesIO(data))
    for name, value in attributes.items():
        if value is None:
            delattr(ds, name)
        else:
            setattr(ds, name, value)
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _lut_item(entries: list[int], first: int = 0, bits: int = 16) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.add_new(0x00283002, "US", [len(entries), first, bits])  # LUTDescriptor
    item.add_new(0x00283006, "US", entries)  # LUTData, as numbers (US), not bytes (OW)
    return item


_STORED = np.random.default_rng(3).integers(0, 4096, (96, 80)).astype(np.uint16)
_SIGNED = np.random.default_rng(4).integers(-2000, 2000, (96, 80)).astype(np.int16)
_DICOMS = {
    "rescaled": xray_dicom(1, "MONOCHROME2"),
    "rescaled, MONOCHROME1": xray_dicom(1),
    "window": _with(dicom_bytes(_STORED, slope=2.0, intercept=-1024), WindowCenter=1500, WindowWidth=2000),
    "window, sigmoid": _with(
        dicom_bytes(_STORED), WindowCenter=2000, WindowWidth=1200, VOILUTFunction="SIGMOID"
    ),
    "window, linear exact": _with(
        dicom_bytes(_STORED), WindowCenter=900, WindowWidth=300, VOILUTFunction="LINEAR_EXACT"
    ),
    "VOI LUT, not monotonic": _with(
        dicom_bytes(_STORED), VOILUTSequence=[_lut_item([(i * 7919) % 65536 for i in range(4096)])]
    ),
    "modality LUT": _with(
        dicom_bytes(_STORED),
        RescaleSlope=None, RescaleIntercept=None,
        ModalityLUTSequence=[_lut_item([4095 - i // 2 for i in range(3000)], first=500)],
    ),
    "signed": _with(
        dicom_bytes(_SIGNED.view(np.uint16), slope=0.5, intercept=100), PixelRepresentation=1
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(_DICOMS), ids=list(_DICOMS))
def test_dicom_display_is_computed_per_level_with_the_bytes_of_every_pixel(name: str) -> None:
    """decode_dicom maps stored levels through pydicom's modality and VOI LUTs once each, not every pixel."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    data = _DICOMS[name]
    ds = dcmread(DicomBytesIO(data))
    values = apply_modality_lut(ds.pixel_array, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds)
    expected = scale_to_uint8(np.asarray(values, dtype=np.float64))  # float input: per pixel
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = 255 - expected
    assert len(np.unique(expected)) > 2  # the mapping keeps detail: a wrong range would not
    np.testing.assert_array_equal(decode_upload(data, None), expected)


@pytest.mark.parametrize(
    ("data", "content_type", "error", "match"),
    [
        (b"", "image/png", ImageDecodeError, "empty"),
        (png_bytes(GRAY)[:200], "image/png", ImageDecodeError, "corrupt or truncated"),
        (b"\x00\x01garbage" * 50, "application/octet-stream", ImageDecodeError, "unrecognised"),
        (b"\x00\x01garbage" * 50, "image/png", ImageDecodeError, "not an image"),
        (b"hello", "text/plain", UnsupportedImageTypeError, "text/plain"),
        (b"GIF89a" + b"\0" * 50, "image/gif", UnsupportedImageTypeError, "GIF"),
        (b"%PDF-1.7\n" + b"\0" * 50, None, UnsupportedImageTypeError, "PDF"),
        (png_header_only(40_000, 40_000), "image/png", ImageDecodeError, "too large"),
        (dicom_bytes(TINY, rows=50_000, columns=50_000), None, ImageDecodeError, "too large"),
        (dicom_bytes(TINY, rows=64, columns=64), None, ImageDecodeError, "pixel data"),
    ],
    ids=["empty", "truncated", "garbage", "garbage-as-png", "text", "gif", "pdf", "png-bomb", "dicom-bomb",
         "dicom-short"],
)  # fmt: skip
def test_bad_uploads_raise_the_error_that_names_the_problem(
    data: bytes, content_type: str | None, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        decode_upload(data, content_type)


def test_multiframe_dicom_is_unsupported() -> None:
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    ds = dcmread(DicomBytesIO(dicom_bytes(np.zeros((2 * 64, 64), np.uint16), rows=64, columns=64)))
    ds.NumberOfFrames = 2
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(UnsupportedImageTypeError, match="multi-frame"):
        decode_upload(buffer.getvalue(), None)
