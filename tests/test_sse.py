"""`GET /v1/events`: tenant-scoped, resumable with no gap and no duplicate, and a well-behaved SSE server.

Every test runs the real daemon (with its HTTP server) against the emulator and a real database; what a
stream must carry is read back from the event log and compared event for event.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from sse_support import Collector, carried, logged, sse_stream
from support import QUICK, EmulatorHandle, insert_raw, wait_for_jobs

from batchd import tenants
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig

ADMIN_TOKEN = "admin-" + "y" * 32


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


@pytest.fixture
async def tokens(db: Any) -> dict[str, str]:
    await db.execute("TRUNCATE batchd.tokens, batchd.tenants")
    return {name: await tenants.add_tenant(db, name) for name in ("acme", "globex")}


@pytest.fixture
def serve(
    emulator: EmulatorHandle, daemon_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Any]:
    """`async with serve(**events_settings) as (daemon, url):` runs a daemon with its HTTP server."""
    monkeypatch.setenv("BATCHD_ADMIN_TOKEN", ADMIN_TOKEN)

    @asynccontextmanager
    async def run(**events: Any) -> AsyncIterator[tuple[Daemon, str]]:
        daemon = Daemon(daemon_settings(events={"poll_interval_s": 1.0, **events}))
        async with daemon.running():
            assert daemon.http_url is not None
            yield daemon, daemon.http_url

    return run


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        yield http


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


async def test_filters_by_job_batch_and_type(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    async with serve() as (_, url):
        first, second = await insert_raw(db, "acme", ["one", "two"])
        await wait_for_jobs(db, done=2)
        full = await logged(db, "acme")
        batch_id = await db.fetchval("SELECT batch_id FROM batchd.jobs WHERE id = $1", first)
        batch_seqs = {
            row["seq"]
            for row in await db.fetch("SELECT seq FROM batchd.events WHERE batch_id = $1", batch_id)
        }
        expected = {
            "job_id": [e for e in full if e[2] == str(first)],
            "batch_id": [e for e in full if e[0] in batch_seqs],
            "types": [e for e in full if e[1] in ("job.succeeded", "batch.ended")],
        }
        filters = {"job_id": str(first), "batch_id": str(batch_id), "types": "job.succeeded,batch.ended"}
        for name, value in filters.items():
            async with sse_stream(session, url, tokens["acme"], last_event_id=0, **{name: value}) as stream:
                await stream.until(lambda c, name=name: c.last_id == expected[name][-1][0])  # type: ignore[misc]
            assert carried(stream) == expected[name], name

    assert [e[1] for e in expected["job_id"]] == ["job.submitted", "job.succeeded"]
    assert str(second) not in {e[2] for e in expected["job_id"]}
    assert {e[1] for e in expected["batch_id"]} >= {"batch.submitted", "batch.ended"}


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
                    await stream.until(lambda c, n=wanted: len(c.ids) >= n or producing.done(), timeout=30)
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
