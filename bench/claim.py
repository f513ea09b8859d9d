"""What fair sharing costs the flusher's claim, against a plain FIFO claim run in the same session.

For each queue shape, on a scratch database with batchd's schema: the fair claim (store.claim: claim_urgent,
then claim_fair, as the flusher calls it) against the claim batchd had before it (one SKIP LOCKED select in
seq order), each claiming `--batch` jobs in a transaction that is rolled back, `--rounds` times, alternating.
It also checks the fair claim's share per tenant. Prints the median milliseconds and the ratio.

    .venv/bin/python bench/claim.py [--url postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
from benchlib import SERVER_URL, machine, scratch_database

from batchd import migrate, store
from batchd.config import RoutingSettings
from batchd.store import init_connection

# The claim batchd made before fair sharing (claim_queued at 584a1cd), for the baseline.
FIFO = """
SELECT id, tenant_id, request::text AS request, job_type, input::text AS input, attempts,
       batchd.request_problem(request) AS problem
  FROM batchd.jobs
 WHERE status = 'queued' AND id <> ALL($2::uuid[])
   AND tenant_id NOT IN (SELECT tenant_id FROM batchd.held_tenants)
 ORDER BY seq
 LIMIT $1
   FOR UPDATE SKIP LOCKED
"""

SHAPES: dict[str, list[tuple[str, int]]] = {
    "one tenant, 100,000 queued": [("solo", 100_000)],
    "100,000 + 10 (the issue's case)": [("dumper", 100_000), ("small", 10)],
    "100 tenants x 1,000": [(f"t{i:03}", 1_000) for i in range(100)],
}
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


async def fill(connection: asyncpg.Connection, shape: list[tuple[str, int]]) -> None:
    await connection.execute("TRUNCATE batchd.jobs CASCADE")
    # Interleaved, as producers would write them: the big tenant's rows are all through the table.
    for tenant, count in shape:
        await connection.execute(
            "INSERT INTO batchd.jobs (tenant_id, request)"
            " SELECT $1, jsonb_build_object('model', 'claude-haiku-4-5', 'max_tokens', 64,"
            "   'messages', jsonb_build_array("
            "     jsonb_build_object('role', 'user', 'content', repeat('x', 900) || i)))"
            "  FROM generate_series(1, $2) AS i",
            tenant,
            count,
        )
    await connection.execute("VACUUM ANALYZE batchd.jobs")


async def timed(
    connection: asyncpg.Connection, claim: Callable[[], Awaitable[list[Any]]]
) -> tuple[float, list[Any]]:
    transaction = connection.transaction()
    await transaction.start()
    try:
        started = time.perf_counter()
        rows = await claim()
        return (time.perf_counter() - started) * 1000, rows
    finally:
        await transaction.rollback()


async def main(url: str, batch: int, rounds: int, lookahead: float) -> None:
    print(f"machine: {machine()}")
    async with scratch_database(url, "batchd_bench_claim", prepare=None) as scratch:
        connection = await asyncpg.connect(scratch)
        await init_connection(connection)
        await migrate.migrate(connection)
        routing = store.Routing.from_settings(RoutingSettings())
        print(
            f"claim of {batch:,} jobs (cache_lookahead {lookahead}),"
            f" median of {rounds} rounds each, same session"
        )
        for label, shape in SHAPES.items():
            await fill(connection, shape)

            async def fair() -> list[Any]:
                window = round(batch * (1 + lookahead))
                claim = await store.claim(connection, batch, LONG_AGO, window, routing, whole=False)
                return claim.jobs

            async def fifo() -> list[Any]:
                return list(await connection.fetch(FIFO, batch, []))

            fair_ms: list[float] = []
            fifo_ms: list[float] = []
            shares: Counter[str] = Counter()
            for _ in range(rounds):
                ms, jobs = await timed(connection, fair)
                fair_ms.append(ms)
                shares = Counter(job.tenant_id for job in jobs)
                fifo_ms.append((await timed(connection, fifo))[0])
            fair_median, fifo_median = statistics.median(fair_ms), statistics.median(fifo_ms)
            top = ", ".join(f"{t} {n}" for t, n in shares.most_common(3)) + (
                " ..." if len(shares) > 3 else ""
            )
            print(
                f"  {label:34} fair {fair_median:7.1f} ms   fifo {fifo_median:7.1f} ms"
                f"   x{fair_median / fifo_median:4.2f}   fair shares: {top}"
            )
        await connection.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=SERVER_URL)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lookahead", type=float, default=1.0, help="batching.cache_lookahead")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.url, arguments.batch, arguments.rounds, arguments.lookahead))
