"""A Python client of batchd's HTTP API (docs/client.md), and a producer writing through PostgreSQL.

`Client(base_url, token)` submits, reads, lists and cancels jobs, and follows `GET /v1/events`: `events()`
reconnects by itself after a cut connection, resuming with `Last-Event-ID` (no event lost, none repeated),
waits what the server's `retry:` advises (capped, jittered) and hands a `reset` to the caller as an event.
`wait()` and `results()` are driven by that stream: the stream is subscribed before the jobs are read, so a
job ending between the read and the subscription is not missed, and nothing polls.

An answer the API refuses raises an `APIError` of the status's class, with the API's message.
`PostgresProducer(pool, tenant_id)` is the producer contract's plain INSERT, for a producer next to the
database.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Self, overload

import aiohttp
import asyncpg

from . import enqueue
from .statuses import FINAL_JOB_STATUSES
from .store import Connection

Job = Mapping[str, Any]
FINAL_EVENTS = ("job.succeeded", "job.failed", "job.canceled")
DEFAULT_RETRY_S = 2.0  # until the server's `retry:` says otherwise (its default is the same)
MAX_RETRY_S = 30.0
# A stream idle this long is taken for dead (a heartbeat comes every events.heartbeat_s, 15 s by default).
IDLE_TIMEOUT_S = 60.0
READ_CONCURRENCY = 16


class BatchdError(Exception):
    """Anything this client raises of its own."""


class APIError(BatchdError):
    """The API refused a request: `status`, the API's `message`, and the whole `error` object it sent (a
    400 on a POST has `problems`, a 409 `job_status`, a 429 of max_queued `detail` and `hint`)."""

    def __init__(
        self,
        status: int,
        message: str,
        error: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.error: Mapping[str, Any] = error or {}
        self.retry_after = retry_after  # seconds, from Retry-After (429, 503), when the answer has it


class BadRequest(APIError):  # noqa: N818 - named after the status, as the API's answers are
    """400: a bad body, job, parameter or Last-Event-ID."""


class Unauthorized(APIError):  # noqa: N818
    """401: no token, or a bad or revoked one."""


class Forbidden(APIError):  # noqa: N818
    """403: another tenant's jobs, or the admin's endpoints."""


class NotFound(APIError):  # noqa: N818
    """404: no such job (or another tenant's)."""


class Conflict(APIError):  # noqa: N818
    """409: the job is no longer queued; `job_status` says what it is."""

    @property
    def job_status(self) -> str | None:
        status = self.error.get("job_status")
        return None if status is None else str(status)


class PayloadTooLarge(APIError):  # noqa: N818
    """413: too large a body, or too many jobs in one request."""


class TooManyRequests(APIError):  # noqa: N818
    """429: the tenant's max_queued, or too many event streams. `retry_after`: seconds, from Retry-After."""


class ServiceUnavailable(APIError):  # noqa: N818
    """503: the database could not be read or written; nothing was. `retry_after` when the API says."""


ERRORS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: TooManyRequests,
    503: ServiceUnavailable,
}


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        return float(headers["Retry-After"])
    except (KeyError, ValueError):
        return None  # absent, or an HTTP date: batchd sends seconds


async def _raise_for(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    text = await response.text()
    try:
        error = json.loads(text)["error"]
        message = str(error["message"])
    except (ValueError, KeyError, TypeError):
        error, message = {}, text.strip() or response.reason or "no message"
    kind = ERRORS.get(response.status, APIError)
    raise kind(response.status, message, error, _retry_after(response.headers))


@dataclass(frozen=True)
class Event:
    """One event of the stream: `id` (its tenant's count; the log's for the admin), `type` (`job.succeeded`,
    …, or `reset`) and `data`, the event's JSON object."""

    id: int | None
    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Page:
    """A page of `GET /v1/jobs`: its jobs (without their result), and the cursor to ask after it."""

    jobs: list[dict[str, Any]]
    next_cursor: str | None
    more: bool


@dataclass
class Message:
    """One block of a `text/event-stream`, as the HTML standard's EventSource reads it: `data:` lines
    joined with newlines, `event:`, `id:`, `retry:`, and the comments (`: heartbeat`)."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    data_lines: list[str] = field(default_factory=list, repr=False)
    # A field other than a comment came: a block of comments alone (a heartbeat) has none.
    has_fields: bool = field(default=False, repr=False)

    @property
    def is_event(self) -> bool:
        """False for a block of only comments or `retry:`: the browser dispatches no event for it."""
        return bool(self.data_lines)


async def messages(chunks: AsyncIterable[bytes]) -> AsyncIterator[Message]:
    """Yields each block (events, and comment-only blocks such as heartbeats) as it is completed, from any
    async iterator of byte chunks (aiohttp's `response.content.iter_any()`): lines split across chunks are
    put back together, so an event may be of any size."""
    pending = b""
    current = Message()
    touched = False
    async for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.removesuffix(b"\r").decode()
            if line == "":
                if touched:
                    current.data = "\n".join(current.data_lines)
                    yield current
                current, touched = Message(), False
                continue
            touched = True
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "":
                current.comments.append(value)
                continue
            current.has_fields = True
            if name == "data":
                current.data_lines.append(value)
            elif name == "event":
                current.event = value
            elif name == "id" and "\0" not in value:
                current.id = value
            elif name == "retry" and value.isdigit():
                current.retry = int(value)


@dataclass(frozen=True)
class _Connected:
    """Marks, in the client's own reading of a stream, that a connection's first block came: the server
    writes it once the stream is subscribed, so every event after it will come. `resumed`: the connection
    went on from an id (it misses nothing since); else it started from now."""

    resumed: bool


class Client:
    """batchd's HTTP API with a tenant's token (or the admin's). `async with Client(url, token) as c:`."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        max_retry_s: float = MAX_RETRY_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        timeout_s: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retry_s = max_retry_s
        self.idle_timeout_s = idle_timeout_s
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(headers=self._headers, connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise BatchdError("the client is not open: use `async with Client(...)`")
        return self._session

    async def _json(self, method: str, path: str, **options: Any) -> Any:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with self.session.request(method, self.base_url + path, timeout=timeout, **options) as response:
            await _raise_for(response)
            return await response.json()

    @overload
    async def submit(self, jobs: Job, idempotency_key: str | None = None) -> str: ...

    @overload
    async def submit(self, jobs: Sequence[Job], idempotency_key: None = None) -> list[str]: ...

    async def submit(self, jobs: Job | Sequence[Job], idempotency_key: str | None = None) -> str | list[str]:
        """`POST /v1/jobs`: one job (a dict: `request`, or `job_type` and `input`; `metadata`, `deadline`,
        `route`, …) gives its id; a list gives theirs, in order, all written or none. `idempotency_key`
        (one job only; in a list each job carries its own `idempotency_key`): a job whose key the tenant
        holds already is not added again, its holder's id is returned."""
        headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
        body = json.dumps(jobs if isinstance(jobs, Mapping) else list(jobs))
        headers["Content-Type"] = "application/json"
        answer = await self._json("POST", "/v1/jobs", data=body, headers=headers)
        if isinstance(jobs, Mapping):
            return str(answer["id"])
        return [str(item["id"]) for item in answer["jobs"]]

    async def get(self, job_id: str) -> dict[str, Any]:
        """`GET /v1/jobs/{id}`: the job, its result included. NotFound for another tenant's."""
        answer: dict[str, Any] = await self._json("GET", f"/v1/jobs/{job_id}")
        return answer

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """`DELETE /v1/jobs/{id}`: cancels a queued job. Conflict (its `job_status`) when it is no longer."""
        answer: dict[str, Any] = await self._json("DELETE", f"/v1/jobs/{job_id}")
        return answer

    async def events(
        self,
        *,
        types: Iterable[str] | None = None,
        job_id: str | None = None,
        batch_id: str | None = None,
        last_event_id: int | None = None,
    ) -> AsyncGenerator[Event, None]:
        """`GET /v1/events`, for as long as the caller reads: every event after `last_event_id` (or from
        now), each once, in order, across reconnections (see the module's doc). A `reset` event (its `data`:
        `reason`, `last_event_id`, `resume_from`) means events were lost to the retention, or the id was
        never this stream's: reload what you hold (`get`, `list`) and go on from it, the stream does.
        Without `last_event_id` the stream starts from now, and until its first event there is no id to
        resume from: a connection cut before then goes on from the new connection's now (to start from a
        known point, pass the `last_event_id` of `GET /v1/overview`). Refusals (401 a revoked token, 400,
        403, 404, 429) raise."""
        stream = self._stream(_filters(types, job_id, batch_id), last_event_id)
        try:
            async for item in stream:
                if isinstance(item, Event):
                    yield item
        finally:
            await stream.aclose()  # its connection closed now, not whenever the generator is collected

    async def _stream(
        self, params: dict[str, str], last_event_id: int | None
    ) -> AsyncGenerator[Event | _Connected, None]:
        retry_s = DEFAULT_RETRY_S
        failures = 0
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout_s, sock_read=self.idle_timeout_s
        )
        while True:
            headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
            try:
                async with self.session.get(
                    f"{self.base_url}/v1/events", params=params, headers=headers, timeout=timeout
                ) as response:
                    if response.status >= 500:
                        raise aiohttp.ClientResponseError(response.request_info, (), status=response.status)
                    await _raise_for(response)
                    connected = False
                    async for block in messages(response.content.iter_any()):
                        if not block.has_fields:
                            continue  # a heartbeat
                        if block.retry is not None:
                            retry_s = block.retry / 1000
                        if not connected:
                            connected, failures = True, 0
                            yield _Connected(resumed=last_event_id is not None)
                        if not block.is_event or block.event == "disconnect":
                            continue  # `retry:` alone; a disconnect carries no id: the stream resumes after
                        event = Event(
                            None if block.id is None else int(block.id),
                            block.event,
                            json.loads(block.data),
                        )
                        if event.id is not None:
                            last_event_id = event.id
                        yield event
            except (aiohttp.ClientError, ConnectionError, TimeoutError, ValueError):
                # Cut, refused, idle past idle_timeout_s, or a line broken mid-way: resume from the last id.
                pass
            failures += 1
            await asyncio.sleep(self._delay(retry_s, failures))

    def _delay(self, retry_s: float, failures: int) -> float:
        """The server's advice, doubled for each failure in a row, capped; jittered so that clients cut off
        together do not come back together."""
        growth = 2 ** (failures - 1)
        # Some floor after a failure in a row, should the server advise 0: no loop hammering it.
        ceiling = min(self.max_retry_s, max(retry_s, 0.0 if failures == 1 else 0.1) * growth)
        return random.uniform(ceiling / 2, ceiling)

    async def wait(
        self,
        job_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - a deadline of the whole wait, as asyncio.wait_for's
    ) -> dict[str, Any]:
        """The job once it has ended (succeeded, failed or canceled), its result included. TimeoutError
        after `timeout` seconds."""
        return (await self.results([job_id], timeout=timeout))[0]

    async def results(
        self,
        ids: Iterable[str],
        timeout: float | None = None,  # noqa: ASYNC109 - the same
    ) -> list[dict[str, Any]]:
        """The jobs, in the order given, once every one has ended. The event stream is subscribed first,
        then each job read: one that ended before is done, one that ends after comes as an event (a reset,
        which may have dropped events, has every job still waiting read again)."""
        wanted = [str(job_id) for job_id in ids]
        async with asyncio.timeout(timeout):
            return await self._results(wanted)

    async def _results(self, wanted: list[str]) -> list[dict[str, Any]]:
        done: dict[str, dict[str, Any]] = {}
        pending: set[str] = set(wanted)
        if not pending:
            return []
        one = next(iter(pending)) if len(pending) == 1 else None
        stream = self._stream(_filters(FINAL_EVENTS, one, None), None)
        try:
            async for item in stream:
                if isinstance(item, _Connected):
                    # A connection resumed from an id misses nothing; one that starts from now (the first,
                    # or one cut before any event came) may follow jobs that ended before it.
                    if not item.resumed:
                        await self._read_ended(pending, done)
                elif item.type == "reset":
                    await self._read_ended(pending, done)
                elif str(item.data.get("job_id")) in pending:
                    job_id = str(item.data["job_id"])
                    done[job_id] = await self.get(job_id)
                    pending.discard(job_id)
                if not pending:
                    return [done[job_id] for job_id in wanted]
        finally:
            await stream.aclose()
        raise AssertionError("the event stream ended")  # pragma: no cover - _stream never ends

    async def _read_ended(self, pending: set[str], done: dict[str, dict[str, Any]]) -> None:
        limit = asyncio.Semaphore(READ_CONCURRENCY)

        async def read(job_id: str) -> None:
            async with limit:
                job = await self.get(job_id)
            if job["status"] in FINAL_JOB_STATUSES:
                done[job_id] = job
                pending.discard(job_id)

        await asyncio.gather(*(read(job_id) for job_id in sorted(pending)))

    async def list(
        self,
        *,
        status: str | None = None,
        since: str | datetime | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        tenant: str | None = None,
    ) -> AsyncGenerator[Page, None]:
        """`GET /v1/jobs`, page after page, oldest first, until the last (`more` false: its `next_cursor` is
        where to ask again later for newer jobs). With `status`, a page may hold fewer than `limit` jobs,
        even none, and more still follow."""
        params: dict[str, str] = {}
        if status is not None:
            params["status"] = status
        if since is not None:
            params["since"] = since.isoformat() if isinstance(since, datetime) else since
        if limit is not None:
            params["limit"] = str(limit)
        if tenant is not None:
            params["tenant"] = tenant
        while True:
            if cursor is not None:
                params["cursor"] = cursor
            answer = await self._json("GET", "/v1/jobs", params=params)
            page = Page(list(answer["jobs"]), answer["next_cursor"], bool(answer["more"]))
            yield page
            if not page.more or page.next_cursor is None:
                return
            cursor = page.next_cursor


def _filters(types: Iterable[str] | None, job_id: str | None, batch_id: str | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if types is not None:
        params["types"] = ",".join(types)
    if job_id is not None:
        params["job_id"] = str(job_id)
    if batch_id is not None:
        params["batch_id"] = str(batch_id)
    return params


class PostgresProducer:
    """The producer contract's INSERT into batchd.jobs, through a pool or a connection (a producer role's
    will do: it writes only the columns a producer may). The jobs are the HTTP API's (`request`, or
    `job_type` and `input`; `metadata`, `idempotency_key`, `deadline`, `route`, `tenant_id`), written in
    one transaction, all or none. Unlike the HTTP API, nothing is checked before: a job the daemon cannot
    send fails when it claims it, and the database's refusals raise as asyncpg's errors (a tenant at its
    max_queued: ConfigurationLimitExceededError)."""

    def __init__(self, database: asyncpg.Pool | Connection, tenant_id: str) -> None:
        self.database = database
        self.tenant_id = tenant_id

    @overload
    async def submit(self, jobs: Job, idempotency_key: str | None = None) -> str: ...

    @overload
    async def submit(self, jobs: Sequence[Job], idempotency_key: None = None) -> list[str]: ...

    async def submit(self, jobs: Job | Sequence[Job], idempotency_key: str | None = None) -> str | list[str]:
        """The jobs' ids, in order (a job whose idempotency key its tenant holds already: the holder's)."""
        single = isinstance(jobs, Mapping)
        many: list[Job] = [jobs] if isinstance(jobs, Mapping) else list(jobs)
        if idempotency_key is not None:
            if not single:
                raise ValueError("idempotency_key goes with one job; give each job its idempotency_key")
            many = [{**many[0], "idempotency_key": idempotency_key}]
        checked = [(None, self._new_job(job)) for job in many]
        if isinstance(self.database, asyncpg.Pool):
            async with self.database.acquire() as connection:
                outcome = await enqueue.insert_jobs(connection, checked, holders=True)
        else:
            outcome = await enqueue.insert_jobs(self.database, checked, holders=True)
        ids = [str(job_id) for job_id in outcome.ids]
        return ids[0] if single else ids

    def _new_job(self, job: Job) -> enqueue.NewJob:
        unknown = set(job) - set(enqueue.KEYS)
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(sorted(unknown))}; a job has {', '.join(enqueue.KEYS)}"
            )
        deadline = job.get("deadline")
        if isinstance(deadline, str):
            deadline = enqueue.parse_deadline(deadline)
        if deadline is not None and not isinstance(deadline, datetime):
            raise ValueError("deadline must be a datetime with a time zone, an ISO 8601 text or 30m, 2h, 1d")
        text = json.dumps({key: value for key, value in job.items() if key != "deadline"})
        return enqueue.NewJob(
            text=text,
            tenant_id=str(job.get("tenant_id", self.tenant_id)),
            job_type=job.get("job_type"),
            idempotency_key=job.get("idempotency_key"),
            deadline=deadline,
            route=str(job.get("route", "batch")),
        )
