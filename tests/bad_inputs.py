"""What clients send that they should not: a corpus of bad (and odd but valid) uploads, made in code.

Each `Case` is an httpx request to POST /v1/predict and the answer it must get: a 4xx JSON error with its
code, or a 200. `LocalClassifier` stands in for the Classifier deployment's handle so that the real
FastAPI app runs in-process (`api_client`), answering from a real tiny model.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from cxrcore.data.transforms import scale_to_uint8
from tests.e2e.uploads import ABORTS_GDCM, chest, dicom_bytes, jpeg_bytes, png_bytes, png_header_only
from tests.torch_threads import one_torch_thread

MAX_UPLOAD_BYTES = 1024 * 1024  # the in-process app's limit, small so that 413s cost little
GRAY = scale_to_uint8(chest(0))
GOOD_PNG = png_bytes(GRAY)


@dataclass(frozen=True)
class Case:
    """One request and the answer it must get (`error` is the JSON error code; None for a 200)."""

    name: str
    request: dict[str, Any] = field(repr=False)
    status: int
    error: str | None = None


def raw(data: bytes, content_type: str | None = "image/png", **params: str) -> dict[str, Any]:
    headers = {"content-type": content_type} if content_type is not None else {}
    return {"content": data, "headers": headers, "params": params}


def multipart(data: bytes, content_type: str = "image/png", field: str = "file") -> dict[str, Any]:
    return {"files": {field: ("upload", data, content_type)}}


def pil_bytes(array: np.ndarray, fmt: str, mode: str | None = None, **options: Any) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg_scan_bomb(repeats: int = 60) -> bytes:
    """A small progressive JPEG whose last scan is repeated: each repeat decodes the whole image again."""
    data = pil_bytes(GRAY, "JPEG", progressive=True)
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * repeats + data[end:]


def png_rgba16_header(side: int) -> bytes:
    """A PNG header claiming side² pixels of 16-bit RGBA (8 bytes a pixel), and nothing after it."""
    header = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IEND", b"")


def dicom_wide_samples(side: int) -> bytes:
    """A DICOM header claiming side² pixels of 3 × 32-bit samples (12 bytes a pixel) over small pixel data."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(dicom_bytes((chest(3) * 4095).astype(np.uint16))))
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.BitsAllocated, ds.PhotometricInterpretation = 3, 32, "RGB"
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def dicom_deflated() -> bytes:
    """A DICOM X-ray in the Deflated Explicit VR Little Endian transfer syntax."""
    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dcmread(io.BytesIO(dicom_bytes((chest(3) * 4095).astype(np.uint16))))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_zeros(side: int) -> bytes:
    """A complete, valid side×side black PNG: 81 megapixels compress to ~80 KB (a real bomb)."""
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def png_text_bomb(megabytes: int = 64) -> bytes:
    """A small valid PNG with a compressed text chunk that inflates to `megabytes` MB."""
    png = png_bytes(GRAY)
    text = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(bytes(megabytes * 1024**2), 9))
    return png[:33] + text + png[33:]  # after the signature and IHDR


def dicom_compressed_without_decoder() -> bytes:
    """A DICOM whose pixel data are High-Throughput JPEG 2000, which no installed pydicom plugin decodes."""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import HTJ2KLossless

    ds = dcmread(DicomBytesIO(dicom_bytes(np.zeros((64, 64), np.uint16))))
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(60) + b"\xff\xd9"])
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_without_pixels() -> bytes:
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    ds = dcmread(DicomBytesIO(dicom_bytes(np.zeros((64, 64), np.uint16))))
    del ds.PixelData
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_multiframe() -> bytes:
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    ds = dcmread(DicomBytesIO(dicom_bytes(np.zeros((2 * 64, 64), np.uint16), rows=64, columns=64)))
    ds.NumberOfFrames = 2
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def chunks(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    """A body httpx sends without Content-Length (chunked): the limit must hold while reading it."""
    return [data[start : start + size] for start in range(0, len(data), size)]


def _corpus() -> list[Case]:
    noise = np.random.default_rng(0).bytes(4096)
    assert noise[:2] not in (b"BM", b"\x1f\x8b")  # the seed gives bytes no format claims
    boundary = "multipart/form-data; boundary=cxr"
    unterminated = (
        b'--cxr\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + GOOD_PNG[:100]
    )
    two_files = {"files": [("file", ("a.png", GOOD_PNG, "image/png")), ("file", ("b.png", GOOD_PNG))]}
    too_large = GOOD_PNG + bytes(MAX_UPLOAD_BYTES)
    rgb = np.stack([GRAY, np.flipud(GRAY), GRAY // 2], axis=-1)
    bad, unsupported = "undecodable_image", "unsupported_media_type"
    return [
        # Nothing, broken or not an image at all.
        Case("empty-body", raw(b""), 400, bad),
        Case("empty-body-no-content-type", raw(b"", None), 400, bad),
        Case("empty-multipart-file", multipart(b""), 400, bad),
        Case("truncated-png", raw(GOOD_PNG[:300]), 400, bad),
        Case("truncated-jpeg", raw(jpeg_bytes(GRAY)[:2000], "image/jpeg"), 400, bad),
        Case("random-bytes", raw(noise, "application/octet-stream"), 400, bad),
        Case("random-bytes-as-png", raw(noise, "image/png"), 400, bad),
        Case("random-bytes-as-dicom", raw(noise, "application/dicom"), 400, bad),
        Case("png-signature-only", raw(GOOD_PNG[:8]), 400, bad),
        # Decompression bombs: refused from the header, before the pixels are inflated.
        Case("png-bomb-81-megapixels", raw(png_zeros(9000)), 400, bad),
        Case("png-header-60000x60000", raw(png_header_only(60_000, 60_000)), 400, bad),
        Case("png-text-chunk-bomb", raw(png_text_bomb()), 400, bad),
        Case("dicom-header-60000x60000", raw(dicom_bytes(np.zeros((4, 4), np.uint16), rows=60_000, columns=60_000), None), 400, bad),  # noqa: E501
        # Wrong content types: the bytes decide when they are an image, else the type is refused.
        Case("text-plain", raw(b"hello", "text/plain"), 415, unsupported),
        Case("json-body", raw(b'{"image": "aGVsbG8="}', "application/json"), 415, unsupported),
        Case("form-urlencoded", raw(b"file=hello", "application/x-www-form-urlencoded"), 415, unsupported),
        Case("png-declared-gif", raw(GOOD_PNG, "image/gif"), 200),
        Case("png-without-content-type", raw(GOOD_PNG, None), 200),
        # Multipart that is malformed or lacks the file.
        Case("multipart-garbage", raw(noise, boundary), 400, "invalid_multipart"),
        Case("multipart-without-boundary", raw(GOOD_PNG, "multipart/form-data"), 400, "invalid_multipart"),
        Case("multipart-unterminated", raw(unterminated, boundary), 400, "invalid_multipart"),
        Case("multipart-two-files", two_files, 400, "invalid_multipart"),
        Case("multipart-without-file-field", multipart(GOOD_PNG, field="image"), 400, "missing_file"),
        Case("multipart-file-as-text-field", {"data": {"file": "not a file"}, "files": {"x": ("x", b"x")}}, 400, bad),  # noqa: E501
        # DICOM that is not an image or cannot be decoded here.
        Case("dicom-without-pixel-data", raw(dicom_without_pixels(), "application/dicom"), 400, bad),
        Case("dicom-short-pixel-data", raw(dicom_bytes(np.zeros((4, 4), np.uint16), rows=64, columns=64), None), 400, bad),  # noqa: E501
        Case("dicom-htj2k-without-decoder", raw(dicom_compressed_without_decoder(), "application/dicom"), 415, unsupported),  # noqa: E501
        Case("dicom-jpeg-lossless-aborting-the-decoder", raw(ABORTS_GDCM.read_bytes(), "application/dicom"), 400, bad),  # noqa: E501
        Case("dicom-multiframe", raw(dicom_multiframe(), "application/dicom"), 415, unsupported),
        # Odd but valid PNG/JPEG: answered.
        Case("png-16-bit", raw(png_bytes((chest(1) * 65535).astype(np.uint16))), 200),
        Case("png-rgba", raw(png_bytes(GRAY, "RGBA")), 200),
        Case("png-gray-alpha", raw(png_bytes(GRAY, "LA")), 200),
        Case("png-palette", raw(pil_bytes(rgb, "PNG", "P")), 200),
        Case("png-1-bit", raw(png_bytes(GRAY, "1")), 200),
        Case("png-interlaced-rgb", raw(pil_bytes(rgb, "PNG", interlace=1)), 200),
        Case("png-64x2000", raw(png_bytes(scale_to_uint8(chest(2, 2000, 64)))), 200),
        Case("jpeg-cmyk", raw(pil_bytes(rgb, "JPEG", "CMYK")), 200),
        Case("jpeg-progressive", raw(pil_bytes(GRAY, "JPEG", progressive=True), "image/jpeg"), 200),
        Case("png-1x1", raw(png_bytes(GRAY[:1, :1])), 400, "image_too_small"),
        # Found by an outside review: a scan bomb held a decode thread for minutes, a deflated DICOM grew
        # to gigabytes in memory, and a blank image (a DICOM rescale of NaN) got a prediction.
        Case("jpeg-scan-bomb", raw(jpeg_scan_bomb(), "image/jpeg"), 400, bad),
        Case("dicom-deflated", raw(dicom_deflated(), "application/dicom"), 415, unsupported),
        Case("png-16-bit-rgba-8192", raw(png_rgba16_header(8192)), 400, bad),  # 0.5 GB decoded
        Case("dicom-rgb-32-bit-8192", raw(dicom_wide_samples(8192), "application/dicom"), 400, bad),
        Case("png-blank", raw(png_bytes(np.full((300, 300), 128, np.uint8))), 400, "blank_image"),
        Case("dicom-rescale-nan", raw(dicom_bytes((chest(3) * 4095).astype(np.uint16), slope=float("nan")), "application/dicom"), 400, "blank_image"),  # noqa: E501
        Case("png-63x300", raw(png_bytes(GRAY[:, :63])), 400, "image_too_small"),
        # Other image formats: refused by name.
        Case("gif", multipart(pil_bytes(GRAY, "GIF"), "image/gif"), 415, unsupported),
        Case("webp", raw(pil_bytes(GRAY, "WEBP"), "image/webp"), 415, unsupported),
        Case("bmp", raw(pil_bytes(GRAY, "BMP"), "image/bmp"), 415, unsupported),
        Case("tiff", raw(pil_bytes(GRAY, "TIFF"), "image/tiff"), 415, unsupported),
        Case("tiff-as-png", raw(pil_bytes(GRAY, "TIFF"), "image/png"), 415, unsupported),
        Case("pdf", raw(b"%PDF-1.7\n" + noise, "application/pdf"), 415, unsupported),
        # Too large, however it is sent.
        Case("too-large", raw(too_large), 413, "payload_too_large"),
        Case("too-large-multipart", multipart(too_large), 413, "payload_too_large"),
        Case("too-large-chunked", {"content": chunks(too_large), "headers": {"content-type": "image/png"}}, 413, "payload_too_large"),  # noqa: E501
        # Bad query.
        Case("explain-not-a-boolean", raw(GOOD_PNG, explain="maybe"), 400, "invalid_request"),
    ]  # fmt: skip


CORPUS = _corpus()


class _Remote:
    """`handle.method` of a DeploymentHandle: `.remote(...)` gives an awaitable answer."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = method

    async def remote(self, *args: Any) -> Any:
        return self._method(*args)


class LocalClassifier:
    """The Classifier deployment's handle, in-process: the answers of `Classifier.predict/explain/info`
    from a real Predictor of a tiny checkpoint (Serve's batching aside, which needs a replica)."""

    def __init__(self, checkpoint: Path) -> None:
        from cxrcore.inference import Predictor
        from serve.deployments import resolve_model

        self.resolved = resolve_model(None, str(checkpoint))
        self.predictor = Predictor.from_checkpoint(checkpoint)
        self.images: list[np.ndarray] = []  # every image the ingress asked about
        self.predict = _Remote(self._predict)
        self.explain = _Remote(self._explain)
        self.info = _Remote(self._info)

    def _probabilities(self, row: np.ndarray) -> dict[str, float]:
        return dict(zip(self.resolved.card.classes, map(float, row), strict=True))

    def _predict(self, image: np.ndarray, resized_to: int | None = None) -> dict[str, Any]:
        from serve.deployments import classify

        self.images.append(image)
        with one_torch_thread():
            (answer,) = classify(self.predictor, self.resolved.info.model_dump(), [(image, resized_to)])
        return answer

    def _explain(self, image: np.ndarray) -> dict[str, Any]:
        from cxrcore.explain import explain

        self.images.append(image)
        with one_torch_thread():
            result = explain(self.predictor, image)
            checks = self.predictor.input_checks([image])
        return {
            "probabilities": self._probabilities(result.probabilities),
            "model": self.resolved.info.model_dump(),
            "input_check": checks[0] if checks else None,
            "target": self.resolved.card.classes[result.target],
            "heatmap": result.heatmap,
            "heatmap_empty": result.empty,
            "mask": result.mask,
        }

    def _info(self) -> dict[str, Any]:
        return {
            "model": self.resolved.info.model_dump(),
            "card": self.resolved.card.to_dict(),
            "max_batch_size": 1,
            "batch_wait_timeout_s": 0.0,
            "swap_error": None,
        }


def api_client(classifier: Any, **limits: Any) -> httpx.Client:
    """An httpx client of the real FastAPI app (`serve.ingress.create_api`) around `classifier`."""
    from fastapi.testclient import TestClient

    from serve.ingress import ApiLimits, create_api

    api = create_api(classifier, ApiLimits(**{"max_upload_bytes": MAX_UPLOAD_BYTES, **limits}))
    return TestClient(api, raise_server_exceptions=False)
