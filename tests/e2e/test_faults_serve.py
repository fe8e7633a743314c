"""A Classifier replica SIGKILLed under load: no request fails, and Serve restores the replica count.

16 clients post X-rays for ~25 s to the cxr app (`serve deploy` of serve/config.yaml, two Classifier
replicas) on a real `ray start` cluster; a Classifier replica's process is SIGKILLed in the middle.
Serve's router re-sends what the dead replica had not accepted; what it was working on fails with
ActorDiedError, which the ingress asks again (a prediction is idempotent): without that retry those
requests answered 503. Slow: `pytest -m faults -rP` (-rP prints the measured figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cxrcore.data.transforms import scale_to_uint8
from cxrcore.registry import ModelRegistry
from tests.e2e.conftest import RayCluster, deploy_shipped_config, wait_until
from tests.e2e.uploads import chest, png_bytes, write_checkpoint
from tests.http_client import HTTP

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.faults]
APP = "cxr"
REPLICAS = 2
CLIENTS = 16
# A full-size CNN-LSTM (224 px, untrained): a batch takes the replica a while, so the replicas, not the
# HTTP path, are what the clients wait for, and the kill catches requests in the middle of a batch.
GOOD_PNG = png_bytes(scale_to_uint8(chest(0)))
# Two classifier replicas, neither added nor removed by autoscaling: the count the kill must come back to.
ARGS: dict[str, Any] = {
    "model": "cnn_lstm",
    "num_cpus": 0.25,
    "min_replicas": REPLICAS,
    "max_replicas": REPLICAS,
    "max_batch_size": 8,
    "max_ongoing_requests": 8,
    "max_queued_requests": 2 * CLIENTS,  # one replica alone queues every client: no 503 `overloaded`
}


@dataclass
class App:
    url: str
    cluster: RayCluster

    def details(self) -> dict[str, Any]:
        """The app as `serve status` shows it (the dashboard's Serve REST API)."""
        response = HTTP.get(
            f"{self.cluster.address}/api/serve/applications/",
            headers={"Authorization": f"Bearer {self.cluster.token}"},
            timeout=10,
        )
        response.raise_for_status()
        app: dict[str, Any] = response.json()["applications"].get(APP, {})
        return app

    def replicas(self, deployment: str) -> list[dict[str, Any]]:
        """The deployment's RUNNING replicas (id, pid, log file...)."""
        found = self.details()["deployments"][deployment]["replicas"]
        return [replica for replica in found if replica["state"] == "RUNNING"]


def replica_log(replica: dict[str, Any]) -> str | None:
    """A replica's Serve log, found through the file descriptor its process holds (the cluster runs on
    this machine; the State API's log endpoint here answered 500 "Agent for node id ... doesn't exist"
    under load). None when the replica is gone."""
    fds = Path(f"/proc/{replica['pid']}/fd")
    try:
        for fd in fds.iterdir():
            target = os.readlink(fd)
            if target.endswith(replica["log_file_path"]):
                return Path(target).read_text(errors="replace")
    except OSError:
        pass
    return None


@pytest.fixture(scope="module")
def app(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    models = tmp_path_factory.mktemp("models")
    ModelRegistry(models / "registry").register(write_checkpoint(models / "cnn_lstm", "cnn_lstm", 5))
    port, _ = deploy_shipped_config(
        ray_cluster, tmp_path_factory.mktemp("serve"), {"registry": str(models / "registry"), **ARGS}
    )
    served = App(url=f"http://127.0.0.1:{port}", cluster=ray_cluster)
    try:
        wait_until(
            lambda: served.details().get("status") == "RUNNING" and len(served.replicas("Classifier")) == 2,
            timeout=240,
            what="the cxr app RUNNING with 2 classifier replicas",
        )
        yield served
    finally:
        HTTP.delete(
            f"{ray_cluster.address}/api/serve/applications/",
            headers={"Authorization": f"Bearer {ray_cluster.token}"},
            timeout=60,
        )


@dataclass
class Load:
    """`clients` concurrent clients posting one X-ray in a loop (in a thread of their own) until stopped."""

    url: str
    clients: int = CLIENTS
    results: list[tuple[float, float, int, str]] = field(default_factory=list)
    """(sent, answered) on time.monotonic(), status (0: no HTTP answer), error body."""
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        asyncio.run(self._clients())

    async def _clients(self) -> None:
        limits = httpx.Limits(max_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                response = await client.post(
                    "/v1/predict", content=GOOD_PNG, headers={"content-type": "image/png"}
                )
                status, text = response.status_code, "" if response.status_code == 200 else response.text
            except httpx.HTTPError as exc:
                status, text = 0, repr(exc)
            self.results.append((sent, time.monotonic(), status, text))

    def answered_since(self, moment: float) -> int:
        return sum(1 for sent, _, status, _ in self.results if sent > moment and status == 200)

    @contextlib.contextmanager
    def running(self) -> Iterator[float]:
        """The clients at work in a thread of their own for the `with` block; yields when they started."""
        thread = threading.Thread(target=self.run, daemon=True)
        started = time.monotonic()
        thread.start()
        try:
            yield started
        finally:
            self.stop.set()
            thread.join(timeout=60)
        assert not thread.is_alive()

    def wait_answers(self, count: int, since: float, not_before: float, what: str) -> None:
        """Poll until `count` requests sent after `since` were answered and time.monotonic() is past
        `not_before`."""
        wait_until(
            lambda: time.monotonic() > not_before and self.answered_since(since) >= count,
            timeout=120,
            what=what,
            interval=0.1,
        )


def percentiles(results: list[tuple[float, float, int, str]]) -> str:
    latencies = [(answered - sent) * 1000 for sent, answered, _, _ in results]
    if not latencies:
        return "none"
    p50, p99 = np.percentile(latencies, [50, 99])
    return f"n={len(latencies)} p50 {p50:.0f} ms p99 {p99:.0f} ms"


@pytest.mark.timeout(420)
def test_a_classifier_replica_killed_under_load_fails_no_request(app: App) -> None:
    before = app.replicas("Classifier")
    assert len(before) == REPLICAS
    victim = before[0]
    load = Load(app.url)
    with load.running() as started:
        # The kill lands once the load is steady: 8 s in and at least 100 answers.
        load.wait_answers(100, since=started, not_before=started + 8, what="100 answers under load")
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        recovered = wait_until(
            lambda: (
                len(running := app.replicas("Classifier")) == REPLICAS
                and victim["replica_id"] not in {r["replica_id"] for r in running}
                and app.details()["status"] == "RUNNING"
                and running
            ),
            timeout=90,
            what=f"{REPLICAS} running classifier replicas again",
        )
        recovered_s = time.monotonic() - killed_at
        # The load goes on after the recovery: 25 s in all, and 100 more answers.
        recovered_at = time.monotonic()
        load.wait_answers(
            100, since=recovered_at, not_before=started + 25, what="100 answers after the recovery"
        )
    results = list(load.results)
    load_s = max(answered for _, answered, _, _ in results) - started
    failed = [
        (round(sent - killed_at, 2), status, text[:200]) for sent, _, status, text in results if status != 200
    ]
    assert not failed, failed[:10]
    with pytest.raises(ProcessLookupError):
        os.kill(victim["pid"], 0)
    new_pids = {replica["pid"] for replica in recovered} - {replica["pid"] for replica in before}
    assert len(new_pids) == 1
    # A figure, not a check: the kill may land between batches and catch no request at all.
    logs = [replica_log(replica) for replica in app.replicas("Api")]
    retried = "unknown" if None in logs else sum(log.count("a replica died") for log in logs if log)
    window = [r for r in results if killed_at <= r[0] <= killed_at + recovered_s]
    print(
        f"FIGURE serve-replica-kill: {CLIENTS} clients, {load_s:.0f} s, "
        f"{len(results)} requests, {len(failed)} failed; SIGKILL of Classifier replica pid {victim['pid']}: "
        f"{retried} retries by the ingress, {REPLICAS} replicas RUNNING again after "
        f"{recovered_s:.1f} s; latency before {percentiles([r for r in results if r[1] < killed_at])}, "
        f"kill to recovery {percentiles(window)}, "
        f"after {percentiles([r for r in results if r[0] > killed_at + recovered_s])}"
    )
