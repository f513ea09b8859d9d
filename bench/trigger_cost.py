"""Producers' INSERTs by the state of the `jobs_inserted` trigger (stage 1 of bench/pipeline.py).

Four states: disabled (the baseline); steady (a busy daemon: not armed, `wake_seq` far ahead); armed (an idle
daemon: the first insert notifies, and a stand-in daemon listening on the channel disarms the trigger with
batchd's own `set_wakeup`, as the flusher does when it wakes); and stuck (armed, never disarmed: every insert
notifies, the worst case, shown without a target). Two shapes: bulk INSERT ... SELECT FROM unnest() of 1,000
rows a statement, and 8 producers each committing one row per transaction. Short timed slices, the modes
taking turns for a number of rounds; medians are reported, with the range.

    .venv/bin/python bench/trigger_cost.py [--jobs 100000] [--rounds 8] [--producer-seconds 0.5]

On its own, on a scratch database made for it and dropped afterwards; bench/pipeline.py runs it as its
first stage. Prints a Markdown table with a verdict per target, and exits non-zero when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field

import asyncpg
from benchlib import (
    CHUNK_ROWS,
    INSERT_CHUNK,
    REQUEST_BYTES,
    RESET,
    STEADY_WAKE_SEQ,
    Row,
    add_common_arguments,
    bench_parser,
    build_requests,
    check_arguments,
    chunked,
    finish,
    interrupt_on_sigterm,
    machine,
    per_s,
    spread,
    timing_database,
)

from batchd import log as batchd_log
from batchd.store import sql

PRODUCERS = 8
MAX_TRIGGER_OVERHEAD = 0.10
INSERT_ONE = "INSERT INTO batchd.jobs (tenant_id, request) VALUES ('bench', $1::jsonb)"


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
                    spread(runs[mode], " rows/s"),
                    f"trigger disabled: {spread(runs['off'], ' rows/s')}",
                    f"{overhead * 100:+.1f} % cost",
                    f"< {MAX_TRIGGER_OVERHEAD * 100:.0f} %" if targeted else "(worst case, no target)",
                    overhead < MAX_TRIGGER_OVERHEAD if targeted else None,
                )
            )
    return rows


def describe(args: argparse.Namespace) -> str:
    return (
        f"producers' INSERTs of {REQUEST_BYTES:,} B requests, by trigger mode: {args.rounds} rounds "
        f"of a bulk slice ({SLICE_STATEMENTS * CHUNK_ROWS:,} rows) and of {PRODUCERS} producers for "
        f"{args.producer_seconds:g} s"
    )


async def main(args: argparse.Namespace) -> int:
    batchd_log.configure("warning")
    print(f"machine: {machine()}", flush=True)
    started = time.perf_counter()
    requests = build_requests(args.jobs)
    async with timing_database(args.database_url) as url:
        print(f"\n== {describe(args)}", flush=True)
        inserts = await insert_benchmark(url, requests, args.rounds, args.producer_seconds)
        print(f"  notifications heard: {inserts.notifications}", flush=True)
    return finish(started, [], insert_rows(inserts))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument(
        "--rounds", type=int, default=8, help="timed slices of each INSERT mode, taking turns (default 8)"
    )
    parser.add_argument(
        "--producer-seconds",
        type=float,
        default=0.5,
        help=f"length of each timed slice of the {PRODUCERS} producers (default 0.5)",
    )


if __name__ == "__main__":
    parser = bench_parser(__doc__)
    add_arguments(parser)
    arguments = parser.parse_args()
    check_arguments(parser, arguments, "rounds")
    interrupt_on_sigterm()
    sys.exit(asyncio.run(main(arguments)))
