"""The pruner: deletes events past their retention, a bounded chunk per statement.

One giant DELETE would hold locks and bloat the WAL for as long as it runs; a chunk at a time keeps each
transaction short, and the loop stops at the first chunk that was not full.
"""

from __future__ import annotations

import structlog

from .aio import run_loop
from .context import Context
from .store import DB_ERRORS, Connection, sql

log = structlog.get_logger("batchd.pruner")


async def prune_events(db: Connection, retention_s: float, chunk: int) -> int:
    """Deletes every event older than `retention_s`; returns how many."""
    deleted = 0
    while True:
        status = await db.execute(sql("prune_events"), retention_s, chunk)
        count = int(status.split()[-1])  # "DELETE n"
        deleted += count
        if count < chunk:
            return deleted


async def run(ctx: Context) -> None:
    """Prunes at start, then every `prune_interval_s`."""
    events = ctx.settings.events

    async def prune() -> None:
        async with ctx.pool.acquire() as connection:
            deleted = await prune_events(connection, events.retention_s, events.prune_chunk)
        if deleted:
            log.info("events.pruned", deleted=deleted, retention_s=events.retention_s)

    await run_loop(
        "pruner",
        prune,
        stopping=ctx.stopping,
        wake=None,
        idle_s=events.prune_interval_s,
        backoff=ctx.backoff,
        errors=DB_ERRORS,
    )
