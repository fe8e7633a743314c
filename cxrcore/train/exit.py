"""A Ray Train worker stopped in the middle of a step exits at once instead of crashing on the way out.

Ray Train runs the training function in a daemon thread of the worker actor, and Tune a function
trainable in a daemon thread of the trial actor (where a one-worker trial trains, `tune.trains_in_trial`).
When the worker is terminated gracefully (Ray sends SIGTERM to the workers of a Train run whose owner went
away, as when Tune's ASHA stops a trial), its main thread raises SystemExit and Python finalizes while
that thread is still inside a torch op with the GIL released. Python 3.11 ends a daemon thread that asks
for the GIL after finalization began with `pthread_exit`, whose forced unwind through torch's C++ frames
calls `std::terminate`: the console then shows a C++ stack trace, "SIGABRT received" and "Fatal Python
error: Aborted" for a trial that nothing went wrong with (2 of the 10 trials ASHA stopped in one `cxr tune`;
3 of 3 actors sent SIGTERM while they trained in a thread; tests/unit/test_exit.py shows it without Ray).

Exit handlers run before finalization, while the training thread still runs: the one registered here
ends the process there with `os._exit` if a training thread is still running, as Ray's own forced exit
does. The thread's work is abandoned either way; only the crash report is spared.

The SIGTERM can also land while the main thread runs a callback Python cannot raise out of (a weak
reference's, as when a finished training thread is collected). Python then prints the SystemExit as
"Exception ignored in ..." with a traceback through Ray's handler and goes on running, until Ray kills the
process: seen once when Tune ended a finished trial's actor in `cxr demo`. The `sys.unraisablehook`
installed here honours such an exit at once, with its status, and without the traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

EXIT_CODE = 1
"""The status Ray's SIGTERM handler exits a worker with (`sys.exit(1)`)."""

_training: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_registered = False
_lock = threading.Lock()


def exit_without_finalizing_while_training() -> None:
    """Called from the training thread: if the process exits while this thread still runs, end it at
    the first exit handler, before Python's finalization can abort it."""
    global _registered
    with _lock:
        _training.add(threading.current_thread())
        if not _registered:
            atexit.register(_exit_if_training)
            sys.unraisablehook = partial(_exit_if_exit_was_swallowed, previous=sys.unraisablehook)
            _registered = True


def _exit_if_exit_was_swallowed(unraisable: Any, previous: Callable[[Any], object]) -> None:
    """`sys.unraisablehook`: a SystemExit raised where Python could not propagate it ends the process with
    its status; anything else is reported as before."""
    if unraisable.exc_type is None or not issubclass(unraisable.exc_type, SystemExit):
        previous(unraisable)
        return
    code = getattr(unraisable.exc_value, "code", EXIT_CODE)
    _flush()
    os._exit(0 if code is None else code if isinstance(code, int) else EXIT_CODE)  # as sys.exit's statuses


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream must not stop the exit
            stream.flush()


def _exit_if_training() -> None:
    # Only a daemon thread is at risk: Python joins the others before the exit handlers run, and the
    # main thread, where Ray Train's local mode (`--workers 0`) trains, is running them.
    here = threading.current_thread()
    if not any(thread.daemon and thread.is_alive() and thread is not here for thread in list(_training)):
        return  # training finished: exit as usual, every exit handler run
    _flush()
    os._exit(EXIT_CODE)
