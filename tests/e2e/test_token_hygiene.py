"""`cxr` with a known Ray auth token: the token is never printed or logged, and the dashboard (and job
API) that `cxr` starts answers only with it, on loopback only."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from cxrcore.data.synthetic import write_synthetic_dataset
from tests.e2e.conftest import BIN, wait_until
from tests.processes import command_line, group_of, listening, wait_until_gone

pytestmark = pytest.mark.e2e


def test_cxr_never_shows_the_token_and_its_dashboard_needs_it_on_loopback(scratch: Path) -> None:
    write_synthetic_dataset(scratch / "raw", per_class=2, seed=3, image_size=96, mask_size=96)
    token = uuid.uuid4().hex
    ray_dir, home = scratch / "ray", scratch / "home"
    ray_dir.mkdir()
    home.mkdir()
    env = {
        **os.environ,
        "RAY_ADDRESS": "",  # start a local cluster of its own
        "RAY_TMPDIR": str(ray_dir),
        "HOME": str(home),  # keep ~/.ray/auth_token out of it
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for name in ("RAY_DATA_LOGGING_CONFIG", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)  # the defaults a user has
    log = scratch / "output.txt"
    command = [str(BIN / "cxr"), "-v", "data", "ingest", str(scratch / "raw"), str(scratch / "out"),
               "--size", "32"]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = wait_until(
            lambda: _dashboard_url(log, process),
            timeout=180,
            what="`cxr` to print its dashboard",
            interval=0.05,
        )
        # Pause the driver (its Ray keeps running) so the run cannot end while we look at it.
        os.kill(process.pid, signal.SIGSTOP)
        try:
            without = wait_until(lambda: httpx.get(f"{url}/api/version", timeout=2), 30, "the dashboard")
            headers = {"Authorization": f"Bearer {token}"}
            with_token = httpx.get(f"{url}/api/version", headers=headers, timeout=5)
            group = group_of(process.pid)
            command_lines = [command_line(pid) for pid in group]
            sockets = listening(group)
        finally:
            os.kill(process.pid, signal.SIGCONT)
        assert process.wait(timeout=180) == 0, log.read_text().replace(token, "<the token>")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert wait_until_gone(str(ray_dir)) == []  # the run's Ray stopped with it

    assert (without.status_code, with_token.status_code) == (401, 200)
    port = int(url.rsplit(":", 1)[1])
    assert sockets.get(port) == "127.0.0.1", sockets  # the dashboard and job API: loopback only
    # Where the token shows up, never the token itself: a failure must not print it either.
    assert len(group) > 5
    assert [line.split()[0] for line in command_lines if token in line] == []  # `ps` shows no token
    output = log.read_bytes()
    assert b"ingested 8 of 8 images" in output
    assert b"Starting execution of Dataset" in output  # -v keeps Ray's own console lines
    printed = token.encode() in output
    assert not printed, "cxr printed the token"
    files = [p for p in ray_dir.rglob("*") if p.is_file()]
    assert len(files) > 10  # the session's logs: gcs, raylet, dashboard, workers, Ray Data
    assert [str(p) for p in files if token.encode() in p.read_bytes()] == []
    assert not (home / ".ray").exists()  # a token from the environment is not saved anywhere


def _dashboard_url(log: Path, process: subprocess.Popen[bytes]) -> str | None:
    if process.poll() is not None:
        pytest.fail(f"`cxr` exited ({process.returncode}) before starting Ray:\n{log.read_text()}")
    match = re.search(r"^Ray dashboard: (http://\S+)$", log.read_text(errors="replace"), re.MULTILINE)
    return match.group(1) if match else None
