"""The queue and batch turnaround over time: what the dashboard's queue and turnaround charts draw.

Sampling (`run`): every `rollups.flow_sample_interval_s` each daemon asks for a sample, and one statement
(queries.sql: sample_flow) takes it unless another daemon took one less than 0.9 of that interval ago
(batchd.flow_clock's one row: its lock makes two daemons at the same moment take one sample). A sample
counts the queued jobs per tenant and the oldest one's wait (on jobs_live: the queue, never the history)
and reads the routing p90 in use (batchd.batch_turnaround: the last `routing.window` applied batches), and
adds them at once to batchd.flow's rows of the UTC minute, hour and day it falls in, per tenant with queued
jobs and for every tenant together (tenant_id '').

Batch turnaround is not sampled: apply_results adds each job a batch finishes to a log-scale histogram
(batchd.turnaround_tallies, per tenant and bucket, in the statement that finishes it), which the fold
(rollups.py) moves to batchd.turnarounds per UTC minute, hour and day. Percentiles are read from the
buckets here: bucket b holds 2^(b/4) s up to 2^((b+1)/4) s, and a percentile is the geometric middle of
the bucket it falls in, within 9% of the true value.

Reading (`read`, for GET /v1/series through readings.py): the window's rows of both tables, a range of
their primary keys: per tenant 60 minutes for the last hour, 24 hours for the day, 30 days for 30 days.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from .aio import run_loop
from .context import Context
from .store import DB_ERRORS, Connection, sql

log = structlog.get_logger("batchd.flow")

BUCKETS = 80
STEPS_PER_DOUBLING = 4
# A sample is skipped when another daemon took one less than this share of the interval ago: daemons whose
# clocks tick a little apart still take about one sample per interval between them.
GATE_SHARE = 0.9
# GET /v1/series?window= (readings.WINDOWS' keys): the span of batchd.flow's rows it reads.
SPANS = {"1h": "minute", "1d": "hour", "30d": "day"}
ALL_TENANTS = ""  # batchd.flow's row of every tenant together: no tenant has this name


def bucket_of(seconds: float) -> int:
    """batchd.turnaround_bucket, in Python (the tests compare them)."""
    if seconds <= 1:
        return 0
    return min(BUCKETS - 1, max(0, math.floor(math.log2(seconds) * STEPS_PER_DOUBLING)))


def bucket_middle(bucket: int) -> float:
    """The value a percentile falling in `bucket` is read as: the geometric middle of its bounds."""
    return float(2 ** ((bucket + 0.5) / STEPS_PER_DOUBLING))


def percentile(histogram: dict[int, int], share: float) -> float | None:
    """The `share` percentile (0.5, 0.9) of a histogram of bucket -> jobs; None when it is empty."""
    total = sum(histogram.values())
    if total <= 0:
        return None
    rank = share * total
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket_middle(bucket)
    return bucket_middle(max(histogram))


async def sample(db: Connection, interval_s: float, routing: tuple[int, int, float]) -> tuple[bool, int]:
    """Takes the queue's sample unless one was taken less than GATE_SHARE of `interval_s` ago; returns
    whether it did, and how many tenants had queued jobs. `routing`: window, min_samples, prior_s."""
    row = await db.fetchrow(sql("sample_flow"), interval_s * GATE_SHARE, *routing)
    if row is None:  # an aggregate answers one row, always
        raise RuntimeError("sample_flow answered no row")
    return bool(row["sampled"]), int(row["tenants"])


async def run(ctx: Context) -> None:
    """Asks for a sample every `rollups.flow_sample_interval_s`."""
    interval_s = ctx.settings.rollups.flow_sample_interval_s
    routing = ctx.settings.routing
    params = (routing.window, routing.min_samples, routing.prior_turnaround_s)

    async def step() -> None:
        async with ctx.pool.acquire() as connection:
            await sample(connection, interval_s, params)

    await run_loop(
        "flow",
        step,
        stopping=ctx.stopping,
        wake=None,
        idle_s=interval_s,
        backoff=ctx.backoff,
        errors=DB_ERRORS,
    )


@dataclass(frozen=True)
class Flow:
    """One window's flow: its intervals (starts, oldest first), batchd.flow's rows per tenant ('' every
    tenant) and start, and the turnaround histograms per tenant and start."""

    interval: str  # "minute", "hour" or "day"
    starts: list[datetime]
    queue: dict[str, dict[datetime, dict[str, Any]]]
    turnaround: dict[str, dict[datetime, dict[int, int]]]

    def view(self, tenant_id: str | None) -> list[dict[str, Any]]:
        """Per interval: the queue (average and most queued jobs, the longest wait: every tenant's for the
        admin, tenant_id None; a tenant's own), the routing p90 in use (the same for all: it is the
        database's), and the batch turnaround p50/p90 of the jobs batches finished in it. Numbers of the
        queue are null for an interval without a sample (no daemon was running)."""
        everyone = self.queue.get(ALL_TENANTS, {})
        own = everyone if tenant_id is None else self.queue.get(tenant_id, {})
        histograms = (
            list(self.turnaround.values()) if tenant_id is None else [self.turnaround.get(tenant_id, {})]
        )
        intervals = []
        for start in self.starts:
            total = everyone.get(start)
            samples = total["samples"] if total else 0
            row = own.get(start)
            histogram: dict[int, int] = {}
            for rows in histograms:
                for bucket, jobs in rows.get(start, {}).items():
                    histogram[bucket] = histogram.get(bucket, 0) + jobs
            sampled = samples > 0
            intervals.append(
                {
                    "start": start,
                    "samples": samples,
                    "queued": (row["queued_sum"] / samples if row else 0.0) if sampled else None,
                    "queued_max": (row["queued_max"] if row else 0) if sampled else None,
                    "oldest_wait_s": (row["oldest_max_s"] if row else 0.0) if sampled else None,
                    "routing_p90_s": total["routing_p90_sum_s"] / samples if total and sampled else None,
                    "turnaround_jobs": sum(histogram.values()),
                    "turnaround_p50_s": percentile(histogram, 0.5),
                    "turnaround_p90_s": percentile(histogram, 0.9),
                }
            )
        return intervals


async def read(connection: Connection, seconds: float, span: str) -> Flow:
    """The flow of the last `seconds` in intervals of `span`, for every tenant (see Flow.view)."""
    starts = [row["start"] for row in await connection.fetch(sql("flow_intervals"), span, seconds)]
    queue: dict[str, dict[datetime, dict[str, Any]]] = {}
    for row in await connection.fetch(sql("flow_series"), span, starts[0]):
        queue.setdefault(row["tenant_id"], {})[row["start"]] = dict(row)
    turnaround: dict[str, dict[datetime, dict[int, int]]] = {}
    for row in await connection.fetch(sql("turnaround_series"), span, starts[0]):
        turnaround.setdefault(row["tenant_id"], {}).setdefault(row["start"], {})[row["bucket"]] = row["jobs"]
    return Flow(span, starts, queue, turnaround)
