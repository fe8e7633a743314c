"""Plain-text tables for the console, shared by the `cxr` commands' summaries and the dry-run plans."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

_NUMERIC = re.compile(r"-?[\d.,]+%?|None|-+")


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned numbers, its columns aligned by the terminal width of what
    they hold (a file name in Chinese or with an emoji takes two columns a character, an accent written
    as a combining mark none).

    >>> print(format_table(["file", "p"], [["肺部.png", "0.9"], ["cafe\u0301.png", "0.1"]]))
    file      p
    --------  ---
    肺部.png  0.9
    cafe\u0301.png  0.1
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(display_width(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        padded = [_pad(row[0], widths[0], left=True)] + [
            _pad(c, w, left=not _NUMERIC.fullmatch(c)) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def display_width(text: str) -> int:
    """The columns `text` takes on a terminal: wide (East Asian, emoji) characters two, combining marks
    none, others one."""
    return sum(
        0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1
        for char in text
    )


def _pad(text: str, width: int, left: bool) -> str:
    """`text` padded with spaces to `width` terminal columns, on the right (`left`-aligned) or the left."""
    fill = " " * max(0, width - display_width(text))
    return text + fill if left else fill + text
