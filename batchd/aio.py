"""asyncio helpers the daemon's parts share: waiting on events, and the one loop every long-running part runs.

`run_loop` is the loop of the flusher, the sync sender, the supervisor's leases, the publisher, the event hub
and the pruner: each part is only its step. The loop runs the step, then waits until it is woken, the step's
own next time comes, or `idle_s` passes, whichever is first; it returns as soon as `stopping` is set, in a
wait or after a step. A step that fails with an error the part expects (the database away, ...) is tried
again after a back-off (backoff.py), growing with each failure in a row, never longer than the part's
`idle_s`: a failing part looks no less often than an idle one. A wake-up cuts a back-off short (after an
outage the listener's reconnection wakes everyone). A failure streak is logged twice, when it starts and
when it ends, not at every retry. Any other error ends the loop, and the daemon with it (daemon.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from .backoff import Backoff

log = structlog.get_logger("batchd.aio")


async def wait_for_event(event: asyncio.Event, seconds: float) -> bool:
    """Waits up to `seconds` for `event`; True if it is set."""
    try:
        await asyncio.wait_for(event.wait(), timeout=max(0.0, seconds))
    except TimeoutError:
        return False
    return True


async def wait_for_any(*events: asyncio.Event, seconds: float) -> None:
    """Waits up to `seconds` for the first of `events` to be set."""
    if any(event.is_set() for event in events):
        return
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def run_loop(
    name: str,
    step: Callable[[], Awaitable[float | None]],
    *,
    stopping: asyncio.Event,
    wake: asyncio.Event | None,
    idle_s: float | Callable[[], float],
    backoff: Backoff,
    errors: tuple[type[Exception], ...],
) -> None:
    """Runs `step` until `stopping` is set.

    `step` returns the seconds until it is next due by the clock, or None (only a wake-up or `idle_s` brings
    more). `idle_s` may be a function, read after each step (the sync sender looks more often while its
    calls hold leases). `errors` are those the part expects and retries; `name` names it in the log.
    """
    failures = 0
    failing_since = 0.0
    clock = asyncio.get_running_loop().time
    events = (stopping,) if wake is None else (wake, stopping)
    while not stopping.is_set():
        if wake is not None:
            # Cleared before the step: a wake-up while it runs means one more step, not a missed one.
            wake.clear()
        try:
            due_in = await step()
        except errors as error:
            failures += 1
            wait = backoff.wait_s(failures, cap=_seconds(idle_s))
            if failures == 1:
                failing_since = clock()
                log.warning(
                    "loop.failing", loop=name, error=str(error) or repr(error), retry_in_s=round(wait, 3)
                )
        else:
            if failures:
                log.info(
                    "loop.recovered",
                    loop=name,
                    failures=failures,
                    failed_for_s=round(clock() - failing_since, 3),
                )
                failures = 0
            idle = _seconds(idle_s)
            wait = idle if due_in is None else min(due_in, idle)
        await wait_for_any(*events, seconds=wait)


def _seconds(value: float | Callable[[], float]) -> float:
    return value() if callable(value) else value
