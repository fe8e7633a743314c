"""What produced a file cxr writes: cxr's version and commit, and the versions of the libraries that shape
the result. Torch-free: ingest records it too (`ingest_report.json`'s `software`), and model cards add
torch and CUDA (`cxrcore.checkpoint.software_versions`)."""

from __future__ import annotations

import contextlib
import functools
import platform
import subprocess
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import cxrcore


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
    return described.stdout.strip() or None


def versions(*packages: str) -> dict[str, str]:
    """cxr (and its commit), Python, the machine's architecture and each of `packages` that is installed."""
    found = {"cxr": cxrcore.__version__, "python": platform.python_version()}
    if commit := source_commit():
        found["cxr_commit"] = commit
    for package in packages:
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    found["machine"] = platform.machine()
    return found
