"""The database's readings for the HTTP server: what GET /metrics and GET /v1/overview report of
batchd.jobs, batchd.batches, the rollups and the event log. Each kind of reading is taken at most once per
interval per daemon, whatever the number of scrapers and dashboards: the first request after the interval
starts it, every request meanwhile awaits that same reading, and all share its result until the interval
has passed again. Each runs in a transaction of its own with a statement timeout set there (SET LOCAL), so
the database ends a reading stuck behind a lock; a failure (the timeout, the database away) is kept for the
interval too, so a storm against a sick database costs one try per interval (metrics.py holds the
instruments the parts update; this module, what is read from the database).

- The queue and the batches (`metrics_snapshot`), one query: jobs per tenant and status, batches per
  status, the age of the queue's head. Database-wide: every daemon on the database reports the same values
  (aggregate them with max, not sum).
- The money (`billed_totals`), one query over the rollups: what `batchd report` shows for all time per
  tenant and model (jobs, tokens, cost, saved), and the prompt cache per job type. Database-wide too.
  Both metrics readings follow `[http] metrics_interval_s` and `metrics_timeout_s`.
- The dashboard's overview (`overview_*` and `tenant_budgets`), six queries in one REPEATABLE READ
  snapshot, read for every tenant at once (the admin's view); each request then takes its principal's share
  of it (`Overview.view`). Every one reads the work in flight or the rollups (budgets: this month's day
  rows of the tenants with a budget), never the history.
- The charts' series (`series`), one reading per window (`WINDOWS`: the last hour and day by the hour rollups,
  the last 30 days by the day rollups), for every tenant at once and split per principal (`Series.view`),
  on the overview's interval and timeout; with it, in the same snapshot, the queue and batch turnaround
  over the window (flow.py: by the minute for the last hour).
  `[http] overview_interval_s` and `overview_timeout_s`.

Tenants are a label of `batchd_jobs`: one series per tenant and status. Past `MAX_TENANTS` tenants, the
tenants with the fewest jobs are summed into one series with an empty tenant label (no tenant is named "":
the schema forbids it), so the number of series stays bounded whatever producers write.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import flow
from .config import HttpSettings, RoutingSettings
from .report import cache_hit_ratio
from .statuses import BATCH_STATUSES, JOB_STATUSES
from .store import DB_ERRORS, Connection, Routing, sql

log = structlog.get_logger("batchd.readings")

T = TypeVar("T")
# The database ends a stuck reading at its statement timeout; this waits longer, on the client, only for a
# database that does not answer at all (a connection that hangs, a pool with no connection to give).
BACKSTOP_FACTOR = 2.0
BACKSTOP_EXTRA_S = 1.0
TOKEN_KINDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
PROMPT_KINDS = ("input", "cache_write_5m", "cache_write_1h", "cache_read")
MAX_TENANTS = 500
# GET /v1/series?window=: how far back, and the rollups' span (their interval) it is read in.
WINDOWS: dict[str, tuple[float, str]] = {
    "1h": (3600.0, "hour"),
    "1d": (86400.0, "hour"),
    "30d": (30 * 86400.0, "day"),
}
SERIES_COUNTS = ("succeeded", "failed", "canceled", "batch_jobs", "sync_jobs")
SERIES_SUMS = (
    *SERIES_COUNTS,
    "input_tokens",
    "cache_write_tokens",
    "cache_read_tokens",
    "cost_usd",
    "sync_cost_usd",
)
# The admin's spend chart: the tenants that spent the most in the window each on their own, the rest summed.
SPEND_TENANTS = 5


class Reading(Generic[T]):
    """One kind of reading: taken at most once per `interval_s` (counted from the end of the last one), one
    at a time, shared by every request that asks meanwhile; None while the last one failed."""

    def __init__(
        self,
        kind: str,
        read: Callable[[Connection], Awaitable[T]],
        *,
        interval_s: float,
        timeout_s: float,
        isolation: Literal["read_committed", "repeatable_read"] = "read_committed",
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.kind = kind
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.queries = 0  # readings attempted, failed ones included
        self.value: T | None = None
        self._read = read
        self._isolation = isolation
        self._on_error = on_error
        self._at = -math.inf
        self._task: asyncio.Task[T | None] | None = None

    async def get(self, pool: asyncpg.Pool) -> T | None:
        if time.monotonic() - self._at < self.interval_s:
            return self.value
        if self._task is None:
            self._task = asyncio.create_task(self._take(pool), name=f"reading-{self.kind}")
        # Shielded: a request that goes away (its handler cancelled) must not end the others' reading.
        return await asyncio.shield(self._task)

    async def _take(self, pool: asyncpg.Pool) -> T | None:
        self.queries += 1
        # Nobody reads the value while this runs (it is stale: they await this task); whatever ends the
        # reading other than its result leaves None, never the last interval's numbers.
        self.value = None
        try:
            async with (
                asyncio.timeout(self.timeout_s * BACKSTOP_FACTOR + BACKSTOP_EXTRA_S),
                pool.acquire() as connection,
                connection.transaction(isolation=self._isolation, readonly=True),
            ):
                await connection.execute(sql("reading_timeout"), f"{max(1, round(self.timeout_s * 1000))}ms")
                self.value = await self._read(connection)
        except DB_ERRORS as error:
            if self._on_error is not None:
                self._on_error()
            log.warning("readings.failed", reading=self.kind, error=str(error) or type(error).__name__)
        finally:
            self._at = time.monotonic()
            self._task = None
        return self.value


@dataclass(frozen=True)
class Snapshot:
    """What the database said at one moment."""

    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (tenant, status) -> jobs
    batches: dict[str, int] = field(default_factory=dict)  # status -> batches
    queue_age_s: float = 0.0  # of the job at the head of the queue; 0 when it is empty


@dataclass(frozen=True)
class Billed:
    """The ledger's sums for one (tenant, model, via) or one job type."""

    jobs: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # TOKEN_KINDS -> tokens
    cost_usd: float = 0.0
    sync_cost_usd: float = 0.0
    saved_usd: float = 0.0


@dataclass(frozen=True)
class Ledger:
    """What the ledger said at one moment, for all time."""

    billed: dict[tuple[str, str, str], Billed] = field(default_factory=dict)  # (tenant, model, via)
    job_types: dict[str, Billed] = field(default_factory=dict)  # job type ("": raw requests)


@dataclass(frozen=True)
class View:
    """One principal's share of an overview: what GET /v1/overview answers besides who asked."""

    last_event_id: int
    queued: list[dict[str, Any]] = field(default_factory=list)
    open_batches: list[dict[str, Any]] = field(default_factory=list)
    totals: list[dict[str, Any]] = field(default_factory=list)
    budgets: list[dict[str, Any]] = field(default_factory=list)
    sync_last_hour: list[dict[str, Any]] = field(default_factory=list)  # {reason, jobs}


SYNC_REASONS = ("route", "deadline", "other")


@dataclass(frozen=True)
class Overview:
    """The dashboard's snapshot for every tenant at once, split at reading time into the admin's view and
    each tenant's, so a request only picks its own."""

    admin: View
    tenants: dict[str, View]  # those with a row in any of the views
    tenant_heads: dict[str, int]  # each tenant's last event id
    tenant_base: int  # the last event id of a tenant that has had no event yet
    # The batch turnaround, every tenant's batches: the router's p90 (what each job's path_reason already
    # quotes to its tenant) and the p50 and p90 measured, no tenant's own data.
    turnaround: dict[str, Any] = field(default_factory=dict)

    def tenant_view(self, tenant_id: str) -> View:
        """A tenant's view, made (with its event id) when it has none yet."""
        view = self.tenants.get(tenant_id)
        if view is None:
            view = self.tenants[tenant_id] = View(self.tenant_heads.get(tenant_id, self.tenant_base))
        return view

    def view(self, tenant_id: str | None) -> View:
        """The admin's view (tenant_id None) or a tenant's: its own rows only, and its own event id."""
        if tenant_id is None:
            return self.admin
        return self.tenants.get(tenant_id) or View(self.tenant_heads.get(tenant_id, self.tenant_base))


@dataclass(frozen=True)
class Series:
    """One window's intervals (their starts, oldest first) and each tenant's sums in them."""

    interval: str  # "hour" or "day"
    starts: list[datetime]
    tenants: dict[str, dict[datetime, dict[str, Any]]]  # tenant -> start -> SERIES_SUMS
    flow: flow.Flow  # the queue and batch turnaround, in intervals of their own (finer for the last hour)

    def view(self, tenant_id: str | None) -> list[dict[str, Any]]:
        """Every interval of the window, summed over every tenant (tenant_id None: the admin) or one
        tenant's own, with what a chart shows of it."""
        tenants = self.tenants.values() if tenant_id is None else [self.tenants.get(tenant_id, {})]
        intervals = []
        for start in self.starts:
            sums: dict[str, Any] = dict.fromkeys(SERIES_SUMS, 0)
            for rows in tenants:
                if (row := rows.get(start)) is not None:
                    for key in SERIES_SUMS:
                        sums[key] += row[key]
            sent = sums["batch_jobs"] + sums["sync_jobs"]
            intervals.append(
                {
                    "start": start,
                    **{key: sums[key] for key in SERIES_COUNTS},
                    "cost_usd": sums["cost_usd"],
                    "sync_cost_usd": sums["sync_cost_usd"],
                    "saved_usd": sums["sync_cost_usd"] - sums["cost_usd"],
                    "batch_share": sums["batch_jobs"] / sent if sent else None,
                    "cache_hit_ratio": cache_hit_ratio(
                        sums["input_tokens"], sums["cache_write_tokens"], sums["cache_read_tokens"]
                    ),
                }
            )
        return intervals

    def spend_by_tenant(self, top: int = SPEND_TENANTS) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """For the admin: the `top` tenants that spent the most in the window (then by name), each with its
        cost and saving per interval (aligned with `view`'s), and the other tenants' summed (None when there
        are none). A tenant that spent nothing in the window is left out."""

        def spend(rows: dict[datetime, dict[str, Any]]) -> list[dict[str, Any]]:
            out = []
            for start in self.starts:
                row = rows.get(start)
                cost = row["cost_usd"] if row else 0.0
                sync = row["sync_cost_usd"] if row else 0.0
                out.append({"cost_usd": cost, "saved_usd": sync - cost})
            return out

        spent = []
        for tenant, rows in self.tenants.items():
            intervals = spend(rows)
            cost = sum(entry["cost_usd"] for entry in intervals)
            saved = sum(entry["saved_usd"] for entry in intervals)
            if cost or saved:
                spent.append({"tenant": tenant, "cost_usd": cost, "saved_usd": saved, "intervals": intervals})
        spent.sort(key=lambda entry: (-entry["cost_usd"], entry["tenant"]))
        rest = spent[top:]
        if not rest:
            return spent, None
        others = [
            {key: sum(entry["intervals"][index][key] for entry in rest) for key in ("cost_usd", "saved_usd")}
            for index in range(len(self.starts))
        ]
        return spent[:top], {
            "tenants": len(rest),
            "cost_usd": sum(entry["cost_usd"] for entry in rest),
            "saved_usd": sum(entry["saved_usd"] for entry in rest),
            "intervals": others,
        }


class Readings:
    """The database's last readings: the metrics' (as the registry they are registered on shows them at each
    scrape) and the overview's."""

    def __init__(
        self, registry: CollectorRegistry, http: HttpSettings | None = None, routing: Routing | None = None
    ) -> None:
        http = http or HttpSettings()
        routing = routing or Routing.from_settings(RoutingSettings())
        self.routing_margin_s = routing.margin_s
        self.database_errors = Counter(
            "batchd_metrics_database_errors",
            "Readings of the database for the metrics that failed (their metrics are left out of the scrapes "
            "until the next reading).",
            registry=registry,
        )
        registry.register(_DatabaseCollector(self))
        registry.register(_LedgerCollector(self))
        self.snapshot: Snapshot | None = None
        self.ledger: Ledger | None = None
        self._snapshot = Reading(
            "metrics_snapshot",
            _read_snapshot,
            interval_s=http.metrics_interval_s,
            timeout_s=http.metrics_timeout_s,
            on_error=self.database_errors.inc,
        )
        self._ledger = Reading(
            "metrics_ledger",
            _read_ledger,
            interval_s=http.metrics_interval_s,
            timeout_s=http.metrics_timeout_s,
            on_error=self.database_errors.inc,
        )
        self._overview = Reading(
            "overview",
            _overview_reader(routing),
            interval_s=http.overview_interval_s,
            timeout_s=http.overview_timeout_s,
            isolation="repeatable_read",
        )
        self._series = {
            window: Reading(
                f"series_{window}",
                _series_reader(seconds, interval, flow.SPANS[window]),
                interval_s=http.overview_interval_s,
                timeout_s=http.overview_timeout_s,
                isolation="repeatable_read",
            )
            for window, (seconds, interval) in WINDOWS.items()
        }

    @property
    def snapshot_queries(self) -> int:
        return self._snapshot.queries

    @property
    def ledger_queries(self) -> int:
        return self._ledger.queries

    @property
    def overview_queries(self) -> int:
        return self._overview.queries

    @property
    def overview_interval_s(self) -> float:
        return self._overview.interval_s

    async def refresh(self, pool: asyncpg.Pool) -> None:
        """Brings the metrics' readings up to date (each unless its last is fresh), side by side."""
        self.snapshot, self.ledger = await asyncio.gather(self._snapshot.get(pool), self._ledger.get(pool))

    async def overview(self, pool: asyncpg.Pool) -> Overview | None:
        """The last overview, read anew when it is older than its interval; None when that reading failed."""
        return await self._overview.get(pool)

    async def series(self, pool: asyncpg.Pool, window: str) -> Series | None:
        """The last series of `window` (a key of WINDOWS), read anew when older than the overview's
        interval; None when that reading failed."""
        return await self._series[window].get(pool)

    def series_queries(self, window: str) -> int:
        return self._series[window].queries


async def _read_snapshot(connection: Connection) -> Snapshot:
    return _snapshot(await connection.fetch(sql("metrics_snapshot")))


async def _read_ledger(connection: Connection) -> Ledger:
    return _ledger(await connection.fetch(sql("billed_totals"), None, None))


def _overview_reader(routing: Routing) -> Callable[[Connection], Awaitable[Overview]]:
    async def read(connection: Connection) -> Overview:
        heads = await connection.fetch(sql("overview_heads"))  # first: the snapshot is taken at it
        queued = await connection.fetch(sql("overview_queued"))
        batches = await connection.fetch(sql("overview_batches"))
        totals = await connection.fetch(sql("overview_totals"))
        unpublished = await connection.fetch(sql("overview_unpublished"))
        budgets = await connection.fetch(sql("tenant_budgets"))
        turnaround = await connection.fetchrow(
            sql("overview_turnaround"), routing.window, routing.min_samples, routing.prior_s
        )
        sync = await connection.fetch(sql("overview_sync"))
        overview = _overview(
            heads, queued, batches, _less(totals, unpublished), [_budget(row) for row in budgets]
        )
        for row in sync:
            entry = {"reason": row["reason"], "jobs": row["jobs"]}
            overview.tenant_view(row["tenant_id"]).sync_last_hour.append(entry)
            _add_reason(overview.admin.sync_last_hour, entry)
        overview.turnaround.update(
            {
                **(dict(turnaround) if turnaround is not None else {}),  # an aggregate: one row
                "margin_s": routing.margin_s,
                "window": routing.window,
                "min_samples": routing.min_samples,
            }
        )
        return overview

    return read


def _add_reason(rows: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    for row in rows:
        if row["reason"] == entry["reason"]:
            row["jobs"] += entry["jobs"]
            return
    rows.append(dict(entry))


def _series_reader(
    seconds: float, interval: str, flow_span: str
) -> Callable[[Connection], Awaitable[Series]]:
    async def read(connection: Connection) -> Series:
        starts = [row["start"] for row in await connection.fetch(sql("series_intervals"), interval, seconds)]
        tenants: dict[str, dict[datetime, dict[str, Any]]] = {}
        for row in await connection.fetch(sql("series"), interval, starts[0]):
            tenants.setdefault(row["tenant_id"], {})[row["start"]] = {key: row[key] for key in SERIES_SUMS}
        return Series(interval, starts, tenants, await flow.read(connection, seconds, flow_span))

    return read


def _budget(row: asyncpg.Record) -> dict[str, Any]:
    """A tenant's budgets as JSON numbers (null: no such budget) and why and since when it is held."""

    def usd(value: Any) -> float | None:
        return None if value is None else float(value)

    return {
        "tenant_id": row["tenant_id"],
        "day_usd": usd(row["budget_day_usd"]),
        "month_usd": usd(row["budget_month_usd"]),
        "spent_day_usd": float(row["spent_day_usd"]),
        "spent_month_usd": float(row["spent_month_usd"]),
        "over_budget": row["over_budget"],
        "held": row["hold_reason"] is not None,
        "hold_reason": row["hold_reason"],
        "held_since": row["held_since"],
    }


def _overview(
    heads: Iterable[asyncpg.Record],
    queued: Iterable[asyncpg.Record],
    batches: Iterable[asyncpg.Record],
    totals: list[dict[str, Any]],
    budgets: Iterable[dict[str, Any]],
) -> Overview:
    head = base = 0
    tenant_heads: dict[str, int] = {}
    for row in heads:
        if row["tenant_id"] is None:
            head, base = row["head"], row["base"]
        else:
            tenant_heads[row["tenant_id"]] = row["head"]
    admin = View(head)
    tenants: dict[str, View] = {}

    def tenant(tenant_id: str) -> View:
        view = tenants.get(tenant_id)
        if view is None:
            view = tenants[tenant_id] = View(tenant_heads.get(tenant_id, base))
        return view

    for queued_row in queued:
        admin.queued.append(dict(queued_row))
        tenant(queued_row["tenant_id"]).queued.append(dict(queued_row))
    open_batches: dict[Any, dict[str, Any]] = {}  # in the query's order: oldest first
    for row in batches:
        batch = {key: row[key] for key in ("id", "provider_batch_id", "status", "in_flight")}
        # Other tenants' share of the batch (its request_count) is not a tenant's business.
        tenant(row["tenant_id"]).open_batches.append({**batch, "age_s": row["age_s"]})
        summed = open_batches.get(row["id"])
        if summed is None:
            open_batches[row["id"]] = {**batch, "request_count": row["request_count"], "age_s": row["age_s"]}
        else:
            summed["in_flight"] += row["in_flight"]
    admin.open_batches.extend(open_batches.values())
    for totals_row in totals:
        admin.totals.append(totals_row)
        tenant(totals_row["tenant_id"]).totals.append(totals_row)
    for budget in budgets:
        admin.budgets.append(budget)
        tenant(budget["tenant_id"]).budgets.append(budget)
    return Overview(admin, tenants, tenant_heads, base)


def _less(totals: Iterable[asyncpg.Record], unpublished: Iterable[asyncpg.Record]) -> list[dict[str, Any]]:
    """Each tenant's totals less what the page will count again from the events after the overview's head;
    a tenant left with no finished job is left out, as one that has none."""
    less = {row["tenant_id"]: row for row in unpublished}
    rows = []
    for row in totals:
        kept = dict(row)
        if (minus := less.get(row["tenant_id"])) is not None:
            kept = {key: value if key == "tenant_id" else value - minus[key] for key, value in kept.items()}
        if kept["succeeded"] or kept["failed"] or kept["canceled"]:
            rows.append(kept)
    return rows


def _snapshot(rows: Iterable[asyncpg.Record]) -> Snapshot:
    jobs: dict[tuple[str, str], int] = {}
    batches: dict[str, int] = {}
    queue_age_s = 0.0
    for row in rows:
        if row["kind"] == "jobs":
            jobs[row["tenant_id"], row["status"]] = row["n"]
        elif row["kind"] == "batches":
            batches[row["status"]] = row["n"]
        else:
            queue_age_s = row["age_s"]
    return Snapshot(jobs, batches, queue_age_s)


def _billed(row: asyncpg.Record) -> Billed:
    return Billed(
        jobs=row["jobs"],
        tokens={kind: row[f"{kind}_tokens"] for kind in TOKEN_KINDS},
        cost_usd=float(row["cost_usd"]),
        sync_cost_usd=float(row["sync_cost_usd"]),
        saved_usd=float(row["sync_cost_usd"] - row["cost_usd"]),
    )


def _ledger(rows: Iterable[asyncpg.Record]) -> Ledger:
    billed: dict[tuple[str, str, str], Billed] = {}
    job_types: dict[str, Billed] = {}
    for row in rows:
        if row["by_job_type"]:
            job_types[row["job_type"] or ""] = _billed(row)
        else:
            billed[row["tenant_id"], row["model"], row["via"]] = _billed(row)
    return Ledger(billed, job_types)


def _add(a: Billed, b: Billed) -> Billed:
    return Billed(
        jobs=a.jobs + b.jobs,
        tokens={kind: a.tokens.get(kind, 0) + b.tokens.get(kind, 0) for kind in TOKEN_KINDS},
        cost_usd=a.cost_usd + b.cost_usd,
        sync_cost_usd=a.sync_cost_usd + b.sync_cost_usd,
        saved_usd=a.saved_usd + b.saved_usd,
    )


def _capped_billed(billed: dict[tuple[str, str, str], Billed]) -> dict[tuple[str, str, str], Billed]:
    """As _capped: the MAX_TENANTS tenants with the most billed jobs by name, the rest summed under ""."""
    totals: Tally[str] = Tally()
    for (tenant, _, _), row in billed.items():
        totals[tenant] += row.jobs
    if len(totals) <= MAX_TENANTS:
        return billed
    kept = {
        tenant for tenant, _ in sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:MAX_TENANTS]
    }
    capped: dict[tuple[str, str, str], Billed] = {}
    for (tenant, model, via), row in billed.items():
        key = (tenant if tenant in kept else "", model, via)
        capped[key] = _add(capped.get(key, Billed()), row)
    return capped


def _capped(jobs: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """The MAX_TENANTS tenants with the most jobs by name; the rest summed under "" (no tenant's name)."""
    totals: Tally[str] = Tally()
    for (tenant, _), count in jobs.items():
        totals[tenant] += count
    if len(totals) <= MAX_TENANTS:
        return jobs
    kept = {
        tenant for tenant, _ in sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:MAX_TENANTS]
    }
    capped: Tally[tuple[str, str]] = Tally()
    for (tenant, status), count in jobs.items():
        capped[tenant if tenant in kept else "", status] += count
    return dict(capped)


class _DatabaseCollector:
    """The last snapshot as gauges (nothing when the last read failed: no stale numbers)."""

    def __init__(self, readings: Readings) -> None:
        self.readings = readings

    def describe(self) -> Iterator[Metric]:
        return self._families(Snapshot())

    def collect(self) -> Iterator[Metric]:
        snapshot = self.readings.snapshot
        return iter(()) if snapshot is None else self._families(snapshot)

    @staticmethod
    def _families(snapshot: Snapshot) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "batchd_jobs",
            "Jobs in batchd.jobs by tenant and status, finished ones included (database-wide; every tenant "
            f"with a job has every status; past {MAX_TENANTS} tenants the smallest are summed under "
            'tenant="").',
            labels=["tenant", "status"],
        )
        capped = _capped(snapshot.jobs)
        for tenant in sorted({tenant for tenant, _ in capped}):
            for status in JOB_STATUSES:
                jobs.add_metric([tenant, status], capped.get((tenant, status), 0))
        yield jobs
        batches = GaugeMetricFamily(
            "batchd_batches", "Batches in batchd.batches by status (database-wide).", labels=["status"]
        )
        for batch_status in BATCH_STATUSES:
            batches.add_metric([batch_status], snapshot.batches.get(batch_status, 0))
        yield batches
        yield GaugeMetricFamily(
            "batchd_queue_oldest_job_age_seconds",
            "Age of the job at the head of the queue (the queued job first in claim order, retried ones "
            "included), by the database's clock; 0 when nothing is queued.",
            value=snapshot.queue_age_s,
        )


class _LedgerCollector:
    """The last read of the cost ledger (nothing when it failed: no stale money). Counters: the ledger only
    grows (its rows are never deleted), so rate() and increase() over them are what was spent in a window."""

    def __init__(self, readings: Readings) -> None:
        self.readings = readings

    def describe(self) -> Iterator[Metric]:
        return self._families(Ledger())

    def collect(self) -> Iterator[Metric]:
        ledger = self.readings.ledger
        return iter(()) if ledger is None else self._families(ledger)

    @staticmethod
    def _families(ledger: Ledger) -> Iterator[Metric]:
        scope = (
            "From the cost ledger batchd.costs, for all time, as `batchd report` shows it (database-wide; "
            f'past {MAX_TENANTS} tenants the smallest are summed under tenant="").'
        )
        jobs = CounterMetricFamily(
            "batchd_billed_jobs",
            f"Requests billed (succeeded), by tenant, model and path (batch or sync). {scope}",
            labels=["tenant", "model", "via"],
        )
        cost = CounterMetricFamily(
            "batchd_cost_usd",
            f"What the billed requests cost, USD (unpriced models count 0). {scope}",
            labels=["tenant", "model", "via"],
        )
        tokens = CounterMetricFamily(
            "batchd_tokens",
            f"Tokens billed by kind: input, output, cache_write_5m, cache_write_1h, cache_read. {scope}",
            labels=["tenant", "model", "kind"],
        )
        sync = CounterMetricFamily(
            "batchd_sync_cost_usd",
            f"What the same requests would have cost through the synchronous Messages API, USD. {scope}",
            labels=["tenant", "model"],
        )
        saved = CounterMetricFamily(
            "batchd_saved_usd",
            f"batchd_sync_cost_usd_total minus batchd_cost_usd_total: what batching saved, USD. {scope}",
            labels=["tenant", "model"],
        )
        per_model: dict[tuple[str, str], Billed] = {}
        for (tenant, model, via), row in sorted(_capped_billed(ledger.billed).items()):
            jobs.add_metric([tenant, model, via], row.jobs)
            cost.add_metric([tenant, model, via], row.cost_usd)
            per_model[tenant, model] = _add(per_model.get((tenant, model), Billed()), row)
        for (tenant, model), row in per_model.items():
            for kind in TOKEN_KINDS:
                tokens.add_metric([tenant, model, kind], row.tokens[kind])
            sync.add_metric([tenant, model], row.sync_cost_usd)
            saved.add_metric([tenant, model], row.saved_usd)
        yield from (jobs, tokens, cost, sync, saved)
        prompt = CounterMetricFamily(
            "batchd_prompt_tokens",
            'Prompt tokens billed per job type (job_type="": raw requests) by kind: input, cache_write_5m, '
            "cache_write_1h, cache_read; a hit ratio over a window is rate(cache_read) / rate(all four). "
            "From the cost ledger, for all time (database-wide).",
            labels=["job_type", "kind"],
        )
        ratio = GaugeMetricFamily(
            "batchd_cache_hit_ratio",
            "Share of a job type's prompt tokens read from the prompt cache, for all time: cache_read / "
            "(input + cache_write_5m + cache_write_1h + cache_read), as `batchd report` defines it "
            '(job_type="": raw requests; database-wide).',
            labels=["job_type"],
        )
        for job_type, row in sorted(ledger.job_types.items()):
            for kind in PROMPT_KINDS:
                prompt.add_metric([job_type, kind], row.tokens[kind])
            hit = cache_hit_ratio(
                row.tokens["input"],
                row.tokens["cache_write_5m"] + row.tokens["cache_write_1h"],
                row.tokens["cache_read"],
            )
            if hit is not None:
                ratio.add_metric([job_type], hit)
        yield prompt
        yield ratio
