"""What every part of a running daemon shares: the pool, the settings, the provider, who this process is."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import asyncpg

from .config import Settings
from .metrics import Metrics
from .provider import Provider


def new_instance_id() -> str:
    """Unique to each start of the process (not the host name): a restarted daemon is a new owner."""
    return f"batchd-{uuid.uuid4().hex[:12]}"


@dataclass
class Context:
    pool: asyncpg.Pool
    settings: Settings
    provider: Provider
    instance_id: str = field(default_factory=new_instance_id)
    metrics: Metrics = field(default_factory=Metrics)  # the daemon's: its provider reports calls to it
    # Set when the daemon is stopping: loops finish the step they are in and do not start another.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def sleep(self, seconds: float) -> bool:
        """Waits, but wakes at once on shutdown; True when the daemon is stopping."""
        return await wait_for_event(self.stopping, seconds)


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
