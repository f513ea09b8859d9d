"""A batch's life when the world is unkind: a create a gateway answered 502 and passed on later, a daemon
that lost its lease and wakes up to write, a batch the provider deleted after it ended, and a step that
keeps failing. Nothing is sent twice, nothing is written over, no job is stranded, no step hammers the API.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import anthropic
import asyncpg
import pytest
from aiohttp import web
from support import QUICK, EmulatorHandle, insert_raw, job_counts, make_settings, wait_until

from batchd import store
from batchd.backoff import JITTER, backoff_s
from batchd.context import Context
from batchd.emulator import EmulatorConfig
from batchd.poller import poll_until_ended
from batchd.provider import Provider
from batchd.ratelimit import RateLimiter
from batchd.results import apply_results
from batchd.submitter import reconcile, record_submitted
from batchd.templates import create_body, new_tag


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


# -- a delaying proxy between the SDK and the emulator -------------------------------------------------------

CREATE_PATH = "/v1/messages/batches"
# Not passed through: the hop's own framing (the proxy reads bodies whole and lets aiohttp frame them). The
# Host header is: the emulator writes results_url from it, and the SDK must fetch results through the proxy.
HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "content-encoding"})


class DelayingProxy:
    """An HTTP proxy in front of the emulator, as a gateway would be. The first `delay_creates` creates are
    answered 502 at once and passed on to the emulator `delay_s` later (the gateway gave up; the API went
    on). Everything else goes through as it is. Notes when each call arrived."""

    def __init__(self, upstream: str, *, delay_creates: int = 0, delay_s: float = 0.0) -> None:
        self.upstream = upstream
        self.delay_creates = delay_creates
        self.delay_s = delay_s
        self.arrivals: list[tuple[float, str, str]] = []  # (time.monotonic(), method, path)
        self.late: list[asyncio.Task[int]] = []
        self.url = ""
        self._session: aiohttp.ClientSession | None = None

    def times(self, method: str, suffix: str) -> list[float]:
        return [at for at, m, path in self.arrivals if m == method and path.endswith(suffix)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.arrivals.append((time.monotonic(), request.method, request.path))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        if request.method == "POST" and request.path == CREATE_PATH and self.delay_creates > 0:
            self.delay_creates -= 1
            self.late.append(asyncio.create_task(self._forward_late(request.path_qs, headers, body)))
            return web.json_response(
                {
                    "type": "error",
                    "error": {"type": "api_error", "message": "Bad gateway (the proxy gave up)"},
                },
                status=502,
            )
        status, response_headers, content = await self._forward(
            request.method, request.path_qs, headers, body
        )
        return web.Response(status=status, headers=response_headers, body=content)

    async def _forward(
        self, method: str, path_qs: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        assert self._session is not None
        async with self._session.request(
            method, self.upstream + path_qs, headers=headers, data=body or None
        ) as response:
            content = await response.read()
            kept = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
            return response.status, kept, content

    async def _forward_late(self, path_qs: str, headers: dict[str, str], body: bytes) -> int:
        await asyncio.sleep(self.delay_s)
        status, _, _ = await self._forward("POST", path_qs, headers, body)
        return status

    @asynccontextmanager
    async def running(self) -> AsyncIterator[DelayingProxy]:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        async with aiohttp.ClientSession(auto_decompress=True) as session:
            self._session = session
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            try:
                yield self
            finally:
                for task in self.late:
                    task.cancel()
                await asyncio.gather(*self.late, return_exceptions=True)
                await runner.cleanup()


# -- helpers ------------------------------------------------------------------------------------------------


async def sends_per_job(emulator: EmulatorHandle) -> Counter[str]:
    """How many times the provider received each job (custom_ids are `bd-<batch tag>-<job uuid hex>`)."""
    received = (await emulator.admin("GET", "custom_ids"))["custom_ids"]
    per_job: Counter[str] = Counter()
    for cid, times in received.items():
        per_job[cid.rsplit("-", 1)[1]] += times
    return per_job


async def all_done(db: Any, jobs: int) -> bool:
    counts = await job_counts(db)
    finished = sum(counts.get(status, 0) for status in ("succeeded", "failed", "canceled"))
    open_batches = await db.fetchval(
        "SELECT count(*) FROM batchd.batches WHERE status IN ('pending', 'in_progress', 'ended')"
    )
    return finished == jobs and open_batches == 0


# -- 3. a create is never sent twice because a gateway gave up ----------------------------------------------


async def test_a_create_a_gateway_answered_502_and_passed_on_later_is_adopted_not_sent_again(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    # The gateway answers 502 at once and hands the create to the API 2 s later. The create's window is
    # timeout_s + clock_skew_s = 6 s: until then "nothing in the list" proves nothing, and batchd must look
    # again instead of sending a second batch (which the provider would bill too).
    async with DelayingProxy(emulator.url, delay_creates=1, delay_s=2.0).running() as proxy:
        settings = daemon_settings(
            anthropic={"base_url": proxy.url, "timeout_s": 5}, daemon={"clock_skew_s": 1}
        )
        async with start_daemon(settings):
            ids = await insert_raw(db, "acme", [f"question {i}" for i in range(20)])
            await wait_until(lambda: all_done(db, 20), timeout=60)
        late = await asyncio.wait_for(asyncio.gather(*proxy.late), timeout=30)
        assert late == [200], "the 502'd create did reach the API, late"
        lists = len(proxy.times("GET", CREATE_PATH))
    assert await job_counts(db) == {"succeeded": 20}
    stats = await emulator.stats()
    assert stats["batches_created"] == 1, "one provider batch: the late one, adopted"
    assert stats["duplicate_custom_ids"] == {}
    assert await sends_per_job(emulator) == {uuid.UUID(str(i)).hex: 1 for i in ids}
    batch = await db.fetchrow("SELECT * FROM batchd.batches")
    assert batch["create_attempts"] == 1, "never sent again"
    assert batch["status"] == "applied"
    submitted = await db.fetch("SELECT data FROM batchd.events WHERE type = 'batch.submitted'")
    assert [row["data"]["adopted"] for row in submitted] == [True]
    assert lists >= 2, "it listed, found nothing yet, and listed again while the window was open"
    # Each job's results applied once: one success each, one ledger row each.
    assert await db.fetchval("SELECT count(*) FROM batchd.events WHERE type = 'job.succeeded'") == 20
    assert await db.fetchval("SELECT count(*) FROM batchd.costs") == 20


# -- 3. a daemon whose lease was taken over cannot write over its successor's work ---------------------------

OLD = "batchd-old000000000"
NEW = "batchd-new000000000"


@asynccontextmanager
async def stale_daemon(database_url: str, emulator: EmulatorHandle) -> AsyncIterator[Context]:
    """The context of a daemon that held a batch's lease and lost it while it was away."""
    # delete_after_apply: the stale daemon must not delete the provider's copy either.
    settings = make_settings(database_url, emulator.url, results={"delete_after_apply": True})
    pool = await store.create_pool(database_url, max_size=3)
    provider = Provider("test-key", base_url=emulator.url, limiter=RateLimiter(6000), timeout_s=10)
    try:
        yield Context(pool=pool, settings=settings, provider=provider, instance_id=OLD)
    finally:
        await provider.close()
        await pool.close()


async def pending_batch(db: Any, ctx: Context, jobs: int) -> tuple[uuid.UUID, list[Any], bytes]:
    """A batch as the flusher records it, held by OLD; its jobs `submitting`; the body it sends."""
    ids = await insert_raw(db, "acme", [f"stale question {i}" for i in range(jobs)])
    tag = new_tag()
    batch_id = await db.fetchval(store.sql("insert_batch"), tag, jobs, 1000, OLD, 30.0)
    await db.execute(store.sql("assign_raw_jobs"), batch_id, ids, ["test"] * jobs)
    rows = await db.fetch(store.sql("batch_payload"), batch_id)
    body = create_body(tag, ((row["id"], row["params"]) for row in rows))
    return batch_id, ids, body


async def take_over(db: Any, batch_id: uuid.UUID, **columns: Any) -> None:
    """Another daemon takes the batch (the old one's lease ran out while it stalled) and moves it on."""
    await db.execute(
        "UPDATE batchd.batches SET owner = $2, lease_until = now() + interval '30 s' WHERE id = $1",
        batch_id,
        NEW,
    )
    for name, value in columns.items():  # the column names are this module's own
        await db.execute(f"UPDATE batchd.batches SET {name} = $2 WHERE id = $1", batch_id, value)  # noqa: S608


async def snapshot(db: Any, batch_id: uuid.UUID) -> tuple[dict[str, Any], list[tuple[Any, ...]], int]:
    batch = dict(await db.fetchrow("SELECT * FROM batchd.batches WHERE id = $1", batch_id))
    jobs = [
        tuple(row)
        for row in await db.fetch(
            "SELECT id, status, batch_id, attempts, result FROM batchd.jobs ORDER BY id"
        )
    ]
    events = await db.fetchval("SELECT count(*) FROM batchd.events")
    return batch, jobs, events


@pytest.mark.parametrize("step", ["record_submitted", "reconcile", "poll", "poll_vanished", "apply_results"])
async def test_a_daemon_that_lost_its_lease_changes_nothing_at_any_step(
    db: Any, emulator: EmulatorHandle, database_url: str, step: str
) -> None:
    async with stale_daemon(database_url, emulator) as ctx:
        batch_id, _, body = await pending_batch(db, ctx, 5)
        # The old owner sent the create, then stalled (a pause, a partition) past its lease; another daemon
        # took the batch over and moved it on. Now the old one wakes up, mid-step, and writes.
        created = await ctx.provider.create_batch(body)
        if step == "record_submitted":
            # The create's answer comes back after the takeover.
            await take_over(db, batch_id)
        elif step == "reconcile":
            # Its window long past and nothing of it listed: "never made", which would clear the attempt
            # and have it sent again behind the new owner's back.
            await take_over(db, batch_id, create_attempted_at=datetime.now(UTC) - timedelta(hours=1))
        else:
            await take_over(db, batch_id, status="in_progress", provider_batch_id=created.id)
            await db.execute("UPDATE batchd.jobs SET status = 'submitted' WHERE batch_id = $1", batch_id)

            async def ended_at_provider() -> bool:
                return (await ctx.provider.retrieve(created.id)).processing_status == "ended"

            await wait_until(ended_at_provider, timeout=20)
            if step == "poll_vanished":
                await ctx.provider.delete(created.id)  # the old one's next poll gets a 404
            if step == "apply_results":
                await take_over(db, batch_id, status="ended")  # the new owner recorded the end
        batch = await store.get_batch(ctx.pool, batch_id)
        assert batch is not None
        before = await snapshot(db, batch_id)
        deletes = (await emulator.stats())["calls"].get("delete", 0)
        if step == "record_submitted":
            await record_submitted(ctx, batch, created, adopted=False)
        elif step == "reconcile":
            await reconcile(ctx, batch)
        elif step in ("poll", "poll_vanished"):
            assert await asyncio.wait_for(poll_until_ended(ctx, batch), timeout=20) is True
        else:
            await apply_results(ctx, batch)
        assert await snapshot(db, batch_id) == before, f"{step} changed the new owner's batch or its jobs"
        after = (await emulator.stats())["calls"].get("delete", 0)
        assert after == deletes, "nor deleted the provider's copy, which the new owner may still be reading"


async def test_a_created_batch_whose_jobs_were_not_recorded_is_recorded_by_the_next_owner(
    db: Any, emulator: EmulatorHandle, database_url: str, daemon_settings: Any, start_daemon: Any
) -> None:
    # The create was answered and its provider id committed; the daemon died before its jobs were recorded
    # `submitted` (seconds, for a big batch). The next owner records them at once: no reconciliation, which
    # would list the provider's batches and adopt this one only once it had ended.
    async with stale_daemon(database_url, emulator) as ctx:
        batch_id, ids, body = await pending_batch(db, ctx, 5)
        assert await db.fetchval(store.sql("begin_create"), batch_id, OLD, 3600.0) is not None
        created = await ctx.provider.create_batch(body)
        await db.execute(store.sql("batch_created"), batch_id, created.id, OLD)
    await db.execute("UPDATE batchd.batches SET lease_until = now() - interval '1 s' WHERE id = $1", batch_id)
    async with start_daemon(daemon_settings()):

        async def recorded() -> bool:
            # in_progress, or already past it: the emulator may end a batch of five at once.
            status = await db.fetchval("SELECT status FROM batchd.batches WHERE id = $1", batch_id)
            return status in ("in_progress", "ended", "applied")

        await wait_until(recorded, timeout=60)
    submitted = await db.fetch("SELECT job_id FROM batchd.events WHERE type = 'job.submitted'")
    assert sorted(row["job_id"] for row in submitted) == sorted(ids)
    counts = await job_counts(db)
    assert sum(counts.values()) == 5, counts
    assert set(counts) <= {"submitted", "succeeded"}, counts
    stats = await emulator.stats()
    # One list: the API key's check at start; a reconciliation would have listed again.
    assert (stats["batches_created"], stats["calls"].get("list", 0)) == (1, 1)


async def test_a_chunk_that_fails_stops_the_apply_and_the_next_applies_every_job_once(
    db: Any, emulator: EmulatorHandle, database_url: str
) -> None:
    """Chunks are applied two at a time beside the reading: one that fails (a fault of the server, not of a
    row) stops the whole apply with that error, as the batch's step expects it, and leaves no chunk half
    applied; the next try applies the rest, every job once."""
    settings = make_settings(database_url, emulator.url, results={"apply_chunk": 3})
    pool = await store.create_pool(database_url, max_size=4)
    provider = Provider("test-key", base_url=emulator.url, limiter=RateLimiter(6000), timeout_s=10)
    ctx = Context(pool=pool, settings=settings, provider=provider, instance_id=OLD)
    try:
        batch_id, ids, body = await pending_batch(db, ctx, 20)
        created = await provider.create_batch(body)
        await db.execute(
            "UPDATE batchd.batches SET status = 'ended', provider_batch_id = $2 WHERE id = $1",
            batch_id,
            created.id,
        )
        await db.execute("UPDATE batchd.jobs SET status = 'submitted' WHERE batch_id = $1", batch_id)

        async def ended_at_provider() -> bool:
            return (await provider.retrieve(created.id)).processing_status == "ended"

        await wait_until(ended_at_provider, timeout=20)
        # The job ids in the results file's order (custom ids are bd-<tag>-<job id>), in chunks as applied.
        async with provider.results(created.id) as lines:
            order = [str(uuid.UUID(json.loads(line)["custom_id"].split("-", 2)[2])) async for line in lines]
        chunks = [order[i : i + 3] for i in range(0, len(order), 3)]
        victim = order[10]  # in the fourth chunk: the first ones may be applied by then, or cancelled
        await db.execute(
            "CREATE FUNCTION batchd.test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RAISE EXCEPTION 'a deadlock, say' USING ERRCODE = '40P01'; END $$;"
            "CREATE TRIGGER test_refuse BEFORE UPDATE ON batchd.jobs FOR EACH ROW"
            f" WHEN (OLD.id = '{victim}') EXECUTE FUNCTION batchd.test_refuse()"
        )
        try:
            batch = await store.get_batch(pool, batch_id)
            assert batch is not None
            with pytest.raises(asyncpg.DeadlockDetectedError):
                await apply_results(ctx, batch)
            status = {
                str(row["id"]): row["status"]
                for row in await db.fetch("SELECT id, status FROM batchd.jobs WHERE batch_id = $1", batch_id)
            }
            assert status[victim] == "submitted"
            for chunk in chunks:
                assert len({status[job] for job in chunk}) == 1, f"a chunk half applied: {status}"
        finally:
            await db.execute("DROP TRIGGER test_refuse ON batchd.jobs; DROP FUNCTION batchd.test_refuse()")
        await apply_results(ctx, batch)
        assert await job_counts(db) == {"succeeded": 20}
        assert await db.fetchval("SELECT status FROM batchd.batches WHERE id = $1", batch_id) == "applied"
        succeeded = await db.fetch("SELECT job_id FROM batchd.events WHERE type = 'job.succeeded'")
        assert sorted(str(row["job_id"]) for row in succeeded) == sorted(str(i) for i in ids)
    finally:
        await provider.close()
        await pool.close()


# -- 4. a batch the provider deleted never strands its jobs -------------------------------------------------


@pytest.mark.parametrize("loss", ["deleted", "results_404"])
async def test_a_batch_gone_at_the_provider_after_it_ended_is_retried_in_another_batch(  # noqa: PLR0917 - fixtures
    db: Any,
    emulator: EmulatorHandle,
    daemon_settings: Any,
    start_daemon: Any,
    anthropic_client: anthropic.AsyncAnthropic,
    loss: str,
) -> None:
    await emulator.admin("PATCH", "settings", {"processing_time_s": [3600, 3600]})
    settings = daemon_settings(batching={"max_requests": 20, "max_wait_s": 0.2})
    async with start_daemon(settings):
        ids = await insert_raw(db, "acme", [f"question {i}" for i in range(20)])

        async def submitted() -> bool:
            return await job_counts(db) == {"submitted": 20}

        await wait_until(submitted, timeout=30)
        first = await db.fetchrow("SELECT id, provider_batch_id FROM batchd.batches")
        if loss == "deleted":
            # Its results cannot be read for now: the batch ends and batchd is stuck before applying.
            await emulator.set_faults(http=[{"endpoint": "results", "status": 500}])
        else:
            # The provider has no results for it any more (deleted, expired) though it still lists it.
            await emulator.set_faults(http=[{"endpoint": "results", "status": 404, "count": 1}])
        await emulator.admin("PATCH", "settings", {"processing_time_s": [0.1, 0.3]})
        await emulator.advance(3601)
        if loss == "deleted":

            async def ended_and_failing() -> bool:
                status = await db.fetchval("SELECT status FROM batchd.batches WHERE id = $1", first["id"])
                results_calls: int = (await emulator.stats())["calls"].get("results", 0)
                return status == "ended" and results_calls >= 1

            await wait_until(ended_and_failing, timeout=30)
            # Someone deletes it at the provider, behind batchd's back: it can never be read now.
            await anthropic_client.messages.batches.delete(first["provider_batch_id"])
            await emulator.set_faults()
        await wait_until(lambda: all_done(db, 20), timeout=60)

    assert await job_counts(db) == {"succeeded": 20}
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE attempts = 1") == 20, "one retry each"
    gone = await db.fetchrow("SELECT * FROM batchd.batches WHERE id = $1", first["id"])
    assert gone["status"] == "applied", "ended: nothing more to do for it"
    assert gone["request_counts"]["vanished"] is True
    assert "vanished" in gone["last_error"]
    assert await db.fetchval("SELECT count(*) FROM batchd.batches") == 2, "the jobs went in another batch"
    ended = await db.fetch("SELECT batch_id, data FROM batchd.events WHERE type = 'batch.ended'")
    assert len(ended) == 2, "each batch ended once"
    by_batch = {row["batch_id"]: row["data"] for row in ended}
    assert by_batch[first["id"]]["vanished"] is True
    assert all("vanished" not in data for batch, data in by_batch.items() if batch != first["id"])
    per_job: dict[Any, Counter[str]] = {}
    for row in await db.fetch("SELECT job_id, type FROM batchd.events WHERE job_id IS NOT NULL"):
        per_job.setdefault(row["job_id"], Counter())[row["type"]] += 1
    assert per_job == {
        job_id: Counter({"job.submitted": 2, "job.retrying": 1, "job.succeeded": 1}) for job_id in ids
    }
    stats = await emulator.stats()
    assert stats["duplicate_custom_ids"] == {}, "the retry went under a new batch tag"
    assert await sends_per_job(emulator) == {uuid.UUID(str(i)).hex: 2 for i in ids}


async def test_a_batch_gone_at_the_provider_fails_its_jobs_at_max_attempts(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    await emulator.set_faults(http=[{"endpoint": "results", "status": 404, "count": 1}])
    settings = daemon_settings(batching={"max_requests": 20, "max_wait_s": 0.2, "max_attempts": 1})
    async with start_daemon(settings):
        await insert_raw(db, "acme", [f"question {i}" for i in range(10)])
        await wait_until(lambda: all_done(db, 10), timeout=60)
    assert await job_counts(db) == {"failed": 10}, "like any retry: failed once attempts reach max_attempts"
    rows = await db.fetch("SELECT attempts, error FROM batchd.jobs")
    assert {(row["attempts"], row["error"]["type"]) for row in rows} == {(1, "missing")}
    assert await db.fetchval("SELECT count(*) FROM batchd.events WHERE type = 'job.failed'") == 10
    assert (await emulator.stats())["batches_created"] == 1


# -- 4. a step that keeps failing backs off -----------------------------------------------------------------


def test_the_backoff_doubles_from_low_to_high_with_jitter_below() -> None:
    for draw in (0.0, 0.5, 0.999999):  # the jitter's extremes, and between

        class Fixed(random.Random):
            def random(self, draw: float = draw) -> float:
                return draw

        waits = [backoff_s(n, 1.0, 300.0, Fixed()) for n in range(1, 16)]
        for n, wait in enumerate(waits, start=1):
            ceiling = min(300.0, 2.0 ** (n - 1))
            assert ceiling * (1 - JITTER) <= wait <= ceiling, (n, wait)
        assert waits[-1] <= 300.0, "capped"
    # Whatever the draws, each wait below the cap is longer than the one before.
    rng = random.Random(7)
    for _ in range(200):
        waits = [backoff_s(n, 0.5, 1000.0, rng) for n in range(1, 11)]
        assert all(later > earlier for earlier, later in itertools.pairwise(waits))
    assert backoff_s(0, 1.0, 300.0) <= 1.0, "0 failures counts as the first"
    assert backoff_s(10_000, 1.0, 300.0) <= 300.0, "no overflow however long it fails"


async def test_a_step_that_keeps_failing_is_tried_less_and_less_often(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    # Every results download fails: the batch's step (apply results) fails again and again. The calls it
    # makes come further and further apart: the n-th wait is at least 3/4 of retry_min_s * 2^(n-1). Only
    # lower bounds are asserted (a loaded machine makes gaps longer, never shorter). A fixed 2 s retry
    # fails the fifth gap's bound (3 s).
    low = 0.25
    await emulator.set_faults(http=[{"endpoint": "results", "status": 500}])
    async with DelayingProxy(emulator.url).running() as proxy:
        settings = daemon_settings(
            anthropic={"base_url": proxy.url}, daemon={"retry_min_s": low, "retry_max_s": 4}
        )
        async with start_daemon(settings):
            await insert_raw(db, "acme", [f"question {i}" for i in range(10)])

            async def six_tries() -> bool:
                return len(proxy.times("GET", "/results")) >= 6

            await wait_until(six_tries, timeout=60)
            tries = proxy.times("GET", "/results")
            gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
            for n, gap in enumerate(gaps[:5], start=1):
                assert gap >= low * 2 ** (n - 1) * (1 - JITTER), f"gap {n}: {gap:.3f} s ({gaps})"
            # Success resets it: the API answers again, and the batch is applied.
            await emulator.set_faults()
            await wait_until(lambda: all_done(db, 10), timeout=60)
    assert await job_counts(db) == {"succeeded": 10}
    assert (await emulator.stats())["statuses"].get("results 500", 0) >= 6
