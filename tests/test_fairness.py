"""Fair sharing between tenants: weighted turns in each batch, max_queued refused by the database,
max_in_flight held back by the flusher, and jobs sharing a cacheable prefix taken together.

Most tests claim straight from the database (store.claim, in a transaction rolled back afterwards): the
claim is where fairness lives. One runs the whole daemon for the issue's own scenario.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support import EmulatorHandle, insert_raw, make_settings, run_python, wait_until

from batchd import fairness, store
from batchd.config import RoutingSettings
from batchd.emulator import EmulatorConfig
from batchd.store import init_connection, sql
from batchd.unset import UNSET, update_parameters

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)  # no job is urgent
ROUTING = store.Routing.from_settings(RoutingSettings())


async def claimed(db: Any, limit: int, window: int | None = None) -> list[asyncpg.Record]:
    """What one flush would claim now: (id, tenant_id, job_type, ...) in claim order. Nothing is kept."""
    transaction = db.transaction()
    await transaction.start()
    try:
        claim = await store.claim(db, limit, LONG_AGO, window if window is not None else 2 * limit, ROUTING)
        return [
            await db.fetchrow("SELECT id, tenant_id, job_type, seq FROM batchd.jobs WHERE id = $1", job.id)
            for job in claim.jobs
        ]
    finally:
        await transaction.rollback()


async def insert_many(db: Any, tenant: str, count: int) -> None:
    await db.execute(
        "INSERT INTO batchd.jobs (tenant_id, request)"
        " SELECT $1, jsonb_build_object('model', 'claude-haiku-4-5', 'max_tokens', 16,"
        "   'messages', jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'job ' || i)))"
        "  FROM generate_series(1, $2) AS i",
        tenant,
        count,
    )


def settings(**sections: Any) -> Any:
    return make_settings("postgresql://unused", "http://unused", **sections)


async def test_ten_jobs_are_not_put_behind_twenty_thousand(db: Any) -> None:
    await insert_many(db, "dumper", 20_000)
    await insert_many(db, "small", 10)
    jobs = await claimed(db, 1_000)
    counts = Counter(job["tenant_id"] for job in jobs)
    assert counts == {"small": 10, "dumper": 990}
    # Each tenant's own jobs keep their order: the dumper's 990 oldest.
    dumper = [job["seq"] for job in jobs if job["tenant_id"] == "dumper"]
    assert sorted(dumper) == list(range(1, 991))
    # And the small tenant's come in the first turns, not at the end.
    assert {job["tenant_id"] for job in jobs[:20]} == {"small", "dumper"}


async def test_weights_from_config_and_tenant_set_share_a_batch(db: Any) -> None:
    await fairness.publish(db, settings(tenants={"gold": {"weight": 3}, "silver": {"weight": 5}}))
    # `batchd tenant set` wins over batchd.toml: silver is 2, not 5.
    await fairness.set_limits(db, "silver", weight=2)
    for tenant in ("gold", "silver", "bronze"):
        await insert_many(db, tenant, 1_000)
    counts = Counter(job["tenant_id"] for job in await claimed(db, 600))
    assert counts == {"gold": 300, "silver": 200, "bronze": 100}


async def test_a_tenant_with_little_queued_leaves_its_share_to_the_others(db: Any) -> None:
    await fairness.publish(db, settings(tenant_defaults={"weight": 2}, tenants={"big": {"weight": 1}}))
    await insert_many(db, "big", 500)
    await insert_many(db, "tiny", 3)
    counts = Counter(job["tenant_id"] for job in await claimed(db, 100))
    assert counts == {"tiny": 3, "big": 97}


async def test_daemons_starting_together_all_publish_their_limits(db: Any, database_url: str) -> None:
    # Several instances restarted at once each publish batchd.toml's limits at start: none may fail (a
    # unique violation there stopped a daemon before it was ready), and the table holds one whole set.
    configs = [
        settings(tenant_defaults={"weight": n}, tenants={"gold": {"weight": 10 + n}}) for n in (1, 2, 3)
    ]
    connections = [await asyncpg.connect(database_url) for _ in range(6)]
    try:
        for _ in range(15):
            await asyncio.gather(
                *(fairness.publish(c, configs[n % len(configs)]) for n, c in enumerate(connections))
            )
            rows = [
                tuple(row)
                for row in await db.fetch(
                    "SELECT tenant_id, weight FROM batchd.configured_limits ORDER BY tenant_id"
                )
            ]
            whole_sets = [[("", n), ("gold", 10 + n)] for n in (1, 2, 3)]
            assert rows in whole_sets, f"not one daemon's whole set: {rows}"
    finally:
        for connection in connections:
            await connection.close()


async def test_held_tenants_are_left_out_of_the_fair_claim(db: Any) -> None:
    await insert_many(db, "held", 50)
    await insert_many(db, "free", 50)
    await db.execute("INSERT INTO batchd.tenants (name, hold_reason) VALUES ('held', 'over budget')")
    counts = Counter(job["tenant_id"] for job in await claimed(db, 100))
    assert counts == {"free": 50}


async def test_max_in_flight_leaves_the_rest_queued(db: Any) -> None:
    await fairness.publish(db, settings(tenants={"capped": {"max_in_flight": 150}}))
    await insert_many(db, "capped", 400)
    await insert_many(db, "other", 400)
    # 100 of capped's jobs are already in an open batch.
    batch_id = await db.fetchval(sql("insert_batch"), "fairtest0001", 100, 1000, "test", 60.0)
    await db.execute(
        "UPDATE batchd.jobs SET status = 'submitting', batch_id = $1"
        " WHERE id IN (SELECT id FROM batchd.jobs WHERE tenant_id = 'capped' ORDER BY seq LIMIT 100)",
        batch_id,
    )
    counts = Counter(job["tenant_id"] for job in await claimed(db, 300))
    assert counts == {"capped": 50, "other": 250}
    # At the cap, none at all; the default (no cap) for the others.
    await db.execute(
        "UPDATE batchd.jobs SET status = 'submitted', batch_id = $1"
        " WHERE id IN (SELECT id FROM batchd.jobs WHERE tenant_id = 'capped' AND status = 'queued'"
        "              ORDER BY seq LIMIT 50)",
        batch_id,
    )
    counts = Counter(job["tenant_id"] for job in await claimed(db, 300))
    assert counts == {"other": 300}


async def test_jobs_sharing_a_cacheable_prefix_go_in_one_batch(db: Any) -> None:
    # One tenant's queue alternates two job types: FIFO would split each type across two batches.
    for i in range(150):
        for job_type, values in (
            ("classify", {"text": f"t{i}", "categories": "a, b"}),
            ("summarize", {"document_text": f"d{i}", "max_length": 10}),
        ):
            await db.execute(
                "INSERT INTO batchd.jobs (tenant_id, job_type, input) VALUES ('acme', $1, $2::jsonb)",
                job_type,
                json.dumps(values),
            )
    jobs = await claimed(db, 100, window=200)
    assert Counter(job["job_type"] for job in jobs) == {"classify": 100}
    # The oldest job is always taken: its group comes first whatever the window holds.
    assert jobs[0]["seq"] == 1
    # With no lookahead, the claim is plain FIFO.
    assert Counter(job["job_type"] for job in await claimed(db, 100, window=100)) == {
        "classify": 50,
        "summarize": 50,
    }


async def test_raw_requests_with_the_same_cached_system_prompt_are_grouped(db: Any) -> None:
    def cached(system: str) -> dict[str, Any]:
        return {"type": "text", "text": system, "cache_control": {"type": "ephemeral", "ttl": "1h"}}

    # Interleaved: a plain request, one with cached system prompt A, one with cached system prompt B.
    for i in range(60):
        await insert_raw(db, "acme", [f"plain {i}"])
        await insert_raw(db, "acme", [f"a {i}"], system=[cached("You are A." * 50)])
        await insert_raw(db, "acme", [f"b {i}"], system=[cached("You are B." * 50)])
    jobs = await claimed(db, 60, window=180)
    texts = [
        json.loads(await db.fetchval("SELECT request::text FROM batchd.jobs WHERE id = $1", job["id"]))
        for job in jobs
    ]
    kinds = Counter(
        "plain" if "system" not in request else request["system"][0]["text"][:10] for request in texts
    )
    # The plain requests share nothing: each is its own group, in FIFO order; A's group starts at seq 2, so
    # it follows the first plain job; B's follows. The claim takes the first plain one and A's 59 more.
    assert kinds == {"plain": 1, "You are A.": 59}


async def claim_plan(db: Any, limit: int) -> str:
    """EXPLAIN of the fair claim of `limit` jobs (a window of twice as many), with the default routing."""
    query = (
        sql("claim_fair")
        .replace("$1", str(limit))
        .replace("$2::uuid[]", "'{}'::uuid[]")
        .replace("$3", str(2 * limit))
        .replace("$4", "50")
        .replace("$5", "10")
        .replace("$6", "3600")
        .replace("$7", "60")
    )
    return "\n".join(row[0] for row in await db.fetch("EXPLAIN " + query))


async def test_the_claim_skips_through_the_tenants_index(db: Any) -> None:
    await insert_many(db, "a", 2_000)
    await insert_many(db, "b", 2_000)
    await db.execute("ANALYZE batchd.jobs")
    assert "jobs_queued_tenant" in await claim_plan(db, 100)


async def test_the_claim_locks_by_primary_key_when_statistics_say_nothing_is_queued(db: Any) -> None:
    # Statistics taken when every job had ended, then a burst: the planner believes almost nothing is
    # queued. The picked jobs must still be found one probe each, not by rescanning the queue for each
    # (19 s for 10,000 jobs, docs/benchmarks.md).
    await insert_many(db, "a", 2_000)
    await db.execute("UPDATE batchd.jobs SET status = 'canceled'")
    await db.execute("ANALYZE batchd.jobs")
    await db.execute("DELETE FROM batchd.jobs")
    await insert_many(db, "a", 2_000)
    plan = await claim_plan(db, 2_000)
    assert "Index Scan using jobs_pkey" in plan, plan
    assert "Materialize" not in plan, plan
    assert len(await claimed(db, 2_000)) == 2_000


# -- max_queued: the database refuses the INSERT -------------------------------------------------------


async def test_max_queued_refuses_the_insert_with_a_clear_message(db: Any) -> None:
    await fairness.publish(db, settings(tenant_defaults={"max_queued": 100}, tenants={"vip": {}}))
    await insert_many(db, "acme", 100)
    with pytest.raises(asyncpg.exceptions.ConfigurationLimitExceededError) as refused:
        await insert_many(db, "acme", 1)
    assert refused.value.args[0] == "tenant acme may have at most 100 queued jobs"
    assert "batchd tenant set acme --max-queued" in (refused.value.hint or "")
    # A statement that would pass the limit is refused whole.
    with pytest.raises(asyncpg.exceptions.ConfigurationLimitExceededError):
        await insert_many(db, "globex", 101)
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE tenant_id = 'globex'") == 0
    # Jobs that leave the queue make room again.
    await db.execute(
        "UPDATE batchd.jobs SET status = 'canceled' WHERE id IN"
        " (SELECT id FROM batchd.jobs WHERE tenant_id = 'acme' ORDER BY seq LIMIT 5)"
    )
    await insert_many(db, "acme", 5)
    # `batchd tenant set` wins over batchd.toml, and `none` goes back to it.
    await fairness.set_limits(db, "acme", max_queued=200)
    await insert_many(db, "acme", 100)
    await fairness.set_limits(db, "acme", max_queued=None)
    with pytest.raises(asyncpg.exceptions.ConfigurationLimitExceededError):
        await insert_many(db, "acme", 1)


async def test_no_limit_anywhere_means_no_count(db: Any) -> None:
    await fairness.publish(db, settings())
    await insert_many(db, "acme", 5_000)
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 5_000


async def test_the_insert_trigger_knows_at_once_when_a_limit_comes_or_goes(db: Any) -> None:
    # The trigger reads "is any max_queued set?" from batchd.wakeup; each road that sets or clears one
    # must keep it true.
    await fairness.publish(db, settings())
    await insert_many(db, "acme", 3)
    await fairness.set_limits(db, "acme", max_queued=3)
    with pytest.raises(asyncpg.exceptions.ConfigurationLimitExceededError):
        await insert_many(db, "acme", 1)
    await db.execute("UPDATE batchd.tenants SET max_queued = NULL")
    await insert_many(db, "acme", 1)  # no limit anywhere again
    await fairness.publish(db, settings(tenant_defaults={"max_queued": 4}))
    with pytest.raises(asyncpg.exceptions.ConfigurationLimitExceededError):
        await insert_many(db, "acme", 1)
    await db.execute("TRUNCATE batchd.configured_limits")
    await insert_many(db, "acme", 1)
    assert not await db.fetchval("SELECT queue_limited FROM batchd.wakeup")


@pytest.fixture
async def second_connection(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    try:
        yield connection
    finally:
        await connection.close()


async def test_two_producers_at_once_cannot_pass_max_queued_together(
    db: Any, second_connection: asyncpg.Connection
) -> None:
    await fairness.publish(db, settings(tenant_defaults={"max_queued": 100}))
    first = db.transaction()
    await first.start()
    await insert_many(db, "acme", 60)  # holds acme's lock until it commits
    # The second waits for the lock, then counts the first's committed rows: 120 > 100.
    second = asyncio.create_task(insert_many(second_connection, "acme", 60))

    async def second_is_waiting() -> bool:
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid = $1",
            second_connection.get_server_pid(),
        )
        return bool(waiting)

    await wait_until(second_is_waiting)
    await first.commit()
    with pytest.raises(asyncpg.exceptions.ConfigurationLimitExceededError):
        await second
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 60


async def test_tenant_set_on_the_command_line(db: Any, database_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "BATCHD_DATABASE__URL": database_url}
    env.pop("BATCHD_CONFIG", None)

    async def batchd(*args: str) -> tuple[int, str, str]:
        return await run_python("-m", "batchd", *args, env=env, cwd=tmp_path)

    code, out, err = await batchd("tenant", "set", "acme", "--weight", "3", "--max-queued", "10_000")
    assert code == 0, err
    assert out.splitlines()[-1] == "acme: weight 3 (set), max queued 10,000 (set), max in flight none"
    code, out, err = await batchd("tenant", "set", "acme", "--weight", "none", "--max-in-flight", "500")
    assert code == 0, err
    assert out.splitlines()[-1] == "acme: weight 1, max queued 10,000 (set), max in flight 500 (set)"
    code, _, err = await batchd("tenant", "set", "acme", "--weight", "0")
    assert code == 2
    assert "expected at least 1 and at most 10000, got '0'" in err
    code, _, err = await batchd("tenant", "set", "acme", "--max-queued", "lots")
    assert code == 2
    assert "expected a whole number or 'none', got 'lots'" in err


def test_bad_limits_in_the_config_are_refused() -> None:
    with pytest.raises(ValueError, match="weight"):
        settings(tenants={"acme": {"weight": 0}})
    with pytest.raises(ValueError, match="max_queued"):
        settings(tenant_defaults={"max_queued": -1})
    with pytest.raises(ValueError, match="surrounding spaces"):
        settings(tenants={" acme": {"weight": 2}})


# -- the scenario, through the daemon ----------------------------------------------------------

# Batches that take long enough to stay open while the test looks at the first one.
SLOW = EmulatorConfig(processing_time_s=(600.0, 600.0), seed=7)


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return SLOW


async def test_the_first_batch_holds_the_small_tenants_jobs(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    await insert_many(db, "dumper", 20_000)
    small = await insert_raw(db, "small", [f"small {i}" for i in range(10)])
    config = daemon_settings(batching={"max_requests": 1_000, "max_in_flight_requests": 1_000})
    async with start_daemon(config):
        await wait_until(
            lambda: _true(
                db.fetchval("SELECT count(*) FROM batchd.batches WHERE provider_batch_id IS NOT NULL")
            )
        )
        first = await db.fetchval("SELECT id FROM batchd.batches ORDER BY created_at LIMIT 1")
        in_first = await db.fetch("SELECT id, tenant_id FROM batchd.jobs WHERE batch_id = $1", first)
    assert len(in_first) == 1_000
    assert {row["id"] for row in in_first if row["tenant_id"] == "small"} == set(small)
    # The provider received that batch, and no other yet (max_in_flight_requests).
    stats = await emulator.stats()
    assert (stats["batches_created"], stats["requests_received"]) == (1, 1_000)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM batchd.jobs WHERE tenant_id = 'small' AND status = 'submitted'"
        )
        == 10
    )


async def _true(value: Any) -> bool:
    return bool(await value)


def test_a_partial_update_passes_each_value_and_whether_it_was_given() -> None:
    """budgets.set_budget and fairness.set_limits share one sentinel: not given (UNSET) is not None."""
    assert update_parameters(UNSET, None, 3) == [None, None, 3, False, True, True]
