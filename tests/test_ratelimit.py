"""The limiter every API call shares: never more than the per-minute budget, and a 429 stops everyone.

Only lower bounds on time are asserted (a limiter cannot be faster than it allows); nothing waits on luck.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from support import QUICK, EmulatorHandle, insert_raw, wait_for_jobs

from batchd.config import Settings
from batchd.emulator import EmulatorConfig
from batchd.ratelimit import RateLimiter


def test_no_minute_can_hold_more_than_the_budget() -> None:
    for per_minute in (6, 50, 1000, 4000):
        limiter = RateLimiter(per_minute)
        assert limiter.capacity + limiter.rate * 60 <= per_minute + 1e-9
        assert limiter.capacity >= 1


async def test_calls_beyond_the_burst_wait_for_refill() -> None:
    limiter = RateLimiter(600)  # a burst of 100, then 500 a minute (8.3 a second)
    started = time.monotonic()
    for _ in range(int(limiter.capacity)):
        await limiter.acquire()
    burst = time.monotonic() - started
    for _ in range(5):
        await limiter.acquire()
    assert time.monotonic() - started >= 5 / limiter.rate * 0.95
    assert burst < 5 / limiter.rate, "the burst itself does not wait"


async def test_a_pause_stops_every_caller() -> None:
    limiter = RateLimiter(6000)
    limiter.pause(0.5)
    started = time.monotonic()
    await asyncio.gather(*(limiter.acquire() for _ in range(3)))
    assert time.monotonic() - started >= 0.5


def test_a_limit_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RateLimiter(0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "emulator_config", [EmulatorConfig(processing_time_s=(3, 3), rate_limit_rpm=60, seed=5)]
)
async def test_many_open_batches_share_the_budget_without_a_429(
    db: asyncpg.Connection,
    emulator: EmulatorHandle,
    daemon_settings: Callable[..., Settings],
    start_daemon: Callable[[Settings], Any],
) -> None:
    # Six batches polled as fast as polling allows (unlimited, that would be thousands of calls in the
    # three seconds they take), within a budget equal to the provider's: every call waits its turn in the
    # shared limiter, and the provider never has to refuse one.
    settings = daemon_settings(
        anthropic={"requests_per_minute": 120},
        batching={"max_requests": 5, "max_wait_s": 0.05},
        polling={"min_interval_s": 0.01, "max_interval_s": 0.01},
    )
    async with start_daemon(settings):
        await insert_raw(db, "t", [f"question {i}" for i in range(30)])
        await wait_for_jobs(db, done=30, timeout=120)
    stats = await emulator.stats()
    assert not any(key.endswith(" 429") for key in stats["statuses"]), stats["statuses"]
    assert stats["batches_created"] == 6
    assert sum(stats["calls"].values()) <= 120, "no more calls than one minute's budget"
    assert QUICK.rate_limit_rpm is None  # the other daemon tests run unthrottled
