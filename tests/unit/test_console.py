"""What a quiet `cxr` command prints of the lines Ray forwards to its driver (cxrcore/console.py)."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest

from cxrcore.console import filter_routine_ray_lines, quiet_ray_data_console

WORKER_POOL = (
    "WARNING: 14 PYTHON worker processes have been started on node: bbbce99b with address: 192.0.2.2, "
    "which is 7x the maximum expected startup concurrency (2). This could be a result of using a large "
    "number of actors, tasks blocked in ray.get() calls, or tasks with fractional CPU requests"
)
SERVE_SHUTDOWN = (
    "Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task will "
    "be retried. Error: The actor is dead because it was killed by `ray.kill`."
)
HANDLE_AT_SHUTDOWN = (
    "Task ServeController.listen_for_change failed. There are infinite retries remaining, so the task will "
    "be retried. Error: The actor is dead because it was killed by `ray.kill`."
)
CLEANER = (
    "Detected that the Ray Train controller actor (6dc20ccb099d9fd4e7e4d58e01000000) is dead. Cleaning up "
    "placement group = [PlacementGroupID(5d7714eda6bda241172094e8757a01000000)] created by this run."
)
WATCHER = (
    "[2026-12-02 03:57:20,792 E 17904 17981] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: '0ac6f9c03c33d0628fd2c7d002000000' has constructor arguments in the "
    "object store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, "
    "the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details."
)
SERVE_MODE = [
    "INFO 2026-12-01 05:37:30,974 serve 21011 -- Throughput optimized Ray Serve enabled with the following "
    "configurations:",
    "  • Direct ingress enabled",
    "  • gRPC communication enabled",
    "",
]


@pytest.fixture
def printed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[dict[str, Any], bool]]:
    """What reaches Ray's own printer once the filter wraps it (Ray's printer replaced by a recorder)."""
    import ray._private.worker as ray_worker

    calls: list[tuple[dict[str, Any], bool]] = []
    monkeypatch.setattr(
        ray_worker, "print_to_stdstream", lambda data, ignore_prefix: calls.append((data, ignore_prefix))
    )
    filter_routine_ray_lines()
    filter_routine_ray_lines()  # a second driver start in the same process wraps nothing twice
    return calls


DEPRECATED_OPTION = [
    "/venv/lib/python3.11/site-packages/ray/data/_internal/execution/interfaces/execution_options.py:436: "
    "RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated and will be removed after "
    "January 2027. Use `ExecutionOptions.label_selector` to constrain Ray Data work to labeled nodes.",
    "  self.exclude_resources = exclude_resources",
]


def _forward(lines: list[str], **source: Any) -> None:
    import ray._private.worker as ray_worker

    ray_worker.print_to_stdstream(
        {"lines": lines, "ip": "192.0.2.2", "is_err": False, **source}, ignore_prefix=False
    )


def test_routine_notices_are_dropped_and_everything_else_is_printed(
    printed: list[tuple[dict[str, Any], bool]],
) -> None:
    _forward([WORKER_POOL], pid="raylet")
    _forward([SERVE_SHUTDOWN], pid="raylet")
    _forward([HANDLE_AT_SHUTDOWN], pid="raylet")
    _forward([CLEANER], pid=19382, actor_name="PlacementGroupCleaner")
    _forward([WATCHER], pid=17904, actor_name="TrainController")
    _forward(DEPRECATED_OPTION, pid=18509, actor_name="TrainController")
    _forward(SERVE_MODE, pid=21011, actor_name="ServeController")
    assert printed == []

    epoch = "cnn_lstm (trial f1625_00000) epoch 1/8: train loss 1.287 acc 0.354 | val loss 0.980"
    oom = "Task RayTrainWorker.run failed. Error: the worker was killed: out of memory"
    serve_warning = (
        "WARNING 2026-12-01 05:37:31 serve 21011 -- Deployment 'Classifier' has 1 replica unhealthy"
    )
    _forward([CLEANER, epoch], pid=19275, actor_name="TrainController")  # the same words, another process
    _forward([oom], pid="raylet")
    _forward([*SERVE_MODE, serve_warning], pid=21011, actor_name="ServeController")
    other_actor = WATCHER.replace("PreemptionWatcher", "MyActor")  # the same notice about another actor
    _forward([other_actor], pid=17904, actor_name="TrainController")
    assert [data["lines"] for data, _ in printed] == [[CLEANER, epoch], [oom], [serve_warning], [other_actor]]
    assert printed[0][0]["actor_name"] == "TrainController" and printed[0][1] is False


@pytest.mark.parametrize("quiet", [True, False])
def test_init_ray_installs_the_filter_before_ray_init_only_when_quiet(
    quiet: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet cxr command filters from its first line on; `cxr -v` keeps everything Ray prints."""
    import ray
    import ray._private.worker as ray_worker

    from cxrcore import runtime
    from cxrcore.console import quiet_ray_console
    from cxrcore.runtime import init_ray

    def ray_print(data: dict[str, Any], ignore_prefix: bool) -> None: ...

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_print)
    bound: list[Any] = []  # the printer ray.init would bind for the workers' logs
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **_: bound.append(ray_worker.print_to_stdstream))
    monkeypatch.setattr(ray_worker, "get_dashboard_url", lambda: "127.0.0.1:8265")
    monkeypatch.setattr(runtime, "_check_reachable", lambda address, source: None)  # as if it answered
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)  # not quiet until quiet_ray_console
    if quiet:
        with quiet_ray_console():
            init_ray("127.0.0.1:6379")
    else:
        init_ray("127.0.0.1:6379")
    assert len(bound) == 1 and (bound[0] is not ray_print) == quiet


def test_a_worker_importing_another_copy_of_cxr_is_quiet_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's setting names its own copy of cxrcore; a Ray worker run from a source checkout imports
    the checkout's (Ray puts the driver's directory on the workers' path), and is quiet all the same."""
    from cxrcore.console import RAY_DATA_LOGGING, is_quiet

    monkeypatch.setenv("RAY_DATA_LOGGING_CONFIG", "/elsewhere/site-packages/cxrcore/ray_data_logging.yaml")
    assert str(RAY_DATA_LOGGING.parent.parent) != "/elsewhere/site-packages" and is_quiet()
    monkeypatch.setenv("RAY_DATA_LOGGING_CONFIG", "/home/me/my_ray_data_logging.yaml")  # the user's own
    assert not is_quiet()
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG")
    assert not is_quiet()


def test_a_process_started_with_ray_datas_defaults_gets_a_quiet_console_and_keeps_its_log_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker or Tune trial on a cluster joined by address: Ray Data's console handler as Ray sets it
    (INFO, no notice filter) is made quiet, its file handler keeps every line, and a second call (the trial,
    then its Train worker in one process) adds nothing."""
    console, log_file = io.StringIO(), tmp_path / "ray-data.log"
    handlers = [logging.StreamHandler(console), logging.FileHandler(log_file)]
    for handler in handlers:
        handler.setLevel(logging.INFO)
    logger = logging.getLogger("ray.data")
    monkeypatch.setattr(logger, "handlers", handlers)
    monkeypatch.setattr(logger, "level", logging.DEBUG)
    monkeypatch.setattr(logger, "propagate", False)

    quiet_ray_data_console()
    quiet_ray_data_console()
    notice = (
        "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars`."
    )
    logging.getLogger("ray.data._internal.progress").warning(notice)
    logging.getLogger("ray.data").info("Starting execution of Dataset dataset_1")
    logging.getLogger("ray.data").warning("a block was too large")
    handlers[1].flush()

    assert console.getvalue() == "a block was too large\n"
    assert log_file.read_text().splitlines() == [
        notice,
        "Starting execution of Dataset dataset_1",
        "a block was too large",
    ]
    assert len(handlers[0].filters) == 1 and handlers[1].filters == []


def test_a_quiet_tune_trial_builds_its_datasets_without_progress_bars(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A trial's Ray Data context travels with the datasets it builds to its Train workers: on a joined
    cluster it was made with bars on, and each worker drew one per dataset per epoch."""
    import ray.data

    from cxrcore.console import quiet_tune_trial

    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "enable_progress_bars", True)
    monkeypatch.setattr(logging.getLogger("ray.data"), "handlers", [])
    quiet_tune_trial()
    assert context.enable_progress_bars is False


def test_ray_prints_worker_lines_without_colour_where_the_console_takes_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`cxr train > log` wrote "^[[36m(TrainController pid=...)^[[0m" into the file, NO_COLOR or not."""
    import io

    from cxrcore.console import plain_prefix

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr("sys.stdout", Terminal())
    assert plain_prefix() == {}
    monkeypatch.setenv("NO_COLOR", "1")
    assert plain_prefix() == {"RAY_COLOR_PREFIX": "0"}
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setattr("sys.stdout", io.StringIO())  # a file or a pipe
    assert plain_prefix() == {"RAY_COLOR_PREFIX": "0"}
