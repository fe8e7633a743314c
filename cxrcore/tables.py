"""Plain-text tables for the console, shared by the `cxr` commands' summaries and the dry-run plans."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_NUMERIC = re.compile(r"-?[\d.,]+%?|None|-+")


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned numbers."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        padded = [row[0].ljust(widths[0])] + [
            c.rjust(w) if _NUMERIC.fullmatch(c) else c.ljust(w)
            for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
