"""The data the benchmarks run on: synthetic phantoms in the Kaggle layout, written in parallel."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from cxrcore.labels import CLASSES


def write_phantoms(raw: Path, images: int, processes: int = 1, seed: int = 0) -> int:
    """About `images` synthetic X-rays (a quarter per class) under `raw`; returns how many were written.

    With `processes` > 1 each class is drawn in its own process (spawned: the caller may be running Ray's
    threads, which a fork would copy mid-flight). The images are the same either way: each is seeded by
    (seed, class, index).
    """
    from cxrcore.data.synthetic import write_synthetic_dataset

    per_class = max(1, images // len(CLASSES))
    if processes <= 1:
        write_synthetic_dataset(raw, per_class, seed)
    else:
        jobs = [(raw, per_class, seed, name) for name in CLASSES]
        with ProcessPoolExecutor(min(processes, len(CLASSES)), mp_context=get_context("spawn")) as pool:
            list(pool.map(_write_class, jobs))
    return per_class * len(CLASSES)


def _write_class(job: tuple[Path, int, int, str]) -> None:
    from cxrcore.data.synthetic import write_synthetic_dataset

    raw, per_class, seed, name = job
    write_synthetic_dataset(raw, per_class, seed, classes=[name])
