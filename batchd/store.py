"""All of batchd's SQL, by name, and the few typed helpers that run it.

The SQL itself lives in `sql/queries.sql` (each query under a `-- name:` line) and the schema in
`sql/migrations/`; this module only loads and runs them, so that what batchd does to the database can be
read in one file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

if TYPE_CHECKING:
    from .config import RoutingSettings

# A connection of one's own or one borrowed from the pool: queries run the same on both.
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

# What a lost or cut connection can raise. InternalClientError too: a connection cut mid-query makes the
# pool's reset on release fail with it (found by tests/test_chaos.py); the pool drops that connection.
DB_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    TimeoutError,
)

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(text: str) -> dict[str, str]:
    """`-- name: x` starts query x, which runs to the next name; comments inside are kept."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.strip()
    return queries


QUERIES = load_queries(resources.files("batchd.sql").joinpath("queries.sql").read_text())


def sql(name: str) -> str:
    return QUERIES[name]


async def init_connection(connection: asyncpg.Connection) -> None:
    """jsonb comes back as Python values, except where a query casts it to text on purpose."""
    await connection.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class DatabaseUnavailable(Exception):  # noqa: N818 - reads as the condition it reports
    """Connecting failed: the server is down or unreachable, or refused us (credentials, no such database).
    The message is the driver's; the URL is left to the caller, which knows how to show it without its
    password."""


class BadDatabaseUrl(Exception):  # noqa: N818 - reads as the condition it reports
    """The URL cannot be parsed (asyncpg's "invalid DSN", a port that is not a number or out of range): a
    configuration error, not an unreachable server. The message is the driver's, without the URL."""


# What asyncpg raises while parsing a URL, before it tries to connect: its own ClientConfigurationError (an
# unknown scheme or sslmode), or a ValueError or OverflowError from the standard library's parsing of a port
# or the query string.
_URL_ERRORS = (asyncpg.ClientConfigurationError, ValueError, OverflowError)


async def connect(url: str) -> asyncpg.Connection:
    """A connection of one's own, set up as the pool's are."""
    try:
        connection: asyncpg.Connection = await asyncpg.connect(url)
    except _URL_ERRORS as error:
        raise BadDatabaseUrl(str(error)) from error
    except (OSError, asyncpg.PostgresError) as error:
        raise DatabaseUnavailable(str(error)) from error
    await init_connection(connection)
    return connection


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=init_connection)
    except _URL_ERRORS as error:
        raise BadDatabaseUrl(str(error)) from error
    except (OSError, asyncpg.PostgresError) as error:
        raise DatabaseUnavailable(str(error)) from error
    if pool is None:  # pragma: no cover - only when asyncpg is given a custom connection class
        raise RuntimeError("asyncpg returned no pool")
    return pool


@dataclass(frozen=True)
class QueueHead:
    jobs: int
    bytes: int
    oldest: datetime | None
    last_seq: int | None
    now: datetime  # the database's clock, which stamped created_at


@dataclass(frozen=True)
class Routing:
    """The routing rule's parameters, as the queries take them: the batch p90 over the last `window` applied
    batches (`prior_s` below `min_samples` of them), plus `margin_s`."""

    window: int
    min_samples: int
    prior_s: float
    margin_s: float

    @classmethod
    def from_settings(cls, settings: RoutingSettings) -> Routing:
        return cls(settings.window, settings.min_samples, settings.prior_turnaround_s, settings.margin_s)

    def params(self) -> tuple[int, int, float, float]:
        return (self.window, self.min_samples, self.prior_s, self.margin_s)


class ClaimedJob(NamedTuple):
    """A job as a claim returns it: its columns in the claims' order, so a row is made into one at C speed (a
    batch holds up to 100,000 of them)."""

    id: UUID
    tenant_id: str
    request: str | None  # the raw request's JSON text, untouched
    job_type: str | None
    input: str | None
    attempts: int
    problem: str | None  # why the raw request cannot be sent, as the database sees it
    path_reason: str | None = None  # why it goes the way it is claimed for (batchd.route_reason)


# claim_urgent, claim_all and claim_fair return a ClaimedJob's columns first (claim_fair then turn and seq).
_JOB_COLUMNS = len(ClaimedJob._fields)


@dataclass(frozen=True)
class Claim:
    jobs: list[ClaimedJob]  # in the order they should go: urgent first, then seq order or turn order
    whole: bool  # every job that may go was taken (claim_all): fairness had nothing to decide


@dataclass(frozen=True)
class Batch:
    id: UUID
    tag: str
    provider_batch_id: str | None
    status: str
    request_count: int
    bytes: int
    owner: str | None
    created_at: datetime
    create_attempted_at: datetime | None
    create_attempts: int
    next_attempt_at: datetime
    wait_s: float  # until next_attempt_at, by the database's clock
    attempt_age_s: float | None  # since create_attempted_at, by the database's clock
    rejected_provider_ids: list[str]
    provider_deleted_at: datetime | None

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> Batch:
        return cls(**{field: record[field] for field in cls.__dataclass_fields__})


async def queue_head(db: asyncpg.Pool | asyncpg.Connection, limit: int, routing: Routing) -> QueueHead:
    row = await db.fetchrow(sql("queue_head"), limit, *routing.params())
    assert row is not None  # noqa: S101 - an aggregate always returns a row
    return QueueHead(
        jobs=row["jobs"], bytes=row["bytes"], oldest=row["oldest"], last_seq=row["last_seq"], now=row["now"]
    )


async def claim(
    connection: Connection,
    limit: int,
    urgent_before: datetime,
    window: int,
    routing: Routing,
    *,
    whole: bool = True,
) -> Claim:
    """Lock up to `limit` queued jobs that may go in a batch, skipping what another daemon holds: those whose
    deadline is near first, then the rest: all of them in one pass when they all fit (`whole` False: the
    caller knows they do not), else shared fairly between tenants, looking at up to `window` jobs of each."""
    await connection.execute(sql("claim_settings"))  # for the rest of the caller's transaction
    urgent = await connection.fetch(sql("claim_urgent"), limit, urgent_before, *routing.params())
    jobs = [ClaimedJob._make(row) for row in urgent]
    if len(jobs) >= limit:
        return Claim(jobs, whole=False)
    taken = [job.id for job in jobs]
    if whole:
        rows = await connection.fetch(sql("claim_all"), limit - len(jobs), taken, *routing.params())
        if 0 < len(rows) <= limit - len(jobs):
            return Claim(jobs + [ClaimedJob._make(row) for row in rows], whole=True)
        # None (an empty queue, or a max_in_flight somewhere) or one too many: they are claimed fairly; what
        # claim_all locked stays queued at commit.
    rows = await connection.fetch(
        sql("claim_fair"), limit - len(jobs), taken, max(window, limit), *routing.params()
    )
    return Claim(jobs + in_turn_order(rows), whole=False)


def in_turn_order(rows: list[asyncpg.Record]) -> list[ClaimedJob]:
    """claim_fair's jobs by turn, then seq. A job locked by a scan of its tenant's queue comes without its
    turn: the n-th of its tenant's, in seq order, has it at (n - 1/2) / weight."""
    keyed: list[tuple[float, int, asyncpg.Record]] = []
    spans: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        if row["turn"] is None:
            spans.setdefault(row["tenant_id"], []).append(row)
        else:
            keyed.append((row["turn"], row["seq"], row))
    for span in spans.values():
        span.sort(key=_seq)
        keyed += (((n - 0.5) / row["weight"], row["seq"], row) for n, row in enumerate(span, 1))
    keyed.sort(key=_turn_and_seq)
    return [ClaimedJob._make(row[:_JOB_COLUMNS]) for _, _, row in keyed]


def _seq(row: asyncpg.Record) -> int:
    seq: int = row["seq"]
    return seq


def _turn_and_seq(item: tuple[float, int, asyncpg.Record]) -> tuple[float, int]:
    return item[0], item[1]


async def get_batch(db: asyncpg.Pool | asyncpg.Connection, batch_id: UUID) -> Batch | None:
    row = await db.fetchrow(sql("get_batch"), batch_id)
    return None if row is None else Batch.from_record(row)
