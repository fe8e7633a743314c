"""Local paths and URIs (s3://, gs://, file://) behind one pyarrow filesystem interface."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from cxrcore.config import ConfigError, resolve_location

STORAGE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""OSErrors of where a command writes, said in one line: a read-only filesystem, no space left, a quota
reached, a file larger than `ulimit -f` allows."""


def existing_folder(path: str | Path) -> Path:
    """`path`, or the nearest folder above it that exists: where a folder not made yet would be made."""
    found = Path(path).absolute()
    while not found.exists() and found != found.parent:
        found = found.parent
    return found


def name_the_place(error: BaseException, where: str) -> None:
    """Give a storage OSError (STORAGE_ERRNOS) that names no file the place being written: a failed
    write() or fsync(), or pyarrow's copy, name none, and `cxr: error: No space left on device` said not
    which disk."""
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS and not error.filename:
        error.filename = where


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or a URI."""
    if "://" in location:
        filesystem, path = pafs.FileSystem.from_uri(location)
        return filesystem, path.rstrip("/")
    return pafs.LocalFileSystem(), resolve_location(location)


def is_remote(location: str | Path) -> bool:
    """Whether `location` is a URI of a store other than this machine's disk (s3://, gs://, ...)."""
    return "://" in str(location) and not str(location).startswith("file://")


def uri(filesystem: pafs.FileSystem, path: str) -> str:
    """The location `resolve` turns into (filesystem, path): a local path, or a URI for an object store.

    Ray reports checkpoints as a filesystem and a path within it (`cxr/runs/...` for s3://cxr/runs/...).
    """
    schemes = {"s3": "s3://", "gcs": "gs://"}
    if isinstance(filesystem, pafs.LocalFileSystem):
        return path
    scheme = schemes.get(filesystem.type_name)
    if scheme is None:
        raise ValueError(f"no URI scheme known for a {filesystem.type_name} filesystem (path {path})")
    return scheme + path.lstrip("/")


def cache_folder(kind: str) -> Path:
    """cxr's cache of `kind` (checkpoints, registry, reports, experiments) on this machine: under
    `$XDG_CACHE_HOME/cxr` where that is an absolute path (an HPC node's scratch space, a container's
    volume), else `~/.cache/cxr`, `~` left for the caller to expand when it writes there.

    >>> cache_folder("checkpoints").parts[-2:]
    ('cxr', 'checkpoints')
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec: a relative path is invalid and ignored.
    return (Path(base) if os.path.isabs(base) else Path("~/.cache")) / "cxr" / kind


def cache_key(location: str) -> list[str]:
    """Folders under a cache that keep locations apart: s3://bucket/reg → s3/bucket/reg."""
    parts = urlsplit(location)
    return [p for p in [parts.scheme, parts.netloc, *parts.path.split("/")] if p not in ("", ".", "..")]


def copy(
    source_fs: pafs.FileSystem,
    source: str,
    target_fs: pafs.FileSystem,
    target: str,
    skip: Collection[str] = (),
) -> None:
    """Copy a file, or a folder recursively, across filesystems; `skip`: a folder's files left out, by their
    paths within it (never copied, rather than deleted after, so no copy ever holds them)."""
    if source_fs.get_file_info(source).type == pafs.FileType.Directory:
        # copy_files does not create missing folders on the local filesystem.
        infos = source_fs.get_file_info(pafs.FileSelector(source, recursive=True))
        for info in infos:
            if info.type == pafs.FileType.Directory:
                target_fs.create_dir(target + info.path[len(source) :], recursive=True)
        target_fs.create_dir(target, recursive=True)
        if skip:
            for info in infos:
                inside = info.path[len(source) :].lstrip("/")
                if info.type == pafs.FileType.File and inside not in skip:
                    pafs.copy_files(
                        info.path,
                        f"{target}/{inside}",
                        source_filesystem=source_fs,
                        destination_filesystem=target_fs,
                    )
            return
    pafs.copy_files(source, target, source_filesystem=source_fs, destination_filesystem=target_fs)


def upload(folder: str | Path, location: str) -> None:
    """Replace the folder at `location` (a local path or a URI) with a copy of the local `folder`."""
    filesystem, path = resolve(location)
    remove(filesystem, path)
    copy(pafs.LocalFileSystem(), str(Path(folder).resolve()), filesystem, path)


def cached_copy(location: str, files: list[str], cache: str | Path) -> Path:
    """A local folder holding `files` of the remote folder `location`, kept under `cache` by location.

    A copy whose files have the sizes and, for the first file, the exact bytes of the remote ones is
    reused; otherwise they are fetched again (into a staging folder, then swapped in whole, so a
    reader never sees a half copy). Put a small file that changes with the others (a card) first.
    """
    filesystem, path = resolve(location)
    infos = filesystem.get_file_info([f"{path}/{name}" for name in files])
    missing = [name for name, info in zip(files, infos, strict=True) if info.type != pafs.FileType.File]
    if missing:
        raise FileNotFoundError(f"{location} has no {', '.join(missing)}")
    target = Path(cache).expanduser().joinpath(*cache_key(location))
    with filesystem.open_input_stream(infos[0].path) as stream:
        first: bytes = stream.read()
    if _same_copy(target, files, infos, first):
        return target
    staging = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    local = pafs.LocalFileSystem()
    try:
        (staging / files[0]).write_bytes(first)
        for name in files[1:]:
            copy(filesystem, f"{path}/{name}", local, str(staging / name))
        shutil.rmtree(target, ignore_errors=True)  # a stale copy
        try:
            os.replace(staging, target)
        except OSError:
            if not _same_copy(target, files, infos, first):  # not merely another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _same_copy(target: Path, files: list[str], infos: list[pafs.FileInfo], first: bytes) -> bool:
    try:
        return (target / files[0]).read_bytes() == first and all(
            (target / name).stat().st_size == info.size for name, info in zip(files, infos, strict=True)
        )
    except OSError:
        return False


def exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def remove(filesystem: pafs.FileSystem, path: str) -> None:
    """Delete a file or folder if it exists."""
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        filesystem.delete_dir(path)
    elif info.type == pafs.FileType.File:
        filesystem.delete_file(path)


def staging_paths(final: str) -> tuple[str, str]:
    """(staging, trash): the folders beside `final` that `publish` uses; a killed run may leave them."""
    final = final.rstrip("/")
    return f"{final}.partial", f"{final}.old"


def clear_staging(filesystem: pafs.FileSystem, final: str, marker: str) -> None:
    """Remove what a killed `publish` left beside `final`, first putting back a finished folder it had
    moved out of the way (the two-rename fallback)."""
    staging, trash = staging_paths(final)
    if not exists(filesystem, final) and exists(filesystem, f"{trash}/{marker}"):
        filesystem.move(trash, final)
    remove(filesystem, staging)
    remove(filesystem, trash)


def publish(filesystem: pafs.FileSystem, final: str, marker: str) -> None:
    """Replace `final` with the finished staging folder, in which the file `marker` marks completeness.

    Local filesystem: one atomic exchange of the two folders (Linux renameat2), so readers, and a run
    killed at any moment, see the old or the new folder whole; where that is unsupported, two renames
    with an instant between them in which `final` is missing (never half there). Object stores have no
    rename: the old marker goes first, then the old files; the new files are copied and the marker
    last, so nothing without the marker is complete, but a run killed meanwhile leaves none at `final`.
    """
    staging, trash = staging_paths(final)
    if isinstance(filesystem, pafs.LocalFileSystem):
        if not exists(filesystem, final):
            os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
            os.replace(staging, final)
            return
        if _exchange(staging, final):
            old = staging
        else:
            remove(filesystem, trash)
            os.replace(final, trash)
            os.replace(staging, final)
            old = trash
        remove(filesystem, f"{old}/{marker}")  # first: the old folder never looks complete half-deleted
        remove(filesystem, old)
        return
    remove(filesystem, f"{final}/{marker}")
    remove(filesystem, final)
    for info in filesystem.get_file_info(pafs.FileSelector(staging, recursive=True)):
        target = final + info.path[len(staging) :]
        if info.type == pafs.FileType.Directory:
            filesystem.create_dir(target, recursive=True)
        elif info.path != f"{staging}/{marker}":
            filesystem.copy_file(info.path, target)
    filesystem.copy_file(f"{staging}/{marker}", f"{final}/{marker}")
    remove(filesystem, staging)


def _exchange(first: str, second: str) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # an old kernel or a filesystem without it
        return False
    raise OSError(error, os.strerror(error), first, None, second)


def write_text(filesystem: pafs.FileSystem, path: str, text: str) -> None:
    """Write `text` to `path` whole or not at all: locally through a temporary file beside it, flushed to
    disk and renamed over it (a run's settings and an experiment's comparison.json, written in place,
    were left empty or cut short by a kill or a power cut, and every re-run then failed on them); an
    object store's write is one object, whole already."""
    write_bytes(filesystem, path, text.encode())


def write_bytes(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` whole or not at all, as write_text does."""
    filesystem.create_dir(os.path.dirname(path), recursive=True)
    if not isinstance(filesystem, pafs.LocalFileSystem):
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
        return
    temporary = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError) and exc.filename in (None, temporary):
            exc.filename = path  # the error names the file the user knows (read-only, full, not theirs)
        raise


def file_sha256(filesystem: pafs.FileSystem, path: str) -> str:
    """The sha256 of a file, read 1 MB at a time (a ResNet50's weights are 100 MB)."""
    import hashlib

    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_text(filesystem: pafs.FileSystem, path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    if not exists(filesystem, path):
        return None
    with filesystem.open_input_stream(path) as stream:
        data: bytes = stream.read()
    return data.decode()


class InUse(ConfigError):
    """Another process is writing the same output (a dataset, a training run, a Tune experiment)."""


@contextmanager
def exclusive(location: str, what: str, elsewhere: str) -> Iterator[None]:
    """Held while this process writes `location`: a second command writing the same place fails at once
    with InUse, naming the first (`what`, e.g. "a training run") and how to write elsewhere (`elsewhere`,
    e.g. "another --name"), rather than both running to "success" over each other's files (two
    ingests into one OUT left a dataset that no longer read; two runs of one name, interleaved checkpoints).

    An advisory lock (flock) on a hidden file beside `location` (`.NAME.lock`), removed when the block
    ends; the kernel releases the lock when the process ends, however it ends, so a killed run's file
    blocks nothing and the next run resumes or replaces what it left, as before. A folder made only to
    hold the lock goes with it. Re-entrant within a process: a command takes it before Ray starts, and
    the library call it makes takes it again. Local paths only (a shared filesystem's flock is as good
    as its NFS); an object store has no lock, and nothing is held there.
    """
    if is_remote(location):
        yield
        return
    path = os.path.realpath(resolve(location)[1].rstrip("/"))  # a link and its target: one lock
    if path in _held:  # taken by this process already (a command first, then the library call)
        yield
        return
    parent = os.path.dirname(path)
    made = [] if os.path.isdir(parent) else _missing_folders(parent)
    os.makedirs(parent, exist_ok=True)
    lock = os.path.join(parent, f".{os.path.basename(path)}.lock")
    descriptor, writable = _locked_file(lock, location, elsewhere)
    _held.add(path)
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        holder = f"{what} (pid {os.getpid()} on {socket.gethostname()}, since {since})"
        if writable:
            try:
                os.pwrite(descriptor, holder.encode(), 0)
            except OSError as exc:
                name_the_place(exc, lock)
                raise
        yield
    finally:
        _held.discard(path)
        # Removed while still held: a process that opened it meanwhile finds it gone (_locked_file).
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(descriptor)
        for folder in made:  # deepest first; one the run wrote into stays
            with contextlib.suppress(OSError):
                os.rmdir(folder)


_held: set[str] = set()
"""The outputs this process holds the lock of (`exclusive` is re-entrant within a process)."""

READ_LOCK_NAME = ".readers.lock"
"""The file inside a dataset folder that runs reading it hold a shared flock on (`reading`); hidden, so
Parquet readers skip it, and it leaves with the folder when an ingest replaces it."""


class BeingRead(InUse):
    """An ingest would replace a dataset that a run is reading."""


@contextmanager
def reading(dataset: str, marker: str) -> Iterator[None]:
    """Held while this process reads the dataset folder `dataset` (a training run, a Tune experiment, an
    evaluation): an ingest into that folder refuses to replace it meanwhile (`replacing`). Ray Data reads
    the Parquet files again every epoch, and a run whose files were swapped under it failed mid-epoch with
    FileNotFoundError, or (a Tune experiment) scored its winners on the new data as if it were theirs.

    A shared flock on READ_LOCK_NAME inside the folder, so any number of runs read at once. Waits the
    moment an ingest takes to swap the folder, then locks the new one. Nothing is held for an object
    store, a folder without the file `marker` (not a dataset: the run fails on it itself, and no lock
    file is left in it) or one this user cannot write (no ingest by this user can replace it either): a
    run on a shared filesystem is guarded as far as its flock is.
    """
    path = _local_folder(dataset, marker)
    descriptor = None
    while path is not None:
        lock = os.path.join(path, READ_LOCK_NAME)
        try:
            descriptor = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError:  # read-only, another user's, or replaced this instant (no longer a folder)
            break
        fcntl.flock(descriptor, fcntl.LOCK_SH)  # blocks only while an ingest swaps the folder
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(descriptor).st_ino:
                break  # still the folder at that path: held
        os.close(descriptor)  # the folder was replaced while this waited: lock the new one
        descriptor = None
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)


@contextmanager
def replacing(dataset: str, marker: str, elsewhere: str, wait: bool = False) -> Iterator[None]:
    """Held while an ingest swaps a new dataset in at `dataset`, while no run reads the one there
    (`reading`): BeingRead at once where one does, or, with `wait` (the new dataset is made by then),
    a line saying so and a wait for them to end. Runs that start meanwhile wait for the swap and read the
    new one. Nothing to hold where no dataset (a folder with the file `marker`) is there."""
    path = _local_folder(dataset, marker)
    try:
        descriptor = (
            None if path is None else os.open(f"{path}/{READ_LOCK_NAME}", os.O_RDONLY | os.O_CREAT, 0o666)
        )
    except OSError:  # a folder this user may not write: the swap itself fails on it, saying so
        descriptor = None
    if descriptor is None:
        yield
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise BeingRead(
                    f"{dataset} is being read by a run on it (a cxr train, tune or evaluate, until it ends); "
                    f"replacing it would pull its files from under it: wait for it to end, or use {elsewhere}"
                ) from None
            print(
                f"waiting for the runs reading {dataset} to end before the new dataset replaces it (it is "
                "made; Ctrl-C leaves the old one in place, and the next ingest makes the new one again)",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _local_folder(location: str, marker: str) -> str | None:
    """The real path of a local folder holding the file `marker`, else None (an object store too)."""
    if is_remote(location):
        return None
    path = os.path.realpath(resolve(location)[1].rstrip("/") or "/")
    return path if os.path.isfile(os.path.join(path, marker)) else None


def open_lock_file(path: str) -> tuple[int, bool]:
    """(descriptor, writable) of a lock file, made if missing. Mode 0666 less the umask, so a group that
    shares a folder shares its locks (0644 locked every other user out of a shared registry or data folder
    for good, `Permission denied`, once one user had made them); a lock file another user made and this one
    may only read is opened read-only, which flock takes as well (only the holder's line is not written)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
    except PermissionError:
        return os.open(path, os.O_RDONLY), False


def _locked_file(lock: str, location: str, elsewhere: str) -> tuple[int, bool]:
    """(descriptor, writable) of `lock`, flocked by this process, and still the file at that path."""
    while True:
        descriptor, writable = open_lock_file(lock)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(descriptor)
            raise InUse(
                f"{location} is being written by {holder}; wait for it to finish or stop it, or use "
                f"{elsewhere}"
            ) from None
        try:
            if os.stat(lock).st_ino == os.fstat(descriptor).st_ino:
                if writable:
                    os.ftruncate(descriptor, 0)
                return descriptor, writable
        except FileNotFoundError:
            pass
        os.close(descriptor)  # its holder removed it as it finished: take the new one


def _missing_folders(folder: str) -> list[str]:
    """The folders that do not exist yet, from `folder` up, deepest first."""
    missing = []
    while folder and not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing
