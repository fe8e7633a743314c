"""Uploaded image bytes (PNG, JPEG, DICOM) → uint8 grayscale; errors tell "wrong kind" from "broken".

Serving decodes here; PNG and JPEG go through `decode_gray`, the function ingest uses, so an upload and
a training image of the same file give the same pixels. What the bytes are decides the format; the
declared content type only matters when the bytes are not recognised. DICOM pixel data that only GDCM
decodes (JPEG Lossless, JPEG-LS) are decoded in a child process (`cxrcore.decoder_process`).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from cxrcore.data.transforms import (
    MAX_DECODED_BYTES,
    MAX_IMAGE_PIXELS,
    DecoderUnavailableError,
    ImageDecodeError,
    decode_gray,
    scale_levels_to_uint8,
    scale_to_uint8,
    unreadable_jpeg,
)

__all__ = [
    "IN_A_CHILD",
    "SUPPORTED_TYPES",
    "DecoderUnavailableError",
    "ImageDecodeError",
    "UnsupportedImageTypeError",
    "decode_dicom",
    "decode_upload",
    "pixel_decoder",
    "sniff_format",
    "upload_bytes",
]

SUPPORTED_TYPES: dict[str, str] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "application/dicom": "dicom",
    "application/x-dicom": "dicom",  # the type before DICOM's registration, still sent by older viewers
}
"""Content types this module decodes, and the format each names."""

# Content types that say nothing about the format: the bytes decide.
_GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"DICM", 128, "dicom"),
)
# Formats recognised only to refuse them by name.
_OTHER_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF8", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"WEBP", 8, "WebP"),
    (b"%PDF", 0, "PDF"),
    (b"PK\x03\x04", 0, "ZIP"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\x1f\x8b", 0, "gzip"),
)
_LUMA = np.array([299, 587, 114], dtype=np.int64)  # ITU-R 601 luma, in thousandths (as Pillow's "L")
_LUMA_BLOCK_PIXELS = 1 << 18


def _luma(pixels: np.ndarray) -> np.ndarray:
    """The luma of an H×W×C colour image (RGB first), as integers of the channels' dtype, a block of rows at
    a time: whole, in float64, an 8192² RGB DICOM of 3 MB (RLE) took 2.3 GB and 7.5 s to decode, the
    blocks keep it to the pixels themselves and one plane."""
    if pixels.dtype.kind not in "iu":
        return np.asarray(pixels[..., :3], dtype=np.float64) @ (_LUMA / 1000.0)
    out = np.empty(pixels.shape[:2], dtype=pixels.dtype.newbyteorder("="))
    rows = max(1, _LUMA_BLOCK_PIXELS // pixels.shape[1])
    for top in range(0, pixels.shape[0], rows):
        block = pixels[top : top + rows, :, :3].astype(np.int64)
        out[top : top + rows] = (block @ _LUMA + 500) // 1000
    return out


_INGEST_ONLY = frozenset({"BMP", "TIFF", "WebP", "JPEG 2000"})
"""Formats ingest reads (a dataset may be TIFF) that the API refuses, to keep libtiff's, libwebp's,
OpenJPEG's and the BMP decoder's attack surface off the server: a client sends them as PNG
(`upload_bytes`: `cxr predict` and `cxr demo --real` do)."""


def _other_format(data: bytes) -> str | None:
    """The name of the other format the leading bytes are (GIF, TIFF, PDF, ...), or None."""
    return next((name for sig, at, name in _OTHER_SIGNATURES if data[at : at + len(sig)] == sig), None)


def upload_bytes(data: bytes) -> tuple[bytes, str | None]:
    """The bytes to POST for a file, and their content type: the file itself (None: the type its name
    says), or for a format ingest reads but the API does not (TIFF, BMP), the 8-bit grayscale PNG of what
    ingest decodes from it (WebP and JPEG 2000 too). The server decodes that PNG to the same
    pixels, so the file is scored as `cxr evaluate` scored it. Raises ImageDecodeError for such a file
    that cannot be read."""
    kind = _other_format(data)
    if kind not in _INGEST_ONLY:
        return data, None
    from PIL import Image

    try:
        gray = decode_gray(data)
    except Exception as exc:  # Pillow raises many kinds on crafted files
        why = str(exc) if isinstance(exc, ImageDecodeError) else f"{type(exc).__name__}: {exc}"
        raise ImageDecodeError(f"unreadable {kind} file: {why}") from exc
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), "image/png"


class UnsupportedImageTypeError(ValueError):
    """The upload is a kind of file this service does not read (HTTP 415, unlike a broken image's 400)."""


def sniff_format(data: bytes) -> str | None:
    """'png', 'jpeg' or 'dicom' from the leading bytes; None when they are none of those."""
    for signature, offset, name in _SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return name
    return None


def decode_upload(data: bytes, content_type: str | None = None, *, window: bool = True) -> np.ndarray:
    """Decode an upload to a uint8 H×W grayscale array.

    Raises UnsupportedImageTypeError for another kind of file (GIF, PDF, text, a content type
    other than PNG/JPEG/DICOM with bytes that are none of them) and ImageDecodeError for a PNG,
    JPEG or DICOM that cannot be read, an empty body, or one too large to decode (a decompression
    bomb); whatever the bytes, nothing else but DecoderUnavailableError, which says the machine could
    not start the decoder of a compressed DICOM, not that the file is bad. `window` applies a DICOM's
    VOI LUT / window when it has one.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    declared = (content_type or "").split(";")[0].strip().lower()
    fmt = sniff_format(data)
    if fmt is None:
        if name := _other_format(data):
            convert = " (`cxr predict` converts it)" if name in _INGEST_ONLY else ""
            raise UnsupportedImageTypeError(
                f"{name} files are not supported; send PNG, JPEG or DICOM{convert}"
            )
        if declared == "application/x-www-form-urlencoded":  # what `curl --data @x.png` sends
            raise UnsupportedImageTypeError(
                "a form-encoded body: `curl --data @file` (or -d) sends this, and strips the file's line "
                "breaks, which corrupts an image; send the file with `--data-binary @file` or `-F file=@file`"
            )
        if declared not in SUPPORTED_TYPES and declared not in _GENERIC_TYPES:
            raise UnsupportedImageTypeError(
                f"unsupported content type {declared!r}; send {', '.join(sorted(SUPPORTED_TYPES))}"
            )
        if SUPPORTED_TYPES.get(declared) != "dicom":  # only DICOM may lack its signature (no preamble)
            said = f" (declared {declared})" if declared else ""
            raise ImageDecodeError(f"not an image: unrecognised bytes{said}, not a PNG, JPEG or DICOM file")
        fmt = "dicom"
    try:
        return decode_dicom(data, window=window) if fmt == "dicom" else decode_gray(data)
    except ImageDecodeError as exc:
        # A JPEG process Pillow does not read (lossless, JPEG-LS, 12-bit) is a kind of file, not a broken one.
        if fmt == "jpeg" and (unreadable := unreadable_jpeg(data)):
            raise UnsupportedImageTypeError(unreadable) from exc
        raise
    except (UnsupportedImageTypeError, DecoderUnavailableError):
        raise
    except Exception as exc:  # Pillow and pydicom raise many kinds on crafted files; all mean "unreadable"
        raise ImageDecodeError(f"corrupt {fmt.upper()} file: {type(exc).__name__}: {exc}") from exc


_DEFLATED = b"1.2.840.10008.1.2.1.99"
"""The Deflated Explicit VR Little Endian transfer syntax UID, as a file's meta information holds it."""
_FILE_META_BYTES = 4096
"""Where a DICOM file's meta information (preamble, DICM, group 0002) lies: a few hundred bytes."""

_LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
"""DICOM ViewPosition values of a lateral projection (the standard's LL and RL, and what some units write).
A chest study exported from a PACS holds its lateral beside its PA; a decubitus (LLD, RLD) is frontal."""
_NOT_RADIOGRAPHS = frozenset({"CT", "MR", "US", "NM", "PT", "MG", "XA", "RF", "OCT", "OP", "OPT", "IVUS",
                              "ES", "SM", "IO", "PX", "BMD", "TG"})  # fmt: skip
"""DICOM Modality values of what is not a projection radiograph of the chest: a CT slice, an MRI, a
mammogram (MG), an angiogram (XA), a dental image (IO, PX)... each was scored as confidently as an X-ray.
CR, DX and DR are radiographs; OT and SC (secondary capture) are what many exports write for any image."""
_CHEST_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO")
"""Words of a BodyPartExamined that covers the chest; another body part (ABDOMEN, SKULL, HAND) is refused."""


def decode_dicom(data: bytes, *, window: bool = True) -> np.ndarray:
    """A single-frame grayscale (or RGB) DICOM image as uint8, the way a reader would see it.

    Applies the modality LUT (RescaleSlope/Intercept), optionally the VOI LUT or window, scales
    the value range onto 0..255 and inverts MONOCHROME1 so that bone is bright as in the PNGs.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if _DEFLATED in data[:_FILE_META_BYTES]:
        raise UnsupportedImageTypeError(
            "DICOM in the Deflated Explicit VR Little Endian transfer syntax is not supported: it inflates "
            "in memory without a bound (6.3 MB to 6 GB in an outside review); send it uncompressed "
            "(`dcmconv +te`) or JPEG-compressed"
        )
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=sniff_format(data) != "dicom")
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError) as exc:
        raise ImageDecodeError(f"corrupt DICOM file: {exc}") from exc
    if "PixelData" not in ds:
        raise ImageDecodeError("DICOM file has no pixel data (not an image)")
    _name_the_encoding(ds)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows < 1 or columns < 1:
        raise ImageDecodeError(f"DICOM image has no size (Rows={rows}, Columns={columns})")
    if rows * columns * frames > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"image too large: {columns}×{rows}×{frames} pixels exceeds the limit of {MAX_IMAGE_PIXELS}"
        )
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 8) or 8)
    decoded = rows * columns * frames * samples * max(1, (bits + 7) // 8)
    if decoded > MAX_DECODED_BYTES:
        raise ImageDecodeError(
            f"image too large: {columns}×{rows}×{frames} pixels of {samples} × {bits} bits decode to "
            f"{decoded:,} bytes, over the limit of {MAX_DECODED_BYTES:,}"
        )
    if frames > 1:
        raise UnsupportedImageTypeError(f"multi-frame DICOM ({frames} frames) is not supported")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422"):
        raise UnsupportedImageTypeError(f"DICOM photometric interpretation {photometric} is not supported")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in _NOT_RADIOGRAPHS:
        raise UnsupportedImageTypeError(
            f"not a chest X-ray (DICOM Modality {modality}): the models read chest radiographs (CR, DX), and "
            "score any other image as confidently as one, wrongly"
        )
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if part and not any(word in part for word in _CHEST_PARTS):
        raise UnsupportedImageTypeError(
            f"not a chest X-ray (DICOM BodyPartExamined {part}): the models read the chest, and score any "
            "other body part as confidently, wrongly"
        )
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view in _LATERAL_VIEWS:
        raise UnsupportedImageTypeError(
            f"a lateral view (ViewPosition {view}): the models read frontal chest X-rays (PA or AP), and "
            "score a lateral as confidently as a frontal, wrongly; send the study's frontal image"
        )
    pixels = _dicom_pixels(ds, data)
    if pixels.ndim == 3:  # colour: pydicom converts YBR to RGB
        return scale_to_uint8(_luma(pixels))
    if pixels.ndim != 2:
        raise ImageDecodeError(f"unexpected DICOM pixel array shape {pixels.shape}")
    windowed = window and ("WindowCenter" in ds or "VOILUTSequence" in ds)

    def display(stored: np.ndarray) -> np.ndarray:
        values = apply_modality_lut(stored, ds)
        return apply_voi_lut(values, ds) if windowed else values

    # Per stored level, not per pixel, with the same bytes: a 3000×2500 12-bit X-ray with rescale and window
    # took 309-324 ms of CPU per pixel, 38 ms per level (without a window 103-108 ms, 34 ms).
    image = scale_levels_to_uint8(pixels, display)
    # MONOCHROME1: 0 is white. A MONOCHROME2 image is shown inverted too where its Presentation LUT Shape
    # says INVERSE (some CR units write it so); on MONOCHROME1, which DX requires to say INVERSE, the two
    # state one inversion, not two.
    inverse = str(ds.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE"
    if photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and inverse):
        image = 255 - image
    return image


def _name_the_encoding(ds: Any) -> None:
    """Give a dataset written without its file meta information (no transfer syntax: a bare dataset, as
    some tools write a `.dcm`) the one it was read with; such a file cannot hold compressed pixels."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


_IN_PROCESS_PLUGINS = ("pydicom", "pillow")
"""pydicom's decoders that read untrusted bytes in this process: its own (RLE) and Pillow's (JPEG baseline and
extended, JPEG 2000). A compression only GDCM decodes here (JPEG Lossless, JPEG-LS) is decoded in a child
process (cxrcore.decoder_process): GDCM can abort the process on a corrupt stream."""
IN_A_CHILD = "child process"


def pixel_decoder(syntax: Any, bits_stored: int = 8) -> str | None:
    """How pixel data of transfer syntax `syntax` (a pydicom UID, or None when the file names none) are
    decoded: None when uncompressed, else the pydicom plugin that decodes them here, or IN_A_CHILD.

    Raises UnsupportedImageTypeError for a compression no installed plugin decodes (HTJ2K, say)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGExtended12Bit

    if syntax is None or not syntax.is_compressed:
        return None
    if syntax == JPEGExtended12Bit and bits_stored > 8:
        # Lossy 12-bit JPEG (Process 4), as older PACS export CR and DX: Pillow reads 8-bit JPEG only, and
        # pydicom refuses GDCM for it, which decodes it (the DCMTK's pixels, python-gdcm issue 35).
        if not _gdcm_installed():
            raise UnsupportedImageTypeError(
                "DICOM 12-bit JPEG Extended needs python-gdcm, not installed here; send an uncompressed DICOM"
            )
        return IN_A_CHILD
    try:
        plugins = set(get_decoder(syntax).available_plugins)
    except NotImplementedError:  # a compression pydicom has no decoder class for at all
        plugins = set()
    if not plugins:
        raise UnsupportedImageTypeError(
            f"DICOM transfer syntax {syntax} ({syntax.name}) has no decoder installed here; send an "
            "uncompressed DICOM, or a PNG"
        )
    return next((plugin for plugin in _IN_PROCESS_PLUGINS if plugin in plugins), IN_A_CHILD)


def _gdcm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gdcm") is not None


def _dicom_pixels(ds: Any, data: bytes) -> np.ndarray:
    from cxrcore.decoder_process import decode_in_child

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    decoder = pixel_decoder(syntax, int(ds.get("BitsStored", 8) or 8))
    try:
        if decoder == IN_A_CHILD:
            pixels = decode_in_child(data)
        else:
            if decoder is not None:
                ds.pixel_array_options(decoding_plugin=decoder)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels = np.asarray(ds.pixel_array)
    except (ImageDecodeError, DecoderUnavailableError):
        raise
    except Exception as exc:  # the decoder is there (checked above): the pixel data are broken
        raise ImageDecodeError(f"corrupt DICOM pixel data: {type(exc).__name__}: {exc}") from exc
    expected = (int(ds.Rows), int(ds.Columns))
    if pixels.shape[:2] != expected:
        raise ImageDecodeError(
            f"corrupt DICOM pixel data: decoded {pixels.shape[:2]} pixels, the header says {expected}"
        )
    return pixels
