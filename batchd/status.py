"""`batchd status`: what is queued, what is in flight, what finished lately; and the daemon's one line."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from .statuses import JOB_STATUSES
from .store import DB_ERRORS, Connection, sql


async def collect(connection: Connection, window_s: float = 3600.0) -> dict[str, Any]:
    by_tenant: dict[str, dict[str, int]] = {}
    for row in await connection.fetch(sql("status_by_tenant")):
        by_tenant.setdefault(row["tenant_id"], {})[row["status"]] = row["jobs"]
    now = datetime.now(UTC)
    batches = [
        {
            "id": str(row["id"]),
            "provider_batch_id": row["provider_batch_id"],
            "status": row["status"],
            "requests": row["request_count"],
            "request_counts": row["request_counts"],
            "age_s": round((now - row["created_at"]).total_seconds()),
            "owner": row["owner"],
            "last_error": row["last_error"],
        }
        for row in await connection.fetch(sql("open_batches"))
    ]
    outcomes = await connection.fetch(sql("recent_outcomes"), window_s)
    recent = {row["status"]: row["jobs"] for row in outcomes}
    since = datetime.now(UTC) - timedelta(seconds=window_s)
    budgets = [dict(row) for row in await connection.fetch(sql("tenant_budgets"))]
    return {
        "tenants": by_tenant,
        "open_batches": batches,
        "finished": recent,
        "finished_since": since.replace(minute=0, second=0, microsecond=0),
        "budgets": budgets,
    }


async def summary_line(pool: asyncpg.Pool, streams: int, timeout_s: float) -> str:
    """One line for systemd's STATUS= (`systemctl status` shows it): queued jobs, open batches, this
    process's event streams. A database that does not answer within `timeout_s` is said instead."""
    try:
        async with asyncio.timeout(timeout_s), pool.acquire() as connection:
            ((queued, open_batches),) = await connection.fetch(sql("status_summary"))
    except DB_ERRORS as error:
        return f"database unreachable: {error or type(error).__name__}; streams {streams}"
    return f"queued {queued}, open batches {open_batches}, streams {streams}"


def render(report: dict[str, Any]) -> str:
    lines = ["Jobs by tenant:"]
    header = f"  {'tenant':<20}" + "".join(f"{state:>12}" for state in JOB_STATUSES)
    lines.append(header)
    for tenant, counts in sorted(report["tenants"].items()):
        lines.append(f"  {tenant:<20}" + "".join(f"{counts.get(state, 0):>12}" for state in JOB_STATUSES))
    if not report["tenants"]:
        lines.append("  (no jobs)")
    lines.extend(_render_budgets(report.get("budgets", [])))
    lines.append("")
    lines.append("Open batches:")
    for batch in report["open_batches"]:
        counts = json.dumps(batch["request_counts"]) if batch["request_counts"] else "-"
        lines.append(
            f"  {batch['id']}  {batch['status']:<11} {batch['requests']:>7} requests  "
            f"age {batch['age_s']:>6} s  provider {batch['provider_batch_id'] or '-'}  counts {counts}"
        )
        if batch["last_error"]:
            lines.append(f"      last error: {batch['last_error']}")
    if not report["open_batches"]:
        lines.append("  (none)")
    lines.append("")
    lines.append(f"Jobs finished since {report['finished_since']:%Y-%m-%d %H:%M} UTC:")
    for kind, count in sorted(report["finished"].items()):
        lines.append(f"  {kind:<20}{count:>10}")
    if not report["finished"]:
        lines.append("  (none)")
    return "\n".join(lines)


def _render_budgets(budgets: list[dict[str, Any]]) -> list[str]:
    """Budgeted tenants, and why a held tenant's queued jobs wait (or fail)."""
    if not budgets:
        return []
    lines = ["", "Budgets (USD, UTC day and month):"]
    for row in budgets:
        day = "-" if row["budget_day_usd"] is None else f"{row['budget_day_usd']}"
        month = "-" if row["budget_month_usd"] is None else f"{row['budget_month_usd']}"
        lines.append(
            f"  {row['tenant_id']:<20} day {float(row['spent_day_usd']):.4f} of {day}, "
            f"month {float(row['spent_month_usd']):.4f} of {month}, over budget: {row['over_budget']}"
        )
        if row["hold_reason"]:
            action = "its queued jobs fail" if row["over_budget"] == "fail" else "its queued jobs wait"
            since = f"{row['held_since']:%Y-%m-%d %H:%M:%S %Z}"
            lines.append(f"      held since {since} ({action}): {row['hold_reason']}")
    return lines
