"""DICOM pixel data decoded in a process of its own, for the codecs that may crash on crafted bytes.

JPEG Lossless (Process 14, the usual lossless syntax of a hospital's CR and DX exports) and JPEG-LS are
decoded by GDCM (python-gdcm). On corrupt JPEG Lossless streams GDCM can throw a C++ exception that
nothing catches: of 400 randomly corrupted 12-bit files, one aborted the Python process (`terminate
called after throwing an instance of 'gdcm::Exception'`). In a Serve replica that would be one upload
taking the replica down, and in ingest a Ray worker. Here the decoding runs in a child process: a crash,
or a decode that does not finish within its time, ends that child, the caller gets ImageDecodeError,
and the next file starts a fresh child. A child that cannot be started (the machine is out of processes
or file descriptors) is the machine's fault, not the file's: DecoderUnavailableError.

One child per process, started on first use (about half a second: Python, NumPy, pydicom, GDCM) and
kept; decodes through it take turns. The caller has checked the image's size (rows × columns) first:
the child decodes what the file's header declares.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cxrcore.data.transforms import DecoderUnavailableError, ImageDecodeError

DECODE_TIMEOUT_S = 30.0
"""The longest one file's pixel data may take to decode (a 3000×2500 JPEG Lossless X-ray takes well
under a second); past it the child is killed and the file is refused as unreadable."""

_LENGTH = struct.Struct(">Q")


def _read_exactly(stream: object, size: int) -> bytes:
    data = stream.read(size)  # type: ignore[attr-defined]
    if len(data) != size:
        raise EOFError
    return bytes(data)


def serve_forever() -> None:
    """The child's loop: a DICOM file in (length, bytes) on stdin; on stdout either b"A" + length + a JSON
    header line (dtype, shape) and the array's bytes, or b"E" + length + the error's text."""
    import io
    import warnings

    import pydicom
    from pydicom.uid import JPEGExtended12Bit

    _no_core_dumps()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            (size,) = _LENGTH.unpack(_read_exactly(stdin, _LENGTH.size))
            data = _read_exactly(stdin, size)
        except EOFError:  # the parent has gone
            return
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            if ds.file_meta.get("TransferSyntaxUID") == JPEGExtended12Bit and int(ds.BitsStored) > 8:
                pixels = _gdcm_pixels(data)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pixels = np.ascontiguousarray(ds.pixel_array)
            header = json.dumps({"dtype": pixels.dtype.str, "shape": list(pixels.shape)}).encode() + b"\n"
            reply = b"A" + _LENGTH.pack(len(header) + pixels.nbytes) + header + pixels.tobytes()
        except Exception as exc:  # the pixel data are broken: said in words, the child lives on
            text = f"{type(exc).__name__}: {exc}".encode()
            reply = b"E" + _LENGTH.pack(len(text)) + text
        stdout.write(reply)
        stdout.flush()


def _no_core_dumps() -> None:
    """Leave no core dump when a crafted file kills this process: its memory holds the whole upload, the
    patient's name and ID included (a verifier, session 52, found them in a 50 MB `core` in the working
    folder with `ulimit -c unlimited`, as Docker's default unit sets). The core size limit goes to 0, and
    the process is made undumpable, which also covers a `core_pattern` that pipes cores to a collector
    (systemd-coredump, apport)."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_dumpable = 4
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)


def _gdcm_pixels(data: bytes) -> np.ndarray:
    """A single-frame DICOM's pixels as GDCM decodes them, read from a file (GDCM's reader takes a path).

    For 12-bit JPEG Extended, which pydicom's GDCM plugin refuses and GDCM decodes (its stderr's
    "Unsupported JPEG data precision 12" is its 8-bit decoder's first try, before the 12-bit one).

    The file is the whole upload, its header's patient name and ID included, and this child is the process
    a crafted file kills: a temporary file it made outlived it, one per crash (a privacy review found the
    patient's name in /tmp after an aborted decode). On Linux the file is in memory (`memfd_create`): it
    never reaches a disk and goes with the process however that ends. Elsewhere it is in the folder the
    parent made for this child (`_SCRATCH_ENV`), which the parent empties after a crash and removes.
    """
    import gdcm

    with _file_holding(data) as path:
        reader = gdcm.ImageReader()
        reader.SetFileName(path)
        if not reader.Read():
            raise ValueError("GDCM could not read the file")
        image = reader.GetImage()
    layout = image.GetPixelFormat()
    dtype = np.dtype(f"<{'i' if layout.GetPixelRepresentation() else 'u'}{layout.GetBitsAllocated() // 8}")
    shape = [image.GetDimension(1), image.GetDimension(0)] + (
        [layout.GetSamplesPerPixel()] if layout.GetSamplesPerPixel() > 1 else []
    )
    buffer = image.GetBuffer().encode("utf-8", "surrogateescape")  # GDCM hands char* over as str
    if len(buffer) != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"GDCM decoded {len(buffer)} bytes for {shape} pixels of {dtype}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


_SCRATCH_ENV = "CXR_DECODER_SCRATCH"
"""The private folder (0700) the parent made for its child's temporary files where memory files are not
available; removed with the child."""


def _memory_files() -> bool:
    if os.environ.get("CXR_DECODER_TEST_NO_MEMORY_FILES"):  # the tests' way to the other platforms' path
        return False
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


@contextlib.contextmanager
def _file_holding(data: bytes) -> Iterator[str]:
    """A path GDCM can open that reads `data`: a memory file on Linux, else a file in the scratch folder."""
    if _memory_files():
        fd = os.memfd_create("cxr-dicom", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "wb") as file:
                file.write(data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(suffix=".dcm", dir=os.environ.get(_SCRATCH_ENV)) as file:
        file.write(data)
        file.flush()
        yield file.name


class DecoderProcess:
    """A child process that decodes DICOM pixel data (`decode`), restarted after a crash or a timeout."""

    def __init__(self, timeout_s: float = DECODE_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._child: subprocess.Popen[bytes] | None = None
        self._scratch: str | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The running child's process id (None before the first decode or after a failure)."""
        return self._child.pid if self._child is not None and self._child.poll() is None else None

    def decode(self, data: bytes) -> np.ndarray:
        """The stored pixel values of the DICOM file `data`, as pydicom's `pixel_array` gives them.

        Raises ImageDecodeError when the pixel data cannot be decoded, when the decoder crashed on them
        (the child's signal is named), or when it took longer than `timeout_s`; DecoderUnavailableError
        when no child could be started."""
        with self._lock:
            child = self._running_child()
            deadline = time.monotonic() + self.timeout_s
            try:
                assert child.stdin is not None and child.stdout is not None
                self._write(child, _LENGTH.pack(len(data)) + data, deadline)
                kind = self._read(child, 1, deadline)
                (size,) = _LENGTH.unpack(self._read(child, _LENGTH.size, deadline))
                payload = self._read(child, size, deadline)
            except TimeoutError:
                self._stop()
                raise ImageDecodeError(
                    f"DICOM pixel data did not decode within {self.timeout_s:g} s; they are likely corrupt"
                ) from None
            except (EOFError, BrokenPipeError, OSError):
                how = _ending(self._stop())
                raise ImageDecodeError(
                    f"corrupt DICOM pixel data: the decoder crashed on them ({how})"
                ) from None
        if kind == b"E":
            raise ImageDecodeError(f"corrupt DICOM pixel data: {payload.decode(errors='replace')}")
        header, _, pixels = payload.partition(b"\n")
        described = json.loads(header)
        return np.frombuffer(pixels, dtype=np.dtype(described["dtype"])).reshape(described["shape"])

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _running_child(self) -> subprocess.Popen[bytes]:
        if self._child is not None and self._child.poll() is not None:
            self._stop()  # ended since: its scratch folder goes with it
        if self._child is None:
            root = str(Path(__file__).resolve().parents[1])  # where cxrcore is, installed or not
            path = os.environ.get("PYTHONPATH")
            env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}
            try:
                if not _memory_files():
                    self._scratch = tempfile.mkdtemp(prefix="cxr-dicom-")  # 0700: this user's alone
                    env[_SCRATCH_ENV] = self._scratch
                self._child = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        "from cxrcore.decoder_process import serve_forever; serve_forever()",
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,  # codecs' warnings; the reply says what matters
                    env=env,
                )
            except OSError as exc:  # no process or file descriptor left: not the file's fault
                self._stop()
                raise DecoderUnavailableError(
                    f"the DICOM decoder's process could not be started: {exc.strerror or exc}"
                ) from exc
        return self._child

    @staticmethod
    def _write(child: subprocess.Popen[bytes], data: bytes, deadline: float) -> None:
        """Send `data` to the child by `deadline`: a child that stops reading (hung in a codec before it
        took the whole file) had held the caller, and the lock every other decode waits on, without end
        (a verifier, session 52: ten minutes for a 98 KB file, the pipe's buffer full)."""
        assert child.stdin is not None
        fd, view = child.stdin.fileno(), memoryview(data)
        os.set_blocking(fd, False)
        try:
            while view:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([], [fd], [], remaining)[1]:
                    raise TimeoutError
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:  # room for less than select promised: wait again
                    continue
        finally:
            with contextlib.suppress(OSError):
                os.set_blocking(fd, True)

    @staticmethod
    def _read(child: subprocess.Popen[bytes], size: int, deadline: float) -> bytes:
        assert child.stdout is not None
        fd, chunks, left = child.stdout.fileno(), [], size
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _stop(self) -> int:
        """Kill the child (if it is still there) and return its exit status."""
        child, self._child = self._child, None
        scratch, self._scratch = self._scratch, None
        status = 0
        if child is not None:
            if child.poll() is None:
                child.kill()
            status = child.wait()
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if scratch is not None:  # what a crashed child left there: uploads, their headers' names
            shutil.rmtree(scratch, ignore_errors=True)
        return status


def _ending(status: int) -> str:
    """A child's exit status in words: 'signal SIGABRT', 'status 1'."""
    if status >= 0:
        return f"status {status}"
    try:
        return f"signal {signal.Signals(-status).name}"
    except ValueError:
        return f"signal {-status}"


_shared: DecoderProcess | None = None
_shared_lock = threading.Lock()


def decode_in_child(data: bytes) -> np.ndarray:
    """`DecoderProcess.decode` with this process's one decoder child, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = DecoderProcess()
            atexit.register(_shared.close)
        decoder = _shared
    return decoder.decode(data)
