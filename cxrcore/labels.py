"""The four classes, in the one canonical order used by labels, logits, reports and the API."""

from __future__ import annotations

import re

CLASSES: tuple[str, ...] = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
NUM_CLASSES = len(CLASSES)

_SEPARATORS = re.compile(r"[\s_\-]+")


def _key(name: str) -> str:
    return _SEPARATORS.sub("_", name.strip()).casefold()


_BY_KEY = {_key(name): name for name in CLASSES}


def canonical_class(name: str) -> str | None:
    """The canonical class spelled like `name` (any case, spaces/underscores/hyphens alike), or None."""
    return _BY_KEY.get(_key(name))


def class_index(name: str) -> int:
    """Index of a class name in CLASSES; tolerant of spelling like canonical_class."""
    canonical = canonical_class(name)
    if canonical is None:
        raise ValueError(f"unknown class {name!r}; expected one of {', '.join(CLASSES)}")
    return CLASSES.index(canonical)
