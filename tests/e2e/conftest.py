"""A real Ray cluster started with `ray start --head` (token auth on), shared by the e2e tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

BIN = Path(sys.executable).parent
REPO = Path(__file__).parents[2]


@dataclass(frozen=True)
class RayCluster:
    address: str  # the dashboard / job API address, http://127.0.0.1:PORT
    env: dict[str, str]  # what a client needs: RAY_AUTH_MODE=token and the token
    token: str
    metrics_url: str  # the head node's Prometheus endpoint, where cxr's metrics are exported


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition, timeout: float, what: str, interval: float = 0.5):  # type: ignore[no-untyped-def]
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except (httpx.HTTPError, OSError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short folder of its own under /tmp (Ray's Unix socket paths must stay under ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="cxr-e2e-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[RayCluster]:
    token = uuid.uuid4().hex
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    dashboard_port, metrics_port = free_port(), free_port()
    # A short temp dir: Ray's Unix socket paths must stay under ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="cxr-e2e-", dir="/tmp")
    command = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}",
        f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", "--num-cpus=4",
        f"--metrics-export-port={metrics_port}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=true",
    ]  # fmt: skip
    # --block keeps `ray start` in the foreground; its own process group lets teardown stop exactly
    # this cluster (`ray stop` would also kill other Ray instances on the machine).
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        wait_until(
            lambda: (
                process.poll() is None
                and httpx.get(f"{address}/api/version", headers=headers, timeout=2).status_code == 200
            ),
            timeout=90,
            what="the Ray dashboard to answer",
        )
        yield RayCluster(
            address=address, env=env, token=token, metrics_url=f"http://127.0.0.1:{metrics_port}/metrics"
        )
    finally:
        # SIGTERM reaches every Ray process in the group; `ray start --block` itself ignores it.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def deploy_shipped_config(
    cluster: RayCluster, folder: Path, args: dict[str, object], runtime_env: dict[str, object] | None = None
) -> tuple[int, dict[str, object]]:
    """serve/config.yaml as shipped, with `args` for its application and a free loopback port, deployed with
    the `serve deploy` CLI as an operator would; returns the port and the config deployed."""
    config = yaml.safe_load((REPO / "serve/config.yaml").read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (application,) = config["applications"]
    application["args"] = args
    if runtime_env is not None:
        application["runtime_env"] = runtime_env
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    deploy = subprocess.run(
        [str(BIN / "serve"), "deploy", str(path), "-a", cluster.address],
        env=cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    return port, config
