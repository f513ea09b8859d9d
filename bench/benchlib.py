"""What the benchmark scripts share: the processes they start (the emulator, the daemon), scratch databases,
the description of the machine, a few statistics and the Markdown tables they print."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import string
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg

from batchd.config import Settings

SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"  # the server scratch databases are made on
API_KEY = "bench-key"  # the emulator takes any key; the daemon and the SDK insist on one
MIB = 1024 * 1024
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
T = TypeVar("T")


# -- small things ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def text_pool(rng: random.Random, size: int = 256 * 1024) -> str:
    """Random lowercase words: prompts are slices of it, so no two requests are (or compress) alike."""
    words: list[str] = []
    length = 0
    while length < size:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10)))
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


def per_s(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def spread(values: Sequence[float], unit: str = "", digits: int = 0) -> str:
    """The median and the range: "75,948 rows/s (69,529-80,787)", "7.70 s (7.12-8.03)" with `digits` 2."""
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:,.{digits}f}{unit} ({low:,.{digits}f}-{high:,.{digits}f})"


def rate_spread(count: int, seconds: Sequence[float], unit: str = " jobs/s") -> str:
    """The median rate and the range of rates of `count` items done in each of `seconds`."""
    return spread([per_s(count, s) for s in seconds], unit)


def seconds_spread(seconds: Sequence[float]) -> str:
    """The median time and the range: "7.70 s (7.12-8.03)"; one value alone when there was one round."""
    if len(seconds) == 1:
        return f"{seconds[0]:.2f} s"
    return spread(seconds, " s", 2)


def in_turns(round_number: int, sides: Sequence[T]) -> list[T]:
    """The sides of a comparison in round `round_number`'s order: as given in even rounds, reversed in odd
    ones, so that whatever the first side leaves behind (dirty pages, a warm cache, a grown table) falls on
    each side alike over the rounds."""
    return list(sides) if round_number % 2 == 0 else list(reversed(sides))


def speed_ratio(ours_s: Sequence[float], theirs_s: Sequence[float]) -> float:
    """How many times the baseline's speed batchd's is, on the medians: the baseline's median time over
    batchd's, for the same work."""
    ours = statistics.median(ours_s)
    return statistics.median(theirs_s) / ours if ours > 0 else 0.0


def status_mib(pid: int | str, key: str) -> float:
    """A memory line of /proc/PID/status (VmRSS, VmHWM), in MiB; `pid` may be "self". NaN when the process
    is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return math.nan
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024 / MIB  # the kernel reports kB
    return math.nan


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    """A Markdown table, ready to paste into docs/benchmarks.md; `align` defaults to a left-aligned first
    column and right-aligned numbers."""
    rule = list(align) if align is not None else ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join("| " + " | ".join(line) + " |" for line in [list(header), rule, *map(list, rows)])


# -- the machine -------------------------------------------------------------------------------------------


def machine() -> str:
    """Cores, memory, load, and the versions the numbers depend on: the header of every report."""
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    load = load_average()
    versions = ", ".join(f"{name} {_version(name)}" for name in ("anthropic", "aiohttp", "asyncpg"))
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory_kb / 1024 / 1024:.1f} GiB RAM, load average {load}, "
        f"Linux {platform.release()}, Python {platform.python_version()}, {versions}"
    )


def load_average() -> str:
    """The machine's load over 1, 5 and 15 minutes: others' work shares its cores with the benchmark."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


class LoadLog:
    """The machine's load average at the start of a run, between its stages and at its end: printed as it
    goes, and summed up in a row of the table, so that a run's numbers come with the load they ran under."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def mark(self, when: str) -> None:
        self.marks.append((when, os.getloadavg()[0]))
        print(f"load average {when}: {load_average()}", flush=True)

    def row(self) -> Row:
        ones = [load for _, load in self.marks]
        return Row(
            "the machine's load average over 1 minute: at the start, between stages, at the end",
            " -> ".join(f"{load:.1f}" for load in ones),
            f"{', '.join(when for when, _ in self.marks)}",
            f"max {max(ones):.1f}" if ones else "",
            "",
            None,
        )


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(not installed)"


# -- scratch databases -------------------------------------------------------------------------------------


def database_url(server_url: str, name: str) -> str:
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


async def admin_execute(server_url: str, statement: str) -> None:
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def migrate_in_process(url: str) -> None:
    """batchd's schema, by `batchd.migrate` in this process."""
    from batchd import migrate  # noqa: PLC0415 - only the scripts that migrate this way pay for the import

    connection = await asyncpg.connect(url)
    try:
        await migrate.migrate(connection)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def scratch_database(
    server_url: str, prefix: str, prepare: Callable[[str], Awaitable[None]] | None = migrate_in_process
) -> AsyncIterator[str]:
    """A fresh database on the server, `prepare`d (migrated, by default), dropped however the block ends."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await admin_execute(server_url, f'CREATE DATABASE "{name}"')
    try:
        url = database_url(server_url, name)
        if prepare is not None:
            await prepare(url)
        yield url
    finally:
        await admin_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- processes ---------------------------------------------------------------------------------------------


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


class ServiceProcess:
    """A batchd command in a subprocess that serves HTTP (`batchd emulator`, `batchd run`), its output kept in
    a log file for when something goes wrong; started once `ready_path` answers 200."""

    name = "the process"
    ready_path = "/"

    def __init__(
        self,
        command: list[str],
        log_path: Path,
        url: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.command = command
        self.log_path = log_path
        self.url = url
        self.env = env
        self.cwd = cwd
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("wb") as log:
            return subprocess.Popen(  # noqa: S603
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
            )

    async def start(self) -> None:
        self._process = self._spawn()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self._process.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"{self.url}{self.ready_path}") as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} was not ready within {STARTUP_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.1)

    def terminate(self) -> float:
        """SIGTERM, as systemd stops it (SIGKILL if it lingers); returns how long it took to exit."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return 0.0
        started = time.monotonic()
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return time.monotonic() - started

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)


class EmulatorProcess(ServiceProcess):
    """`batchd emulator`."""

    name = "the emulator"
    ready_path = "/_emulator/stats"

    def __init__(self, log_path: Path, *, processing_time_s: float, port: int | None = None) -> None:
        self.port = port or free_port()
        self.processing_time_s = processing_time_s
        command = [sys.executable, "-m", "batchd", "emulator", "--port", str(self.port)]
        command += ["--processing-time", str(processing_time_s)]
        super().__init__(command, log_path, f"http://127.0.0.1:{self.port}")

    def stop(self) -> None:
        self.terminate()

    async def admin(self, method: str, path: str, payload: Any = None) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"{self.url}/_emulator/{path}", json=payload) as response,
        ):
            response.raise_for_status()
            return await response.json()

    async def end_all_batches(self) -> None:
        """Push the emulated clock past every batch's processing time."""
        await self.admin("POST", "clock/advance", {"seconds": self.processing_time_s * 10 + 5})

    async def api(self, method: str, path: str) -> Any:
        """A call to the emulated Message Batches API (`path` under /v1/messages/batches), as a client makes
        it."""
        async with (
            aiohttp.ClientSession(headers=api_headers()) as session,
            session.request(method, f"{self.url}/v1/messages/batches{path}") as response,
        ):
            response.raise_for_status()
            return await response.json()

    async def wait_ended(self, provider_batch_id: str, within_s: float = 60.0) -> None:
        """Polls the batch until the API says it has ended (after `end_all_batches`)."""
        deadline = time.monotonic() + within_s
        while (await self.api("GET", f"/{provider_batch_id}"))["processing_status"] != "ended":
            if time.monotonic() > deadline:
                raise RuntimeError(f"batch {provider_batch_id} did not end within {within_s:.0f} s")
            await asyncio.sleep(0.05)

    async def delete_batches(self, provider_batch_ids: Sequence[str]) -> None:
        """DELETE ended batches, as the real API allows: the emulator's memory then does not grow with the
        rounds of a benchmark."""
        for provider_batch_id in provider_batch_ids:
            await self.api("DELETE", f"/{provider_batch_id}")


def api_headers() -> dict[str, str]:
    return {"x-api-key": API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}


@contextlib.asynccontextmanager
async def running(emulator: EmulatorProcess) -> AsyncIterator[EmulatorProcess]:
    """The emulator started, and stopped however the block ends; its last lines printed if the block fails."""
    print(f"emulator: {shlex.join(emulator.command)}", flush=True)
    try:
        await emulator.start()
        yield emulator
    except BaseException:
        print(f"emulator output (last lines):\n{emulator.log_tail()}", file=sys.stderr)
        raise
    finally:
        emulator.stop()


class DaemonProcess(ServiceProcess):
    """`batchd run`, configured by the environment only (run in an empty directory, so no batchd.toml is
    read)."""

    name = "the daemon"
    ready_path = "/readyz"

    def __init__(self, log_path: Path, workdir: Path, env: dict[str, str], port: int) -> None:
        command = [sys.executable, "-m", "batchd", "--log-level", "warning", "run"]
        super().__init__(command, log_path, f"http://127.0.0.1:{port}", env=env, cwd=workdir)

    async def stop(self) -> float:
        """Returns how long it took to exit, without blocking the event loop meanwhile."""
        return await asyncio.to_thread(self.terminate)


async def run_json_child(script: str, args: list[str], timeout_s: float) -> dict[str, Any]:
    """A bench script in a subprocess of its own (its memory its own, its imports too); the last line of its
    output is a JSON report."""
    command = [sys.executable, script, *args]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
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


# -- where the time goes: each statement as the driver saw it ----------------------------------------------


class StatementTimes:
    """The time each of batchd's named queries (store.QUERIES) took, as the driver saw it (from sending it to
    its last row decoded), on every connection batchd opens while `watching()`."""

    def __init__(self) -> None:
        from batchd import store  # noqa: PLC0415 - only the scripts that watch statements pay for the import

        self._names = {text: name for name, text in store.QUERIES.items()}
        self.seconds: dict[str, float] = {}
        self.calls: Counter[str] = Counter()

    def _log(self, record: asyncpg.connection.LoggedQuery) -> None:
        name = self._names.get(record.query, "(not batchd's)")
        self.seconds[name] = self.seconds.get(name, 0.0) + record.elapsed
        self.calls[name] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    @contextlib.contextmanager
    def watching(self) -> Iterator[StatementTimes]:
        """Every connection batchd's store opens meanwhile (its pools', its listener's) reports here."""
        from batchd import store  # noqa: PLC0415

        original = store.init_connection

        async def init_and_watch(connection: asyncpg.Connection) -> None:
            await original(connection)
            connection.add_query_logger(self._log)

        store.init_connection = init_and_watch
        try:
            yield self
        finally:
            store.init_connection = original

    def summary(self, top: int = 8) -> str:
        """The statements that took longest, with their calls: "claim_all 1.23 s (1), ..."."""
        longest = sorted(self.seconds.items(), key=lambda item: -item[1])[:top]
        return ", ".join(f"{name} {seconds:.2f} s ({self.calls[name]})" for name, seconds in longest)


# -- verdicts ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of a benchmark's verdict table: batchd's figure next to its baseline, and the target."""

    measure: str
    batchd: str
    baseline: str
    comparison: str
    target: str
    ok: bool | None  # None: for information, no target


def verdict_table(rows: list[Row]) -> str:
    header = ["measure", "batchd", "baseline", "comparison", "target", "verdict"]
    align = ["---", "---:", "---:", "---:", "---", "---"]
    return markdown(
        header,
        [
            [row.measure, row.batchd, row.baseline, row.comparison, row.target, _verdict(row.ok)]
            for row in rows
        ],
        align,
    )


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


def finish(started: float, failures: list[str], rows: list[Row]) -> int:
    """Prints the table and the verdict; the exit status."""
    print("\n" + verdict_table(rows))
    elapsed = time.perf_counter() - started
    print(
        f"\nthis process's peak VmHWM: {status_mib('self', 'VmHWM'):.0f} MiB; the whole run: {elapsed:.0f} s"
    )
    missed = [f"target: {row.measure}" for row in rows if row.ok is False]
    if failures or missed:
        print("\nFAILED:\n" + "\n".join([*(f"check: {f}" for f in failures), *missed]))
        return 1
    print("\nall targets met, all checks passed")
    return 0


# -- the queue the pipeline benchmarks fill ----------------------------------------------------------------

MODEL = "claude-sonnet-4-5"
REQUEST_BYTES = 1_000  # the raw request's JSON, as the producer writes it
CHUNK_ROWS = 1_000  # rows per bulk INSERT statement
STEADY_WAKE_SEQ = 1 << 62  # "wake me at a job number far ahead": the trigger never notifies
INSERT_CHUNK = (
    "INSERT INTO batchd.jobs (tenant_id, request) SELECT 'bench', r::jsonb FROM unnest($1::text[]) AS r"
)
INSERT_TENANTS_CHUNK = (
    "INSERT INTO batchd.jobs (tenant_id, request)"
    " SELECT t, r::jsonb FROM unnest($1::text[], $2::text[]) AS q (r, t)"
)
# The claim batchd is measured against: one UPDATE ... FROM a FOR UPDATE SKIP LOCKED CTE in seq order.
RAW_BATCH = "INSERT INTO batchd.batches (tag, request_count, bytes) VALUES ($1, $2, 0) RETURNING id"
RAW_CLAIM = """
WITH c AS (
    SELECT id FROM batchd.jobs WHERE status = 'queued' ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED
)
UPDATE batchd.jobs AS j SET status = 'submitting', batch_id = $1 FROM c WHERE j.id = c.id
RETURNING j.id, j.request
"""
RESET = (
    "TRUNCATE batchd.jobs, batchd.batches, batchd.batch_tenants, batchd.events, batchd.tenant_event_log"
    " RESTART IDENTITY;"
    "UPDATE batchd.event_log SET published_seq = 0;"
    "UPDATE batchd.wakeup SET armed = true, wake_seq = 0"
)


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


async def migrate_for_timing(url: str) -> None:
    """batchd's schema, with autovacuum off on the jobs: a vacuum waking in the middle of a timed run is
    noise, the same for batchd and the baselines, so the benchmarks vacuum and analyze before each timed
    step instead (`settle`)."""
    await migrate_in_process(url)
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("ALTER TABLE batchd.jobs SET (autovacuum_enabled = false)")
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def timing_database(server_url: str) -> AsyncIterator[str]:
    """A scratch database for the pipeline benchmarks (`migrate_for_timing`), its server described."""
    async with scratch_database(server_url, "batchd_bench", migrate_for_timing) as url:
        print(await describe_server(url), flush=True)
        print(f"scratch database: {url}", flush=True)
        yield url


async def settle(connection: asyncpg.Connection) -> None:
    await connection.execute("VACUUM (ANALYZE) batchd.jobs")
    await connection.execute("CHECKPOINT")


async def fresh_queue(
    connection: asyncpg.Connection, chunks: list[list[str]], tenants: list[list[str]] | None = None
) -> None:
    """Empties the tables, enqueues the jobs (trigger enabled, daemon busy), vacuums and checkpoints: every
    timed step on a queue starts from the same state. `tenants`: each job's, chunk by chunk (else 'bench')."""
    await connection.execute(RESET)
    await connection.execute("ALTER TABLE batchd.jobs ENABLE TRIGGER jobs_inserted")
    await connection.execute("UPDATE batchd.wakeup SET armed = false, wake_seq = $1", STEADY_WAKE_SEQ)
    for i, chunk in enumerate(chunks):
        if tenants is None:
            await connection.execute(INSERT_CHUNK, chunk)
        else:
            await connection.execute(INSERT_TENANTS_CHUNK, chunk, tenants[i])
    await settle(connection)


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


def _interrupt(signum: int, frame: object) -> None:  # noqa: ARG001
    raise KeyboardInterrupt  # so that SIGTERM, too, stops the processes and drops the database


def interrupt_on_sigterm() -> None:
    """Prints the command line, and makes SIGTERM end the run as Ctrl-C does: through every `finally`."""
    print("$ " + shlex.join([sys.executable, *sys.argv]), flush=True)
    signal.signal(signal.SIGTERM, _interrupt)


# -- the options every pipeline benchmark takes ------------------------------------------------------------


def add_common_arguments(
    parser: argparse.ArgumentParser, jobs_help: str = "jobs in the queue and the batch (default 100,000)"
) -> None:
    parser.add_argument("--jobs", type=int, default=100_000, help=jobs_help)
    parser.add_argument(
        "--database-url", default=SERVER_URL, help="a server database to create the scratch one from"
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, *rounds: str) -> None:
    """--jobs within what a batch holds; each option named in `rounds` at least 1."""
    if not 1_000 <= args.jobs <= 100_000:
        parser.error("--jobs must be between 1,000 and 100,000 (the API's limit per batch)")
    for name in rounds:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first line of the script's docstring."""
    return argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)


MAX_BYTES = 256_000_000


def bench_settings(url: str, emulator_url: str, max_requests: int) -> Settings:
    """The daemon's settings for the pipeline benchmarks: a batch of `max_requests` is made by count alone."""
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
