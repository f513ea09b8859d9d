"""batchd.client against a daemon in this process (the emulator, real Postgres): submit over HTTP and through
asyncpg, read, list, cancel, the typed errors, wait/results as jobs end, and an event stream that survives
its connection being cut, with no event lost or repeated."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from sse_support import logged
from support import ADMIN_TOKEN, QUICK, insert_raw, raw_request, wait_for_jobs, wait_until
from test_roles import Deployment, _deployment

from batchd.client import (
    BadRequest,
    Client,
    Conflict,
    Event,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    PostgresProducer,
    TooManyRequests,
    Unauthorized,
)
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig

MAX_POST_JOBS = 5
MAX_WAIT_S = 3600.0  # the held daemon's jobs stay queued whatever a test takes


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


@pytest.fixture
async def held_url(
    db: Any, tokens: dict[str, str], daemon_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    """A daemon that flushes nothing during a test: its jobs stay queued (to be canceled, counted)."""
    monkeypatch.setenv("BATCHD_ADMIN_TOKEN", ADMIN_TOKEN)
    settings = daemon_settings(
        http={"max_post_jobs": MAX_POST_JOBS},
        batching={"max_requests": 100, "max_wait_s": MAX_WAIT_S},
        events={"retry_ms": 50},
    )
    async with Daemon(settings).running() as daemon:
        assert daemon.http_url is not None
        yield daemon.http_url


@pytest.fixture
async def flowing_url(db: Any, tokens: dict[str, str], serve: Any) -> AsyncIterator[str]:
    """A daemon sending its jobs in batches as they come (within 0.2 s), the emulator ending them quickly."""
    async with serve(retry_ms=50) as (_, url):
        yield url


def job(text: str = "hello", **members: Any) -> dict[str, Any]:
    return {"request": raw_request(text), **members}


async def test_submit_get_list_and_cancel_over_http(db: Any, tokens: dict[str, str], held_url: str) -> None:
    async with Client(held_url, tokens["acme"]) as client:
        first = await client.submit(job(metadata={"n": 1}), idempotency_key="order-1")
        assert await client.submit(job(), idempotency_key="order-1") == first  # retried: the same job
        more = await client.submit([job("a"), job("b"), job("c", idempotency_key="k")])
        assert len(more) == 3
        ids = [first, *more]
        assert [str(r["id"]) for r in await db.fetch("SELECT id FROM batchd.jobs ORDER BY seq")] == ids

        read = await client.get(first)
        assert (read["id"], read["status"], read["tenant_id"], read["metadata"]) == (
            first,
            "queued",
            "acme",
            {"n": 1},
        )

        # In the ids' order (by millisecond: jobs of one POST may share one), which a UUID's text sorts in.
        ordered = sorted(ids)
        pages = [page async for page in client.list(limit=2)]
        assert [[j["id"] for j in page.jobs] for page in pages] == [ordered[:2], ordered[2:]]
        assert [page.more for page in pages] == [True, False]
        assert pages[-1].next_cursor == ordered[-1]

        assert await client.cancel(more[1]) == {"id": more[1], "status": "canceled"}
        with pytest.raises(Conflict) as conflict:
            await client.cancel(more[1])
        assert conflict.value.status == 409
        assert conflict.value.job_status == "canceled"
        assert "only a queued job can be canceled" in conflict.value.message
        canceled = [j["id"] async for page in client.list(status="canceled") for j in page.jobs]
        assert canceled == [more[1]]
        # A later listing goes on from the last page's cursor: only the jobs made since.
        newer = await client.submit(job("d"))
        after = [j["id"] async for page in client.list(cursor=pages[-1].next_cursor) for j in page.jobs]
        assert after == [newer]


async def test_refusals_raise_typed_errors_with_the_apis_message(
    db: Any, tokens: dict[str, str], held_url: str
) -> None:
    async with Client(held_url, "not-a-token") as stranger:
        with pytest.raises(Unauthorized) as unauthorized:
            await stranger.get("00000000-0000-0000-0000-000000000000")
        assert unauthorized.value.status == 401
        with pytest.raises(Unauthorized):
            await anext(stranger.events())
    async with Client(held_url, tokens["acme"]) as acme, Client(held_url, tokens["globex"]) as globex:
        theirs = await globex.submit(job())
        with pytest.raises(NotFound) as not_found:
            await acme.get(theirs)
        assert not_found.value.message == "no such job"
        with pytest.raises(NotFound):
            await acme.cancel(theirs)
        with pytest.raises(NotFound):
            await acme.wait(theirs, timeout=10)
        with pytest.raises(Forbidden) as forbidden:
            await acme.submit(job(tenant_id="globex"))
        assert "writes tenant acme's jobs only" in forbidden.value.message
        with pytest.raises(BadRequest) as bad:
            await acme.submit([job(), {"metadata": {}}])
        assert bad.value.message.startswith("job 1: ")
        assert bad.value.error["problems"][0]["index"] == 1
        with pytest.raises(BadRequest) as bad_status:
            await anext(acme.list(status="lost"))
        assert bad_status.value.error["field"] == "status"
        with pytest.raises(BadRequest):
            await anext(acme.events(types=["job.lost"]))
        with pytest.raises(PayloadTooLarge) as too_large:
            await acme.submit([job(str(n)) for n in range(MAX_POST_JOBS + 1)])
        assert "max_post_jobs" in too_large.value.message

        await db.execute("UPDATE batchd.tenants SET max_queued = 1 WHERE name = 'acme'")
        await acme.submit(job())
        with pytest.raises(TooManyRequests) as too_many:
            await acme.submit(job())
        assert too_many.value.status == 429
        assert too_many.value.retry_after == MAX_WAIT_S
        assert too_many.value.message  # the database's refusal, as the API gave it
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE tenant_id = 'acme'") == 1


async def test_a_producer_submits_through_asyncpg_a_pool_or_a_connection(
    db: Any, database_url: str, tokens: dict[str, str], held_url: str
) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        producer = PostgresProducer(pool, "acme")
        # Metadata as given; the deadline as a duration from now, as over HTTP (a day: it goes in a batch).
        first = await producer.submit(job(metadata={"user": 7}, deadline="1d", route="auto"))
        assert await producer.submit(job(), idempotency_key="order-9") == await producer.submit(
            job("other"), idempotency_key="order-9"
        )
        listed = await producer.submit(
            [job("x"), {"job_type": "classify", "input": {"text": "t", "categories": []}}]
        )
        async with pool.acquire() as connection:
            alone = await PostgresProducer(connection, "globex").submit(job())
        with pytest.raises(ValueError, match="unknown field"):
            await producer.submit(job(status="succeeded"))
    finally:
        await pool.close()
    async with Client(held_url, tokens["acme"]) as client:
        read = await client.get(first)
        assert (read["status"], read["route"], read["metadata"]) == ("queued", "auto", {"user": 7})
        assert [(await client.get(i))["job_type"] for i in listed] == [None, "classify"]
        with pytest.raises(NotFound):
            await client.get(alone)  # globex's
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 5
    assert await db.fetchval(
        "SELECT deadline > now() + interval '23 hours' FROM batchd.jobs WHERE id = $1", first
    )


async def test_wait_resolves_when_a_job_is_canceled_and_times_out_while_it_is_queued(
    db: Any, tokens: dict[str, str], held_url: str
) -> None:
    async with Client(held_url, tokens["acme"]) as client:
        job_id = await client.submit(job())
        with pytest.raises(TimeoutError):
            await client.wait(job_id, timeout=0.5)  # queued for an hour: nothing can end it meanwhile
        # Canceled at once, whether before the wait's stream is subscribed or after: either way it resolves.
        waiting = asyncio.create_task(client.wait(job_id, timeout=20))
        await client.cancel(job_id)
        assert (await waiting)["status"] == "canceled"
        # A job that ended before the wait began is read as it is.
        assert (await client.wait(job_id, timeout=20))["status"] == "canceled"
        assert await client.results([], timeout=1) == []


async def test_results_resolve_as_jobs_finish(db: Any, tokens: dict[str, str], flowing_url: str) -> None:
    async with Client(flowing_url, tokens["acme"]) as client:
        ids = await client.submit([job(f"job {n}") for n in range(4)])
        finished = await client.results(ids, timeout=60)
        assert [j["id"] for j in finished] == ids
        assert {j["status"] for j in finished} == {"succeeded"}
        assert all(j["result"] is not None for j in finished)  # read with its result, after it ended
        rows = await db.fetch("SELECT status FROM batchd.jobs WHERE id = ANY($1::uuid[])", ids)
        assert {row["status"] for row in rows} == {"succeeded"}
        one = await client.submit(job("one more"))
        assert (await client.wait(one, timeout=60))["status"] == "succeeded"


class CuttingProxy:
    """A TCP proxy in front of the daemon whose connections the test cuts, as a network would."""

    def __init__(self, target: str) -> None:
        self.retarget(target)
        self.writers: list[asyncio.StreamWriter] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def retarget(self, target: str) -> None:
        """Connections from now on go to `target` (another daemon)."""
        parts = urlsplit(target)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()  # no daemon there: the client sees its connection refused
            return
        self.writers += [writer, upstream_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await source.read(65536):
                    sink.write(chunk)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers = []

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def received_at_least(received: list[Event], count: int) -> Callable[[], Any]:
    async def condition() -> bool:
        return len(received) >= count

    return condition


async def test_events_survive_cut_connections_with_no_event_lost_or_repeated(
    db: Any, tokens: dict[str, str], flowing_url: str
) -> None:
    proxy = CuttingProxy(flowing_url)
    url = await proxy.start()
    received: list[Event] = []

    async def follow(client: Client) -> None:
        # From the tenant's first event: every event the log holds for it is expected, once, in order.
        async for event in client.events(last_event_id=0):
            received.append(event)  # noqa: PERF401 - seen by the test while the stream goes on

    try:
        async with Client(url, tokens["acme"]) as client:
            following = asyncio.create_task(follow(client))
            try:
                total = 0
                for round_ in range(4):
                    await insert_raw(db, "acme", [f"acme {round_}.{n}" for n in range(3)])
                    await insert_raw(db, "globex", [f"globex {round_}"])  # not acme's: never carried
                    total += 4
                    # Cut once some of this round's events have come, while the rest are still to come.
                    await wait_until(received_at_least(received, len(received) + 1), timeout=30)
                    proxy.cut()
                await wait_for_jobs(db, done=total)
                expected = await logged(db, "acme")
                await wait_until(received_at_least(received, len(expected)), timeout=30)
            finally:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
    finally:
        await proxy.close()

    assert proxy.connections >= 5  # the first, and one after each cut
    assert [(e.id, e.type, e.data.get("job_id")) for e in received] == expected
    assert sum(1 for e in received if e.type == "job.succeeded") == 12


async def test_a_resume_from_an_id_never_sent_is_a_reset_then_live_events(
    db: Any, tokens: dict[str, str], flowing_url: str
) -> None:
    async with Client(flowing_url, tokens["acme"]) as client:
        stream = client.events(last_event_id=999, types=["job.succeeded"])
        reset = await anext(stream)
        assert reset.type == "reset"
        assert (reset.data["last_event_id"], reset.data["resume_from"]) == (999, reset.id)
        [job_id] = await insert_raw(db, "acme", ["after the reset"])
        succeeded = await anext(stream)
        assert (succeeded.type, succeeded.data["job_id"]) == ("job.succeeded", str(job_id))
        await stream.aclose()


@pytest.fixture
async def deployment(database_template: str) -> AsyncIterator[Deployment]:
    """A database with the roles, row-level security and a producer role per tenant (test_roles.py)."""
    async with _deployment(database_template) as made:
        await made.roles()
        await made.psql("rls.sql", daemon=made.daemon)
        for tenant in ("acme", "globex"):
            await made.tenant(tenant)
        yield made


async def test_a_tenants_producer_role_submits_its_own_jobs_and_is_refused_anothers(
    deployment: Deployment,
) -> None:
    """The producer as the untrusted role it runs as: its tenant's jobs go in (a held key answers its
    holder, read back under row-level security); a job for another tenant is the database's refusal."""
    acme = await deployment.connect(deployment.tenant_role("acme"))
    superuser = await deployment.connect()
    try:
        producer = PostgresProducer(acme, "acme")
        first = await producer.submit(job(metadata={"user": 7}), idempotency_key="order-1")
        assert await producer.submit(job("again"), idempotency_key="order-1") == first
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await producer.submit([job("mine"), job("theirs", tenant_id="globex")])
        rows = await superuser.fetch("SELECT id::text, tenant_id, status FROM batchd.jobs")
        assert [tuple(row) for row in rows] == [(first, "acme", "queued")]  # all or none: "mine" is not in
    finally:
        await acme.close()
        await superuser.close()


def test_reconnection_waits_what_the_server_advises_doubled_per_failure_capped_and_jittered() -> None:
    client = Client("http://127.0.0.1:1", "token", max_retry_s=4.0)
    for _ in range(200):
        assert 1.0 <= client._delay(2.0, 1) <= 2.0  # the server's retry:, jittered down to half of it
        assert 2.0 <= client._delay(2.0, 2) <= 4.0
        assert 2.0 <= client._delay(2.0, 9) <= 4.0  # capped at max_retry_s
        assert client._delay(0.0, 1) == 0.0  # retry: 0 is honoured once
        assert 0.1 <= client._delay(0.0, 3) <= 0.4  # then a floor, doubled: no loop hammering the server
    assert len({client._delay(2.0, 1) for _ in range(20)}) > 1  # clients cut off together spread out


async def test_events_go_on_from_another_daemon_after_the_first_one_stops(
    db: Any, tokens: dict[str, str], serve: Any
) -> None:
    """The server stopping ends the stream with `disconnect` (not handed out); the client retries while no
    daemon answers and resumes from its last id on the next one, which missed nothing meanwhile."""
    received: list[Event] = []

    async def follow(client: Client) -> None:
        async for event in client.events(last_event_id=0):
            received.append(event)  # noqa: PERF401 - seen by the test while the stream goes on

    async with AsyncExitStack() as stack:
        async with serve(retry_ms=50) as (_, first_url):
            proxy = CuttingProxy(first_url)
            stack.push_async_callback(proxy.close)
            url = await proxy.start()
            client = await stack.enter_async_context(Client(url, tokens["acme"], max_retry_s=0.5))
            following = asyncio.create_task(follow(client))
            stack.push_async_callback(stop, following)
            await insert_raw(db, "acme", ["first"])
            await wait_for_jobs(db, done=1)
            served_by_first = await logged(db, "acme")
            await wait_until(received_at_least(received, len(served_by_first)), timeout=30)
        # While no daemon runs, the job waits; its events come from the second daemon.
        await insert_raw(db, "acme", ["between"])
        async with serve(retry_ms=50) as (_, second_url):
            proxy.retarget(second_url)
            await insert_raw(db, "acme", ["second"])
            await wait_for_jobs(db, done=3)
            expected = await logged(db, "acme")
            await wait_until(received_at_least(received, len(expected)), timeout=30)
        assert len(expected) > len(served_by_first) > 0
        assert [(e.id, e.type, e.data.get("job_id")) for e in received] == expected
        assert proxy.connections >= 2
