"""What the queue's history costs (flow.py): the apply statement with and without its turnaround tally, and
one sample of the queue by the size of the queue.

1. `apply_results` on a batch of N submitted jobs (results COPYed into its temporary table as the daemon
   does), in a transaction rolled back after each run, so every run applies the same jobs to the same
   pages: as shipped (the `turned` CTE adding each job's turnaround to batchd.turnaround_tallies) and with
   that CTE taken out of the text, in turns, for a number of rounds. Medians, with the range.
2. `sample_flow` with Q queued jobs over T tenants (the gate opened before each run), rolled back too.

    .venv/bin/python bench/flow_cost.py [--jobs 20000] [--rounds 7] [--queued 1000,100000] [--tenants 100]

Prints Markdown tables. Needs BATCHD_TEST_DATABASE_URL (a server where it may make a scratch database).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from benchlib import markdown, scratch_database, spread

from batchd.config import RoutingSettings
from batchd.pricing import PricingSettings
from batchd.results import publish_prices
from batchd.store import init_connection, sql

OWNER = "bench-flow"
USAGE = {"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 0}


def without_turnaround(statement: str) -> str:
    """apply_results as it was before the turnaround tally: the `turned` CTE and created_at taken out."""
    cut = re.sub(
        r"\), turned AS \(.*?\n\), job_events AS \(", "), job_events AS (", statement, flags=re.DOTALL
    )
    cut = cut.replace("j.created_at, r.result", "r.result")
    if cut == statement or "turnaround" in cut:
        raise SystemExit("apply_results no longer has the shape this bench cuts")
    return cut


async def prepare_batch(
    connection: asyncpg.Connection, jobs: int
) -> tuple[uuid.UUID, list[tuple[object, ...]]]:
    """N submitted jobs in one leased batch, made a minute to an hour ago; returns it and their results."""
    batch_id = await connection.fetchval(
        "INSERT INTO batchd.batches (tag, status, request_count, bytes, owner, lease_until)"
        " VALUES ('benchflow000', 'in_progress', $1, 0, $2, now() + interval '1 day') RETURNING id",
        jobs,
        OWNER,
    )
    ids = await connection.fetch(
        "INSERT INTO batchd.jobs (tenant_id, request, created_at)"
        " SELECT 't' || (i % 10), '{}'::jsonb, now() - make_interval(secs => 60 + i % 3600)"
        "   FROM generate_series(1, $1) AS i RETURNING id",
        jobs,
    )
    await connection.execute(
        "UPDATE batchd.jobs SET status = 'submitted', batch_id = $1 WHERE status = 'queued'", batch_id
    )
    result = json.dumps({"type": "message", "model": "claude-sonnet-4-5", "usage": USAGE})
    rows: list[tuple[object, ...]] = [(row["id"], "succeeded", result, None, None) for row in ids]
    await connection.execute("VACUUM ANALYZE batchd.jobs")
    return batch_id, rows


@contextlib.asynccontextmanager
async def results_copied(
    connection: asyncpg.Connection, rows: list[tuple[object, ...]]
) -> AsyncIterator[None]:
    """A transaction with the results COPYed into the apply's temporary table, rolled back at the end."""
    transaction = connection.transaction()
    await transaction.start()
    try:
        await connection.execute(sql("create_results_table"))
        await connection.copy_records_to_table(
            "batchd_results", records=rows, columns=["job_id", "outcome", "result", "error", "retry_in_s"]
        )
        yield
    finally:
        await transaction.rollback()


def apply_arguments(batch_id: uuid.UUID) -> tuple[object, ...]:
    return (batch_id, 3, PricingSettings().price_set, OWNER)


async def time_apply(
    connection: asyncpg.Connection, statement: str, batch_id: uuid.UUID, rows: list[tuple[object, ...]]
) -> float:
    """Seconds the apply statement alone takes (COPY before it untimed), rolled back."""
    async with results_copied(connection, rows):
        started = time.perf_counter()
        applied = await connection.fetchrow(statement, *apply_arguments(batch_id))
        took = time.perf_counter() - started
    if applied is None or applied["changed"] != len(rows):
        raise SystemExit(f"the apply changed {applied and applied['changed']} of {len(rows)} jobs")
    return took


def turnaround_node_ms(plan: dict[str, Any]) -> float | None:
    """The time of the plan's INSERT into batchd.turnaround_tallies, its input included (None: not there)."""
    if plan.get("Relation Name") == "turnaround_tallies":
        return float(plan["Actual Total Time"])
    for child in plan.get("Plans", []):
        found = turnaround_node_ms(child)
        if found is not None:
            return found
    return None


async def explain_apply(
    connection: asyncpg.Connection, statement: str, batch_id: uuid.UUID, rows: list[tuple[object, ...]]
) -> tuple[float, float]:
    """EXPLAIN ANALYZE of the apply: the statement's execution time and its turnaround tally's, in ms."""
    async with results_copied(connection, rows):
        explained = await connection.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, *apply_arguments(batch_id)
        )
    (plan,) = json.loads(explained)
    return float(plan["Execution Time"]), turnaround_node_ms(plan["Plan"]) or 0.0


async def time_sample(connection: asyncpg.Connection, queued: int, tenants: int) -> list[float]:
    routing = RoutingSettings()
    await connection.execute("DELETE FROM batchd.jobs")
    await connection.execute(
        "INSERT INTO batchd.jobs (tenant_id, request, created_at)"
        " SELECT 't' || (i % $2), '{}'::jsonb, now() - make_interval(secs => i % 600)"
        "   FROM generate_series(1, $1) AS i",
        queued,
        tenants,
    )
    await connection.execute("VACUUM ANALYZE batchd.jobs")
    times = []
    for _ in range(7):
        transaction = connection.transaction()
        await transaction.start()
        try:
            await connection.execute("UPDATE batchd.flow_clock SET sampled_at = '-infinity'")
            started = time.perf_counter()
            row = await connection.fetchrow(
                sql("sample_flow"), 1.0, routing.window, routing.min_samples, routing.prior_turnaround_s
            )
            times.append(time.perf_counter() - started)
            if row is None or not row["sampled"] or row["tenants"] != min(tenants, queued):
                raise SystemExit(f"the sample took {row and dict(row)}")
        finally:
            await transaction.rollback()
    return times


async def main(args: argparse.Namespace) -> int:
    server = os.environ.get("BATCHD_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    shipped = sql("apply_results")
    before = without_turnaround(shipped)
    async with scratch_database(server, "bench_flow") as url:
        connection = await asyncpg.connect(url)
        try:
            await init_connection(connection)
            await publish_prices(connection, PricingSettings())
            batch_id, rows = await prepare_batch(connection, args.jobs)
            await time_apply(connection, shipped, batch_id, rows)  # warm: pages and plans
            timings: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(args.rounds):
                for name, statement in (("before", before), ("after", shipped)):
                    timings[name].append(await time_apply(connection, statement, batch_id, rows))
            med = {name: statistics.median(values) for name, values in timings.items()}
            print(f"\n## apply_results on {args.jobs:,} jobs, {args.rounds} rounds in turns\n")
            print(
                markdown(
                    ["statement", "median (range)", "jobs/s (median)"],
                    [
                        [name, spread([v * 1000 for v in values], " ms"), f"{args.jobs / med[name]:,.0f}"]
                        for name, values in timings.items()
                    ],
                )
            )
            print(f"\nafter / before: {med['after'] / med['before']:.3f}")
            explained = [await explain_apply(connection, shipped, batch_id, rows) for _ in range(args.rounds)]
            share = [tally / whole for whole, tally in explained]
            tallies = spread([tally for _, tally in explained], " ms")
            wholes = spread([whole for whole, _ in explained], " ms")
            print(
                f"\nEXPLAIN ANALYZE of the shipped statement, {args.rounds} runs: the turnaround tally (its"
                f" INSERT and the grouping under it) {tallies} of {wholes}: {statistics.median(share):.1%}"
                " (median)"
            )
            print("\n## sample_flow by the queue's size\n")
            table = []
            for queued in args.queued:
                times = await time_sample(connection, queued, args.tenants)
                table.append(
                    [
                        f"{queued:,} over {min(args.tenants, queued)} tenants",
                        spread([t * 1000 for t in times], " ms"),
                    ]
                )
            print(markdown(["queued jobs", "sample_flow, median (range)"], table))
        finally:
            await connection.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--queued", type=lambda text: [int(part) for part in text.split(",")], default=[1_000, 100_000]
    )
    parser.add_argument("--tenants", type=int, default=100)
    sys.exit(asyncio.run(main(parser.parse_args())))
