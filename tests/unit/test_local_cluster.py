"""The local cluster `init_ray` starts: what it does when its dashboard's port is taken meanwhile."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "error",
    [
        "RuntimeError: Failed to find a valid port for dashboard after 0 retries: {port} in use",
        "ValueError: Failed to bind to 127.0.0.1:{port} because it's already occupied. You can use ...",
    ],
)
def test_a_dashboard_port_taken_as_ray_starts_is_left_for_another(
    monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    """Two `cxr` commands started at once may both find 8265 free; Ray, given a port, tries no other."""
    import ray

    from cxrcore import runtime

    ports: list[int] = []

    def init(logical: int, object_store_memory: int | None, port: int) -> None:
        ports.append(port)
        if len(ports) == 1:
            kind, words = error.split(": ", 1)
            raise {"RuntimeError": RuntimeError, "ValueError": ValueError}[kind](words.format(port=port))

    shutdowns: list[bool] = []
    monkeypatch.setattr(runtime, "_init_local", init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(True))
    runtime._start_local(4, None)
    assert len(ports) == 2 and ports[0] != ports[1] and shutdowns == [True]

    def broken(logical: int, object_store_memory: int | None, port: int) -> None:
        raise RuntimeError("the raylet died")

    monkeypatch.setattr(runtime, "_init_local", broken)
    with pytest.raises(RuntimeError, match="raylet died"):  # anything else is not retried
        runtime._start_local(4, None)
    assert shutdowns == [True]


def test_the_local_cluster_is_its_own_not_the_one_ray_last_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an address, Ray joins the cluster in /tmp/ray/ray_current_cluster: a `ray start` running
    beside cxr, or one killed long ago whose record stayed, and then refuses num_cpus. Every command that
    starts Ray failed with "When connecting to an existing cluster, num_cpus ... must not be provided"."""
    import ray

    from cxrcore import runtime

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    runtime._init_local(4, None, 8265)
    assert calls and calls[0]["address"] == "local" and calls[0]["num_cpus"] == 4


def test_minimal_ray_starts_without_its_dashboard_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`pip install ray` without [default] has no dashboard, and `include_dashboard=True` refuses to start
    ("Cannot include dashboard with missing packages"): a bare GPU machine's cluster had no way to start.
    Checked for real on one, with Ray's dashboard packages missing (README, GPU run)."""
    import ray
    import ray._private.utils as ray_utils

    from cxrcore import runtime

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    runtime._init_local(4, None, 8265)
    assert calls[-1]["include_dashboard"] is True  # cxr's own install has it
    monkeypatch.setattr(
        ray_utils, "get_dashboard_dependency_error", lambda: ImportError("No module named 'aiohttp_cors'")
    )
    with caplog.at_level("WARNING", logger="cxrcore.runtime"):
        runtime._init_local(4, None, 8265)
    assert calls[-1]["include_dashboard"] is False
    assert "dashboard is not installed (No module named 'aiohttp_cors')" in caplog.text
    assert "ray[default]" in caplog.text


def test_joining_a_cluster_fails_in_one_line_that_says_what_to_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the cluster's token `cxr train --address` ended in a traceback after 20 s of Ray's
    InvalidAuthToken lines; the dashboard's http:// address was blamed on RAY_ADDRESS. Checked for real
    against a `RAY_AUTH_MODE=token ray start --head` (session 40's bench log)."""
    import ray
    from ray.exceptions import AuthenticationError

    from cxrcore import runtime
    from cxrcore.config import ConfigError

    def refused(**_: object) -> None:
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setattr(runtime, "_check_reachable", lambda address, source: None)  # as if it answered
    with pytest.raises(
        ConfigError, match=r"^--address 10.0.0.5:6379: Failed to connect .*RAY_AUTH_MODE=token"
    ):
        runtime.init_ray("10.0.0.5:6379")
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")
    with pytest.raises(ConfigError, match=r"^RAY_ADDRESS http://10.0.0.5:8265: that is the dashboard's"):
        runtime.init_ray()

    def unauthenticated(**_: object) -> None:
        raise AuthenticationError("no token found")

    monkeypatch.setattr(ray, "init", unauthenticated)
    with pytest.raises(ConfigError, match=r"^--address h:6379: .*no token found"):
        runtime.init_ray("h:6379")

    # `cxr serve` on a joined cluster keeps its Serve actors' INFO and access lines off its console (52 of a
    # review's 57 lines); a command that runs jobs keeps them, as its trials' epoch lines come that way.
    joined: list[dict[str, object]] = []

    def record(**kwargs: object) -> None:
        joined.append(kwargs)
        raise ConnectionError("recorded")

    monkeypatch.setattr(ray, "init", record)
    for logs in (False, True):
        with pytest.raises(ConfigError):
            runtime.init_ray("h:6379", cluster_logs=logs)
    assert [call["log_to_driver"] for call in joined] == [False, True]


def test_a_sigterm_while_ray_starts_stops_the_command_as_one_afterwards_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ray.init's SIGTERM handler is `sys.exit(15)`: `cxr train` killed as Ray started ended with status
    15 and not a word, where one killed a moment later says it was interrupted and exits 143."""
    from cxrcore import runtime
    from cxrcore.cli import main
    from tests.conftest import write_png, xray

    def killed(logical: int, object_store_memory: int | None) -> None:
        raise SystemExit(15)  # what Ray's handler raises in the main thread

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime, "_start_local", killed)
    raw = tmp_path / "raw"
    for cls in ("COVID", "Normal"):
        write_png(raw / cls / f"{cls}-1.png", xray(1, 64))
    assert main(["data", "ingest", str(raw), str(raw.parent / "ds")]) == 143
    assert "cxr: interrupted: stopped by SIGTERM while Ray was starting" in capsys.readouterr().err
    assert not (raw.parent / "ds").exists()


def test_the_token_ray_writes_for_a_local_cluster_is_kept_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray 2.60 writes ~/.ray/auth_token with the umask's -rw-r--r--: every user of the machine could read
    it and submit jobs, as this user, to the local cluster. The dashboard line says where the token is."""
    from cxrcore import runtime

    token = tmp_path / "auth_token"
    token.write_text("0" * 64)
    token.chmod(0o644)
    runtime.keep_token_private(token)
    assert token.stat().st_mode & 0o777 == 0o600
    runtime.keep_token_private(tmp_path / "none")  # token auth off: no file, nothing to do
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert runtime.dashboard_text("http://127.0.0.1:8265").endswith("`ray get-auth-token` prints it)")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert runtime.dashboard_text("http://127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert runtime.dashboard_text(None) == "not available"


def test_a_users_module_named_like_cxrs_own_is_refused_before_ray_starts(tmp_path: Path) -> None:
    """Ray puts the driver's folder first on its workers' import path: a user's serve.py beside their data
    made every Serve replica of an installed cxr fail (`No module named 'serve.deployments'`)."""
    import shutil

    from cxrcore.config import ConfigError
    from cxrcore.runtime import check_no_shadowing_modules

    both = ("cxrcore", "serve")
    repo = Path(__file__).resolve().parents[2]
    check_no_shadowing_modules(both, repo)  # cxr's checkout is its own
    check_no_shadowing_modules(both, tmp_path)
    (tmp_path / "serve").mkdir()
    check_no_shadowing_modules(both, tmp_path)  # a namespace package hides nothing
    shutil.copytree(repo / "serve", tmp_path / "serve", dirs_exist_ok=True)
    check_no_shadowing_modules(both, tmp_path)  # a copy of this cxr (a job's working_dir)
    (tmp_path / "serve" / "app.py").write_text("# an older cxr's, or the user's own")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'serve'} would stand in for cxr's own `serve` "):
        check_no_shadowing_modules(both, tmp_path)
    check_no_shadowing_modules(("cxrcore",), tmp_path)  # an ingest's or a training's workers never import it
    shutil.rmtree(tmp_path / "serve")
    shadow = tmp_path / "cxrcore.py"
    shadow.write_text("")
    with pytest.raises(ConfigError, match=rf"^{shadow} would stand in for cxr's own `cxrcore`"):
        check_no_shadowing_modules(folder=tmp_path)


def test_the_token_a_local_cluster_uses_is_its_users_alone_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray wrote it -rw-r--r--, and another account read it before cxr closed it, then used it for good."""
    from cxrcore.runtime import make_private_token

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    make_private_token(token)
    assert token.stat().st_mode & 0o777 == 0o600 and token.parent.stat().st_mode & 0o777 == 0o700
    first = token.read_text()
    assert len(first) == 64 and int(first, 16) >= 0  # 256 bits, as Ray makes them
    token.chmod(0o644)
    make_private_token(token)  # one already there is kept, and closed
    assert token.read_text() == first and token.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    make_private_token(other := tmp_path / "off" / "auth_token")
    assert not other.exists()


def test_each_users_haproxy_files_are_in_a_folder_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's one /tmp/haproxy-serve for every user: the first to serve owned it, every other user's Serve
    failed, and its admin socket was open to all until cxr closed the folder once Serve was up."""
    import os
    import shutil

    import cxrcore.runtime as runtime
    from cxrcore.runtime import haproxy_folder, haproxy_paths

    monkeypatch.delenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", raising=False)
    monkeypatch.setattr(runtime, "HAPROXY_FOLDER", str(tmp_path / "haproxy-serve-{uid}"))
    monkeypatch.setattr(runtime, "_haproxy_folder_used", None)
    folder = haproxy_folder()
    assert folder == tmp_path / f"haproxy-serve-{os.getuid()}" and folder.stat().st_mode & 0o777 == 0o700
    assert haproxy_folder(create=False) == folder
    paths = haproxy_paths(folder)
    assert all(value.startswith(str(folder)) for value in paths.values())
    assert {"RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"} <= set(paths)
    folder.chmod(0o755)
    monkeypatch.setattr(runtime, "_haproxy_folder_used", None)
    assert haproxy_folder() == folder and folder.stat().st_mode & 0o777 == 0o700  # its own: closed again

    if os.getuid() == 0:  # another account made the folder first (its name is known): a private one instead
        os.chown(folder, 12345, 12345)
        monkeypatch.setattr(runtime, "_haproxy_folder_used", None)
        fallback = haproxy_folder()
        try:
            assert fallback != folder and fallback.name.startswith(f"hsrv{os.getuid()}-")
            assert fallback.stat().st_mode & 0o777 == 0o700 and fallback.stat().st_uid == os.getuid()
            assert len(str(fallback / ("n" * 56) / "admin.sock")) <= 97  # HAProxy's limit for a socket path
        finally:
            shutil.rmtree(fallback)

    shared = tmp_path / "team"  # a folder the user names is used as it is, never closed
    shared.mkdir(mode=0o775)
    shared.chmod(0o775)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", str(shared / "haproxy.cfg"))
    assert haproxy_folder() == shared and shared.stat().st_mode & 0o777 == 0o775


def test_a_lock_file_another_user_made_is_taken_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made 0644 by the first user of a shared folder, it refused every other user for good."""
    import os

    from cxrcore.data import storage

    lock = tmp_path / ".out.lock"
    descriptor, writable = storage.open_lock_file(str(lock))
    os.close(descriptor)
    assert writable and lock.stat().st_mode & 0o777 == 0o666 & ~_umask()
    real_open = os.open

    def not_ours(path: str, flags: int, *mode: int) -> int:
        if path == str(lock) and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *mode)

    monkeypatch.setattr(storage.os, "open", not_ours)
    with storage.exclusive(str(tmp_path / "out"), "an ingest", "another OUT"):  # held, read-only
        pass


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_start_interrupted_stops_what_it_started_and_the_callers_random_stream_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A notebook: Ctrl-C while the first cell started Ray raised KeyboardInterrupt and left the cluster's
    20 processes (GCS, raylet, dashboard, workers) running for the kernel's life, one cluster a try; and
    Ray's start drew from Python's `random`, so a seeded notebook drew other numbers after it."""
    import os
    import random
    import subprocess
    import sys
    import time

    from cxrcore import runtime

    sleeper = "import time; time.sleep(60)"
    # a "raylet" with a "worker" of its own, as Ray's processes are
    raylet = (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); time.sleep(60)"
    )
    started: list[int] = []

    def interrupted(logical: int, object_store_memory: int | None) -> None:
        random.random()  # as Ray's start does
        os.environ["PYTHONBREAKPOINT"] = "ray.util.rpdb._driver_set_trace"
        child = subprocess.Popen([sys.executable, "-c", raylet]).pid
        deadline = time.monotonic() + 30
        while not (below := [p for p, parent in runtime._parents().items() if parent == child]):
            assert time.monotonic() < deadline, "the child's own child never started"
            time.sleep(0.05)
        started.extend([child, *below])
        raise KeyboardInterrupt

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("PYTHONBREAKPOINT", raising=False)
    monkeypatch.setattr(runtime, "_start_local", interrupted)
    random.seed(5)
    expected = random.Random(5).random()
    with pytest.raises(KeyboardInterrupt):
        runtime.init_ray()
    assert random.random() == expected and "PYTHONBREAKPOINT" not in os.environ

    def running(pid: int) -> bool:  # a zombie waits for its (new) parent to reap it: it runs nothing
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    # SIGKILL is delivered asynchronously: the grandchild, killed first, may be a moment from exiting
    deadline = time.monotonic() + 10
    while [pid for pid in started if running(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(started) == 2 and [pid for pid in started if running(pid)] == []
