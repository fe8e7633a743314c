"""Local paths and URIs (s3://, gs://, file://) behind one pyarrow filesystem interface."""

from __future__ import annotations

import ctypes
import errno
import os

import pyarrow.fs as pafs

from cxrcore.config import resolve_location


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or a URI."""
    if "://" in location:
        filesystem, path = pafs.FileSystem.from_uri(location)
        return filesystem, path.rstrip("/")
    return pafs.LocalFileSystem(), resolve_location(location)


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
    filesystem.create_dir(os.path.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())


def read_text(filesystem: pafs.FileSystem, path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    if not exists(filesystem, path):
        return None
    with filesystem.open_input_stream(path) as stream:
        data: bytes = stream.read()
    return data.decode()
