"""The flusher's claim path where there is something to share, beside the FIFO case: `Flusher.flush_one()`
(claim, encode, record) next to the raw claim on the same queue, in turns, for three queues of about
100,000 jobs of ~1 KB (a batch of up to 100,000):

- one tenant, 100,000 jobs: the FIFO case (bench/pipeline.py's stage 2, here in turns);
- 100 tenants x 1,000 jobs, interleaved as 100 producers would write them: every job fits, fairness has
  nothing to decide;
- 100,000 + 10: one tenant's 100,000, then another's 10, one job more than a batch holds: the fair pick
  decides which of the big tenant's wait (its last 10), and the small tenant's 10 go.

Each round queues the shape afresh (vacuumed, checkpointed) for batchd, then for the raw claim (one UPDATE
... FROM a FOR UPDATE SKIP LOCKED CTE in seq order, RETURNING each job's request), the order of the two
swapped every round. batchd's flush is timed as the daemon runs it: queue_head (its look at the queue), then
flush_one with that head; queue_head's time is reported apart. The verdict is on the medians' ratio; every
round is checked (one batch of the most a batch holds, every small tenant's job in it).

    .venv/bin/python bench/fair.py [--rounds 5] [--jobs 100000]

On its own, on a scratch database made for it and dropped afterwards; bench/pipeline.py runs it as stage
2b. Exits non-zero when a target is missed or a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg
from benchlib import (
    API_KEY,
    CHUNK_ROWS,
    RAW_BATCH,
    RAW_CLAIM,
    Row,
    StatementTimes,
    add_common_arguments,
    bench_parser,
    bench_settings,
    build_requests,
    check_arguments,
    finish,
    fresh_queue,
    in_turns,
    interrupt_on_sigterm,
    load_average,
    machine,
    rate_spread,
    speed_ratio,
    timing_database,
)

from batchd import log as batchd_log
from batchd import store
from batchd.context import Context
from batchd.flusher import Flusher
from batchd.provider import Provider
from batchd.ratelimit import RateLimiter

MIN_RAW_RATIO = 0.5  # as every claim-path stage: at least half the speed of its raw SQL
SMALL = 10  # the small tenant's jobs in the 100,000 + 10 queue


@dataclass
class Shape:
    label: str
    rows: list[tuple[str, str]]  # (tenant, request), in the order producers wrote them
    small_tenant: str | None = None  # whose every job must be in the batch


@dataclass
class ShapeResults:
    shape: Shape
    batch: int
    flush_s: list[float] = field(default_factory=list)
    head_s: list[float] = field(default_factory=list)
    raw_s: list[float] = field(default_factory=list)
    statements: str = ""  # batchd's longest statements over its rounds (benchlib.StatementTimes)


def shapes(requests: list[str]) -> list[Shape]:
    n = len(requests)
    tenants = 100
    per_tenant = n // tenants
    # 100 producers at once: each chunk of 1,000 holds 10 of each tenant's jobs.
    interleaved = [
        (f"tenant-{j % tenants:03}", requests[(j % tenants) * per_tenant + j // tenants])
        for j in range(tenants * per_tenant)
    ]
    return [
        Shape(f"one tenant, {n:,} jobs (FIFO)", [("solo", request) for request in requests]),
        Shape(f"{tenants} tenants x {per_tenant:,} jobs, interleaved", interleaved),
        Shape(
            f"{n:,} + {SMALL}: one tenant's, then another's",
            [("big", request) for request in requests] + [("small", request) for request in requests[:SMALL]],
            small_tenant="small",
        ),
    ]


async def fill(connection: asyncpg.Connection, shape: Shape) -> None:
    chunks = [shape.rows[i : i + CHUNK_ROWS] for i in range(0, len(shape.rows), CHUNK_ROWS)]
    await fresh_queue(
        connection,
        [[request for _, request in chunk] for chunk in chunks],
        tenants=[[tenant for tenant, _ in chunk] for chunk in chunks],
    )


async def batchd_round(
    connection: asyncpg.Connection, ctx: Context, shape: Shape, results: ShapeResults
) -> list[str]:
    """One flush as the daemon makes it; returns the tenants of the batch's jobs."""
    await fill(connection, shape)
    flusher = Flusher(ctx, on_batch=lambda _batch_id, _body: None)
    started = time.perf_counter()
    head = await store.queue_head(ctx.pool, ctx.settings.batching.max_requests + 1, flusher.routing)
    results.head_s.append(time.perf_counter() - started)
    started = time.perf_counter()
    flushed = await flusher.flush_one(head)
    results.flush_s.append(time.perf_counter() - started)
    if flushed.batch_id is None:
        raise RuntimeError(f"the flusher made no batch of {shape.label}: {flushed}")
    rows = await connection.fetch("SELECT tenant_id FROM batchd.jobs WHERE batch_id = $1", flushed.batch_id)
    return [row["tenant_id"] for row in rows]


async def raw_round(connection: asyncpg.Connection, shape: Shape, batch: int, results: ShapeResults) -> int:
    await fill(connection, shape)
    started = time.perf_counter()
    async with connection.transaction():
        batch_id: UUID = await connection.fetchval(RAW_BATCH, uuid.uuid4().hex[:12], batch)
        rows = await connection.fetch(RAW_CLAIM, batch_id, batch)
    results.raw_s.append(time.perf_counter() - started)
    return len(rows)


async def fair_benchmark(url: str, requests: list[str], rounds: int) -> tuple[list[ShapeResults], list[str]]:
    """Every shape, `rounds` times each side, in turns."""
    batch = len(requests)
    failures: list[str] = []
    measured = []
    statements = StatementTimes()
    connection = await asyncpg.connect(url)
    with statements.watching():  # batchd's pool reports its statements; the raw side's connection does not
        pool = await store.create_pool(url, min_size=2, max_size=4)
    provider = Provider(API_KEY, base_url="http://127.0.0.1:9", limiter=RateLimiter(6000), timeout_s=10)
    ctx = Context(pool=pool, settings=bench_settings(url, "http://127.0.0.1:9", batch), provider=provider)
    try:
        for shape in shapes(requests):
            results = ShapeResults(shape, batch)
            measured.append(results)
            statements.reset()
            print(f"  {shape.label}", flush=True)
            for round_number in range(rounds):
                for side in in_turns(round_number, ("batchd", "raw")):
                    if side == "raw":
                        claimed = await raw_round(connection, shape, batch, results)
                        if claimed != batch:
                            failures.append(f"{shape.label}: the raw claim took {claimed:,}, not {batch:,}")
                    else:
                        tenants = Counter(await batchd_round(connection, ctx, shape, results))
                        failures += batch_failures(shape, batch, tenants)
                print(
                    f"    round {round_number + 1}: flush {results.flush_s[-1]:.2f} s"
                    f" (queue_head {results.head_s[-1]:.2f} s before it),"
                    f" raw claim {results.raw_s[-1]:.2f} s",
                    flush=True,
                )
            results.statements = statements.summary(6)
    finally:
        await provider.close()
        await pool.close()
        await connection.close()
    return measured, failures


def batch_failures(shape: Shape, batch: int, tenants: Counter[str]) -> list[str]:
    failures = []
    if sum(tenants.values()) != batch:
        failures.append(f"{shape.label}: batchd's batch held {sum(tenants.values()):,} jobs, not {batch:,}")
    if shape.small_tenant is not None and tenants[shape.small_tenant] != SMALL:
        small = tenants[shape.small_tenant]
        failures.append(f"{shape.label}: {small} of the small tenant's {SMALL} jobs in the batch")
    return failures


def fair_rows(measured: list[ShapeResults]) -> list[Row]:
    rows = []
    for results in measured:
        ratio = speed_ratio(results.flush_s, results.raw_s)
        rows.append(
            Row(
                f"claim + encode + record (Flusher.flush_one), {results.shape.label}",
                rate_spread(results.batch, results.flush_s),
                f"raw claim: {rate_spread(results.batch, results.raw_s)}",
                f"{ratio:.2f}x",
                f">= {MIN_RAW_RATIO:.1f}x",
                ratio >= MIN_RAW_RATIO,
            )
        )
    return rows


async def main(args: argparse.Namespace) -> int:
    batchd_log.configure("warning")
    os.environ.setdefault("ANTHROPIC_API_KEY", API_KEY)
    print(f"machine: {machine()}", flush=True)
    started = time.perf_counter()
    requests = build_requests(args.jobs)
    async with timing_database(args.database_url) as url:
        print(f"\n== the claim path by queue shape: batches of {args.jobs:,}, {args.rounds} rounds")
        measured, failures = await fair_benchmark(url, requests, args.rounds)
    for results in measured:
        print(f"  {results.shape.label}: batchd's longest statements over its rounds: {results.statements}")
    print(f"load average at the end: {load_average()}")
    return finish(started, failures, fair_rows(measured))


if __name__ == "__main__":
    parser = bench_parser(__doc__)
    add_common_arguments(parser, "jobs per queue, and per batch (100,000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each side per shape (5)")
    arguments = parser.parse_args()
    check_arguments(parser, arguments, "rounds")
    interrupt_on_sigterm()
    sys.exit(asyncio.run(main(arguments)))
