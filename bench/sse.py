"""batchd's SSE endpoint (`GET /v1/events`) with 1,000 connected clients: commit-to-arrival latency, events
delivered per second, and the daemon's memory and CPU while it serves them.

One run, on a scratch database made for it (`batchd migrate`) and dropped afterwards, with `batchd emulator`
and `batchd run` as subprocesses (stopped however the run ends):

- The daemon is configured through the environment (BATCHD_*): max_wait_s an hour and max_requests 100,000,
  so the jobs the benchmark inserts stay queued; a per-tenant stream limit above the clients per tenant.
- The clients are aiohttp streams (one ClientSession, TCPConnector(limit=0)) parsed with
  `batchd.client.messages`, spread round-robin over tenants (`tenants.add_tenant`) and over client worker
  processes (this script again, `--child clients`), so parsing 1,000 streams does not run on one core.
  A worker stamps each event with time.time() when the chunk holding its last byte was read.
- An event is made as a producer makes one: a queued job is canceled (`SELECT batchd.cancel_job($1)`, or one
  UPDATE for a bulk), and its `job.canceled` event goes trigger -> NOTIFY -> publisher -> hub -> every stream
  of the job's tenant. The commit time is time.time() right after the statement returns.

Phases:

1. Baselines, before the 1,000 streams connect: raw PostgreSQL LISTEN/NOTIFY (a notifier here, the listener in
   a client worker) at each rate; the same commit-to-arrival path with one client, at each rate and in bulk.
2. 1,000 streams connect (time, daemon RSS per stream), then sit idle for a few seconds (CPU at rest).
3. Latency: cancels paced at each --rates value for --seconds; every (client, event) pair's commit-to-arrival
   time: median, p90, p99, max. Also when the publisher numbered each event (events.published_at), which
   splits the time into "commit -> numbered" and "numbered -> arrived".
4. Throughput: --events jobs canceled in one UPDATE, --rounds times: deliveries (events x streams of their
   tenant) divided by the time from the commit to the last arrival.

Every phase is checked: each stream got every event of its tenant (the admin's: every event) exactly once,
in seq order, none of another tenant's, and no stream was cut off. The daemon's CPU (utime + stime from
/proc/PID/stat, as % of one core) and RSS (VmRSS, sampled every 0.1 s; VmHWM at the end) are reported per
phase, with the client workers', PostgreSQL's and the whole machine's CPU beside them.

    .venv/bin/python bench/sse.py [--clients 1000] [--tenants 100] [--rates 200,1000] [--seconds 10]
                                  [--events 20000] [--rounds 3] [--workers 2] [--quick]

--profile DIR records the daemon with py-spy (if installed) during the 1,000-client phases, as collapsed
stacks (DIR/<phase>.txt). Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
from benchlib import (
    API_KEY,
    SERVER_URL,
    STOP_TIMEOUT_S,
    DaemonProcess,
    EmulatorProcess,
    free_port,
    log_tail,
    machine,
    markdown,
    scratch_database,
    status_mib,
)

from batchd import tenants
from batchd.client import messages

ADMIN_TOKEN = "bench-admin-" + uuid.uuid4().hex
EVENT_TYPE = "job.canceled"
REQUEST = json.dumps(
    {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "bench"}]}
)
SCRIPT = str(Path(__file__).resolve())
SAMPLE_INTERVAL_S = 0.1
DRAIN_TIMEOUT_S = 60.0  # after the last commit, for every stream to get every event
OPEN_CONCURRENCY = 100  # streams being opened at once, per worker
PRODUCER_CONNECTIONS = 8  # paced cancels in flight at once
IDLE_S = 5.0
SETTLE_S = 0.5
CLK_TCK = os.sysconf("SC_CLK_TCK")
NOTIFY_CHANNEL = "bench_sse"
INSERT_JOBS = """
INSERT INTO batchd.jobs (tenant_id, request)
SELECT t, $2::jsonb FROM unnest($1::text[]) AS t
RETURNING id, tenant_id
"""
CANCEL_ONE = "SELECT batchd.cancel_job($1)"
CANCEL_MANY = "UPDATE batchd.jobs SET status = 'canceled' WHERE id = ANY($1::uuid[]) AND status = 'queued'"


# -- small things ------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of them at or below it."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.1f}"


def raise_open_files_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every subprocess
        soft = hard
    return soft


# -- the client worker (a child process) -------------------------------------------------------------------


class Client:
    """One stream, read in the background; each event's seq and arrival time are kept."""

    def __init__(self, index: int, tenant: str | None, response: aiohttp.ClientResponse) -> None:
        self.index = index
        self.tenant = tenant
        self.response = response
        self.seqs: list[int] = []
        self.times: list[float] = []
        self.foreign = 0  # events whose data names another tenant
        self.unexpected = 0  # events of another type than the benchmark makes
        self.disconnects: list[str] = []
        self.error: str | None = None
        self.ended = False
        self.started = asyncio.Event()
        self._arrived = 0.0
        self.task = asyncio.create_task(self._read())

    async def _chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.response.content.iter_any():
            self._arrived = time.time()
            yield chunk

    async def _read(self) -> None:
        marker = None if self.tenant is None else f'"tenant": "{self.tenant}"'
        try:
            async for message in messages(self._chunks()):
                self.started.set()  # the first block is `retry:`
                if message.id is None:
                    if message.event == "disconnect":
                        self.disconnects.append(message.data)
                    continue
                if message.event != EVENT_TYPE:
                    self.unexpected += 1
                if marker is not None and marker not in message.data:
                    self.foreign += 1
                self.seqs.append(int(message.id))
                self.times.append(self._arrived)
        except (aiohttp.ClientError, ConnectionError) as error:
            self.error = repr(error)
        finally:
            self.ended = True
            self.started.set()

    async def close(self) -> None:
        self.task.cancel()
        self.response.close()
        await asyncio.gather(self.task, return_exceptions=True)


class ClientWorker:
    """What a worker process does on each command read from its standard input."""

    def __init__(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None, connect=60),
        )
        self.clients: list[Client] = []
        self.listener: asyncpg.Connection | None = None
        self.notified: list[tuple[int, float]] = []

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        name = command["cmd"]
        if name == "open":
            return await self.open(command["base_url"], command["clients"])
        if name == "count":
            return {
                "received": sum(len(c.seqs) for c in self.clients),
                "notified": len(self.notified),
                "ended": sum(c.ended for c in self.clients),
            }
        if name == "take":
            return self.take()
        if name == "close":
            clients, self.clients = self.clients, []
            await asyncio.gather(*(client.close() for client in clients))
            return {"closed": len(clients)}
        if name == "listen":
            self.listener = await asyncpg.connect(command["url"])
            await self.listener.add_listener(NOTIFY_CHANNEL, self._notified)
            return {"listening": True}
        if name == "unlisten":
            if self.listener is not None:
                await self.listener.close()
            notified, self.notified = self.notified, []
            return {"notified": notified}
        raise ValueError(f"unknown command {name!r}")

    def _notified(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        self.notified.append((int(str(payload)), time.time()))

    async def open(self, base_url: str, specs: list[list[Any]]) -> dict[str, Any]:
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)
        failures: list[str] = []

        async def open_one(index: int, tenant: str | None, token: str) -> Client | None:
            async with gate:
                try:
                    response = await self.session.get(
                        f"{base_url}/v1/events", headers={"Authorization": f"Bearer {token}"}
                    )
                except aiohttp.ClientError as error:
                    failures.append(f"client {index}: {error!r}")
                    return None
                if response.status != 200:
                    failures.append(f"client {index}: {response.status} {await response.text()}")
                    response.close()
                    return None
                client = Client(index, tenant, response)
                await client.started.wait()
                return client

        started = time.monotonic()
        opened = await asyncio.gather(*(open_one(*spec) for spec in specs))
        self.clients += [client for client in opened if client is not None]
        return {
            "opened": sum(c is not None for c in opened),
            "seconds": time.monotonic() - started,
            "failures": failures,
        }

    def take(self) -> dict[str, Any]:
        """Every event received since the last take, per client; and what went wrong so far."""
        report = {
            "clients": [[c.index, c.seqs, c.times] for c in self.clients if c.seqs],
            "foreign": sum(c.foreign for c in self.clients),
            "unexpected": sum(c.unexpected for c in self.clients),
            "disconnects": [d for c in self.clients for d in c.disconnects],
            "errors": [f"client {c.index}: {c.error}" for c in self.clients if c.error],
            "ended": sum(c.ended for c in self.clients),
        }
        for client in self.clients:
            client.seqs, client.times, client.foreign, client.unexpected = [], [], 0, 0
            client.disconnects = []
        return report


async def worker_main() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = ClientWorker()
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command["cmd"] == "exit":
                break
            try:
                reply = await worker.handle(command)
            except Exception as error:  # noqa: BLE001 - reported to the parent, which stops the run
                reply = {"error": repr(error)}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        await asyncio.gather(*(client.close() for client in worker.clients))
        await worker.session.close()
        if worker.listener is not None and not worker.listener.is_closed():
            await worker.listener.close()
    return 0


# -- processes, seen from the parent -----------------------------------------------------------------------


class Worker:
    """A client worker process, driven one command at a time over its standard input and output."""

    def __init__(self, index: int, log_path: Path) -> None:
        self.index = index
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                SCRIPT,
                "--child",
                "clients",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                limit=1 << 30,
            )

    async def call(self, command: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
        assert self.process is not None
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        async with self._lock:
            self.process.stdin.write((json.dumps(command) + "\n").encode())
            await self.process.stdin.drain()
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout=timeout_s)
        if not line:
            raise RuntimeError(f"client worker {self.index} exited:\n{self.log_tail()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"client worker {self.index}: {reply['error']}")
        return reply

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ConnectionError):
            assert process.stdin is not None
            process.stdin.write(b'{"cmd": "exit"}\n')
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), timeout=STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)


# -- CPU and memory ----------------------------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks; 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def machine_busy_ticks() -> int:
    """Clock ticks every core together spent neither idle nor waiting for I/O, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(values) - values[3] - values[4]


def postgres_pids(database: str) -> list[int]:
    """The server processes serving `database` (the daemon's, the producers', the listener's); the server's
    shared background processes (WAL writer, checkpointer) are not among them."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                title = (entry / "cmdline").read_bytes().decode(errors="replace")
                if title.startswith("postgres:") and f" {database} " in title:
                    pids.append(int(entry.name))
    return pids


def all_processes() -> dict[int, tuple[str, int]]:
    """Every process's name (a server process's title) and CPU ticks so far."""
    processes = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                if name == "postgres":
                    title = (entry / "cmdline").read_bytes().decode(errors="replace").strip("\0 ")
                    name = " ".join(title.split()[:4]) or name
                fields = stat[stat.rindex(")") + 2 :].split()
                processes[int(entry.name)] = (name, int(fields[11]) + int(fields[12]))
    return processes


@dataclass(frozen=True)
class Snapshot:
    at: float
    daemon_ticks: int
    daemon_rss_mib: float
    client_ticks: int
    bench_ticks: int
    postgres_ticks: dict[int, int]
    busy_ticks: int
    processes: dict[int, tuple[str, int]] = field(default_factory=dict)  # every one, at a phase's ends


@dataclass(frozen=True)
class Usage:
    """CPU as % of one core (the machine's 2 cores are 200 %), from start to end of a phase."""

    seconds: float
    daemon_cpu: float
    daemon_rss_max_mib: float
    daemon_rss_end_mib: float
    clients_cpu: float  # every client worker together
    postgres_cpu: float  # the scratch database's server processes
    bench_cpu: float  # this process: the producer, the sampler
    machine_cpu: float  # every process on the machine, busy (not idle or waiting for I/O)
    busiest_others: list[tuple[str, float]] = field(default_factory=list)

    @property
    def other_cpu(self) -> float:
        """Whatever else ran on the machine meanwhile (other users' work, PostgreSQL's shared processes)."""
        ours = self.daemon_cpu + self.clients_cpu + self.postgres_cpu + self.bench_cpu
        return max(0.0, self.machine_cpu - ours)


class Sampler:
    """Samples the daemon, the client workers, PostgreSQL and the machine every SAMPLE_INTERVAL_S."""

    def __init__(self, daemon_pid: int, worker_pids: list[int], database: str) -> None:
        self.daemon_pid = daemon_pid
        self.worker_pids = worker_pids
        self.database = database
        self.samples: list[Snapshot] = []
        self._postgres: list[int] = postgres_pids(database)
        self._refreshed = time.monotonic()

    def take(self, *, everything: bool = False) -> Snapshot:
        """`everything`: every process's CPU too (at a phase's start and end), to name what else ran."""
        if time.monotonic() - self._refreshed > 1.0:
            self._postgres, self._refreshed = postgres_pids(self.database), time.monotonic()
        snapshot = Snapshot(
            time.time(),
            cpu_ticks(self.daemon_pid),
            status_mib(self.daemon_pid, "VmRSS"),
            sum(cpu_ticks(pid) for pid in self.worker_pids),
            cpu_ticks(os.getpid()),
            {pid: cpu_ticks(pid) for pid in self._postgres},
            machine_busy_ticks(),
            all_processes() if everything else {},
        )
        self.samples.append(snapshot)
        return snapshot

    async def run(self) -> None:
        while True:
            self.take()
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    def usage(self, start: Snapshot, end: Snapshot) -> Usage:
        seconds = max(end.at - start.at, 1e-9)

        def core_pct(ticks: int) -> float:
            return ticks / CLK_TCK / seconds * 100

        postgres = sum(
            end.postgres_ticks[pid] - ticks
            for pid, ticks in start.postgres_ticks.items()
            if pid in end.postgres_ticks
        )
        rss = [s.daemon_rss_mib for s in self.samples if start.at <= s.at <= end.at]
        return Usage(
            seconds=seconds,
            daemon_cpu=core_pct(end.daemon_ticks - start.daemon_ticks),
            daemon_rss_max_mib=max([*rss, end.daemon_rss_mib]),
            daemon_rss_end_mib=end.daemon_rss_mib,
            clients_cpu=core_pct(end.client_ticks - start.client_ticks),
            postgres_cpu=core_pct(postgres),
            bench_cpu=core_pct(end.bench_ticks - start.bench_ticks),
            machine_cpu=core_pct(end.busy_ticks - start.busy_ticks),
            busiest_others=self._others(start, end, core_pct),
        )

    def _others(
        self, start: Snapshot, end: Snapshot, core_pct: Callable[[int], float]
    ) -> list[tuple[str, float]]:
        ours = {self.daemon_pid, os.getpid(), *self.worker_pids, *start.postgres_ticks, *end.postgres_ticks}
        by_name: Counter[str] = Counter()
        for pid, (name, ticks) in end.processes.items():
            if pid not in ours:
                by_name[name] += ticks - start.processes.get(pid, (name, 0))[1]
        return [(name, core_pct(ticks)) for name, ticks in by_name.most_common(3) if ticks > 0]


class Profiler:
    """py-spy on the daemon for one phase (collapsed stacks), when --profile is given."""

    def __init__(self, directory: Path | None, pid: int) -> None:
        self.directory = directory
        self.pid = pid
        executable = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.executable = executable if Path(executable).exists() else None

    @contextlib.asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[None]:
        if self.directory is None or self.executable is None:
            yield
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        output = self.directory / f"{slug}.txt"
        process = await asyncio.create_subprocess_exec(
            self.executable,
            "record",
            "--pid",
            str(self.pid),
            "--rate",
            "250",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(output),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.sleep(1.0)  # py-spy attaches
        try:
            yield
        finally:
            process.send_signal(signal.SIGINT)
            await process.wait()
            print(f"  profile: {output}", flush=True)


# -- the run's state ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSpec:
    index: int
    tenant: str | None  # None: an admin stream, which gets every tenant's events
    worker: int


@dataclass(frozen=True)
class EventRow:
    seq: int  # the id the admin's streams carry
    tenant_seq: int  # the id its tenant's streams carry (migration 0009)
    job_id: UUID
    tenant: str
    type: str
    published: float  # events.published_at, as time.time()


@dataclass
class PhaseResult:
    name: str
    kind: str  # "latency", "bulk", "notify"
    streams: int
    events: int
    deliveries: int = 0
    target_rate: float = 0.0
    achieved_rate: float = 0.0
    latencies: list[float] = field(default_factory=list)  # commit -> arrival, every (client, event)
    numbered: list[float] = field(default_factory=list)  # commit -> published_at, every event
    after_numbered: list[float] = field(default_factory=list)  # published_at -> arrival, every pair
    first_s: float = math.nan  # bulk: commit -> first arrival
    last_s: float = math.nan  # bulk: commit -> last arrival
    usage: Usage | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def delivered_per_s(self) -> float:
        return self.deliveries / self.last_s if self.last_s and not math.isnan(self.last_s) else math.nan


@dataclass
class Run:
    url: str
    daemon: DaemonProcess
    workers: list[Worker]
    sampler: Sampler
    producers: list[asyncpg.Connection]
    tokens: dict[str, str]
    profiler: Profiler
    specs: list[ClientSpec] = field(default_factory=list)


# -- the scratch database ----------------------------------------------------------------------------------


def migrate_by_command(workdir: Path) -> Callable[[str], Awaitable[None]]:
    """`batchd migrate`, as an operator runs it, in an empty directory (so no batchd.toml is read)."""

    async def migrate(url: str) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "batchd",
            "migrate",
            env={**clean_env(), "BATCHD_DATABASE__URL": url},
            cwd=workdir,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"batchd migrate exited with {process.returncode}:\n{output.decode()}")

    return migrate


def clean_env() -> dict[str, str]:
    """This environment without any BATCHD_* setting of its own."""
    return {key: value for key, value in os.environ.items() if not key.startswith("BATCHD_")}


def daemon_env(url: str, emulator_url: str, port: int, max_streams: int) -> dict[str, str]:
    return {
        **clean_env(),
        "ANTHROPIC_API_KEY": API_KEY,
        "BATCHD_ADMIN_TOKEN": ADMIN_TOKEN,
        "BATCHD_DATABASE__URL": url,
        "BATCHD_ANTHROPIC__BASE_URL": emulator_url,
        "BATCHD_ANTHROPIC__REQUESTS_PER_MINUTE": "6000",
        # The benchmark's jobs stay queued until it cancels them: no flush by count, age or deadline.
        "BATCHD_BATCHING__MAX_REQUESTS": "100000",
        "BATCHD_BATCHING__MAX_WAIT_S": "3600",
        "BATCHD_HTTP__HOST": "127.0.0.1",
        "BATCHD_HTTP__PORT": str(port),
        "BATCHD_EVENTS__MAX_STREAMS_PER_TENANT": str(max_streams),
    }


async def insert_jobs(run: Run, tenant_of_each: list[str]) -> list[tuple[UUID, str]]:
    """Queued jobs, one per entry, in that order; the daemon leaves them queued (max_wait_s an hour)."""
    jobs: list[tuple[UUID, str]] = []
    connection = run.producers[0]
    for start in range(0, len(tenant_of_each), 10_000):
        rows = await connection.fetch(INSERT_JOBS, tenant_of_each[start : start + 10_000], REQUEST)
        jobs += [(row["id"], row["tenant_id"]) for row in rows]
    await asyncio.sleep(SETTLE_S)  # the flusher wakes on the insert, looks at the queue, goes back to sleep
    return jobs


async def event_head(run: Run) -> int:
    head: int = await run.producers[0].fetchval("SELECT published_seq FROM batchd.event_log")
    return head


async def phase_events(run: Run, head: int, count: int) -> list[EventRow]:
    """The events the phase made (published after `head`), once all `count` of them are published."""
    connection = run.producers[0]
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        rows = await connection.fetch(
            "SELECT seq, tenant_seq, job_id, tenant_id, type,"
            "       extract(epoch FROM published_at)::float8 AS published"
            "  FROM batchd.events WHERE seq > $1 ORDER BY seq",
            head,
        )
        if len(rows) >= count or time.monotonic() > deadline:
            return [
                EventRow(r["seq"], r["tenant_seq"], r["job_id"], r["tenant_id"], r["type"], r["published"])
                for r in rows
            ]
        await asyncio.sleep(0.1)


# -- measuring ---------------------------------------------------------------------------------------------


def round_robin(names: list[str], count: int) -> list[str]:
    return [names[i % len(names)] for i in range(count)]


async def paced_cancels(
    run: Run, jobs: list[tuple[UUID, str]], rate: float
) -> tuple[dict[UUID, float], float]:
    """Cancels each job at start + i / rate, as a producer would, on a few connections; returns each job's
    commit time and the rate achieved."""
    free: asyncio.Queue[asyncpg.Connection] = asyncio.Queue()
    for connection in run.producers:
        free.put_nowait(connection)
    commits: dict[UUID, float] = {}
    refused: list[UUID] = []

    async def cancel(connection: asyncpg.Connection, job_id: UUID) -> None:
        try:
            if await connection.fetchval(CANCEL_ONE, job_id):
                commits[job_id] = time.time()
            else:
                refused.append(job_id)
        finally:
            free.put_nowait(connection)

    tasks = []
    start = time.time() + 0.05
    last_sent = start
    for i, (job_id, _) in enumerate(jobs):
        delay = start + i / rate - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        connection = await free.get()
        last_sent = time.time()
        tasks.append(asyncio.create_task(cancel(connection, job_id)))
    await asyncio.gather(*tasks)
    if refused:
        raise RuntimeError(f"{len(refused)} job(s) were no longer queued when canceled")
    achieved = (len(jobs) - 1) / (last_sent - start) if len(jobs) > 1 and last_sent > start else math.nan
    return commits, achieved


async def count_received(run: Run, key: str = "received") -> int:
    replies = await asyncio.gather(*(worker.call({"cmd": "count"}) for worker in run.workers))
    return sum(int(reply[key]) for reply in replies)


async def wait_received(run: Run, expected: int, key: str = "received") -> bool:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        if await count_received(run, key) >= expected:
            return True
        await asyncio.sleep(0.02)
    return False


async def take_all(run: Run) -> tuple[dict[int, tuple[list[int], list[float]]], list[str]]:
    """Every worker's events since the last take, by client; and the problems the workers saw."""
    received: dict[int, tuple[list[int], list[float]]] = {}
    problems: list[str] = []
    for worker in run.workers:
        reply = await worker.call({"cmd": "take"})
        for index, seqs, times in reply["clients"]:
            received[index] = (seqs, times)
        if reply["foreign"]:
            problems.append(f"{reply['foreign']} event(s) naming another tenant")
        if reply["unexpected"]:
            problems.append(f"{reply['unexpected']} event(s) of an unexpected type")
        if reply["disconnects"]:
            problems.append(f"{len(reply['disconnects'])} stream(s) cut off: {reply['disconnects'][0]}")
        problems += reply["errors"][:3]
        if reply["ended"]:
            problems.append(f"{reply['ended']} stream(s) ended")
    return received, problems


def expected_deliveries(specs: list[ClientSpec], tenants_of_events: list[str]) -> int:
    per_tenant = Counter(spec.tenant for spec in specs)
    admins = per_tenant.get(None, 0)
    return sum(per_tenant.get(tenant, 0) + admins for tenant in tenants_of_events)


def check_and_measure(
    result: PhaseResult,
    specs: list[ClientSpec],
    events: list[EventRow],
    received: dict[int, tuple[list[int], list[float]]],
    commits: dict[UUID, float],
) -> None:
    """Every stream got every event of its tenant once, in order, and nothing else; latencies of each."""
    by_tenant: dict[str, list[int]] = defaultdict(list)
    for event in events:
        by_tenant[event.tenant].append(event.tenant_seq)
        if event.type != EVENT_TYPE:
            result.problems.append(f"event {event.seq} is {event.type}")
    every = [event.seq for event in events]
    # What a stream's id stands for: the admin's (None) is the log's seq, a tenant's its own count.
    by_id: dict[tuple[str | None, int], EventRow] = {(None, event.seq): event for event in events} | {
        (e.tenant, e.tenant_seq): e for e in events
    }
    missing = duplicates = foreign = disordered = 0
    known = {spec.index for spec in specs}
    for index in received.keys() - known:
        result.problems.append(f"events for an unknown client {index}")
    for spec in specs:
        seqs, times = received.get(spec.index, ([], []))
        expected = every if spec.tenant is None else by_tenant.get(spec.tenant, [])
        if seqs != expected:
            counts = Counter(seqs)
            wanted = set(expected)
            missing += len(wanted - counts.keys())
            duplicates += sum(n - 1 for n in counts.values() if n > 1)
            foreign += sum(1 for seq in counts if seq not in wanted)
            disordered += seqs != sorted(seqs)
        for seq, arrived in zip(seqs, times, strict=True):
            row = by_id.get((spec.tenant, seq))
            if row is None:
                continue
            result.latencies.append(arrived - commits[row.job_id])
            result.after_numbered.append(arrived - row.published)
        result.deliveries += len(seqs)
    result.numbered = [event.published - commits[event.job_id] for event in events]
    for count, what in (
        (missing, "(stream, event) pairs missing"),
        (duplicates, "events received twice"),
        (foreign, "events received by a stream they were not for"),
        (disordered, "streams out of seq order"),
    ):
        if count:
            result.problems.append(f"{count} {what}")


async def measured(run: Run, result: PhaseResult, expected: int) -> Snapshot:
    """Waits until every stream has its events; the end of the phase is the last arrival's sample."""
    if not await wait_received(run, expected):
        got = await count_received(run)
        result.problems.append(f"only {got:,} of {expected:,} deliveries within {DRAIN_TIMEOUT_S:.0f} s")
    return run.sampler.take(everything=True)


async def latency_phase(run: Run, name: str, tenant_of_each: list[str], rate: float) -> PhaseResult:
    jobs = await insert_jobs(run, tenant_of_each)
    head = await event_head(run)
    stale, _ = await take_all(run)
    result = PhaseResult(name, "latency", len(run.specs), len(jobs), target_rate=rate)
    if stale:
        result.problems.append(f"{sum(len(s) for s, _ in stale.values())} events before the phase")
    expected = expected_deliveries(run.specs, [tenant for _, tenant in jobs])
    async with run.profiler.phase(name):
        start = run.sampler.take(everything=True)
        commits, result.achieved_rate = await paced_cancels(run, jobs, rate)
        end = await measured(run, result, expected)
    result.usage = run.sampler.usage(start, end)
    events = await phase_events(run, head, len(jobs))
    received, problems = await take_all(run)
    result.problems += problems
    check_and_measure(result, run.specs, events, received, commits)
    return result


async def bulk_phase(run: Run, name: str, tenant_of_each: list[str]) -> PhaseResult:
    jobs = await insert_jobs(run, tenant_of_each)
    head = await event_head(run)
    stale, _ = await take_all(run)
    result = PhaseResult(name, "bulk", len(run.specs), len(jobs))
    if stale:
        result.problems.append(f"{sum(len(s) for s, _ in stale.values())} events before the phase")
    expected = expected_deliveries(run.specs, [tenant for _, tenant in jobs])
    async with run.profiler.phase(name):
        start = run.sampler.take(everything=True)
        status = await run.producers[0].execute(CANCEL_MANY, [job_id for job_id, _ in jobs])
        committed = time.time()
        end = await measured(run, result, expected)
    if status != f"UPDATE {len(jobs)}":
        result.problems.append(f"the bulk cancel said {status!r}")
    result.usage = run.sampler.usage(start, end)
    events = await phase_events(run, head, len(jobs))
    received, problems = await take_all(run)
    result.problems += problems
    check_and_measure(result, run.specs, events, received, dict.fromkeys((j for j, _ in jobs), committed))
    arrivals = [t for _, times in received.values() for t in times]
    if arrivals:
        result.first_s, result.last_s = min(arrivals) - committed, max(arrivals) - committed
    return result


async def notify_phase(run: Run, rate: float, count: int) -> PhaseResult:
    """Raw LISTEN/NOTIFY: a NOTIFY committed here, heard by an asyncpg listener in client worker 0."""
    result = PhaseResult(f"raw LISTEN/NOTIFY, {rate:g}/s", "notify", 1, count, target_rate=rate)
    worker = run.workers[0]
    await worker.call({"cmd": "listen", "url": run.url})
    sent: dict[int, float] = {}
    notifier = run.producers[0]
    start = time.time() + 0.05
    for i in range(count):
        delay = start + i / rate - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await notifier.execute(f"NOTIFY {NOTIFY_CHANNEL}, '{i}'")
        sent[i] = time.time()
    result.achieved_rate = (count - 1) / (time.time() - start) if count > 1 else math.nan
    if not await wait_received(run, count, key="notified"):
        result.problems.append("notifications missing")
    notified = (await worker.call({"cmd": "unlisten"}))["notified"]
    result.latencies = [arrived - sent[i] for i, arrived in notified]
    result.deliveries = len(notified)
    if sorted(i for i, _ in notified) != list(range(count)):
        result.problems.append(f"{len(notified)} notifications of {count}, or some twice")
    return result


async def open_streams(run: Run, specs: list[ClientSpec]) -> tuple[float, list[str]]:
    """Opens the streams (each worker its share, at once); returns the time until every one is open."""
    started = time.monotonic()

    def token(spec: ClientSpec) -> str:
        return ADMIN_TOKEN if spec.tenant is None else run.tokens[spec.tenant]

    replies = await asyncio.gather(
        *(
            worker.call(
                {
                    "cmd": "open",
                    "base_url": run.daemon.url,
                    "clients": [[s.index, s.tenant, token(s)] for s in specs if s.worker == worker.index],
                },
                timeout_s=300.0,
            )
            for worker in run.workers
        )
    )
    seconds = time.monotonic() - started
    failures = [failure for reply in replies for failure in reply["failures"]]
    run.specs = specs
    await asyncio.sleep(SETTLE_S)  # the last streams subscribe right after their first write
    return seconds, failures


async def close_streams(run: Run) -> None:
    await asyncio.gather(*(worker.call({"cmd": "close"}) for worker in run.workers))
    run.specs = []


# -- the report --------------------------------------------------------------------------------------------


def latency_cells(values: list[float]) -> str:
    return " / ".join(ms(percentile(values, q)) for q in (0.5, 0.9, 0.99, 1.0))


def usage_cells(usage: Usage | None) -> list[str]:
    if usage is None:
        return ["", "", ""]
    return [
        f"{usage.daemon_cpu:.0f} %",
        f"{usage.daemon_rss_max_mib:.0f}",
        " / ".join(
            f"{value:.0f}"
            for value in (
                usage.clients_cpu,
                usage.postgres_cpu,
                usage.bench_cpu,
                usage.other_cpu,
                usage.machine_cpu,
            )
        ),
    ]


def latency_table(results: list[PhaseResult]) -> str:
    header = [
        "phase",
        "streams",
        "events",
        "deliveries",
        "rate sent (/s)",
        "commit -> arrival, ms: p50 / p90 / p99 / max",
        "commit -> numbered, ms: p50 / p99",
        "numbered -> arrival, ms: p50 / p99",
        "daemon CPU",
        "daemon RSS max (MiB)",
        "CPU, %: clients / PostgreSQL / bench / other / machine",
    ]
    rows = []
    for r in results:
        numbered = (
            f"{ms(percentile(r.numbered, 0.5))} / {ms(percentile(r.numbered, 0.99))}" if r.numbered else ""
        )
        after = (
            f"{ms(percentile(r.after_numbered, 0.5))} / {ms(percentile(r.after_numbered, 0.99))}"
            if r.after_numbered
            else ""
        )
        rows.append(
            [
                r.name,
                f"{r.streams:,}",
                f"{r.events:,}",
                f"{r.deliveries:,}",
                f"{r.achieved_rate:,.0f}",
                latency_cells(r.latencies),
                numbered,
                after,
                *usage_cells(r.usage),
            ]
        )
    return markdown(header, rows)


def bulk_table(results: list[PhaseResult]) -> str:
    header = [
        "phase",
        "streams",
        "events",
        "deliveries",
        "commit -> first / last arrival (s)",
        "deliveries/s",
        "commit -> all numbered (s)",
        "commit -> arrival, ms: p50 / p99",
        "daemon CPU",
        "daemon RSS max (MiB)",
        "CPU, %: clients / PostgreSQL / bench / other / machine",
    ]
    rows = [
        [
            r.name,
            f"{r.streams:,}",
            f"{r.events:,}",
            f"{r.deliveries:,}",
            f"{r.first_s:.3f} / {r.last_s:.3f}",
            f"{r.delivered_per_s:,.0f}",
            f"{max(r.numbered):.3f}" if r.numbered else "",
            f"{ms(percentile(r.latencies, 0.5))} / {ms(percentile(r.latencies, 0.99))}",
            *usage_cells(r.usage),
        ]
        for r in results
    ]
    return markdown(header, rows)


def print_phase(result: PhaseResult) -> None:
    if result.kind == "bulk":
        line = (
            f"{result.deliveries:,} deliveries, last at {result.last_s:.3f} s: "
            f"{result.delivered_per_s:,.0f}/s"
        )
    else:
        line = (
            f"{result.deliveries:,} deliveries at {result.achieved_rate:,.0f} events/s, "
            f"p50/p90/p99/max {latency_cells(result.latencies)} ms"
        )
    if result.usage is not None:
        line += (
            f"; daemon CPU {result.usage.daemon_cpu:.0f} %, RSS max {result.usage.daemon_rss_max_mib:.0f} MiB"
        )
    print(f"  {result.name}: {line}", flush=True)
    for problem in result.problems:
        print(f"    PROBLEM: {problem}", flush=True)


# -- the run -----------------------------------------------------------------------------------------------


async def benchmark(
    run: Run, args: argparse.Namespace, names: list[str]
) -> tuple[list[PhaseResult], dict[str, Any]]:
    results: list[PhaseResult] = []
    facts: dict[str, Any] = {}

    def done(result: PhaseResult) -> None:
        print_phase(result)
        results.append(result)

    print("\n== 1. baselines: raw LISTEN/NOTIFY, and one stream", flush=True)
    for rate in args.rates:
        done(await notify_phase(run, rate, int(rate * args.seconds)))
    facts["rss_before_streams_mib"] = status_mib(run.daemon.pid, "VmRSS")
    one = [ClientSpec(1_000_000, names[0], 0)]
    seconds, failures = await open_streams(run, one)
    if failures:
        raise RuntimeError(f"the baseline stream did not open: {failures}")
    for rate in args.rates:
        done(await latency_phase(run, f"1 stream, {rate:g}/s", [names[0]] * int(rate * args.seconds), rate))
    done(await bulk_phase(run, "1 stream, bulk", [names[0]] * args.events))
    await close_streams(run)

    total = args.clients + args.admin_streams
    print(f"\n== 2. {total:,} streams connect", flush=True)
    specs = [ClientSpec(i, names[i % len(names)], i % len(run.workers)) for i in range(args.clients)]
    specs += [ClientSpec(args.clients + i, None, i % len(run.workers)) for i in range(args.admin_streams)]
    await asyncio.sleep(1.0)
    before = status_mib(run.daemon.pid, "VmRSS")
    seconds, failures = await open_streams(run, specs)
    after = status_mib(run.daemon.pid, "VmRSS")
    facts |= {"connect_s": seconds, "connect_failures": failures, "rss_idle_before_mib": before}
    facts["rss_with_streams_mib"] = after
    print(
        f"  {total - len(failures):,} of {total:,} open in {seconds:.2f} s; daemon RSS {before:.0f} -> "
        f"{after:.0f} MiB ({(after - before) * 1024 / max(1, total):.1f} KiB per stream)",
        flush=True,
    )
    for failure in failures[:5]:
        print(f"    PROBLEM: {failure}", flush=True)
    start = run.sampler.take(everything=True)
    await asyncio.sleep(IDLE_S)
    facts["idle"] = run.sampler.usage(start, run.sampler.take(everything=True))
    idle: Usage = facts["idle"]
    print(
        f"  idle for {IDLE_S:g} s: daemon CPU {idle.daemon_cpu:.1f} %; other processes on the machine "
        f"{idle.other_cpu:.0f} % of a core ("
        + ", ".join(f"{name} {pct:.0f} %" for name, pct in idle.busiest_others)
        + ")",
        flush=True,
    )

    print(f"\n== 3. latency with {total:,} streams", flush=True)
    for rate in args.rates:
        tenants_of = round_robin(names, int(rate * args.seconds))
        done(await latency_phase(run, f"{total:,} streams, {rate:g}/s", tenants_of, rate))

    print(
        f"\n== 4. throughput with {total:,} streams: {args.events:,} jobs canceled in one UPDATE", flush=True
    )
    for n in range(args.rounds):
        done(await bulk_phase(run, f"{total:,} streams, bulk #{n + 1}", round_robin(names, args.events)))

    started = time.monotonic()
    await close_streams(run)
    facts["close_s"] = time.monotonic() - started
    return results, facts


def report(
    args: argparse.Namespace, results: list[PhaseResult], facts: dict[str, Any], stop_s: float, elapsed: float
) -> int:
    print()
    print(latency_table([r for r in results if r.kind != "bulk"]))
    print()
    print(bulk_table([r for r in results if r.kind == "bulk"]))
    idle: Usage = facts["idle"]
    total = args.clients + args.admin_streams
    print(
        f"\n{total:,} streams ({args.clients:,} over {args.tenants} tenants, {args.admin_streams} admin) in "
        f"{args.workers} client worker process(es): open in {facts['connect_s']:.2f} s; daemon RSS "
        f"{facts['rss_idle_before_mib']:.0f} MiB before, {facts['rss_with_streams_mib']:.0f} MiB with them "
        f"({(facts['rss_with_streams_mib'] - facts['rss_idle_before_mib']) * 1024 / max(1, total):.1f} KiB "
        f"per stream); idle with them: daemon CPU {idle.daemon_cpu:.1f} %; "
        f"peak VmHWM {facts['hwm_mib']:.0f} MiB; "
        f"all streams closed in {facts['close_s']:.2f} s; the daemon stopped in {stop_s:.2f} s"
    )
    bulks = [r.delivered_per_s for r in results if r.kind == "bulk" and r.streams == total]
    if bulks:
        print(f"bulk deliveries/s with {total:,} streams: median {statistics.median(bulks):,.0f}")
    print(f"the whole run: {elapsed:.0f} s")
    problems = [f"{r.name}: {p}" for r in results for p in r.problems]
    problems += [f"connect: {failure}" for failure in facts["connect_failures"]]
    if problems:
        print("\nFAILED:\n" + "\n".join(problems))
        return 1
    print("\nall checks passed: every stream got every event of its tenant exactly once, in order")
    return 0


async def main(args: argparse.Namespace) -> int:
    limit = raise_open_files_limit()
    print(f"machine: {machine()}; open files limit {limit:,}", flush=True)
    before = machine_busy_ticks()
    await asyncio.sleep(2.0)
    busy = (machine_busy_ticks() - before) / CLK_TCK / 2.0 * 100
    print(f"other processes before the run: {busy:.0f} % of a core busy (over 2 s)", flush=True)
    started = time.perf_counter()
    names = [f"t{i:03d}" for i in range(args.tenants)]
    with tempfile.TemporaryDirectory(prefix="batchd-bench-sse-") as tmp:
        workdir = Path(tmp)
        emulator = EmulatorProcess(workdir / "emulator.log", processing_time_s=5)
        port = free_port()
        daemon: DaemonProcess | None = None
        workers = [Worker(i, workdir / f"clients-{i}.log") for i in range(args.workers)]
        producers: list[asyncpg.Connection] = []
        sampling: asyncio.Task[None] | None = None
        stop_s = math.nan
        async with scratch_database(
            args.database_url, "batchd_bench_sse", migrate_by_command(workdir)
        ) as url:
            try:
                print(f"scratch database: {url}", flush=True)
                await emulator.start()
                max_streams = max(100, args.clients + args.admin_streams)
                daemon = DaemonProcess(
                    workdir / "daemon.log", workdir, daemon_env(url, emulator.url, port, max_streams), port
                )
                await daemon.start()
                print(f"daemon: pid {daemon.pid}, {daemon.url}: {shlex.join(daemon.command)}", flush=True)
                for worker in workers:
                    await worker.start()
                producers = [await asyncpg.connect(url) for _ in range(PRODUCER_CONNECTIONS)]
                tokens = {name: await tenants.add_tenant(producers[0], name) for name in names}
                sampler = Sampler(daemon.pid, [worker.pid for worker in workers], url.rpartition("/")[2])
                sampling = asyncio.create_task(sampler.run())
                run = Run(
                    url, daemon, workers, sampler, producers, tokens, Profiler(args.profile, daemon.pid)
                )
                results, facts = await benchmark(run, args, names)
                facts["hwm_mib"] = status_mib(daemon.pid, "VmHWM")
                sampling.cancel()
                stop_s = await daemon.stop()
            except BaseException:
                for process in (daemon, *workers):
                    if process is not None:
                        print(f"{process.log_path.name} (last lines):\n{process.log_tail()}", file=sys.stderr)
                raise
            finally:
                if sampling is not None:
                    sampling.cancel()
                for connection in producers:
                    await connection.close()
                for worker in workers:
                    await worker.stop()
                if daemon is not None:
                    await daemon.stop()
                emulator.stop()

    return report(args, results, facts, stop_s, time.perf_counter() - started)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=1000, help="tenant streams (default 1,000)")
    parser.add_argument(
        "--tenants", type=int, default=100, help="tenants the streams are spread over (default 100)"
    )
    parser.add_argument("--admin-streams", type=int, default=0, help="admin streams besides (default 0)")
    parser.add_argument(
        "--rates", default="200,1000", help="cancels per second in the latency phases (default 200,1000)"
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="length of each latency phase (default 10)"
    )
    parser.add_argument(
        "--events", type=int, default=20_000, help="jobs canceled in each bulk UPDATE (default 20,000)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="bulk rounds with every stream (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="client worker processes (default 2)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 50 clients, 5 tenants, a few seconds"
    )
    parser.add_argument("--profile", type=Path, help="record the daemon with py-spy into this directory")
    parser.add_argument(
        "--database-url", default=SERVER_URL, help="a server database to create the scratch one from"
    )
    parser.add_argument("--child", choices=["clients"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.tenants, args.rates, args.seconds, args.events, args.rounds = (
            50,
            5,
            "100",
            2.0,
            2000,
            1,
        )
    args.rates = [float(rate) for rate in str(args.rates).split(",") if rate.strip()]
    if args.child is None:
        if args.clients < 1 or args.tenants < 1 or args.workers < 1 or args.rounds < 1 or not args.rates:
            parser.error("--clients, --tenants, --workers, --rounds and --rates must be at least 1")
        if args.tenants > args.clients:
            parser.error("--tenants must not exceed --clients")
        if not 1 <= args.events <= 90_000 or max(args.rates) * args.seconds > 90_000:
            parser.error("a phase may cancel at most 90,000 jobs (the daemon would flush 100,000)")
    return args


def _interrupt(signum: int, frame: object) -> None:  # noqa: ARG001
    raise KeyboardInterrupt  # so that SIGTERM, too, stops the processes and drops the database


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.child == "clients":
        sys.exit(asyncio.run(worker_main()))
    print("$ " + shlex.join([sys.executable, *sys.argv]), flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(asyncio.run(main(arguments)))
