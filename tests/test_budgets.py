"""Budgets: a tenant over its daily or monthly budget is held (its jobs stay queued, with the reason in
`batchd status` and a tenant.held event on its stream) or, if it chose `fail`, has its queued jobs failed;
it is released (tenant.released) when the budget is raised or the day or month rolls over. The clock the
check runs at is a parameter, so a test moves it instead of waiting a day."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from sse_support import sse_stream
from support import QUICK, insert_raw, run_python, wait_for_jobs, wait_until

from batchd import budgets, status
from batchd.emulator import EmulatorConfig

D = Decimal
TINY = D("0.000001")  # one job of the emulator's costs more than this


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


async def statuses(db: Any, tenant: str) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT status, count(*) AS n FROM batchd.jobs WHERE tenant_id = $1 GROUP BY status", tenant
    )
    return {row["status"]: row["n"] for row in rows}


# A tenant's spend at a chosen time, as the apply records it: a tally of a billed job (budgets read the
# tallies and the rollups they are folded into; tests/test_rollups.py proves those exact).
SPENT = (
    "INSERT INTO batchd.tallies (tenant_id, at, status, model, jobs, billed, cost_usd)"
    " VALUES ($1, $2, 'succeeded', 'claude-sonnet-4-5', 1, 1, $3)"
)


async def hold_reason(db: Any, tenant: str) -> str | None:
    reason: str | None = await db.fetchval("SELECT hold_reason FROM batchd.tenants WHERE name = $1", tenant)
    return reason


async def events(db: Any, tenant: str, kind: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT data FROM batchd.events WHERE tenant_id = $1 AND type = $2 ORDER BY id", tenant, kind
    )
    return [row["data"] for row in rows]


async def spend_then_queue(db: Any, tenant: str, more: int) -> list[Any]:
    """One job of `tenant` runs (its cost is now spent), then `more` are queued; returns their ids."""
    await insert_raw(db, tenant, [f"{tenant} first job"])
    await wait_until(lambda: _succeeded(db, tenant, 1), timeout=30)
    return await insert_raw(db, tenant, [f"{tenant} job {i}" for i in range(more)])


async def _succeeded(db: Any, tenant: str, count: int) -> bool:
    return (await statuses(db, tenant)).get("succeeded", 0) >= count


async def test_a_tenant_over_its_daily_budget_is_held_until_the_budget_is_raised(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    await budgets.set_budget(db, "acme", day=TINY)
    async with (
        serve() as (_, url),
        sse_stream(session, url, tokens["acme"]) as acme_stream,
        sse_stream(session, url, tokens["globex"]) as globex_stream,
    ):
        await spend_then_queue(db, "acme", 3)
        await insert_raw(db, "globex", ["globex 1", "globex 2"])
        await wait_until(lambda: _succeeded(db, "globex", 2), timeout=30)
        await acme_stream.until(lambda c: any(d["type"] == "tenant.held" for d in c.data()))
        # Other tenants' jobs went on; acme's wait in the queue, and say why.
        assert await statuses(db, "acme") == {"succeeded": 1, "queued": 3}
        reason = await hold_reason(db, "acme")
        assert reason is not None
        assert reason.startswith("over its daily budget:")
        held = next(d for d in acme_stream.data() if d["type"] == "tenant.held")
        assert held["tenant"] == "acme"
        assert held["reason"] == reason
        assert held["over_budget"] == "hold"
        assert D(str(held["budget_day_usd"])) == TINY
        assert D(str(held["spent_day_usd"])) > TINY
        shown = await status.collect(db)
        assert [(b["tenant_id"], b["hold_reason"]) for b in shown["budgets"]] == [("acme", reason)]
        rendered = status.render(shown)
        assert "held since" in rendered
        assert reason in rendered

        await budgets.set_budget(db, "acme", day=D(100))  # wakes the daemon: it checks at once
        await wait_until(lambda: _succeeded(db, "acme", 4), timeout=30)
        await acme_stream.until(lambda c: any(d["type"] == "tenant.released" for d in c.data()))
        assert await hold_reason(db, "acme") is None
    types = [d["type"] for d in acme_stream.data()]
    assert types.count("tenant.held") == 1
    assert types.count("tenant.released") == 1
    assert types.index("tenant.held") < types.index("tenant.released")
    assert not any(d["type"].startswith("tenant.") for d in globex_stream.data()), "a tenant hears its own"


async def test_a_held_tenant_is_released_when_the_day_and_then_the_month_roll_over(
    db: Any, daemon_settings: Any, start_daemon: Any
) -> None:
    await budgets.set_budget(db, "acme", day=TINY, month=D(1))
    async with start_daemon(daemon_settings()) as daemon:
        waiting = await spend_then_queue(db, "acme", 2)
        await wait_until(lambda: _reason_starts(db, "acme", "over its daily budget"), timeout=30)
        today = await db.fetchval("SELECT now()")

        # Tomorrow (by the clock the budgets are checked at): the daily budget allows again.
        tomorrow = (today + timedelta(days=1)).astimezone(UTC)
        daemon.flusher.budget_clock = lambda: tomorrow
        daemon.flusher.wake()
        await wait_until(lambda: _succeeded(db, "acme", 3), timeout=30)
        assert await hold_reason(db, "acme") is None

        # No daily budget now; the month's spent (1 USD, that day), so held until the next month.
        await budgets.set_budget(db, "acme", day=None)
        await db.execute(SPENT, "acme", tomorrow, 1)
        await insert_raw(db, "acme", ["acme next"])
        await wait_until(lambda: _reason_starts(db, "acme", "over its monthly budget"), timeout=30)
        next_month = datetime(
            tomorrow.year + tomorrow.month // 12, tomorrow.month % 12 + 1, 1, 0, 0, 1, tzinfo=UTC
        )
        daemon.flusher.budget_clock = lambda: next_month
        daemon.flusher.wake()
        await wait_until(lambda: _succeeded(db, "acme", 4), timeout=30)
    assert [d["status"] for d in await events(db, "acme", "tenant.held")] == ["held", "held"]
    assert [d["status"] for d in await events(db, "acme", "tenant.released")] == ["released", "released"]
    assert len(waiting) == 2


async def _reason_starts(db: Any, tenant: str, prefix: str) -> bool:
    return (await hold_reason(db, tenant) or "").startswith(prefix)


async def test_a_fail_tenant_over_budget_has_its_queued_jobs_failed_with_a_readable_reason(
    db: Any, daemon_settings: Any, start_daemon: Any
) -> None:
    await budgets.set_budget(db, "acme", day=TINY, over_budget="fail")
    async with start_daemon(daemon_settings()):
        failing = await spend_then_queue(db, "acme", 3)
        await insert_raw(db, "globex", ["globex 1"])
        await wait_for_jobs(db, done=5, timeout=30)
    assert await statuses(db, "acme") == {"succeeded": 1, "failed": 3}
    assert await statuses(db, "globex") == {"succeeded": 1}
    for job_id in failing:
        error = await db.fetchval("SELECT error FROM batchd.jobs WHERE id = $1", job_id)
        assert error["type"] == "budget_exceeded"
        assert error["message"].startswith("tenant acme is over its daily budget: ")
        assert "over_budget = fail" in error["message"]
    failed_events = await events(db, "acme", "job.failed")
    assert len(failed_events) == 3
    assert failed_events[0]["error"]["type"] == "budget_exceeded"
    assert [d["over_budget"] for d in await events(db, "acme", "tenant.held")] == ["fail"]


# -- the check itself, at chosen clocks ----------------------------------------------------------------------


async def test_budgets_follow_utc_days_and_months_and_each_change_is_one_event(
    db: Any, database_url: str
) -> None:
    noon = datetime(2026, 3, 31, 12, 0, tzinfo=UTC)
    await budgets.set_budget(db, "acme", day=D(10), month=D(25))
    await budgets.set_budget(db, "globex", day=D(0))  # nothing may be spent
    await budgets.set_budget(db, "initech", month=D(5), over_budget="fail")
    await db.executemany(
        SPENT,
        [
            ("acme", datetime(2026, 3, 30, 23, 59, 59, tzinfo=UTC), D(9)),  # yesterday (UTC)
            ("acme", datetime(2026, 3, 31, 0, 0, tzinfo=UTC), D("9.5")),  # today
            ("acme", datetime(2026, 2, 28, 12, 0, tzinfo=UTC), D(100)),  # last month
            ("initech", datetime(2026, 3, 2, tzinfo=UTC), D(5)),
        ],
    )
    await insert_raw(db, "initech", ["never sent"])
    checked = await budgets.check(db, noon)
    assert {(t["tenant"], t["type"]) for t in checked.transitions} == {
        ("globex", "tenant.held"),
        ("initech", "tenant.held"),
    }
    assert checked.failed == 1
    assert await hold_reason(db, "acme") is None, "18.5 this month, 9.5 today: under both"
    assert (await hold_reason(db, "initech") or "").startswith(
        "over its monthly budget: 5 USD spent of 5 USD"
    )

    # Two daemons checking at once: the tenant is held once, one event.
    await db.execute(SPENT, "acme", noon, 1)
    others = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        results = await asyncio.gather(*(budgets.check(other, noon) for other in others))
    finally:
        for other in others:
            await other.close()
    assert sorted(len(r.transitions) for r in results) == [0, 1]
    assert (await hold_reason(db, "acme") or "").startswith(
        "over its daily budget: 10.5 USD spent of 10 USD today (UTC)"
    )
    assert len(await events(db, "acme", "tenant.held")) == 1

    # April: the month's spend is behind every tenant; the daily budget of 0 still holds globex.
    april = await budgets.check(db, datetime(2026, 4, 1, 0, 0, tzinfo=UTC))
    assert {(t["tenant"], t["type"]) for t in april.transitions} == {
        ("acme", "tenant.released"),
        ("initech", "tenant.released"),
    }
    assert await hold_reason(db, "globex") is not None
    # A budget removed releases too.
    await budgets.set_budget(db, "globex", day=None)
    released = await budgets.check(db, datetime(2026, 4, 1, 0, 0, tzinfo=UTC))
    assert [(t["tenant"], t["type"]) for t in released.transitions] == [("globex", "tenant.released")]
    assert await db.fetchval("SELECT count(*) FROM batchd.held_tenants") == 0


async def test_tenant_set_and_status_on_the_command_line(db: Any, database_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "BATCHD_DATABASE__URL": database_url}
    env.pop("BATCHD_CONFIG", None)

    async def batchd(*args: str) -> tuple[int, str, str]:
        return await run_python("-m", "batchd", *args, env=env, cwd=tmp_path)

    code, out, err = await batchd("tenant", "set", "acme", "--budget-day", "0", "--over-budget", "hold")
    assert code == 0, err
    assert out.startswith(
        "acme: budget 0 USD a day, none a month, over budget: hold (now held: over its daily"
    )
    code, out, err = await batchd("status")
    assert code == 0, err
    assert "acme" in out
    assert "held since" in out
    code, out, err = await batchd("tenant", "set", "acme", "--budget-month", "50")
    assert code == 0, err
    assert out.startswith("acme: budget 0 USD a day, 50 USD a month"), "options not given stay as they are"
    code, out, err = await batchd("tenant", "set", "acme", "--budget-day", "none")
    assert code == 0, err
    assert out.splitlines() == [
        "acme: budget none a day, 50 USD a month, over budget: hold",
        "acme: weight 1, max queued none, max in flight none",
    ]
    assert await hold_reason(db, "acme") is None
    code, _, err = await batchd("tenant", "set", "acme")
    assert code == 65
    assert "nothing to set" in err
    code, _, err = await batchd("tenant", "set", "acme", "--budget-day", "-3")
    assert code == 2
    assert "non-negative" in err
