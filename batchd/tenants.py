"""Tenants and their tokens: who may read what through batchd's HTTP API.

`batchd tenant add NAME` prints a new token once; only its SHA-256 is stored. A token sees the jobs whose
`tenant_id` is its tenant's name. The admin token (from the environment or a file, never the database)
sees every tenant's.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg

from .statuses import FINAL_JOB_STATUSES, IN_FLIGHT_JOB_STATUSES, JOB_STATUSES, JobStatus
from .store import Connection, sql
from .text import table

TOKEN_PREFIX = "bdt_"  # noqa: S105 - marks a string as a batchd token; not a secret


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    # A header's bytes that are not UTF-8 reach us as surrogate escapes: hash the bytes as sent (no stored
    # token matches them) rather than raise, which made `Authorization: Bearer \x80` a 500 instead of a 401.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class Principal:
    """Who is asking: a tenant, or the admin (tenant None), who sees every tenant. `token_id` is the tenant's
    token (batchd.tokens.id): an open event stream ends when it is revoked (events.py)."""

    tenant_id: str | None
    token_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.tenant_id is None

    def may_see(self, tenant_id: str) -> bool:
        return self.tenant_id is None or self.tenant_id == tenant_id


ADMIN = Principal(None)


async def add_tenant(connection: Connection, name: str) -> str:
    """Adds the tenant (if new) and returns a new token for it, the only time it is ever shown."""
    if not name or not name.strip() or name != name.strip():
        raise ValueError("a tenant name must be non-empty, without surrounding spaces")
    token = new_token()
    async with connection.transaction():
        await connection.execute(sql("add_tenant"), name)
        await connection.execute(sql("add_token"), name, token_hash(token))
    return token


async def list_tenants(connection: Connection) -> list[dict[str, Any]]:
    """Every tenant with a row in batchd.tenants (a token, a budget, a limit) or with jobs, by name: its
    tokens, active and revoked, and its jobs per status (every status, zeros too)."""
    return [
        {**dict(row), "jobs": {status: row["jobs"].get(status, 0) for status in JOB_STATUSES}}
        for row in await connection.fetch(sql("list_tenants"))
    ]


IN_FLIGHT = tuple(status for status in JOB_STATUSES if status in IN_FLIGHT_JOB_STATUSES)
FINISHED = tuple(status for status in JOB_STATUSES if status in FINAL_JOB_STATUSES)
LIST_HEADER = ("tenant", "tokens", "revoked", "queued", "in flight", *FINISHED)


def render_list(tenants: list[dict[str, Any]]) -> str:
    """`batchd tenant list`: a header, then a tenant a line, its jobs per status (those in flight, whether in
    a batch or sent alone, summed in one column)."""
    if not tenants:
        return "(no tenant has a token or a job yet)"
    rows = []
    for row in tenants:
        jobs = row["jobs"]
        counts = (
            row["active_tokens"],
            row["revoked_tokens"],
            jobs[JobStatus.QUEUED],
            sum(jobs[status] for status in IN_FLIGHT),
            *(jobs[status] for status in FINISHED),
        )
        rows.append((row["name"], *(f"{n:,}" for n in counts)))
    return "\n".join(table(LIST_HEADER, rows, indent=""))


async def revoke(connection: Connection, name: str) -> int:
    """Revokes every token of the tenant; returns how many. New requests with them get a 401 at once; the
    event streams they opened end within seconds, on every instance (a trigger NOTIFYs batchd_tokens)."""
    return len(await connection.fetch(sql("revoke_tokens"), name))


async def authenticate(
    db: asyncpg.Pool | Connection, token: str | None, admin_token: str | None
) -> Principal | None:
    """The principal a token stands for, or None when it stands for nobody."""
    if not token:
        return None
    if admin_token and hmac.compare_digest(token_hash(token), token_hash(admin_token)):
        return ADMIN
    row = await db.fetchrow(sql("token_tenant"), token_hash(token))
    return None if row is None else Principal(row["tenant_id"], row["id"])
