"""A test client of `GET /v1/events`, and what the event log says a stream should have carried."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from support import wait_until

from batchd.client import Message, messages


class Collector:
    """Reads a stream in the background; `messages` grows as blocks arrive (heartbeats included)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.messages: list[Message] = []
        self.ended = asyncio.Event()
        self.arrivals: list[float] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in messages(self.response.content.iter_any()):
                self.messages.append(message)
                self.arrivals.append(time.monotonic())
        except (aiohttp.ClientError, ConnectionError):
            pass
        finally:
            self.ended.set()

    @property
    def events(self) -> list[Message]:
        return [message for message in self.messages if message.is_event]

    @property
    def ids(self) -> list[int]:
        return [int(message.id) for message in self.events if message.id is not None]

    @property
    def last_id(self) -> int | None:
        ids = self.ids
        return ids[-1] if ids else None

    def data(self) -> list[dict[str, Any]]:
        return [json.loads(message.data) for message in self.events if message.id is not None]

    async def until(self, condition: Callable[[Collector], bool], timeout: float = 20.0) -> None:
        async def met() -> bool:
            if condition(self):
                return True
            if self.ended.is_set():
                raise AssertionError(f"the stream ended first; it carried {self.messages[-3:]}")
            return False

        await wait_until(met, timeout=timeout, interval=0.01)

    async def close(self) -> None:
        """Drops the connection without ceremony, as a killed client would."""
        self._task.cancel()
        self.response.close()
        await asyncio.gather(self._task, return_exceptions=True)


# Conditions for `Collector.until`, bound to a value (a lambda in a loop would see the loop's last one).
def ends_at(event_id: int) -> Callable[[Collector], bool]:
    """The last event carried is `event_id`."""
    return lambda collector: collector.last_id == event_id


def reached(event_id: int) -> Callable[[Collector], bool]:
    """`event_id`, or a later event, has been carried."""
    return lambda collector: (collector.last_id or 0) >= event_id


def carried_events(count: int) -> Callable[[Collector], bool]:
    """Exactly `count` events have been carried."""
    return lambda collector: len(collector.ids) == count


@asynccontextmanager
async def sse_stream(
    session: aiohttp.ClientSession,
    base_url: str,
    token: str | None,
    *,
    last_event_id: int | None = None,
    in_query: bool = False,
    expect_status: int = 200,
    query: Mapping[str, str] | None = None,
) -> AsyncIterator[Collector]:
    """A stream of GET /v1/events; `query` holds its filters (and, if any, the token as `access_token`)."""
    params = dict(query or {})
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if last_event_id is not None:
        if in_query:
            params["last_event_id"] = str(last_event_id)
        else:
            headers["Last-Event-ID"] = str(last_event_id)
    response = await session.get(f"{base_url}/v1/events", headers=headers, params=params)
    if response.status != expect_status:
        body = await response.text()
        response.close()
        raise AssertionError(f"GET /v1/events answered {response.status}: {body}")
    collector = Collector(response)
    try:
        # The server subscribes a stream before its first block (`retry:`) goes out: once it is here,
        # every event published from now on will come.
        await collector.until(lambda c: bool(c.messages), timeout=10)
        yield collector
    finally:
        await collector.close()


async def settled(db: Any) -> bool:
    """No batch still open (its batch.ended is yet to come) and every event published."""
    return bool(
        await db.fetchval(
            "SELECT NOT EXISTS"
            " (SELECT 1 FROM batchd.batches WHERE status IN ('pending', 'in_progress', 'ended'))"
            " AND NOT EXISTS (SELECT 1 FROM batchd.events WHERE seq IS NULL)"
        )
    )


async def logged(db: Any, tenant: str | None = None) -> list[tuple[int, str, str | None]]:
    """The published events a stream of `tenant` (None: the admin) must carry once the run has settled:
    (id, type, job id), the id being the tenant's own count (tenant_seq) or, for the admin, the log's seq."""
    await wait_until(lambda: settled(db), timeout=30)
    rows = await db.fetch(
        "SELECT CASE WHEN $1::text IS NULL THEN seq ELSE tenant_seq END AS id, type, job_id"
        "  FROM batchd.events WHERE $1::text IS NULL OR tenant_id = $1 ORDER BY seq",
        tenant,
    )
    return [(row["id"], row["type"], str(row["job_id"]) if row["job_id"] else None) for row in rows]


def carried(collector: Collector) -> list[tuple[int, str, str | None]]:
    return [
        (int(message.id), message.event, json.loads(message.data).get("job_id"))
        for message in collector.events
        if message.id is not None and message.event != "reset"
    ]


async def add_events(db: Any, tenant: str, count: int, *, notify: bool = True) -> None:
    """Events as the daemon writes them, one statement (so published together unless told otherwise)."""
    await db.execute(
        "INSERT INTO batchd.events (type, tenant_id, job_id, data)"
        " SELECT 'job.canceled', $1, gen_random_uuid(), '{\"status\": \"canceled\"}'"
        "   FROM generate_series(1, $2)",
        tenant,
        count,
    )
    if notify:
        await db.execute("NOTIFY batchd_events")
