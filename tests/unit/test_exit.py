"""A process that exits while its training thread is inside torch ends cleanly instead of aborting.

Each test runs a real Python process: a daemon thread trains a small convolution in a loop, the main
thread exits as Ray's SIGTERM handler makes a Train worker exit (`sys.exit`). Without
`exit_without_finalizing_while_training` that process aborts (status 134, "terminate called without an
active exception") in every run tried (5 of 5).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrcore.train.exit import EXIT_CODE

CHILD = """
import atexit, sys, threading
import torch
from cxrcore.train.exit import exit_without_finalizing_while_training

mode = sys.argv[1]
atexit.register(print, "the other exit handlers ran", flush=True)
stepped = threading.Event()

def train():
    exit_without_finalizing_while_training()
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3))
    images = torch.randn(16, 1, 64, 64)
    model(images).sum().backward()
    stepped.set()
    while mode == "killed":
        model(images).sum().backward()

class Doomed:
    def __del__(self):  # an exit where Python cannot raise it, as Ray's SIGTERM handler's in a callback
        sys.exit(5)

if mode == "main":  # Ray Train's local mode (`--workers 0`) trains in the main thread
    train()
elif mode == "swallowed":
    train()
    Doomed()
    print("still running", flush=True)
else:
    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    assert stepped.wait(60), "the training thread never took a step"
    if mode == "finished":
        thread.join(60)
print("exiting", flush=True)
sys.exit(3)
"""


def _run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    repo = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, str(script), mode], cwd=repo, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_an_exit_during_a_training_step_ends_the_process_cleanly(tmp_path: Path) -> None:
    done = _run(tmp_path, "killed")
    assert "terminate called" not in done.stderr and "Fatal Python error" not in done.stderr, done.stderr
    assert done.returncode == EXIT_CODE, (done.returncode, done.stderr)
    assert "exiting" in done.stdout  # the child reached its own exit (Python flushes stdout on SystemExit)


@pytest.mark.parametrize("mode", ["finished", "main"])
def test_after_training_finished_the_process_exits_as_usual(tmp_path: Path, mode: str) -> None:
    done = _run(tmp_path, mode)
    assert done.returncode == 3, (done.returncode, done.stderr)
    assert "the other exit handlers ran" in done.stdout


def test_an_exit_python_would_swallow_ends_the_process_with_its_status(tmp_path: Path) -> None:
    """SIGTERM's SystemExit raised inside a callback (a weak reference's, once, in `cxr demo`) is printed
    by Python as "Exception ignored" with a traceback, and the process runs on: here it ends at once."""
    done = _run(tmp_path, "swallowed")
    assert done.returncode == 5, (done.returncode, done.stderr)
    assert "Exception ignored" not in done.stderr and "still running" not in done.stdout, done.stderr


def test_other_unraisable_errors_are_still_reported(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(
        "from cxrcore.train.exit import exit_without_finalizing_while_training\n"
        "exit_without_finalizing_while_training()\n"
        "class Broken:\n    def __del__(self):\n        raise ValueError('in a finalizer')\n"
        "Broken()\nprint('still running', flush=True)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(script)], cwd=repo, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    assert done.returncode == 0 and "still running" in done.stdout, done.stderr
    assert "Exception ignored" in done.stderr and "ValueError: in a finalizer" in done.stderr
