"""The event log's numbering: `seq` follows commit order, is gap-free, and any reader sees a prefix of it.

Event ids come from a sequence at INSERT, so they can commit out of order; these tests make that happen on
purpose and show that what streams are served by (`seq`) never lets a reader skip an event.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import pytest

from batchd.publisher import publish
from batchd.store import init_connection

INSERT_EVENT = "INSERT INTO batchd.events (type, tenant_id) VALUES ('job.succeeded', $1) RETURNING id"


async def connect(url: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(url)
    await init_connection(connection)
    return connection


async def test_an_event_that_commits_late_is_numbered_after_one_that_committed_first(
    db: Any, database_url: str
) -> None:
    early = await connect(database_url)
    try:
        transaction = early.transaction()
        await transaction.start()
        early_id = await early.fetchval(INSERT_EVENT, "a")  # the lower id, still uncommitted
        late_id = await db.fetchval(INSERT_EVENT, "b")  # a higher id, committed first
        assert early_id < late_id
        assert await publish(db, chunk=100) == 1
        await transaction.commit()
        assert await publish(db, chunk=100) == 1
    finally:
        await early.close()
    seqs = {row["id"]: row["seq"] for row in await db.fetch("SELECT id, seq FROM batchd.events")}
    assert seqs == {late_id: 1, early_id: 2}, "numbered in commit order, not id order"
    assert await db.fetchval("SELECT published_seq FROM batchd.event_log") == 2


async def test_publishing_needs_read_committed(db: Any) -> None:
    async with db.transaction(isolation="repeatable_read"):
        with pytest.raises(asyncpg.RaiseError, match="READ COMMITTED"):
            await db.fetchval("SELECT batchd.publish_events(10)")


@pytest.mark.slow
async def test_concurrent_writers_and_publishers_leave_every_reader_a_gap_free_prefix(
    db: Any, database_url: str
) -> None:
    rng = random.Random(7)
    writers = [await connect(database_url) for _ in range(4)]
    publishers = [await connect(database_url) for _ in range(3)]
    reader = await connect(database_url)
    done = asyncio.Event()
    observations = 0

    async def write(connection: asyncpg.Connection) -> None:
        for _ in range(150):
            async with connection.transaction():
                for _ in range(rng.randint(1, 4)):
                    await connection.fetchval(INSERT_EVENT, "t")
                # Hold some transactions open a moment so that ids commit out of order.
                if rng.random() < 0.3:
                    await asyncio.sleep(rng.random() / 100)

    async def keep_publishing(connection: asyncpg.Connection) -> None:
        while not done.is_set():
            await publish(connection, chunk=rng.randint(1, 20))
            await asyncio.sleep(0)

    async def read() -> None:
        nonlocal observations
        while not done.is_set():
            row = await reader.fetchrow("SELECT max(seq), count(seq) FROM batchd.events")
            assert row is not None
            highest, count = row
            # Seeing seq n means seeing every seq below it: a stream resumed after n misses nothing.
            assert (highest or 0) == count
            observations += 1

    try:
        tasks = [asyncio.create_task(keep_publishing(p)) for p in publishers]
        tasks.append(asyncio.create_task(read()))
        await asyncio.gather(*(write(w) for w in writers))
        done.set()
        await asyncio.gather(*tasks)
        await publish(db, chunk=1000)
    finally:
        for connection in (*writers, *publishers, reader):
            await connection.close()
    total = await db.fetchval("SELECT count(*) FROM batchd.events")
    row = await db.fetchrow("SELECT min(seq), max(seq), count(DISTINCT seq) FROM batchd.events")
    assert tuple(row) == (1, total, total)
    assert observations > 50
    out_of_order = await db.fetchval(
        "SELECT count(*) FROM"
        " (SELECT id, lag(id) OVER (ORDER BY seq) AS previous FROM batchd.events) AS s WHERE id < previous"
    )
    assert out_of_order > 0, "the test made no event commit out of id order; it proves nothing"
