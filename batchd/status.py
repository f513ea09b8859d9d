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
        "daemons": await collect_daemons(connection),
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
    lines.extend(render_daemons(report.get("daemons", [])))
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


# -- the daemons (batchd.instances) --------------------------------------------------------------------------

# A daemon heartbeats every `heartbeat_s` (its row says how often): one silent for this many intervals died,
# or is stuck; its leases lapse to the others meanwhile.
SILENT_AFTER_HEARTBEATS = 3
_API_TROUBLE = {
    "refused": "THE API KEY IS REFUSED",
    "unreachable": "THE API IS UNREACHABLE",
}


async def collect_daemons(connection: Connection) -> list[dict[str, Any]]:
    """Each daemon running on this database (its row in batchd.instances), with the leases it holds now."""
    daemons = []
    for row in await connection.fetch(sql("status_daemons")):
        daemon = dict(row)
        daemon["heartbeat_age_s"] = round(max(0.0, row["heartbeat_age_s"]), 1)
        daemon["silent"] = row["heartbeat_age_s"] > SILENT_AFTER_HEARTBEATS * row["heartbeat_s"]
        daemons.append(daemon)
    return daemons


def render_daemons(daemons: list[dict[str, Any]]) -> list[str]:
    """The daemons block of `batchd status`: who runs where, since when, alive or silent, the leases each
    holds, and the API as each last found it, a refused key said in capitals."""
    lines = ["", "Daemons:"]
    if not daemons:
        lines.append("  (none running)")
    for daemon in daemons:
        batches, sync = daemon["batches_leased"], daemon["sync_jobs_leased"]
        age = _age(daemon["heartbeat_age_s"])
        who = f"on {daemon['host']} (pid {daemon['pid']}, batchd {daemon['version']})"
        lines.append(f"  {daemon['instance_id']}  {who}")
        heartbeat = f"last heartbeat {age} ago"
        if daemon["silent"]:
            heartbeat += " — SILENT: it died or is stuck; its leases pass to other daemons as they run out"
        lines.append(f"      up since {daemon['started_at']:%Y-%m-%d %H:%M:%S %Z}, {heartbeat}")
        lines.append(
            f"      leases: {batches} batch{'es' if batches != 1 else ''}, "
            f"{sync} sync job{'s' if sync != 1 else ''}"
        )
        lines.append(f"      {_api_line(daemon)}")
    return lines


def _api_line(daemon: dict[str, Any]) -> str:
    state, url, checked = daemon["api_state"], daemon["api_url"], daemon["api_checked_at"]
    when = "" if checked is None else f" (checked {checked:%Y-%m-%d %H:%M:%S %Z})"
    if state == "ok":
        return f"API {url}: ok{when}"
    if state == "unchecked":
        return f"API {url}: not checked yet (starting)"
    trouble = _API_TROUBLE.get(state, state.upper())
    fix = (
        "fix the key (a key file named by [anthropic] api_key_file is read again at each check; a credential "
        "or $ANTHROPIC_API_KEY needs a restart)"
        if state == "refused"
        else "check [anthropic] base_url and the network"
    )
    reason = str(daemon["api_reason"] or "").removeprefix("unreachable: ")
    return f"API {url}: {trouble}: {reason}{when}; this daemon sends nothing meanwhile: {fix}"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86_400:.0f} d"
