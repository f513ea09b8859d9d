"""Fair sharing between tenants: weighted turns in each batch, max_queued refused by the database,
max_in_flight held back by the flusher, and jobs sharing a cacheable prefix taken together.

Most tests claim straight from the database (store.claim, in a transaction rolled back afterwards): the
claim is where fairness lives. One runs the whole daemon for the issue's own scenario.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support import EmulatorHandle, insert_raw, make_settings, raw_request, run_python, wait_until

from batchd import fairness, store
from batchd.config import RoutingSettings
from batchd.context import Context
from batchd.emulator import EmulatorConfig
from batchd.flusher import Flusher
from batchd.provider import Provider
from batchd.ratelimit import RateLimiter
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


# -- the pick against its rule, stated here in Python ------------------------------------------------------


def cacheable_prefix(job_type: str | None, request: dict[str, Any] | None) -> Any:
    """What a job shares a cacheable prefix with others by, as fairness.py says; None: a group of its own."""
    if job_type is not None:
        return ("type", job_type)
    assert request is not None
    shared = [request.get("tools"), request.get("system")]
    if '"cache_control"' not in json.dumps(shared):
        return None
    return (request.get("model"), json.dumps(shared, sort_keys=True))


async def expected_pick(db: Any, limit: int, window: int, taken: list[Any]) -> list[Any]:
    """The fair claim's jobs in turn order, by the rule: each tenant's window (its first `window` jobs
    that may go, fewer under max_in_flight) in groups of a cacheable prefix, each group from its first job;
    the n-th of a tenant of weight w at turn (n - 1/2) / w, exactly; ties to the older job."""
    jobs = await db.fetch(
        "SELECT j.id, j.tenant_id, j.seq, j.job_type, j.request FROM batchd.jobs AS j"
        " WHERE j.status = 'queued' AND j.id <> ALL($1::uuid[])"
        "   AND j.tenant_id NOT IN (SELECT tenant_id FROM batchd.held_tenants)"
        "   AND batchd.batch_bound(j.route, j.path, j.deadline,"
        "                          (SELECT p90_s FROM batchd.batch_turnaround($2, $3, $4)) + $5)"
        " ORDER BY j.seq",
        taken,
        *ROUTING.params(),
    )
    limits = {
        row["tenant_id"]: row
        for row in await db.fetch(
            "SELECT t.tenant_id, l.weight, l.max_in_flight,"
            "       (SELECT count(*) FROM batchd.jobs AS f WHERE f.tenant_id = t.tenant_id"
            "           AND f.status IN ('submitting', 'submitted'))"
            "       + (SELECT count(*) FROM batchd.jobs AS u WHERE u.id = ANY($1::uuid[])"
            "           AND u.tenant_id = t.tenant_id) AS in_flight"
            "  FROM (SELECT DISTINCT tenant_id FROM batchd.jobs) AS t"
            " CROSS JOIN LATERAL batchd.tenant_limits(t.tenant_id) AS l",
            taken,
        )
    }
    turns: list[tuple[Fraction, int, Any]] = []
    for tenant, limit_row in limits.items():
        room = window
        if limit_row["max_in_flight"] is not None:
            room = min(window, max(0, limit_row["max_in_flight"] - limit_row["in_flight"]))
        queue = [job for job in jobs if job["tenant_id"] == tenant][:room]
        firsts: dict[Any, int] = {}
        for job in queue:
            firsts.setdefault(cacheable_prefix(job["job_type"], job["request"]), job["seq"])
        grouped = sorted(
            queue,
            key=lambda job: (
                job["seq"]
                if (prefix := cacheable_prefix(job["job_type"], job["request"])) is None
                else firsts[prefix],
                job["seq"],
            ),
        )
        turns += [
            (Fraction(2 * n - 1, 2 * limit_row["weight"]), job["seq"], job["id"])
            for n, job in enumerate(grouped, 1)
        ]
    return [job_id for _, _, job_id in sorted(turns)[:limit]]


async def queue_of_every_kind(db: Any, rng: random.Random) -> None:
    """Tenants of several weights, limits and holds; raw requests, some with a cached system prompt, and job
    types; jobs routed every way; some already in flight."""
    tenants = [f"t{i}" for i in range(rng.randint(1, 6))]
    for tenant in tenants:
        if rng.random() < 0.5:
            await db.execute(
                "INSERT INTO batchd.tenants (name, weight, max_in_flight, hold_reason)"
                " VALUES ($1, $2, $3, $4)",
                tenant,
                rng.choice([1, 2, 3, 4, 6, 9]),
                rng.choice([None, None, rng.randint(0, 120)]),
                "over budget" if rng.random() < 0.1 else None,
            )
    rows: list[tuple[str, str | None, str | None, str | None, str]] = []
    for tenant in tenants:
        mixed = rng.random() < 0.5
        for i in range(rng.choice([rng.randint(1, 15), rng.randint(1, 250), rng.randint(200, 500)])):
            if mixed and rng.random() < 0.4:
                job_type = rng.choice(["classify", "summarize"])
                rows.append((tenant, None, job_type, json.dumps({"text": f"{i}"}), "batch"))
                continue
            system = rng.choice(["A", "B"]) * 40
            cached = {"system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]}
            request = raw_request(f"{tenant} {i}", **(cached if mixed and rng.random() < 0.5 else {}))
            route = rng.choices(["batch", "auto", "sync"], [12, 2, 1])[0]
            rows.append((tenant, json.dumps(request), None, None, route))
    rng.shuffle(rows)
    await db.execute(
        "INSERT INTO batchd.jobs (tenant_id, request, job_type, input, route, deadline)"
        " SELECT t, r::jsonb, jt, i::jsonb, ro,"
        "        CASE WHEN ro = 'auto' AND random() < 0.5 THEN now() + interval '1 minute' END"
        "   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS q (t, r, jt, i, ro)",
        *(list(column) for column in zip(*rows, strict=True)),
    )
    batch_id = await db.fetchval(sql("insert_batch"), "fairtest0002", 1, 1000, "test", 60.0)
    await db.execute(
        "UPDATE batchd.jobs SET status = 'submitting', batch_id = $1"
        " WHERE id IN (SELECT id FROM batchd.jobs WHERE route = 'batch' ORDER BY random() LIMIT 40)",
        batch_id,
    )
    await db.execute("ANALYZE batchd.jobs")


@pytest.mark.parametrize("seed", range(8))
async def test_the_fair_pick_follows_its_rule(db: Any, seed: int) -> None:
    rng = random.Random(seed)
    await queue_of_every_kind(db, rng)
    for _ in range(4):
        limit = rng.choice([1, 7, 50, 180, 1_000])
        window = rng.choice([limit, 2 * limit, 3 * limit + 7])
        taken = [
            row["id"] for row in await db.fetch("SELECT id FROM batchd.jobs WHERE status = 'queued' LIMIT 3")
        ]
        taken = taken if rng.random() < 0.3 else []
        expected = await expected_pick(db, limit, window, taken)
        transaction = db.transaction()
        await transaction.start()
        try:
            rows = await db.fetch(sql("claim_fair"), limit, taken, window, *ROUTING.params())
            picked = [job.id for job in store.in_turn_order(rows)]
        finally:
            await transaction.rollback()
        assert picked == expected, (limit, window, len(taken))


async def test_equal_turns_go_to_the_older_job_whatever_the_weights(db: Any) -> None:
    # (11 - 1/2) / 9 = (4 - 1/2) / 3: the 14th place is nine's 11th job or three's 4th, and nine's is older.
    await fairness.publish(db, settings(tenants={"nine": {"weight": 9}, "three": {"weight": 3}}))
    await insert_many(db, "nine", 50)
    await insert_many(db, "three", 50)
    assert Counter(job["tenant_id"] for job in await claimed(db, 14)) == {"nine": 11, "three": 3}


async def claim_whole_or_not(db: Any, limit: int) -> store.Claim:
    """store.claim as the flusher calls it when it does not know whether everything fits; nothing is kept."""
    transaction = db.transaction()
    await transaction.start()
    try:
        return await store.claim(db, limit, LONG_AGO, 2 * limit, ROUTING)
    finally:
        await transaction.rollback()


async def test_what_fits_is_taken_whole_in_one_pass(db: Any) -> None:
    await insert_many(db, "a", 30)
    await insert_many(db, "b", 5)
    sync = await insert_raw(db, "b", ["now"])
    await db.execute("UPDATE batchd.jobs SET route = 'sync' WHERE id = $1", sync[0])
    await db.execute("INSERT INTO batchd.tenants (name, hold_reason) VALUES ('held', 'over budget')")
    await insert_many(db, "held", 5)
    claim = await claim_whole_or_not(db, 35)
    # Every job that may go, in seq order: none of a held tenant's, none the sync path's.
    assert claim.whole
    seqs = {row["id"]: row["seq"] for row in await db.fetch("SELECT id, seq FROM batchd.jobs")}
    assert [seqs[job.id] for job in claim.jobs] == sorted(seqs[job.id] for job in claim.jobs)
    assert Counter(job.tenant_id for job in claim.jobs) == {"a": 30, "b": 5}
    assert {job.path_reason for job in claim.jobs} == {"batch: route = batch"}
    # One job more than fits: the claim is the fair one, b's 5 in the first turns.
    claim = await claim_whole_or_not(db, 34)
    assert not claim.whole
    assert Counter(job.tenant_id for job in claim.jobs[:10]) == {"a": 5, "b": 5}
    # A max_in_flight anywhere is the fair claim's to weigh, even when everything fits.
    await fairness.set_limits(db, "a", max_in_flight=1_000)
    assert not (await claim_whole_or_not(db, 35)).whole


async def test_a_whole_claim_past_max_bytes_is_cut_fairly(db: Any, database_url: str) -> None:
    # Every job fits by count, not by bytes: which wait for the next batch is fairness's to decide, so the
    # small tenant's jobs, last in seq order, are in the batch.
    await insert_many(db, "dumper", 300)
    small = await insert_raw(db, "small", [f"small {i}" for i in range(5)])
    request_bytes = await db.fetchval(
        "SELECT octet_length(request::text) FROM batchd.jobs WHERE id = $1", small[0]
    )
    settings = make_settings(
        database_url,
        "http://unused",
        batching={"max_requests": 1_000, "max_bytes": 100 * (request_bytes + 100), "max_wait_s": 3600},
    )
    pool = await store.create_pool(database_url, max_size=2)
    provider = Provider("test-key", base_url="http://unused", limiter=RateLimiter(60), timeout_s=10)
    try:
        flushed = await Flusher(
            Context(pool=pool, settings=settings, provider=provider), lambda *_: None
        ).flush_one()
    finally:
        await provider.close()
        await pool.close()
    assert flushed.batch_id is not None
    assert flushed.jobs < 305  # cut short by max_bytes
    batch = await db.fetch("SELECT tenant_id FROM batchd.jobs WHERE batch_id = $1", flushed.batch_id)
    assert Counter(row["tenant_id"] for row in batch)["small"] == 5


async def claim_plan(db: Any, limit: int) -> str:
    """EXPLAIN ANALYZE of the fair claim of `limit` jobs (a window of twice as many), with the default routing
    and the claim's settings, in a transaction rolled back."""
    transaction = db.transaction()
    await transaction.start()
    try:
        await db.execute(sql("claim_settings"))
        rows = await db.fetch(
            "EXPLAIN (ANALYZE) " + sql("claim_fair"), limit, [], 2 * limit, *ROUTING.params()
        )
        return "\n".join(row[0] for row in rows)
    finally:
        await transaction.rollback()


async def test_each_tenants_queue_is_read_from_the_tenants_index(db: Any) -> None:
    # Statistics that show 20 tenants, then a small one behind them: left to its defaults, the planner read
    # each tenant's whole queue from jobs_live and sorted it (with two tenants, it walked the whole queue in
    # seq order, jobs_queued, to find the small one's jobs).
    for tenant in range(20):
        await insert_many(db, f"t{tenant:02}", 500)
    await db.execute("ANALYZE batchd.jobs")
    await insert_many(db, "small", 5)
    plan = await claim_plan(db, 100)
    assert "Index Scan using jobs_queued_tenant" in plan, plan
    assert "using jobs_queued on" not in plan, plan
    assert "Index Scan using jobs_live" not in plan, plan  # the skip scan is an Index Only Scan


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
        # Sent, and its jobs recorded submitted (its provider id is committed first).
        await wait_until(
            lambda: _true(db.fetchval("SELECT count(*) FROM batchd.batches WHERE status = 'in_progress'"))
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
