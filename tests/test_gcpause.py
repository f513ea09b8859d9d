"""The collector held off over a batch's worth of rows (gcpause.py): off while any span is open, back on when
the last one closes, whatever ends it; left off when the process had turned it off itself."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from batchd import gcpause


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    gc.enable()
    yield
    gc.enable()


def test_off_inside_on_after() -> None:
    with gcpause.paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_back_on_after_an_error() -> None:
    with pytest.raises(RuntimeError), gcpause.paused():
        raise RuntimeError("the flush failed")
    assert gc.isenabled()


async def test_overlapping_spans_of_two_tasks_keep_it_off_until_the_last_closes() -> None:
    first_in, second_in, first_may_leave = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen: list[bool] = []

    async def first() -> None:
        with gcpause.paused():
            first_in.set()
            await first_may_leave.wait()
        seen.append(gc.isenabled())  # the second is still inside

    async def second() -> None:
        await first_in.wait()
        with gcpause.paused():
            second_in.set()
            first_may_leave.set()
            await asyncio.sleep(0)  # let the first leave while this one is open
            await asyncio.sleep(0)
            seen.append(gc.isenabled())
        seen.append(gc.isenabled())

    await asyncio.wait_for(asyncio.gather(first(), second()), timeout=5)
    assert seen == [False, False, True]


def test_a_collector_turned_off_by_the_process_stays_off() -> None:
    gc.disable()
    with gcpause.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()
