"""How long `batchd` takes to answer, next to Python's own start.

    python bench/cli_start.py [--runs 10] [--database-url URL]

Runs each command `--runs` times as a fresh process (the console script of this environment's batchd) and
prints min / median / max wall time, with `python -c pass` measured in the same turns as the baseline. The
target: `batchd --version` and `batchd --help` answer within 0.3 s of Python's own start (median minus the
baseline's median). `status`, `tenant list` and `report` run against --database-url (a migrated batchd
database; one is made and dropped when not given) and are reported, without a target: they wait on the
database too. The commands run in turns (one of each, then again), so a burst of load on the machine
touches all of them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg

from batchd import migrate

TARGET_S = 0.3
SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    return time.perf_counter() - started


async def scratch_database() -> str:
    name = f"batchd_bench_cli_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(SERVER_URL)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    url = f"{SERVER_URL.rpartition('/')[0]}/{name}"
    connection = await asyncpg.connect(url)
    try:
        await migrate.migrate(connection)
    finally:
        await connection.close()
    return url


async def drop_database(url: str) -> None:
    admin = await asyncpg.connect(SERVER_URL)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {url.rpartition('/')[2]} WITH (FORCE)")
    finally:
        await admin.close()


def main() -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--database-url", help="a migrated batchd database (default: a scratch one)")
    args = parser.parse_args()

    batchd = shutil.which("batchd", path=str(Path(sys.executable).parent))
    if batchd is None:
        print("no batchd console script beside this Python: install batchd into this environment first")
        return 2
    url = args.database_url or asyncio.run(scratch_database())
    env = {**os.environ, "BATCHD_DATABASE__URL": url}
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "batchd --version": [batchd, "--version"],
        "batchd --help": [batchd, "--help"],
        "batchd status": [batchd, "status"],
        "batchd tenant list": [batchd, "tenant", "list"],
        "batchd report": [batchd, "report"],
    }
    try:
        for command in commands.values():  # warm the file cache: the first run of each reads from disk
            timed(command, env)
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, command in commands.items():
                samples[name].append(timed(command, env))
    finally:
        if args.database_url is None:
            asyncio.run(drop_database(url))

    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"{args.runs} runs each, in turns; load average before the verdict: {load}; {sys.executable}")
    print(f"{'command':<22}{'min':>9}{'median':>9}{'max':>9}{'median - python':>18}")
    baseline = statistics.median(samples["python -c pass"])
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:<22}{min(values):>8.3f}s{median:>8.3f}s{max(values):>8.3f}s{median - baseline:>17.3f}s")
    failed = [
        name
        for name in ("batchd --version", "batchd --help")
        if statistics.median(samples[name]) - baseline > TARGET_S
    ]
    verdict = "FAIL: " + ", ".join(failed) if failed else "pass"
    print(f"target: --version and --help within {TARGET_S} s of Python's own start: {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
