"""The cyclic garbage collector held off while a batch's worth of rows is built.

A flush of 100,000 jobs makes about half a million objects that all live until the batch is recorded: the rows
asyncpg returns, a claimed job and a prepared request per row, their strings. Each 700 new objects start a
collection of the youngest generation, and as the survivors pile up, collections of the older ones walk every
object the process holds, again and again: a flush of 100,000 spent 1.25 to 1.72 s in Python with it on, 0.69
to 1.01 s off (docs/benchmarks.md, "Fair and fast: every target in one run"). None of these objects can form a
cycle, so there is nothing for the collector to find until they are gone; `paused()` turns it off for the span
and back on after. Spans may overlap (tasks of one event loop): the collector is off while any is open. A
process that turned it off itself keeps it off.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_open = 0


@contextmanager
def paused() -> Iterator[None]:
    global _open  # noqa: PLW0603 - one count per process, as the collector is one per process
    if _open == 0 and not gc.isenabled():
        yield  # off already, by someone else's choice: theirs to turn back on
        return
    _open += 1
    gc.disable()
    try:
        yield
    finally:
        _open -= 1
        if _open == 0:
            gc.enable()
