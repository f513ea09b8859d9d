"""The publisher: numbers committed events in commit order, so that "every event after n" is well defined.

Events get their `id` when inserted, but commit in their own order; a stream resumed "after 42" could
miss a 41 that committed late. `batchd.publish_events` (migration 0003) gives committed, unpublished
events the next numbers of a gap-free `seq`, one publisher at a time, and NOTIFYs `batchd_published`.
Every daemon runs this loop; the database makes them take turns, so an instance dying mid-publication
loses nothing (its transaction rolls back and the next publisher numbers the same events).

It wakes on `batchd_events` (sent by whatever writes events), on its own daemon's commits, and every
`poll_interval_s` in case a notification was missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .aio import run_loop
from .context import Context
from .store import DB_ERRORS, Connection, sql

EVENTS_CHANNEL = "batchd_events"
PUBLISHED_CHANNEL = "batchd_published"


async def publish(db: Connection, chunk: int) -> int:
    """Publishes every committed event not yet published, `chunk` per statement; returns how many."""
    published = 0
    while True:
        count: int = await db.fetchval(sql("publish_events"), chunk)
        published += count
        if count < chunk:
            return published


class Publisher:
    def __init__(self, ctx: Context, on_published: Callable[[], None] = lambda: None) -> None:
        self.ctx = ctx
        self.on_published = on_published
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        await run_loop(
            "publisher",
            self._publish,
            stopping=self.ctx.stopping,
            wake=self._wake,
            idle_s=self.ctx.settings.events.poll_interval_s,
            backoff=self.ctx.backoff,
            errors=DB_ERRORS,
        )

    async def _publish(self) -> None:
        async with self.ctx.pool.acquire() as connection:
            published = await publish(connection, self.ctx.settings.events.publish_chunk)
        if published:
            self.on_published()
