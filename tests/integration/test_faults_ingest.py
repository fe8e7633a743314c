"""A real `cxr data ingest` killed with SIGKILL in its write stage: OUT keeps the previous dataset whole.

Slow (a Ray of its own in a subprocess, three ingests of 200 images in this session: about 20 s on a
quiet 2-core machine, minutes on a busy one), so not in the default run: `pytest -m slow tests/integration`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cxrcore.config import IngestConfig
from cxrcore.data import storage
from cxrcore.data.ingest import REPORT_NAME, ingest_dataset, read_report, read_table
from cxrcore.labels import CLASSES
from tests.conftest import write_png
from tests.processes import group_of, wait_until_gone

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

BIN = Path(sys.executable).parent
SIZE = 192  # big enough that writing 200 rows takes a while: the kill lands inside the write stage
IMAGES = 200
DEADLINE_S = 180.0
POLL_S = 0.002


@dataclass
class KilledIngest:
    """What the killed run left, and the state it was killed in."""

    raw: Path
    out: Path
    first: dict[str, Any]
    """the report of the dataset at OUT before the kill (seed 0)."""
    reference: dict[str, Any]
    """the report of an uninterrupted ingest of what the killed run was writing (seed 1), elsewhere."""
    at_kill: dict[str, Any] = field(default_factory=dict)
    """the state frozen (SIGSTOP) just before the SIGKILL."""
    survivors: list[int] = field(default_factory=list)
    """pids of the killed run's processes still alive afterwards."""


def blob_image(seed: int, size: int = 128) -> np.ndarray:
    """A distinct grayscale picture per seed (coarse random blobs): no two are near duplicates."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(20, 235, (6, 6))
    image = np.kron(coarse, np.ones((size // 6 + 1, size // 6 + 1)))[:size, :size]
    return np.clip(image + rng.normal(0, 8, (size, size)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def killed(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KilledIngest]:
    root = tmp_path_factory.mktemp("faults")
    raw = root / "raw"
    for i in range(IMAGES):
        write_png(raw / CLASSES[i % len(CLASSES)] / "images" / f"blob-{i}.png", blob_image(i))
    out = root / "dataset"
    first = ingest_dataset(IngestConfig(raw=str(raw), out=str(out), size=SIZE, seed=0))
    reference = ingest_dataset(IngestConfig(raw=str(raw), out=str(root / "reference"), size=SIZE, seed=1))
    assert first["fingerprint"] != reference["fingerprint"]

    # A short temp dir of its own (Unix socket paths must stay under ~107 bytes), and a HOME of its own:
    # Ray must neither join the test session's cluster nor touch ~/.ray/auth_token.
    scratch = Path(tempfile.mkdtemp(prefix="cxr-kill-", dir="/tmp"))
    (scratch / "ray").mkdir()
    (scratch / "home").mkdir()
    env = {
        **os.environ,
        "RAY_ADDRESS": "",  # start a local cluster, never join one
        "RAY_TMPDIR": str(scratch / "ray"),
        "HOME": str(scratch / "home"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    log = scratch / "output.txt"
    command = [str(BIN / "cxr"), "data", "ingest", str(raw), str(out), "--size", str(SIZE), "--seed", "1"]
    with log.open("wb") as sink:
        # Its own session: the SIGKILL goes to the driver and every Ray process it started.
        process = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    result = KilledIngest(raw, out, first, reference)
    try:
        result.at_kill = _kill_in_write_stage(process, out, log)
        result.survivors = wait_until_gone(str(scratch / "ray"))
        yield result
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def _kill_in_write_stage(process: subprocess.Popen[bytes], out: Path, log: Path) -> dict[str, Any]:
    """Poll until the run's staging folder exists, freeze its process group, record the state, SIGKILL it."""
    staging = Path(storage.staging_paths(str(out))[0])
    deadline = time.monotonic() + DEADLINE_S
    while not staging.exists():
        if process.poll() is not None:
            pytest.fail(
                f"the ingest ended (exit {process.returncode}) before its write stage:\n{log.read_text()}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"no staging folder after {DEADLINE_S:.0f} s:\n{log.read_text()}")
        time.sleep(POLL_S)
    os.killpg(process.pid, signal.SIGSTOP)  # every process of the run stops where it is
    state = {
        "staging": staging.is_dir(),
        "staged_report": (staging / REPORT_NAME).exists(),
        "out_fingerprint": read_report(str(out))["fingerprint"],
        "processes": len(group_of(process.pid)),
    }
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    return state


def test_killed_ingest_leaves_the_previous_dataset_whole(killed: KilledIngest) -> None:
    at_kill = killed.at_kill
    assert at_kill["staging"] and not at_kill["staged_report"]  # killed while writing, before the swap
    assert at_kill["out_fingerprint"] == killed.first["fingerprint"]
    assert at_kill["processes"] > 5  # the driver and its Ray: GCS, raylet, dashboard, workers...
    assert killed.survivors == []  # ...and none of them outlived the kill

    out = str(killed.out)
    assert read_report(out) == killed.first
    table = read_table(out, columns=["sha256", "split"]).to_pandas()
    assert len(table) == killed.first["ingested"] == IMAGES
    assert table["split"].astype(str).value_counts().to_dict() == {
        s: n for s, n in killed.first["by_split"].items() if n
    }  # the seed-0 split, not a mix with the killed seed-1 run
    staging = storage.staging_paths(out)[0]
    with pytest.raises(FileNotFoundError, match="not a finished cxr dataset"):
        read_report(staging)  # what the killed run wrote is not a dataset anyone can read
    with pytest.raises(FileNotFoundError, match="not a finished cxr dataset"):
        read_table(staging)
    finished = sorted(p.parent for p in killed.out.parent.rglob(REPORT_NAME))
    assert finished == sorted([killed.out, killed.out.parent / "reference"])


def test_rerun_after_the_kill_clears_its_leftovers_and_gives_the_same_fingerprint(
    killed: KilledIngest,
) -> None:
    staging, trash = storage.staging_paths(str(killed.out))
    assert Path(staging).is_dir()  # the killed run's leftovers
    again = ingest_dataset(IngestConfig(raw=str(killed.raw), out=str(killed.out), size=SIZE, seed=1))
    assert again["fingerprint"] == killed.reference["fingerprint"] != killed.first["fingerprint"]
    assert read_report(str(killed.out))["fingerprint"] == again["fingerprint"]
    assert not Path(staging).exists() and not Path(trash).exists()
    columns = ["file", "split", "sha256"]
    rerun = read_table(str(killed.out), columns=columns).to_pandas().sort_values("file")
    reference = read_table(str(killed.out.parent / "reference"), columns=columns).to_pandas()
    assert rerun.reset_index(drop=True).equals(reference.sort_values("file").reset_index(drop=True))
