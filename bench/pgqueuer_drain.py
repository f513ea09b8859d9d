"""pgqueuer 1.6.0 draining N jobs of 1 KB with a no-op entrypoint (stage 5 of bench/pipeline.py): 5
consumers, batch size 500, the settings of its own drain benchmark (tools/benchmark.py in its repository:
one `PgQueuer` per asyncpg connection, mode=drain, uvloop). Its schema is installed with
`Queries.install()` in the given database, and removed afterwards.

    .venv/bin/python bench/pgqueuer_drain.py --database-url URL [--jobs 100000]

bench/pipeline.py runs it in a subprocess of its own, on its scratch database. Prints one JSON line: jobs,
done, seconds, remaining, logged. Needs pgqueuer (the `bench` extra: `.venv/bin/pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import asyncpg
from benchlib import build_requests

from batchd import log as batchd_log

PGQUEUER_CONSUMERS = 5
PGQUEUER_BATCH_SIZE = 500


async def drain(args: argparse.Namespace) -> dict[str, Any]:
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
        consumers = [
            PgQueuer(AsyncpgDriver(await asyncpg.connect(args.database_url)))
            for _ in range(PGQUEUER_CONSUMERS)
        ]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database-url", required=True, help="a migrated database to install pgqueuer in")
    parser.add_argument(
        "--jobs", type=int, default=100_000, help="jobs to enqueue and drain (default 100,000)"
    )
    args = parser.parse_args()
    batchd_log.configure("warning")
    try:
        import uvloop  # noqa: PLC0415 - pgqueuer's own benchmark runs on uvloop

        report = uvloop.run(drain(args))
    except ImportError:
        report = asyncio.run(drain(args))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
