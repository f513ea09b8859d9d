"""The event hub: one per process, it reads published events once and fans them out to every SSE stream.

The hub follows the event log (`seq`, see publisher.py) with one query per wake-up, whoever is listening,
and frames each event once; a stream only holds references to frames. Each subscriber has a bounded buffer:
a stream that would overflow it goes on from the table instead (or is cut off, if so configured).

The hub's `head` is the last seq it has fanned out. Subscribing is synchronous and takes effect at `head`:
a stream that has replayed everything up to `head` from the table and subscribes without yielding in
between misses nothing and gets nothing twice. A stream that resumes on an instance whose hub is behind the
point it has reached (another instance sent it further) subscribes with that point as its floor: the hub's
events up to it are not its to send again.

An event has two ids (migration 0009): `seq`, the log's, which the admin's streams carry, and `tenant_seq`,
its tenant's own gap-free count, which the tenant's streams carry; each is framed once.

The hub also ends the streams of revoked tokens: it knows which token opened each stream, and checks them
against the table when told (NOTIFY batchd_tokens, or a reconnected listener) and every `poll_interval_s`:
one query for all open streams' tokens, nothing per event.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import asyncpg
import structlog
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .aio import run_loop
from .backoff import Backoff
from .config import EventsSettings
from .store import DB_ERRORS, sql

log = structlog.get_logger("batchd.events")

FETCH_PAGE = 2_000
TOKENS_CHANNEL = "batchd_tokens"  # a trigger on batchd.tokens NOTIFYs it (migration 0009)


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    tenant_seq: int | None  # None: an event of no tenant, which only the admin sees
    type: str
    tenant_id: str | None
    job_id: uuid.UUID | None
    batch_id: uuid.UUID | None
    frame: bytes  # as its tenant's streams carry it (id: tenant_seq)
    admin_frame: bytes  # as the admin's carry it (id: seq)

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Event:
        # jsonb's text form is one line (newlines in strings are escaped), as a data: field needs.
        seq, tenant_seq = row["seq"], row["tenant_seq"]
        body = f"event: {row['type']}\ndata: {row['data']}\n\n"
        admin_frame = f"id: {seq}\n{body}".encode()
        # The same bytes where the two ids agree (events from before migration 0009, or a single tenant).
        frame = (
            admin_frame if tenant_seq is None or tenant_seq == seq else f"id: {tenant_seq}\n{body}".encode()
        )
        return cls(
            seq, tenant_seq, row["type"], row["tenant_id"], row["job_id"], row["batch_id"], frame, admin_frame
        )

    def id_for(self, admin: bool) -> int:
        """The event's id on an admin's stream (seq) or on its tenant's (tenant_seq)."""
        return self.seq if admin or self.tenant_seq is None else self.tenant_seq


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events a stream wants. `tenant_id` None is the admin's: every tenant."""

    tenant_id: str | None
    job_id: uuid.UUID | None = None
    batch_id: uuid.UUID | None = None
    types: frozenset[str] | None = None

    @property
    def admin(self) -> bool:
        return self.tenant_id is None

    def matches(self, event: Event) -> bool:
        return (
            (self.job_id is None or event.job_id == self.job_id)
            and (self.batch_id is None or event.batch_id == self.batch_id)
            and (self.types is None or event.type in self.types)
        )


class Subscriber:
    """One stream's live feed: frames waiting to be written, at most `limit_bytes` of them.

    When an event would overflow the buffer, the buffer is dropped and the subscriber marked `behind`: its
    stream goes back to reading the table from the last event it wrote, at the client's pace, and
    subscribes again once caught up. With `cut_when_full` ([events] on_full_buffer = "cut") it is cut off
    instead, as a slow consumer. A burst never costs more than `limit_bytes` per stream.
    """

    def __init__(
        self, event_filter: Filter, limit_bytes: int, start_seq: int, *, cut_when_full: bool = False
    ) -> None:
        self.filter = event_filter
        self.admin = event_filter.admin
        self.limit_bytes = limit_bytes
        self.cut_when_full = cut_when_full
        # Events up to start_seq are not this subscriber's (the hub's head when it subscribed, or further
        # when the stream had already been sent further: see the module's doc).
        self.start_seq = start_seq
        self.ready = asyncio.Event()
        self.behind = False
        self.cut_reason: str | None = None
        self.peak_bytes = 0
        self._frames: list[bytes] = []
        self._bytes = 0
        self._last: Event | None = None

    def offer(self, event: Event) -> None:
        if self.behind or self.cut_reason is not None or event.seq <= self.start_seq:
            return
        frame = event.admin_frame if self.admin else event.frame
        size = self._bytes + len(frame)
        if size > self.limit_bytes:
            if self.cut_when_full:
                self.cut("slow_consumer")
            else:
                self.behind = True
                self._drop()
            return
        self._frames.append(frame)
        self._bytes = size
        self._last = event
        self.peak_bytes = max(self.peak_bytes, size)
        self.ready.set()

    def cut(self, reason: str) -> None:
        """Ends the stream (what is buffered is dropped: the client resumes from its last id)."""
        if self.cut_reason is None:
            self.cut_reason = reason
        self._drop()

    def take(self) -> tuple[bytes, Event | None]:
        """The frames waiting, and the last of their events (None: nothing waited)."""
        data = b"".join(self._frames)
        last, self._last = self._last, None
        self._frames.clear()
        self._bytes = 0
        self.ready.clear()
        return data, last

    def _drop(self) -> None:
        self._frames.clear()
        self._bytes = 0
        self.ready.set()


class HubCollector:
    """The hub's streams and counters for Prometheus, read from memory at each scrape (the daemon registers it
    on its registry, metrics.py, beside the instruments the other parts update)."""

    def __init__(self, hub: EventHub) -> None:
        self.hub = hub

    def describe(self) -> Iterator[Metric]:
        return self._families(0, 0, 0, 0, 0, revoked=0)

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        return self._families(
            hub.open_streams,
            hub.fanned_out,
            hub.cut_off,
            hub.fell_behind,
            hub.peak_buffered_bytes,
            revoked=hub.revoked,
        )

    @staticmethod
    def _families(
        streams: int, fanned_out: int, cut_off: int, fell_behind: int, peak: int, *, revoked: int
    ) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "batchd_sse_clients",
            "Open GET /v1/events streams (every tenant's and the admin's).",
            value=streams,
        )
        yield CounterMetricFamily(
            "batchd_sse_events_fanned_out",
            "Events the hub read from the log and handed to the open streams (each counted once, however "
            "many streams it went to).",
            value=fanned_out,
        )
        yield CounterMetricFamily(
            "batchd_sse_streams_cut_off",
            "Streams ended because their client read nothing for events.send_timeout_s (slow_consumer).",
            value=cut_off,
        )
        yield CounterMetricFamily(
            "batchd_sse_streams_fell_behind",
            "Times a stream's buffer would have overflowed and the stream went back to reading the table.",
            value=fell_behind,
        )
        yield CounterMetricFamily(
            "batchd_sse_streams_revoked",
            "Streams ended because the token they were opened with was revoked (or deleted).",
            value=revoked,
        )
        yield GaugeMetricFamily(
            "batchd_sse_buffer_peak_bytes",
            "The most any closed stream ever had waiting in its buffer (bounded by "
            "events.client_buffer_bytes).",
            value=peak,
        )


class Endable(Protocol):
    """An open stream, as the hub ends it (sse.Stream)."""

    def end(self, reason: str) -> None: ...


class EventHub:
    def __init__(self, pool: asyncpg.Pool, settings: EventsSettings) -> None:
        self.pool = pool
        self.settings = settings
        self.head = 0
        self.closing = False
        self.fanned_out = 0
        self.cut_off = 0
        self.fell_behind = 0
        self.revoked = 0  # streams ended because their token was revoked
        # The most any one stream has had waiting in its buffer (bounded by client_buffer_bytes).
        self.peak_buffered_bytes = 0
        self._tenants: dict[str | None, set[Subscriber]] = {}
        self._streams: Counter[str | None] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()
        self._wake = asyncio.Event()
        # Open streams by the tenant token that opened them (the admin's are not here: nothing revokes it).
        self._by_token: dict[int, set[Endable]] = {}
        self._tokens_changed = False
        self._next_token_check = 0.0

    @property
    def subscribers(self) -> int:
        return sum(len(group) for group in self._tenants.values())

    @property
    def open_streams(self) -> int:
        return sum(self._streams.values())

    async def start(self) -> None:
        """Starts at the log's current end: a new stream without a last id is live from here."""
        self.head = await self.pool.fetchval(sql("event_log_head"))

    def wake(self) -> None:
        self._wake.set()

    def tokens_changed(self) -> None:
        """A token was revoked or deleted somewhere (NOTIFY batchd_tokens), or a notification may have been
        missed (the listener reconnected): check the open streams' tokens now."""
        self._tokens_changed = True
        self._wake.set()

    @contextmanager
    def opened_with(self, token_id: int | None, stream: Endable) -> Iterator[None]:
        """Keeps `stream` where a revocation of `token_id` finds it, while the block runs."""
        if token_id is None:
            yield
            return
        self._by_token.setdefault(token_id, set()).add(stream)
        try:
            yield
        finally:
            streams = self._by_token.get(token_id)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self._by_token[token_id]

    def subscribe(self, event_filter: Filter, reached: int = 0) -> Subscriber:
        """Live events after the hub's head, or after `reached` (a seq) when the stream is already there."""
        subscriber = Subscriber(
            event_filter,
            self.settings.client_buffer_bytes,
            max(self.head, reached),
            cut_when_full=self.settings.on_full_buffer == "cut",
        )
        self._tenants.setdefault(event_filter.tenant_id, set()).add(subscriber)
        if self.closing:
            subscriber.cut("shutdown")
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, subscriber.peak_bytes)
        group = self._tenants.get(subscriber.filter.tenant_id)
        if group is not None:
            group.discard(subscriber)
            if not group:
                del self._tenants[subscriber.filter.tenant_id]

    @contextmanager
    def stream_slot(self, tenant_id: str | None) -> Iterator[bool]:
        """Counts an open stream against its tenant's limit (the admin has one of its own); yields False
        when the limit is reached."""
        if self._streams[tenant_id] >= self.settings.max_streams_per_tenant:
            yield False
            return
        self._streams[tenant_id] += 1
        self._idle.clear()
        try:
            yield True
        finally:
            self._streams[tenant_id] -= 1
            if self._streams[tenant_id] <= 0:
                del self._streams[tenant_id]
            if not self._streams:
                self._idle.set()

    async def run(self, stopping: asyncio.Event, backoff: Backoff) -> None:
        await run_loop(
            "events",
            self._look,
            stopping=stopping,
            wake=self._wake,
            idle_s=self.settings.poll_interval_s,
            backoff=backoff,
            errors=DB_ERRORS,
        )

    async def _look(self) -> None:
        await self._catch_up()
        await self._check_tokens()

    async def _catch_up(self) -> None:
        async with self.pool.acquire() as connection:
            while True:
                if not self._tenants:
                    # Nobody listens: skip the events rather than read them, unless a stream subscribed
                    # (at the old head) while the query ran.
                    latest = await connection.fetchval(sql("event_log_head"))
                    if not self._tenants:
                        self.head = max(self.head, latest)
                        return
                rows = await connection.fetch(sql("published_events"), self.head, FETCH_PAGE)
                self._fan_out([Event.from_row(row) for row in rows])
                if len(rows) < FETCH_PAGE:
                    return

    async def _check_tokens(self) -> None:
        """Ends the streams whose token no longer stands for anyone, when told to or every poll_interval_s."""
        now = time.monotonic()
        if not self._tokens_changed and now < self._next_token_check:
            return
        self._tokens_changed = False
        self._next_token_check = now + self.settings.poll_interval_s
        if not self._by_token:
            return
        revoked = await self.pool.fetch(sql("revoked_tokens"), list(self._by_token))
        for row in revoked:
            for stream in self._by_token.pop(row["id"], ()):
                self.revoked += 1
                stream.end("revoked")

    def _fan_out(self, events: list[Event]) -> None:
        admins = self._tenants.get(None, ())
        for event in events:
            for group in (self._tenants.get(event.tenant_id, ()), admins) if event.tenant_id else (admins,):
                for subscriber in group:
                    if subscriber.filter.matches(event):
                        subscriber.offer(event)
            self.head = event.seq
        self.fanned_out += len(events)

    async def close_all(self, timeout_s: float) -> None:
        """Ends every stream (each gets a final event) and waits up to `timeout_s` for them to finish."""
        self.closing = True
        for group in self._tenants.values():
            for subscriber in group:
                subscriber.cut("shutdown")
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        except TimeoutError:
            log.warning("events.streams_still_open", streams=self.open_streams)
