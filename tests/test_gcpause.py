"""The collector held off over a batch's worth of rows (gcpause.py): off while any span is open, back on when
the last one closes, whatever ends it; left off when the process had turned it off itself."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest
from support import insert_raw, make_settings, wait_until

from batchd import gcpause, store
from batchd.context import Context
from batchd.flusher import Flusher
from batchd.provider import Provider
from batchd.ratelimit import RateLimiter
from batchd.store import sql


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


async def test_a_flush_holds_it_off_while_it_builds_its_batch_not_while_it_waits_for_another(
    db: Any, database_url: str
) -> None:
    await insert_raw(db, "acme", ["one", "two", "three"])
    pool = await store.create_pool(database_url, max_size=2)
    provider = Provider("test-key", base_url="http://unused", limiter=RateLimiter(60), timeout_s=10)
    during: list[bool] = []
    flusher = Flusher(
        Context(pool=pool, settings=make_settings(database_url, "http://unused"), provider=provider),
        lambda *_: during.append(gc.isenabled()),  # the batch handed on: still inside the flush
    )
    other = await store.connect(database_url)
    try:
        # Another daemon's flush holds the lock: this one waits, the collector running meanwhile.
        async with other.transaction():
            await other.execute(sql("lock_flush"))
            flush = asyncio.create_task(flusher.flush_one())

            async def waiting() -> bool:
                return bool(
                    await db.fetchval(
                        "SELECT count(*) FROM pg_locks AS l JOIN pg_database AS d ON d.oid = l.database"
                        " WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()"
                    )
                )

            await wait_until(waiting, timeout=10)
            assert gc.isenabled()
        flushed = await asyncio.wait_for(flush, timeout=10)
    finally:
        await other.close()
        await provider.close()
        await pool.close()
    assert flushed.jobs == 3
    assert during == [False]
    assert gc.isenabled()
