"""Tenants' webhook endpoints and the Standard Webhooks signature: what `batchd webhook ...` manages.

An endpoint is a tenant's URL, a secret (`whsec_` + base64 of 32 random bytes, shown once by `batchd webhook
add`) and the event types it wants (every type when none are given). Deliveries (deliverer.py) are signed as
the Standard Webhooks specification says: `webhook-id` (the event's id, the same on every retry),
`webhook-timestamp` (Unix seconds, at each attempt) and `webhook-signature: v1,<base64 of HMAC-SHA256 over
"{id}.{timestamp}.{body}">`, so any Standard Webhooks library verifies them (docs/webhooks.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import secrets
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

from .config import WebhookSettings
from .sse import EVENT_TYPES
from .store import Connection, sql
from .targets import TargetPolicy, check_url
from .text import table

SECRET_PREFIX = "whsec_"  # noqa: S105 - marks a string as a webhook secret; not a secret
SECRET_BYTES = 32  # the specification asks for 24 to 64
STATUSES = ("pending", "delivered", "dead")
# A connection, or the pool (the HTTP API's handlers borrow one per statement).
Executor: TypeAlias = "Connection | asyncpg.Pool"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header's value for one attempt."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def retry_ceiling_s(failures: int, base_s: float, cap_s: float) -> float:
    """The longest wait after the `failures`-th failed attempt: base_s * 2^(failures-1), at most cap_s."""
    return min(cap_s, base_s * 2.0 ** min(failures - 1, 60))


def retry_in_s(failures: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Full jitter: a uniform draw up to the ceiling, so endpoints failing together do not retry in step."""
    return (rng or random).uniform(0, retry_ceiling_s(failures, base_s, cap_s))


def expected_span_s(max_attempts: int, base_s: float, cap_s: float) -> float:
    """How long a delivery that always fails takes to die, on average (half of each ceiling)."""
    return sum(retry_ceiling_s(n, base_s, cap_s) / 2 for n in range(1, max_attempts))


class TooManyEndpoints(Exception):  # noqa: N818 - reads as the condition it reports
    """The tenant has `[webhooks] max_endpoints_per_tenant` endpoints already."""


def check_event_types(types: list[str]) -> list[str]:
    """The types, sorted and without repeats; unknown ones (or none at all) are refused."""
    if not types:
        raise ValueError("name at least one event type (or none at all, for every type)")
    unknown = set(types) - EVENT_TYPES
    if unknown:
        raise ValueError(f"unknown event types {sorted(unknown)}; known: {sorted(EVENT_TYPES)}")
    return sorted(set(types))


def parse_event_types(text: str | None) -> list[str] | None:
    """`--events job.succeeded,job.failed`: the types, or None for all; unknown ones are refused."""
    if text is None:
        return None
    types = [part.strip() for part in text.split(",") if part.strip()]
    if not types:
        raise ValueError("--events names no event type")
    return check_event_types(types)


async def add_endpoint(
    connection: Connection,
    tenant: str,
    url: str,
    event_types: list[str] | None,
    policy: TargetPolicy,
    *,
    max_endpoints: int = WebhookSettings().max_endpoints_per_tenant,
) -> tuple[int, str]:
    """Adds an endpoint (after checking its URL: TargetRefused; the tenant's count: TooManyEndpoints) and
    returns its id and its secret, the only time the secret is shown."""
    if not tenant or tenant != tenant.strip():
        raise ValueError("a tenant name must be non-empty, without surrounding spaces")
    await check_url(url, policy)
    secret = new_secret()
    async with connection.transaction():
        await connection.execute(sql("webhook_lock_tenant"), tenant)
        if await connection.fetchval(sql("webhook_count_endpoints"), tenant) >= max_endpoints:
            raise TooManyEndpoints(
                f"tenant {tenant!r} has {max_endpoints} webhook endpoints already "
                "([webhooks] max_endpoints_per_tenant)"
            )
        endpoint_id: int = await connection.fetchval(
            sql("webhook_add_endpoint"), tenant, url, secret, event_types
        )
    return endpoint_id, secret


async def get_endpoint(connection: Executor, endpoint_id: int) -> dict[str, Any] | None:
    row = await connection.fetchrow(sql("webhook_endpoint"), endpoint_id)
    return None if row is None else dict(row)


async def list_endpoints(connection: Executor, tenant: str | None) -> list[dict[str, Any]]:
    return [dict(row) for row in await connection.fetch(sql("webhook_endpoints"), tenant)]


async def remove_endpoint(connection: Executor, endpoint_id: int) -> bool:
    return await connection.fetchrow(sql("webhook_remove_endpoint"), endpoint_id) is not None


async def deliveries(
    connection: Executor, endpoint_id: int, limit: int, status: str | None
) -> list[dict[str, Any]]:
    return [
        dict(row) for row in await connection.fetch(sql("webhook_deliveries"), endpoint_id, limit, status)
    ]


async def retry_delivery(connection: Executor, delivery_id: int) -> int | None:
    """Sends one delivery again from its first attempt and re-enables its endpoint; the endpoint's id, or
    None when there is no such delivery (or an attempt of it is in flight)."""
    endpoint: int | None = await connection.fetchval(sql("webhook_retry_delivery"), delivery_id)
    return endpoint


async def retry_endpoint(connection: Executor, endpoint_id: int) -> int | None:
    """Re-enables an endpoint and sends its dead deliveries again; how many, or None for no such endpoint."""
    row = await connection.fetchrow(sql("webhook_retry_endpoint"), endpoint_id)
    assert row is not None  # noqa: S101 - an aggregate always returns a row
    return None if row["endpoints"] == 0 else int(row["retried"])


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


ENDPOINT_HEADER = ("id", "tenant", "url", "events", "state", "failures", "pending", "last success")


def render_endpoints(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no webhook endpoint)"
    lines = []
    for row in rows:
        state = "enabled" if row["disabled_at"] is None else f"disabled {_when(row['disabled_at'])}"
        lines.append(
            (
                str(row["id"]),
                row["tenant_id"],
                row["url"],
                ",".join(row["event_types"]) if row["event_types"] else "all",
                state,
                f"{row['failures']:,}",
                f"{row['pending']:,}",
                _when(row["last_success_at"]),
            )
        )
    return "\n".join(table(ENDPOINT_HEADER, lines, indent=""))


DELIVERY_HEADER = (
    "id",
    "webhook-id",
    "type",
    "status",
    "attempts",
    "last attempt",
    "next attempt",
    "last result",
)


def render_deliveries(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no delivery in the log)"
    lines = []
    for row in rows:
        result = "-" if row["last_status"] is None else f"HTTP {row['last_status']}"
        if row["last_error"]:
            result = row["last_error"] if row["last_status"] is None else f"{result}: {row['last_error']}"
        lines.append(
            (
                str(row["id"]),
                row["message_id"],
                row["event_type"],
                row["status"],
                str(row["attempts"]),
                _when(row["last_attempt_at"]),
                _when(row["next_attempt_at"]) if row["status"] == "pending" else "-",
                result,
            )
        )
    return "\n".join(table(DELIVERY_HEADER, lines, indent=""))
