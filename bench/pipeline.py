"""The whole pipeline at 100,000 jobs of about 1 KB, each stage next to the plain SQL doing the same work.

One run, on a scratch database made for it and dropped afterwards, with the emulator in a subprocess:

1. Producers' INSERTs, by the state of the `jobs_inserted` trigger: disabled (the baseline); steady (a busy
   daemon: not armed, `wake_seq` far ahead); armed (an idle daemon: the first insert notifies, and a
   stand-in daemon listening on the channel disarms the trigger with batchd's own `set_wakeup`, as the
   flusher does when it wakes); and stuck (armed, never disarmed: every insert notifies, the worst case,
   shown without a target). Two shapes: bulk INSERT ... SELECT FROM unnest() of 1,000 rows a statement, and
   8 producers each committing one row per transaction. Short timed slices, the modes taking turns for a
   number of rounds; medians are reported, with the range.
2. `Flusher.flush_one()` (claim, encode, record) and `submitter.submit()` (the create through the SDK),
   next to the raw claim (one UPDATE ... FROM a FOR UPDATE SKIP LOCKED CTE) and a raw create (the same
   kind of body POSTed with aiohttp, then one UPDATE) on an identical fresh queue.
3. `results.apply_results()` once the emulator has ended the batch, next to a raw COPY of the same results
   into a temporary table and one UPDATE ... FROM. Each apply runs in a subprocess of its own, whose peak
   resident memory (VmHWM, reset just before the step) is the step's alone: batches of N/10, N/2 and N.
4. A burst of N jobs (statements of 1,000) into a running daemon (`batchd.daemon.Daemon`, max_requests N,
   max_wait_s an hour, so the count threshold triggers), timed until the batch has its provider_batch_id.
5. pgqueuer draining N jobs of 1 KB with a no-op entrypoint, 5 consumers, batch size 500 (the settings of
   its own drain benchmark, tools/benchmark.py in its repository), in a subprocess, on uvloop as there.

Every timed step on the database starts after VACUUM (ANALYZE) and CHECKPOINT, and autovacuum is off on
batchd.jobs in the scratch database, so no step inherits another's dirty pages or a vacuum mid-way.

    .venv/bin/python bench/pipeline.py [--jobs 100000] [--rounds 8] [--producer-seconds 0.5]

Prints a Markdown table with a verdict per target, and exits non-zero when a target is missed or a check
(every job claimed, sent, applied, drained exactly once) fails. Needs pgqueuer (a bench-only dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import random
import shlex
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
from benchlib import EmulatorProcess, text_pool

from batchd import log as batchd_log
from batchd import migrate, store
from batchd.config import Settings
from batchd.context import Context
from batchd.daemon import Daemon
from batchd.flusher import Flusher
from batchd.poller import poll_until_ended
from batchd.provider import Provider
from batchd.publisher import publish
from batchd.ratelimit import RateLimiter
from batchd.results import apply_results, publish_prices
from batchd.store import sql
from batchd.submitter import submit

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
API_KEY = "bench-key"
MODEL = "claude-sonnet-4-5"
REQUEST_BYTES = 1_000  # the raw request's JSON, as the producer writes it
CHUNK_ROWS = 1_000  # rows per bulk INSERT statement
PRODUCERS = 8
MAX_BYTES = 256_000_000
EMULATOR_PROCESSING_S = 3_600  # batches end only when the clock is pushed
CHILD_TIMEOUT_S = 300.0
BURST_TIMEOUT_S = 120.0
PGQUEUER_CONSUMERS = 5
PGQUEUER_BATCH_SIZE = 500
STEADY_WAKE_SEQ = 1 << 62  # "wake me at a job number far ahead": the trigger never notifies
MIB = 1024 * 1024
SCRIPT = str(Path(__file__).resolve())

# Targets.
MIN_RAW_RATIO = 0.5  # each batchd stage at least half the speed of its raw SQL
MIN_PGQUEUER_RATIO = 2.0  # batchd's claim at least twice pgqueuer's drain
MAX_TRIGGER_OVERHEAD = 0.10
MAX_BURST_S = 10.0
MAX_MEMORY_GROWTH_MIB = 8.0  # the apply's peak at N at most this much above its peak at N/10

INSERT_CHUNK = (
    "INSERT INTO batchd.jobs (tenant_id, request) SELECT 'bench', r::jsonb FROM unnest($1::text[]) AS r"
)
INSERT_ONE = "INSERT INTO batchd.jobs (tenant_id, request) VALUES ('bench', $1::jsonb)"
RAW_BATCH = "INSERT INTO batchd.batches (tag, request_count, bytes) VALUES ($1, $2, 0) RETURNING id"
RAW_CLAIM = """
WITH c AS (
    SELECT id FROM batchd.jobs WHERE status = 'queued' ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED
)
UPDATE batchd.jobs AS j SET status = 'submitting', batch_id = $1 FROM c WHERE j.id = c.id
RETURNING j.id, j.request
"""
RAW_SUBMITTED = """
UPDATE batchd.jobs SET status = 'submitted', submitted_at = now()
 WHERE batch_id = $1 AND status = 'submitting'
"""
RAW_RESULTS_TABLE = "CREATE TEMPORARY TABLE raw_results (job_id uuid NOT NULL, result text) ON COMMIT DROP"
RAW_APPLY = """
UPDATE batchd.jobs AS j SET status = 'succeeded', result = r.result::jsonb, completed_at = now()
  FROM raw_results AS r
 WHERE j.id = r.job_id AND j.batch_id = $1 AND j.status = 'submitted'
"""
RESET = (
    "TRUNCATE batchd.jobs, batchd.batches, batchd.batch_tenants, batchd.events, batchd.tenant_event_log"
    " RESTART IDENTITY;"
    "UPDATE batchd.event_log SET published_seq = 0;"
    "UPDATE batchd.wakeup SET armed = true, wake_seq = 0"
)


# -- small things ------------------------------------------------------------------------------------------


def per_s(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def read_status_mib(pid: int | str, key: str) -> float:
    """A memory line of /proc/PID/status (VmRSS, VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024 / MIB
    raise KeyError(key)


def reset_peak_rss() -> None:
    """Makes VmHWM start again from the current RSS (Linux 4.0+), so the next peak is one step's alone."""
    Path("/proc/self/clear_refs").write_text("5")


def database_url(server_url: str, name: str) -> str:
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


def build_requests(n: int) -> list[str]:
    """n raw requests (Messages API params), REQUEST_BYTES of JSON each."""
    pool = text_pool(random.Random(20_250_101))
    envelope = {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": ""}]}
    room = REQUEST_BYTES - len(json.dumps(envelope, separators=(",", ":")))
    requests = []
    for i in range(n):
        head = f"Job {i}: "
        start = (i * 7919) % (len(pool) - room)
        content = head + pool[start : start + room - len(head)]
        envelope["messages"] = [{"role": "user", "content": content}]
        requests.append(json.dumps(envelope, separators=(",", ":")))
    return requests


def chunked(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def bench_settings(url: str, emulator_url: str, max_requests: int) -> Settings:
    return Settings(
        database={"url": url, "pool_min_size": 2, "pool_max_size": 10},
        anthropic={"base_url": emulator_url, "requests_per_minute": 6000, "timeout_s": 600},
        batching={
            "max_requests": max_requests,
            "max_bytes": MAX_BYTES,
            "max_wait_s": 3600,
            "deadline_slack_s": 60,
            "max_in_flight_requests": 10_000_000,
        },
        polling={"min_interval_s": 30, "max_interval_s": 60},
        daemon={"lease_s": 60, "sweep_interval_s": 30, "reconcile_grace_s": 1},
        http={"host": "127.0.0.1", "port": 0},
    )


def new_provider(emulator_url: str) -> Provider:
    return Provider(API_KEY, base_url=emulator_url, limiter=RateLimiter(6000), timeout_s=600)


# -- processes ---------------------------------------------------------------------------------------------


async def run_child(args: list[str]) -> dict[str, Any]:
    """This script again, in a subprocess of its own; its last line of output is a JSON report."""
    command = [sys.executable, SCRIPT, *args]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=CHILD_TIMEOUT_S)
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} exited with {process.returncode}:\n{stderr.decode()[-3000:]}"
        )
    report: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return report


# -- the scratch database ----------------------------------------------------------------------------------


async def admin_execute(server_url: str, statement: str) -> None:
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def scratch_database(server_url: str) -> AsyncIterator[str]:
    """A fresh database with batchd's schema (`batchd.migrate`), dropped however the block ends."""
    name = f"batchd_bench_{uuid.uuid4().hex[:12]}"
    await admin_execute(server_url, f'CREATE DATABASE "{name}"')
    try:
        url = database_url(server_url, name)
        connection = await asyncpg.connect(url)
        try:
            await migrate.migrate(connection)
            # Autovacuum waking in the middle of a timed run is noise, the same for batchd and the
            # baselines: the benchmark vacuums and analyzes explicitly before each timed step instead.
            await connection.execute("ALTER TABLE batchd.jobs SET (autovacuum_enabled = false)")
        finally:
            await connection.close()
        yield url
    finally:
        await admin_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def fresh_queue(connection: asyncpg.Connection, chunks: list[list[str]]) -> None:
    """Empties the tables, enqueues the jobs (trigger enabled, daemon busy), vacuums and checkpoints: every
    timed step on a queue starts from the same state."""
    await connection.execute(RESET)
    await connection.execute("ALTER TABLE batchd.jobs ENABLE TRIGGER jobs_inserted")
    await connection.execute("UPDATE batchd.wakeup SET armed = false, wake_seq = $1", STEADY_WAKE_SEQ)
    for chunk in chunks:
        await connection.execute(INSERT_CHUNK, chunk)
    await settle(connection)


async def settle(connection: asyncpg.Connection) -> None:
    await connection.execute("VACUUM (ANALYZE) batchd.jobs")
    await connection.execute("CHECKPOINT")


# -- 1. producers' INSERTs ---------------------------------------------------------------------------------

# How the trigger is set for a slice of inserts. "armed" is an idle daemon: the first insert notifies, and the
# stand-in daemon (a LISTEN connection) disarms the trigger as the flusher does when it wakes. "stuck" is
# armed with nobody disarming it (a daemon down or not yet caught up): every insert notifies.
MODES = ("off", "steady", "armed", "stuck")
MODE_NOTES = {
    "off": "trigger disabled",
    "steady": "busy daemon: not armed, wake_seq ahead",
    "armed": "idle daemon: the first insert notifies, the daemon disarms",
    "stuck": "armed and never disarmed: every insert notifies",
}
SLICE_STATEMENTS = 10  # bulk: statements of CHUNK_ROWS rows per timed slice
# The order of the modes in each round: a balanced Latin square, so that every mode comes first once and
# follows every other mode once every four rounds (what a slice leaves behind falls on no mode in particular).
BALANCED_ORDERS = ((0, 1, 3, 2), (1, 2, 0, 3), (2, 3, 1, 0), (3, 0, 2, 1))


@dataclass
class InsertResults:
    bulk: dict[str, list[float]] = field(default_factory=lambda: {mode: [] for mode in MODES})
    producers: dict[str, list[float]] = field(default_factory=lambda: {mode: [] for mode in MODES})
    notifications: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODES, 0))

    def runs(self, shape: str) -> dict[str, list[float]]:
        return self.bulk if shape == "bulk" else self.producers

    def median(self, shape: str, mode: str) -> float:
        return statistics.median(self.runs(shape)[mode])

    def overhead(self, shape: str, mode: str) -> float:
        return 1.0 - self.median(shape, mode) / self.median(shape, "off")


class StandInDaemon:
    """The daemon's side of the wakeup protocol, and nothing else: LISTEN on the jobs channel, and on a
    notification while `disarm` is set, disarm the trigger with batchd's own `set_wakeup` query."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self.heard = 0
        self.disarm = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.connection.add_listener("batchd_jobs", self._notified)

    def _notified(self, *_: object) -> None:
        self.heard += 1
        if self.disarm:
            self.disarm = False
            task = asyncio.create_task(self._disarm())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _disarm(self) -> None:
        await self.connection.execute(sql("set_wakeup"), False, STEADY_WAKE_SEQ)  # noqa: FBT003 - a parameter

    async def settle(self) -> None:
        await asyncio.sleep(0.02)  # notifications still on their way
        if self._tasks:
            await asyncio.gather(*self._tasks)


async def set_mode(connection: asyncpg.Connection, daemon: StandInDaemon, mode: str) -> None:
    if mode == "off":
        await connection.execute("ALTER TABLE batchd.jobs DISABLE TRIGGER jobs_inserted")
    else:
        await connection.execute("ALTER TABLE batchd.jobs ENABLE TRIGGER jobs_inserted")
    armed = mode in ("armed", "stuck")
    await connection.execute(sql("set_wakeup"), armed, 0 if armed else STEADY_WAKE_SEQ)
    daemon.disarm = mode == "armed"


async def count_jobs(connection: asyncpg.Connection) -> int:
    count: int = await connection.fetchval("SELECT count(*) FROM batchd.jobs")
    return count


async def bulk_slice(connection: asyncpg.Connection, chunks: list[list[str]]) -> float:
    started = time.perf_counter()
    for chunk in chunks:
        await connection.execute(INSERT_CHUNK, chunk)
    return per_s(sum(len(chunk) for chunk in chunks), time.perf_counter() - started)


async def producers_slice(
    producers: list[asyncpg.Connection], requests: list[str], seconds: float
) -> tuple[float, int]:
    """Each producer commits one row per transaction (autocommit), as fast as it can, for `seconds`."""
    counts = [0] * len(producers)
    started = time.perf_counter()
    stop_at = started + seconds

    async def produce(k: int) -> None:
        connection, i = producers[k], k * 7919
        while time.perf_counter() < stop_at:
            # execute() with arguments: prepared once, then bind, execute and sync in one round trip.
            await connection.execute(INSERT_ONE, requests[i % len(requests)])
            counts[k] += 1
            i += 1

    await asyncio.gather(*(produce(k) for k in range(len(producers))))
    return per_s(sum(counts), time.perf_counter() - started), sum(counts)


async def insert_benchmark(url: str, requests: list[str], rounds: int, seconds: float) -> InsertResults:
    """Short slices, the modes taking turns in a balanced order, so that whatever drifts during the run (the
    disk's flush latency, a checkpoint, the table's growth) falls on every mode alike."""
    results = InsertResults()
    chunks = chunked(requests, CHUNK_ROWS)
    daemon = StandInDaemon(await asyncpg.connect(url))
    admin = await asyncpg.connect(url)
    producers = [await asyncpg.connect(url) for _ in range(PRODUCERS)]
    try:
        await daemon.start()
        await admin.execute(RESET)
        await admin.execute("CHECKPOINT")
        expected = 0
        for round_ in range(rounds):
            order = [MODES[i] for i in BALANCED_ORDERS[round_ % len(BALANCED_ORDERS)]]
            for mode in order:
                start = (round_ * len(MODES) + MODES.index(mode)) * SLICE_STATEMENTS % len(chunks)
                part = (chunks + chunks)[start : start + SLICE_STATEMENTS]
                heard = daemon.heard
                await set_mode(admin, daemon, mode)
                results.bulk[mode].append(await bulk_slice(admin, part))
                await set_mode(admin, daemon, mode)
                rate, rows = await producers_slice(producers, requests, seconds)
                results.producers[mode].append(rate)
                await daemon.settle()
                results.notifications[mode] += daemon.heard - heard
                expected += sum(len(chunk) for chunk in part) + rows
            print(
                f"  round {round_ + 1}: bulk "
                + ", ".join(f"{mode} {results.bulk[mode][-1]:,.0f}" for mode in MODES)
                + " rows/s; producers "
                + ", ".join(f"{mode} {results.producers[mode][-1]:,.0f}" for mode in MODES)
                + " rows/s",
                flush=True,
            )
        if await count_jobs(admin) != expected:
            raise RuntimeError("the table does not hold every row the producers inserted")
        await admin.execute(RESET)
        await admin.execute("ALTER TABLE batchd.jobs ENABLE TRIGGER jobs_inserted")
    finally:
        for connection in [daemon.connection, admin, *producers]:
            await connection.close()
    return results


# -- 2. and 3. claim, submit, apply ------------------------------------------------------------------------


@dataclass
class ApplyReport:
    jobs: int
    seconds: float
    rss_before_mib: float
    peak_mib: float
    succeeded: int
    status: str
    published: int = 0  # events numbered for the SSE log after the apply (its and the submit's)
    publish_s: float = 0.0

    @property
    def extra_mib(self) -> float:
        return max(0.0, self.peak_mib - self.rss_before_mib)


@dataclass
class PipelineResults:
    jobs: int
    raw_claim_s: float = 0.0
    raw_submit_s: float = 0.0
    raw_apply_s: float = 0.0
    raw_download_s: float = 0.0
    result_line_bytes: float = 0.0  # the average results line, as the emulator sends it
    claim_s: float = 0.0
    submit_s: float = 0.0
    applies: list[ApplyReport] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, failure: str) -> None:
        if not ok:
            self.failures.append(failure)
            print(f"CHECK FAILED: {failure}", flush=True)


def api_headers() -> dict[str, str]:
    return {"x-api-key": API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}


async def raw_path(
    connection: asyncpg.Connection, emulator: EmulatorProcess, results: PipelineResults
) -> tuple[UUID, str]:
    """The baseline: one UPDATE claims, aiohttp POSTs the same kind of body, one UPDATE records."""
    n = results.jobs
    started = time.perf_counter()
    async with connection.transaction():
        batch_id: UUID = await connection.fetchval(RAW_BATCH, uuid.uuid4().hex[:12], n)
        rows = await connection.fetch(RAW_CLAIM, batch_id, n)
    results.raw_claim_s = time.perf_counter() - started
    results.check(len(rows) == n, f"the raw claim took {len(rows)} jobs, not {n}")
    body = (
        '{"requests":['
        + ",".join(f'{{"custom_id":"r-{row["id"].hex}","params":{row["request"]}}}' for row in rows)
        + "]}"
    ).encode()
    del rows
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(
            f"{emulator.url}/v1/messages/batches", data=body, headers=api_headers()
        ) as response:
            response.raise_for_status()
            created = await response.json()
        async with connection.transaction():
            await connection.execute(
                "UPDATE batchd.batches SET provider_batch_id = $2, status = 'in_progress' WHERE id = $1",
                batch_id,
                created["id"],
            )
            status = await connection.execute(RAW_SUBMITTED, batch_id)
        results.raw_submit_s = time.perf_counter() - started
    results.check(status == f"UPDATE {n}", f"the raw submit recorded {status}, not {n} jobs")
    return batch_id, created["id"]


async def raw_apply(
    connection: asyncpg.Connection,
    emulator: EmulatorProcess,
    batch_id: UUID,
    provider_batch_id: str,
    results: PipelineResults,
) -> None:
    """Downloads the raw batch's results (timed apart), then COPY + one UPDATE ... FROM (the baseline)."""
    records: list[tuple[UUID, str]] = []
    started = time.perf_counter()
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{emulator.url}/v1/messages/batches/{provider_batch_id}/results", headers=api_headers()
        ) as response,
    ):
        response.raise_for_status()
        total_bytes = 0
        async for raw_line in response.content:
            total_bytes += len(raw_line)
            if raw_line.strip():
                line = json.loads(raw_line)
                message = json.dumps(line["result"]["message"], separators=(",", ":"))
                records.append((UUID(hex=line["custom_id"][2:]), message))
    results.raw_download_s = time.perf_counter() - started
    results.result_line_bytes = total_bytes / max(1, len(records))
    started = time.perf_counter()
    async with connection.transaction():
        await connection.execute(RAW_RESULTS_TABLE)
        await connection.copy_records_to_table("raw_results", records=records, columns=["job_id", "result"])
        status = await connection.execute(RAW_APPLY, batch_id)
    results.raw_apply_s = time.perf_counter() - started
    results.check(status == f"UPDATE {results.jobs}", f"the raw apply recorded {status}, not {results.jobs}")


async def make_batch(ctx: Context) -> tuple[UUID, float, float]:
    """Flusher.flush_one() then submit(), as the daemon runs them; returns the batch and both times."""
    made: list[tuple[UUID, bytes]] = []
    flusher = Flusher(ctx, on_batch=lambda batch_id, body: made.append((batch_id, body)))
    started = time.perf_counter()
    flushed = await flusher.flush_one()
    claim_s = time.perf_counter() - started
    if flushed.batch_id is None or len(made) != 1:
        raise RuntimeError(f"the flusher made no batch: {flushed}")
    batch = await store.get_batch(ctx.pool, flushed.batch_id)
    assert batch is not None
    body = made.pop()[1]
    started = time.perf_counter()
    await submit(ctx, batch, body)
    submit_s = time.perf_counter() - started
    return flushed.batch_id, claim_s, submit_s


async def job_statuses(connection: store.Connection, batch_id: UUID) -> dict[str, int]:
    rows = await connection.fetch(
        "SELECT status, count(*) AS n FROM batchd.jobs WHERE batch_id = $1 GROUP BY status", batch_id
    )
    return {row["status"]: row["n"] for row in rows}


async def pipeline_benchmark(url: str, emulator: EmulatorProcess, requests: list[str]) -> PipelineResults:
    n = len(requests)
    results = PipelineResults(jobs=n)
    sizes = sorted({max(1, n // 10), max(1, n // 2)})
    connection = await asyncpg.connect(url)
    pool = await store.create_pool(url, min_size=2, max_size=10)
    provider = new_provider(emulator.url)
    try:
        print("  raw SQL: claim, create, record", flush=True)
        await fresh_queue(connection, chunked(requests, CHUNK_ROWS))
        raw_batch, raw_provider_batch = await raw_path(connection, emulator, results)

        print("  batchd: Flusher.flush_one(), submit()", flush=True)
        await connection.execute("DELETE FROM batchd.jobs WHERE status = 'queued'")  # none: checked below
        for chunk in chunked(requests, CHUNK_ROWS):
            await connection.execute(INSERT_CHUNK, chunk)
        await settle(connection)
        ctx = Context(pool=pool, settings=bench_settings(url, emulator.url, n), provider=provider)
        batch_id, results.claim_s, results.submit_s = await make_batch(ctx)
        statuses = await job_statuses(connection, batch_id)
        results.check(statuses == {"submitted": n}, f"batchd's batch holds {statuses}, not {n} submitted")

        print(
            f"  batchd: batches of {', '.join(f'{s:,}' for s in sizes)} for the memory of applying",
            flush=True,
        )
        batches = {n: batch_id}
        for size in sizes:
            for chunk in chunked(requests[:size], CHUNK_ROWS):
                await connection.execute(INSERT_CHUNK, chunk)
            # The same owner as `ctx`'s batch: polling and applying write only a batch whose lease they hold.
            sized_settings = bench_settings(url, emulator.url, size)
            sized = Context(
                pool=pool, settings=sized_settings, provider=provider, instance_id=ctx.instance_id
            )
            batches[size] = (await make_batch(sized))[0]

        await emulator.end_all_batches()
        for made in batches.values():
            batch = await store.get_batch(pool, made)
            assert batch is not None
            results.check(await poll_until_ended(ctx, batch), f"batch {made} did not end")
        await settle(connection)

        print("  raw SQL: COPY + UPDATE of the results", flush=True)
        await raw_apply(connection, emulator, raw_batch, raw_provider_batch, results)

        for size in sorted(batches):
            print(f"  batchd: apply_results() on {size:,} jobs, in a subprocess", flush=True)
            await settle(connection)
            report = ApplyReport(
                **await run_child(
                    [
                        *("--child", "apply", "--database-url", url),
                        *("--emulator-url", emulator.url, "--batch-id", str(batches[size])),
                    ]
                )
            )
            results.applies.append(report)
            results.check(
                report.succeeded == size and report.status == "applied",
                f"applying {size:,}: {report.succeeded} succeeded, batch {report.status}",
            )
    finally:
        await provider.close()
        await pool.close()
        await connection.close()
    return results


async def child_apply(args: argparse.Namespace) -> dict[str, Any]:
    """In a process of its own: apply one ended batch's results; the peak RSS is this step's alone."""
    pool = await store.create_pool(args.database_url, min_size=2, max_size=4)
    provider = new_provider(args.emulator_url)
    try:
        settings = bench_settings(args.database_url, args.emulator_url, 1)
        async with pool.acquire() as connection:
            await publish_prices(connection, settings.pricing)  # as the daemon does when it starts
        batch = await store.get_batch(pool, UUID(args.batch_id))
        if batch is None or batch.owner is None:
            raise RuntimeError(f"no batch {args.batch_id} with an owner")
        # As the daemon that made the batch: applying writes only a batch whose lease it holds.
        ctx = Context(pool=pool, settings=settings, provider=provider, instance_id=batch.owner)
        gc.collect()
        rss_before = read_status_mib("self", "VmRSS")
        reset_peak_rss()
        started = time.perf_counter()
        await apply_results(ctx, batch)
        seconds = time.perf_counter() - started
        peak = read_status_mib("self", "VmHWM")
        async with pool.acquire() as connection:
            statuses = await job_statuses(connection, batch.id)
            status = await connection.fetchval("SELECT status FROM batchd.batches WHERE id = $1", batch.id)
            # What the daemon's publisher does next for SSE: number the new events in commit order.
            publish_started = time.perf_counter()
            published = await publish(connection, settings.events.publish_chunk)
            publish_s = time.perf_counter() - publish_started
    finally:
        await provider.close()
        await pool.close()
    return {
        "jobs": batch.request_count,
        "seconds": seconds,
        "rss_before_mib": rss_before,
        "peak_mib": peak,
        "succeeded": statuses.get("succeeded", 0),
        "status": status,
        "published": published,
        "publish_s": publish_s,
    }


# -- 4. a burst into a running daemon ----------------------------------------------------------------------


@dataclass
class BurstResults:
    jobs: int
    insert_s: float = 0.0
    total_s: float = 0.0
    recorded_s: float = 0.0  # from the first INSERT to the flush's transaction start (batches.created_at)
    create_started_s: float = 0.0  # ... to begin_create (create_attempted_at)
    created_s: float = 0.0  # ... to the create's answer being recorded (submitted_at)
    batch_jobs: int = 0
    batches: int = 0


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {within:.0f} s")
        await asyncio.sleep(0.01)


async def burst_benchmark(url: str, emulator: EmulatorProcess, requests: list[str]) -> BurstResults:
    n = len(requests)
    results = BurstResults(jobs=n)
    chunks = chunked(requests, CHUNK_ROWS)
    connection = await asyncpg.connect(url)
    daemon = Daemon(bench_settings(url, emulator.url, n), serve_http=False)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        await connection.execute(RESET)
        await connection.execute("ALTER TABLE batchd.jobs ENABLE TRIGGER jobs_inserted")
        await settle(connection)
        task = asyncio.create_task(daemon.run(stop), name="daemon")
        ready = asyncio.create_task(daemon.ready.wait())
        await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()
            raise RuntimeError("the daemon stopped before it was ready")
        if not daemon.ready.is_set():
            raise RuntimeError("the daemon was not ready within 30 s")

        async def armed() -> bool:
            return bool(await connection.fetchval("SELECT armed FROM batchd.wakeup"))

        await wait_for(armed, 10, "the idle daemon arming the trigger")
        db_start = await connection.fetchval("SELECT clock_timestamp()")
        started = time.perf_counter()
        for chunk in chunks:
            await connection.execute(INSERT_CHUNK, chunk)
        results.insert_s = time.perf_counter() - started

        async def created() -> bool:
            count = await connection.fetchval(
                "SELECT count(*) FROM batchd.batches WHERE provider_batch_id IS NOT NULL"
            )
            return bool(count)

        await wait_for(created, BURST_TIMEOUT_S, "the burst's batch being created")
        results.total_s = time.perf_counter() - started
        row = await connection.fetchrow(
            "SELECT created_at, create_attempted_at, submitted_at, request_count FROM batchd.batches"
            " WHERE provider_batch_id IS NOT NULL"
        )
        assert row is not None
        results.recorded_s = (row["created_at"] - db_start).total_seconds()
        results.create_started_s = (row["create_attempted_at"] - db_start).total_seconds()
        results.created_s = (row["submitted_at"] - db_start).total_seconds()
        results.batch_jobs = row["request_count"]
        results.batches = await connection.fetchval("SELECT count(*) FROM batchd.batches")
    finally:
        stop.set()
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, timeout=30)
        await connection.close()
    return results


# -- 5. pgqueuer -------------------------------------------------------------------------------------------


async def child_pgqueuer(args: argparse.Namespace) -> dict[str, Any]:
    """pgqueuer's drain benchmark, on the same jobs: enqueue n, then 5 consumers of batch size 500 drain
    them with a no-op entrypoint, each on its own connection (as tools/benchmark.py in its repository)."""
    import logging  # noqa: PLC0415 - the child only

    from pgqueuer import AsyncpgDriver, Job, PgQueuer, Queries  # noqa: PLC0415 - a bench-only dependency
    from pgqueuer.types import QueueExecutionMode  # noqa: PLC0415

    logging.getLogger("pgqueuer").setLevel(logging.WARNING)
    n = args.jobs
    payloads = [request.encode() for request in build_requests(n)]
    admin = await asyncpg.connect(args.database_url)
    try:
        queries = Queries(AsyncpgDriver(admin))
        await queries.install()
        for start in range(0, n, 10_000):
            part = payloads[start : start + 10_000]
            await queries.enqueue(["noop"] * len(part), list(part), [0] * len(part))
        await admin.execute("VACUUM (ANALYZE) pgqueuer")
        await admin.execute("CHECKPOINT")
        consumers = [PgQueuer(AsyncpgDriver(await asyncpg.connect(args.database_url))) for _ in range(5)]
        done = [0]
        for consumer in consumers:

            async def noop(job: Job) -> None:  # noqa: ARG001
                done[0] += 1

            # Registered by a call, not as a decorator: without pgqueuer installed, mypy sees it untyped.
            consumer.entrypoint("noop")(noop)

        started = time.perf_counter()
        await asyncio.gather(
            *(
                consumer.run(batch_size=PGQUEUER_BATCH_SIZE, mode=QueueExecutionMode.drain)
                for consumer in consumers
            )
        )
        seconds = time.perf_counter() - started
        remaining = await admin.fetchval("SELECT count(*) FROM pgqueuer")
        logged = await admin.fetchval("SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'")
        await queries.uninstall()
    finally:
        await admin.close()
    return {"jobs": n, "done": done[0], "seconds": seconds, "remaining": remaining, "logged": logged}


# -- the report --------------------------------------------------------------------------------------------


@dataclass
class Row:
    measure: str
    batchd: str
    baseline: str
    comparison: str
    target: str
    ok: bool | None  # None: for information, no target


def rate_row(measure: str, jobs: int, seconds: float, baseline_s: float, what: str) -> Row:
    ours, theirs = per_s(jobs, seconds), per_s(jobs, baseline_s)
    ratio = ours / theirs if theirs else 0.0
    return Row(
        measure,
        f"{ours:,.0f} jobs/s ({seconds:.2f} s)",
        f"{what}: {theirs:,.0f} jobs/s ({baseline_s:.2f} s)",
        f"{ratio:.2f}x",
        f">= {MIN_RAW_RATIO:.1f}x",
        ratio >= MIN_RAW_RATIO,
    )


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} rows/s ({min(values):,.0f}-{max(values):,.0f})"


def insert_rows(inserts: InsertResults) -> list[Row]:
    rows = []
    for shape, label in (
        ("bulk", f"bulk INSERT, {CHUNK_ROWS:,} rows a statement"),
        ("producers", f"{PRODUCERS} producers, 1 row a commit"),
    ):
        runs = inserts.runs(shape)
        for mode in ("steady", "armed", "stuck"):
            overhead = inserts.overhead(shape, mode)
            targeted = mode != "stuck"  # the worst case is shown, not held to the target: see MODES
            rows.append(
                Row(
                    f"{label}, trigger {mode} ({MODE_NOTES[mode]})",
                    spread(runs[mode]),
                    f"trigger disabled: {spread(runs['off'])}",
                    f"{overhead * 100:+.1f} % cost",
                    f"< {MAX_TRIGGER_OVERHEAD * 100:.0f} %" if targeted else "(worst case, no target)",
                    overhead < MAX_TRIGGER_OVERHEAD if targeted else None,
                )
            )
    return rows


def memory_rows(applies: list[ApplyReport], line_bytes: float) -> list[Row]:
    rows = [
        Row(
            f"apply_results, {report.jobs:,} jobs: peak RSS above its start",
            f"{report.extra_mib:.1f} MiB (peak {report.peak_mib:.0f} MiB)",
            "",
            f"{per_s(report.jobs, report.seconds):,.0f} jobs/s",
            "",
            None,
        )
        for report in applies
    ]
    smallest, largest = applies[0], applies[-1]
    growth = largest.extra_mib - smallest.extra_mib
    whole = (largest.jobs - smallest.jobs) * line_bytes / MIB
    rows.append(
        Row(
            f"apply_results memory, {smallest.jobs:,} -> {largest.jobs:,} jobs",
            f"{growth:+.1f} MiB",
            f"the extra results held whole: +{whole:.0f} MiB",
            f"{growth * MIB / max(1, largest.jobs - smallest.jobs):+.0f} B per extra job",
            f"flat: < +{MAX_MEMORY_GROWTH_MIB:.0f} MiB",
            growth < MAX_MEMORY_GROWTH_MIB,
        )
    )
    return rows


def table(rows: list[Row]) -> str:
    header = ["measure", "batchd", "baseline", "comparison", "target", "verdict"]
    lines = [header, ["---", "---:", "---:", "---:", "---", "---"]]
    for row in rows:
        verdict = "" if row.ok is None else ("PASS" if row.ok else "FAIL")
        lines.append([row.measure, row.batchd, row.baseline, row.comparison, row.target, verdict])
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def machine() -> str:
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory_kb / 1024 / 1024:.1f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def report_rows(
    n: int, inserts: InsertResults, pipeline: PipelineResults, burst: BurstResults, pgq: dict[str, Any]
) -> list[Row]:
    rows = insert_rows(inserts)
    rows.append(
        rate_row(
            "claim + encode + record (Flusher.flush_one)",
            n,
            pipeline.claim_s,
            pipeline.raw_claim_s,
            "raw claim",
        )
    )
    rows.append(
        rate_row(
            "submit: create through the SDK + record",
            n,
            pipeline.submit_s,
            pipeline.raw_submit_s,
            "raw create",
        )
    )
    rows += apply_rows(n, pipeline)
    rows.append(
        Row(
            f"burst of {n:,} jobs: first INSERT to a created provider batch",
            f"{burst.total_s:.2f} s",
            f"inserted {burst.insert_s:.2f} s, flush began {burst.recorded_s:.2f} s, create sent "
            f"{burst.create_started_s:.2f} s, answered {burst.created_s:.2f} s",
            "",
            f"< {MAX_BURST_S:.0f} s",
            burst.total_s < MAX_BURST_S,
        )
    )
    claim_rate, pgq_rate = per_s(n, pipeline.claim_s), per_s(pgq["jobs"], pgq["seconds"])
    rows.append(
        Row(
            "batchd's claim path (Flusher.flush_one) next to pgqueuer draining the same jobs",
            f"{claim_rate:,.0f} jobs/s",
            f"pgqueuer, {PGQUEUER_CONSUMERS} consumers x {PGQUEUER_BATCH_SIZE}: {pgq_rate:,.0f} jobs/s "
            f"({pgq['seconds']:.2f} s)",
            f"{claim_rate / pgq_rate:.1f}x" if pgq_rate else "",
            f">= {MIN_PGQUEUER_RATIO:.0f}x",
            claim_rate >= MIN_PGQUEUER_RATIO * pgq_rate,
        )
    )
    return rows


def apply_rows(n: int, pipeline: PipelineResults) -> list[Row]:
    """Stage 3's rows: the apply next to the raw one, its publish, its memory."""
    rows = []
    full = next(report for report in pipeline.applies if report.jobs == n)
    rows.append(
        rate_row(
            "apply_results: download, parse, COPY + UPDATE",
            n,
            full.seconds,
            pipeline.raw_apply_s,
            "raw apply",
        )
    )
    ours, raw_whole_s = per_s(n, full.seconds), pipeline.raw_download_s + pipeline.raw_apply_s
    rows.append(
        Row(
            "(reference) apply_results next to a raw download + parse, then the raw apply",
            f"{ours:,.0f} jobs/s",
            f"{per_s(n, raw_whole_s):,.0f} jobs/s "
            f"({pipeline.raw_download_s:.2f} s + {pipeline.raw_apply_s:.2f} s)",
            f"{ours / per_s(n, raw_whole_s):.2f}x",
            "",
            None,
        )
    )
    rows.append(
        Row(
            "publish: number the events of the submit and the apply for SSE (publisher.py)",
            f"{per_s(full.published, full.publish_s):,.0f} events/s ({full.publish_s:.2f} s)",
            f"apply_results: {full.seconds:.2f} s",
            f"{full.publish_s / full.seconds * 100:.0f} % of the apply's time",
            "",
            None,
        )
    )
    return rows + memory_rows(pipeline.applies, pipeline.result_line_bytes)


async def describe_server(url: str) -> str:
    connection = await asyncpg.connect(url)
    try:
        server = await connection.fetchval("SHOW server_version")
        settings = await connection.fetch(
            "SELECT name, setting, unit FROM pg_settings WHERE name IN"
            " ('shared_buffers', 'synchronous_commit', 'fsync', 'max_wal_size', 'work_mem')"
        )
    finally:
        await connection.close()
    return f"PostgreSQL {server}: " + ", ".join(
        f"{r['name']}={r['setting']}{r['unit'] or ''}" for r in settings
    )


async def main(args: argparse.Namespace) -> int:
    batchd_log.configure("warning")
    os.environ.setdefault("ANTHROPIC_API_KEY", API_KEY)  # the daemon insists on a key; the emulator takes any
    n = args.jobs
    print(f"machine: {machine()}", flush=True)
    started = time.perf_counter()
    requests = build_requests(n)
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as log_dir:
        emulator = EmulatorProcess(Path(log_dir) / "emulator.log", processing_time_s=EMULATOR_PROCESSING_S)
        try:
            async with scratch_database(args.database_url) as url:
                print(await describe_server(url), flush=True)
                print(f"scratch database: {url}\nemulator: {shlex.join(emulator.command)}", flush=True)
                await emulator.start()

                if args.apply_only:
                    print(f"\n== 2./3. claim, submit, apply: {n:,} jobs (--apply-only)", flush=True)
                    pipeline = await pipeline_benchmark(url, emulator, requests)
                    return finish(started, pipeline.failures, apply_rows(n, pipeline))
                print(
                    f"\n== 1. producers' INSERTs of {REQUEST_BYTES:,} B requests, by trigger mode: "
                    f"{args.rounds} "
                    f"rounds of a bulk slice ({SLICE_STATEMENTS * CHUNK_ROWS:,} rows) and of {PRODUCERS} "
                    f"producers for {args.producer_seconds:g} s",
                    flush=True,
                )
                inserts = await insert_benchmark(url, requests, args.rounds, args.producer_seconds)
                print(f"  notifications heard: {inserts.notifications}", flush=True)

                print(f"\n== 2./3. claim, submit, apply: {n:,} jobs", flush=True)
                pipeline = await pipeline_benchmark(url, emulator, requests)

                print(f"\n== 4. a burst of {n:,} jobs into a running daemon", flush=True)
                burst = await burst_benchmark(url, emulator, requests)

                print(
                    f"\n== 5. pgqueuer: {n:,} jobs drained by {PGQUEUER_CONSUMERS} consumers, "
                    f"batch size {PGQUEUER_BATCH_SIZE}",
                    flush=True,
                )
                pgq = await run_child(["--child", "pgqueuer", "--database-url", url, "--jobs", str(n)])
        except BaseException:
            print(f"emulator output (last lines):\n{emulator.log_tail()}", file=sys.stderr)
            raise
        finally:
            emulator.stop()

    failures = list(pipeline.failures)
    if burst.batch_jobs != n or burst.batches != 1:
        failures.append(f"the burst made {burst.batches} batch(es), the first of {burst.batch_jobs} jobs")
    if pgq["done"] != n or pgq["remaining"] != 0:
        failures.append(f"pgqueuer ran {pgq['done']} of {n} jobs, {pgq['remaining']} left")
    return finish(started, failures, report_rows(n, inserts, pipeline, burst, pgq))


def finish(started: float, failures: list[str], rows: list[Row]) -> int:
    """Prints the table and the verdict; the exit status."""
    print("\n" + table(rows))
    elapsed = time.perf_counter() - started
    print(
        f"\nthis process's peak VmHWM: {read_status_mib('self', 'VmHWM'):.0f} MiB; "
        f"the whole run: {elapsed:.0f} s"
    )
    missed = [f"target: {row.measure}" for row in rows if row.ok is False]
    if failures or missed:
        print("\nFAILED:\n" + "\n".join([*(f"check: {f}" for f in failures), *missed]))
        return 1
    print("\nall targets met, all checks passed")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--jobs", type=int, default=100_000, help="jobs in the queue and the batch (default 100,000)"
    )
    parser.add_argument(
        "--rounds", type=int, default=8, help="timed slices of each INSERT mode, taking turns (default 8)"
    )
    parser.add_argument(
        "--producer-seconds",
        type=float,
        default=0.5,
        help=f"length of each timed slice of the {PRODUCERS} producers (default 0.5)",
    )
    parser.add_argument(
        "--database-url", default=DEFAULT_SERVER_URL, help="a server database to create the scratch one from"
    )
    parser.add_argument(
        "--apply-only",
        action="store_true",
        help="stages 2 and 3 only (claim, submit, apply), reporting the apply's measures",
    )
    parser.add_argument("--child", choices=["apply", "pgqueuer"], help=argparse.SUPPRESS)
    parser.add_argument("--emulator-url", help=argparse.SUPPRESS)
    parser.add_argument("--batch-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is None and not 1_000 <= args.jobs <= 100_000:
        parser.error("--jobs must be between 1,000 and 100,000 (the API's limit per batch)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def child_main(args: argparse.Namespace) -> int:
    batchd_log.configure("warning")
    if args.child == "apply":
        report = asyncio.run(child_apply(args))
    else:
        try:
            import uvloop  # noqa: PLC0415 - pgqueuer's own benchmark runs on uvloop

            report = uvloop.run(child_pgqueuer(args))
        except ImportError:
            report = asyncio.run(child_pgqueuer(args))
    print(json.dumps(report))
    return 0


def _interrupt(signum: int, frame: object) -> None:  # noqa: ARG001
    raise KeyboardInterrupt  # so that SIGTERM, too, drops the database and stops the emulator


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.child is not None:
        sys.exit(child_main(arguments))
    print("$ " + shlex.join([sys.executable, *sys.argv]), flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(asyncio.run(main(arguments)))
