"""The one LISTEN connection: it wakes the daemon when producers insert, and survives losing the server.

It is a dedicated connection, outside the pool (the pool sends UNLISTEN * when a connection comes back).
Notifications sent while it is disconnected are lost, so every (re)connection calls `on_connect`, which
sweeps for work; a probe — a NOTIFY to itself — proves the connection still delivers, so a half-open
socket is noticed within `probe_interval_s` instead of hours later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from .aio import wait_for_any, wait_for_event
from .backoff import Backoff
from .store import DB_ERRORS, sql

log = structlog.get_logger("batchd.listener")

JOBS_CHANNEL = "batchd_jobs"
PROBE_CHANNEL = "batchd_probe"
RECONNECT_MIN_S = 0.2  # then twice as long after each failure in a row, up to max_backoff_s


class Listener:
    def __init__(
        self,
        url: str,
        channels: dict[str, Callable[[], None]],
        on_connect: Callable[[], None],
        *,
        probe_interval_s: float = 15.0,
        probe_timeout_s: float = 5.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.url = url
        self.channels = channels
        self.on_connect = on_connect
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.max_backoff_s = max_backoff_s
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._probe_answered = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        backoff = Backoff(RECONNECT_MIN_S, self.max_backoff_s)
        failures = 0  # connections failed in a row
        while not stopping.is_set():
            try:
                connection = await asyncpg.connect(
                    self.url,
                    server_settings={
                        "application_name": "batchd-listener",
                        # The server notices a dead client; the probe below covers the other direction.
                        "tcp_keepalives_idle": "30",
                        "tcp_keepalives_interval": "10",
                        "tcp_keepalives_count": "3",
                    },
                )
            except (OSError, asyncpg.PostgresError, TimeoutError) as error:
                failures += 1
                wait = backoff.wait_s(failures)
                log.warning("listener.connect_failed", error=str(error), retry_in_s=round(wait, 3))
                if await wait_for_event(stopping, wait):
                    return
                continue
            failures = 0
            try:
                await self._serve(connection, stopping)
            except DB_ERRORS as error:
                log.warning("listener.disconnected", error=str(error))
            finally:
                self.connected.clear()
                if not connection.is_closed():
                    connection.terminate()
            self.reconnects += 1

    async def _serve(self, connection: asyncpg.Connection, stopping: asyncio.Event) -> None:
        # A connection the server closes (a restart, pg_terminate_backend) is noticed at once; a half-open
        # one, which closes nothing, by the probe below.
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _: lost.set())
        for channel, callback in self.channels.items():
            await connection.add_listener(channel, _ignore_payload(callback))
        await connection.add_listener(PROBE_CHANNEL, lambda *_: self._probe_answered.set())
        self.connected.set()
        log.info("listener.connected", channels=sorted(self.channels))
        # Anything queued while no one listened is found now.
        self.on_connect()
        while not stopping.is_set():
            await wait_for_any(stopping, lost, seconds=self.probe_interval_s)
            if stopping.is_set():
                return
            if lost.is_set():
                raise ConnectionResetError("the server closed the listener's connection")
            self._probe_answered.clear()
            await connection.execute(sql("probe_listener"))
            await asyncio.wait_for(self._probe_answered.wait(), timeout=self.probe_timeout_s)


def _ignore_payload(callback: Callable[[], None]) -> Callable[..., None]:
    def on_notification(*_: Any) -> None:
        callback()

    return on_notification
