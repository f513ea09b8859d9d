"""`GET /v1/events`: tenant-scoped, resumable with no gap and no duplicate, and a well-behaved SSE server.

Every test runs the real daemon (with its HTTP server) against the emulator and a real database; what a
stream must carry is read back from the event log and compared event for event.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sse_support import Collector, carried, ends_at, logged, reached, sse_stream
from support import ADMIN_TOKEN, QUICK, EmulatorHandle, insert_raw, wait_for_jobs, wait_until

from batchd import tenants
from batchd.emulator import EmulatorConfig
from batchd.pruner import prune_events


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


def job_ids_done(collector: Collector, job_ids: set[str]) -> bool:
    finished = {
        data.get("job_id") for data in collector.data() if data["type"] in ("job.succeeded", "job.failed")
    }
    return job_ids <= finished


async def test_each_tenant_sees_only_its_own_events_and_the_admin_sees_all(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    async with (
        serve() as (_, url),
        sse_stream(session, url, tokens["acme"]) as acme,
        sse_stream(session, url, tokens["globex"]) as globex,
        sse_stream(session, url, ADMIN_TOKEN) as admin,
    ):
        acme_jobs = {str(i) for i in await insert_raw(db, "acme", [f"acme {n}" for n in range(5)])}
        globex_jobs = {str(i) for i in await insert_raw(db, "globex", [f"globex {n}" for n in range(3)])}
        await wait_for_jobs(db, done=8)
        acme_log, globex_log, all_log = await logged(db, "acme"), await logged(db, "globex"), await logged(db)
        await acme.until(lambda c: c.last_id == acme_log[-1][0])
        await globex.until(lambda c: c.last_id == globex_log[-1][0])
        await admin.until(lambda c: c.last_id == all_log[-1][0])

    assert carried(acme) == acme_log
    assert carried(globex) == globex_log
    assert carried(admin) == all_log
    assert {d["tenant"] for d in acme.data()} == {"acme"}
    assert {d["tenant"] for d in globex.data()} == {"globex"}
    assert {d["tenant"] for d in admin.data()} == {"acme", "globex"}
    assert job_ids_done(acme, acme_jobs)
    assert not job_ids_done(acme, globex_jobs)
    types = {event.event for event in admin.events}
    assert types == {"job.submitted", "job.succeeded", "batch.submitted", "batch.ended"}
    succeeded = [d for d in acme.data() if d["type"] == "job.succeeded"]
    for data in succeeded:
        # What a client needs without another request: the job, tenant, status, batch and usage.
        assert data["status"] == "succeeded"
        assert uuid.UUID(data["batch_id"])
        assert data["usage"]["output_tokens"] > 0
    batch_events = [d for d in acme.data() if d["type"] == "batch.submitted"]
    assert sum(d["requests"] for d in batch_events) == 5, "a tenant hears of its own share of each batch"


FILTERED_TYPES = ("job.succeeded", "batch.ended")


def filter_params(job_id: Any, batch_id: Any) -> dict[str, str]:
    """A stream's query for each filter: one job, one batch, two event types."""
    return {"job_id": str(job_id), "batch_id": str(batch_id), "types": ",".join(FILTERED_TYPES)}


async def expected_per_filter(db: Any, full: list[Any], job_id: Any, batch_id: Any) -> dict[str, list[Any]]:
    """What each filter of filter_params must carry of `full`, the tenant's whole log."""
    batch_seqs = {
        row["tenant_seq"]
        for row in await db.fetch(
            "SELECT tenant_seq FROM batchd.events WHERE batch_id = $1 AND tenant_id = 'acme'", batch_id
        )
    }
    return {
        "job_id": [e for e in full if e[2] == str(job_id)],
        "batch_id": [e for e in full if e[0] in batch_seqs],
        "types": [e for e in full if e[1] in FILTERED_TYPES],
    }


async def test_filters_by_job_batch_and_type(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    async with serve() as (_, url):
        first, second = await insert_raw(db, "acme", ["one", "two"])
        await wait_for_jobs(db, done=2)
        full = await logged(db, "acme")
        batch_id = await db.fetchval("SELECT batch_id FROM batchd.jobs WHERE id = $1", first)
        expected = await expected_per_filter(db, full, first, batch_id)
        filters = filter_params(first, batch_id)
        for name, value in filters.items():
            async with sse_stream(
                session, url, tokens["acme"], last_event_id=0, query={name: value}
            ) as stream:
                await stream.until(ends_at(expected[name][-1][0]))
            assert carried(stream) == expected[name], name

    assert [e[1] for e in expected["job_id"]] == ["job.submitted", "job.succeeded"]
    assert str(second) not in {e[2] for e in expected["job_id"]}
    assert {e[1] for e in expected["batch_id"]} >= {"batch.submitted", "batch.ended"}


async def test_live_streams_filtered_by_job_batch_and_type_carry_exactly_the_matching_events(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession, emulator: EmulatorHandle
) -> None:
    """The same filters on live events (Filter.matches in the hub), not replayed ones: the streams open
    while the batches exist only in the database (the API refuses every create), before any of their
    events is written."""
    await emulator.set_faults(http=[{"endpoint": "create", "status": 500}])
    async with serve() as (_, url):

        async def recorded(job: Any) -> Any:
            async def has_batch() -> bool:
                return bool(await db.fetchval("SELECT batch_id FROM batchd.jobs WHERE id = $1", job))

            await wait_until(has_batch)
            return await db.fetchval("SELECT batch_id FROM batchd.jobs WHERE id = $1", job)

        first, second = await insert_raw(db, "acme", ["one", "two"])
        (other_tenant,) = await insert_raw(db, "globex", ["three"])
        batch = await recorded(first)
        assert await recorded(second) == batch
        await recorded(other_tenant)
        (later,) = await insert_raw(db, "acme", ["four"])  # a batch of its own
        assert await recorded(later) != batch
        assert await db.fetchval("SELECT count(*) FROM batchd.events") == 0, "no event yet"
        assert (await emulator.stats())["batches_created"] == 0

        filters = filter_params(first, batch)
        async with AsyncExitStack() as streams:
            everything = await streams.enter_async_context(sse_stream(session, url, tokens["acme"]))
            filtered = {
                name: await streams.enter_async_context(
                    sse_stream(session, url, tokens["acme"], query={name: value})
                )
                for name, value in filters.items()
            }
            await emulator.set_faults()  # the API answers: every event from here on is live
            await wait_for_jobs(db, done=4)
            full = await logged(db, "acme")
            await everything.until(lambda c: c.last_id == full[-1][0])
            expected = await expected_per_filter(db, full, first, batch)
            for name, stream in filtered.items():
                await stream.until(reached(expected[name][-1][0]))
        # Closed only now, after the unfiltered stream had every event: nothing more was coming.
        assert carried(everything) == full
        for name, stream in filtered.items():
            assert carried(stream) == expected[name], name

    assert [e[1] for e in expected["job_id"]] == ["job.submitted", "job.succeeded"]
    assert {e[1] for e in expected["batch_id"]} == {
        "batch.submitted",
        "job.submitted",
        "job.succeeded",
        "batch.ended",
    }
    assert {e[2] for e in expected["batch_id"]} == {None, str(first), str(second)}, "not the later job's"
    assert sorted(e[1] for e in expected["types"]) == ["batch.ended"] * 2 + ["job.succeeded"] * 3


async def produce(db: Any, rounds: int, per_round: int) -> int:
    """A producer inserting a few jobs at a time for two tenants, while batches complete."""
    for n in range(rounds):
        await insert_raw(db, "acme", [f"acme {n}.{i}" for i in range(per_round)])
        await insert_raw(db, "globex", [f"globex {n}.{i}" for i in range(per_round // 2)])
        await asyncio.sleep(0.01)  # pacing, not synchronisation: the producer spreads over many batches
    return rounds * (per_round + per_round // 2)


@pytest.mark.slow
async def test_a_client_cut_mid_stream_resumes_with_every_event_once_while_jobs_flow(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    received: list[tuple[int, str, str | None]] = []
    last = 0
    connections = 0
    async with serve() as (_, url):
        producing = asyncio.create_task(produce(db, rounds=60, per_round=6))
        try:
            while not producing.done() or connections < 8:
                # Alternate the header (what EventSource sends) and the query parameter.
                async with sse_stream(
                    session, url, tokens["acme"], last_event_id=last, in_query=connections % 2 == 1
                ) as stream:
                    wanted = connections % 4 + 1  # sometimes cut after one event, sometimes a few

                    def enough(collector: Collector, wanted: int = wanted) -> bool:
                        return len(collector.ids) >= wanted or producing.done()

                    await stream.until(enough, timeout=30)
                received.extend(carried(stream))
                last = received[-1][0] if received else last
                connections += 1
            total = await producing
        finally:
            producing.cancel()
        await wait_for_jobs(db, done=total)
        expected = await logged(db, "acme")
        async with sse_stream(session, url, tokens["acme"], last_event_id=last) as stream:
            await stream.until(lambda c: (c.last_id or last) >= expected[-1][0])
        received.extend(carried(stream))

    assert connections >= 8
    duplicates = len(received) - len(set(received))
    assert duplicates == 0, f"{duplicates} events sent twice"
    assert [e[0] for e in received] == [e[0] for e in expected], "events missed or out of order"
    assert received == expected
    assert sum(1 for e in received if e[1] == "job.succeeded") == 360


@pytest.mark.slow
async def test_500_concurrent_clients_each_receive_every_event_of_theirs_once(
    db: Any, serve: Any, session: aiohttp.ClientSession
) -> None:
    await db.execute("TRUNCATE batchd.tokens, batchd.tenants")
    names = [f"tenant{n}" for n in range(5)]
    tokens = {name: await tenants.add_tenant(db, name) for name in names}
    async with serve() as (daemon, url), AsyncExitStack() as streams:
        clients = {
            name: [
                await streams.enter_async_context(sse_stream(session, url, tokens[name])) for _ in range(100)
            ]
            for name in names
        }
        assert daemon.hub is not None
        assert daemon.hub.subscribers == 500
        listening = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'batchd-listener'"
        )
        assert listening == 1, "one LISTEN connection feeds every stream"
        connections = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        )
        assert connections <= 1 + 1 + 5, "the test's, the listener's and the pool's: none per stream"
        for name in names:
            await insert_raw(db, name, [f"{name} job {n}" for n in range(20)])
        await wait_for_jobs(db, done=100)
        for name in names:
            expected = await logged(db, name)
            for client in clients[name]:
                await client.until(reached(expected[-1][0]))
                assert carried(client) == expected


async def add_published_events(db: Any, tenant: str, count: int, padding: int = 0) -> None:
    """Events as the daemon writes them, without running jobs: the stream's side is what is tested."""
    await db.execute(
        "INSERT INTO batchd.events (type, tenant_id, job_id, data)"
        " SELECT 'job.canceled', $1, gen_random_uuid(),"
        "        jsonb_build_object('status', 'canceled',"
        "                           'metadata', jsonb_build_object('pad', repeat('x', $3)))"
        "   FROM generate_series(1, $2)",
        tenant,
        count,
        padding,
    )
    await db.execute("NOTIFY batchd_events")


async def open_raw_stream(url: str, token: str, receive_buffer: int) -> tuple[Any, Any]:
    """A client with a tiny receive buffer that sends its request and then does not read."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)  # noqa: FBT003 - the socket API's own flag
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    # asyncio reads ahead into the reader's buffer until it holds twice `limit`: keep that small.
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(f"GET /v1/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


@pytest.mark.slow
async def test_a_client_that_reads_too_slowly_is_cut_off_and_memory_stays_bounded(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    buffer = 64 * 1024
    async with serve(client_buffer_bytes=buffer, send_timeout_s=1.0) as (daemon, url):
        hub = daemon.hub
        assert hub is not None
        reader, writer = await open_raw_stream(url, tokens["acme"], receive_buffer=4096)
        try:
            async with sse_stream(session, url, tokens["acme"]) as fast:
                await wait_until(holds(lambda: hub.subscribers == 2))
                rss_before = _rss_bytes()
                for _ in range(10):  # 40 MB of events: far more than any socket buffer holds
                    await add_published_events(db, "acme", 1000, padding=4000)
                expected = await logged(db, "acme")
                await fast.until(lambda c: c.last_id == expected[-1][0], timeout=60)
                await wait_until(holds(lambda: hub.cut_off == 1), timeout=30)
                rss_growth = _rss_bytes() - rss_before
            body = await asyncio.wait_for(reader.read(), timeout=30)  # the rest, up to the server's close
        finally:
            writer.close()
    assert carried(fast) == expected, "a fast client beside the slow one gets everything"
    head, _, stream = body.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    blocks = [b for b in _unchunk(stream).split(b"\n\n") if b.strip()]
    final = blocks[-1].decode()
    assert final.startswith("event: disconnect\ndata: ")
    assert json.loads(final.partition("data: ")[2])["reason"] == "slow_consumer"
    ids = [int(b.split(b"\n")[0].removeprefix(b"id: ")) for b in blocks if b.startswith(b"id: ")]
    assert ids == [e[0] for e in expected[: len(ids)]], "what it got before the cut is a prefix, in order"
    assert len(ids) < len(expected) / 2
    assert hub.peak_buffered_bytes <= buffer
    assert hub.fell_behind >= 1, "bursts larger than the buffer sent the fast client back to the table"
    assert rss_growth < 100 * 2**20, f"the server grew by {rss_growth / 2**20:.0f} MiB"


@pytest.mark.slow
async def test_with_on_full_buffer_cut_a_client_is_cut_off_once_its_buffer_is_full_and_resumes_after(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    buffer = 64 * 1024
    # A write stalled for ten minutes would cut it too: only the full buffer can, within this test.
    async with serve(client_buffer_bytes=buffer, send_timeout_s=600.0, on_full_buffer="cut") as (daemon, url):
        hub = daemon.hub
        assert hub is not None
        reader, writer = await open_raw_stream(url, tokens["acme"], receive_buffer=4096)
        try:
            await wait_until(holds(lambda: hub.subscribers == 1))
            for _ in range(5):  # 20 MB of events: more than the socket buffers and the stream's buffer hold
                await add_published_events(db, "acme", 1000, padding=4000)
            expected = await logged(db, "acme")
            await wait_until(holds(lambda: hub.cut_off == 1), timeout=30)
            # The rest, up to the response's last chunk (the connection itself may be kept alive).
            body = await asyncio.wait_for(_read_response_end(reader), timeout=30)
        finally:
            writer.close()
        blocks = [b for b in _unchunk(body.partition(b"\r\n\r\n")[2]).split(b"\n\n") if b.strip()]
        final = blocks[-1].decode()
        assert final.startswith("event: disconnect\ndata: ")
        assert json.loads(final.partition("data: ")[2])["reason"] == "slow_consumer"
        ids = [int(b.split(b"\n")[0].removeprefix(b"id: ")) for b in blocks if b.startswith(b"id: ")]
        assert ids == [e[0] for e in expected[: len(ids)]], "what it got before the cut is a prefix, in order"
        assert len(ids) < len(expected) / 2
        assert hub.peak_buffered_bytes <= buffer
        assert hub.fell_behind == 0, "cut, not sent back to the table"
        # Reconnecting with its last id, it gets every event it missed, once.
        async with sse_stream(session, url, tokens["acme"], last_event_id=ids[-1] if ids else 0) as again:
            await again.until(lambda c: c.last_id == expected[-1][0], timeout=60)
        assert carried(again) == expected[len(ids) :]


def holds(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return check()

    return condition


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _read_response_end(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while not body.endswith(b"\r\n0\r\n\r\n"):
        data = await reader.read(65536)
        if not data:
            break
        body += data
    return bytes(body)


def _unchunk(body: bytes) -> bytes:
    """Decodes HTTP/1.1 chunked transfer encoding (a truncated last chunk is kept as it is)."""
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


async def test_bad_tokens_wrong_tenants_bad_input_and_too_many_streams_are_refused(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    (globex_job,) = await insert_raw(db, "globex", ["theirs"])
    async with serve(max_streams_per_tenant=2) as (_, url):

        async def status(token: str | None, headers: dict[str, str] | None = None, **params: str) -> int:
            sent = {"Authorization": f"Bearer {token}"} if token else {}
            async with session.get(
                f"{url}/v1/events", headers={**sent, **(headers or {})}, params=params
            ) as r:
                return r.status

        assert await status(None) == 401
        assert await status("bdt_not-a-token") == 401
        assert await status(None, access_token="bdt_not-a-token") == 401
        assert await status(tokens["acme"], job_id=str(globex_job)) == 404, "another tenant's job"
        assert await status(tokens["acme"], job_id=str(uuid.uuid4())) == 404
        assert await status(tokens["acme"], job_id="42") == 400
        assert await status(tokens["acme"], types="job.exploded") == 400
        assert await status(tokens["acme"], headers={"Last-Event-ID": "-1"}) == 400
        assert await status(tokens["acme"], headers={"Last-Event-ID": "9" * 30}) == 400
        assert await status(tokens["acme"], last_event_id="abc") == 400
        await db.execute("UPDATE batchd.tokens SET revoked_at = now() WHERE tenant_id = 'globex'")
        assert await status(tokens["globex"]) == 401, "a revoked token"
        async with (
            sse_stream(session, url, tokens["acme"]),
            sse_stream(session, url, tokens["acme"]),
            sse_stream(session, url, ADMIN_TOKEN),
        ):
            assert await status(tokens["acme"]) == 429
            assert await status(None, access_token=tokens["acme"]) == 429
            async with sse_stream(session, url, ADMIN_TOKEN):
                pass  # the admin's streams count apart from any tenant's
        # Streams closed by their clients give their places back.
        async with sse_stream(session, url, tokens["acme"]), sse_stream(session, url, tokens["acme"]):
            pass


async def test_a_resume_from_before_the_retained_log_gets_reset_then_live_events(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    async with serve() as (daemon, url):
        await add_published_events(db, "acme", 30)
        await wait_until(holds(lambda: daemon.hub is not None and daemon.hub.head == 30))
        await db.execute("UPDATE batchd.events SET published_at = now() - interval '30 days' WHERE seq <= 20")
        assert await prune_events(db, retention_s=86_400, chunk=100) == 20
        # Event 25 is still there: resuming after it is served in full.
        async with sse_stream(session, url, tokens["acme"], last_event_id=25) as fine:
            await fine.until(lambda c: c.last_id == 30)
        assert fine.ids == [26, 27, 28, 29, 30]
        # Events 6..20 are gone: a client that last saw 5 is told so, given the head as its new id, and
        # then carries on live.
        async with sse_stream(session, url, tokens["acme"], last_event_id=5) as stale:
            await stale.until(lambda c: bool(c.events))
            reset = stale.events[0]
            assert reset.event == "reset"
            assert reset.id == "30"
            assert json.loads(reset.data)["last_event_id"] == 5
            await add_published_events(db, "acme", 1)
            await stale.until(lambda c: c.last_id == 31)
        assert [m.event for m in stale.events] == ["reset", "job.canceled"]
        async with sse_stream(session, url, tokens["acme"], last_event_id=10**12) as future:
            await future.until(lambda c: bool(c.events))
        assert future.events[0].event == "reset", "an id this database never sent"


async def test_headers_retry_advice_and_heartbeats(
    tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    async with (
        serve(heartbeat_s=0.2, retry_ms=1500) as (_, url),
        sse_stream(session, url, tokens["acme"]) as stream,
    ):
        headers = stream.response.headers
        assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert headers["Cache-Control"] == "no-cache"
        assert headers["X-Accel-Buffering"] == "no"
        assert "Content-Encoding" not in headers, "aiohttp asks for gzip by default; none is applied"
        await stream.until(lambda c: sum(1 for m in c.messages if m.comments == ["heartbeat"]) >= 2)
        assert stream.messages[0].retry == 1500


async def test_shutdown_closes_every_stream_with_a_final_event(
    tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    async with AsyncExitStack() as streams:
        async with serve() as (_, url):
            acme = await streams.enter_async_context(sse_stream(session, url, tokens["acme"]))
            admin = await streams.enter_async_context(sse_stream(session, url, ADMIN_TOKEN))
        # The daemon has stopped: each stream got its final event, then the end of the response.
        for stream in (acme, admin):
            await asyncio.wait_for(stream.ended.wait(), timeout=10)
            assert stream.messages[-1].event == "disconnect"
            assert json.loads(stream.messages[-1].data)["reason"] == "shutdown"


async def test_curl_as_the_docs_show_it(db: Any, tokens: dict[str, str], serve: Any) -> None:
    contract = (Path(__file__).parent.parent / "docs" / "sse.md").read_text()
    (command,) = [line for line in contract.splitlines() if line.startswith("curl -N ")]
    assert "$BATCHD_TOKEN" in command
    assert "http://127.0.0.1:8080/v1/events" in command
    async with serve() as (_, url):
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            command.replace("http://127.0.0.1:8080", url),
            env={**os.environ, "BATCHD_TOKEN": tokens["acme"]},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            assert await asyncio.wait_for(process.stdout.readline(), timeout=10) == b"retry: 2000\n"
            (job_id,) = await insert_raw(db, "acme", ["through curl"])
            lines: list[bytes] = []
            while b"event: job.succeeded\n" not in lines:
                lines.append(await asyncio.wait_for(process.stdout.readline(), timeout=20))
            data = await asyncio.wait_for(process.stdout.readline(), timeout=5)
        finally:
            process.kill()
            await process.wait()
    assert data.startswith(b"data: ")
    event = json.loads(data.removeprefix(b"data: "))
    assert event["job_id"] == str(job_id)
    assert event["usage"]["output_tokens"] > 0
