"""`ray job submit` of the cxr jobs to a real `ray start --head` cluster with token auth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, CHATTER, RayCluster
from tests.http_client import HTTP

pytestmark = pytest.mark.e2e
REPO = Path(__file__).parents[2]


def test_dashboard_requires_the_token(ray_cluster: RayCluster) -> None:
    assert HTTP.get(f"{ray_cluster.address}/api/version", timeout=5).status_code == 401
    headers = {"Authorization": f"Bearer {ray_cluster.token}"}
    assert HTTP.get(f"{ray_cluster.address}/api/version", headers=headers, timeout=5).status_code == 200


def test_pipeline_job_runs_on_the_cluster(ray_cluster: RayCluster, tmp_path: Path) -> None:
    work = tmp_path / "demo"
    entrypoint = f"{sys.executable} -m jobs.pipeline --work-dir {work} --per-class 6 --size 64 --no-tune"
    result = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            ray_cluster.address,
            "--working-dir",
            str(REPO),
            "--runtime-env",
            str(REPO / "cluster/runtime_env.yaml"),
            "--",
            *entrypoint.split(),
        ],
        env=ray_cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout.lower()
    assert "ingested 24 of 24 images" in result.stdout
    # The job's driver joined the cluster: a quiet cxr command there too (Ray's chatter is in its log files).
    assert [line for line in result.stdout.splitlines() if any(c in line for c in CHATTER)] == []
    report = json.loads((work / "dataset/ingest_report.json").read_text())
    assert report["found"] == report["ingested"] == 24
    assert sum(report["by_split"].values()) == 24
