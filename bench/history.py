"""Months of history cost nothing (issue 13): the reads, the claim and the apply on a large finished history,
the pruner beside producers, and the numbers behind "delete, not time partitions".

On a database of its own (`--database`, made and migrated here with batchd.migrate, dropped at the end
unless --keep), with 2 cores' worth of set-based SQL:

0. Build: `--jobs` finished jobs (10,000,000) over `--days` (120) for `--tenants` (50, a skewed share each),
   with their ledger rows, applied batches and their tenants' shares, the last week's events,
   and the rollups, tallied from what was inserted by migration 0012's own backfill statement and folded by
   batchd.rollups.fold. Plus the work in flight a daemon has: queued jobs and a batch in progress. Rows go
   in with `session_replication_role = replica` (no per-row triggers) and the jobs' indexes built after.
   Reported: rows, time, and disk per million jobs. --reuse takes a database built before with the same
   shape (kept with --keep) instead.
1. Reads, each timed `--runs` times after a warm-up, target < 50 ms (median): GET /v1/overview as the daemon
   answers it (one reading of every tenant, readings.Readings.overview, and the admin's or the largest
   tenant's view of it), /metrics' readings (readings.Readings.refresh: metrics_snapshot and billed_totals),
   `batchd status` (status.collect), `batchd report --since 30d` (report.collect).
   A read that misses the target is printed with EXPLAIN (ANALYZE, BUFFERS) of its queries.
2. Claim and apply of `--claim-jobs` (10,000) on the history against the same on a database with no history
   but the same work in flight: Flusher.flush_one() (the claim, as the daemon runs it), then the batch is
   marked submitted and ended, and its results applied with results.apply_rows (the apply_results statement
   with its temporary table), IN_FLIGHT_CHUNKS chunks of results.apply_chunk at once as results.py does.
   `--claim-rounds` rounds alternating, median rates; target: within 10 %.
3. Pruning `--prune-jobs` (1,000,000) finished jobs with batchd.pruner.prune_history (a RetentionSettings
   whose retentions make that many due; the default chunk and busy_share unless --chunk/--busy-share)
   while `--producers` (8) connections insert one row per commit: slices of `--window` seconds with the
   pruner running and without, alternating, until it is done; target: the producers' median rate within
   10 % of theirs without. Then VACUUM of batchd.jobs is timed, and the producers' rows are removed.
4. --design (also in the default run): a scratch database with 1,000,000 jobs-like rows twice, a plain table
   and one partitioned by day on completed_at (`--design-days` partitions): a day's chunked DELETE against
   DETACH + DROP of its partition, a lookup by id on each, and the UNIQUE (tenant_id, idempotency_key) a
   partitioned table cannot have.

    .venv/bin/python bench/history.py [--jobs 10000000] [--keep] [--reuse] [--steps reads,claim,prune,design]

Autovacuum is off on the benchmark's tables while it runs, so no vacuum wakes in a timed step; the steps
vacuum where they say so. Exits non-zero when a target is missed or a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import random
import re
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, cast
from uuid import UUID

import asyncpg
from benchlib import (
    API_KEY,
    MIB,
    SERVER_URL,
    STEADY_WAKE_SEQ,
    Row,
    admin_execute,
    bench_settings,
    database_url,
    describe_server,
    finish,
    interrupt_on_sigterm,
    machine,
    per_s,
    scratch_database,
)
from prometheus_client import CollectorRegistry

from batchd import log as batchd_log
from batchd import migrate, report, rollups, status
from batchd.config import RetentionSettings, Settings
from batchd.context import Context
from batchd.flusher import Flusher
from batchd.provider import Provider
from batchd.pruner import prune_history
from batchd.publisher import publish
from batchd.ratelimit import RateLimiter
from batchd.readings import Readings
from batchd.results import IN_FLIGHT_CHUNKS, RESULT_COLUMNS, apply_rows, publish_prices
from batchd.store import create_pool, init_connection, sql

READ_TARGET_MS = 50.0
MAX_SLOWDOWN = 0.10  # claim, apply and producers within 10 % of their rate without the history / pruner
STEPS = ("reads", "claim", "prune", "design")
FOLD_CHUNK = 100_000  # tallies per fold statement while building (the daemon folds 10,000 at a time)
BUILD_CHUNK = 1_000_000  # jobs per INSERT statement while building
EMPTY_SUFFIX = "_empty"
NOWHERE = "http://127.0.0.1:9"  # the claim and the apply never call the provider; the context needs one
PRODUCER_TENANT = "producer"
MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5")

# -- 0. the history --------------------------------------------------------------------------------------

STATE = """
CREATE SCHEMA IF NOT EXISTS bench_history;
CREATE TABLE IF NOT EXISTS bench_history.state (
    jobs bigint NOT NULL, days integer NOT NULL, tenants integer NOT NULL, live integer NOT NULL,
    t0 timestamptz NOT NULL, span_s float8 NOT NULL, built_at timestamptz NOT NULL DEFAULT now(),
    pruned_jobs bigint NOT NULL DEFAULT 0
)
"""

# Job i of n (1-based) finished at t0 + (i - 1) / n of the span, so seq order is time order, as it is when a
# daemon runs. Everything else about it is a hash of i: the same job whichever statement computes it (the
# jobs' and the ledger's INSERTs each do). $1, $2: i's range, $3: n, $4: t0, $5: span (s), $6: tenants.
ATTRIBUTES = """
WITH g AS (
    SELECT i, (hashint8extended(i, 1) & 1048575) / 1048576.0 AS u_tenant,
           hashint8extended(i, 2) & 1023 AS u_status, hashint8extended(i, 3) & 1023 AS u_kind,
           hashint8extended(i, 4) & 1023 AS u_model, hashint8extended(i, 5) & 1023 AS u_path,
           hashint8extended(i, 6) & 2047 AS u_in, hashint8extended(i, 7) & 511 AS u_out,
           hashint8extended(i, 8) & 4095 AS u_wait,
           $4::timestamptz + make_interval(secs => (i - 1) * $5::float8 / $3::bigint) AS completed_at
      FROM generate_series($1::bigint, $2::bigint) AS i
), a AS (
    SELECT i, md5('job' || i)::uuid AS id, completed_at,
           'tenant-' || lpad(floor($6::integer * u_tenant * u_tenant)::integer::text, 2, '0') AS tenant_id,
           CASE WHEN u_status < 963 THEN 'succeeded' WHEN u_status < 1003 THEN 'failed' ELSE 'canceled' END
               AS status,
           CASE WHEN u_kind < 410 THEN 'summarize' WHEN u_kind < 717 THEN 'classify' END AS job_type,
           CASE WHEN u_model < 717 THEN 'claude-sonnet-4-5' ELSE 'claude-haiku-4-5' END AS model,
           CASE WHEN u_path < 922 THEN 'batch' ELSE 'sync' END AS went,
           200 + u_in AS input_tokens, 20 + u_out AS output_tokens,
           CASE WHEN u_kind < 717 AND u_in & 3 = 0 THEN 1024 ELSE 0 END AS write_5m,
           CASE WHEN u_kind < 717 AND u_in & 3 <> 0 THEN 1024 ELSE 0 END AS cache_read,
           (hashint8extended(i, 9) & 31 = 0)::integer AS attempts, u_wait
      FROM g
), j AS (
    SELECT a.*, CASE WHEN status = 'canceled' THEN NULL ELSE went END AS path,
           CASE WHEN status <> 'canceled' AND went = 'batch'
                THEN md5('batch' || floor(extract(epoch FROM completed_at) / 600))::uuid END AS batch_id,
           CASE WHEN went = 'batch' THEN completed_at - make_interval(secs => 900 + u_wait)
                ELSE completed_at - make_interval(secs => 2 + u_wait % 30) END AS created_at,
           (input_tokens * CASE model WHEN 'claude-sonnet-4-5' THEN 3 ELSE 1 END
            + output_tokens * CASE model WHEN 'claude-sonnet-4-5' THEN 15 ELSE 5 END
            + write_5m * CASE model WHEN 'claude-sonnet-4-5' THEN 3.75 ELSE 1.25 END
            + cache_read * CASE model WHEN 'claude-sonnet-4-5' THEN 0.30 ELSE 0.10 END) * 0.000001 AS sync_usd
      FROM a
)
"""

INSERT_JOBS = (
    ATTRIBUTES
    + """
INSERT INTO batchd.jobs (id, seq, tenant_id, created_at, request, job_type, input, metadata, status,
                         attempts, batch_id, params, result, error, usage, submitted_at, completed_at,
                         updated_at, route, path, path_reason)
SELECT id, i, tenant_id, created_at,
       CASE WHEN job_type IS NULL THEN jsonb_build_object('model', model, 'max_tokens', 256, 'messages',
            jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'Summarize record ' || i))) END,
       job_type,
       CASE WHEN job_type IS NOT NULL THEN jsonb_build_object('text', 'record ' || i) END,
       jsonb_build_object('ref', i),
       status, attempts, batch_id,
       CASE WHEN job_type IS NOT NULL AND path IS NOT NULL THEN jsonb_build_object('model', model,
            'max_tokens', 256, 'messages', jsonb_build_array(jsonb_build_object('role', 'user',
            'content', job_type || ': record ' || i))) END,
       CASE WHEN status = 'succeeded' THEN jsonb_build_object('id', 'msg_' || left(md5(i::text), 24),
            'type', 'message', 'role', 'assistant', 'model', model, 'stop_reason', 'end_turn',
            'content', jsonb_build_array(jsonb_build_object('type', 'text',
                                                            'text', 'Done with record ' || i)),
            'usage', jsonb_build_object('input_tokens', input_tokens, 'output_tokens', output_tokens,
                                        'cache_creation_input_tokens', write_5m,
                                        'cache_read_input_tokens', cache_read)) END,
       CASE WHEN status = 'failed' THEN jsonb_build_object('type', 'invalid_request',
            'message', 'messages.0.content: record ' || i || ' is empty') END,
       CASE WHEN status = 'succeeded' THEN jsonb_build_object('input_tokens', input_tokens,
            'output_tokens', output_tokens, 'cache_creation_input_tokens', write_5m,
            'cache_read_input_tokens', cache_read) END,
       CASE WHEN path = 'batch' THEN created_at + interval '1 minute' END,
       completed_at, completed_at,
       CASE WHEN went = 'batch' THEN 'batch' ELSE 'auto' END,
       path,
       CASE path WHEN 'batch' THEN 'route batch'
                 WHEN 'sync' THEN 'deadline in 20 s < flush 0 s + p90 3600 s' END
  FROM j
"""
)

INSERT_COSTS = (
    ATTRIBUTES
    + """
INSERT INTO batchd.costs (job_id, attempt, tenant_id, model, job_type, batch_id, via, at, input_tokens,
                          output_tokens, cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens,
                          cost_usd, sync_cost_usd)
SELECT id, attempts, tenant_id, model, job_type, batch_id, path, completed_at, input_tokens, output_tokens,
       write_5m, 0, cache_read, CASE WHEN path = 'batch' THEN sync_usd * 0.5 ELSE sync_usd END, sync_usd
  FROM j
 WHERE status = 'succeeded'
"""
)

INSERT_BATCHES = """
INSERT INTO batchd.batches (id, tag, provider_batch_id, status, request_count, bytes, owner, created_at,
                            create_attempted_at, create_attempts, next_attempt_at, submitted_at, ended_at,
                            applied_at, provider_ended_at, request_counts)
SELECT batch_id, left(md5('tag' || batch_id), 12), 'msgbatch_' || left(md5('provider' || batch_id), 24),
       'applied', count(*), count(*) * 600, 'batchd-history', min(created_at), min(created_at), 1,
       min(created_at), min(submitted_at), max(completed_at), max(completed_at), max(completed_at),
       jsonb_build_object('processing', 0, 'succeeded', count(*) FILTER (WHERE status = 'succeeded'),
                          'errored', count(*) FILTER (WHERE status = 'failed'), 'canceled', 0, 'expired', 0)
  FROM batchd.jobs
 WHERE batch_id IS NOT NULL
 GROUP BY batch_id
"""

INSERT_BATCH_TENANTS = """
INSERT INTO batchd.batch_tenants (batch_id, tenant_id, requests)
SELECT batch_id, tenant_id, count(*) FROM batchd.jobs WHERE batch_id IS NOT NULL GROUP BY 1, 2
"""

# The events of the last `events.retention_s` (the rest were pruned), published.
INSERT_EVENTS = """
INSERT INTO batchd.events (created_at, type, tenant_id, job_id, batch_id, data, seq, published_at, tenant_seq)
SELECT completed_at, 'job.' || status, tenant_id, id, batch_id,
       jsonb_build_object('status', status, 'metadata', metadata), row_number() OVER (ORDER BY seq),
       completed_at, row_number() OVER (PARTITION BY tenant_id ORDER BY seq)
  FROM batchd.jobs
 WHERE completed_at >= now() - make_interval(secs => $1) AND status IN ('succeeded', 'failed', 'canceled')
"""
PUBLISHED = """
UPDATE batchd.event_log SET published_seq = (SELECT coalesce(max(seq), 0) FROM batchd.events);
INSERT INTO batchd.tenant_event_log (tenant_id, published_seq)
SELECT tenant_id, max(tenant_seq) FROM batchd.events GROUP BY tenant_id;
"""

TENANTS = """
INSERT INTO batchd.tenants (name, budget_month_usd)
SELECT 'tenant-' || lpad(t::text, 2, '0'), CASE WHEN t < $2 THEN 1000000000 END
  FROM generate_series(0, $1 - 1) AS t
"""

# The work in flight: $1 queued jobs and a batch in progress holding $1 more, spread over the tenants ($2).
LIVE_QUEUED = """
INSERT INTO batchd.jobs (tenant_id, request)
SELECT 'tenant-' || lpad((i % $2)::text, 2, '0'),
       jsonb_build_object('model', 'claude-haiku-4-5', 'max_tokens', 256, 'messages',
                          jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'Queued ' || i)))
  FROM generate_series(1, $1) AS i
"""
LIVE_BATCH = """
INSERT INTO batchd.batches (tag, provider_batch_id, status, request_count, bytes, owner, lease_until,
                            created_at, submitted_at)
VALUES ('inflight0001', 'msgbatch_inflight', 'in_progress', $1, $1 * 600, 'batchd-live',
        now() + interval '1 hour', now() - interval '20 minutes', now() - interval '19 minutes')
RETURNING id
"""
LIVE_SUBMITTED = """
INSERT INTO batchd.jobs (id, seq, tenant_id, request, status, batch_id, submitted_at, path, path_reason)
SELECT gen_random_uuid(), nextval('batchd.jobs_seq_seq'), 'tenant-' || lpad((i % $2)::text, 2, '0'),
       jsonb_build_object('model', 'claude-haiku-4-5', 'max_tokens', 256, 'messages',
                          jsonb_build_array(jsonb_build_object('role', 'user',
                                                               'content', 'In flight ' || i))),
       'submitted', $3, now() - interval '19 minutes', 'batch', 'route batch'
  FROM generate_series(1, $1) AS i
"""
LIVE_SHARES = """
INSERT INTO batchd.batch_tenants (batch_id, tenant_id, requests)
SELECT batch_id, tenant_id, count(*) FROM batchd.jobs WHERE batch_id = $1 GROUP BY 1, 2
"""

BENCH_TABLES = ("jobs", "costs", "rollups", "batches", "batch_tenants", "events", "tallies")


@dataclass
class Shape:
    jobs: int
    days: int
    tenants: int
    live: int


@dataclass
class Built:
    shape: Shape
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows
    bytes: dict[str, int] = field(default_factory=dict)  # table -> pg_total_relation_size
    reused: bool = False


def backfill_statement() -> str:
    """Migration 0012's own statement that tallies a history per hour (the rollups are built from it as an
    upgraded database's are)."""
    text = resources.files("batchd.sql.migrations").joinpath("0012_history.sql").read_text()
    match = re.search(
        r"^INSERT INTO batchd\.tallies \(at,.*?GROUP BY 1, 2, 3, 4, 5, 6;", text, re.DOTALL | re.MULTILINE
    )
    if match is None:
        raise RuntimeError("0012_history.sql no longer holds the tallies' backfill statement")
    return match.group(0)


async def timed_phase(built: Built, phase: str, work: Awaitable[Any]) -> Any:
    started = time.perf_counter()
    result = await work
    built.seconds[phase] = time.perf_counter() - started
    print(f"  {phase}: {built.seconds[phase]:.1f} s", flush=True)
    return result


async def build_session(url: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(url)
    await connection.execute(
        "SET session_replication_role = replica; SET work_mem = '256MB';"
        " SET maintenance_work_mem = '1GB'; SET synchronous_commit = off"
    )
    return connection


async def insert_in_chunks(url: str, statement: str, shape: Shape, t0: datetime, workers: int) -> None:
    """`statement` (ATTRIBUTES + an INSERT) for every job, BUILD_CHUNK at a time, on `workers` connections."""
    ranges = [(lo, min(lo + BUILD_CHUNK - 1, shape.jobs)) for lo in range(1, shape.jobs + 1, BUILD_CHUNK)]
    span_s = shape.days * 86_400.0
    queue = list(reversed(ranges))
    done = 0

    async def worker() -> None:
        nonlocal done
        connection = await build_session(url)
        try:
            while queue:
                lo, hi = queue.pop()
                await connection.execute(statement, lo, hi, shape.jobs, t0, span_s, shape.tenants)
                done += hi - lo + 1
                print(f"    {done:,} of {shape.jobs:,}", flush=True)
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(workers)))


async def jobs_index_statements(connection: asyncpg.Connection) -> tuple[list[str], list[str]]:
    """The statements that drop batchd.jobs' indexes (its primary key too) and those that make them again."""
    rows = await connection.fetch(
        "SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition,"
        "       c.conname, pg_get_constraintdef(c.oid) AS constraint_definition"
        "  FROM pg_index AS i LEFT JOIN pg_constraint AS c ON c.conindid = i.indexrelid AND c.contype = 'p'"
        " WHERE i.indrelid = 'batchd.jobs'::regclass"
    )
    drop, create = [], []
    for row in rows:
        if row["conname"] is not None:
            drop.append(f"ALTER TABLE batchd.jobs DROP CONSTRAINT {row['conname']}")
            create.append(
                f"ALTER TABLE batchd.jobs ADD CONSTRAINT {row['conname']} {row['constraint_definition']}"
            )
        else:
            drop.append(f"DROP INDEX {row['name']}")
            create.append(row["definition"])
    return drop, create


async def build(url: str, shape: Shape, workers: int, events_retention_s: float) -> Built:
    built = Built(shape)
    t0 = datetime.now(UTC) - timedelta(days=shape.days)
    connection = await build_session(url)
    try:
        await connection.execute(STATE)
        await connection.execute(TENANTS, shape.tenants, min(10, shape.tenants))
        drop, create = await jobs_index_statements(connection)
        for statement in drop:
            await connection.execute(statement)
        if shape.jobs:
            await timed_phase(built, "jobs", insert_in_chunks(url, INSERT_JOBS, shape, t0, workers))
            await timed_phase(built, "costs", insert_in_chunks(url, INSERT_COSTS, shape, t0, workers))
        await timed_phase(built, "jobs' indexes", _run_all(connection, create))
        await connection.execute("SELECT setval('batchd.jobs_seq_seq', $1::bigint)", max(1, shape.jobs))
        await timed_phase(
            built,
            "batches, shares",
            _run_all(connection, [INSERT_BATCHES, INSERT_BATCH_TENANTS]),
        )
        await timed_phase(built, "events (last week)", connection.execute(INSERT_EVENTS, events_retention_s))
        await connection.execute(PUBLISHED)
        await timed_phase(built, "tallies (0012's backfill)", connection.execute(backfill_statement()))
        await timed_phase(built, "fold", rollups.fold(connection, FOLD_CHUNK))
        await connection.execute("SET session_replication_role = DEFAULT")
        await add_live_work(connection, shape)
        await connection.execute(
            "INSERT INTO bench_history.state (jobs, days, tenants, live, t0, span_s)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            shape.jobs,
            shape.days,
            shape.tenants,
            shape.live,
            t0,
            shape.days * 86_400.0,
        )
        await timed_phase(
            built,
            "VACUUM ANALYZE",
            connection.execute("VACUUM ANALYZE " + ", ".join(f"batchd.{table}" for table in BENCH_TABLES)),
        )
        await connection.execute("CHECKPOINT")
    finally:
        await connection.close()
    return built


async def _run_all(connection: asyncpg.Connection, statements: Sequence[str]) -> None:
    for statement in statements:
        await connection.execute(statement)


async def add_live_work(connection: asyncpg.Connection, shape: Shape) -> None:
    await connection.execute(LIVE_QUEUED, shape.live, shape.tenants)
    async with connection.transaction():
        await connection.execute("SET LOCAL session_replication_role = replica")
        batch_id = await connection.fetchval(LIVE_BATCH, shape.live)
        await connection.execute(LIVE_SUBMITTED, shape.live, shape.tenants, batch_id)
        await connection.execute(LIVE_SHARES, batch_id)


async def measure(url: str, built: Built) -> None:
    connection = await asyncpg.connect(url)
    try:
        for table in BENCH_TABLES:
            built.rows[table] = await connection.fetchval(f"SELECT count(*) FROM batchd.{table}")  # noqa: S608
            built.bytes[table] = await connection.fetchval(
                "SELECT pg_total_relation_size($1::regclass)", f"batchd.{table}"
            )
    finally:
        await connection.close()


async def database_exists(server_url: str, name: str) -> bool:
    connection = await asyncpg.connect(server_url)
    try:
        return bool(await connection.fetchval("SELECT true FROM pg_database WHERE datname = $1", name))
    finally:
        await connection.close()


async def built_shape(url: str) -> tuple[Shape, int] | None:
    """The shape a database was built with, and how many of its jobs were pruned; None if not built."""
    connection = await asyncpg.connect(url)
    try:
        if not await connection.fetchval("SELECT to_regclass('bench_history.state') IS NOT NULL"):
            return None
        row = await connection.fetchrow("SELECT * FROM bench_history.state")
    finally:
        await connection.close()
    if row is None:
        return None
    return Shape(row["jobs"], row["days"], row["tenants"], row["live"]), row["pruned_jobs"]


async def prepare_database(args: argparse.Namespace, name: str, shape: Shape, *, reuse: bool) -> Built:
    """The database `name` with the history `shape`: the one there if `reuse` and it has that shape, else
    made afresh (migrated, autovacuum off on its tables, built)."""
    url = database_url(args.url, name)
    if reuse and await database_exists(args.url, name):
        found = await built_shape(url)
        if found is not None and found[0] == shape:
            print(f"reusing {name} (built with {shape.jobs:,} jobs; {found[1]:,} pruned since)", flush=True)
            built = Built(shape, reused=True)
            await measure(url, built)
            return built
        print(f"{name} holds another history ({found}): building it again", flush=True)
    await admin_execute(args.url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin_execute(args.url, f'CREATE DATABASE "{name}"')
    connection = await asyncpg.connect(url)
    try:
        await init_connection(connection)
        await migrate.migrate(connection)
        for table in BENCH_TABLES:
            await connection.execute(f"ALTER TABLE batchd.{table} SET (autovacuum_enabled = false)")
    finally:
        await connection.close()
    print(f"building {name}: {shape.jobs:,} jobs over {shape.days} days, {shape.tenants} tenants", flush=True)
    built = await build(url, shape, args.workers, Settings().events.retention_s)
    await measure(url, built)
    return built


def build_rows(built: Built) -> list[Row]:
    millions = built.shape.jobs / 1e6
    total = sum(built.bytes.values())
    rows = [
        Row(
            f"batchd.{table}: rows, disk{' per million jobs' if millions else ''}",
            f"{built.rows[table]:,} rows, {built.bytes[table] / MIB:,.0f} MiB",
            "",
            f"{built.bytes[table] / MIB / millions:,.1f} MiB per million jobs" if millions else "",
            "",
            None,
        )
        for table in BENCH_TABLES
    ]
    if millions:
        rows.append(
            Row(
                "the whole history on disk",
                f"{total / MIB:,.0f} MiB",
                "",
                f"{total / MIB / millions:,.1f} MiB per million jobs",
                "",
                None,
            )
        )
    if built.seconds:
        rows.append(
            Row(
                "build time (set-based SQL, triggers off, indexes after)",
                f"{sum(built.seconds.values()):,.0f} s",
                ", ".join(f"{phase} {s:.0f} s" for phase, s in built.seconds.items()),
                "",
                "",
                None,
            )
        )
    return rows


# -- 1. reads ----------------------------------------------------------------------------------------------


@dataclass
class Read:
    measure: str
    run: Callable[[asyncpg.Pool], Awaitable[Any]]
    queries: list[tuple[str, tuple[Any, ...]]]  # what EXPLAIN shows when it is slow


def overview(tenant: str | None) -> Callable[[asyncpg.Pool], Awaitable[Any]]:
    """GET /v1/overview as the daemon answers it: one reading of every tenant (readings.py, a new Readings so
    nothing is kept from the last run), and the asker's view of it."""

    async def run(pool: asyncpg.Pool) -> Any:
        readings = Readings(CollectorRegistry())
        read = await readings.overview(pool)
        if read is None:
            raise RuntimeError("the overview's reading failed")
        return read.view(tenant)

    return run


async def metrics_readings(pool: asyncpg.Pool) -> Any:
    readings = Readings(CollectorRegistry())  # a new one: nothing kept from the last run
    await readings.refresh(pool)
    if readings.snapshot is None or readings.ledger is None:
        raise RuntimeError("the /metrics readings failed")
    return readings.ledger


async def status_report(pool: asyncpg.Pool) -> Any:
    async with pool.acquire() as connection:
        return await status.collect(connection)


async def cost_report(pool: asyncpg.Pool) -> Any:
    async with pool.acquire() as connection:
        return await report.collect(connection, report.parse_since("30d"), None)


def reads(biggest: str) -> list[Read]:
    since = report.parse_since("30d")
    return [
        Read(
            "GET /v1/overview, admin",
            overview(None),
            [(name, ()) for name in OVERVIEW_QUERIES],
        ),
        Read(
            f"GET /v1/overview, tenant {biggest} (the largest)",
            overview(biggest),
            [(name, ()) for name in OVERVIEW_QUERIES],
        ),
        Read(
            "GET /metrics readings",
            metrics_readings,
            [("metrics_snapshot", ()), ("billed_totals", (None, None))],
        ),
        Read(
            "batchd status",
            status_report,
            [
                ("status_by_tenant", ()),
                ("tenant_budgets", ()),
                ("batches_by_status", (datetime.now(UTC) - timedelta(hours=1),)),
                ("open_batches", ()),
                ("recent_outcomes", (3600.0,)),
            ],
        ),
        Read(
            "batchd report --since 30d",
            cost_report,
            [("billed_totals", (since.replace(minute=0, second=0, microsecond=0), None))],
        ),
    ]


OVERVIEW_QUERIES = (
    "overview_heads",
    "overview_queued",
    "overview_batches",
    "overview_totals",
    "overview_unpublished",
)


async def explain(pool: asyncpg.Pool, name: str, arguments: tuple[Any, ...]) -> str:
    async with pool.acquire() as connection:
        rows = await connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql(name)}", *arguments)
    return f"EXPLAIN (ANALYZE, BUFFERS) {name}:\n" + "\n".join(row[0] for row in rows)


async def reads_step(url: str, runs: int) -> list[Row]:
    pool = await create_pool(url, min_size=1, max_size=2)
    try:
        biggest = await pool.fetchval(
            "SELECT tenant_id FROM batchd.rollups WHERE span = 'all'"
            " GROUP BY 1 ORDER BY sum(jobs) DESC LIMIT 1"
        )
        rows = []
        for read in reads(biggest or "tenant-00"):
            await read.run(pool)  # warm: the first run reads from disk, and plans
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                await read.run(pool)
                times.append((time.perf_counter() - started) * 1000)
            median = statistics.median(times)
            ok = median < READ_TARGET_MS
            print(f"  {read.measure}: median {median:.1f} ms, best {min(times):.1f} ms", flush=True)
            if not ok:
                for name, arguments in read.queries:
                    print(await explain(pool, name, arguments), flush=True)
            rows.append(
                Row(
                    read.measure,
                    f"{median:.1f} ms (best {min(times):.1f}, worst {max(times):.1f})",
                    "",
                    f"median of {runs}",
                    f"< {READ_TARGET_MS:.0f} ms",
                    ok,
                )
            )
        return rows
    finally:
        await pool.close()


# -- 2. claim and apply ------------------------------------------------------------------------------------

INSERT_QUEUED = """
INSERT INTO batchd.jobs (tenant_id, request)
SELECT 'tenant-' || lpad((i % $2)::text, 2, '0'),
       jsonb_build_object('model', 'claude-haiku-4-5', 'max_tokens', 256,
                          'metadata', jsonb_build_object('user_id', 'u' || i),
                          'messages', jsonb_build_array(jsonb_build_object(
                              'role', 'user', 'content', repeat('word ', 100) || i)))
  FROM generate_series(1, $1) AS i
"""


def result_text(job_id: UUID, model: str) -> str:
    return json.dumps(
        {
            "id": f"msg_{job_id.hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": f"Done with {job_id}"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 523, "output_tokens": 87, "cache_read_input_tokens": 0},
        },
        separators=(",", ":"),
    )


@dataclass
class Database:
    """One side of the comparison: a database, its pool, and a daemon's context on it."""

    label: str
    url: str
    pool: asyncpg.Pool
    ctx: Context
    claim_rates: list[float] = field(default_factory=list)
    apply_rates: list[float] = field(default_factory=list)


@contextlib.asynccontextmanager
async def daemon_side(label: str, url: str, batch: int) -> AsyncIterator[Database]:
    pool = await create_pool(url, min_size=2, max_size=IN_FLIGHT_CHUNKS + 2)
    provider = Provider(API_KEY, base_url=NOWHERE, limiter=RateLimiter(6000), timeout_s=600)
    try:
        ctx = Context(pool=pool, settings=bench_settings(url, NOWHERE, batch), provider=provider)
        async with pool.acquire() as connection:
            await publish_prices(connection, ctx.settings.pricing)  # as the daemon does when it starts
            await connection.execute(sql("set_wakeup"), False, STEADY_WAKE_SEQ)  # noqa: FBT003 - a daemon busy
        yield Database(label, url, pool, ctx)
    finally:
        await provider.close()
        await pool.close()


async def claim_and_apply(side: Database, batch: int, tenants: int) -> tuple[float, float]:
    """One round: `batch` jobs queued, claimed (Flusher.flush_one), sent (as far as the database knows), their
    batch ended, their results applied as results.py applies them; returns (claim s, apply s)."""
    pool, ctx = side.pool, side.ctx
    await pool.execute(INSERT_QUEUED, batch, tenants)
    await pool.execute("VACUUM (ANALYZE) batchd.jobs")
    flusher = Flusher(ctx, on_batch=lambda _batch_id, _body: None)
    started = time.perf_counter()
    flushed = await flusher.flush_one()
    claim_s = time.perf_counter() - started
    if flushed.batch_id is None:
        raise RuntimeError(f"{side.label}: the flusher made no batch: {flushed}")
    batch_id, owner = flushed.batch_id, ctx.instance_id
    await pool.execute(sql("batch_submitted"), batch_id, f"msgbatch_{uuid.uuid4().hex}", False, owner)  # noqa: FBT003
    await pool.execute(sql("batch_ended"), batch_id, {"succeeded": batch}, datetime.now(UTC), owner)
    job_ids = [
        row["id"] for row in await pool.fetch("SELECT id FROM batchd.jobs WHERE batch_id = $1", batch_id)
    ]
    if len(job_ids) != batch:
        raise RuntimeError(f"{side.label}: the batch holds {len(job_ids)} jobs, not {batch}")
    chunk_size = ctx.settings.results.apply_chunk
    results = [(job_id, "succeeded", result_text(job_id, MODELS[1]), None) for job_id in job_ids]
    slots = asyncio.Semaphore(IN_FLIGHT_CHUNKS)

    async def apply_chunk(chunk: list[tuple[UUID, str, str, None]]) -> int:
        async with slots:
            return await apply_rows(ctx, chunk, RESULT_COLUMNS, batch_id=batch_id, owner=owner)

    started = time.perf_counter()
    changed = await asyncio.gather(
        *(apply_chunk(results[i : i + chunk_size]) for i in range(0, len(results), chunk_size))
    )
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute(sql("finish_batch"), batch_id, owner)
    apply_s = time.perf_counter() - started
    if sum(changed) != batch:
        raise RuntimeError(f"{side.label}: the apply changed {sum(changed)} jobs, not {batch}")
    async with pool.acquire() as connection:
        # What the daemon does next, within milliseconds: the tallies folded, the events numbered (left
        # unpublished, they would be counted by every overview: overview_unpublished reads the lag).
        await rollups.fold(connection, ctx.settings.rollups.fold_chunk)
        await publish(connection, ctx.settings.events.publish_chunk)
    return claim_s, apply_s


async def claim_step(history_url: str, empty_url: str, batch: int, rounds: int, tenants: int) -> list[Row]:
    async with (
        daemon_side("history", history_url, batch) as history,
        daemon_side("no history", empty_url, batch) as empty,
    ):
        for round_ in range(rounds):
            for side in (history, empty) if round_ % 2 == 0 else (empty, history):
                claim_s, apply_s = await claim_and_apply(side, batch, tenants)
                side.claim_rates.append(per_s(batch, claim_s))
                side.apply_rates.append(per_s(batch, apply_s))
                print(
                    f"  round {round_ + 1}, {side.label}: claim {claim_s:.2f} s"
                    f" ({side.claim_rates[-1]:,.0f} jobs/s), apply {apply_s:.2f} s"
                    f" ({side.apply_rates[-1]:,.0f} jobs/s)",
                    flush=True,
                )
    return [
        rate_row(
            f"claim {batch:,} jobs (Flusher.flush_one)", history.claim_rates, empty.claim_rates, "jobs/s"
        ),
        rate_row(
            f"apply {batch:,} results (apply_rows, {IN_FLIGHT_CHUNKS} chunks at once)",
            history.apply_rates,
            empty.apply_rates,
            "jobs/s",
        ),
    ]


def rate_row(
    measure: str, ours: list[float], theirs: list[float], unit: str, baseline: str = "no history"
) -> Row:
    mine, base = statistics.median(ours), statistics.median(theirs)
    change = mine / base - 1 if base else 0.0
    return Row(
        measure,
        f"{mine:,.0f} {unit} ({min(ours):,.0f}-{max(ours):,.0f})",
        f"{baseline}: {base:,.0f} {unit} ({min(theirs):,.0f}-{max(theirs):,.0f})",
        f"{change:+.1%}",
        f"within {MAX_SLOWDOWN:.0%}",
        change >= -MAX_SLOWDOWN,
    )


# -- 3. pruning beside producers ---------------------------------------------------------------------------

PRODUCER_INSERT = "INSERT INTO batchd.jobs (tenant_id, request) VALUES ($1, $2::jsonb)"


class CountingExecutor:
    """The pool as prune_history uses it, counting the rows each committed statement deleted, so that a
    prune cut short (its task canceled at a slice's end) still says what it did."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.deleted: Counter[str] = Counter()

    async def execute(self, query: str, *args: object) -> str:
        status_line: str = await self.pool.execute(query, *args)
        match = re.search(r"DELETE FROM (\S+)", query)
        table = match.group(1) if match else "?"
        self.deleted[table] += int(status_line.rsplit(maxsplit=1)[-1])
        return status_line


@dataclass
class PruneRun:
    busy_share: float
    chunk: int
    due: int
    producers: int
    pruned: int = 0  # of the due jobs
    slices: list[tuple[bool, float, int]] = field(default_factory=list)  # (pruning, seconds, rows inserted)
    pruning_s: float = 0.0
    deleted: Counter[str] = field(default_factory=Counter)
    vacuum_s: float = 0.0
    vacuum_analyze_s: float = 0.0
    jobs_bytes_before: int = 0
    jobs_bytes_after: int = 0
    cleanup_s: float = 0.0

    def rates(self, *, pruning: bool) -> list[float]:
        return [per_s(rows, seconds) for p, seconds, rows in self.slices if p == pruning]


class Producers:
    """Connections that insert one job per commit, each in a loop (opened once, before any slice)."""

    def __init__(self, connections: list[asyncpg.Connection]) -> None:
        self.connections = connections
        self.request = json.dumps(
            {"model": MODELS[1], "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
        )

    async def run(self, window_s: float, stop: asyncio.Event) -> int:
        """Inserts for `window_s` (or until `stop`); returns how many rows went in."""
        count = 0
        deadline = time.monotonic() + window_s

        async def produce(connection: asyncpg.Connection) -> None:
            nonlocal count
            while time.monotonic() < deadline and not stop.is_set():
                await connection.execute(PRODUCER_INSERT, PRODUCER_TENANT, self.request)
                count += 1

        await asyncio.gather(*(produce(connection) for connection in self.connections))
        return count


async def due_retention(connection: asyncpg.Connection, prune_jobs: int) -> tuple[float, datetime, int, int]:
    """A retention (s) that makes the next `prune_jobs` finished jobs due, the moment it is due from now, how
    many are due with it, and how many were pruned by earlier runs."""
    state = await connection.fetchrow("SELECT * FROM bench_history.state")
    assert state is not None
    target = state["pruned_jobs"] + prune_jobs
    cutoff = state["t0"] + timedelta(seconds=state["span_s"] * target / state["jobs"])
    keep_s = (datetime.now(UTC) - cutoff).total_seconds() - 60  # a minute for the run to start
    due_before: datetime = await connection.fetchval("SELECT now() - make_interval(secs => $1)", keep_s)
    return keep_s, due_before, await count_due(connection, due_before), state["pruned_jobs"]


async def count_due(connection: asyncpg.Connection, due_before: datetime) -> int:
    due: int = await connection.fetchval(
        "SELECT count(*) FROM batchd.jobs WHERE status IN ('succeeded', 'failed', 'canceled')"
        " AND completed_at < $1",
        due_before,
    )
    return due


async def prune_step(url: str, args: argparse.Namespace, busy_share: float, chunk: int) -> PruneRun:
    connection = await asyncpg.connect(url)
    pool = await create_pool(url, min_size=1, max_size=2)
    producers = Producers([await asyncpg.connect(url) for _ in range(args.producers)])
    try:
        await connection.execute(sql("set_wakeup"), False, STEADY_WAKE_SEQ)  # noqa: FBT003 - a daemon busy
        await connection.execute("VACUUM (ANALYZE) batchd.jobs")
        await connection.execute("CHECKPOINT")
        keep_s, due_before, due, pruned_before = await due_retention(connection, args.prune_jobs)
        retention = RetentionSettings(
            succeeded_s=keep_s, failed_s=keep_s, canceled_s=keep_s, chunk=chunk, busy_share=busy_share
        )
        run = PruneRun(busy_share, chunk, due, producers=args.producers)
        run.jobs_bytes_before = await connection.fetchval("SELECT pg_total_relation_size('batchd.jobs')")
        print(
            f"  {due:,} finished jobs due (retention {keep_s / 86_400:.1f} days), busy_share {busy_share},"
            f" chunk {chunk}; slices of {args.window:g} s, with and without the pruner",
            flush=True,
        )
        await alternate(
            run,
            producers,
            CountingExecutor(pool),
            retention,
            window_s=args.window,
            max_slices=args.max_slices,
        )
        # Counted in the table: a DELETE whose task was canceled just as it committed is not in run.deleted.
        run.pruned = due - await count_due(connection, due_before)
        await connection.execute(
            "UPDATE bench_history.state SET pruned_jobs = $1", pruned_before + run.pruned
        )
        await after_prune(connection, run)
        return run
    finally:
        for producer in producers.connections:
            await producer.close()
        await pool.close()
        await connection.close()


def stop_when_done(stop: asyncio.Event, _task: asyncio.Task[dict[str, int]]) -> None:
    stop.set()


async def alternate(
    run: PruneRun,
    producers: Producers,
    executor: CountingExecutor,
    retention: RetentionSettings,
    *,
    window_s: float,
    max_slices: int,
) -> None:
    """Slices of `window_s` of the producers, without the pruner and with it in turns, until it is done:
    its task is canceled at the end of each slice with it, and started again in the next."""
    done = False
    index = 0
    while not done and index < max_slices:
        with_pruner = index % 2 == 1
        index += 1
        stop = asyncio.Event()
        pruning: asyncio.Task[dict[str, int]] | None = None
        if with_pruner:
            pruning = asyncio.create_task(prune_history(cast("asyncpg.Pool", executor), retention))
            pruning.add_done_callback(functools.partial(stop_when_done, stop))
        started = time.perf_counter()
        inserted = await producers.run(window_s, stop)
        seconds = time.perf_counter() - started
        if pruning is not None:
            if pruning.done():
                pruning.result()  # its errors, if any
                done = True
            else:
                pruning.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pruning
            run.pruning_s += seconds
        # The last slice with the pruner is cut short by its end: it counts for the throughput, not for the
        # producers' rates (measured over whole windows only).
        if seconds >= window_s * 0.95:
            run.slices.append((with_pruner, seconds, inserted))
        what = "pruning" if with_pruner else "no pruner"
        print(
            f"    slice {index}: {what}, {per_s(inserted, seconds):,.0f} rows/s inserted;"
            f" pruned so far {dict(executor.deleted)}",
            flush=True,
        )
    run.deleted = executor.deleted


async def after_prune(connection: asyncpg.Connection, run: PruneRun) -> None:
    """VACUUM of the jobs timed (autovacuum is off), then the producers' jobs removed, so that the history
    is as built for the next run (--reuse)."""
    started = time.perf_counter()
    await connection.execute("VACUUM batchd.jobs")
    run.vacuum_s = time.perf_counter() - started
    started = time.perf_counter()
    await connection.execute("VACUUM (ANALYZE) batchd.jobs")
    run.vacuum_analyze_s = time.perf_counter() - started
    run.jobs_bytes_after = await connection.fetchval("SELECT pg_total_relation_size('batchd.jobs')")
    print(
        f"  VACUUM batchd.jobs: {run.vacuum_s:.1f} s; again with ANALYZE {run.vacuum_analyze_s:.1f} s",
        flush=True,
    )
    started = time.perf_counter()
    await connection.execute(
        "DELETE FROM batchd.jobs WHERE tenant_id = $1 AND status = 'queued'", PRODUCER_TENANT
    )
    await connection.execute("VACUUM (ANALYZE) batchd.jobs")
    run.cleanup_s = time.perf_counter() - started


def prune_rows(run: PruneRun) -> list[Row]:
    label = f"busy_share {run.busy_share}, chunk {run.chunk:,}"
    rows = []
    if run.rates(pruning=True) and run.rates(pruning=False):
        rows.append(
            rate_row(
                f"{run.producers} producers, 1 row a commit, while pruning ({label})",
                run.rates(pruning=True),
                run.rates(pruning=False),
                "rows/s",
                baseline="no pruner",
            )
        )
    jobs = run.pruned
    rows.append(
        Row(
            f"prune_history throughput ({label})",
            f"{per_s(jobs, run.pruning_s):,.0f} jobs/s",
            f"{jobs:,} of {run.due:,} due jobs in {run.pruning_s:.0f} s of slices with the pruner",
            ", ".join(f"{table.split('.')[-1]} {n:,}" for table, n in sorted(run.deleted.items())),
            f"all {run.due:,} pruned",
            jobs >= run.due,
        )
    )
    rows.append(
        Row(
            "VACUUM batchd.jobs after the prune",
            f"{run.vacuum_s:.1f} s",
            f"then VACUUM (ANALYZE): {run.vacuum_analyze_s:.1f} s",
            f"jobs {run.jobs_bytes_before / MIB:,.0f} -> {run.jobs_bytes_after / MIB:,.0f} MiB",
            "",
            None,
        )
    )
    return rows


# -- 4. delete vs time partitions --------------------------------------------------------------------------

DESIGN_COLUMNS = """(
    id uuid NOT NULL, tenant_id text NOT NULL, status text NOT NULL, completed_at timestamptz NOT NULL,
    idempotency_key text, request jsonb, result jsonb
)"""
DESIGN_FILL = """
INSERT INTO {table}
SELECT md5('design' || i)::uuid, 'tenant-' || lpad((i % 50)::text, 2, '0'), 'succeeded',
       $3::timestamptz + make_interval(secs => (i - 1) * $2::float8 / $1::bigint),
       CASE WHEN i % 2 = 0 THEN 'key-' || i END,
       jsonb_build_object('model', 'claude-haiku-4-5', 'max_tokens', 256, 'messages',
                          jsonb_build_array(jsonb_build_object('role', 'user',
                                                               'content', 'Summarize record ' || i))),
       jsonb_build_object('id', 'msg_' || left(md5(i::text), 24), 'type', 'message', 'content',
                          jsonb_build_array(jsonb_build_object('type', 'text',
                                                               'text', 'Done with record ' || i)))
  FROM generate_series(1, $1) AS i
"""
# prune_jobs' statement, on the plain table.
DESIGN_DELETE = """
DELETE FROM bench_design.plain
 WHERE id IN (SELECT id FROM bench_design.plain
               WHERE status = 'succeeded' AND completed_at < $1
               ORDER BY completed_at LIMIT $2 FOR UPDATE SKIP LOCKED)
"""


@dataclass
class Design:
    rows: int
    days: int
    day_rows: int = 0
    delete_s: float = 0.0
    detach_ms: float = 0.0
    drop_ms: float = 0.0
    plain_lookup_us: list[float] = field(default_factory=list)
    parted_lookup_us: list[float] = field(default_factory=list)
    parted_plan: str = ""
    unique_error: str = ""


async def design_step(
    server_url: str, *, rows: int, days: int, lookups: int, rounds: int, chunk: int
) -> Design:
    result = Design(rows, days)
    day0 = datetime(2026, 1, 1, tzinfo=UTC)
    async with scratch_database(server_url, "batchd_bench_design", prepare=None) as url:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute("SET maintenance_work_mem = '1GB'; SET synchronous_commit = off")
            result.unique_error = await design_tables(connection, days, day0)
            for table in ("bench_design.plain", "bench_design.parted"):
                started = time.perf_counter()
                await connection.execute(DESIGN_FILL.format(table=table), rows, days * 86_400.0, day0)
                print(f"  {table}: {rows:,} rows in {time.perf_counter() - started:.1f} s", flush=True)
                await connection.execute(f"VACUUM ANALYZE {table}")
            await connection.execute("CHECKPOINT")
            await design_lookups(connection, result, lookups, rounds)
            await design_day_gone(connection, result, day0 + timedelta(days=1), chunk)
        finally:
            await connection.close()
    return result


async def design_tables(connection: asyncpg.Connection, days: int, day0: datetime) -> str:
    """The plain table and the partitioned one (a partition per day from `day0`); returns what PostgreSQL
    says of a UNIQUE (tenant_id, idempotency_key) on the partitioned one."""
    await connection.execute(f"CREATE SCHEMA bench_design; CREATE TABLE bench_design.plain {DESIGN_COLUMNS}")
    await connection.execute(
        "ALTER TABLE bench_design.plain ADD PRIMARY KEY (id);"
        "CREATE INDEX ON bench_design.plain (status, completed_at);"
        "CREATE UNIQUE INDEX ON bench_design.plain (tenant_id, idempotency_key)"
        " WHERE idempotency_key IS NOT NULL"
    )
    await connection.execute(
        f"CREATE TABLE bench_design.parted {DESIGN_COLUMNS} PARTITION BY RANGE (completed_at)"
    )
    for day in range(days):
        start, end = day0 + timedelta(days=day), day0 + timedelta(days=day + 1)
        await connection.execute(
            f"CREATE TABLE bench_design.parted_{day:02} PARTITION OF bench_design.parted"
            f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
        )
    # The primary key must hold the partition key: (id, completed_at).
    await connection.execute(
        "ALTER TABLE bench_design.parted ADD PRIMARY KEY (id, completed_at);"
        "CREATE INDEX ON bench_design.parted (status, completed_at)"
    )
    try:
        await connection.execute(
            "CREATE UNIQUE INDEX ON bench_design.parted (tenant_id, idempotency_key)"
            " WHERE idempotency_key IS NOT NULL"
        )
    except asyncpg.PostgresError as error:
        return f"{error.sqlstate}: {error}".replace("\n", " ")
    return "(accepted)"


async def design_lookups(connection: asyncpg.Connection, result: Design, lookups: int, rounds: int) -> None:
    """`lookups` jobs by id on each table, in turns, `rounds` times (microseconds per lookup)."""
    ids = [
        row["id"]
        for row in await connection.fetch(
            "SELECT md5('design' || i)::uuid AS id FROM unnest($1::bigint[]) AS i",
            random.Random(13).sample(range(1, result.rows + 1), min(lookups, result.rows)),
        )
    ]
    plain = await connection.prepare("SELECT * FROM bench_design.plain WHERE id = $1")
    parted = await connection.prepare("SELECT * FROM bench_design.parted WHERE id = $1")
    for statement in (plain, parted):  # warm
        for job_id in ids:
            await statement.fetchrow(job_id)
    for _ in range(rounds):
        for statement, times in ((plain, result.plain_lookup_us), (parted, result.parted_lookup_us)):
            started = time.perf_counter()
            found = [await statement.fetchrow(job_id) for job_id in ids]
            times.append((time.perf_counter() - started) * 1e6 / len(ids))
            if None in found:
                raise RuntimeError("a lookup by id found nothing")
    plan = await connection.fetch(
        "EXPLAIN (ANALYZE, COSTS OFF) SELECT * FROM bench_design.parted WHERE id = $1", ids[0]
    )
    result.parted_plan = "\n".join(row[0] for row in plan)


async def design_day_gone(
    connection: asyncpg.Connection, result: Design, day_end: datetime, chunk: int
) -> None:
    """The first day removed from each table: chunked DELETEs from the plain one, DETACH + DROP of the
    partition."""
    result.day_rows = await connection.fetchval(
        "SELECT count(*) FROM bench_design.plain WHERE completed_at < $1", day_end
    )
    started = time.perf_counter()
    while int((await connection.execute(DESIGN_DELETE, day_end, chunk)).split()[-1]) == chunk:
        pass
    result.delete_s = time.perf_counter() - started
    started = time.perf_counter()
    await connection.execute("ALTER TABLE bench_design.parted DETACH PARTITION bench_design.parted_00")
    result.detach_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    await connection.execute("DROP TABLE bench_design.parted_00")
    result.drop_ms = (time.perf_counter() - started) * 1000


def design_rows(design: Design) -> list[Row]:
    plain, parted = statistics.median(design.plain_lookup_us), statistics.median(design.parted_lookup_us)
    return [
        Row(
            f"one day's {design.day_rows:,} rows of {design.rows:,}: chunked DELETE (prune_jobs' shape)",
            f"{per_s(design.day_rows, design.delete_s):,.0f} rows/s ({design.delete_s * 1000:,.0f} ms)",
            f"DETACH PARTITION {design.detach_ms:.1f} ms + DROP TABLE {design.drop_ms:.1f} ms",
            f"{design.delete_s * 1000 / max(design.detach_ms + design.drop_ms, 1e-3):,.0f}x the partition's",
            "",
            None,
        ),
        Row(
            "a job by id (primary key), round trip",
            f"plain table: {plain:,.0f} us",
            f"{design.days} day partitions: {parted:,.0f} us",
            f"{parted / plain:.2f}x",
            "",
            None,
        ),
        Row(
            "UNIQUE (tenant_id, idempotency_key) on the partitioned table",
            "plain table: enforced",
            design.unique_error,
            "",
            "",
            None,
        ),
    ]


# -- the run -----------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    batchd_log.configure("warning")
    started = time.perf_counter()
    print(f"machine: {machine()}", flush=True)
    steps = set(args.steps.split(","))
    rows: list[Row] = []
    failures: list[str] = []
    name = args.database
    url = database_url(args.url, name)
    empty_name = name + EMPTY_SUFFIX
    shape = Shape(args.jobs, args.days, args.tenants, args.live)
    try:
        if steps & {"reads", "claim", "prune"}:
            print(f"\n== 0. the history: {name}", flush=True)
            built = await prepare_database(args, name, shape, reuse=args.reuse)
            print(await describe_server(url), flush=True)
            rows += build_rows(built)
        if "reads" in steps:
            print(f"\n== 1. reads, median of {args.runs}", flush=True)
            rows += await reads_step(url, args.runs)
        if "claim" in steps:
            print(f"\n== 2. claim and apply {args.claim_jobs:,} jobs: the history against none", flush=True)
            await prepare_database(
                args, empty_name, Shape(0, args.days, args.tenants, args.live), reuse=False
            )
            try:
                rows += await claim_step(
                    url, database_url(args.url, empty_name), args.claim_jobs, args.claim_rounds, args.tenants
                )
            finally:
                await admin_execute(args.url, f'DROP DATABASE IF EXISTS "{empty_name}" WITH (FORCE)')
        if "prune" in steps:
            defaults = RetentionSettings()
            for setting in args.prune_settings or [f"{defaults.busy_share}:{defaults.chunk}"]:
                share, chunk = setting.split(":")
                print(f"\n== 3. prune {args.prune_jobs:,} jobs beside {args.producers} producers", flush=True)
                run = await prune_step(url, args, float(share), int(chunk))
                rows += prune_rows(run)
        if "design" in steps:
            print(
                f"\n== 4. delete vs time partitions: {args.design_rows:,} rows, {args.design_days} days",
                flush=True,
            )
            design = await design_step(
                args.url,
                rows=args.design_rows,
                days=args.design_days,
                lookups=args.lookups,
                rounds=args.runs,
                chunk=RetentionSettings().chunk,
            )
            print(f"  a lookup by id on the partitioned table:\n{design.parted_plan}", flush=True)
            rows += design_rows(design)
    finally:
        if not args.keep and steps & {"reads", "claim", "prune"}:
            await admin_execute(args.url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return finish(started, failures, rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", default=SERVER_URL, help="the server the databases are made on")
    parser.add_argument("--database", default="batchd_bench_history")
    parser.add_argument("--jobs", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=120)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument(
        "--live", type=int, default=5_000, help="queued jobs, and jobs in a batch in progress"
    )
    parser.add_argument("--workers", type=int, default=2, help="connections building the history")
    parser.add_argument("--keep", action="store_true", help="keep the history's database for --reuse")
    parser.add_argument(
        "--reuse", action="store_true", help="use the database built before, if its shape fits"
    )
    parser.add_argument("--steps", default=",".join(STEPS), help=f"some of {','.join(STEPS)}")
    parser.add_argument("--runs", type=int, default=9, help="timed runs of each read")
    parser.add_argument("--claim-jobs", type=int, default=10_000)
    parser.add_argument("--claim-rounds", type=int, default=6)
    parser.add_argument("--prune-jobs", type=int, default=1_000_000)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--window", type=float, default=10.0, help="seconds per producers' slice")
    parser.add_argument("--max-slices", type=int, default=400, help="the prune step's slices at most")
    parser.add_argument(
        "--prune-settings",
        nargs="*",
        metavar="BUSY_SHARE:CHUNK",
        help="prune runs one after another, each pruning the next --prune-jobs (default: the defaults)",
    )
    parser.add_argument("--design-rows", type=int, default=1_000_000)
    parser.add_argument("--design-days", type=int, default=30)
    parser.add_argument("--lookups", type=int, default=1_000, help="ids looked up per round (--design)")
    args = parser.parse_args(argv)
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        parser.error(f"--steps: unknown {', '.join(sorted(unknown))}")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    interrupt_on_sigterm()
    sys.exit(asyncio.run(main(arguments)))
