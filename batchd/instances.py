"""This daemon's row in batchd.instances (migration 0013): who it is, that it lives, how the API answers it.

Written at start, then with every renewal of the daemon's leases (supervisor.py: a third of
`daemon.lease_s`), one upsert carrying the heartbeat and the API's state as health.py last found it; the
change of that state wakes the supervisor, so the row says it within a moment. Deleted when the daemon
stops. A daemon that died leaves its row behind: `batchd status` shows it silent (no heartbeat for three
intervals), and the pruner deletes it after RETENTION_S (pruner.py), so the table holds today's daemons.
"""

from __future__ import annotations

import os
import socket

from . import __version__
from .context import Context
from .store import sql

HEARTBEATS_PER_LEASE = 3  # the supervisor renews its leases three times a lease
RETENTION_S = 86_400.0  # a daemon's row without a heartbeat for a day is pruned


def heartbeat_s(ctx: Context) -> float:
    return ctx.settings.daemon.lease_s / HEARTBEATS_PER_LEASE


async def heartbeat(ctx: Context) -> None:
    """Upserts this daemon's row: its heartbeat now, and the API's state."""
    health = ctx.provider.health
    await ctx.pool.execute(
        sql("instance_heartbeat"),
        ctx.instance_id,
        socket.gethostname(),
        os.getpid(),
        __version__,
        ctx.started_at,
        heartbeat_s(ctx),
        health.url,
        health.state,
        health.checked_at,
        health.reason,
    )


async def remove(ctx: Context) -> None:
    await ctx.pool.execute(sql("instance_remove"), ctx.instance_id)
