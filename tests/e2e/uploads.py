"""What the Serve tests upload: tiny checkpoints to serve, and image files in every supported format."""

from __future__ import annotations

import functools
import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxrcore.checkpoint import ModelCard, save_checkpoint
from cxrcore.inputcheck import InputReference
from cxrcore.models import create_model, get_build_args, get_input_spec


@dataclass(frozen=True)
class Checkpoints:
    unet: Path
    dual: Path  # tiny_dual_cnn whose card names `unet` as its segmenter
    cnn_lstm: Path


def write_checkpoint(directory: Path, name: str, seed: int, segmenter: Path | None = None) -> Path:
    """An untrained tiny model with a card, as training would save it (base size 64); a classifier with
    the input check's reference of 64 px phantoms (`phantom_reference`)."""
    torch.manual_seed(seed)
    model = create_model(name)
    classifier = get_input_spec(model).task == "classify"
    reference = phantom_reference() if classifier else None
    card = ModelCard(
        model=get_build_args(model),
        input_spec=get_input_spec(model).to_dict(),
        data={"size": 64},
        segmenter=str(segmenter) if segmenter else None,
        version=str(seed),
        input_reference=reference.summary if reference else {},
    )
    return save_checkpoint(directory, model, card, beside_weights=reference.arrays() if reference else None)


@functools.cache
def phantom_reference() -> InputReference:
    """The input check's reference of 64 px phantoms as training fits it: 80 to fit, 20 for the threshold."""
    from cxrcore.data.synthetic import render_phantom
    from cxrcore.inputcheck import fit
    from cxrcore.labels import CLASSES

    rng = np.random.default_rng(0)
    images = np.stack([render_phantom(CLASSES[i % 4], rng, size=64, mask_size=64)[0] for i in range(100)])
    return fit(images[:80], images[80:])


def write_checkpoints(root: Path) -> Checkpoints:
    unet = write_checkpoint(root / "unet", "tiny_unet", 0)
    return Checkpoints(
        unet=unet,
        dual=write_checkpoint(root / "dual", "tiny_dual_cnn", 1, segmenter=unet),
        cnn_lstm=write_checkpoint(root / "cnn_lstm", "tiny_cnn_lstm", 2),
    )


def write_registry(root: Path) -> Path:
    """A registry as a Tune run leaves it: the U-Net, two dual-channel versions (the first promoted to
    `production`, its card naming the registered U-Net), and a CNN-LSTM."""
    from cxrcore.registry import ModelRegistry

    registry = ModelRegistry(root / "registry")
    unet = registry.register(write_checkpoint(root / "unet", "tiny_unet", 0))
    segmenter = registry.local_checkpoint(unet.ref)
    report = root / "dual1-test"  # its test report: 20 images, 12 right, one class 8 of them
    report.mkdir()
    matrix = [[6, 1, 1, 0], [2, 2, 0, 0], [1, 1, 2, 0], [1, 1, 0, 2]]
    tested = {"accuracy": 0.6, "macro_f1": 0.55, "n": 20, "confusion_matrix": matrix}
    tested["evaluated"] = {"split": "test", "relation": "internal", "fingerprint": "f1n93rpr1n7"}
    (report / "metrics.json").write_text(json.dumps(tested))
    dual = write_checkpoint(root / "dual1", "tiny_dual_cnn", 1, segmenter)
    registry.register(dual, report=report, alias="production")
    registry.register(write_checkpoint(root / "dual2", "tiny_dual_cnn", 3, segmenter))
    registry.register(write_checkpoint(root / "cnn_lstm", "tiny_cnn_lstm", 2))
    return root / "registry"


def chest(seed: int, height: int = 300, width: int = 250, noise: float = 0.05) -> np.ndarray:
    """A non-constant float image in [0, 1]: a bright frame with two darker lung fields and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    lungs = np.exp(-(((xx - 0.3) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    lungs += np.exp(-(((xx - 0.7) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    image = 0.8 - 0.5 * lungs + rng.normal(0, noise, (height, width))
    return np.clip(image, 0.0, 1.0)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    """PNG of an array; `mode` converts first ("RGB", "RGBA"). uint16 arrays become 16-bit PNGs."""
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    slope: float = 1.0,
    intercept: float = 0.0,
    preamble: bool = True,
    rows: int | None = None,
    columns: int | None = None,
    patient: str | None = None,
) -> bytes:
    """A 16-bit (12 stored) DICOM digital X-ray; rows/columns may lie about the pixel data's size."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if patient is not None:
        ds.PatientID = patient
    ds.Rows, ds.Columns = rows or pixels.shape[0], columns or pixels.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype("<u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=preamble)
    return buffer.getvalue()


def rgb_dicom(rgb: np.ndarray) -> bytes:
    """An 8-bit colour (RGB, interleaved) secondary-capture DICOM of the H×W×3 uint8 `rgb`."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    ds = dcmread(DicomBytesIO(dicom_bytes(np.zeros(rgb.shape[:2], np.uint16))))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def xray_dicom(seed: int, photometric: str = "MONOCHROME1") -> bytes:
    """`chest(seed)` as a 12-bit DICOM with a rescale; MONOCHROME1 stores it inverted, as some DX do."""
    values = chest(seed)
    stored = (1.0 - values) if photometric == "MONOCHROME1" else values
    return dicom_bytes(np.round(stored * 4000).astype(np.uint16), photometric, slope=0.5, intercept=-1024)


ABORTS_GDCM = Path(__file__).parents[1] / "data/jpeg-lossless-gdcm-abort.dcm"
"""A corrupt JPEG Lossless DICOM on which GDCM aborts its process (tests/data/README.md)."""


def compressed_dicom(data: bytes, syntax: str) -> bytes:
    """The DICOM file `data` with its pixel data compressed to transfer syntax `syntax` (a UID: JPEG
    Lossless, JPEG-LS, ...) by GDCM, as a hospital's PACS exports X-rays; the other attributes kept."""
    import tempfile

    import gdcm

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder, "in.dcm"), Path(folder, "out.dcm")
        source.write_bytes(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        assert reader.Read(), "GDCM cannot read the DICOM to compress"
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(syntax)))
        change.SetInput(reader.GetImage())
        assert change.Change(), f"GDCM cannot compress to {syntax}"
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(target))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        return target.read_bytes()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width×height, with one tiny IDAT: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )
