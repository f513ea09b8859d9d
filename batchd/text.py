"""What the command line reads from people and writes for them: durations as they type them (`30m`, `2h`,
`7d`), tables whose columns are as wide as their widest cell, and ages as they read them.

The standard library only: the parser uses it before a command has loaded anything else.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_duration(text: str) -> float | None:
    """The seconds in `90s`, `30m`, `12h`, `7d` or `2w`; None when `text` is not such a duration (each
    caller says what else it takes: `report --since` an ISO date, `status --window` plain seconds)."""
    match = _DURATION.match(text.strip().lower())
    return None if match is None else float(match[1]) * UNITS[match[2]]


def formatter(
    header: Sequence[str], lines: Sequence[Sequence[str]], left: int = 1
) -> tuple[Callable[[Sequence[str]], str], list[int]]:
    """Lays out a table: each column as wide as its widest cell, the first `left` ones flush left (names),
    the others flush right (numbers). Returns the function that formats a row, and the columns' widths."""
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return fmt, widths


def table(
    header: Sequence[str], lines: Sequence[Sequence[str]], left: int = 1, indent: str = "  "
) -> list[str]:
    """The header and the lines, laid out by `formatter`, each line indented."""
    fmt, _ = formatter(header, lines, left)
    return [indent + fmt(cells) for cells in [header, *lines]]


def age(seconds: float) -> str:
    """`42s`, `5m 07s`, `3h 02m`, `2d 4h`: as the dashboard shows an age."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86_400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86_400}d {s % 86_400 // 3600}h"
