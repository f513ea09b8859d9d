"""Helpers shared by the tests: running the emulator, waiting on conditions, building requests."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import aiohttp
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
from anthropic.types.messages.batch_create_params import Request

from batchd.config import Settings
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig, RunningEmulator, serve

MODEL = "claude-haiku-4-5"
ADMIN_TOKEN = "admin-" + "a" * 32  # the `serve` fixture's admin token
# For tests of the daemon, which polls in real time: batches end within a fraction of a second.
QUICK = EmulatorConfig(processing_time_s=(0.1, 0.3), cancel_time_s=0.1, seed=99)


class EmulatorHandle(RunningEmulator):
    """A running emulator with the operator's side door at hand: its state is for assertions only."""

    async def admin(self, method: str, path: str, payload: Any = None) -> Any:
        """Call the /_emulator/ side door over HTTP, as an operator would."""
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"{self.url}/_emulator/{path}", json=payload) as response,
        ):
            body = await response.json()
            if response.status != 200:
                raise AssertionError(f"{method} /_emulator/{path} answered {response.status}: {body}")
            return body

    async def advance(self, seconds: float) -> None:
        await self.admin("POST", "clock/advance", {"seconds": seconds})

    async def set_faults(self, **plan: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.admin("PUT", "faults", plan)
        return result

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.admin("GET", "stats")
        return result


@asynccontextmanager
async def start_emulator(config: EmulatorConfig) -> AsyncIterator[EmulatorHandle]:
    async with serve(config.model_copy(update={"host": "127.0.0.1", "port": 0})) as running:
        yield EmulatorHandle(url=running.url, app=running.app)


def request(custom_id: str, text: str | None = None, **params: Any) -> Request:
    """One batch request; its prompt names the custom_id unless a text is given."""
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 256,
        "messages": [
            {"role": "user", "content": text if text is not None else f"Tell me about {custom_id}."}
        ],
    }
    body.update(params)
    # `params` are whatever a test wants the API to judge (an unknown model, a tiny max_tokens).
    return {"custom_id": custom_id, "params": cast("MessageCreateParamsNonStreaming", body)}


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Polls `condition` until it holds; fails after `timeout` seconds. A deadline, never a bare sleep."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


# `batchd run` as a process is killed and replaced in tests: a dead one's batches are taken over after a short
# lease, found by a quick sweep; smaller batches make several of them out of a test's jobs.
PROCESS_SECTIONS: dict[str, dict[str, Any]] = {
    "batching": {"max_requests": 50},
    "daemon": {"lease_s": 2, "sweep_interval_s": 1, "reconcile_grace_s": 0.3},
}


def settings_sections(
    database_url: str,
    emulator_url: str,
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    process: bool = False,
) -> dict[str, Any]:
    """The tests' settings, by section of batchd.toml: fast polling and sweeps, small batches. `process`: for
    `batchd run` as a process (daemon_config), else for a daemon in the test's process (make_settings).
    `overrides` are sections merged key by key (job_types replaced whole)."""
    values: dict[str, dict[str, Any]] = {
        "database": {"url": database_url, "pool_max_size": 5},
        # A create answered 5xx or not at all is sent again only after timeout_s + clock_skew_s (its window):
        # short here, so that tests of those failures take seconds (the emulator's clock is the machine's).
        "anthropic": {"base_url": emulator_url, "requests_per_minute": 6000, "timeout_s": 10},
        "batching": {"max_requests": 100, "max_wait_s": 0.2, "deadline_slack_s": 60},
        "polling": {"min_interval_s": 0.05, "max_interval_s": 0.2},
        # A failing step backs off up to retry_max_s: 4 s here, so that tests that wait for the next try
        # (chaos) see it within their deadlines; test_batch_lifecycle checks the growth itself.
        "daemon": {
            "lease_s": 30,
            "sweep_interval_s": 5,
            "reconcile_grace_s": 0.2,
            "clock_skew_s": 2,
            "retry_max_s": 4,
        },
        "http": {"host": "127.0.0.1", "port": 0},
        "job_types": {
            "summarize": {
                "model": MODEL,
                "max_tokens": 512,
                "fields": ["document_text", "max_length"],
                "system": "You summarise.",
                "prompt": "Summarise in at most {max_length} words: {document_text}",
            },
            "classify": {
                "model": MODEL,
                "max_tokens": 128,
                "fields": ["text", "categories"],
                "prompt": "Categories: {categories}. Text: {text}. Category:",
            },
        },
    }
    for layer in (PROCESS_SECTIONS if process else {}, overrides or {}):
        for section, keys in layer.items():
            if isinstance(values.get(section), dict) and section != "job_types":
                values[section] = {**values[section], **keys}
            else:
                values[section] = keys
    return values


def make_settings(database_url: str, emulator_url: str, **sections: dict[str, Any]) -> Settings:
    """Settings for a daemon in the test's process (settings_sections); sections override."""
    return Settings(**settings_sections(database_url, emulator_url, sections))


def running_daemon(settings: Settings, stack: AsyncExitStack) -> Any:
    """Starts a daemon whose stop is also registered on `stack` (so a failing test still stops it)."""

    @asynccontextmanager
    async def managed() -> AsyncIterator[Daemon]:
        context = Daemon(settings, serve_http=False).running()
        daemon = await context.__aenter__()
        closed = False

        async def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                await context.__aexit__(None, None, None)

        stack.push_async_callback(close)
        try:
            yield daemon
        finally:
            await close()

    return managed()


async def job_counts(db: Any) -> dict[str, int]:
    rows = await db.fetch("SELECT status, count(*) AS n FROM batchd.jobs GROUP BY status")
    return {row["status"]: row["n"] for row in rows}


async def wait_for_jobs(db: Any, *, done: int, timeout: float = 60.0) -> dict[str, int]:
    """Waits until `done` jobs are in a final state (succeeded, failed, canceled); returns the counts."""

    async def finished() -> bool:
        counts = await job_counts(db)
        return sum(counts.get(state, 0) for state in ("succeeded", "failed", "canceled")) >= done

    await wait_until(finished, timeout=timeout, interval=0.05)
    return await job_counts(db)


def raw_request(text: str, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": text}],
    }
    body.update(params)
    return body


async def insert_raw(db: Any, tenant: str, texts: list[str], **columns: Any) -> list[Any]:
    """Inserts one raw-request job per text, as a producer would (one statement); returns their ids."""
    rows = await db.fetch(
        "INSERT INTO batchd.jobs (tenant_id, request)"
        " SELECT $1, r::jsonb FROM unnest($2::text[]) AS r RETURNING id",
        tenant,
        [json.dumps(raw_request(text, **columns)) for text in texts],
    )
    return [row["id"] for row in rows]


async def insert_aged(db: Any, tenant: str, count: int, age_s: float) -> list[Any]:
    """Raw-request jobs as if a producer had inserted them `age_s` seconds ago."""
    rows = await db.fetch(
        "INSERT INTO batchd.jobs (tenant_id, request, created_at)"
        " SELECT $1, $2::text::jsonb, now() - make_interval(secs => $4) FROM generate_series(1, $3)"
        " RETURNING id",
        tenant,
        json.dumps(raw_request(f"{tenant} asks")),
        count,
        age_s,
    )
    return [row["id"] for row in rows]


# Ten applied batches that took 10 to 100 s (applied 1,000 s ago): the routing p90 in use is 91 s, the p50
# 55 s.
APPLIED_BATCHES = """
INSERT INTO batchd.batches (tag, status, request_count, bytes, created_at, applied_at)
SELECT lpad(i::text, 12, 'a'), 'applied', 1, 100, now() - make_interval(secs => 1000 + 10 * i),
       now() - make_interval(secs => 1000)
  FROM generate_series(1, 10) AS i
"""


# A known workload, as the statements that finish jobs tally it (the rollups' input): per tenant, jobs
# succeeded and failed, tokens, and what they cost at batch prices and would have cost through the Messages
# API. Nothing of it is in batchd.jobs: the overview must read it from the rollups.
WORKLOAD_TALLY = """
INSERT INTO batchd.tallies (tenant_id, status, path, model, jobs, billed, input_tokens, output_tokens,
                            cost_usd, sync_cost_usd)
VALUES ($1, 'succeeded', 'batch', 'm', $2, $2, $3, $4, $5, $6), ($1, 'failed', 'batch', '', $7, 0, 0, 0, 0, 0)
"""


async def add_workload(
    db: Any, tenant: str, *, succeeded: int, failed: int, tokens: tuple[int, int], cost: str, sync: str
) -> None:
    """`tokens`: (input, output); `cost` and `sync`: USD, at batch prices and at the Messages API's."""
    await db.execute(WORKLOAD_TALLY, tenant, succeeded, *tokens, Decimal(cost), Decimal(sync), failed)


async def run_python(
    *argv: str,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: bytes | None = None,
) -> tuple[int, str, str]:
    """Runs `python ARGV` to the end and returns (exit status, stdout, stderr): run_command with this
    interpreter."""
    return await run_command(sys.executable, *argv, timeout=timeout, env=env, cwd=cwd, stdin=stdin)


async def run_command(
    *argv: str,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    **spawn: Any,
) -> tuple[int, str, str]:
    """Runs `argv` to the end and returns (exit status, stdout, stderr); `env` is the whole environment when
    given, `spawn` goes to create_subprocess_exec (user, group, ...). communicate() returns only once nothing
    holds the pipes, so a child that left a server holding our stdout would hang here (as it would hang
    `$(...)` in a Makefile): it is killed when it outlives `timeout`."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
        **spawn,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout=timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# What a checkout accumulates locally, left out of the copies that tests build a release from.
CHECKOUT_LOCAL = (
    ".git",
    ".venv*",
    "__pycache__",
    "build",
    "dist",
    "*.egg-info",
    ".*_cache",
    ".batchd",
    "test-artifacts",
)


# -- the real daemon, as a process, stopped and killed ----------------------------------------------------


def daemon_config(path: Path, database_url: str, emulator_url: str, **sections: dict[str, Any]) -> Path:
    """A batchd.toml for `batchd run` in tests (settings_sections with process=True): small batches, quick
    polls and leases; sections override, e.g. daemon={"lease_s": 5}."""
    path.write_text(to_toml(settings_sections(database_url, emulator_url, sections, process=True)))
    return path


def to_toml(tables: dict[str, Any], prefix: str = "") -> str:
    """TOML for nested dicts of strings, numbers, booleans and lists of them (tomllib reads, never writes)."""
    lines, nested = [], []
    for key, value in tables.items():
        if isinstance(value, dict):
            nested.append(f"\n[{prefix}{toml_key(key)}]\n" + to_toml(value, f"{prefix}{toml_key(key)}."))
        else:
            lines.append(f"{toml_key(key)} = {toml_value(value)}\n")
    return "".join(lines + nested)


def toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's string escapes are TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def daemon_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("BATCHD_")}
    env["ANTHROPIC_API_KEY"] = "test-key"
    return env


# How tests start the command line: this environment's batchd, as a module. tests/test_wheel.py passes the
# console script of a wheel installed elsewhere instead.
BATCHD = (sys.executable, "-m", "batchd")


@asynccontextmanager
async def running_emulator(
    *args: str,
    batchd: Sequence[str] = BATCHD,
    port: str | None = "0",
    env: dict[str, str] | None = None,
    log: list[str] | None = None,
) -> AsyncIterator[str]:
    """Starts `batchd emulator --port 0 ARGS` (no --port when `port` is None; `env` over the test's own
    environment), yields its URL from the `emulator.listening` log line; at the end, SIGTERM must stop it
    cleanly (killed if it does not, or if the block failed). `log` gets the log's lines after the first."""
    options = ["--port", port] if port is not None else []
    process = await asyncio.create_subprocess_exec(
        *batchd,
        "emulator",
        *options,
        *args,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    assert process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stderr.readline(), timeout=30)
        event = json.loads(line)
        assert event["event"] == "emulator.listening", event
        yield event["url"]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
        rest = (await process.stderr.read()).decode()
        assert "emulator.stopped" in rest
        if log is not None:
            log.extend(rest.splitlines())
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@asynccontextmanager
async def daemon_process(
    config: Path, log: Path, env: dict[str, str] | None = None, batchd: Sequence[str] = BATCHD
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`batchd run` as a process, its log in a file (a pipe nobody reads would fill and stall it);
    killed if still running when the block ends. `env` is its whole environment (default: daemon_env())."""
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            *batchd,
            "run",
            "--config",
            str(config),
            env=daemon_env() if env is None else env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    async with watched(process, log):
        yield process


@asynccontextmanager
async def watched(process: asyncio.subprocess.Process, log: Path) -> AsyncIterator[None]:
    """A failure inside the block carries the end of the process's log (what it said is what explains the
    failure: CI shows nothing else); the process is killed if still running when the block ends."""
    try:
        yield
    except BaseException as error:
        error.add_note(f"{log.name}: {log_tail(log)}")
        raise
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def log_tail(log: Path, limit: int = 6000) -> str:
    text = log.read_text(errors="replace")[-limit:] if log.exists() else "(no log)"
    return f"the daemon's log ends:\n{text}"


def log_events(log: Path) -> Counter[str]:
    events: Counter[str] = Counter()
    for line in log.read_text().splitlines():
        try:
            events[json.loads(line)["event"]] += 1
        except (ValueError, KeyError, TypeError):
            continue
    return events


# -- the units' sandbox, as far as a test can build it without systemd ---------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """A unit file's `Key=value` lines (comments and sections left out), every value of each key."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", ";", "[")):
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
# Runs a command under the kernel's MemoryDenyWriteExecute (PR_SET_MDWE, Linux 6.3+), which is what the
# unit's MemoryDenyWriteExecute=yes asks systemd for: no writable-and-executable memory, no mapping made
# executable later. Inherited across exec.
UNDER_MDWE = f"""
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed: errno " + str(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def kernel_has_mdwe() -> bool:
    return bool(ctypes.CDLL(None, use_errno=True).prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0)


# PrivateUsers=yes: a user namespace mapping only the service's own user (to itself); PID and mount
# namespaces with a /proc of the process's own alone (ProtectProc=invisible, ProcSubset=pid). Making them
# takes root (or unprivileged user namespaces); --kill-child takes the command down with unshare.
IN_UNIT_NAMESPACES = (
    "unshare",
    "--user",
    "--map-current-user",
    "--pid",
    "--mount",
    "--fork",
    "--kill-child",
    "sh",
    "-c",
    'mount -t proc -o subset=pid,hidepid=invisible proc /proc && exec "$@"',
    "sh",
)


def unit_sandbox_unavailable() -> str | None:
    """Why this machine cannot build the units' namespaces (None: it can)."""
    try:
        probe = subprocess.run(
            [*IN_UNIT_NAMESPACES, "test", "!", "-e", "/proc/stat"],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return "no unshare (util-linux)"
    return None if probe.returncode == 0 else f"unshare failed: {probe.stderr.strip()}"


def in_unit_sandbox(argv: list[str]) -> list[str]:
    """`argv` (a Python command line) run as deploy/batchd.service would confine it, as far as the parts
    above go, and under MemoryDenyWriteExecute when the kernel can."""
    command = [sys.executable, "-c", UNDER_MDWE, *argv] if kernel_has_mdwe() else argv
    return [*IN_UNIT_NAMESPACES, *command]


def write_config(path: Path, database_url: str, extra: str = "") -> Path:
    path.write_text(
        f"""
[database]
url = "{database_url}"

[anthropic]
base_url = "http://127.0.0.1:1"

[http]
host = "127.0.0.1"
port = 0

[job_types.summarize]
model = "claude-haiku-4-5"
max_tokens = 256
fields = ["document_text"]
prompt = "Summarise: {{document_text}}"
{extra}
"""
    )
    return path


async def run_batchd(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: bytes | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    """`python -m batchd ARGS` in `cwd` (no stray ./batchd.toml), with no BATCHD_* nor API key from the
    test's own environment unless `env` gives them; killed if it outlives `timeout`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "ANTHROPIC_"))}
    clean.pop("CREDENTIALS_DIRECTORY", None)
    return await run_python(
        "-m", "batchd", *args, timeout=timeout, env={**clean, **(env or {})}, cwd=cwd, stdin=stdin
    )
