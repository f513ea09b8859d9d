"""`GET /v1/series` (what the dashboard's charts draw): per hour or UTC day of a window, a tenant's own jobs
finished, spend and savings, batch and sync shares and cache hits (the admin's: every tenant's), read from
the rollups and the tallies not yet folded, at a cost set by the window, not by the history."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from support import ADMIN_TOKEN, QUICK

from batchd import rollups
from batchd.emulator import EmulatorConfig
from batchd.flow import Flow
from batchd.readings import SERIES_SUMS, SPEND_TENANTS, Series
from batchd.store import sql

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
TALLY = """
INSERT INTO batchd.tallies (at, tenant_id, status, path, model, jobs, billed, input_tokens, cache_read_tokens,
                            cost_usd, sync_cost_usd)
VALUES ($1, $2, $3, $4, 'm', $5, $5, $6, $7, $8, $9)
"""


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


# (tenant, how long ago, status, path, jobs, input tokens, cache read tokens, cost, Messages API cost)
Tally = tuple[str, timedelta, str, str, int, int, int, str, str]
FOLDED: list[Tally] = [
    ("acme", timedelta(hours=5), "succeeded", "batch", 3, 30, 0, "0.3", "0.6"),
    ("globex", timedelta(days=3), "succeeded", "batch", 4, 40, 0, "2", "4"),
    ("acme", timedelta(days=40), "succeeded", "batch", 9, 90, 0, "9", "18"),  # out of every window
]
UNFOLDED: list[Tally] = [
    ("acme", timedelta(minutes=10), "succeeded", "batch", 5, 100, 300, "1", "2"),
    ("acme", timedelta(minutes=10), "failed", "batch", 1, 0, 0, "0", "0"),
    ("acme", timedelta(minutes=10), "succeeded", "sync", 2, 20, 0, "0.6", "0.6"),
    ("globex", timedelta(minutes=10), "canceled", "", 1, 0, 0, "0", "0"),
]


def truncate(at: datetime, interval: str) -> datetime:
    at = at.replace(minute=0, second=0, microsecond=0)
    return at.replace(hour=0) if interval == "day" else at


def expected(
    now: datetime, since: datetime, interval: str, tenant: str | None, workload: list[Tally]
) -> dict[datetime, dict[str, Any]]:
    """What a series from `since` must say, from the workload: its intervals with something in them."""
    sums: dict[datetime, dict[str, Any]] = {}
    for who, ago, status, path, jobs, _, _, cost, sync in workload:
        start = truncate(now - ago, interval)
        if start < since or (tenant is not None and who != tenant):
            continue
        row = sums.setdefault(
            start,
            {
                "succeeded": 0,
                "failed": 0,
                "canceled": 0,
                "batch_jobs": 0,
                "sync_jobs": 0,
                "cost": 0,
                "sync": 0,
            },
        )
        row[status] += jobs
        if path:
            row[f"{path}_jobs"] += jobs
        row["cost"] += Decimal(cost)
        row["sync"] += Decimal(sync)
    return sums


async def get_series(url: str, token: str, window: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{url}/v1/series", params={"window": window}, headers={"Authorization": f"Bearer {token}"}
        ) as response,
    ):
        body: dict[str, Any] = await response.json()
        return response.status, body


async def test_each_window_counts_each_interval_for_the_admin_and_each_tenant_its_own(
    db: Any, tokens: dict[str, str], serve: Any
) -> None:
    now: datetime = await db.fetchval("SELECT now()")
    for tenant, ago, status, path, jobs, input_tokens, read, cost, sync in FOLDED:
        await db.execute(
            TALLY, now - ago, tenant, status, path, jobs, input_tokens, read, Decimal(cost), Decimal(sync)
        )
    await rollups.fold(db, 1000)
    assert await db.fetchval("SELECT count(*) FROM batchd.tallies") == 0
    # The tallies the fold has not reached yet count too.
    for tenant, ago, status, path, jobs, input_tokens, read, cost, sync in UNFOLDED:
        await db.execute(
            TALLY, now - ago, tenant, status, path, jobs, input_tokens, read, Decimal(cost), Decimal(sync)
        )
    workload = FOLDED + UNFOLDED
    who: list[tuple[str | None, str]] = [
        ("acme", tokens["acme"]),
        ("globex", tokens["globex"]),
        (None, ADMIN_TOKEN),
    ]
    async with serve() as (_, url):
        for window, count, interval in (("1h", 2, "hour"), ("1d", 25, "hour"), ("30d", 31, "day")):
            for principal, token in who:
                code, body = await get_series(url, token, window)
                assert code == 200, body
                assert (body["window"], body["interval"], body["tenant"]) == (window, interval, principal)
                intervals = body["intervals"]
                starts = [datetime.fromisoformat(row["start"]) for row in intervals]
                assert len(starts) == count, (window, starts)
                step = HOUR if interval == "hour" else DAY
                assert starts == [starts[0] + step * n for n in range(count)], "every interval, oldest first"
                # The interval the test began in, or the next when the daemon read the series past its end.
                assert starts[-1] in {truncate(now, interval), truncate(now, interval) + step}
                want = expected(now, starts[0], interval, principal, workload)
                got = {
                    start: row
                    for start, row in zip(starts, intervals, strict=True)
                    if row["succeeded"] or row["failed"] or row["canceled"]
                }
                assert set(got) == set(want), (window, principal)
                for start, row in got.items():
                    for key in ("succeeded", "failed", "canceled", "batch_jobs", "sync_jobs"):
                        assert row[key] == want[start][key], (window, principal, start, key)
                    assert row["cost_usd"] == pytest.approx(float(want[start]["cost"]))
                    assert row["sync_cost_usd"] == pytest.approx(float(want[start]["sync"]))
                    assert row["saved_usd"] == pytest.approx(float(want[start]["sync"] - want[start]["cost"]))
                    sent = row["batch_jobs"] + row["sync_jobs"]
                    assert row["batch_share"] == (pytest.approx(row["batch_jobs"] / sent) if sent else None)
                if principal is None:
                    assert_spend_by_tenant(now, starts, interval, body, workload)
                else:
                    assert "spend_by_tenant" not in body
                    assert "spend_others" not in body

        # The last 10 minutes, as acme sees them: 6 of its 8 jobs sent went in batches, and 300 of 420 prompt
        # tokens were read from the cache.
        _, body = await get_series(url, tokens["acme"], "1h")
        latest = next(
            row
            for row in body["intervals"]
            if datetime.fromisoformat(row["start"]) == truncate(now - timedelta(minutes=10), "hour")
        )
        assert latest["batch_share"] == pytest.approx(6 / 8)
        assert latest["cache_hit_ratio"] == pytest.approx(300 / 420)
        # A tenant's answer holds nothing of another's.
        for window in ("1h", "1d", "30d"):
            _, body = await get_series(url, tokens["globex"], window)
            assert "acme" not in json.dumps(body)
            assert sum(row["succeeded"] for row in body["intervals"]) == (4 if window == "30d" else 0)
        code, body = await get_series(url, tokens["acme"], "1y")
        assert code == 400
        assert "1h, 1d, 30d" in body["error"]["message"]
        code, _ = await get_series(url, "not-a-token", "1d")
        assert code == 401


def assert_spend_by_tenant(
    now: datetime, starts: list[datetime], interval: str, body: dict[str, Any], workload: list[Tally]
) -> None:
    """The admin's answer: each tenant that spent in the window, most first, its cost and saving in each
    interval; two tenants leave no others."""
    assert body["spend_others"] is None
    spent = {}
    for tenant in ("acme", "globex"):
        want = expected(now, starts[0], interval, tenant, workload)
        if sum(row["cost"] for row in want.values()):
            spent[tenant] = want
    got = body["spend_by_tenant"]
    assert [entry["tenant"] for entry in got] == sorted(
        spent, key=lambda tenant: -sum(row["cost"] for row in spent[tenant].values())
    )
    for entry in got:
        want = spent[entry["tenant"]]
        assert len(entry["intervals"]) == len(starts)
        for start, row in zip(starts, entry["intervals"], strict=True):
            cost = want[start]["cost"] if start in want else Decimal(0)
            sync = want[start]["sync"] if start in want else Decimal(0)
            assert row["cost_usd"] == pytest.approx(float(cost))
            assert row["saved_usd"] == pytest.approx(float(sync - cost))
        assert entry["cost_usd"] == pytest.approx(float(sum(row["cost"] for row in want.values())))


def test_past_the_top_tenants_the_rest_are_summed_as_others() -> None:
    starts = [datetime(2026, 12, 7, hour, tzinfo=UTC) for hour in range(3)]
    tenants: dict[str, dict[datetime, dict[str, Any]]] = {}
    for n in range(SPEND_TENANTS + 3):
        sums: dict[str, Any] = dict.fromkeys(SERIES_SUMS, 0)
        tenants[f"t{n}"] = {starts[1]: {**sums, "cost_usd": float(n), "sync_cost_usd": 2.0 * n}}
    tenants["idle"] = {starts[2]: dict.fromkeys(SERIES_SUMS, 0)}  # jobs, but nothing spent: left out
    top, others = Series("hour", starts, tenants, Flow("minute", [], {}, {})).spend_by_tenant()
    names = [f"t{n}" for n in range(SPEND_TENANTS + 3)][::-1]
    assert [entry["tenant"] for entry in top] == names[:SPEND_TENANTS]
    assert top[0]["intervals"] == [
        {"cost_usd": 0.0, "saved_usd": 0.0},
        {"cost_usd": float(SPEND_TENANTS + 2), "saved_usd": float(SPEND_TENANTS + 2)},
        {"cost_usd": 0.0, "saved_usd": 0.0},
    ]
    # t0 spent nothing; t1 and t2 are the others.
    assert others == {
        "tenants": 2,
        "cost_usd": 3.0,
        "saved_usd": 3.0,
        "intervals": [
            {"cost_usd": 0.0, "saved_usd": 0.0},
            {"cost_usd": 3.0, "saved_usd": 3.0},
            {"cost_usd": 0.0, "saved_usd": 0.0},
        ],
    }


# 400 days of history in the rollups, as the defaults keep it (retention.hourly_rollups and day rows, for 5
# tenants): a row per tenant per hour and per day.
HISTORY = """
INSERT INTO batchd.rollups (span, start, tenant_id, status, path, job_type, model, jobs, billed, input_tokens,
                            output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens,
                            cost_usd, sync_cost_usd, unpriced)
SELECT s.span, date_trunc(s.span, now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' - g.n * s.step,
       't' || t, 'succeeded', 'batch', '', 'm', 1, 1, 1, 1, 0, 0, 0, 1, 2, 0
  FROM (VALUES ('day', interval '1 day', 400), ('hour', interval '1 hour', 400 * 24)) AS s (span, step, many)
 CROSS JOIN generate_series(1, 5) AS t
 CROSS JOIN LATERAL generate_series(0, s.many - 1) AS g (n)
"""


def rows_read(plan: dict[str, Any], relation: str) -> int:
    """Rows a plan's scans of `relation` read: those they returned and those their filters threw away."""
    own = 0
    if plan.get("Relation Name") == relation:
        own = (
            int(plan["Actual Rows"]) * int(plan.get("Actual Loops", 1))
            + int(plan.get("Rows Removed by Filter", 0))
            + int(plan.get("Rows Removed by Index Recheck", 0))
        )
    return own + sum(rows_read(child, relation) for child in plan.get("Plans", []))


async def test_a_window_reads_its_own_rollup_rows_whatever_the_history(db: Any) -> None:
    await db.execute(HISTORY)
    history = await db.fetchval("SELECT count(*) FROM batchd.rollups")
    assert history == 5 * (400 + 400 * 24)
    await db.execute("ANALYZE batchd.rollups")
    for interval, seconds in (("hour", 86400), ("day", 30 * 86400)):
        since = await db.fetchval(sql("series_intervals").replace(";", " LIMIT 1;"), interval, seconds)
        window = await db.fetchval(
            "SELECT count(*) FROM batchd.rollups WHERE span = $1 AND start >= $2", interval, since
        )
        assert window == 5 * (25 if interval == "hour" else 31)
        (plan,) = json.loads(
            await db.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql("series"), interval, since)
        )
        read = rows_read(plan["Plan"], "rollups")
        assert read == window, f"{interval}: read {read} of {history} rollup rows for a window of {window}"
        assert len(await db.fetch(sql("series"), interval, since)) == window
