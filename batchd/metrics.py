"""batchd's Prometheus metrics: one registry per daemon (never the process-wide default, so that several
daemons in one process keep apart), served by `GET /metrics` (server.py).

Three sources:

- counters and histograms that the parts update as they work: every API call (provider.py), requests
  submitted (submitter.py), results applied (results.py), poll lag (poller.py), event-loop lag (below);
- values read at scrape time from memory: the event hub's open streams and its counters (events.py);
- the database's view, read at scrape time with one query (`metrics_snapshot`): jobs per tenant and
  status, batches per status, the age of the queue's head. It is kept for `SNAPSHOT_TTL_S`, and one scrape
  at a time runs it, so a storm of scrapes costs one query per TTL. These are database-wide: every daemon
  on the database reports the same values (aggregate them with max, not sum).
- the cost ledger's totals, read the same way with one more query (`metrics_ledger`): what `batchd report`
  shows for all time per tenant and model (jobs, tokens, cost, saved), and the prompt cache per job type.
  That query scans the whole ledger, which only grows, and its numbers move only when a batch's results
  are applied, so it is kept longer: `LEDGER_TTL_S`. Database-wide too.

Tenants are a label of `batchd_jobs`: one series per tenant and status. Past `MAX_TENANTS` tenants, the
tenants with the fewest jobs are summed into one series with an empty tenant label (no tenant is named "":
the schema forbids it), so the number of series stays bounded whatever producers write.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg
import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import __version__
from .report import cache_hit_ratio
from .statuses import BATCH_STATUSES, JOB_STATUSES
from .store import DB_ERRORS, sql

if TYPE_CHECKING:
    from .events import EventHub

log = structlog.get_logger("batchd.metrics")

# No `_created` series beside each counter and histogram: they double the series for a timestamp that the
# process's start time (process_start_time_seconds) already gives. (A switch of the library's, process-wide.)
disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it unannotated

SNAPSHOT_TTL_S = 1.5
# The ledger query scans every row of batchd.costs (about 235 ms per 200,000 rows on a 2-core machine):
# once a minute, with a timeout of its own, lets the ledger grow to millions of rows before it matters.
LEDGER_TTL_S = 60.0
LEDGER_TIMEOUT_S = 30.0
TOKEN_KINDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
PROMPT_KINDS = ("input", "cache_write_5m", "cache_write_1h", "cache_read")
SNAPSHOT_TIMEOUT_S = 5.0
MAX_TENANTS = 500
RESULT_TYPES = ("succeeded", "errored", "canceled", "expired", "missing")
LOOP_LAG_INTERVAL_S = 0.5
LOOP_LAG_WARNING_S = 1.0

API_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
POLL_LAG_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


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


class _ProcessCollector(ProcessCollector):
    """prometheus_client's `process_*` metrics, with the boot time (which start_time_seconds adds to the
    process's start tick) taken from the clocks. The library reads it from /proc/stat, which the unit's
    ProcSubset=pid hides; without it the library exports none of the metrics, silently."""

    def _boot_time(self) -> float:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.info = Gauge(
            "batchd_info",
            "Always 1; the labels say which batchd this is (instance_id changes at every start).",
            ["version", "instance_id"],
            registry=registry,
        )
        self.api_calls = Counter(
            "batchd_api_calls",
            "Calls to the Message Batches API by endpoint and outcome: the HTTP status (200 for every "
            "success), or connection_error, timeout, other when no status came back.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.api_errors = Counter(
            "batchd_api_errors",
            "Calls to the Message Batches API that failed (the subset of batchd_api_calls_total without "
            "status 200), by endpoint and status.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.api_duration = Histogram(
            "batchd_api_call_duration_seconds",
            "Time from sending an API call to its answer or failure (results: until the response starts; "
            "its body is streamed while it is applied). The rate limiter's wait is not included.",
            ["endpoint"],
            buckets=API_DURATION_BUCKETS,
            registry=registry,
        )
        self.batches_submitted = Counter(
            "batchd_batches_submitted",
            "Batches recorded as created by the provider (adopted ones included: their create's answer was "
            "lost).",
            registry=registry,
        )
        self.requests_submitted = Counter(
            "batchd_requests_submitted",
            "Requests in the batches counted by batchd_batches_submitted_total.",
            registry=registry,
        )
        self.results_applied = Counter(
            "batchd_results_applied",
            "Results applied to jobs, by what the provider said of the request: succeeded, errored, "
            "canceled, expired, or missing (the results file had no line for it).",
            ["type"],
            registry=registry,
        )
        self.poll_lag = Histogram(
            "batchd_poll_lag_seconds",
            "From a batch's ended_at at the provider to batchd recording it ended (by the database's "
            "clock): what the polling interval costs.",
            buckets=POLL_LAG_BUCKETS,
            registry=registry,
        )
        self.loop_lag = Histogram(
            "batchd_event_loop_lag_seconds",
            f"How late a {LOOP_LAG_INTERVAL_S:g} s sleep on the daemon's event loop woke up: time the loop "
            "spent busy with something that did not yield.",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self.loop_lag_last = Gauge(
            "batchd_event_loop_last_lag_seconds",
            "The latest measurement of batchd_event_loop_lag_seconds.",
            registry=registry,
        )
        self.database_errors = Counter(
            "batchd_metrics_database_errors",
            "Scrapes whose database query failed (the database's metrics are then left out of the scrape).",
            registry=registry,
        )
        for kind in RESULT_TYPES:
            self.results_applied.labels(kind)  # shown from the start, at 0
        registry.register(_DatabaseCollector(self))
        registry.register(_LedgerCollector(self))
        registry.register(_HubCollector(self))
        _ProcessCollector(registry=registry)
        self.hub: EventHub | None = None
        self.snapshot: Snapshot | None = None
        self.snapshot_queries = 0
        self._snapshot_at = -math.inf
        self._snapshot_lock = asyncio.Lock()
        self.ledger: Ledger | None = None
        self.ledger_queries = 0
        self._ledger_at = -math.inf

    def identify(self, instance_id: str) -> None:
        self.info.labels(__version__, instance_id).set(1)

    def api_call(self, endpoint: str, status: str, seconds: float) -> None:
        self.api_calls.labels(endpoint, status).inc()
        if status != "200":
            self.api_errors.labels(endpoint, status).inc()
        self.api_duration.labels(endpoint).observe(seconds)

    def submitted(self, requests: int) -> None:
        self.batches_submitted.inc()
        self.requests_submitted.inc(requests)

    def applied(self, types: Tally[str]) -> None:
        for kind, count in types.items():
            self.results_applied.labels(kind).inc(count)

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

    async def watch_loop_lag(self, stopping: asyncio.Event, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        """Sleeps `interval_s` again and again and records how late each sleep ends (the daemon's side task
        `loop-lag`)."""
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            started = loop.time()
            await asyncio.sleep(interval_s)
            lag = max(0.0, loop.time() - started - interval_s)
            self.loop_lag.observe(lag)
            self.loop_lag_last.set(lag)
            if lag >= LOOP_LAG_WARNING_S:
                log.warning("daemon.event_loop_blocked", lag_s=round(lag, 3))


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

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return self._families(Snapshot())

    def collect(self) -> Iterator[Metric]:
        snapshot = self.metrics.snapshot
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

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return self._families(Ledger())

    def collect(self) -> Iterator[Metric]:
        ledger = self.metrics.ledger
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


class _HubCollector:
    """The event hub's streams and counters, read as they are at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return self._families(0, 0, 0, 0, 0, revoked=0)

    def collect(self) -> Iterator[Metric]:
        hub = self.metrics.hub
        if hub is None:
            return iter(())
        return self._families(
            hub.open_streams,
            hub.fanned_out,
            hub.cut_off,
            hub.fell_behind,
            hub.peak_buffered_bytes,
            revoked=hub.revoked,
        )

    @staticmethod
    def _families(
        streams: int, fanned_out: int, cut_off: int, fell_behind: int, peak: int, *, revoked: int
    ) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "batchd_sse_clients",
            "Open GET /v1/events streams (every tenant's and the admin's).",
            value=streams,
        )
        yield CounterMetricFamily(
            "batchd_sse_events_fanned_out",
            "Events the hub read from the log and handed to the open streams (each counted once, however "
            "many streams it went to).",
            value=fanned_out,
        )
        yield CounterMetricFamily(
            "batchd_sse_streams_cut_off",
            "Streams ended because their client read nothing for events.send_timeout_s (slow_consumer).",
            value=cut_off,
        )
        yield CounterMetricFamily(
            "batchd_sse_streams_fell_behind",
            "Times a stream's buffer would have overflowed and the stream went back to reading the table.",
            value=fell_behind,
        )
        yield CounterMetricFamily(
            "batchd_sse_streams_revoked",
            "Streams ended because the token they were opened with was revoked (or deleted).",
            value=revoked,
        )
        yield GaugeMetricFamily(
            "batchd_sse_buffer_peak_bytes",
            "The most any closed stream ever had waiting in its buffer (bounded by "
            "events.client_buffer_bytes).",
            value=peak,
        )


def result_types(rows: Iterable[tuple[object, str, str | None, str | None]]) -> Tally[str]:
    """What the provider said of each result row (see results.classify): succeeded, errored, canceled,
    expired or missing. Only rows that are not successes are parsed, and those are few."""
    types: Tally[str] = Tally()
    for _, outcome, _, error in rows:
        if outcome == "succeeded":
            types["succeeded"] += 1
        elif outcome == "failed" or error is None:
            types["errored"] += 1
        else:
            kind = json.loads(error).get("type")
            types[kind if kind in ("canceled", "expired", "missing") else "errored"] += 1
    return types
