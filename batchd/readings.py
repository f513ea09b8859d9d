"""The database's side of GET /metrics: what batchd.jobs, batchd.batches and the cost ledger say, read at
scrape time and kept for a while, so that a storm of scrapes costs one query per TTL (metrics.py holds the
instruments the parts update; this module, what is read from the database).

- The queue and the batches, read with one query (`metrics_snapshot`): jobs per tenant and status, batches
  per status, the age of the queue's head. It is kept for `SNAPSHOT_TTL_S`, and one scrape at a time runs
  it. These are database-wide: every daemon on the database reports the same values (aggregate them with
  max, not sum).
- The cost ledger's totals, read the same way with one more query (`metrics_ledger`): what `batchd report`
  shows for all time per tenant and model (jobs, tokens, cost, saved), and the prompt cache per job type.
  That query scans the whole ledger, which only grows, and its numbers move only when a batch's results
  are applied, so it is kept longer: `LEDGER_TTL_S`. Database-wide too.

Tenants are a label of `batchd_jobs`: one series per tenant and status. Past `MAX_TENANTS` tenants, the
tenants with the fewest jobs are summed into one series with an empty tenant label (no tenant is named "":
the schema forbids it), so the number of series stays bounded whatever producers write.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .report import cache_hit_ratio
from .statuses import BATCH_STATUSES, JOB_STATUSES
from .store import DB_ERRORS, sql

log = structlog.get_logger("batchd.readings")

SNAPSHOT_TTL_S = 1.5
SNAPSHOT_TIMEOUT_S = 5.0
# The ledger query scans every row of batchd.costs (about 235 ms per 200,000 rows on a 2-core machine):
# once a minute, with a timeout of its own, lets the ledger grow to millions of rows before it matters.
LEDGER_TTL_S = 60.0
LEDGER_TIMEOUT_S = 30.0
TOKEN_KINDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
PROMPT_KINDS = ("input", "cache_write_5m", "cache_write_1h", "cache_read")
MAX_TENANTS = 500


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


class Readings:
    """The database's last readings, as the registry they are registered on shows them at each scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.database_errors = Counter(
            "batchd_metrics_database_errors",
            "Scrapes whose database query failed (the database's metrics are then left out of the scrape).",
            registry=registry,
        )
        registry.register(_DatabaseCollector(self))
        registry.register(_LedgerCollector(self))
        self.snapshot: Snapshot | None = None
        self.snapshot_queries = 0
        self._snapshot_at = -math.inf
        self._snapshot_lock = asyncio.Lock()
        self.ledger: Ledger | None = None
        self.ledger_queries = 0
        self._ledger_at = -math.inf

    async def refresh(self, pool: asyncpg.Pool) -> None:
        """Reads the database's view unless the last read is fresh; one read at a time."""
        if self._fresh():
            return
        async with self._snapshot_lock:
            if self._fresh():
                return  # another scrape read it while this one waited
            self.snapshot_queries += 1
            try:
                rows = await pool.fetch(sql("metrics_snapshot"), timeout=SNAPSHOT_TIMEOUT_S)
            except DB_ERRORS as error:
                # A failure is kept for the TTL too: a storm against a sick database costs one try per TTL.
                self.snapshot = None
                self.database_errors.inc()
                log.warning("metrics.database_error", error=str(error) or type(error).__name__)
            else:
                self.snapshot = _snapshot(rows)
            self._snapshot_at = time.monotonic()
            if self.snapshot is None:
                self.ledger = None  # the database is away: no stale money either
            elif time.monotonic() - self._ledger_at >= LEDGER_TTL_S:
                await self._refresh_ledger(pool)

    async def _refresh_ledger(self, pool: asyncpg.Pool) -> None:
        self.ledger_queries += 1
        try:
            rows = await pool.fetch(sql("metrics_ledger"), timeout=LEDGER_TIMEOUT_S)
        except DB_ERRORS as error:
            self.ledger = None
            self.database_errors.inc()
            log.warning("metrics.database_error", error=str(error) or type(error).__name__)
        else:
            self.ledger = _ledger(rows)
        self._ledger_at = time.monotonic()

    def _fresh(self) -> bool:
        return time.monotonic() - self._snapshot_at < SNAPSHOT_TTL_S


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
        cost_usd=row["cost_usd"],
        sync_cost_usd=row["sync_cost_usd"],
        saved_usd=row["saved_usd"],
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
