"""`make test`'s pytest: the unit tests in a process of their own beside the tests that run Ray.

The unit tests (no Ray) keep one core busy for about a minute and a quarter, while the integration and e2e
tests leave a core idle for a fifth of their time (Ray's process starts, Serve's waits); side by side the
suite took 7 min 22 s here where one pytest took 8 min 21 s. The unit tests' report is printed after the
Ray tests' own, and the exit status is non-zero if either run failed.

With arguments (`make test PYTEST_ARGS="-x -k serve"`) it is one pytest with them, as `pytest` itself is.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

PYTEST = [sys.executable, "-m", "pytest"]
UNIT = "tests/unit"
WITH_RAY = ("tests/integration", "tests/e2e")


def main(argv: list[str]) -> int:
    if argv:
        return subprocess.call([*PYTEST, *argv])
    root = Path(__file__).parents[1]
    with tempfile.TemporaryFile() as log:
        print(f"{UNIT}: running beside the Ray tests; their report follows the Ray tests' one\n", flush=True)
        # Its own cache folder: two pytest runs writing one .pytest_cache at once would drop failures.
        command = [*PYTEST, UNIT, "-o", "cache_dir=.pytest_cache/unit"]
        unit = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        try:
            with_ray = subprocess.call([*PYTEST, *WITH_RAY], cwd=root)
            unit_status = unit.wait()
        finally:
            if unit.poll() is None:  # interrupted: the unit run goes with the rest
                unit.kill()
                unit.wait()
        log.seek(0)
        print(f"\n{'=' * 30} {UNIT} (run beside the above) {'=' * 30}", flush=True)
        sys.stdout.buffer.write(log.read())
        sys.stdout.flush()
    failed = [name for name, status in ((UNIT, unit_status), (" ".join(WITH_RAY), with_ray)) if status]
    if failed:
        print(f"\nFAILED: {'; '.join(failed)}", flush=True)
        return unit_status or with_ray
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
