"""Per-tenant budgets, in USD per UTC day and per UTC month, checked before every flush.

Spend is what the ledger recorded as results were applied, read from the rollups (the view batchd.spend: a
row per tenant per UTC day, and the tallies not yet folded; rollups.py). A tenant whose spend reaches either
budget is *over budget*: `hold_reason` says why, and the flusher's claim leaves its queued jobs in the queue
(the view batchd.held_tenants). With `over_budget = fail` its queued jobs fail instead, with an error of
type `budget_exceeded`. When the budget allows again (a new day or month, or a budget raised with `batchd
tenant set`) it is released and its jobs go on by themselves. Each change writes `tenant.held` or
`tenant.released` to the tenant's event stream.

Jobs already in a batch are not stopped: a tenant may end up over its budget by what it had in flight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import structlog

from .store import Connection, sql
from .unset import UNSET, Unset, update_parameters

log = structlog.get_logger("batchd.budgets")

OVER_BUDGET = ("hold", "fail")


@dataclass(frozen=True)
class Checked:
    failed: int  # queued jobs of `fail` tenants over budget, failed by this check
    transitions: list[dict[str, Any]]  # {"type": "tenant.held" | "tenant.released", "tenant", "reason"}


async def check(db: asyncpg.Pool | Connection, now: datetime | None = None) -> Checked:
    """Holds, fails and releases tenants by their budgets, at `now` (None: the database's clock)."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as connection:
            return await check(connection, now)
    async with db.transaction():
        await db.execute(sql("lock_budgets"))
        row = await db.fetchrow(sql("check_budgets"), now)
        assert row is not None  # noqa: S101 - the statement ends in a one-row SELECT
        transitions: list[dict[str, Any]] = json.loads(row["transitions"])
        if transitions or row["failed"]:
            await db.execute(sql("notify_events"))
    for change in transitions:
        if change["type"] == "tenant.held":
            log.info("tenant.held", tenant_id=change["tenant"], reason=change["reason"])
        else:
            log.info("tenant.released", tenant_id=change["tenant"])
    if row["failed"]:
        log.info("budget.jobs_failed", jobs=row["failed"])
    return Checked(failed=row["failed"], transitions=transitions)


async def set_budget(
    connection: Connection,
    name: str,
    *,
    day: Decimal | Unset | None = UNSET,
    month: Decimal | Unset | None = UNSET,
    over_budget: str | Unset = UNSET,
) -> dict[str, Any]:
    """Sets what is given (None removes a budget), adding the tenant if new; wakes the daemons to check."""
    row = await connection.fetchrow(
        sql("set_tenant_budget"), name, *update_parameters(day, month, over_budget)
    )
    await connection.execute(sql("wake_daemons"))
    assert row is not None  # noqa: S101 - INSERT ... RETURNING always returns the row
    return dict(row)


def describe(row: dict[str, Any]) -> str:
    def amount(value: Decimal | None) -> str:
        return "none" if value is None else f"{value} USD"

    text = (
        f"{row['name']}: budget {amount(row['budget_day_usd'])} a day, "
        f"{amount(row['budget_month_usd'])} a month, over budget: {row['over_budget']}"
    )
    return text if row.get("hold_reason") is None else f"{text} (now held: {row['hold_reason']})"
