"""The rollups: finished jobs counted once, read in time proportional to the rollups, never to the history.

Every statement that finishes jobs appends what it did to batchd.tallies in the same statement (queries.sql:
apply_results, fail_jobs, check_budgets, set_aside_job, requeue_expired_sync; a cancel's trigger), so a
tally commits or rolls back with the jobs it counts, and a chunk applied twice tallies nothing the second
time. The fold here moves tallies into batchd.rollups (per UTC hour, per UTC day, for all time) a bounded
chunk per statement, each a DELETE ... RETURNING and an upsert at once. Readers (batchd.totals_since) add
the rollups and the tallies not yet folded, so they are exact whether or not the fold has run.
"""

from __future__ import annotations

import structlog

from .aio import run_loop
from .context import Context
from .store import DB_ERRORS, Connection, sql

log = structlog.get_logger("batchd.rollups")


async def fold(db: Connection, chunk: int) -> int:
    """Folds every tally into the rollups, and every turnaround tally into batchd.turnarounds (flow.py reads
    them), unless another daemon is folding; returns how many tallies of both kinds were folded."""
    folded = 0
    for query in ("fold_tallies", "fold_turnarounds"):
        while True:
            async with db.transaction():
                if not await db.fetchval(sql("lock_fold")):
                    return folded  # another daemon folds them
                count: int = await db.fetchval(sql(query), chunk)
            folded += count
            if count < chunk:
                break
    return folded


async def run(ctx: Context) -> None:
    """Folds every `rollups.fold_interval_s`."""
    settings = ctx.settings.rollups

    async def step() -> None:
        async with ctx.pool.acquire() as connection:
            await fold(connection, settings.fold_chunk)

    await run_loop(
        "rollups",
        step,
        stopping=ctx.stopping,
        wake=None,
        idle_s=settings.fold_interval_s,
        backoff=ctx.backoff,
        errors=DB_ERRORS,
    )
