"""The pruner: deletes what is past its retention — events, finished jobs, old batches, the ledger — a bounded
chunk per statement, resting between chunks.

One giant DELETE would hold locks and bloat the WAL for as long as it runs; a chunk at a time keeps each
transaction short, and a table's pruning stops at the first chunk that was not full. Between chunks the
pruner rests, so that it deletes at most `retention.busy_share` of the time: producers, the flusher and the
apply keep the machine. Jobs go oldest first per status (each status has its retention), on the partial
index jobs_finished; a batch goes once no job refers to it; the ledger and hour rollups go
after `retention.ledger_s`, the queue's and turnaround's minutes (flow.py) after `retention.flow_minutes_s`
and their hours with the hour rollups. What was counted stays counted: the rollups (rollups.py) outlive
the rows. With the history go the rows of daemons that died (batchd.instances) a day after their last
heartbeat, and the webhook delivery log's finished rows after `webhooks.log_retention_s`. An event the
webhook enqueuer has not passed is kept, whatever its age (deliverer.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeAlias

import asyncpg
import structlog

from . import instances
from .aio import run_loop
from .config import RetentionSettings
from .context import Context
from .store import DB_ERRORS, Connection, sql

log = structlog.get_logger("batchd.pruner")

Chunk = Callable[[], Awaitable[int]]
# A connection, or the pool (each statement then borrows one only while it runs).
Executor: TypeAlias = "Connection | asyncpg.Pool"


async def prune_events(db: Connection, retention_s: float, chunk: int) -> int:
    """Deletes every event older than `retention_s`; returns how many."""
    return await _drain(lambda: _deleted(db, "prune_events", retention_s, chunk), chunk, busy_share=1.0)


async def prune_history(db: Executor, retention: RetentionSettings) -> dict[str, int]:
    """Deletes every finished job, batch and ledger row past its retention; returns how many of each kind
    (kinds kept for good, `inf`, are not looked at). Given the pool, each chunk borrows a connection only
    while it runs."""
    chunk, share = retention.chunk, retention.busy_share
    work: list[tuple[str, Chunk]] = [
        (f"jobs_{status}", partial(_deleted, db, "prune_jobs", status, keep_s, chunk))
        for status, keep_s in retention.jobs_s().items()
        if math.isfinite(keep_s)
    ]
    # A batch goes when no job refers to it any more, so the shortest retention lets it go soonest.
    shortest = min(retention.jobs_s().values())
    if math.isfinite(shortest):
        work.append(("batches", partial(_deleted, db, "prune_batches", shortest, chunk)))
    if math.isfinite(retention.ledger_s):
        work.extend(
            (kind, partial(_deleted, db, f"prune_{kind}", retention.ledger_s, chunk))
            for kind in ("costs", "hourly_rollups")
        )
    # The queue's and turnaround's history (flow.py): minutes after their own retention, hours with the
    # hourly rollups; days are kept.
    for table in ("flow", "turnarounds"):
        work.append(
            (
                f"{table}_minutes",
                partial(_deleted, db, f"prune_{table}", retention.flow_minutes_s, chunk, "minute"),
            )
        )
        if math.isfinite(retention.ledger_s):
            work.append(
                (f"{table}_hours", partial(_deleted, db, f"prune_{table}", retention.ledger_s, chunk, "hour"))
            )
    return {kind: await _drain(delete_chunk, chunk, share) for kind, delete_chunk in work}


async def prune_webhook_deliveries(db: Executor, retention_s: float, chunk: int, busy_share: float) -> int:
    """Deletes finished webhook deliveries (delivered or dead) older than `retention_s`; returns how many."""
    return await _drain(
        lambda: _deleted(db, "prune_webhook_deliveries", retention_s, chunk), chunk, busy_share=busy_share
    )


async def prune_instances(db: Executor, chunk: int, older_than_s: float = instances.RETENTION_S) -> int:
    """Deletes the rows of daemons without a heartbeat for `older_than_s` (they died); returns how many."""
    return await _drain(lambda: _deleted(db, "prune_instances", older_than_s, chunk), chunk, busy_share=1.0)


async def _deleted(db: Executor, query: str, *args: object) -> int:
    status = await db.execute(sql(query), *args)
    return int(status.split()[-1])  # "DELETE n"


async def _drain(
    delete_chunk: Chunk,
    chunk: int,
    busy_share: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    rest: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> int:
    """Runs `delete_chunk` until one deletes less than `chunk` rows, resting after each for as long as it
    took times (1 - busy_share) / busy_share; returns how many rows went."""
    deleted = 0
    while True:
        started = clock()
        count = await delete_chunk()
        deleted += count
        if count < chunk:
            return deleted
        if busy_share < 1:
            await rest((clock() - started) * (1 - busy_share) / busy_share)


async def run(ctx: Context) -> None:
    """Prunes events at start and every `events.prune_interval_s`, and the rest at start and every
    `retention.interval_s`: two loops, so that a long history prune never holds up the events'."""
    events, retention = ctx.settings.events, ctx.settings.retention

    async def prune_old_events() -> None:
        async with ctx.pool.acquire() as connection:
            deleted = await prune_events(connection, events.retention_s, events.prune_chunk)
        if deleted:
            log.info("events.pruned", deleted=deleted, retention_s=events.retention_s)

    async def prune_old_history() -> None:
        counts = await prune_history(ctx.pool, retention)
        counts["instances"] = await prune_instances(ctx.pool, retention.chunk)
        counts["webhook_deliveries"] = await prune_webhook_deliveries(
            ctx.pool, ctx.settings.webhooks.log_retention_s, retention.chunk, retention.busy_share
        )
        if any(counts.values()):
            log.info("history.pruned", **{kind: n for kind, n in counts.items() if n})

    def loop(name: str, step: Callable[[], Awaitable[None]], idle_s: float) -> Awaitable[None]:
        return run_loop(
            name, step, stopping=ctx.stopping, wake=None, idle_s=idle_s, backoff=ctx.backoff, errors=DB_ERRORS
        )

    await asyncio.gather(
        loop("pruner", prune_old_events, events.prune_interval_s),
        loop("retention", prune_old_history, retention.interval_s),
    )
