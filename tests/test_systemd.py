"""systemd's notify protocol: batchd/systemd.py on its own, then `batchd run` as systemd would run it, talking
to a notify socket the test binds (a path, and an abstract name)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sse_support import sse_stream
from support import (
    UNDER_MDWE,
    EmulatorHandle,
    daemon_config,
    insert_raw,
    kernel_has_mdwe,
    log_tail,
    wait_until,
)

from batchd import systemd
from batchd.systemd import Notifier, socket_address, watchdog_interval

# -- a notify socket, as systemd binds it --------------------------------------------------------------------


def bind_notify_socket(notify_socket: str) -> socket.socket:
    """A datagram socket bound at `$NOTIFY_SOCKET`'s address ('@name': abstract), not blocking."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket)
    sock.setblocking(False)  # noqa: FBT003 - the socket API's own flag
    return sock


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on `sock`, without waiting for more."""
    received = []
    while True:
        try:
            received.append(sock.recv(65536))
        except BlockingIOError:
            return received


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a socket's path must fit in 108 bytes, pytest's tmp_path may not."""
    with tempfile.TemporaryDirectory(prefix="batchd-sd-") as name:
        yield Path(name)


class Recorder:
    """Stands in for the module's structlog logger: what was logged, by level and event."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **fields: self.entries.append((level, event, fields))


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(systemd, "log", recorder)
    return recorder


# -- batchd/systemd.py ---------------------------------------------------------------------------------------


def test_without_a_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "400000"}, pid=os.getpid())
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None, "no socket, no watchdog pings"
    assert [notifier.ready(), notifier.status("x"), notifier.watchdog(), notifier.stopping()] == [False] * 4
    assert notifier._socket is None, "nothing was even opened"
    notifier.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_messages_reach_a_path_or_an_abstract_socket(kind: str, short_dir: Path) -> None:
    notify_socket = str(short_dir / "notify") if kind == "path" else f"@batchd-test-{uuid.uuid4().hex}"
    with bind_notify_socket(notify_socket) as sock:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": notify_socket})
        assert notifier.enabled
        assert notifier.ready()
        assert notifier.status("queued 3,\nopen batches 1")  # one line, whatever it was given
        assert notifier.notify("WATCHDOG=1", "STATUS=two in one")
        assert notifier.stopping()
        notifier.close()
        assert drain(sock) == [
            b"READY=1",
            b"STATUS=queued 3, open batches 1",
            b"WATCHDOG=1\nSTATUS=two in one",
            b"STOPPING=1",
        ]


def test_socket_addresses() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@/org/freedesktop/systemd1/notify") == "\0/org/freedesktop/systemd1/notify"
    assert socket_address("vsock:2:1234") is None
    assert socket_address("relative/path") is None


def test_an_unsupported_socket_is_said_once_and_disables_notifying(logged: Recorder) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert not notifier.ready()
    assert notifier.watchdog_interval_s is None
    assert [(level, event) for level, event, _ in logged.entries] == [
        ("warning", "systemd.notify_socket_unsupported")
    ]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "400000"}, 0.2),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),  # meant for this process
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "me"}, None),
    ],
)
def test_the_watchdog_interval_is_half_the_timeout_for_this_process(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ, 4242) == expected


def test_a_failed_send_never_raises_and_is_logged_once(short_dir: Path, logged: Recorder) -> None:
    path = short_dir / "notify"
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(path)})
    # Nobody listens there yet.
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert [(level, event) for level, event, _ in logged.entries] == [("warning", "systemd.notify_failed")]
    assert logged.entries[0][2]["message"] == "READY=1"
    # Someone does now: sent, and the recovery is said once.
    with bind_notify_socket(str(path)) as sock:
        assert notifier.watchdog()
        assert notifier.watchdog()
        assert [event for _, event, _ in logged.entries] == [
            "systemd.notify_failed",
            "systemd.notify_recovered",
        ]
        # A receiver that stops reading: its queue fills and sends fail at once instead of blocking.
        started = time.monotonic()
        results = [notifier.status(f"n {i}") for i in range(1000)]
        assert time.monotonic() - started < 5
        assert results[0]
        assert not results[-1]
        assert [event for _, event, _ in logged.entries][-1] == "systemd.notify_failed"
        assert len(logged.entries) == 3, "a streak of failures is logged once"
        assert len(drain(sock)) == 2 + results.count(True)  # the two pings, then what fitted
    notifier.close()


async def receive(sock: socket.socket, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 65536), timeout)


async def test_run_pings_from_the_event_loop_and_a_slow_status_does_not_hold_pings_back(
    short_dir: Path,
) -> None:
    path = str(short_dir / "notify")
    with bind_notify_socket(path) as sock:
        notifier = Notifier(path, watchdog_interval_s=0.05)
        release = asyncio.Event()
        calls = 0

        async def status() -> str:
            nonlocal calls
            calls += 1
            if calls == 2:
                await release.wait()  # the second query hangs
            return f"call {calls}"

        task = asyncio.create_task(notifier.run(status, 0.05))
        try:
            seen: list[bytes] = []
            while seen.count(b"WATCHDOG=1") < 5:  # the status query hangs meanwhile
                seen.append(await receive(sock))
            assert seen.count(b"STATUS=call 1") == 1
            assert b"STATUS=call 2" not in seen

            # A blocked loop sends nothing: the pings come from a task on it, not from a thread.
            drain(sock)
            time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point
            assert drain(sock) == []
            assert await receive(sock) == b"WATCHDOG=1"

            release.set()
            while (message := await receive(sock)) != b"STATUS=call 3":
                assert message in {b"WATCHDOG=1", b"STATUS=call 2"}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            notifier.close()


async def test_run_ends_with_the_status_callables_error(short_dir: Path) -> None:
    path = str(short_dir / "notify")
    with bind_notify_socket(path):
        notifier = Notifier(path, watchdog_interval_s=0.05)

        async def broken() -> str:
            raise LookupError("no such column")

        with pytest.raises(ExceptionGroup) as raised:
            await asyncio.wait_for(notifier.run(broken, 0.05), timeout=5)
        assert raised.group_contains(LookupError)
        notifier.close()


# -- `batchd run` under a notify socket ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NotifyListener:
    """The test's notify socket: records every `KEY=VALUE` line that arrives, with when it arrived."""

    def __init__(self, notify_socket: str) -> None:
        self.notify_socket = notify_socket
        self.sock = bind_notify_socket(notify_socket)
        self.lines: list[tuple[float, str]] = []
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            datagram = await loop.sock_recv(self.sock, 65536)
            now = time.monotonic()
            self.lines.extend((now, line) for line in datagram.decode().split("\n"))
            self._arrived.set()

    def values(self, key: str) -> list[str]:
        return [line.partition("=")[2] for _, line in self.lines if line.partition("=")[0] == key]

    async def until(self, condition: Callable[[], bool], what: str, log: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout} s; got {self.lines[-5:]}; {log_tail(log)}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sock.close()


@asynccontextmanager
async def batchd_run(
    config: Path, log: Path, env: dict[str, str]
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`batchd run` as systemd starts it (under MemoryDenyWriteExecute when the kernel can), its log in a
    file; killed when the block ends, whatever happened."""
    clean = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("BATCHD_", "ANTHROPIC_", "NOTIFY_", "WATCHDOG_", "CREDENTIALS_"))
    }
    command = [sys.executable, "-m", "batchd", "run", "--config", str(config)]
    if kernel_has_mdwe():
        command = [sys.executable, "-c", UNDER_MDWE, *command]
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            *command,
            env={**clean, "ANTHROPIC_API_KEY": "test-key", **env},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("kind", ["path", "abstract"])
async def test_batchd_run_speaks_the_notify_protocol(
    kind: str,
    db: Any,
    tokens: dict[str, str],
    *,
    emulator: EmulatorHandle,
    database_url: str,
    tmp_path: Path,
    short_dir: Path,
) -> None:
    notify_socket = str(short_dir / "notify") if kind == "path" else f"@batchd-test-{uuid.uuid4().hex}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # 1,000 jobs make a batch; fewer wait an hour: what is left over stays queued for the whole test.
    config = daemon_config(
        tmp_path / "batchd.toml",
        database_url,
        emulator.url,
        anthropic={"timeout_s": 30},
        batching={"max_requests": 1000, "max_wait_s": 3600},
        polling={"min_interval_s": 0.2, "max_interval_s": 0.5},
        daemon={"status_interval_s": 0.2},
        http={"port": port},
    )
    log = tmp_path / "daemon.log"
    notified = NotifyListener(notify_socket)
    env = {"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "400000"}
    try:
        async with batchd_run(config, log, env) as process, aiohttp.ClientSession() as http:

            def said(key: str, value: str | None = None) -> Callable[[], bool]:
                return lambda: any(value is None or seen == value for seen in notified.values(key))

            # READY=1 only once it is ready: /readyz answers 200 the moment READY=1 has arrived.
            await notified.until(said("READY", "1"), "READY=1", log)
            async with http.get(f"{url}/readyz") as response:
                assert response.status == 200, await response.text()

            await notified.until(said("STATUS", "queued 0, open batches 0, streams 0"), "an idle STATUS", log)
            # A stream of acme's events, read as they come (as a client should).
            async with sse_stream(http, url, tokens["acme"]) as stream:
                await notified.until(said("STATUS", "queued 0, open batches 0, streams 1"), "a stream", log)

                # 1,234 jobs: a batch of 1,000 goes out, 234 wait (max_wait_s is an hour).
                await insert_raw(db, "acme", [f"question {i}" for i in range(1234)])
                await notified.until(
                    said("STATUS", "queued 234, open batches 1, streams 1"), "the queue's depth", log
                )
                assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE status = 'queued'") == 234

                # The batch ends and its results are applied: no batch open any more. The STATUS counts a
                # batch from the moment it is recorded: the clock moves only once the provider has it.
                async def created() -> bool:
                    return bool(
                        await db.fetchval(
                            "SELECT count(*) FROM batchd.batches WHERE provider_batch_id IS NOT NULL"
                        )
                    )

                await wait_until(created)
                await emulator.advance(120)
                await notified.until(
                    said("STATUS", "queued 234, open batches 0, streams 1"), "the batch's end", log
                )
                succeeded = "SELECT count(*) FROM batchd.jobs WHERE status = 'succeeded'"
                assert await db.fetchval(succeeded) == 1000

                def pings_so_far() -> list[float]:
                    return [at for at, line in notified.lines if line == "WATCHDOG=1"]

                # A busy machine may have run the steps above in under a second: wait for five pings.
                await notified.until(lambda: len(pings_so_far()) >= 5, "five WATCHDOG=1", log)
                pings = pings_so_far()
                # Every 0.2 s: half of WATCHDOG_USEC (loose bounds: this machine is shared).
                assert 0.1 <= statistics.median(b - a for a, b in itertools.pairwise(pings)) <= 0.4

                process.send_signal(signal.SIGTERM)
                await notified.until(said("STOPPING", "1"), "STOPPING=1", log)
                assert await asyncio.wait_for(process.wait(), timeout=20) == 0, log_tail(log)
                await asyncio.wait_for(stream.ended.wait(), timeout=5)
                assert stream.messages[-1].event == "disconnect"
    finally:
        await notified.close()

    keys = [line.partition("=")[0] for _, line in notified.lines]
    assert set(keys) == {"READY", "STATUS", "WATCHDOG", "STOPPING"}, set(keys)
    assert keys.count("READY") == 1
    assert keys.count("STOPPING") == 1
    assert keys.index("READY") < keys.index("STOPPING")
    events = [json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")]
    assert "daemon.stopped" in events
    assert "systemd.notify_failed" not in events
