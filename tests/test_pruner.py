"""Events past their retention are pruned in bounded chunks; recent ones stay."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from support import EmulatorHandle, wait_until

from batchd import pruner
from batchd.pruner import prune_events
from batchd.publisher import publish
from batchd.store import sql


async def add_events(db: Any, count: int, age: timedelta) -> None:
    """Publishes `count` events as if `age` ago."""
    await db.execute(
        "INSERT INTO batchd.events (type, tenant_id) SELECT 'job.succeeded', 't' FROM generate_series(1, $1)",
        count,
    )
    await publish(db, chunk=10_000)
    await db.execute(
        "UPDATE batchd.events SET published_at = now() - $1::interval"
        " WHERE published_at > now() - interval '1 s'",
        age,
    )


async def test_expired_events_go_a_chunk_at_a_time_and_recent_ones_stay(db: Any) -> None:
    await add_events(db, 1050, timedelta(days=8))
    await add_events(db, 10, timedelta(hours=1))
    assert await prune_events(db, retention_s=7 * 86_400, chunk=100) == 1050
    assert await db.fetchval("SELECT count(*) FROM batchd.events") == 10
    assert await prune_events(db, retention_s=7 * 86_400, chunk=100) == 0


async def test_each_prune_statement_deletes_at_most_prune_chunk_rows(db: Any) -> None:
    await add_events(db, 1050, timedelta(days=8))
    await add_events(db, 10, timedelta(hours=1))
    # The pruner's statement, once, with a small chunk: that many rows go, no more.
    assert await db.execute(sql("prune_events"), 7 * 86_400, 7) == "DELETE 7"
    assert await db.fetchval("SELECT count(*) FROM batchd.events") == 1053
    # A whole prune, every DELETE statement it runs counted by a statement-level trigger.
    await db.execute(
        "CREATE TABLE batchd.test_prune_statements (n bigint);"
        "CREATE FUNCTION batchd.test_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN INSERT INTO batchd.test_prune_statements SELECT count(*) FROM gone; RETURN NULL; END $$;"
        "CREATE TRIGGER test_count_deleted AFTER DELETE ON batchd.events REFERENCING OLD TABLE AS gone"
        " FOR EACH STATEMENT EXECUTE FUNCTION batchd.test_count_deleted()"
    )
    try:
        assert await prune_events(db, retention_s=7 * 86_400, chunk=100) == 1043
        counts = [row["n"] for row in await db.fetch("SELECT n FROM batchd.test_prune_statements")]
    finally:
        await db.execute(
            "DROP TRIGGER test_count_deleted ON batchd.events;"
            "DROP FUNCTION batchd.test_count_deleted(); DROP TABLE batchd.test_prune_statements"
        )
    assert counts == [100] * 10 + [43], "each statement deletes at most prune_chunk rows, then stops"
    assert await db.fetchval("SELECT count(*) FROM batchd.events") == 10


async def test_the_daemon_prunes_on_its_own(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    await add_events(db, 30, timedelta(hours=2))
    await add_events(db, 5, timedelta(minutes=1))
    settings = daemon_settings(events={"retention_s": 3600, "prune_interval_s": 0.1, "prune_chunk": 7})
    async with start_daemon(settings):

        async def pruned() -> bool:
            events: int = await db.fetchval("SELECT count(*) FROM batchd.events")
            return events == 5

        await wait_until(pruned, timeout=20)


async def test_only_a_prefix_of_the_log_goes_so_a_resuming_client_never_meets_a_hole(db: Any) -> None:
    await add_events(db, 5, timedelta(days=8))
    await add_events(db, 1, timedelta(hours=1))
    await add_events(db, 5, timedelta(days=9))  # old again (a clock step): kept, behind a young event
    assert await prune_events(db, retention_s=7 * 86_400, chunk=100) == 5
    seqs = [row["seq"] for row in await db.fetch("SELECT seq FROM batchd.events ORDER BY seq")]
    assert seqs == list(range(6, 12))


async def test_unpublished_events_are_never_pruned(db: Any) -> None:
    await db.execute(
        "INSERT INTO batchd.events (type, tenant_id, created_at)"
        " VALUES ('job.failed', 't', now() - interval '30 days')"
    )
    assert await prune_events(db, retention_s=60, chunk=100) == 0
    assert await db.fetchval("SELECT count(*) FROM batchd.events") == 1


async def test_the_history_pruner_rests_between_chunks_for_its_busy_share() -> None:
    """With busy_share 0.25, each full chunk that took t seconds is followed by a rest of 3t; the last
    chunk (not full) ends the drain without a rest."""
    clock = [0.0]
    rests: list[float] = []
    sizes = iter([10, 10, 10, 4])

    async def delete_chunk() -> int:
        clock[0] += 0.2  # each statement takes 0.2 s
        return next(sizes)

    async def rest(seconds: float) -> None:
        rests.append(round(seconds, 9))

    drained = await pruner._drain(delete_chunk, chunk=10, busy_share=0.25, clock=lambda: clock[0], rest=rest)
    assert drained == 34
    assert rests == [0.6, 0.6, 0.6]
