"""What produced a file cxr writes: cxr's version, commit and source hash, and the versions of the
libraries that shape the result. Torch-free: ingest records it too (`ingest_report.json`'s `software`), and
model cards add torch and CUDA (`cxrcore.checkpoint.software_versions`)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import platform
import subprocess
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import cxrcore

log = logging.getLogger(__name__)
SOURCE_PACKAGES = ("cxrcore", "serve", "jobs")
"""The packages whose Python files `source_sha256` hashes: the code that ingests, trains and serves."""


def now() -> str:
    """The time a record is written, UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@functools.cache
def source_commit() -> str | None:
    """The git commit cxr runs from (`-dirty` where its files differ from it), where it runs from a
    checkout; None for an installed package, or without git."""
    source = Path(cxrcore.__file__).resolve().parents[1]
    if not (source / ".git").exists():
        return None
    try:
        described = subprocess.run(
            ["git", "-C", str(source), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if described.returncode:  # a checkout owned by another user ("dubious ownership"), a broken one
        log.info(
            "no git commit recorded for %s: %s", source, described.stderr.strip() or described.returncode
        )
    return described.stdout.strip() or None


@functools.cache
def source_sha256() -> str:
    """sha256 of cxr's own Python source as it runs (each file of SOURCE_PACKAGES by its path and bytes, in
    order): the code's identity where there is no git checkout to name a commit (an installed wheel, a
    container image, a job's working directory uploaded without .git) and within a `-dirty` one."""
    root = Path(cxrcore.__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def versions(*packages: str) -> dict[str, str]:
    """cxr (and its commit), Python, the machine's architecture and each of `packages` that is installed."""
    found = {"cxr": cxrcore.__version__, "python": platform.python_version()}
    if commit := source_commit():
        found["cxr_commit"] = commit
    found["cxr_source_sha256"] = source_sha256()
    for package in packages:
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    found["machine"] = platform.machine()
    return found
