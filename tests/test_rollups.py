"""The rollups are exact: random workloads of applies (twice, and cut off mid-transaction), retries, fails,
cancels, budget fails, set-asides and lost sync senders, folded at random moments, and every rollup (for all
time, per day, per hour, with the tallies not yet folded) equals a full scan of the jobs and the ledger it
summarises. Pruning the history leaves the totals as they were; the pruner deletes only what is past its
retention, and never a job in flight."""

from __future__ import annotations

import json
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from support import insert_raw, wait_until

from batchd import migrate, pruner, results, rollups
from batchd.config import RetentionSettings, Settings
from batchd.store import create_pool, init_connection, sql

OWNER = "batchd-test00000000"
TENANTS = ("acme", "globex", "initech")
MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-test-unpriced")
DAY_S = 86_400.0

# The facts every rollup sums, and the key it groups them by (besides its time bucket).
SUMS = (
    "jobs",
    "billed",
    "input_tokens",
    "output_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "cache_read_tokens",
    "cost_usd",
    "sync_cost_usd",
    "unpriced",
)
KEY = ("tenant_id", "status", "path", "job_type", "model")

# The jobs and the ledger, scanned whole: what the rollups must say. Written here independently of the
# statements that keep the rollups. `bucket` is the time bucket ('all': one).
FULL_SCAN = """
SELECT CASE $1::text WHEN 'all' THEN 'all'
            ELSE date_trunc($1::text, j.completed_at AT TIME ZONE 'UTC')::text END AS bucket,
       j.tenant_id, j.status, coalesce(j.path, '') AS path, coalesce(j.job_type, '') AS job_type,
       coalesce(c.model, '') AS model, count(*) AS jobs, count(c.job_id) AS billed,
       coalesce(sum(c.input_tokens), 0) AS input_tokens, coalesce(sum(c.output_tokens), 0) AS output_tokens,
       coalesce(sum(c.cache_write_5m_tokens), 0) AS cache_write_5m_tokens,
       coalesce(sum(c.cache_write_1h_tokens), 0) AS cache_write_1h_tokens,
       coalesce(sum(c.cache_read_tokens), 0) AS cache_read_tokens, coalesce(sum(c.cost_usd), 0) AS cost_usd,
       coalesce(sum(c.sync_cost_usd), 0) AS sync_cost_usd,
       count(c.job_id) FILTER (WHERE c.cost_usd IS NULL) AS unpriced
  FROM batchd.jobs AS j
  LEFT JOIN batchd.costs AS c ON c.job_id = j.id
 WHERE j.status IN ('succeeded', 'failed', 'canceled')
 GROUP BY 1, 2, 3, 4, 5, 6
"""

# The rollups of one span and the tallies not yet folded, by the same buckets.
ROLLED = """
SELECT bucket, tenant_id, status, path, job_type, model, sum(jobs) AS jobs, sum(billed) AS billed,
       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       sum(cache_write_5m_tokens) AS cache_write_5m_tokens,
       sum(cache_write_1h_tokens) AS cache_write_1h_tokens, sum(cache_read_tokens) AS cache_read_tokens,
       sum(cost_usd) AS cost_usd, sum(sync_cost_usd) AS sync_cost_usd, sum(unpriced) AS unpriced
  FROM (SELECT CASE $1::text WHEN 'all' THEN 'all' ELSE (start AT TIME ZONE 'UTC')::text END AS bucket, *
          FROM batchd.rollups WHERE span = $1
        UNION ALL
        SELECT CASE $1::text WHEN 'all' THEN 'all' ELSE date_trunc($1::text, at AT TIME ZONE 'UTC')::text END,
               NULL, '-infinity', tenant_id, status, path, job_type, model, jobs, billed, input_tokens,
               output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, cost_usd,
               sync_cost_usd, unpriced
          FROM batchd.tallies) AS r
 GROUP BY 1, 2, 3, 4, 5, 6
"""


def _table(rows: list[asyncpg.Record]) -> dict[tuple[str, ...], tuple[Any, ...]]:
    """Rows keyed by bucket and key, their sums as exact numbers; rows that sum to nothing left out."""
    table = {}
    for row in rows:
        sums = tuple(Decimal(row[name]) for name in SUMS)
        if any(sums):
            table[(row["bucket"], *(row[name] for name in KEY))] = sums
    return table


async def assert_exact(db: Any) -> None:
    for span in ("all", "week", "day", "hour"):
        scanned = _table(await db.fetch(FULL_SCAN, span))
        rolled = _table(await db.fetch(ROLLED, span))
        assert rolled == scanned, span
    assert scanned, "the workload finished no job: the comparison proved nothing"


async def totals(db: Any) -> dict[tuple[str, ...], tuple[Decimal, ...]]:
    """All-time totals as every reader sees them (batchd.totals_since)."""
    sums: defaultdict[tuple[str, ...], list[Decimal]] = defaultdict(lambda: [Decimal(0)] * len(SUMS))
    for row in await db.fetch("SELECT * FROM batchd.totals_since(NULL, NULL)"):
        key = tuple(row[name] for name in KEY)
        for i, name in enumerate(SUMS):
            sums[key][i] += Decimal(row[name])
    return {key: tuple(values) for key, values in sums.items()}


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=3)
    yield pool
    await pool.close()


def _usage(rng: random.Random) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": rng.randrange(1, 5000),
        "output_tokens": rng.randrange(1, 2000),
        "cache_read_input_tokens": rng.choice([0, rng.randrange(1, 9000)]),
        "cache_creation_input_tokens": rng.choice([0, rng.randrange(1, 3000)]),
    }
    if rng.random() < 0.5:
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": rng.randrange(0, 500),
            "ephemeral_1h_input_tokens": rng.randrange(0, 500),
        }
    return usage


def _message(rng: random.Random) -> str:
    return json.dumps(
        {
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": rng.choice(MODELS),
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": _usage(rng),
        }
    )


def _outcome(rng: random.Random, job_id: uuid.UUID) -> results.Row:
    roll = rng.random()
    if roll < 0.6:
        return (job_id, "succeeded", _message(rng), None)
    if roll < 0.75:
        return (job_id, "failed", None, json.dumps({"type": "invalid_request_error", "message": "bad"}))
    return (job_id, "retry", None, json.dumps({"type": "expired", "message": "expired"}))


class Workload:
    """Random steps, each through the statement batchd runs for it."""

    def __init__(self, db: Any, pool: asyncpg.Pool, dsn: str, rng: random.Random) -> None:
        self.db, self.pool, self.dsn, self.rng = db, pool, dsn, rng
        settings = Settings(batching={"max_attempts": 3})
        self.ctx: Any = SimpleNamespace(pool=pool, settings=settings, instance_id=OWNER)

    async def queued(self, count: int) -> list[uuid.UUID]:
        ids = await self.db.fetch(
            "SELECT id FROM batchd.jobs WHERE status = 'queued' ORDER BY random() LIMIT $1", count
        )
        return [row["id"] for row in ids]

    async def produce(self) -> None:
        tenant = self.rng.choice(TENANTS)
        count = self.rng.randrange(1, 12)
        if self.rng.random() < 0.5:
            await insert_raw(self.db, tenant, [f"{tenant} {i}" for i in range(count)])
        else:
            await self.db.execute(
                "INSERT INTO batchd.jobs (tenant_id, job_type, input)"
                ' SELECT $1, $2, \'{"text": "x"}\' FROM generate_series(1, $3)',
                tenant,
                self.rng.choice(("summarize", "classify")),
                count,
            )

    async def batch(self) -> tuple[Any, list[uuid.UUID]] | None:
        """Queued jobs in an ended batch this process holds, as the poller leaves them."""
        jobs = await self.queued(self.rng.randrange(1, 15))
        if not jobs:
            return None
        batch_id = await self.db.fetchval(
            "INSERT INTO batchd.batches (tag, request_count, bytes, status, owner)"
            " VALUES ($1, $2, 0, 'ended', $3) RETURNING id",
            uuid.uuid4().hex[:12],
            len(jobs),
            OWNER,
        )
        await self.db.execute(
            "UPDATE batchd.jobs SET status = 'submitted', batch_id = $1, path = 'batch' WHERE id = ANY($2)",
            batch_id,
            jobs,
        )
        return SimpleNamespace(id=batch_id, tag="abcdefabcdef"), jobs

    async def apply(self) -> None:
        made = await self.batch()
        if made is None:
            return
        batch, jobs = made
        rows = [_outcome(self.rng, job) for job in jobs]
        if self.rng.random() < 0.3:
            await self.cut_off_mid_apply(batch, rows)
        # Applied in one chunk or two, and maybe a second time (a restart): the second changes nothing.
        cut = self.rng.randrange(0, len(rows) + 1)
        for part in (rows[:cut], rows[cut:]):
            if part:
                await results._apply_rows(self.ctx, batch, part)
        if self.rng.random() < 0.3:
            assert await results._apply_rows(self.ctx, batch, rows) == 0

    async def cut_off_mid_apply(self, batch: Any, rows: list[results.Row]) -> None:
        """The apply statement runs, and the connection is cut before it commits: nothing counts."""
        connection = await asyncpg.connect(self.dsn)
        try:
            async with connection.transaction():
                await connection.execute(sql("create_results_table"))
                await connection.copy_records_to_table(
                    "batchd_results", records=rows, columns=results.RESULT_COLUMNS
                )
                prices = self.ctx.settings.pricing
                await results.publish_prices(connection, prices)
                await connection.fetchrow(sql("apply_results"), batch.id, 3, prices.price_set, OWNER)
                await self.db.execute("SELECT pg_terminate_backend($1)", connection.get_server_pid())
                await connection.execute("SELECT 1")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            pass
        else:
            raise AssertionError("the cut connection committed")
        finally:
            connection.terminate()

    async def cancel(self) -> None:
        for job in await self.queued(self.rng.randrange(1, 4)):
            if self.rng.random() < 0.5:
                await self.db.execute("SELECT batchd.cancel_job($1)", job)
            else:
                await self.db.execute("UPDATE batchd.jobs SET status = 'canceled' WHERE id = $1", job)

    async def fail(self) -> None:
        jobs = await self.queued(self.rng.randrange(1, 4))
        await self.db.execute(sql("fail_jobs"), jobs, ["request lacks model"] * len(jobs))

    async def set_aside(self) -> None:
        made = await self.batch()
        if made is not None:
            batch, jobs = made
            await self.db.fetchval(
                sql("set_aside_job"), batch.id, jobs[0], "a row the apply could not write", OWNER
            )

    async def lose_sync_sender(self) -> None:
        """Jobs sent synchronously by a daemon that died: failed at max_attempts, or queued again."""
        jobs = await self.queued(self.rng.randrange(1, 4))
        await self.db.execute(
            "UPDATE batchd.jobs SET status = 'sending', path = 'sync', sync_owner = 'gone',"
            " sync_lease_until = now() - interval '1 second', attempts = $2 WHERE id = ANY($1)",
            jobs,
            self.rng.randrange(0, 3),
        )
        await self.db.fetch(sql("requeue_expired_sync"), 3)

    async def send_sync(self) -> None:
        """Jobs sent synchronously and applied by the sync path (priced at the full price)."""
        jobs = await self.queued(self.rng.randrange(1, 4))
        await self.db.execute(
            "UPDATE batchd.jobs SET status = 'sending', path = 'sync', sync_owner = $2,"
            " sync_lease_until = now() + interval '1 minute' WHERE id = ANY($1)",
            jobs,
            OWNER,
        )
        rows = [(*_outcome(self.rng, job), 1.0) for job in jobs]
        await results.apply_rows(
            self.ctx, rows, [*results.RESULT_COLUMNS, "retry_in_s"], batch_id=None, owner=OWNER
        )

    async def over_budget(self) -> None:
        """A tenant over its budget with over_budget = fail: its queued jobs fail; then released."""
        tenant = self.rng.choice(TENANTS)
        await self.db.execute(
            "INSERT INTO batchd.tenants (name, budget_day_usd, over_budget) VALUES ($1, 0, 'fail')"
            " ON CONFLICT (name) DO UPDATE SET budget_day_usd = 0, over_budget = 'fail'",
            tenant,
        )
        await self.db.fetchrow(sql("check_budgets"), None)
        await self.db.execute("UPDATE batchd.tenants SET budget_day_usd = NULL WHERE name = $1", tenant)
        await self.db.fetchrow(sql("check_budgets"), None)

    async def fold(self) -> None:
        async with self.pool.acquire() as connection:
            await rollups.fold(connection, self.rng.randrange(1, 20))


@pytest.mark.parametrize("seed", range(4))
async def test_every_rollup_equals_a_full_scan_of_what_it_counts(
    db: Any, pool: asyncpg.Pool, database_url: str, seed: int
) -> None:
    rng = random.Random(seed)
    work = Workload(db, pool, database_url, rng)
    await run_workload(work, 60)
    await assert_exact(db)
    await work.fold()  # folded part way or whole, the sums are the same
    await assert_exact(db)
    async with pool.acquire() as connection:
        await rollups.fold(connection, 10_000)
    assert await db.fetchval("SELECT count(*) FROM batchd.tallies") == 0
    await assert_exact(db)


async def run_workload(work: Workload, steps: int) -> None:
    choices = [
        (work.produce, 6),
        (work.apply, 5),
        (work.cancel, 2),
        (work.fail, 1),
        (work.set_aside, 1),
        (work.lose_sync_sender, 1),
        (work.send_sync, 2),
        (work.over_budget, 1),
        (work.fold, 2),
    ]
    for _ in range(steps):
        step = work.rng.choices([s for s, _ in choices], weights=[w for _, w in choices])[0]
        await step()


async def counts(db: Any, query: str) -> dict[str, int]:
    return {row[0]: row[1] for row in await db.fetch(query)}


async def test_pruning_deletes_only_what_is_past_its_retention_and_the_totals_stay(
    db: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    work = Workload(db, pool, database_url, random.Random(7))
    await run_workload(work, 80)
    await work.produce()  # some jobs are surely still queued
    before = await totals(db)
    live = await counts(
        db, "SELECT status, count(*) FROM batchd.jobs WHERE status IN ('queued', 'submitted') GROUP BY 1"
    )
    finished = await counts(db, "SELECT status, count(*) FROM batchd.jobs GROUP BY 1")
    assert all(finished.get(status) for status in ("succeeded", "failed", "canceled")), finished
    # Forty days on for the jobs and their batches, 500 for the money history.
    await db.execute(
        "UPDATE batchd.jobs SET completed_at = completed_at - interval '40 days'"
        " WHERE status IN ('succeeded', 'failed', 'canceled')"
    )
    await db.execute("UPDATE batchd.batches SET created_at = created_at - interval '40 days'")
    await db.execute("UPDATE batchd.costs SET at = at - interval '500 days'")
    await db.execute("UPDATE batchd.rollups SET start = start - interval '500 days' WHERE span = 'hour'")
    batches_with_failed = await db.fetchval(
        "SELECT count(DISTINCT batch_id) FROM batchd.jobs WHERE status = 'failed' AND batch_id IS NOT NULL"
    )
    retention = RetentionSettings(
        succeeded_s=30 * DAY_S, failed_s=50 * DAY_S, canceled_s=30 * DAY_S, chunk=3, busy_share=1
    )
    deleted = await pruner.prune_history(pool, retention)

    assert deleted["jobs_succeeded"] == finished["succeeded"]
    assert deleted["jobs_canceled"] == finished["canceled"]
    assert deleted["jobs_failed"] == 0, "failed jobs are kept 50 days"
    left = await counts(db, "SELECT status, count(*) FROM batchd.jobs GROUP BY 1")
    assert left == {**live, "failed": finished["failed"]}, "no job in flight was touched"
    # A batch goes once no job refers to it: those with a failed job stay.
    assert (
        await db.fetchval(
            "SELECT count(*) FROM batchd.batches WHERE status IN ('applied', 'abandoned', 'ended')"
            " AND NOT EXISTS (SELECT 1 FROM batchd.jobs WHERE batch_id = batches.id)"
            " AND status <> 'ended'"
        )
        == 0
    )
    assert (
        await db.fetchval("SELECT count(*) FROM batchd.batches WHERE status = 'ended'") >= batches_with_failed
    )
    assert await db.fetchval("SELECT count(*) FROM batchd.costs") == 0
    assert deleted["costs"] > 0
    assert deleted["hourly_rollups"] > 0
    assert await db.fetchval("SELECT count(*) FROM batchd.rollups WHERE span = 'hour'") == 0
    assert await totals(db) == before, "the rollups keep what the pruned rows counted"

    # Kept for good (`inf`): nothing is looked at.
    forever = RetentionSettings(succeeded_s=float("inf"), failed_s=float("inf"), canceled_s=float("inf"))
    flow = {f"{table}_{span}" for table in ("flow", "turnarounds") for span in ("minutes", "hours")}
    assert set(await pruner.prune_history(pool, forever)) == {"costs", "hourly_rollups", *flow}
    assert await counts(db, "SELECT status, count(*) FROM batchd.jobs GROUP BY 1") == left


def test_the_ledger_is_kept_at_least_a_month_for_the_budgets() -> None:
    with pytest.raises(ValueError, match="greater than or equal"):
        RetentionSettings(ledger_s=DAY_S)


# A history as batchd before 0012 left it: finished jobs over ten days, each succeeded one with its ledger row
# (some unpriced), and jobs still in flight.
OLD_HISTORY = """
INSERT INTO batchd.jobs (tenant_id, request, job_type, input)
SELECT (ARRAY['acme', 'globex', 'initech'])[1 + i % 3],
       CASE WHEN i % 4 = 0 THEN NULL ELSE '{"model": "m", "max_tokens": 1, "messages": [1]}'::jsonb END,
       CASE WHEN i % 4 = 0 THEN 'summarize' END, CASE WHEN i % 4 = 0 THEN '{}'::jsonb END
  FROM generate_series(1, 400) AS i;
UPDATE batchd.jobs
   SET status = (ARRAY['succeeded', 'succeeded', 'failed', 'canceled', 'queued'])[1 + seq % 5],
       path = (ARRAY['batch', 'sync', NULL])[1 + seq % 3],
       completed_at = now() - make_interval(hours => ((seq * 7) % 240)::integer);
"""
OLD_LEDGER = """
INSERT INTO batchd.costs (job_id, attempt, tenant_id, model, job_type, batch_id, via, at, input_tokens,
                          output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens,
                          cost_usd, sync_cost_usd)
SELECT id, attempts, tenant_id, (ARRAY['claude-sonnet-4-5', 'claude-haiku-4-5'])[1 + seq % 2], job_type, NULL,
       coalesce(path, 'batch'), completed_at, seq * 3, seq, seq % 7, seq % 5, seq % 11,
       CASE WHEN seq % 9 = 0 THEN NULL ELSE seq * 0.000001 END, seq * 0.000002
  FROM batchd.jobs
 WHERE status = 'succeeded'
"""


async def test_the_upgrade_to_0012_tallies_the_history_so_far(blank_database_url: str) -> None:
    connection = await asyncpg.connect(blank_database_url)
    try:
        await init_connection(connection)
        await connection.execute(sql("create_migrations_table"))
        for migration in (m for m in migrate.shipped_migrations() if m.version < 12):
            await connection.execute(migration.text)
            await connection.execute(
                sql("record_migration"), migration.version, migration.name, migration.checksum
            )
        await connection.execute(OLD_HISTORY)
        await connection.execute(OLD_LEDGER)
        later = [m.version for m in migrate.shipped_migrations() if m.version >= 12]
        assert [m.version for m in await migrate.migrate(connection)] == later
        assert await connection.fetchval("SELECT count(*) FROM batchd.rollups") == 0, "the daemon folds"
        await assert_exact(connection)
        await rollups.fold(connection, 50)
        assert await connection.fetchval("SELECT count(*) FROM batchd.tallies") == 0
        await assert_exact(connection)
    finally:
        await connection.close()


# Tallies spread over ten weeks, for the spans' seams: each `since` below is answered from the hour, day and
# week rows that cover it, and must equal the tallies from its hour on, summed as they were written.
SPREAD = """
INSERT INTO batchd.tallies (at, tenant_id, status, path, job_type, model, jobs, billed, input_tokens,
                            cost_usd)
SELECT now() - make_interval(mins => (i * 7919) % (70 * 24 * 60)), (ARRAY['acme', 'globex'])[1 + i % 2],
       (ARRAY['succeeded', 'failed'])[1 + i % 2], 'batch', '', (ARRAY['claude-sonnet-4-5', ''])[1 + i % 2], 1,
       (i + 1) % 2, i, i * 0.001
  FROM generate_series(1, 3000) AS i
"""
SINCE_TALLIES = """
SELECT tenant_id, status, sum(jobs) AS jobs, sum(input_tokens) AS input_tokens, sum(cost_usd) AS cost_usd
  FROM spread
 WHERE $1::timestamptz IS NULL
    OR at >= date_trunc('hour', $1::timestamptz AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
 GROUP BY 1, 2
"""
SINCE_ROLLUPS = """
SELECT tenant_id, status, sum(jobs) AS jobs, sum(input_tokens) AS input_tokens, sum(cost_usd) AS cost_usd
  FROM batchd.totals_since($1, NULL)
 GROUP BY 1, 2
"""


async def test_totals_since_any_hour_are_the_tallies_from_that_hour(db: Any) -> None:
    await db.execute(SPREAD)
    await db.execute("CREATE TEMPORARY TABLE spread AS SELECT * FROM batchd.tallies")
    await rollups.fold(db, 500)
    assert await db.fetchval("SELECT count(*) FROM batchd.tallies") == 0
    now = await db.fetchval("SELECT now()")
    # Mid-hour, on the hour, at midnight, on a Monday, and across days and weeks.
    sinces = [None, now, now - timedelta(minutes=90), now - timedelta(days=1, hours=5)]
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    monday = midnight - timedelta(days=midnight.weekday())
    sinces += [midnight, midnight - timedelta(days=3), monday, monday - timedelta(days=7, hours=13)]
    sinces += [
        now - timedelta(days=d, hours=h) for d, h in ((6, 23), (8, 1), (13, 0), (30, 7), (69, 0), (90, 0))
    ]
    for since in sinces:
        expected = {(r[0], r[1]): tuple(r)[2:] for r in await db.fetch(SINCE_TALLIES, since)}
        answered = {(r[0], r[1]): tuple(r)[2:] for r in await db.fetch(SINCE_ROLLUPS, since)}
        assert answered == expected, since
    assert await db.fetchval("SELECT count(DISTINCT span) FROM batchd.rollups") == 5


async def test_a_running_daemon_folds_and_prunes_and_its_totals_stay(
    db: Any, daemon_settings: Any, start_daemon: Any
) -> None:
    """The daemon's own loops: the fold empties the tallies, and the pruner deletes the finished jobs past
    a one-second retention, while the totals every reader sees stay."""
    await insert_raw(db, "acme", ["a", "b", "c"])
    jobs = [row["id"] for row in await db.fetch("SELECT id FROM batchd.jobs")]
    await db.execute(sql("fail_jobs"), jobs[:2], ["request lacks model"] * 2)
    await db.execute("SELECT batchd.cancel_job($1)", jobs[2])
    before = await totals(db)
    settings = daemon_settings(
        retention={"succeeded_s": 1, "failed_s": 1, "canceled_s": 1, "interval_s": 0.2},
        rollups={"fold_interval_s": 0.2},
    )
    async with start_daemon(settings):

        async def done() -> bool:
            left = await db.fetchval("SELECT count(*) FROM batchd.jobs")
            tallies = await db.fetchval("SELECT count(*) FROM batchd.tallies")
            return bool(left == 0 and tallies == 0)

        await wait_until(done, timeout=30)
    assert await totals(db) == before
    assert await db.fetchval("SELECT sum(jobs) FROM batchd.rollups WHERE span = 'all'") == 3
