"""A burst of N jobs into a running daemon (stage 4 of bench/pipeline.py): statements of 1,000 rows into
`batchd.daemon.Daemon` (max_requests N, max_wait_s an hour, so the count threshold triggers), timed from the
first INSERT until the batch has its provider_batch_id, and until its jobs are recorded submitted; with the
daemon's longest statements meanwhile (benchlib.StatementTimes).

    .venv/bin/python bench/burst.py [--jobs 100000]

On its own, on a scratch database made for it and dropped afterwards, with the emulator in a subprocess;
bench/pipeline.py runs it as its fourth stage. Exits non-zero when the target is missed or the burst did not
make one batch of every job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
from benchlib import (
    API_KEY,
    CHUNK_ROWS,
    INSERT_CHUNK,
    RESET,
    SERVER_URL,
    EmulatorProcess,
    Row,
    StatementTimes,
    bench_settings,
    build_requests,
    chunked,
    finish,
    interrupt_on_sigterm,
    machine,
    running,
    settle,
    timing_database,
)

from batchd import log as batchd_log
from batchd.daemon import Daemon

BURST_TIMEOUT_S = 120.0
MAX_BURST_S = 10.0
EMULATOR_PROCESSING_S = 3_600  # batches end only when the clock is pushed


@dataclass
class BurstResults:
    jobs: int
    insert_s: float = 0.0
    total_s: float = 0.0  # from the first INSERT until the batch's provider_batch_id is seen committed
    recorded_s: float = 0.0  # ... to the flush's transaction start (batches.created_at)
    create_started_s: float = 0.0  # ... to begin_create (create_attempted_at)
    created_s: float = 0.0  # ... to the start of recording its jobs submitted (submitted_at)
    jobs_recorded_s: float = 0.0  # ... until the batch is seen in_progress, its jobs submitted
    batch_jobs: int = 0
    batches: int = 0
    statements: str = ""  # the daemon's longest statements over the burst (benchlib.StatementTimes)


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {within:.0f} s")
        await asyncio.sleep(0.01)


async def start(daemon: Daemon, stop: asyncio.Event) -> asyncio.Task[None]:
    task = asyncio.create_task(daemon.run(stop), name="daemon")
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if task.done():
        task.result()
        raise RuntimeError("the daemon stopped before it was ready")
    if not daemon.ready.is_set():
        raise RuntimeError("the daemon was not ready within 30 s")
    return task


async def read_times(connection: asyncpg.Connection, db_start: datetime, results: BurstResults) -> None:
    """The batch's own timestamps, by the database's clock, from the first INSERT."""
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


async def burst_benchmark(url: str, emulator: EmulatorProcess, requests: list[str]) -> BurstResults:
    n = len(requests)
    results = BurstResults(jobs=n)
    chunks = chunked(requests, CHUNK_ROWS)
    connection = await asyncpg.connect(url)
    statements = StatementTimes()
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        with statements.watching():
            daemon = Daemon(bench_settings(url, emulator.url, n), serve_http=False)
            await connection.execute(RESET)
            await connection.execute("ALTER TABLE batchd.jobs ENABLE TRIGGER jobs_inserted")
            await settle(connection)
            task = await start(daemon, stop)

            async def armed() -> bool:
                return bool(await connection.fetchval("SELECT armed FROM batchd.wakeup"))

            await wait_for(armed, 10, "the idle daemon arming the trigger")
            statements.reset()
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

            async def in_progress() -> bool:
                count = await connection.fetchval(
                    "SELECT count(*) FROM batchd.batches WHERE status = 'in_progress'"
                )
                return bool(count)

            await wait_for(in_progress, BURST_TIMEOUT_S, "the burst's jobs being recorded submitted")
            results.jobs_recorded_s = time.perf_counter() - started
            results.statements = statements.summary()
        await read_times(connection, db_start, results)
    finally:
        stop.set()
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, timeout=30)
        await connection.close()
    return results


def burst_row(burst: BurstResults) -> Row:
    return Row(
        f"burst of {burst.jobs:,} jobs: first INSERT to a created provider batch",
        f"{burst.total_s:.2f} s",
        f"inserted {burst.insert_s:.2f} s, flush began {burst.recorded_s:.2f} s, create sent "
        f"{burst.create_started_s:.2f} s, answered {burst.created_s:.2f} s; its jobs recorded submitted "
        f"{burst.jobs_recorded_s:.2f} s",
        "",
        f"< {MAX_BURST_S:.0f} s",
        burst.total_s < MAX_BURST_S,
    )


def burst_failures(burst: BurstResults) -> list[str]:
    if burst.batch_jobs != burst.jobs or burst.batches != 1:
        return [f"the burst made {burst.batches} batch(es), the first of {burst.batch_jobs} jobs"]
    return []


async def main(args: argparse.Namespace) -> int:
    batchd_log.configure("warning")
    os.environ.setdefault("ANTHROPIC_API_KEY", API_KEY)  # the daemon insists on a key; the emulator takes any
    print(f"machine: {machine()}", flush=True)
    started = time.perf_counter()
    requests = build_requests(args.jobs)
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as log_dir:
        emulator = EmulatorProcess(Path(log_dir) / "emulator.log", processing_time_s=EMULATOR_PROCESSING_S)
        async with timing_database(args.database_url) as url, running(emulator):
            print(f"\n== a burst of {args.jobs:,} jobs into a running daemon", flush=True)
            burst = await burst_benchmark(url, emulator, requests)
            print(f"  the daemon's longest statements: {burst.statements}", flush=True)
    return finish(started, burst_failures(burst), [burst_row(burst)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs in the burst (default 100,000)")
    parser.add_argument(
        "--database-url", default=SERVER_URL, help="a server database to create the scratch one from"
    )
    arguments = parser.parse_args()
    if not 1_000 <= arguments.jobs <= 100_000:
        parser.error("--jobs must be between 1,000 and 100,000 (the API's limit per batch)")
    interrupt_on_sigterm()
    sys.exit(asyncio.run(main(arguments)))
