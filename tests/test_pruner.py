"""Events past their retention are pruned in bounded chunks; recent ones stay."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from support import EmulatorHandle, wait_until

from batchd.pruner import prune_events


async def add_events(db: Any, count: int, age: timedelta) -> None:
    await db.execute(
        "INSERT INTO batchd.events (type, tenant_id, created_at)"
        " SELECT 'job.succeeded', 't', now() - $2::interval FROM generate_series(1, $1)",
        count,
        age,
    )


async def test_expired_events_go_a_chunk_at_a_time_and_recent_ones_stay(db: Any) -> None:
    await add_events(db, 1050, timedelta(days=8))
    await add_events(db, 10, timedelta(hours=1))
    assert await prune_events(db, retention_s=7 * 86_400, chunk=100) == 1050
    assert await db.fetchval("SELECT count(*) FROM batchd.events") == 10
    assert await prune_events(db, retention_s=7 * 86_400, chunk=100) == 0


async def test_the_daemon_prunes_on_its_own(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    await add_events(db, 30, timedelta(hours=2))
    await add_events(db, 5, timedelta(minutes=1))
    settings = daemon_settings(events={"retention_s": 3600, "prune_interval_s": 0.1, "prune_chunk": 7})
    async with start_daemon(settings):

        async def pruned() -> bool:
            return await db.fetchval("SELECT count(*) FROM batchd.events") == 5

        await wait_until(pruned, timeout=20)
