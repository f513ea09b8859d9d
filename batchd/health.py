"""The API as this daemon last found it, and the gate in front of everything that sends to it.

A wrong or revoked API key used to pass unnoticed: the daemon said it was ready, jobs went into batches whose
creates were refused, and the sync path spent the jobs' attempts on 401s. Now the API has a state, one of

- `unchecked`: the daemon is starting and has not asked yet;
- `ok`: the last check passed (or, for a provider nobody checks, it is assumed);
- `refused`: the API answered 401 or 403, to the check or to any call: the key (or what it may do);
- `unreachable`: the last check got no answer (the network, a wrong `base_url`, a proxy).

Only `ok` lets anything be sent: while the API is in any other state the flusher claims nothing (jobs stay
`queued`), the sync sender claims nothing, and each open batch's next call waits (supervisor.py). No job
spends an attempt on it and none fails for it; `/readyz` answers 503 naming the API's URL (never the key)
and the reason, and systemd's STATUS= says so.

`watch`, a task of the daemon, makes the check at start (once the HTTP server is up) and, while the API is
not `ok`, again after a backoff that grows from `daemon.retry_min_s` to CHECK_MAX_S. The check is one
cheap authenticated call, a list of one batch (provider.py, `check`): it needs exactly what batchd needs,
a key that may use the Message Batches API. Any answer but a 401 or 403 is `ok` (a 429 or a 5xx is the
API there and the key not refused; each call's own failures are handled where they happen); no answer is
`unreachable`. Only a check moves the state back to `ok`. Before each new check of a refused key, the key
is read again from where it came from (`[anthropic] api_key_file`, or the systemd credential, which
systemd copies at start: fix the file it loads and restart), so a fixed key file needs no restart; a key
from `ANTHROPIC_API_KEY` cannot change under a running process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import structlog

from .aio import wait_for_any, wait_for_event
from .backoff import Backoff
from .config import ConfigError

log = structlog.get_logger("batchd.health")

UNCHECKED = "unchecked"
OK = "ok"
REFUSED = "refused"
UNREACHABLE = "unreachable"
STATES = (UNCHECKED, OK, REFUSED, UNREACHABLE)  # batchd.instances' api_state allows exactly these
KEY_REFUSED = frozenset({401, 403})
# The check's own deadline (within anthropic.timeout_s): an API that does not answer a list of one batch
# within it is unreachable for now. It also bounds how long a start waits for the first check.
CHECK_TIMEOUT_S = 10.0
# While the API is not ok it is checked again at least this often, however long the failure has lasted.
CHECK_MAX_S = 60.0
_IDLE_S = 3600.0  # an ok API is not checked; the watcher only wakes to see whether it is stopping
_REASON_CHARS = 200


class ApiHealth:
    """The API's state as this process last found it (see the module's docstring), with when and why."""

    def __init__(self, url: str, *, state: str = OK) -> None:
        self.url = url
        self.state = state
        self.reason: str | None = None
        self.checked_at: datetime | None = None  # when a check (or a call's refusal) last set the state
        # Told of every change of state: the daemon wakes the parts the gate held, and writes its row.
        self.on_change: Callable[[], None] = lambda: None
        self.checked = asyncio.Event()  # set once the first check has answered, or failed to
        self._usable = asyncio.Event()
        self._trouble = asyncio.Event()  # set when the state leaves ok: the watcher checks again
        if state == OK:
            self._usable.set()

    @property
    def usable(self) -> bool:
        return self.state == OK

    def problem(self) -> str | None:
        """What `/readyz` and systemd's STATUS= say while nothing may be sent: the API's URL and why (the
        key is never named); None while the API is ok."""
        if self.state == OK:
            return None
        if self.state == UNCHECKED:
            return f"api {self.url}: not checked yet"
        return f"api {self.url}: {self.reason}"

    async def wait_usable(self, stopping: asyncio.Event, seconds: float) -> None:
        """Waits until the API is ok, the daemon stops, or `seconds` pass, whichever comes first."""
        await wait_for_any(self._usable, stopping, seconds=seconds)

    async def wait_trouble(self, stopping: asyncio.Event, seconds: float) -> None:
        """Waits until the API is not ok, the daemon stops, or `seconds` pass, whichever comes first."""
        await wait_for_any(self._trouble, stopping, seconds=seconds)

    def refused(self, status: int, endpoint: str, message: str) -> None:
        """A call (or the check) was answered 401 or 403: the key, or what it may do, is refused."""
        reason = f"the API key was refused ({status})"
        self._set(REFUSED, reason, status=status, endpoint=endpoint, error=message)

    def unreachable(self, error: str) -> None:
        self._set(UNREACHABLE, _short(f"unreachable: {error}"), error=error)

    def passed(self, note: str | None = None) -> None:
        """The check was answered, and not with a refusal of the key."""
        self._set(OK, note)

    def _set(self, state: str, reason: str | None, **fields: object) -> None:
        was, before = self.state, self.reason
        self.state, self.reason, self.checked_at = state, reason, datetime.now(UTC)
        if state == OK:
            self._usable.set()
            self._trouble.clear()
        else:
            self._usable.clear()
            self._trouble.set()
        if (state, reason) == (was, before) or (state == was == OK):
            return  # logged once per change, not at every check or call
        bound = log.bind(api=self.url, was=was)
        if state == OK:
            bound.info("api.ok", note=reason)
        elif state == REFUSED:
            bound.error("api.key_refused", reason=reason, **fields)
        else:
            bound.warning("api.unreachable", reason=reason, **fields)
        self.on_change()


class Checkable(Protocol):
    """What the watcher needs of the provider (provider.Provider is one): its health, a check, a key."""

    health: ApiHealth

    async def check(self, timeout_s: float) -> None:
        """One cheap authenticated call; its answer sets `health`."""

    def set_api_key(self, key: str) -> bool:
        """Uses `key` from now on; True when it differs from the one in use."""


async def watch(
    provider: Checkable,
    *,
    stopping: asyncio.Event,
    backoff: Backoff,
    timeout_s: float,
    reload_key: Callable[[], str] | None,
) -> None:
    """Checks the API at once, then again after a growing backoff for as long as it is not ok (reading a
    refused key again first), and again whenever a call finds the key refused. Runs until `stopping`."""
    health = provider.health
    failures = 0
    while not stopping.is_set():
        if health.state == OK:
            failures = 0
            await health.wait_trouble(stopping, _IDLE_S)
            continue
        if health.state != UNCHECKED:  # the first check goes at once
            failures += 1
            if await wait_for_event(stopping, backoff.wait_s(failures, cap=CHECK_MAX_S)):
                return
            if health.state == REFUSED and reload_key is not None:
                _reload(provider, reload_key)
        try:
            await provider.check(timeout_s)
        finally:
            health.checked.set()


def _reload(provider: Checkable, reload_key: Callable[[], str]) -> None:
    """Reads the key again from its source; a changed one replaces the refused one (neither is logged)."""
    try:
        key = reload_key()
    except ConfigError as error:
        log.warning("api.key_reload_failed", error=str(error))
        return
    if provider.set_api_key(key):
        log.info("api.key_reloaded")


def check_timeout(api_timeout_s: float) -> float:
    """The check's deadline: CHECK_TIMEOUT_S, or the API's own timeout when that is shorter."""
    return min(CHECK_TIMEOUT_S, api_timeout_s)


def _short(text: str) -> str:
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 1] + "…"
