"""Pure array transforms shared by ingest, training, evaluation and serving, so they never drift."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse decompression bombs: a chest X-ray is at most a few thousand pixels a side.
MAX_IMAGE_PIXELS = 8192 * 8192
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageDecodeError(ValueError):
    """Raised when bytes are not a usable image; the message says why in plain words."""


class DecoderUnavailableError(RuntimeError):
    """Raised when this machine cannot decode right now (the decoder's process could not be started: no
    process or file descriptor left): the file is not at fault, and the same file may decode later."""


MAX_DECODED_BYTES = 2 * MAX_IMAGE_PIXELS
"""Bytes a decoded image may take: the largest 16-bit grayscale image (134 MB). The pixel limit alone let a
0.5 MB 16-bit RGBA PNG of 8192² pixels take 1 GB to decode, and a 12.6 MB RLE DICOM of 3 × 32-bit samples
800 MB (an outside review: eight at once took the API's replica to 8 GB)."""
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""Samples per pixel of each PNG colour type (gray, RGB, palette, gray + alpha, RGBA)."""

MAX_JPEG_SCANS = 64
"""Scans a JPEG may hold (a progressive one has about 10): each scan makes the decoder go over the whole
image again, so an 8192² progressive JPEG of 1.25 MB repeating its last scan 10,000 times held a decode
thread for many minutes, and a few of them every upload behind them (an outside review)."""


def decode_gray(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG/... bytes into a uint8 H×W grayscale array (8/16-bit, gray/RGB/RGBA, palette),
    upright as a viewer shows it: an EXIF orientation (phones, some scanners' JPEGs) is applied."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 26:
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        decoded = width * height * _PNG_CHANNELS.get(data[25], 4) * max(1, data[24] // 8)
        if decoded > MAX_DECODED_BYTES:
            raise ImageDecodeError(
                f"image too large: {width}×{height} pixels of {data[24]}-bit colour type {data[25]} decode "
                f"to {decoded:,} bytes, over the limit of {MAX_DECODED_BYTES:,}"
            )
    # In JPEG data a 0xFF byte is always followed by 0x00 or a restart marker: 0xFFDA is a start of scan.
    if data[:2] == b"\xff\xd8" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        raise ImageDecodeError(
            f"JPEG of {scans} scans (at most {MAX_JPEG_SCANS}; a progressive JPEG has about 10): each scan "
            "decodes the whole image again"
        )
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                _check_one_page(img)
                img.load()
                ImageOps.exif_transpose(img, in_place=True)
                gray = to_gray_uint8(img)
                if _min_is_white(img):
                    gray = 255 - gray
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            unreadable_jpeg(data) or _unreadable_tiff(data) or "not an image (unrecognised format)"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(unreadable_jpeg(data) or f"corrupt or truncated image: {exc}") from exc
    if _is_16_bit_colour_png(data) and int(gray.max()) - int(gray.min()) < COLOUR_16_MIN_LEVELS:
        raise ImageDecodeError(
            f"16-bit colour PNG whose values lie in its low bits: Pillow reads the top 8 bits of "
            f"each channel, which hold {int(gray.max()) - int(gray.min()) + 1} levels here; save it as "
            "16-bit grayscale (mode I;16), which is read whole"
        )
    return gray


def _check_one_page(img: Image.Image) -> None:
    """Refuse a TIFF of several pages (a label sheet, then the X-ray, say): its first page was taken, which
    may not be the X-ray. Pages marked as reduced-resolution copies of the first (NewSubfileType bit 0, a
    pyramid's) are not other pictures."""
    pages = getattr(img, "n_frames", 1)
    if img.format != "TIFF" or pages <= 1:
        return
    try:
        for page in range(1, pages):
            img.seek(page)
            if not int(getattr(img, "tag_v2", {}).get(254, 0)) & 1:  # a TiffImageFile's tags
                raise ImageDecodeError(
                    f"TIFF of {pages} pages: which one is the X-ray cannot be told (the first was read "
                    "before); export the X-ray alone, as a PNG or a one-page TIFF"
                )
    finally:
        img.seek(0)


def _min_is_white(img: Image.Image) -> bool:
    """A TIFF whose 0 is white (PhotometricInterpretation 0, as some CR/DR exports write): Pillow inverts
    it to a viewer's picture in 1- and 8-bit modes, not in 16-bit ones, which were stored as negatives."""
    tags = getattr(img, "tag_v2", None)
    return img.format == "TIFF" and tags is not None and tags.get(262) == 0 and img.mode not in ("1", "L")


def _unreadable_tiff(data: bytes) -> str | None:
    """Why TIFF bytes did not open: a variant Pillow does not read (a big-endian 16-bit, say)."""
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    return "a TIFF variant Pillow cannot read (a big-endian 16-bit one whose 0 is white, say): export a PNG"


_JPEG_FRAMES = {
    0xC3: "lossless JPEG", 0xC7: "lossless JPEG", 0xCB: "lossless JPEG", 0xCF: "lossless JPEG",
    0xF7: "JPEG-LS",
}  # fmt: skip
"""Start-of-frame markers of the JPEG processes Pillow does not read (it reads 8-bit baseline, extended and
progressive), by the name a PACS export gives them."""


def unreadable_jpeg(data: bytes) -> str | None:
    """Why a JPEG stream is one Pillow cannot read, from its frame header: lossless, JPEG-LS, or more than
    8 bits a sample (12-bit extended, as older CR and DX units write). None for any other bytes. A DICOM
    wrapping such a stream is read (GDCM); the stream on its own is not."""
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 < len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            precision = data[at + 4]
            kind = _JPEG_FRAMES.get(marker) or (f"{precision}-bit JPEG" if precision > 8 else None)
            if kind is None:
                return None
            return (
                f"{kind} is not supported as a file of its own (Pillow reads 8-bit JPEG): send it as the "
                "DICOM it came in, or export a 16-bit PNG"
            )
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


COLOUR_16_MIN_LEVELS = 64
"""Pillow reads a 16-bit RGB or gray+alpha PNG as 8 bits per channel, the high bytes: fine for values
spread over the 16 bits, a few levels for 12-bit detector data kept in the low bits (0-15). Such an image
spanning fewer levels than this is refused rather than trained on as a near-black picture."""


def _is_16_bit_colour_png(data: bytes) -> bool:
    """A PNG with 16 bits per sample and colour or alpha (IHDR colour type 2, 4 or 6)."""
    return (
        data[:8] == b"\x89PNG\r\n\x1a\n"
        and data[12:16] == b"IHDR"
        and data[24] == 16
        and data[25] in (2, 4, 6)
    )


def to_gray_uint8(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to uint8 grayscale, scaling 16-bit and float data by range."""
    if img.mode == "I;16":
        return scale_to_uint8(_uint16_pixels(img))
    if img.mode in ("I;16B", "I;16L", "I", "F"):
        return scale_to_uint8(np.asarray(img))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black: transparent padding should read as "no tissue", not as white.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def _uint16_pixels(img: Image.Image) -> np.ndarray:
    """A 16-bit ("I;16", little-endian) image's pixels as a uint16 array, without copying them where Pillow
    holds the image in one block of memory (most X-rays: up to its 16 MiB block size, 4096×2048 pixels).

    `np.asarray` copies the pixels through Pillow's raw encoder: 14-35 ms for a 3000×2500 PNG from a
    detector, a sixth of its decode. Pillow's Arrow export hands over its memory, kept alive by the
    array; an image spread over several blocks cannot be exported and is copied as before, and so is every
    image where Pillow is older than 11.2, which has no Arrow export."""
    import pyarrow as pa

    try:
        flat = pa.array(img)
    except (ValueError, TypeError):  # "Image rows are not contiguous in memory"; no export
        return np.asarray(img)
    if flat.type.bit_width != 16 or len(flat) != img.width * img.height:
        return np.asarray(img)
    data = flat.buffers()[1]
    return np.frombuffer(data, dtype="<u2", count=len(flat), offset=flat.offset * 2).reshape(
        img.height, img.width
    )


LEVEL_TABLE_MAX = 1 << 16
"""The most stored levels (max - min + 1) an integer image may span for `scale_levels_to_uint8` to map it
through a table: every 8-16-bit X-ray, and any image whose values are few."""


def scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Linearly map the array's value range onto 0..255 (a constant array maps to 0).

    Integer images go through a table of their levels (`scale_levels_to_uint8`): the same bytes."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "iu":
        return scale_levels_to_uint8(arr)
    return _scale_values_to_uint8(np.asarray(arr, dtype=np.float64))


def _scale_values_to_uint8(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def scale_levels_to_uint8(
    arr: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None
) -> np.ndarray:
    """`scale_to_uint8(transform(arr))` for an integer image and an elementwise `transform` (a DICOM's
    modality and VOI LUTs, say), computed once per stored level instead of once per pixel.

    A detector's 12-bit X-ray of 3000×2500 pixels has at most 4,096 levels against 7.5 million pixels:
    the float64 arithmetic runs over the levels, then one table lookup per pixel gives each its byte. The
    bytes are those of the per-pixel computation: each level goes through the same float64 operations,
    and the value range is that of the levels present in the image (its ends when the mapped levels are
    monotonic, as rescale and window are; counted otherwise, as a lookup table may not be). Images with
    more than LEVEL_TABLE_MAX levels, and float images, are computed per pixel.
    """
    if arr.dtype.kind in "iu" and arr.size:
        if not arr.dtype.isnative:  # big-endian files ("I;16B" TIFFs, Explicit VR Big Endian DICOM)
            arr = arr.astype(arr.dtype.newbyteorder("="))
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo < LEVEL_TABLE_MAX:
            return _scale_through_table(arr, lo, hi, transform)
    return _scale_values_to_uint8(np.asarray(transform(arr) if transform else arr, dtype=np.float64))


def _scale_through_table(
    arr: np.ndarray, lo: int, hi: int, transform: Callable[[np.ndarray], np.ndarray] | None
) -> np.ndarray:
    """scale_levels_to_uint8 for an integer image whose levels run from `lo` to `hi`."""
    levels = np.arange(lo, hi + 1, dtype=arr.dtype)
    values = np.asarray(transform(levels) if transform else levels, dtype=np.float64)
    # Each pixel's offset from the lowest level, in the unsigned type of the same width: the subtraction
    # wraps for signed images, and the offset (at most LEVEL_TABLE_MAX - 1) comes out exact.
    unsigned = np.dtype(f"u{arr.itemsize}")
    index = arr.view(unsigned) - unsigned.type(lo % (1 << (8 * arr.itemsize)))
    steps = np.diff(values)
    if bool((steps >= 0).all() or (steps <= 0).all()):
        present = values[[0, -1]]
    else:
        present = values[np.bincount(index.ravel(), minlength=len(levels)) > 0]
    vlo, vhi = float(present.min()), float(present.max())
    if vhi <= vlo:
        return np.zeros(arr.shape, dtype=np.uint8)
    # Levels absent from the image may map outside the range: clipped, never looked up.
    table = np.clip(np.round((values - vlo) * (255.0 / (vhi - vlo))), 0, 255).astype(np.uint8)
    return table[index]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 grayscale image to size×size with antialiased bilinear filtering."""
    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def lung_pixels(mask: np.ndarray) -> np.ndarray:
    """Where a decoded lung mask marks lung: above mid-grey (> 127), as in 0/255 masks and their JPEG
    copies; in a mask whose every value is below 128 (0/1 masks, 1/2 labelling each lung, lungs in pure
    red), every non-zero pixel."""
    threshold = 127 if mask.size and int(mask.max()) > 127 else 0
    return np.asarray(mask > threshold)


def binary_mask(mask: np.ndarray) -> np.ndarray:
    """A decoded lung mask as {0, 255} uint8 (`lung_pixels`): what ingest stores and hashes of it."""
    # a bool array's bytes are 0 and 1: one uint8 multiply, no int64 array between (6% of an ingest's decode)
    return lung_pixels(mask).view(np.uint8) * np.uint8(255)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a lung mask to size×size and binarise it to {0, 255} (`lung_pixels`)."""
    return resize_binary_mask(binary_mask(mask), size)


def resize_binary_mask(binary: np.ndarray, size: int) -> np.ndarray:
    """Resize a {0, 255} mask (`binary_mask`) to size×size, nearest neighbour: it stays {0, 255}."""
    if binary.shape != (size, size):
        binary = np.asarray(Image.fromarray(binary).resize((size, size), Image.Resampling.NEAREST))
    return binary


def perceptual_hash(image: np.ndarray, hash_size: int = 16) -> str:
    """Difference hash (dHash, hash_size² bits) as hex: robust to resizing, re-encoding and contrast."""
    small = np.asarray(
        Image.fromarray(image).resize((hash_size + 1, hash_size), Image.Resampling.BOX), dtype=np.int16
    )
    return np.packbits(small[:, 1:] > small[:, :-1]).tobytes().hex()


def hash_words(hex_hashes: list[str]) -> np.ndarray:
    """Hex perceptual hashes → an (N, bits/64) uint64 array for fast Hamming distances."""
    raw = b"".join(bytes.fromhex(h) for h in hex_hashes)
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(len(hex_hashes), -1)
