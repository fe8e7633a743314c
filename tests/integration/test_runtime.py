"""The local cluster `cxr` starts: its workers know their own State API when other clusters run beside it."""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]
HEALTH_CHECK = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def test_workers_find_their_own_clusters_state_api_and_the_driver_environment_is_untouched() -> None:
    import ray
    from ray._private.worker import get_dashboard_url

    @ray.remote(num_cpus=0)
    def worker_environment() -> tuple[str | None, ...]:
        names = ("RAY_API_SERVER_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", HEALTH_CHECK)
        return tuple(os.environ.get(name) for name in names)

    api, preemption_watcher, health_check = ray.get(worker_environment.remote())
    # Ray Train's PlacementGroupCleaner (a detached actor) reads this to find the State API; without it, a
    # second cluster on the machine made its lookup fail and every stopped Tune trial kept its CPUs.
    assert api == f"http://{get_dashboard_url()}"
    assert preemption_watcher == "0"  # one process less per training run: one machine has no drains
    # cxr polls Train's workers every 0.5 s on its own cluster, unless set: tests/conftest.py sets 0.2.
    assert health_check == os.environ[HEALTH_CHECK]
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # subprocesses the driver starts may join another
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ


def test_a_serve_app_whose_replica_fits_nowhere_fails_in_bounded_time_naming_the_deployment() -> None:
    from ray import serve

    from serve.server import run_app, shutdown_serve
    from tests.e2e.conftest import free_port

    # The session cluster has 4 CPUs. No grace period: Serve would wait 20 s for the replica that never
    # started before stopping it at shutdown. Behind an ingress, as the app's model deployments are: Serve
    # gives an ingress at least its drain period plus 5 s to stop, even one that never started.
    @serve.deployment(ray_actor_options={"num_cpus": 64}, graceful_shutdown_timeout_s=0)
    class Oversized:
        def predict(self) -> str:
            return "never"

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Front:
        def __init__(self, model: object) -> None:
            self.model = model

        def __call__(self, request: object) -> str:
            return "up"

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        with pytest.raises(RuntimeError, match=r"is not running after 3 s: .*Oversized: UPDATING"):
            run_app(Front.bind(Oversized.bind()), timeout_s=3)
    finally:
        shutdown_serve()


def _reports(config: dict) -> None:
    """A trainable of three reports; with `interrupt`, it sends the driver a SIGINT after its first, as
    Ctrl-C would mid-experiment (from the trial: the driver is then inside `Tuner.fit` for sure)."""
    import signal
    import threading

    from ray import tune

    for step in range(3):
        tune.report({"step": step})
        if config["interrupt"] and step == 0:
            os.kill(config["driver"], signal.SIGINT)
            threading.Event().wait(60)  # no more reports: Tune stops the trial


def test_ctrl_c_during_a_tune_experiment_is_told_from_its_end(tmp_path: object) -> None:
    """Ctrl-C leaves Tune's results looking like finished trials': `cxr tune` must not register them. (An
    experiment that ends is told apart by every `cxr tune` of test_tune, which would raise Interrupted.)"""
    import signal

    from ray import tune

    from cxrcore.tune import _tune_was_interrupted

    before = signal.getsignal(signal.SIGINT)
    space = {"interrupt": True, "driver": os.getpid()}
    run = tune.RunConfig(storage_path=str(tmp_path), name="interrupt", verbose=0)
    results = tune.Tuner(_reports, param_space=space, run_config=run).fit()
    assert _tune_was_interrupted(before)
    assert results[0].metrics["step"] == 0  # TERMINATED at its first report, like a trial ASHA stopped
    signal.signal(signal.SIGINT, before)
