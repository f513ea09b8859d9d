"""`GET /v1/events`: a tenant's events as Server-Sent Events, resumable with no gap and no duplicate.

A tenant's stream carries its tenant's own count as ids (`tenant_seq`: 1, 2, 3, ... whatever other tenants
do), the admin's the log's `seq` (migration 0009 says why, and how ids sent before it still resume).

A stream resumed with `Last-Event-ID` (or `last_event_id`, for a first connection that must not miss
anything since a snapshot) turns the id into a position of the log (`resume_point`), replays what the
client missed from the table, page by page, up to the hub's head, then subscribes to the hub at that very
head without yielding in between: every event after the id, once, on whichever instance. An id older than
the retained log, or one this client was never sent (another tenant's, another database's, forged), gets
`event: reset` with its current position as its id, then live events: the client should reload its state.

Memory per stream is bounded: live events wait in a buffer of at most `client_buffer_bytes`; a burst
that would overflow it drops the buffer and the stream goes on from the table, from the last event it
wrote, at the client's pace (then live again), or, with `on_full_buffer = "cut"`, ends as a slow consumer.
A client that does not read for `send_timeout_s` is cut off. A stream ends with `event: disconnect` (no
id, so the client's last id stands) for such a client (`slow_consumer`) or when the server stops
(`shutdown`); EventSource then reconnects with its last id and misses nothing. It also ends when the token
it was opened with is revoked (`revoked`, events.py); reconnecting with it is a 401.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from .events import Event, EventHub, Filter, Subscriber
from .store import Connection, sql
from .tenants import Principal

log = structlog.get_logger("batchd.sse")

HUB: web.AppKey[EventHub] = web.AppKey("event_hub", EventHub)
EVENT_TYPES = frozenset(
    {
        "job.submitted",
        "job.succeeded",
        "job.failed",
        "job.retrying",
        "job.canceled",
        "batch.submitted",
        "batch.ended",
        "tenant.held",  # over budget: its queued jobs wait (or fail), budgets.py
        "tenant.released",
    }
)
MAX_EVENT_ID = 2**63 - 1
FINAL_WRITE_TIMEOUT_S = 2.0
HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx and other proxies: pass each event on at once.
    "X-Accel-Buffering": "no",
}


class BadRequestError(ValueError):
    pass


class SlowClientError(Exception):
    """A write waited `send_timeout_s` for the client to read."""


def parse_filter(query: Mapping[str, str], principal: Principal) -> Filter:
    types: frozenset[str] | None = None
    if "types" in query:
        types = frozenset(part.strip() for part in query["types"].split(",") if part.strip())
        unknown = types - EVENT_TYPES
        if unknown or not types:
            raise BadRequestError(f"unknown event types {sorted(unknown)}; known: {sorted(EVENT_TYPES)}")
    return Filter(principal.tenant_id, _uuid(query, "job_id"), _uuid(query, "batch_id"), types)


def parse_last_event_id(request: web.Request) -> int | None:
    """The header wins: a browser reconnecting sends it, while the URL still has the first connection's
    `last_event_id`."""
    value = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if value is None or value == "":
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 19 or int(value) > MAX_EVENT_ID:
        raise BadRequestError("Last-Event-ID must be an event id this server sent (a non-negative integer)")
    return int(value)


def _uuid(query: Mapping[str, str], name: str) -> uuid.UUID | None:
    if name not in query:
        return None
    try:
        return uuid.UUID(query[name])
    except ValueError:
        raise BadRequestError(f"{name} must be a UUID") from None


def _frame(event: str, data: Mapping[str, object], event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class Stream:
    """One client's open response and the steps of serving it.

    Where the client has got is kept twice: `position`, the log's seq up to which it has been sent every event
    it wants (or the point it was subscribed at), from where it goes on after falling behind; and `last_id`,
    the same point as an id of its stream (seq for the admin, its tenant's tenant_seq for a tenant; None while
    a tenant's stream has carried nothing and nothing needed it).
    """

    def __init__(
        self, request: web.Request, response: web.StreamResponse, hub: EventHub, event_filter: Filter
    ) -> None:
        self.request = request
        self.response = response
        self.hub = hub
        self.settings = hub.settings
        self.filter = event_filter
        self.admin = event_filter.admin
        self.subscriber: Subscriber | None = None
        self.position = 0
        self.last_id: int | None = None
        self.ending: str | None = None

    def end(self, reason: str) -> None:
        """Ends the stream with `event: disconnect` (`reason`): at once if it is live, else after the page it
        is replaying."""
        if self.ending is None:
            self.ending = reason
        if self.subscriber is not None:
            self.subscriber.cut(reason)

    async def serve(self, last: int | None) -> None:
        retry = f"retry: {self.settings.retry_ms}\n\n".encode()
        if last is None:
            # Subscribed before the first byte goes out: a client that has read `retry:` will see
            # every event published from then on.
            subscriber = self.subscribe()
            await self.write(retry)
        else:
            await self.write(retry)
            subscriber = await self.resume(last)
        while await self.live(subscriber):
            # It fell behind: its buffer was dropped. Go on from the table, from what it was last sent.
            self.hub.fell_behind += 1
            self.unsubscribe()
            if self.last_id is None:
                self.last_id = await self.id_at(self.position)
            subscriber = await self.catch_up(self.last_id, self.position)

    def subscribe(self, reached: int = 0) -> Subscriber:
        subscriber = self.subscriber = self.hub.subscribe(self.filter, reached)
        if subscriber.start_seq != self.position:
            self.position = subscriber.start_seq
            self.last_id = subscriber.start_seq if self.admin else None
        if self.ending is not None:
            subscriber.cut(self.ending)
        return subscriber

    def unsubscribe(self) -> None:
        if self.subscriber is not None:
            self.hub.unsubscribe(self.subscriber)
            self.subscriber = None

    async def write(self, data: bytes, timeout_s: float | None = None) -> None:
        """Writes; raises ConnectionError when the client is gone, SlowClientError when it has not read
        for `send_timeout_s` (the data is then in the transport's buffer, still to be sent)."""
        timeout_s = timeout_s or self.settings.send_timeout_s
        # asyncio.timeout, not wait_for: on 3.11 wait_for makes a task per call, a fifth of the daemon's
        # CPU with 1,000 streams (docs/benchmarks.md).
        try:
            async with asyncio.timeout(timeout_s):
                await self.response.write(data)
        except TimeoutError:
            raise SlowClientError from None

    async def resume(self, last: int) -> Subscriber:
        """Serves a client that says it has every event up to the id `last`: what it missed, then live."""
        async with self.hub.pool.acquire() as connection:
            point = await connection.fetchrow(sql("resume_point"), self.filter.tenant_id, last)
        assert point is not None  # noqa: S101 - the query reads batchd.event_log's one row
        reached, problem = resume_point(point, last, admin=self.admin)
        if problem is not None:
            return await self.reset(problem, last)
        self.position, self.last_id = reached, last
        return await self.catch_up(last, reached)

    async def catch_up(self, cursor: int, reached: int) -> Subscriber:
        """Replays the events after the id `cursor` (the seq `reached`, the same point), then subscribes at
        the hub's head (see the module's doc)."""
        while True:
            upto = self.hub.head
            if reached >= upto or self.hub.closing or self.ending is not None:
                return self.subscribe(reached)  # no await since reading hub.head
            async with self.hub.pool.acquire() as connection:
                rows = await self._replay_page(connection, cursor, reached, upto)
                # Read after the page: the pruner only ever cuts a prefix, so if the oldest event is
                # still at most reached + 1 now, nothing the page should hold was pruned before it ran.
                oldest = await connection.fetchval(sql("oldest_event_seq"))
            if oldest is None or oldest > reached + 1:
                return await self.reset(f"events after {cursor} were pruned while being replayed", cursor)
            if rows:
                events = [Event.from_row(row) for row in rows]
                await self.write(b"".join(e.admin_frame if self.admin else e.frame for e in events))
                cursor = events[-1].id_for(self.admin)
            reached = rows[-1]["seq"] if len(rows) == self.settings.replay_page else upto
            self.position, self.last_id = reached, cursor

    async def _replay_page(self, connection: Connection, cursor: int, reached: int, upto: int) -> list[Any]:
        f = self.filter
        bounds: tuple[object, ...]
        if self.admin:
            query, bounds = sql("replay_events"), (reached, upto)
        else:
            query, bounds = sql("replay_tenant_events"), (f.tenant_id, cursor, reached, upto)
        types = None if f.types is None else sorted(f.types)
        return await connection.fetch(query, *bounds, f.job_id, f.batch_id, types, self.settings.replay_page)

    async def reset(self, problem: str, last: int) -> Subscriber:
        """Tells the client its id cannot be resumed from, and goes on live from the hub's head."""
        subscriber = self.subscribe()
        resume_from = self.last_id = await self.id_at(subscriber.start_seq)
        await self.write(
            _frame(
                "reset",
                {"reason": problem, "last_event_id": last, "resume_from": resume_from},
                event_id=resume_from,
            )
        )
        return subscriber

    async def id_at(self, position: int) -> int:
        """This stream's id for the log's seq `position`."""
        if self.admin:
            return position
        tenant_id = self.filter.tenant_id
        return int(await self.hub.pool.fetchval(sql("tenant_event_position"), tenant_id, position))

    async def live(self, subscriber: Subscriber) -> bool:
        """Writes live events until the stream ends (False) or falls behind (True)."""
        heartbeat = self.settings.heartbeat_s
        while True:
            try:
                async with asyncio.timeout(heartbeat):
                    await subscriber.ready.wait()
            except TimeoutError:
                await self.write(b": heartbeat\n\n")
                continue
            if subscriber.cut_reason is not None:
                await self.finish(subscriber.cut_reason)
                return False
            if subscriber.behind:
                return True
            data, last = subscriber.take()
            await self.write(data)
            if last is not None:
                self.position, self.last_id = last.seq, last.id_for(self.admin)

    async def finish(self, reason: str) -> None:
        """The stream's last event, then the end of the response."""
        if reason == "slow_consumer":
            self.hub.cut_off += 1
            log.info("sse.slow_consumer_cut_off", peer=self.request.remote)
        elif reason == "revoked":
            log.info("sse.token_revoked", tenant=self.filter.tenant_id, peer=self.request.remote)
        detail = DISCONNECT_DETAILS.get(reason, f"{reason}; reconnect with Last-Event-ID")
        data = {"reason": reason, "detail": detail}
        try:
            await self.write(_frame("disconnect", data), FINAL_WRITE_TIMEOUT_S)
        except SlowClientError:
            # The event waits in the transport's buffer: close after it is sent, or for good if the
            # client never reads it.
            transport = self.request.transport
            if transport is not None:
                transport.close()
                asyncio.get_running_loop().call_later(self.settings.send_timeout_s, transport.abort)
            raise ConnectionAbortedError("closed on a client that does not read") from None


DISCONNECT_DETAILS = {
    "slow_consumer": "this client read too slowly and its buffer filled; reconnect with Last-Event-ID",
    "shutdown": "the server is stopping; reconnect with Last-Event-ID",
    "revoked": "the token this stream was opened with has been revoked; a reconnection with it is refused",
}


def resume_point(point: asyncpg.Record, last: int, *, admin: bool) -> tuple[int, str | None]:
    """Where a stream resuming after the id `last` starts, as a seq of the log, or what is wrong with `last`.
    `point` is the resume_point query's row: one snapshot of the log's head and oldest seq, the tenant's last
    id and the ids' base, and the seq of the tenant's event with id last + 1 (if it is still kept).

    A tenant's id at least the base is its own count (tenant_seq, gap-free): the client has everything up to
    the event before its next one, or up to the head when it has them all. An admin's id, or a tenant's id
    below the base (sent before migration 0009), is a seq of the log: it is its own position."""
    head, oldest, tenant_head = point["head"], point["oldest"], point["tenant_head"]
    newest = head if admin else tenant_head
    if last > newest:
        return 0, f"event {last} was never sent by this database (its last is {newest})"
    if admin or last < point["base"]:
        if last < head and (oldest is None or oldest > last + 1):
            return 0, f"events after {last} are past the retention"
        return last, None
    if last == tenant_head:
        return head, None
    if point["next_seq"] is None:
        return 0, f"events after {last} are past the retention"
    return int(point["next_seq"]) - 1, None


async def stream_events(request: web.Request, principal: Principal) -> web.StreamResponse:
    hub = request.app[HUB]
    try:
        event_filter = parse_filter(request.query, principal)
        last = parse_last_event_id(request)
    except BadRequestError as error:
        return web.json_response({"error": {"status": 400, "message": str(error)}}, status=400)
    if event_filter.job_id is not None and not principal.is_admin:
        owner = await hub.pool.fetchval(sql("job_tenant"), event_filter.job_id)
        if owner != principal.tenant_id:
            return web.json_response({"error": {"status": 404, "message": "no such job"}}, status=404)
    with hub.stream_slot(principal.tenant_id) as admitted:
        if not admitted:
            limit = hub.settings.max_streams_per_tenant
            return web.json_response(
                {"error": {"status": 429, "message": f"at most {limit} open event streams per tenant"}},
                status=429,
                headers={"Retry-After": "30"},
            )
        response = web.StreamResponse(headers=HEADERS)
        await response.prepare(request)
        stream = Stream(request, response, hub, event_filter)
        try:
            # A ConnectionError: the client left (or was cut off), and there is nothing more to say to it.
            with suppress(ConnectionError), hub.opened_with(principal.token_id, stream):
                try:
                    await stream.serve(last)
                except SlowClientError:
                    await stream.finish("slow_consumer")
        finally:
            stream.unsubscribe()
        return response
