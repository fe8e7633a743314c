"""Torch on one thread in tests that run models in the test process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread, as in a 1-CPU worker or replica. Tests check code paths, not speed, and on a busy
    2-core machine two torch threads spinning against each other ran a tiny model up to 30× slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
