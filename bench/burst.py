"""A burst of N jobs into a running daemon (stage 4 of bench/pipeline.py): statements of 1,000 rows into
`batchd.daemon.Daemon` (max_requests N, max_wait_s an hour, so the count threshold triggers), timed from the
first INSERT until the batch has its provider_batch_id, and until its jobs are recorded submitted; with the
daemon's longest statements meanwhile (benchlib.StatementTimes). A number of rounds, each on emptied tables
with a daemon of its own; the verdict is on the median, the range shown, each step's time the median of its
rounds. After each round the batch is ended and deleted from the emulator, so its memory does not grow.

    .venv/bin/python bench/burst.py [--jobs 100000] [--rounds 3]

On its own, on a scratch database made for it and dropped afterwards, with the emulator in a subprocess;
bench/pipeline.py runs it as its fourth stage. Exits non-zero when the target is missed or the burst did not
make one batch of every job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
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
    EmulatorProcess,
    Row,
    StatementTimes,
    add_common_arguments,
    bench_parser,
    bench_settings,
    build_requests,
    check_arguments,
    chunked,
    finish,
    interrupt_on_sigterm,
    machine,
    running,
    seconds_spread,
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
    provider_batch_id: str = ""
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
        "SELECT created_at, create_attempted_at, submitted_at, request_count, provider_batch_id"
        " FROM batchd.batches WHERE provider_batch_id IS NOT NULL"
    )
    assert row is not None
    results.provider_batch_id = row["provider_batch_id"]
    results.recorded_s = (row["created_at"] - db_start).total_seconds()
    results.create_started_s = (row["create_attempted_at"] - db_start).total_seconds()
    results.created_s = (row["submitted_at"] - db_start).total_seconds()
    results.batch_jobs = row["request_count"]
    results.batches = await connection.fetchval("SELECT count(*) FROM batchd.batches")


async def burst_benchmark(
    url: str, emulator: EmulatorProcess, requests: list[str], rounds: int
) -> list[BurstResults]:
    """`rounds` bursts, each on emptied tables into a daemon of its own; each batch is ended and deleted from
    the emulator after its round."""
    bursts = []
    for round_number in range(rounds):
        burst = await burst_round(url, emulator, requests)
        bursts.append(burst)
        print(
            f"  round {round_number + 1}: created {burst.total_s:.2f} s (inserted {burst.insert_s:.2f} s),"
            f" its jobs recorded submitted {burst.jobs_recorded_s:.2f} s;"
            f" the daemon's longest statements: {burst.statements}",
            flush=True,
        )
        await emulator.end_all_batches()
        await emulator.wait_ended(burst.provider_batch_id)
        await emulator.delete_batches([burst.provider_batch_id])
    return bursts


async def burst_round(url: str, emulator: EmulatorProcess, requests: list[str]) -> BurstResults:
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


def burst_row(bursts: list[BurstResults]) -> Row:
    def median(step: str) -> float:
        return statistics.median(float(getattr(burst, step)) for burst in bursts)

    total = [burst.total_s for burst in bursts]
    rounds = f", median of {len(bursts)}" if len(bursts) > 1 else ""
    return Row(
        f"burst of {bursts[0].jobs:,} jobs: first INSERT to a created provider batch{rounds}",
        seconds_spread(total),
        f"(medians) inserted {median('insert_s'):.2f} s, flush began {median('recorded_s'):.2f} s, "
        f"create sent {median('create_started_s'):.2f} s, answered {median('created_s'):.2f} s; "
        f"its jobs recorded submitted {median('jobs_recorded_s'):.2f} s",
        "",
        f"< {MAX_BURST_S:.0f} s",
        statistics.median(total) < MAX_BURST_S,
    )


def burst_failures(bursts: list[BurstResults]) -> list[str]:
    return [
        f"burst round {i + 1}: {burst.batches} batch(es), the first of {burst.batch_jobs} jobs"
        for i, burst in enumerate(bursts)
        if burst.batch_jobs != burst.jobs or burst.batches != 1
    ]


async def main(args: argparse.Namespace) -> int:
    batchd_log.configure("warning")
    os.environ.setdefault("ANTHROPIC_API_KEY", API_KEY)  # the daemon insists on a key; the emulator takes any
    print(f"machine: {machine()}", flush=True)
    started = time.perf_counter()
    requests = build_requests(args.jobs)
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as log_dir:
        emulator = EmulatorProcess(Path(log_dir) / "emulator.log", processing_time_s=EMULATOR_PROCESSING_S)
        async with timing_database(args.database_url) as url, running(emulator):
            print(
                f"\n== a burst of {args.jobs:,} jobs into a running daemon, {args.rounds} rounds", flush=True
            )
            bursts = await burst_benchmark(url, emulator, requests, args.rounds)
    return finish(started, burst_failures(bursts), [burst_row(bursts)])


if __name__ == "__main__":
    parser = bench_parser(__doc__)
    add_common_arguments(parser, "jobs in the burst (default 100,000)")
    parser.add_argument("--rounds", type=int, default=3, help="bursts, each into a daemon of its own (3)")
    arguments = parser.parse_args()
    check_arguments(parser, arguments, "rounds")
    interrupt_on_sigterm()
    sys.exit(asyncio.run(main(arguments)))
