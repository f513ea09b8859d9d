"""aio.run_loop, the loop every long-running part of the daemon runs: woken, idle, stopped, backing off."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import structlog
from support import make_settings, wait_until

from batchd import aio, pruner, rollups, store
from batchd.backoff import JITTER, Backoff
from batchd.context import Context
from batchd.events import EventHub
from batchd.flusher import Flusher
from batchd.provider import Provider
from batchd.publisher import Publisher
from batchd.ratelimit import RateLimiter
from batchd.supervisor import Supervisor
from batchd.sync import SyncSender

LONG_S = 3600.0  # an interval no test waits out: a loop that returns or steps sooner was told to
SLACK_S = 10.0  # a deadline for what should happen at once, on a loaded machine


class FailingError(Exception):
    """The error the test's loops expect (as the daemon's expect the database's)."""


class Steps:
    """A step that follows a script: "fail" raises FailingError, a number is returned as the next step's time,
    None is returned as is. When the script runs out it sets `stopping`."""

    def __init__(self, script: Sequence[str | float | None], stopping: asyncio.Event) -> None:
        self.script = list(script)
        self.stopping = stopping
        self.count = 0
        self.at: list[float] = []  # loop time of each step

    async def __call__(self) -> float | None:
        self.count += 1
        self.at.append(asyncio.get_running_loop().time())
        if not self.script:
            self.stopping.set()
            return None
        what = self.script.pop(0)
        if what == "fail":
            raise FailingError("the database is away")
        assert not isinstance(what, str)
        return what


@asynccontextmanager
async def looping(
    step: Callable[[], Awaitable[float | None]],
    stopping: asyncio.Event,
    *,
    wake: asyncio.Event | None = None,
    idle_s: float | Callable[[], float] = LONG_S,
    backoff: Backoff = Backoff(1.0, 300.0),  # noqa: B008 - immutable
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(
        aio.run_loop(
            "test", step, stopping=stopping, wake=wake, idle_s=idle_s, backoff=backoff, errors=(FailingError,)
        )
    )
    try:
        yield task
    finally:
        stopping.set()
        await asyncio.wait_for(task, timeout=SLACK_S)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The seconds of every wait run_loop starts (the waits themselves still happen)."""
    recorded: list[float] = []
    real = aio.wait_for_any

    async def recording(*events: asyncio.Event, seconds: float) -> None:
        recorded.append(seconds)
        await real(*events, seconds=seconds)

    monkeypatch.setattr(aio, "wait_for_any", recording)
    return recorded


async def test_a_wake_up_runs_the_next_step_at_once() -> None:
    stopping, wake = asyncio.Event(), asyncio.Event()
    steps = Steps([None] * 10, stopping)
    async with looping(steps, stopping, wake=wake):
        await wait_until(lambda: _true(steps.count == 1), timeout=SLACK_S)
        wake.set()
        await wait_until(lambda: _true(steps.count == 2), timeout=SLACK_S)
        wake.set()
        await wait_until(lambda: _true(steps.count == 3), timeout=SLACK_S)
        assert not wake.is_set(), "cleared before each step"


async def test_idle_steps_come_every_idle_s_or_when_the_step_says(waits: list[float]) -> None:
    stopping = asyncio.Event()
    # None: the idle interval; 0.05: the step's own time, sooner; 1000: later than idle, so idle.
    steps = Steps([None, 0.05, 1000.0, None], stopping)
    async with looping(steps, stopping, idle_s=0.2) as task:
        await asyncio.wait_for(task, timeout=SLACK_S)
    assert steps.count == 5  # the fifth found the script empty and stopped
    assert waits[:4] == [0.2, 0.05, 0.2, 0.2]
    assert waited_at_least(steps.at, waits)


async def test_idle_s_may_be_read_after_each_step(waits: list[float]) -> None:
    stopping = asyncio.Event()
    intervals = iter([0.01, 0.02, 0.03, 0.04])
    steps = Steps([None, None, None], stopping)
    async with looping(steps, stopping, idle_s=lambda: next(intervals)) as task:
        await asyncio.wait_for(task, timeout=SLACK_S)
    assert waits[:3] == [0.01, 0.02, 0.03]


@pytest.mark.parametrize("failing", [False, True], ids=["idle", "backing_off"])
async def test_it_returns_at_once_when_stopping_is_set(failing: bool) -> None:
    stopping = asyncio.Event()
    steps = Steps(["fail" if failing else None] * 3, stopping)
    # Both waits are an hour: only `stopping` can end them.
    async with looping(steps, stopping, backoff=Backoff(LONG_S, LONG_S)) as task:
        await wait_until(lambda: _true(steps.count == 1), timeout=SLACK_S)
        stopping.set()
        await asyncio.wait_for(task, timeout=SLACK_S)
    assert steps.count == 1


async def test_failures_back_off_growing_and_each_streak_is_logged_once(waits: list[float]) -> None:
    stopping = asyncio.Event()
    low, high = 0.01, 0.08
    steps = Steps(["fail"] * 5 + [0.0] + ["fail"] * 2 + [0.0], stopping)
    with structlog.testing.capture_logs() as logged:
        async with looping(steps, stopping, backoff=Backoff(low, high)) as task:
            await asyncio.wait_for(task, timeout=SLACK_S)
    # The first streak: low, doubling, up to high, each less up to a quarter at random.
    first = waits[:5]
    ceilings = [0.01, 0.02, 0.04, 0.08, 0.08]
    assert all((1 - JITTER) * c <= w <= c for w, c in zip(first, ceilings, strict=True)), first
    assert waits[5] == 0.0  # the success: its own next time
    # The second streak starts from low again.
    assert [(1 - JITTER) * c <= w <= c for w, c in zip(waits[6:8], ceilings, strict=False)] == [True, True]
    assert waited_at_least(steps.at, waits)

    events = [(entry["event"], entry) for entry in logged if entry["event"].startswith("loop.")]
    assert [name for name, _ in events] == ["loop.failing", "loop.recovered"] * 2
    failing, recovered = events[0][1], events[1][1]
    assert failing["log_level"] == "warning"
    assert failing["loop"] == "test"
    assert failing["error"] == "the database is away"
    assert failing["retry_in_s"] == round(first[0], 3)
    assert recovered["log_level"] == "info"
    assert recovered["failures"] == 5
    assert recovered["failed_for_s"] >= sum(first) - 0.001
    assert events[3][1]["failures"] == 2


async def test_a_back_off_is_no_longer_than_the_loops_idle_interval(waits: list[float]) -> None:
    stopping = asyncio.Event()
    steps = Steps(["fail"] * 4, stopping)
    async with looping(steps, stopping, idle_s=0.02, backoff=Backoff(0.01, 300.0)) as task:
        await asyncio.wait_for(task, timeout=SLACK_S)
    assert 0.0075 <= waits[0] <= 0.01
    assert all((1 - JITTER) * 0.02 <= w <= 0.02 for w in waits[1:4]), waits


async def test_a_wake_up_cuts_a_back_off_short() -> None:
    stopping, wake = asyncio.Event(), asyncio.Event()
    steps = Steps(["fail", None], stopping)
    async with looping(steps, stopping, wake=wake, backoff=Backoff(LONG_S, LONG_S)):
        await wait_until(lambda: _true(steps.count == 1), timeout=SLACK_S)
        wake.set()  # e.g. the listener reconnected: the database is back
        await wait_until(lambda: _true(steps.count == 2), timeout=SLACK_S)


async def test_an_unexpected_error_ends_the_loop() -> None:
    async def broken() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        await aio.run_loop(
            "test",
            broken,
            stopping=asyncio.Event(),
            wake=None,
            idle_s=LONG_S,
            backoff=Backoff(0.01, 0.01),
            errors=(FailingError,),
        )


async def test_every_loop_of_the_daemon_stops_at_once_when_it_is_stopping(
    database_url: str, waits: list[float]
) -> None:
    """The flusher's wait, the sync sender's and the supervisor's did not watch `stopping`: each went on
    for up to its interval after shutdown began (the daemon cancelled them)."""
    settings = make_settings(
        database_url,
        "http://127.0.0.1:9",  # never called: nothing is queued
        daemon={"sweep_interval_s": LONG_S, "lease_s": 3 * LONG_S},
        events={"poll_interval_s": LONG_S, "prune_interval_s": LONG_S},
        retention={"interval_s": LONG_S},
        rollups={"fold_interval_s": LONG_S},
    )
    pool = await store.create_pool(database_url, min_size=1, max_size=8)
    provider = Provider("test-key", base_url="http://127.0.0.1:9", limiter=RateLimiter(60), timeout_s=1)
    ctx = Context(pool=pool, settings=settings, provider=provider)
    hub = EventHub(pool, settings.events)
    loops: dict[str, Awaitable[None]] = {
        "flusher": Flusher(ctx, on_batch=lambda *_: None).run(),
        "sync": SyncSender(ctx).run(),
        "supervisor": Supervisor(ctx).run(),
        "publisher": Publisher(ctx).run(),
        "events": hub.run(ctx.stopping, ctx.backoff),
        "pruner": pruner.run(ctx),  # two loops: events, and the rest (retention)
        "rollups": rollups.run(ctx),
    }
    tasks: list[asyncio.Task[Any]] = []
    try:
        await hub.start()
        tasks = [asyncio.create_task(_as_coroutine(loop), name=name) for name, loop in loops.items()]
        # Every loop has looked once and waits its hour (the pruner's task runs two loops).
        await wait_until(lambda: _true(sum(w >= LONG_S for w in waits) == len(loops) + 1), timeout=SLACK_S)
        ctx.stopping.set()
        _, pending = await asyncio.wait(tasks, timeout=SLACK_S)
        assert not pending, sorted(task.get_name() for task in pending)
        for task in tasks:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await provider.close()
        await pool.close()


def waited_at_least(steps_at: list[float], waits: list[float]) -> bool:
    """Each step came no sooner than the wait before it asked (to the event loop's clock resolution)."""
    gaps = [later - earlier for earlier, later in itertools.pairwise(steps_at)]
    return all(gap >= wait - 0.001 for gap, wait in zip(gaps, waits, strict=False))


async def _as_coroutine(awaitable: Awaitable[None]) -> None:
    await awaitable


async def _true(value: bool) -> bool:
    return value
