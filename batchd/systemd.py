"""systemd's notify protocol (sd_notify(3)), spoken directly: readiness, status, the watchdog, stopping.

Under `Type=notify` systemd sets `$NOTIFY_SOCKET`: the path of an AF_UNIX datagram socket, or an abstract
socket's name when it starts with '@'. A message is one datagram of newline-separated `KEY=VALUE` lines.
Without `$NOTIFY_SOCKET` (not run by systemd) every call does nothing. A send that fails is logged once and
otherwise ignored: the daemon never stops because systemd did not hear it (systemd acts on its own
timeouts when READY=1 or WATCHDOG=1 do not arrive).

`WatchdogSec=` sets `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, the process it is meant for). `Notifier.run`
sends WATCHDOG=1 at half that interval from a task on the event loop, so a loop blocked for longer than
that stops the pings and systemd restarts the daemon; it refreshes STATUS= in a task of its own, so a slow
status query never holds a ping back.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

import structlog

log = structlog.get_logger("batchd.systemd")


def socket_address(notify_socket: str) -> str | None:
    """`$NOTIFY_SOCKET` as an address for `sendto`: a path as it is, '@name' as the abstract '\\0name'.
    None for anything else (such as systemd's `vsock:` addresses for virtual machines)."""
    if notify_socket.startswith("@"):
        return "\0" + notify_socket[1:]
    if notify_socket.startswith("/"):
        return notify_socket
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of `$WATCHDOG_USEC`, when the watchdog is meant for `pid`
    (`$WATCHDOG_PID` unset or equal to it); None when there is no watchdog for this process."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        target = int(environ.get("WATCHDOG_PID") or pid)
    except ValueError:
        return None
    if usec <= 0 or target != pid:
        return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends notify messages to `address` (None: every call is a no-op)."""

    def __init__(self, address: str | None, watchdog_interval_s: float | None = None) -> None:
        self.address = address
        self.watchdog_interval_s = watchdog_interval_s if address is not None else None
        self._socket: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        environ = os.environ if environ is None else environ
        notify_socket = environ.get("NOTIFY_SOCKET", "")
        address = socket_address(notify_socket) if notify_socket else None
        if notify_socket and address is None:
            log.warning("systemd.notify_socket_unsupported", notify_socket=notify_socket)
        return cls(address, watchdog_interval(environ, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Sends `KEY=VALUE` lines as one message; True when it was sent. Never raises, never blocks: a
        failure is logged the first time (again only after a send has succeeded since)."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # A service manager that does not read must not stall the event loop: EAGAIN is a failure.
                self._socket.settimeout(0.0)
            self._socket.sendto("\n".join(assignments).encode(), self.address)
        except OSError as error:
            if not self._failing:
                self._failing = True
                log.warning("systemd.notify_failed", error=str(error), message=assignments[0])
            return False
        if self._failing:
            self._failing = False
            log.info("systemd.notify_recovered")
        return True

    def ready(self) -> bool:
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def run(self, status: Callable[[], Awaitable[str]], status_interval_s: float) -> None:
        """Pings the watchdog (when there is one) and refreshes STATUS= from `status()` every
        `status_interval_s`, until cancelled. An exception from `status` ends it."""
        async with asyncio.TaskGroup() as group:
            if self.watchdog_interval_s is not None:
                group.create_task(self._ping(self.watchdog_interval_s), name="systemd-watchdog")
            group.create_task(self._refresh(status, status_interval_s), name="systemd-status")

    async def _ping(self, interval_s: float) -> None:
        # Only as regular as the event loop: a loop stuck for the whole watchdog interval misses pings.
        while True:
            self.watchdog()
            await asyncio.sleep(interval_s)

    async def _refresh(self, status: Callable[[], Awaitable[str]], interval_s: float) -> None:
        while True:
            self.status(await status())
            await asyncio.sleep(interval_s)
