"""What every part of a running daemon shares: the pool, the settings, the provider, who this process is."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from .aio import wait_for_event
from .backoff import Backoff
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
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    metrics: Metrics = field(default_factory=Metrics)  # the daemon's: its provider reports calls to it
    # Set when the daemon is stopping: loops finish the step they are in and do not start another.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def sleep(self, seconds: float) -> bool:
        """Waits, but wakes at once on shutdown; True when the daemon is stopping."""
        return await wait_for_event(self.stopping, seconds)

    @property
    def backoff(self) -> Backoff:
        """How long a failing step waits before it is tried again ([daemon] retry_min_s to retry_max_s)."""
        daemon = self.settings.daemon
        return Backoff(daemon.retry_min_s, daemon.retry_max_s)
