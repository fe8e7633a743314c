"""What `cxr` prints on a local Ray cluster of its own: its own lines, Ray's warnings, and none of Ray Data's
and Ray Train's per-dataset and per-worker chatter, which still reaches the session's log files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cxrcore.data.synthetic import write_synthetic_dataset
from tests.e2e.conftest import BIN

pytestmark = pytest.mark.e2e

CHATTER = (
    "Reporting training result",  # Ray Train: every epoch's metrics dictionary, from every worker
    "Starting execution of Dataset",  # Ray Data: each dataset's start and execution plan
    "Execution plan of Dataset",
    "Progress bars disabled",
    "split(",  # Ray Data: a progress bar per Train worker per epoch
    "Checkpoint successfully created",  # Ray Train INFO
)


def test_cxr_prints_its_own_progress_and_leaves_ray_chatter_to_the_log_files(scratch: Path) -> None:
    write_synthetic_dataset(scratch / "raw", per_class=6, seed=5, image_size=64, mask_size=64)
    ray_dir = scratch / "ray"
    ray_dir.mkdir()
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_dir), "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_DATA_LOGGING_CONFIG", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)  # the defaults a user has
    printed = []
    for command in (
        ["data", "ingest", "raw", "ds", "--size", "32"],
        ["train", "--data", "ds", "--model", "tiny_cnn_lstm", "--epochs", "2", "--workers", "1",
         "--pretrained", "none"],
    ):  # fmt: skip
        done = subprocess.run(
            [str(BIN / "cxr"), *command], cwd=scratch, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        printed.append(done.stdout + done.stderr)
    ingest, train = printed

    assert "ingested 24 of 24 images" in ingest
    assert "tiny_cnn_lstm epoch 1/2: train loss" in train and "tiny_cnn_lstm epoch 2/2: train loss" in train
    assert "best checkpoint:" in train
    assert [line for line in (ingest + train).splitlines() if any(c in line for c in CHATTER)] == []
    # Nothing lost: Ray Data's INFO lines went to the session's log file.
    data_logs = "".join(p.read_text(errors="replace") for p in ray_dir.rglob("ray-data.log"))
    assert "Starting execution of Dataset" in data_logs
