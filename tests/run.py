"""`make test`'s pytest: the unit tests, and mypy, in processes of their own beside the tests that run Ray.

The unit tests (no Ray) keep one core busy for about a minute and a half, while the integration and e2e
tests leave the cores idle for a sixth of their time (Ray's process starts, Serve's waits). The unit tests
run at a lower priority (UNIT_NICENESS): they take what the Ray tests leave, and a training run's two torch
threads wait less for a core the unit tests hold. The unit tests' report is printed after the Ray
tests' own, and the exit status is non-zero if either run failed.

With arguments (`make test PYTEST_ARGS="-x -k serve"`) it is one pytest with them, as `pytest` itself is.

Either way Python writes its bytecode caches, even where PYTHONDONTWRITEBYTECODE is set (as on the development
machine): the suite starts about a hundred Python processes (Ray's workers and actors, Serve's replicas, the
`cxr` commands), and without the caches each compiled cxr's own modules again, about 1 CPU-second for the
modules a command imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PYTEST = [sys.executable, "-m", "pytest"]
MYPY = [sys.executable, "-m", "mypy"]
"""`make lint`'s type check, run beside the Ray tests too: 25 s of one core from a fresh clone (no cache)."""
UNIT = "tests/unit"
UNIT_NICENESS = 10
"""The unit run's niceness: the Ray tests' processes get a core first, the unit tests what is left."""
WITH_RAY = ("tests/integration", "tests/e2e")


def main(argv: list[str]) -> int:
    # The pytest runs, and every process they start, write bytecode caches.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    if argv:
        return subprocess.call([*PYTEST, *argv], env=env)
    root = Path(__file__).parents[1]
    with tempfile.TemporaryFile() as log, tempfile.TemporaryFile() as types:
        print(f"{UNIT} and mypy: running beside the Ray tests; their reports follow\n", flush=True)
        # Its own cache folder: two pytest runs writing one .pytest_cache at once would drop failures.
        command = [*PYTEST, UNIT, "-o", "cache_dir=.pytest_cache/unit"]
        beside = [_beside(args, root, env, out) for args, out in ((command, log), (MYPY, types))]
        try:
            with_ray = subprocess.call([*PYTEST, *WITH_RAY], cwd=root, env=env)
            unit_status, types_status = (process.wait() for process in beside)
        finally:
            for process in beside:
                if process.poll() is None:  # interrupted: the runs beside go with the rest
                    process.kill()
                    process.wait()
        for name, output in ((UNIT, log), ("mypy", types)):
            output.seek(0)
            print(f"\n{'=' * 30} {name} (run beside the above) {'=' * 30}", flush=True)
            sys.stdout.buffer.write(output.read())
            sys.stdout.flush()
    runs = ((UNIT, unit_status), ("mypy", types_status), (" ".join(WITH_RAY), with_ray))
    failed = [name for name, status in runs if status]
    if failed:
        print(f"\nFAILED: {'; '.join(failed)}", flush=True)
        return unit_status or types_status or with_ray
    return 0


def _beside(args: list[str], root: Path, env: dict[str, str], out: Any) -> subprocess.Popen[bytes]:
    """A run beside the Ray tests, at UNIT_NICENESS, its output kept in `out` until they end."""
    return subprocess.Popen(
        args,
        cwd=root,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.nice(UNIT_NICENESS),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
