"""One limiter for every call batchd makes to the Message Batches API.

The provider counts every batch endpoint call against one per-minute budget, polls included, so a
thousand open batches polled independently would exhaust it. Every call waits here for a token; a 429
pauses everyone until the provider's `retry-after` has passed.
"""

from __future__ import annotations

import asyncio
import time


class RateLimiter:
    """A token bucket holding up to ten seconds' worth of calls, refilled so that no 60-second window ever
    sees more than `per_minute` calls: a full bucket spent at once plus a minute of refill is the limit."""

    def __init__(self, per_minute: int) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.capacity = float(max(1, per_minute // 6))
        self.rate = max(per_minute - self.capacity, 1.0) / 60.0
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        # One waiter at a time, so tokens go out in arrival order and nobody starves.
        async with self._lock:
            while True:
                now = time.monotonic()
                if now < self._paused_until:
                    await asyncio.sleep(self._paused_until - now)
                    continue
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self.rate)

    def pause(self, seconds: float) -> None:
        """The provider said to slow down: nobody calls for `seconds`, and the bucket starts empty."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        self._tokens = 0.0
