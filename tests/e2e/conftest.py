"""A real Ray cluster started with `ray start --head` (token auth on), shared by the e2e tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from cxrcore.runtime import local_serve_environment
from tests.http_client import HTTP

BIN = Path(sys.executable).parent
REPO = Path(__file__).parents[2]


CHATTER = (
    "Reporting training result",  # Ray Train: every epoch's metrics dictionary, from every worker
    "Starting execution of Dataset",  # Ray Data: each dataset's start and execution plan
    "Execution plan of Dataset",
    "Progress bars disabled",
    "split(",  # Ray Data: a progress bar per Train worker per epoch
    "Running Dataset",  # the same bar in Ray 2.60
    "has constructor arguments",  # Ray core, once per Train run on a cluster (console.ROUTINE_RAY_LINES)
    "Checkpoint successfully created",  # Ray Train INFO
    "Cleaning up placement group",  # Ray Train's cleaner after each run (console.ROUTINE_RAY_LINES)
    "PYTHON worker processes have been started",  # the raylet (console.ROUTINE_RAY_LINES)
)
"""Console lines a quiet `cxr` (no -v) must leave to Ray's log files (cxrcore/console.py)."""


@dataclass(frozen=True)
class RayCluster:
    address: str  # the dashboard / job API address, http://127.0.0.1:PORT
    env: dict[str, str]  # what a client needs: RAY_AUTH_MODE=token and the token
    token: str
    metrics_url: str  # the head node's Prometheus endpoint, where cxr's metrics are exported
    gcs_address: str  # 127.0.0.1:PORT, what `ray start --address` and `cxr --address` join
    temp_dir: Path  # the head node's session files and logs


@dataclass(frozen=True)
class ObjectStorage:
    """A local S3 server (moto) on a free loopback port, and the standard AWS variables that reach it."""

    env: dict[str, str]

    def foreign_settings(self) -> list[str]:
        """The other AWS variables of this process's environment (a profile, another endpoint), which the
        commands and the cluster's node must not get."""
        return [name for name in os.environ if name.startswith("AWS_") and name not in self.env]


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


def ray_env(token: str) -> dict[str, str]:
    """The environment of a Ray node and of its clients: token auth with `token`, no usage stats, and
    Serve as cxr runs it (`local_serve_environment`: the high-throughput mode the KubeRay manifests set
    too; what the test's own environment sets wins)."""
    env = {
        **local_serve_environment(),
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def ray_start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`ray start --block ARGS`: --block keeps it in the foreground, and a session of its own lets a test
    stop exactly this node (`ray stop` would also kill other Ray instances on the machine)."""
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def ray_stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a node `ray_start` started: SIGTERM reaches every Ray process in its group; once they are gone
    (within 1 s on a node that only trained), or after 2 s, SIGKILL ends the rest and `ray start --block`,
    which ignores it. On a node that served, the GCS, raylet, autoscaler monitor and runtime-env agent
    were all still there 5 s after the SIGTERM; the node's folder is deleted next, and nothing of it is
    checked after the stop.

    Processes the node started outside its group go too: Serve's HAProxy, a child of a worker that is
    not in the node's group, would otherwise outlive it as an orphan on the served port."""
    descendants = _descendants(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and set(_process_group(process.pid)) - {process.pid}:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in descendants:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def _stat(entry: Path) -> list[str]:
    """A /proc/PID/stat's fields after the command name: state, parent pid, process group, ..."""
    return (entry / "stat").read_text().rpartition(")")[2].split()


def _descendants(root: int) -> list[int]:
    """Every live process under `root` (children, their children, ...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(entry.name)] = int(_stat(entry)[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _process_group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _, group = _stat(entry)[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


@contextlib.contextmanager
def head_node(
    num_cpus: int = 4,
    node_env: dict[str, str] | None = None,
    temp_dir: Path | None = None,
    unset: Collection[str] = (),
) -> Iterator[RayCluster]:
    """A head node of its own (`ray start --head`, token auth with a fresh token, dashboard on loopback),
    stopped and its temp dir removed on exit. `node_env`: more environment for the node's processes (what a
    cluster's nodes are given, such as storage credentials); `unset`: variables of this process's
    environment they do not get; `temp_dir`: its session files there."""
    token = uuid.uuid4().hex
    dashboard_port, metrics_port, gcs_port = free_port(), free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard_port}"
    # Where the cluster's own processes find its State API (Ray Train's placement-group cleaner): else they
    # look for running clusters, and find more than one when another Ray runs on this machine.
    env = {**ray_env(token), **(node_env or {}), "RAY_API_SERVER_ADDRESS": address}
    env = {name: value for name, value in env.items() if name not in unset}
    # A short temp dir: Ray's Unix socket paths must stay under ~107 bytes.
    temp_dir = temp_dir or Path(tempfile.mkdtemp(prefix="cxr-e2e-", dir="/tmp"))
    process = ray_start(
        [
            "--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
            "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", f"--metrics-export-port={metrics_port}",
            f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
        ],
        env,
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"}
    try:
        wait_until(
            lambda: (
                process.poll() is None
                and HTTP.get(f"{address}/api/version", headers=headers, timeout=2).status_code == 200
            ),
            timeout=90,
            what="the Ray dashboard to answer",
        )
        yield RayCluster(
            address=address,
            env=env,
            token=token,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            gcs_address=f"127.0.0.1:{gcs_port}",
            temp_dir=temp_dir,
        )
    finally:
        ray_stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


CONSOLE_SETTINGS = ("RAY_DATA_LOGGING_CONFIG", "RAY_DATA_DISABLE_PROGRESS_BARS")
"""What a `cxr` command sets in its own environment to quiet Ray's console (cxrcore/console.py). The
integration tests' in-process commands leave them in this process's environment; a user's shell has none."""


@pytest.fixture(scope="package")
def object_storage() -> Iterator[ObjectStorage | None]:
    """A moto S3 server for the package's tests; None without moto[server] (the dev extra)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield ObjectStorage(
            env={
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )
    finally:
        server.stop()


@pytest.fixture(scope="package")
def ray_cluster(
    object_storage: ObjectStorage | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RayCluster]:
    """The e2e tests' cluster. Its node gets what a cluster's nodes are given: credentials for the object
    storage (the S3 server, through the standard AWS variables pyarrow honours, and no other AWS setting of
    this machine) and a HOME of its own; and not the console settings a `cxr` command makes for itself
    (CONSOLE_SETTINGS), so that the commands run on it as they would from a user's shell."""
    storage_env = object_storage.env if object_storage else {}
    unset = [*CONSOLE_SETTINGS, *(object_storage.foreign_settings() if object_storage else ())]
    home = tmp_path_factory.mktemp("home")
    with head_node(node_env={**storage_env, "HOME": str(home)}, unset=unset) as cluster:
        yield cluster


def deploy_shipped_config(
    cluster: RayCluster,
    folder: Path,
    args: dict[str, object],
    runtime_env: dict[str, object] | None = None,
    **changes: object,
) -> tuple[int, dict[str, object]]:
    """serve/config.yaml as shipped, with `args` for its application and a free loopback port, deployed with
    the `serve deploy` CLI as an operator would; returns the port and the config deployed. `changes` set
    keys of the application (`deployments`: per-deployment options) or, where the file has them at its
    top (`proxy_location`), of the whole config."""
    config = yaml.safe_load((REPO / "serve/config.yaml").read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (application,) = config["applications"]
    application["args"] = args
    if runtime_env is not None:
        application["runtime_env"] = runtime_env
    for key, value in changes.items():
        (config if key in config else application)[key] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    deploy = subprocess.run(
        [str(BIN / "serve"), "deploy", str(path), "-a", cluster.address],
        env=cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    return port, config
