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
from pathlib import Path

from benchlib import SERVER_URL, machine, scratch_database

TARGET_S = 0.3


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    return time.perf_counter() - started


def measure(commands: dict[str, list[str]], url: str, runs: int) -> dict[str, list[float]]:
    """Every command `runs` times, in turns, after one run each to warm the file cache."""
    env = {**os.environ, "BATCHD_DATABASE__URL": url}
    for command in commands.values():  # the first run of each reads from disk
        timed(command, env)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            samples[name].append(timed(command, env))
    return samples


async def measure_on_scratch(commands: dict[str, list[str]], runs: int) -> dict[str, list[float]]:
    async with scratch_database(SERVER_URL, "batchd_bench_cli") as url:
        return await asyncio.to_thread(measure, commands, url, runs)


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
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "batchd --version": [batchd, "--version"],
        "batchd --help": [batchd, "--help"],
        "batchd status": [batchd, "status"],
        "batchd tenant list": [batchd, "tenant", "list"],
        "batchd report": [batchd, "report"],
    }
    if args.database_url:
        samples = measure(commands, args.database_url, args.runs)
    else:
        samples = asyncio.run(measure_on_scratch(commands, args.runs))

    print(f"machine: {machine()}")
    print(f"{args.runs} runs each, in turns; {sys.executable}")
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
