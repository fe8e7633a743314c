"""Compressed DICOM as hospitals export it: JPEG Lossless and JPEG-LS decode to the uncompressed pixels,
in a child process that a decoder crash or hang takes down alone."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from cxrcore import decoder_process
from cxrcore.cli import main
from cxrcore.data.ingest import decode_pair_batch
from cxrcore.data.layout import decode_image
from cxrcore.data.transforms import DecoderUnavailableError, ImageDecodeError
from cxrcore.decode import IN_A_CHILD, UnsupportedImageTypeError, decode_upload, pixel_decoder
from cxrcore.decoder_process import DecoderProcess
from tests.e2e.uploads import ABORTS_GDCM, compressed_dicom, xray_dicom


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEGLossless, JPEGLSLossless], ids=lambda s: s.keyword)
def test_lossless_compressed_dicom_gives_the_uncompressed_files_pixels(syntax: str, photometric: str) -> None:
    """As served and as ingested: the rescale, MONOCHROME1's inversion and the scaling all apply alike."""
    plain = xray_dicom(11, photometric)
    compressed = compressed_dicom(plain, syntax)
    assert len(compressed) < len(plain)  # it is compressed
    expected = decode_upload(plain, "application/dicom")
    np.testing.assert_array_equal(decode_upload(compressed, "application/dicom"), expected)
    np.testing.assert_array_equal(decode_image(compressed, "x.dcm"), expected)


def as_radiograph(data: bytes) -> bytes:
    """pydicom's test file `data` tagged a chest radiograph (Modality DX, BodyPartExamined CHEST), its pixel
    data as it was: the codecs are tested on an MR's or NM's bytes, which cxr refuses as not a chest X-ray."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    ds = dcmread(DicomBytesIO(data))
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_jpeg_ls_from_another_encoder_matches_its_uncompressed_original() -> None:
    """pydicom's own test files: an MR slice stored uncompressed and as JPEG-LS by another toolkit."""
    plain = as_radiograph(Path(get_testdata_file("MR_small.dcm")).read_bytes())  # type: ignore[arg-type]
    jpeg_ls = as_radiograph(Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")).read_bytes())  # type: ignore[arg-type]
    np.testing.assert_array_equal(decode_upload(jpeg_ls), decode_upload(plain))


def test_lossy_12_bit_jpeg_dicom_decodes_close_to_its_original() -> None:
    """JPEG Extended (Process 4) at 12 bits, as older PACS export CR and DX lossy: Pillow reads 8-bit JPEG
    only and pydicom refuses GDCM for it, so such files were refused as corrupt."""
    plain = xray_dicom(12, "MONOCHROME2")
    lossy = compressed_dicom(plain, JPEGExtended12Bit)
    assert b"1.2.840.10008.1.2.4.51" in lossy[:1024] and len(lossy) < len(plain)
    expected = decode_upload(plain, "application/dicom").astype(int)
    for image in (decode_upload(lossy, "application/dicom"), decode_image(lossy, "x.dcm")):
        assert image.shape == expected.shape and np.abs(image - expected).mean() < 1.0  # of 255 levels


def test_a_dicom_written_without_its_file_meta_reads_as_the_same_file_with_it() -> None:
    """A bare dataset (no preamble, no file meta, so no transfer syntax), as some tools write a `.dcm`."""
    from pydicom import dcmread
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import dcmwrite

    plain = xray_dicom(13, "MONOCHROME1")
    ds = dcmread(DicomBytesIO(plain))
    ds.file_meta, ds.preamble = FileMetaDataset(), None
    for implicit in (
        True,
        False,
    ):  # big endian too is read so, but pydicom cannot write its pixels to test it
        bare = DicomBytesIO()
        dcmwrite(bare, ds, implicit_vr=implicit, little_endian=True, force_encoding=True)  # no file meta
        assert b"DICM" not in bare.getvalue()[:200]
        np.testing.assert_array_equal(decode_image(bare.getvalue(), "x.dcm"), decode_upload(plain))


def test_only_what_pydicom_and_pillow_cannot_decode_goes_to_a_child_process() -> None:
    assert pixel_decoder(None) is None and pixel_decoder(ExplicitVRLittleEndian) is None
    assert pixel_decoder(RLELossless) == "pydicom"
    assert pixel_decoder(JPEGBaseline8Bit) == pixel_decoder(JPEG2000) == "pillow"  # as before GDCM came
    for syntax in (JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless):
        assert pixel_decoder(syntax) == IN_A_CHILD
    assert pixel_decoder(JPEGExtended12Bit) == "pillow" and pixel_decoder(JPEGExtended12Bit, 12) == IN_A_CHILD
    with pytest.raises(UnsupportedImageTypeError, match="no decoder installed here"):
        pixel_decoder(HTJ2KLossless)


def test_a_decoder_crash_refuses_that_file_and_the_next_file_decodes() -> None:
    """GDCM aborts on the test file: in a child process that is one corrupt file, not a lost replica."""
    good = compressed_dicom(xray_dicom(12), JPEGLosslessSV1)
    decoder = DecoderProcess()
    try:
        first = decoder.decode(good)
        pid = decoder.pid
        with pytest.raises(ImageDecodeError, match=r"the decoder crashed on them \(signal SIGABRT\)"):
            decoder.decode(ABORTS_GDCM.read_bytes())
        assert decoder.pid is None  # the crashed child is gone
        np.testing.assert_array_equal(decoder.decode(good), first)
        assert decoder.pid not in (None, pid)
    finally:
        decoder.close()
    with pytest.raises(ImageDecodeError, match="corrupt DICOM pixel data"):  # and through decode_upload
        decode_upload(ABORTS_GDCM.read_bytes())


def _aborting_12_bit_upload_with_a_patient() -> bytes:
    """The file GDCM aborts on, as 12-bit JPEG Extended (which the child decodes through a file GDCM opens),
    with a patient's name and ID in its header."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    ds = dcmread(DicomBytesIO(ABORTS_GDCM.read_bytes()))
    ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit
    ds.PatientName, ds.PatientID = "DOE^JANE", "MRN-0042"
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("memory_files", [True, False], ids=["memory-file", "scratch-folder"])
def test_a_crash_leaves_no_copy_of_the_upload_on_disk(
    memory_files: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An aborted decode had left the whole upload, the patient's name in its header, in /tmp: one file per
    crash. On Linux the child's file is in memory; elsewhere in a private folder the parent removes."""
    from cxrcore import decoder_process

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the child's temporary files, and the parent's folder
    monkeypatch.setattr(decoder_process.tempfile, "tempdir", None)  # read TMPDIR again
    if not memory_files:
        monkeypatch.setattr(decoder_process, "_memory_files", lambda: False)
        monkeypatch.setenv("CXR_DECODER_TEST_NO_MEMORY_FILES", "1")  # and in the child
    import resource

    # Cores allowed, as Docker's default unit allows them: the child's memory holds the upload (a verifier,
    # session 52, found the patient's name in a 50 MB `core` in the working folder)
    monkeypatch.chdir(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    decoder = DecoderProcess()
    try:
        with pytest.raises(ImageDecodeError, match=r"the decoder crashed on them \(signal SIGABRT\)"):
            decoder.decode(_aborting_12_bit_upload_with_a_patient())
        assert list(tmp_path.iterdir()) == []
        lossy = compressed_dicom(xray_dicom(12, "MONOCHROME2"), JPEGExtended12Bit)
        assert decoder.decode(lossy).shape == (300, 250)  # through the same kind of file
        if not memory_files:
            (scratch,) = tmp_path.iterdir()
            assert scratch.name.startswith("cxr-dicom-") and list(scratch.iterdir()) == []
            assert scratch.stat().st_mode & 0o777 == 0o700
    finally:
        decoder.close()
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    assert list(tmp_path.iterdir()) == []


def test_a_decode_past_its_time_is_refused_and_its_child_killed() -> None:
    good = compressed_dicom(xray_dicom(13), JPEGLSLossless)
    decoder = DecoderProcess(timeout_s=0.01)  # a child's start alone takes longer
    try:
        with pytest.raises(ImageDecodeError, match=r"did not decode within 0\.01 s"):
            decoder.decode(good)
        assert decoder.pid is None
        decoder.timeout_s = 60
        assert decoder.decode(good).shape == (300, 250)
    finally:
        decoder.close()
    assert decoder.pid is None


def test_a_decoder_that_cannot_start_is_the_machines_fault_not_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Out of processes (fork refused, EAGAIN): not "corrupt DICOM", which would have the server answer
    400 and ingest reject a good file, but DecoderUnavailableError, through decode_upload and ingest alike;
    once the machine has room again the same file decodes."""
    import subprocess

    good = compressed_dicom(xray_dicom(14), JPEGLosslessSV1)
    real_popen = subprocess.Popen

    def refused(*args: object, **kwargs: object) -> None:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(decoder_process, "_shared", None)  # this test's own child, not an earlier test's
    monkeypatch.setattr(subprocess, "Popen", refused)
    with pytest.raises(
        DecoderUnavailableError, match="could not be started: Resource temporarily unavailable"
    ):
        decode_upload(good, "application/dicom")
    path = tmp_path / "COVID/images/a.dcm"
    path.parent.mkdir(parents=True)
    path.write_bytes(good)
    batch = {"image_path": np.array([str(path)]), "mask_path": np.array([""])}
    with pytest.raises(DecoderUnavailableError):  # the ingest fails, naming why, rather than reject it
        decode_pair_batch(batch, size=64, min_side=64)
    # `cxr data check` says so in one line and exits 1, without calling the file unreadable.
    assert main(["data", "check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cxr: error: this machine cannot decode compressed DICOM right now (the DICOM")
    assert "Resource temporarily unavailable" in err and len(err.splitlines()) == 1
    monkeypatch.setattr(subprocess, "Popen", real_popen)
    try:
        assert decode_upload(good, "application/dicom").shape == (300, 250)
    finally:
        if decoder_process._shared is not None:
            decoder_process._shared.close()


@pytest.mark.parametrize(
    ("dicom", "kind"),
    [
        (lambda: compressed_dicom(xray_dicom(12, "MONOCHROME2"), JPEGLosslessSV1), "lossless JPEG"),
        (lambda: compressed_dicom(xray_dicom(12, "MONOCHROME2"), JPEGLSLossless), "JPEG-LS"),
        (lambda: as_radiograph(Path(get_testdata_file("JPGExtended.dcm")).read_bytes()), "12-bit JPEG"),  # type: ignore[arg-type]
    ],
    ids=["lossless", "jpeg-ls", "extended-12-bit"],
)
def test_a_jpeg_stream_pillow_cannot_read_is_named_as_unsupported(
    dicom: Callable[[], bytes], kind: str
) -> None:
    """The JPEG stream of a compressed DICOM, saved as a file of its own: an image, not "unrecognised"
    bytes; the upload is refused as a type (415), and ingest names what it is and what to send."""
    from pydicom import dcmread
    from pydicom.encaps import generate_frames

    data = dicom()
    [stream] = generate_frames(dcmread(io.BytesIO(data)).PixelData, number_of_frames=1)
    expected = f"{kind} is not supported as a file of its own"
    with pytest.raises(UnsupportedImageTypeError, match=expected):
        decode_upload(stream, "image/jpeg")
    with pytest.raises(ImageDecodeError, match=expected):
        decode_image(stream, "x.jpg")
    assert decode_image(data, "x.dcm").ndim == 2  # the DICOM it came in is read


def test_an_ordinary_jpeg_is_not_taken_for_an_unsupported_one() -> None:
    from cxrcore.data.transforms import unreadable_jpeg

    streams = []
    for progressive in (False, True):
        buffer = io.BytesIO()
        Image.fromarray(np.full((40, 40), 7, np.uint8)).save(buffer, "JPEG", progressive=progressive)
        streams.append(buffer.getvalue())
    for data in (*streams, b"\xff\xd8\xff", b"\xff\xd8", b"not a jpeg"):
        assert unreadable_jpeg(data) is None


def test_presentation_lut_shape_inverse_inverts_a_monochrome2_image_once_and_a_monochrome1_not_twice() -> (
    None
):
    """Some CR units write MONOCHROME2 with Presentation LUT Shape INVERSE: a viewer shows it inverted. DX
    requires INVERSE on every MONOCHROME1 image: one inversion, stated twice."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    def with_shape(data: bytes, shape: str) -> bytes:
        ds = dcmread(DicomBytesIO(data))
        ds.PresentationLUTShape = shape
        out = DicomBytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        plain = xray_dicom(14, photometric)
        shown = decode_upload(plain, "application/dicom")
        assert np.array_equal(decode_upload(with_shape(plain, "IDENTITY"), "application/dicom"), shown)
        inverse = with_shape(plain, "INVERSE")
        expected = shown if photometric == "MONOCHROME1" else 255 - shown
        np.testing.assert_array_equal(decode_upload(inverse, "application/dicom"), expected)
        np.testing.assert_array_equal(decode_image(inverse, "x.dcm"), expected)


def test_a_lateral_view_is_refused_by_serve_and_reported_by_ingest() -> None:
    """A PACS export holds a study's lateral beside its PA: the models read frontal images only."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    def with_view(view: str) -> bytes:
        ds = dcmread(DicomBytesIO(xray_dicom(15, "MONOCHROME2")))
        ds.ViewPosition = view
        out = DicomBytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    for view in ("PA", "AP", "LLD", ""):
        assert decode_upload(with_view(view), "application/dicom").ndim == 2
    for view in ("LL", "RL", "lateral"):
        with pytest.raises(
            UnsupportedImageTypeError, match=r"a lateral view .*send the study's frontal image"
        ):
            decode_upload(with_view(view), "application/dicom")
        with pytest.raises(
            ImageDecodeError, match=r"a lateral view"
        ):  # ingest: unusable, named, the rest kept
            decode_image(with_view(view), "IM0002.dcm")


def test_a_dicom_of_another_modality_or_body_part_is_refused_and_a_chest_radiograph_read() -> None:
    """A clinician's review: a DICOM tagged CT, or BodyPartExamined ABDOMEN, was answered COVID 0.969.
    The header says what the image is: another modality or body part is refused, named, as a lateral is."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    def tagged(**tags: str) -> bytes:
        ds = dcmread(DicomBytesIO(xray_dicom(15, "MONOCHROME2")))
        for name, value in tags.items():
            setattr(ds, name, value)
        out = DicomBytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    for tags in ({"Modality": "CR"}, {"Modality": "DX", "BodyPartExamined": "CHEST"}, {"Modality": "OT"},
                 {"BodyPartExamined": "Thorax"}, {"BodyPartExamined": "PORT CHEST"}):  # fmt: skip
        assert decode_upload(tagged(**tags), "application/dicom").ndim == 2
    for tags, named in (({"Modality": "CT"}, "Modality CT"), ({"Modality": "MG"}, "Modality MG"),
                        ({"BodyPartExamined": "ABDOMEN"}, "BodyPartExamined ABDOMEN")):  # fmt: skip
        with pytest.raises(UnsupportedImageTypeError, match=rf"^not a chest X-ray \(DICOM {named}\)"):
            decode_upload(tagged(**tags), "application/dicom")
        with pytest.raises(ImageDecodeError, match=r"not a chest X-ray"):  # ingest: unusable, named
            decode_image(tagged(**tags), "IM0003.dcm")


def test_a_child_that_stops_reading_is_killed_at_the_deadline_and_the_next_decode_works() -> None:
    """A verifier (session 52): with the child not reading (stopped here; a codec hung before it took the
    whole file), `decode` waited on a full pipe for ten minutes, holding the lock every decode waits on."""
    import os
    import signal
    import time

    good = compressed_dicom(xray_dicom(13), JPEGLSLossless)
    decoder = DecoderProcess(timeout_s=60)
    try:
        decoder.decode(good)  # started and warm
        pid = decoder.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        decoder.timeout_s = 1.0
        started = time.monotonic()
        with pytest.raises(ImageDecodeError, match=r"did not decode within 1 s"):
            decoder.decode(b"\0" * (4 << 20))  # far more than a pipe's buffer
        assert time.monotonic() - started < 15 and decoder.pid is None
        decoder.timeout_s = 60
        assert decoder.decode(good).shape == (300, 250)
    finally:
        decoder.close()
