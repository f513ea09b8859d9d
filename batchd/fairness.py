"""Fair sharing: how tenants divide batches between them, and the limits each one works within.

Each tenant has a *weight* (default 1): when more is queued than one batch may hold, the flusher's claim
(`claim_fair` in queries.sql) fills the batch in turns of weighted round robin across the tenants with
queued jobs, so a tenant that dumps 200,000 jobs does not push a tenant with 10 behind all of them. When
everything fits (and no tenant has a max_in_flight), there is nothing to share: `claim_all` takes it all in
one pass (store.claim). A tenant
may also have a *max_queued* (past it the database refuses the producer's INSERT, with a message that says
so) and a *max_in_flight* (the most of its requests in open batches; past it its jobs wait in the queue).

The limits come from `batchd tenant set` (batchd.tenants), else batchd.toml's [tenants.NAME], else
[tenant_defaults]. Each daemon writes batchd.toml's to the database when it starts (`publish`), since the
database itself enforces max_queued on every INSERT: instances sharing a database should share one
batchd.toml, or the last one to start has its way.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog

from .config import Settings, TenantLimits
from .store import Connection, sql
from .unset import UNSET, Unset, update_parameters

log = structlog.get_logger("batchd.fairness")

DEFAULTS = ""  # batchd.configured_limits' tenant_id for [tenant_defaults]: no job's tenant_id can be empty


async def publish(db: asyncpg.Pool | Connection, settings: Settings) -> None:
    """Writes batchd.toml's tenant limits to the database, replacing what was there, in one transaction."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as connection:
            await publish(connection, settings)
        return
    rows: list[tuple[str, TenantLimits]] = [(DEFAULTS, settings.tenant_defaults), *settings.tenants.items()]
    async with db.transaction():
        await db.execute(sql("lock_configured_limits"))
        await db.execute(sql("clear_configured_limits"))
        await db.execute(
            sql("insert_configured_limits"),
            [name for name, _ in rows],
            [limits.weight for _, limits in rows],
            [limits.max_queued for _, limits in rows],
            [limits.max_in_flight for _, limits in rows],
        )
    log.info("fairness.limits_published", tenants=len(settings.tenants))


async def set_limits(
    connection: Connection,
    name: str,
    *,
    weight: int | Unset | None = UNSET,
    max_queued: int | Unset | None = UNSET,
    max_in_flight: int | Unset | None = UNSET,
) -> dict[str, Any]:
    """Sets what is given (None: back to batchd.toml's value), adding the tenant if new; wakes the daemons,
    since a higher limit lets jobs go at once. Returns the limits now in force."""
    await connection.execute(
        sql("set_tenant_limits"), name, *update_parameters(weight, max_queued, max_in_flight)
    )
    await connection.execute(sql("wake_daemons"))
    return await limits_of(connection, name)


async def limits_of(connection: Connection, name: str) -> dict[str, Any]:
    row = await connection.fetchrow(sql("tenant_limits"), name)
    assert row is not None  # noqa: S101 - the function returns one row for any name
    return dict(row)


def describe(name: str, row: dict[str, Any]) -> str:
    """One line: the limits in force, each marked when it was set with `batchd tenant set`."""

    def show(key: str) -> str:
        value = "none" if row[key] is None else f"{row[key]:,}"
        return f"{value} (set)" if row[f"set_{key}"] is not None else value

    return (
        f"{name}: weight {show('weight')}, max queued {show('max_queued')}, "
        f"max in flight {show('max_in_flight')}"
    )
