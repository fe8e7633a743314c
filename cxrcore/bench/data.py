"""The data the benchmarks run on: synthetic phantoms in the Kaggle layout, written in parallel, or a sample
of a raw folder."""

from __future__ import annotations

import shutil
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
        from cxrcore.data.synthetic import MARKER_NAME

        # marked as a synthesis's before the class writers start: each one's check finds the others' folders
        Path(raw).mkdir(parents=True, exist_ok=True)
        (Path(raw) / MARKER_NAME).touch()
        jobs = [(raw, per_class, seed, name) for name in CLASSES]
        with ProcessPoolExecutor(min(processes, len(CLASSES)), mp_context=get_context("spawn")) as pool:
            list(pool.map(_write_class, jobs))
    return per_class * len(CLASSES)


def _write_class(job: tuple[Path, int, int, str]) -> None:
    from cxrcore.data.synthetic import write_synthetic_dataset

    raw, per_class, seed, name = job
    write_synthetic_dataset(raw, per_class, seed, classes=[name])


def sample_raw(source: Path, dest: Path, images: int) -> tuple[int, int]:
    """`images` images of the raw folder `source`, with their masks, copied into class folders under `dest`:
    the first ones in the ingest's own row order (classes interleaved: path order would give a large
    folder's first class only) if it holds more, all of them repeated (copies renamed `<stem>~<n>`) if it
    holds fewer. Returns (images written, images found in `source`).

    The copies are the files as they are (same encoding, size and masks), so decoding them costs what
    the real dataset's cost. Metadata files are not copied: copies would match none of their rows.
    """
    from cxrcore.data.ingest import _shuffle_key
    from cxrcore.data.layout import scan_layout

    entries = sorted(scan_layout(source).entries, key=_shuffle_key)
    for n in range(images):
        entry, repeat = entries[n % len(entries)], n // len(entries)
        stem = Path(entry.file).stem + (f"~{repeat}" if repeat else "")
        for kind, path in (("images", entry.image_path), ("masks", entry.mask_path)):
            if path:
                target = dest / entry.label / kind / (stem + Path(path).suffix)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    return images, len(entries)
