"""The queue and batch turnaround over time (flow.py): one sample per interval whatever the number of
daemons, batch turnaround tallied by the apply, GET /v1/series' `flow` per principal (a tenant its own, the
admin every tenant's), read at a cost set by the window, not by the history, and pruned with it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from support import ADMIN_TOKEN, APPLIED_BATCHES, QUICK, insert_aged, insert_raw, wait_for_jobs
from test_series import get_series, rows_read

from batchd import flow, pruner, rollups
from batchd.config import RetentionSettings
from batchd.emulator import EmulatorConfig
from batchd.store import create_pool, sql

ROUTING = (10, 5, 3600.0)  # window, min_samples, prior_s
ROUTING_P90 = 91.0  # APPLIED_BATCHES' p90
TURNAROUND = "INSERT INTO batchd.turnaround_tallies (at, tenant_id, bucket, jobs) VALUES ($1, $2, $3, $4)"


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=4)
    yield pool
    await pool.close()


async def test_the_bucket_is_the_same_in_sql_and_in_python(db: Any) -> None:
    values = [0.0, 0.5, 1.0, 1.1, 1.2, 2.5, 59.9, 60.0, 61.0, 3599.0, 86_400.0, 10**7]
    for seconds in values:
        bucket = await db.fetchval("SELECT batchd.turnaround_bucket($1)", seconds)
        assert bucket == flow.bucket_of(seconds), seconds
        if 1.2 < seconds < 2**19:
            # The bucket's middle is within 9% of every value in it.
            assert abs(flow.bucket_middle(bucket) / seconds - 1) < 0.091, seconds


def test_percentiles_are_read_from_the_buckets() -> None:
    sixty, hour = flow.bucket_of(60), flow.bucket_of(3600)
    histogram = {sixty: 9, hour: 1}
    assert flow.percentile(histogram, 0.5) == flow.bucket_middle(sixty)
    assert flow.percentile(histogram, 0.9) == flow.bucket_middle(sixty)
    assert flow.percentile({**histogram, hour: 2}, 0.9) == flow.bucket_middle(hour)
    assert flow.percentile({}, 0.5) is None


async def test_daemons_sampling_at_once_take_one_sample_per_interval(db: Any, pool: asyncpg.Pool) -> None:
    await db.execute(APPLIED_BATCHES)
    await insert_aged(db, "acme", 3, 120)
    await insert_aged(db, "globex", 2, 300)

    async def sample() -> tuple[bool, int]:
        async with pool.acquire() as connection:
            return await flow.sample(connection, 60.0, ROUTING)

    taken = await asyncio.gather(*(sample() for _ in range(4)))
    assert sorted(taken) == [(False, 0)] * 3 + [(True, 2)], (
        "one of four at once samples, the rest find it done"
    )
    assert await sample() == (False, 0), "and the next within the interval takes none either"
    rows = await db.fetch("SELECT * FROM batchd.flow ORDER BY span, tenant_id")
    assert {row["span"] for row in rows} == {"minute", "hour", "day"}
    by_tenant = {row["tenant_id"]: row for row in rows if row["span"] == "minute"}
    assert set(by_tenant) == {"", "acme", "globex"}
    assert [by_tenant[t]["queued_sum"] for t in ("", "acme", "globex")] == [5, 3, 2]
    assert 300 <= by_tenant[""]["oldest_max_s"] < 360
    assert 120 <= by_tenant["acme"]["oldest_max_s"] < 180
    assert by_tenant[""]["routing_p90_sum_s"] == pytest.approx(ROUTING_P90)
    assert all(row["samples"] == 1 for row in rows)

    # Past the interval, the next sample adds to the same minute's rows (or the next minute's).
    await db.execute("UPDATE batchd.flow_clock SET sampled_at = now() - interval '1 hour'")
    await insert_raw(db, "acme", ["one more"])
    assert await sample() == (True, 2)
    total = await db.fetchrow(
        "SELECT sum(samples) AS samples, sum(queued_sum) AS queued, max(queued_max) AS most FROM batchd.flow"
        " WHERE span = 'day' AND tenant_id = 'acme'"
    )
    assert (total["samples"], total["queued"], total["most"]) == (2, 7, 4)


async def test_batch_jobs_add_their_turnaround_when_applied(
    db: Any, start_daemon: Callable[..., Any], daemon_settings: Callable[..., Any]
) -> None:
    ids = await insert_raw(db, "acme", [f"job {n}" for n in range(7)])
    await insert_raw(db, "globex", ["other"], route="sync")
    # Sent sync: no batch, no turnaround.
    await db.execute("UPDATE batchd.jobs SET route = 'sync' WHERE tenant_id = 'globex'")
    async with start_daemon(daemon_settings(batching={"max_wait_s": 0.2})):
        await wait_for_jobs(db, done=8)
    rows = await db.fetch(
        "SELECT id, batchd.turnaround_bucket(extract(epoch FROM completed_at - created_at)::float8) AS bucket"
        " FROM batchd.jobs WHERE id = ANY($1::uuid[])",
        ids,
    )
    want: dict[int, int] = {}
    for row in rows:
        want[row["bucket"]] = want.get(row["bucket"], 0) + 1
    got = await db.fetch(
        "SELECT tenant_id, bucket, sum(jobs)::bigint AS jobs FROM"
        " (SELECT tenant_id, bucket, jobs FROM batchd.turnaround_tallies"
        "  UNION ALL SELECT tenant_id, bucket, jobs FROM batchd.turnarounds WHERE span = 'day') AS t"
        " GROUP BY 1, 2"
    )
    assert {row["bucket"]: row["jobs"] for row in got if row["tenant_id"] == "acme"} == want
    assert not [row for row in got if row["tenant_id"] != "acme"], "a sync job has no batch turnaround"


def minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


FLOW_ROW = """
INSERT INTO batchd.flow (span, start, tenant_id, samples, queued_sum, queued_max, oldest_max_s,
                         routing_p90_sum_s)
VALUES ($1, date_trunc($1, $2::timestamptz AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', $3, $4, $5, $6, $7, $8)
"""


async def test_the_series_flow_is_each_principals_own(db: Any, tokens: dict[str, str], serve: Any) -> None:
    # The daemon takes no sample of its own here: the numbers are the test's alone.
    await db.execute("UPDATE batchd.flow_clock SET sampled_at = 'infinity'")
    now: datetime = await db.fetchval("SELECT now()")
    ago = now - timedelta(minutes=10)
    for span in ("minute", "hour", "day"):
        # Two samples: 5 then 3 jobs of acme, 2 then 4 of globex; routing 100 then 200 s.
        await db.execute(FLOW_ROW, span, ago, "", 2, 14, 8, 900.0, 300.0)
        await db.execute(FLOW_ROW, span, ago, "acme", 2, 8, 5, 600.0, 0.0)
        await db.execute(FLOW_ROW, span, ago, "globex", 2, 6, 4, 900.0, 0.0)
    sixty, ten_min, hour = flow.bucket_of(60), flow.bucket_of(600), flow.bucket_of(3600)
    await db.execute(TURNAROUND, ago, "acme", sixty, 9)
    await db.execute(TURNAROUND, ago, "acme", ten_min, 1)
    await rollups.fold(db, 1000)
    await db.execute(TURNAROUND, ago, "globex", hour, 10)  # not folded yet: counted too
    who = {"acme": tokens["acme"], "globex": tokens["globex"], None: ADMIN_TOKEN}
    want = {
        "acme": (4.0, 5, 600.0, 10, sixty, sixty),
        "globex": (3.0, 4, 900.0, 10, hour, hour),
        None: (7.0, 8, 900.0, 20, ten_min, hour),
    }
    async with serve() as (_, url):
        for window, count, span in (("1h", 61, "minute"), ("1d", 25, "hour"), ("30d", 31, "day")):
            for principal, token in who.items():
                code, body = await get_series(url, token, window)
                assert code == 200, body
                series = body["flow"]
                assert series["interval"] == span
                intervals = series["intervals"]
                assert len(intervals) in (count, count + 1) if span == "minute" else len(intervals) == count
                (row,) = [
                    row
                    for row in intervals
                    if datetime.fromisoformat(row["start"]) == (minute(ago) if span == "minute" else None)
                    or (span != "minute" and row["turnaround_jobs"])
                ]
                queued, most, oldest, jobs, p50, p90 = want[principal]
                assert (row["queued"], row["queued_max"], row["oldest_wait_s"]) == (queued, most, oldest)
                assert row["routing_p90_s"] == 150.0, "the routing p90 is the database's, on average"
                assert row["turnaround_jobs"] == jobs
                assert row["turnaround_p50_s"] == pytest.approx(flow.bucket_middle(p50))
                assert row["turnaround_p90_s"] == pytest.approx(flow.bucket_middle(p90))
                others = [other for other in intervals if other is not row]
                assert all(other["samples"] == 0 and other["queued"] is None for other in others)
                assert all(other["turnaround_p50_s"] is None for other in others)
                if principal == "acme":
                    assert "globex" not in json.dumps(body)


# The flow's history as the defaults keep it at most (minutes for 2 days, hours for 400 days, days for
# good: here 400), for 5 tenants and every tenant together; turnarounds in 16 buckets each: a million rows.
FLOW_HISTORY = """
INSERT INTO batchd.flow (span, start, tenant_id, samples, queued_sum, queued_max, oldest_max_s)
SELECT s.span, date_trunc(s.span, now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' - g.n * s.step,
       CASE WHEN t = 0 THEN '' ELSE 't' || t END, 4, 8, 3, 60
  FROM (VALUES ('day', interval '1 day', 400), ('hour', interval '1 hour', 400 * 24),
               ('minute', interval '1 minute', 2 * 1440)) AS s (span, step, many)
 CROSS JOIN generate_series(0, 5) AS t
 CROSS JOIN LATERAL generate_series(0, s.many - 1) AS g (n)
"""
TURNAROUND_HISTORY = """
INSERT INTO batchd.turnarounds (span, start, tenant_id, bucket, jobs)
SELECT s.span, date_trunc(s.span, now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' - g.n * s.step, 't' || t, b, 1
  FROM (VALUES ('day', interval '1 day', 400), ('hour', interval '1 hour', 400 * 24),
               ('minute', interval '1 minute', 2 * 1440)) AS s (span, step, many)
 CROSS JOIN generate_series(1, 5) AS t
 CROSS JOIN generate_series(20, 35) AS b
 CROSS JOIN LATERAL generate_series(0, s.many - 1) AS g (n)
"""


@pytest.mark.slow
async def test_a_window_reads_only_its_rows_of_the_flow_history(db: Any) -> None:
    # One transaction: now() is the same for the history built and the windows read, which a minute's turn
    # between them would otherwise shift by one interval.
    async with db.transaction():
        await db.execute(FLOW_HISTORY)
        await db.execute(TURNAROUND_HISTORY)
        turnarounds = await db.fetchval("SELECT count(*) FROM batchd.turnarounds")
        assert turnarounds == 5 * 16 * (400 + 400 * 24 + 2 * 1440) > 1_000_000
        await db.execute("ANALYZE batchd.flow; ANALYZE batchd.turnarounds")
        for window, (seconds, _) in {
            "1h": (3600.0, ""),
            "1d": (86400.0, ""),
            "30d": (30 * 86400.0, ""),
        }.items():
            span = flow.SPANS[window]
            since = await db.fetchval(sql("flow_intervals").replace(";", " LIMIT 1;"), span, seconds)
            for query, table, per_interval in (
                ("flow_series", "flow", 6),
                ("turnaround_series", "turnarounds", 80),
            ):
                in_window = await db.fetchval(
                    f"SELECT count(*) FROM batchd.{table} WHERE span = $1 AND start >= $2",  # noqa: S608
                    span,
                    since,
                )
                count = {"minute": 61, "hour": 25, "day": 31}[span]
                assert in_window == per_interval * count
                (plan,) = json.loads(
                    await db.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql(query), span, since)
                )
                read = rows_read(plan["Plan"], table)
                assert read == in_window, (
                    f"{window}: read {read} rows of batchd.{table} for a window of {in_window}"
                )


async def test_the_flow_history_is_pruned_with_the_history(db: Any, pool: asyncpg.Pool) -> None:
    now: datetime = await db.fetchval("SELECT now()")
    for span, ago in (
        ("minute", timedelta(days=3)),
        ("minute", timedelta(hours=1)),
        ("hour", timedelta(days=401)),
        ("hour", timedelta(days=3)),
        ("day", timedelta(days=1000)),
    ):
        await db.execute(FLOW_ROW, span, now - ago, "acme", 1, 1, 1, 1.0, 0.0)
        await db.execute(
            "INSERT INTO batchd.turnarounds VALUES ($1, $2, 'acme', 3, 1)",
            span,
            (now - ago).replace(second=0),
        )
    deleted = await pruner.prune_history(pool, RetentionSettings())
    assert {kind: deleted[kind] for kind in deleted if kind.startswith(("flow", "turnarounds"))} == {
        "flow_minutes": 1,
        "flow_hours": 1,
        "turnarounds_minutes": 1,
        "turnarounds_hours": 1,
    }
    for table in ("flow", "turnarounds"):
        left = await db.fetch(f"SELECT span FROM batchd.{table} ORDER BY span")  # noqa: S608
        assert [row["span"] for row in left] == ["day", "hour", "minute"]
