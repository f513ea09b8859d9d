"""`batchd status`: what is queued, what is in flight, what finished lately; and the daemon's one line.

The report is built and shown section by section: each `collect_*` adds its keys to the report, each
`render_*` turns them into a block of lines, and SECTIONS orders the blocks. Every status is shown, from
statuses.py, zeros included, so that a column or key is never missing because nothing is in it now.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from .statuses import BATCH_STATUSES, FINAL_JOB_STATUSES, JOB_STATUSES
from .store import DB_ERRORS, Connection, sql
from .text import age, table

# A batch's request_counts, as the provider reports them (the outcomes stay 0 until the batch ends).
REQUEST_COUNTS = ("processing", "succeeded", "errored", "canceled", "expired")
FINISHED = tuple(status for status in JOB_STATUSES if status in FINAL_JOB_STATUSES)

Report = dict[str, Any]


async def collect_jobs(connection: Connection, report: Report) -> None:
    """Jobs per tenant and status, every status of every tenant (zeros too), and their totals."""
    by_tenant: dict[str, dict[str, int]] = {}
    for row in await connection.fetch(sql("status_by_tenant")):
        counts = by_tenant.setdefault(row["tenant_id"], dict.fromkeys(JOB_STATUSES, 0))
        counts[row["status"]] = row["jobs"]
    report["tenants"] = by_tenant
    report["totals"] = {s: sum(counts[s] for counts in by_tenant.values()) for s in JOB_STATUSES}


async def collect_budgets(connection: Connection, report: Report) -> None:
    report["budgets"] = [dict(row) for row in await connection.fetch(sql("tenant_budgets"))]


async def collect_batches(connection: Connection, report: Report) -> None:
    """Batches per status (every status: the open ones, and the finished ones made within the window), and
    each open batch with the provider's counts of its requests."""
    rows = await connection.fetch(sql("batches_by_status"), report["finished_since"])
    counted = {row["status"]: row["batches"] for row in rows}
    report["batches"] = {status: counted.get(status, 0) for status in BATCH_STATUSES}
    now = datetime.now(UTC)
    report["open_batches"] = [
        {
            "id": str(row["id"]),
            "provider_batch_id": row["provider_batch_id"],
            "status": row["status"],
            "requests": row["request_count"],
            # Known once the provider has the batch; zeros before.
            "request_counts": {key: (row["request_counts"] or {}).get(key, 0) for key in REQUEST_COUNTS},
            "created_at": row["created_at"],
            "age_s": round((now - row["created_at"]).total_seconds()),
            "owner": row["owner"],
            "last_error": row["last_error"],
        }
        for row in await connection.fetch(sql("open_batches"))
    ]


async def collect_finished(connection: Connection, report: Report) -> None:
    """Jobs finished per final status since the start of the UTC hour `window_s` ago (the rollups count by
    hour), every final status shown."""
    window_s = report["window_s"]
    counted = {row["status"]: row["jobs"] for row in await connection.fetch(sql("recent_outcomes"), window_s)}
    report["finished"] = {status: counted.get(status, 0) for status in FINISHED}


Collector = Callable[[Connection, Report], Awaitable[None]]
Renderer = Callable[[Report], list[str]]


async def collect(connection: Connection, window_s: float = 3600.0) -> Report:
    """The report of every section; what finished is counted from the start of the UTC hour `window_s`
    ago (the rollups count by hour)."""
    since = datetime.now(UTC) - timedelta(seconds=window_s)
    report: Report = {
        "window_s": window_s,
        "finished_since": since.replace(minute=0, second=0, microsecond=0),
    }
    for section in SECTIONS:
        await section[0](connection, report)
    return report


async def summary_line(pool: asyncpg.Pool, streams: int, timeout_s: float) -> str:
    """One line for systemd's STATUS= (`systemctl status` shows it): queued jobs, open batches, this
    process's event streams. A database that does not answer within `timeout_s` is said instead."""
    try:
        async with asyncio.timeout(timeout_s), pool.acquire() as connection:
            ((queued, open_batches),) = await connection.fetch(sql("status_summary"))
    except DB_ERRORS as error:
        return f"database unreachable: {error or type(error).__name__}; streams {streams}"
    return f"queued {queued}, open batches {open_batches}, streams {streams}"


def render(report: Report) -> str:
    blocks = [lines for _, render_section in SECTIONS if (lines := render_section(report))]
    return "\n\n".join("\n".join(lines) for lines in blocks)


def render_jobs(report: Report) -> list[str]:
    lines = ["Jobs by tenant:"]
    tenants = report["tenants"]
    if not tenants:
        return [*lines, "  (no jobs)"]
    rows = [(tenant, *(f"{counts[s]:,}" for s in JOB_STATUSES)) for tenant, counts in sorted(tenants.items())]
    if len(tenants) > 1:
        rows.append(("TOTAL", *(f"{report['totals'][s]:,}" for s in JOB_STATUSES)))
    return [*lines, *table(("tenant", *JOB_STATUSES), rows)]


def render_budgets(report: Report) -> list[str]:
    """Budgeted tenants, and why a held tenant's queued jobs wait (or fail)."""
    budgets = report["budgets"]
    if not budgets:
        return []
    lines = ["Budgets (USD, UTC day and month):"]
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


def render_batches(report: Report) -> list[str]:
    counts = [f"{report['batches'][status]:,}" for status in BATCH_STATUSES]
    since = f"{report['finished_since']:%Y-%m-%d %H:%M} UTC"
    lines = [
        f"Batches by status (those finished: made since {since}):",
        *table(BATCH_STATUSES, [counts], left=0),
    ]
    lines += ["", "Open batches:"]
    batches = report["open_batches"]
    if not batches:
        return [*lines, "  (none)"]
    header = ("batch", "status", "requests", *REQUEST_COUNTS, "age", "provider batch")
    rows = [
        (
            batch["id"],
            batch["status"],
            f"{batch['requests']:,}",
            *(f"{batch['request_counts'][key]:,}" for key in REQUEST_COUNTS),
            age(batch["age_s"]),
            batch["provider_batch_id"] or "-",
        )
        for batch in batches
    ]
    laid_out = table(header, rows, left=2)
    lines.append(laid_out[0])
    for batch, line in zip(batches, laid_out[1:], strict=True):
        lines.append(line)
        if batch["last_error"]:
            lines.append(f"      last error: {batch['last_error']}")
    return lines


def render_finished(report: Report) -> list[str]:
    counts = [f"{report['finished'][status]:,}" for status in FINISHED]
    return [
        f"Jobs finished since {report['finished_since']:%Y-%m-%d %H:%M} UTC:",
        *table(FINISHED, [counts], left=0),
    ]


# -- the daemons (batchd.instances) --------------------------------------------------------------------------

# A daemon heartbeats every `heartbeat_s` (its row says how often): one silent for this many intervals died,
# or is stuck; its leases lapse to the others meanwhile.
SILENT_AFTER_HEARTBEATS = 3
_API_TROUBLE = {
    "refused": "THE API KEY IS REFUSED",
    "unreachable": "THE API IS UNREACHABLE",
}


async def collect_daemons(connection: Connection, report: Report) -> None:
    """Each daemon running on this database (its row in batchd.instances), with the leases it holds now."""
    daemons = []
    for row in await connection.fetch(sql("status_daemons")):
        daemon = dict(row)
        daemon["heartbeat_age_s"] = round(max(0.0, row["heartbeat_age_s"]), 1)
        daemon["silent"] = row["heartbeat_age_s"] > SILENT_AFTER_HEARTBEATS * row["heartbeat_s"]
        daemons.append(daemon)
    report["daemons"] = daemons


def render_daemons(report: Report) -> list[str]:
    """The daemons block of `batchd status`: who runs where, since when, alive or silent, the leases each
    holds, and the API as each last found it, a refused key said in capitals."""
    daemons: list[dict[str, Any]] = report["daemons"]
    lines = ["Daemons:"]
    if not daemons:
        lines.append("  (none running)")
    for daemon in daemons:
        batches, sync = daemon["batches_leased"], daemon["sync_jobs_leased"]
        since_heartbeat = age(daemon["heartbeat_age_s"])
        who = f"on {daemon['host']} (pid {daemon['pid']}, batchd {daemon['version']})"
        lines.append(f"  {daemon['instance_id']}  {who}")
        heartbeat = f"last heartbeat {since_heartbeat} ago"
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


# The report's sections in the order they are shown: each one's collector and renderer.
SECTIONS: list[tuple[Collector, Renderer]] = [
    (collect_jobs, render_jobs),
    (collect_budgets, render_budgets),
    (collect_batches, render_batches),
    (collect_finished, render_finished),
    (collect_daemons, render_daemons),
]


def to_json(report: Report) -> str:
    """The report as `batchd status --json` prints it: times in ISO 8601 (with `T` and the offset), amounts
    of money as strings holding every digit."""
    return json.dumps(report, indent=2, default=_jsonable)


def _jsonable(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")
