"""What Ray prints to the console during a cxr command: warnings, errors and cxr's own lines.

Left at their defaults, Ray Data and Ray Train print a progress bar per Train worker per epoch, each
dataset's execution plan, and every epoch's full metrics dictionary from every worker: hundreds of lines
in which `cxr demo`'s own summary is lost. Everything hidden here still reaches the Ray session's log
files (ray-data.log, ray-train-*.log) and the dashboard. `cxr -v` keeps Ray's defaults; so does any of
these variables set beforehand.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")
"""Ray Data's default logging configuration with the console at WARNING."""

QUIET_ENVIRONMENT = {
    "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING),
    # Tqdm bars, or, where stdout is not a terminal, a progress report logged every few seconds.
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Tune's driver warns when handling a trial's result takes over 0.5 s ("... may be a performance
    # bottleneck. Please consider reporting results less frequently"): on a laptop whose cores train
    # three trials it sometimes does (1.2 s, four lines in `cxr demo`), and trials report once an epoch.
    "TUNE_WARN_THRESHOLD_S": "5",
    # Ray prints a line that another process printed with other numbers only once, the rest as "[repeated
    # 2x across cluster]" seconds later: two trials of one architecture lost every other epoch line.
    "RAY_DEDUP_LOGS": "0",
}
"""Set in a cxr command's process before Ray Data is imported; a local Ray cluster it starts passes them on
to every worker. A cluster joined by address keeps its own environment: there the command's quietness
travels with the run (the training loop's `quiet_console`, each Tune trial's parameters)."""

TRAIN_LOG_LEVEL = "WARNING"
"""Ray Train's console level (ray.train.LoggingConfig) in quiet mode: no resource requests, worker
group start-up or "Checkpoint successfully created" lines."""


ROUTINE_RAY_LINES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # The raylet, each time its worker processes pass another multiple (from 4×) of its startup
    # concurrency, the number of cores: a Tune trial starts about nine (its driver, Train's controller,
    # worker, cleaner and dataset actors), so a comparison on a 2-core laptop passes 4× in its first
    # seconds. Its advice (fewer actors, no fractional CPUs) is about a design that is Ray's own here.
    ("raylet", re.compile(r"WARNING: \d+ PYTHON worker processes have been started on node")),
    # Serve's shutdown: the controller kills itself while its own graceful_shutdown call is in flight.
    ("raylet", re.compile(r"Task ServeController\.graceful_shutdown failed")),
    # ... and the long poll of the handle `cxr serve` drained the ingress with, cut by the same.
    ("raylet", re.compile(r"Task ServeController\.listen_for_change failed")),
    # Ray Train, after every run (each Tune trial): its cleaner removing the run's placement group; a
    # run that failed says so itself.
    ("PlacementGroupCleaner", re.compile(r"Detected that the Ray Train controller actor \S+ is dead")),
    # Ray Train's controller, at each run's start on a cluster (the local one runs no preemption watcher):
    # Ray core's notice that an actor it restarts takes arguments from the object store, about Ray's own
    # design (ray-project/ray#53727), logged at error level.
    (
        "TrainController",
        re.compile(r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments"),
    ),
    # Ray Train's controller, once per run: the dashboard's run record (RAY_TRAIN_ENABLE_STATE_TRACKING,
    # which cxr turns on) reads a Ray Data option Ray itself deprecated; the warning and its source line.
    (
        "TrainController",
        re.compile(
            r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources`|^\s*self\.exclude_resources = "
        ),
    ),
    # Serve's controller, at start, before its logging settings apply: the settings of the throughput
    # mode that cxr turns on (runtime.local_serve_environment), one line each.
    ("ServeController", re.compile(r"Throughput optimized Ray Serve enabled|^\s+• |^\s*$")),
)
"""What a quiet cxr command keeps off its console of the lines Ray forwards to the driver, by the process
they come from: routine notices that ask nothing of the user. They stay in the session's log files."""


def is_routine(data: dict[str, Any], line: str) -> bool:
    """Whether `line`, forwarded by Ray with `data` (its process: "raylet", or an actor's name), is one of
    ROUTINE_RAY_LINES."""
    source = data.get("actor_name") or data.get("pid")
    return any(source == name and pattern.search(line) for name, pattern in ROUTINE_RAY_LINES)


def filter_routine_ray_lines() -> None:
    """Drop ROUTINE_RAY_LINES from what this driver prints of Ray's forwarded output: the raylet's messages
    and the workers' logs. Call before `ray.init`, which binds the printer for the workers' logs.

    Ray has no switch for these (its printer takes every line); the filter wraps that printer, and
    another Ray version without it is left as it is.
    """
    import ray._private.worker as ray_worker

    printer: Callable[..., None] | None = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "routine_lines_dropped", False):
        return

    def print_to_stdstream(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        lines = [line for line in data.get("lines", []) if not is_routine(data, line)]
        if lines:  # whatever else Ray passes goes through as it came
            printer({**data, "lines": lines}, *args, **kwargs)

    print_to_stdstream.routine_lines_dropped = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


class HideProgressNotice(logging.Filter):
    """Drops Ray Data's "Progress bars disabled. To enable, ..." warning, which every process that runs a
    dataset prints once when QUIET_ENVIRONMENT turned the bars off (used in ray_data_logging.yaml)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


class HideStorageErrors(logging.Filter):
    """Drops Ray Data's console records of a full disk, a quota, a file-size limit or a read-only filesystem
    (`runtime.storage_error`), which cxr says in one line naming the folder: an ingest into a full disk
    printed 275 lines, two tracebacks and "Exception occurred in Ray Data or Ray Core internal code ...
    please open an issue on the Ray project". That record carries no exception; Ray Data logs it while
    handling one, which `sys.exc_info` then holds. The records stay in ray-data.log (used in
    ray_data_logging.yaml)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from cxrcore.runtime import storage_error

        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return error is None or storage_error(error) is None


def hide_storage_errors(logger: str) -> None:
    """Keep `logger`'s records of a full disk (HideStorageErrors) off this process's console, once."""
    found = logging.getLogger(logger)
    if not any(isinstance(kept, HideStorageErrors) for kept in found.filters):
        found.addFilter(HideStorageErrors())


def plain_prefix() -> dict[str, str]:
    """RAY_COLOR_PREFIX=0 where the console takes no colour: NO_COLOR set (no-color.org), or output that is
    not a terminal. Ray otherwise prints every worker line's "(TrainController pid=...)" in ANSI colour,
    escape codes and all, into logs and screen readers."""
    if os.environ.get("NO_COLOR") or not sys.stdout.isatty():
        return {"RAY_COLOR_PREFIX": "0"}
    return {}


@contextmanager
def quiet_ray_console() -> Iterator[None]:
    """QUIET_ENVIRONMENT in this process for the duration (values already set are kept), as it was
    afterwards: a process that runs cxr's main in-process, as the tests do, keeps its own environment."""
    from cxrcore.runtime import environment_defaults

    # Tune's TensorBoard logger says at INFO, seven times a trial an epoch, that a metric named after a
    # class with a space ("Viral Pneumonia") is renamed: shown in any notebook that logs at INFO.
    renames = logging.getLogger("tensorboardX.summary")
    level = renames.level
    renames.setLevel(max(level, logging.WARNING))
    try:
        with environment_defaults(**QUIET_ENVIRONMENT, **plain_prefix()):
            yield
    finally:
        renames.setLevel(level)


def is_quiet() -> bool:
    """Whether this process runs under a quiet cxr command: its Ray Data logging configuration is cxr's.

    Compared by the file's place in the package, not its whole path: a Ray worker may import cxrcore from
    another copy than its driver did (Ray puts the driver's working directory on the workers' path, so a
    driver run from a source checkout, cxr installed elsewhere, has workers importing the checkout's).
    """
    value = os.environ.get("RAY_DATA_LOGGING_CONFIG")
    return value is not None and Path(value).parts[-2:] == RAY_DATA_LOGGING.parts[-2:]


def train_log_level() -> str:
    return TRAIN_LOG_LEVEL if is_quiet() else "INFO"


def quiet_train_worker() -> None:
    """In a Train worker of a quiet run: drop Ray Train's per-report INFO line, which dumps the whole metrics
    dictionary, and its traceback of a full disk, and keep Ray Data's console as a quiet command has it.

    Ray 2.60 logs the report under a logger named by its source file's path, which ray.train.LoggingConfig
    does not reach; raising that logger's level is the only switch. The metrics are in the run's cards.
    """
    quiet_ray_data_console()
    # Its "Error in training function" traceback of a full disk, once per attempt: cxr says it in one line.
    hide_storage_errors("ray.train.v2._internal.util")
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_tune_trial() -> None:
    """In a Tune trial of a quiet command: Ray Data's console as quiet_ray_data_console leaves it, and no
    progress bars in the datasets the trial builds for its Train run. A dataset carries the Ray Data context
    it was built in to the Train workers that run it, and on a cluster joined by address the trial's
    context was made with Ray's defaults: each worker drew a bar per dataset per epoch.

    A trial that trains in its own process (`tune.trains_in_trial`) reports its checkpoints to Tune, whose
    storage logs "Checkpoint successfully created at: ..." for each at INFO: the checkpoints are in the
    comparison's report and the trial's folder."""
    import ray.data

    quiet_ray_data_console()
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)


def quiet_ray_data_console() -> None:
    """Ray Data's console in this process as RAY_DATA_LOGGING has it (warnings and errors, less the progress
    notice), also where the process started with Ray Data's defaults: the workers and Tune trials of a
    cluster joined by address, which do not get the command's QUIET_ENVIRONMENT. Its log file is left as
    it is; a second call changes nothing.

    Without this, each Train worker of a quiet `cxr train` on a cluster printed "Progress bars disabled.
    To enable, ..." (the driver's Ray Data context, bars off, travels with the datasets)."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
            if not any(isinstance(f, HideProgressNotice) for f in handler.filters):
                handler.addFilter(HideProgressNotice())
