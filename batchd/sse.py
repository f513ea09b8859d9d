"""`GET /v1/events`: a tenant's events as Server-Sent Events, resumable with no gap and no duplicate.

A stream resumed with `Last-Event-ID` (or `last_event_id`, for a first connection that must not miss
anything since a snapshot) replays what the client missed from the table, page by page, up to the hub's
head, then subscribes to the hub at that very head without yielding in between: every event after the id,
once. An id older than the retained log (or from another database) gets `event: reset` with the current
head as its id, then live events: the client should reload its state.

Memory per stream is bounded: live events wait in a buffer of at most `client_buffer_bytes`; a burst
that would overflow it drops the buffer and the stream goes on from the table, from the last event it
wrote, at the client's pace (then live again), or, with `on_full_buffer = "cut"`, ends as a slow consumer.
A client that does not read for `send_timeout_s` is cut off. A stream ends with `event: disconnect` (no
id, so the client's last id stands) for such a client (`slow_consumer`) or when the server stops
(`shutdown`); EventSource then reconnects with its last id and misses nothing.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from contextlib import suppress

import structlog
from aiohttp import web

from .events import Event, EventHub, Filter, Subscriber
from .store import sql
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
    """One client's open response and the steps of serving it. `position` is the seq of the last event the
    client has been sent (or the point it was subscribed at): where it goes on from after falling behind."""

    def __init__(self, request: web.Request, response: web.StreamResponse, hub: EventHub) -> None:
        self.request = request
        self.response = response
        self.hub = hub
        self.settings = hub.settings
        self.subscriber: Subscriber | None = None
        self.position = 0

    async def serve(self, event_filter: Filter, last: int | None) -> None:
        retry = f"retry: {self.settings.retry_ms}\n\n".encode()
        if last is None:
            # Subscribed before the first byte goes out: a client that has read `retry:` will see
            # every event published from then on.
            subscriber = self.subscribe(event_filter)
            await self.write(retry)
        else:
            await self.write(retry)
            subscriber = await self.catch_up(event_filter, last)
        while await self.live(subscriber):
            # It fell behind: its buffer was dropped. Go on from the table, from what it was last sent.
            self.hub.fell_behind += 1
            self.unsubscribe()
            subscriber = await self.catch_up(event_filter, self.position)

    def subscribe(self, event_filter: Filter) -> Subscriber:
        self.subscriber = self.hub.subscribe(event_filter)
        self.position = self.subscriber.start_seq
        return self.subscriber

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

    async def catch_up(self, event_filter: Filter, last: int) -> Subscriber:
        """Replays what the client missed, then subscribes at the hub's head (see the module's doc)."""
        problem = await self._resume_problem(last)
        cursor = last
        while problem is None:
            upto = self.hub.head
            if cursor >= upto or self.hub.closing:
                return self.subscribe(event_filter)  # no await since reading hub.head
            async with self.hub.pool.acquire() as connection:
                rows = await connection.fetch(
                    sql("replay_events"),
                    cursor,
                    upto,
                    event_filter.tenant_id,
                    event_filter.job_id,
                    event_filter.batch_id,
                    None if event_filter.types is None else sorted(event_filter.types),
                    self.settings.replay_page,
                )
                # Read after the page: the pruner only ever cuts a prefix, so if the oldest event is
                # still at most cursor + 1 now, nothing the page should hold was pruned before it ran.
                oldest = await connection.fetchval(sql("oldest_event_seq"))
            if oldest is None or oldest > cursor + 1:
                problem = f"events after {cursor} were pruned while being replayed"
                break
            if rows:
                await self.write(b"".join(Event.from_row(row).frame for row in rows))
            cursor = rows[-1]["seq"] if len(rows) == self.settings.replay_page else upto
            self.position = cursor
        subscriber = self.subscribe(event_filter)
        await self.write(
            _frame(
                "reset",
                {"reason": problem, "last_event_id": last, "resume_from": subscriber.start_seq},
                event_id=subscriber.start_seq,
            )
        )
        return subscriber

    async def _resume_problem(self, last: int) -> str | None:
        async with self.hub.pool.acquire() as connection:
            head = await connection.fetchval(sql("event_log_head"))
            oldest = await connection.fetchval(sql("oldest_event_seq"))
        if last > head:
            return f"event {last} was never sent by this database (its last is {head})"
        if last < head and (oldest is None or oldest > last + 1):
            return f"events after {last} are past the retention of {self.settings.retention_s:g} s"
        return None

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
            data, last_seq = subscriber.take()
            await self.write(data)
            self.position = last_seq

    async def finish(self, reason: str) -> None:
        """The stream's last event, then the end of the response."""
        if reason == "slow_consumer":
            self.hub.cut_off += 1
            log.info("sse.slow_consumer_cut_off", peer=self.request.remote)
        detail = {
            "slow_consumer": "this client read too slowly and its buffer filled",
            "shutdown": "the server is stopping",
        }.get(reason, reason)
        data = {"reason": reason, "detail": f"{detail}; reconnect with Last-Event-ID"}
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
        stream = Stream(request, response, hub)
        try:
            # A ConnectionError: the client left (or was cut off), and there is nothing more to say to it.
            with suppress(ConnectionError):
                try:
                    await stream.serve(event_filter, last)
                except SlowClientError:
                    await stream.finish("slow_consumer")
        finally:
            stream.unsubscribe()
        return response
