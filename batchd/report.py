"""`batchd report`: what the ledger says was spent, per tenant and model, and what batching saved.

Every number comes from batchd.costs, where each succeeded request was priced once when its result was
applied (queries.sql, apply_results): jobs, tokens (input, output, cache writes, cache reads), the cost, the
same calls' cost through the synchronous API, and the difference, saved. Amounts are exact in the
database; the table rounds them for reading, CSV keeps every digit, JSON gives numbers rounded to 1e-9 USD.

The prompt cache is reported per job type (raw requests together, as job type null): its reads and writes,
and the hit ratio, `cache_hit_ratio(...)` below: the share of the prompt tokens that were read from the
cache. GET /metrics shows the same numbers for the whole ledger (metrics.py).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from . import tenants
from .store import Connection, sql
from .text import formatter, parse_duration

TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "cache_read_tokens",
)
MONEY_FIELDS = ("cost_usd", "sync_cost_usd", "saved_usd")
COUNT_FIELDS = ("jobs", *TOKEN_FIELDS, "unpriced_jobs")
# The prompt cache's columns of a job type's row, in the order the report shows them.
CACHE_FIELDS = (
    "job_type",
    "jobs",
    "input_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "cache_read_tokens",
)
JSON_PLACES = Decimal("1e-9")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`7d`, `12h`, `30m`, `90s`, `2w` ago, or an ISO date or time (UTC unless it says otherwise)."""
    seconds = parse_duration(text)
    if seconds is not None:
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since: expected a duration like 7d, 12h, 30m, or an ISO date, got {text!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def cache_hit_ratio(input_tokens: int, cache_write_tokens: int, cache_read_tokens: int) -> float | None:
    """cache reads / (input + cache writes + cache reads): the share of the prompt's tokens served from the
    cache (1.0: every prompt token was a hit). Every prompt token is in exactly one of the three counts, so
    this is also the share of the prompt billed at the cache-read rate. None when there is no prompt."""
    prompt = input_tokens + cache_write_tokens + cache_read_tokens
    return cache_read_tokens / prompt if prompt else None


def _cache_row(row: dict[str, Any]) -> dict[str, Any]:
    row["cache_write_tokens"] = row["cache_write_5m_tokens"] + row["cache_write_1h_tokens"]
    row["cache_hit_ratio"] = cache_hit_ratio(
        row["input_tokens"], row["cache_write_tokens"], row["cache_read_tokens"]
    )
    return row


def _with_savings(row: dict[str, Any]) -> dict[str, Any]:
    row["saved_usd"] = row["sync_cost_usd"] - row["cost_usd"]
    return _cache_row(row)


def _sum(rows: list[dict[str, Any]], **labels: Any) -> dict[str, Any]:
    total: dict[str, Any] = dict(labels)
    for field in COUNT_FIELDS:
        total[field] = sum(row[field] for row in rows)
    for field in ("cost_usd", "sync_cost_usd"):
        total[field] = sum((row[field] for row in rows), Decimal(0))
    return _with_savings(total)


def _per_tenant_and_model(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The billed rows of each (tenant, model), summed over the paths they took, in that order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["tenant_id"], row["model"]), []).append(dict(row))
    return [_sum(group, tenant_id=tenant, model=model) for (tenant, model), group in sorted(groups.items())]


async def collect(
    connection: Connection, since: datetime | None = None, tenant: str | None = None
) -> dict[str, Any]:
    if since is not None:
        # The rollups count by UTC hour: the report starts at the hour `since` falls in, and says so.
        since = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    billed = await connection.fetch(sql("billed_totals"), since, tenant)
    rows = _per_tenant_and_model([row for row in billed if not row["by_job_type"]])
    tenants = sorted({row["tenant_id"] for row in rows})
    cache = [
        _cache_row({field: row[field] for field in CACHE_FIELDS})
        for row in sorted(billed, key=lambda row: (row["job_type"] is None, row["job_type"] or ""))
        if row["by_job_type"]
    ]
    return {
        "since": since,
        "tenant": tenant,
        "rows": rows,
        "tenants": [_sum([r for r in rows if r["tenant_id"] == name], tenant_id=name) for name in tenants],
        "totals": _sum(rows),
        "job_types": cache,
    }


async def warnings(connection: Connection, report: dict[str, Any]) -> list[str]:
    """What the reader should know before trusting an empty report: a tenant that does not exist (a typo
    reports nothing, as a tenant that spent nothing would), or a window in which nothing was billed."""
    tenant, since = report["tenant"], report["since"]
    if tenant is not None:
        names = [row["name"] for row in await tenants.list_tenants(connection)]
        if tenant not in names:
            near = difflib.get_close_matches(tenant, names, n=1)
            hint = f"did you mean {near[0]!r}?" if near else "`batchd tenant list` lists them"
            return [f"no tenant {tenant!r}: none has a job or a token by that name ({hint})"]
    if report["rows"]:
        return []
    scope = "at all" if since is None else f"since {since:%Y-%m-%d %H:%M} UTC"
    who = "" if tenant is None else f" for tenant {tenant!r}"
    return [f"nothing was billed {scope}{who}: the report is empty"]


def _percent(row: dict[str, Any]) -> str:
    sync = row["sync_cost_usd"]
    return f"{row['saved_usd'] / sync:.1%}" if sync else "-"


def _usd(value: Decimal) -> str:
    return f"{value:,.4f}"


def render_table(report: dict[str, Any]) -> str:
    since = report["since"]
    scope = f"since {since:%Y-%m-%d %H:%M UTC}" if since is not None else "all recorded"
    who = f"tenant {report['tenant']}" if report["tenant"] else "every tenant"
    header = (
        "tenant",
        "model",
        "jobs",
        "input",
        "output",
        "cache write",
        "cache read",
        "cost USD",
        "sync USD",
        "saved USD",
        "saved",
        "cache hit",
    )
    lines: list[tuple[str, ...]] = []

    def line(row: dict[str, Any], tenant: str, model: str) -> tuple[str, ...]:
        return (
            tenant,
            model,
            f"{row['jobs']:,}",
            f"{row['input_tokens']:,}",
            f"{row['output_tokens']:,}",
            f"{row['cache_write_tokens']:,}",
            f"{row['cache_read_tokens']:,}",
            _usd(row["cost_usd"]),
            _usd(row["sync_cost_usd"]),
            _usd(row["saved_usd"]),
            _percent(row),
            _ratio(row["cache_hit_ratio"]),
        )

    for subtotal in report["tenants"]:
        name = subtotal["tenant_id"]
        models = [row for row in report["rows"] if row["tenant_id"] == name]
        lines.extend(line(row, name, row["model"]) for row in models)
        if len(models) > 1:
            lines.append(line(subtotal, name, "(all models)"))
    lines.append(line(report["totals"], "TOTAL", ""))
    fmt, widths = formatter(header, lines, left=2)
    out = [
        f"Costs, {scope}, {who} (batch prices; sync = the same calls through the Messages API):",
        fmt(header),
    ]
    out.extend(fmt(cells) for cells in lines[:-1])
    out.append("  ".join("-" * w for w in widths))
    out.append(fmt(lines[-1]))
    unpriced = report["totals"]["unpriced_jobs"]
    if unpriced:
        models = sorted({row["model"] for row in report["rows"] if row["unpriced_jobs"]})
        out.append(
            f"{unpriced} job(s) of models without a price in [pricing.models] are counted at 0: "
            + ", ".join(models)
        )
    # The costs come first: they are what the command is asked for. Scripts find their TOTAL line by its
    # first word (the cache's table follows it).
    if report["job_types"]:
        out += ["", render_cache_table(report)]
    return "\n".join(out)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


RAW_REQUESTS = "(raw requests)"


def render_cache_table(report: dict[str, Any]) -> str:
    header = ("job type", "jobs", "input", "cache write 5m", "cache write 1h", "cache read", "cache hit")
    lines = [
        (
            row["job_type"] or RAW_REQUESTS,
            f"{row['jobs']:,}",
            f"{row['input_tokens']:,}",
            f"{row['cache_write_5m_tokens']:,}",
            f"{row['cache_write_1h_tokens']:,}",
            f"{row['cache_read_tokens']:,}",
            _ratio(row["cache_hit_ratio"]),
        )
        for row in report["job_types"]
    ]
    fmt, _ = formatter(header, lines, left=1)
    return "\n".join(
        [
            "Prompt cache per job type (cache hit = cache read / (input + cache writes + cache read)):",
            fmt(header),
            *(fmt(cells) for cells in lines),
        ]
    )


CSV_FIELDS = (
    "tenant_id",
    "model",
    *COUNT_FIELDS[:-1],
    "cache_write_tokens",
    *MONEY_FIELDS,
    "unpriced_jobs",
    "cache_hit_ratio",
)
CACHE_CSV_FIELDS = (
    "job_type",
    "jobs",
    "input_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "cache_write_tokens",
    "cache_read_tokens",
    "cache_hit_ratio",
)


def render_csv(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(report["rows"])
    writer.writerow({**report["totals"], "tenant_id": "TOTAL", "model": ""})
    return buffer.getvalue().rstrip("\n")


def render_cache_csv(report: dict[str, Any]) -> str:
    """The prompt cache per job type alone (`batchd report --cache --format csv`): a CSV holds one table.
    Raw requests have an empty job_type."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CACHE_CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(report["job_types"])
    return buffer.getvalue().rstrip("\n")


def render_cache_json(report: dict[str, Any]) -> str:
    return json.dumps(
        _jsonable({"since": report["since"], "tenant": report["tenant"], "job_types": report["job_types"]}),
        indent=2,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value.quantize(JSON_PLACES))
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(_jsonable(report), indent=2)


RENDER = {"table": render_table, "csv": render_csv, "json": render_json}
RENDER_CACHE = {"table": render_cache_table, "csv": render_cache_csv, "json": render_cache_json}
