"""Local paths and URIs (s3://, gs://, file://) behind one pyarrow filesystem interface."""

from __future__ import annotations

import os
import uuid

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


def publish(filesystem: pafs.FileSystem, staging: str, final: str) -> None:
    """Replace `final` with the finished `staging` folder.

    On a local filesystem this is two renames, so readers see the old or the new folder, never a mix.
    Object stores have no directory rename: the folder is copied, and completeness is marked by the
    report file that callers write last.
    """
    if isinstance(filesystem, pafs.LocalFileSystem):
        trash = f"{final}.old-{uuid.uuid4().hex[:8]}"
        if exists(filesystem, final):
            os.replace(final, trash)
        os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
        os.replace(staging, final)
        remove(filesystem, trash)
        return
    remove(filesystem, final)
    pafs.copy_files(staging, final, source_filesystem=filesystem, destination_filesystem=filesystem)
    remove(filesystem, staging)


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
