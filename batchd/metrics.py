"""batchd's Prometheus instruments: one registry per daemon (never the process-wide default, so that several
daemons in one process keep apart), served by `GET /metrics` (server.py).

Here are the counters and histograms that the parts update as they work: every API call (provider.py reports
each through its `on_call`), requests submitted (submitter.py), results applied (results.py), webhook attempts
(deliverer.py), poll lag (poller.py), event-loop lag (below), and the process's own. The daemon registers the
others on the same registry: the event hub's streams and counters, read from memory at scrape time
(events.HubCollector), and the database's counts and the cost ledger, read at scrape time and cached
(readings.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)

from . import __version__

log = structlog.get_logger("batchd.metrics")

# No `_created` series beside each counter and histogram: they double the series for a timestamp that the
# process's start time (process_start_time_seconds) already gives. (A switch of the library's, process-wide.)
disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it unannotated

RESULT_TYPES = ("succeeded", "errored", "canceled", "expired", "missing")
WEBHOOK_OUTCOMES = ("delivered", "failed", "dead")
LOOP_LAG_INTERVAL_S = 0.5
LOOP_LAG_WARNING_S = 1.0

API_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
POLL_LAG_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


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
        self.webhook_attempts = Counter(
            "batchd_webhook_attempts",
            "Webhook delivery attempts by outcome: delivered (a 2xx), failed (tried again later), dead (its "
            "last attempt failed).",
            ["outcome"],
            registry=registry,
        )
        self.webhooks_in_flight = Gauge(
            "batchd_webhooks_in_flight", "Webhook deliveries this daemon is sending now.", registry=registry
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
        for kind in RESULT_TYPES:
            self.results_applied.labels(kind)  # shown from the start, at 0
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_attempts.labels(outcome)
        _ProcessCollector(registry=registry)

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
