"""`GET /v1/overview` (the dashboard's snapshot), the session cookie, and how the page's files are served."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from http.cookies import Morsel, SimpleCookie
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog
from support import (
    ADMIN_TOKEN,
    QUICK,
    EmulatorHandle,
    add_workload,
    insert_aged,
    wait_for_jobs,
    wait_until,
)

from batchd import budgets
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig
from batchd.tenants import add_tenant

# A job finished as the daemon finishes one: its row, its ledger row and its tally in the statement that
# finishes it, and its event (not yet published).
FINISHED_JOB = """
WITH job AS (
    INSERT INTO batchd.jobs (tenant_id, request, status, completed_at, usage)
    VALUES ('acme', '{}', 'succeeded', now(), '{"input_tokens": 10, "output_tokens": 20}')
    RETURNING id, tenant_id, attempts
), ledger AS (
    INSERT INTO batchd.costs (job_id, attempt, tenant_id, model, input_tokens, output_tokens,
                              cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, cost_usd,
                              sync_cost_usd)
    SELECT id, attempts, tenant_id, 'm', 10, 20, 0, 0, 0, 0.5, 1 FROM job
), tally AS (
    INSERT INTO batchd.tallies (tenant_id, status, path, model, jobs, billed, input_tokens, output_tokens,
                                cost_usd, sync_cost_usd)
    SELECT tenant_id, 'succeeded', 'batch', 'm', 1, 1, 10, 20, 0.5, 1 FROM job
)
INSERT INTO batchd.events (type, tenant_id, job_id, data)
SELECT 'job.succeeded', tenant_id, id, '{"status": "succeeded"}' FROM job
"""


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


async def overview(url: str, token: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/v1/overview", headers={"Authorization": f"Bearer {token}"}) as response,
    ):
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def overview_until(
    url: str, token: str, condition: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """The first overview for which `condition` holds, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition(body := await overview(url, token)):
        assert time.monotonic() < deadline, f"no overview within {timeout} s met the condition: {body}"
        await asyncio.sleep(0.05)
    return body


async def test_the_snapshot_counts_each_finished_job_before_or_after_its_event_id_never_both(
    db: Any, tokens: dict[str, str], serve: Any, database_url: str
) -> None:
    async with serve() as (daemon, url):
        # The test holds the publisher's turn (the event log's row lock): the finished job and its event
        # commit, but the event stays unpublished until the test lets go.
        holder = await asyncpg.connect(database_url)
        try:
            async with holder.transaction():
                await holder.execute("SELECT published_seq FROM batchd.event_log FOR UPDATE")
                await db.execute(FINISHED_JOB)
                await db.execute("NOTIFY batchd_events")  # the daemon's publisher now waits on the lock
                before = await overview(url, tokens["acme"])
        finally:
            await holder.close()
        assert before["last_event_id"] == 0
        # Its event comes after the snapshot's id: the page counts it then, so the snapshot does not.
        assert before["totals"] == []

        async def published() -> bool:
            return bool(await db.fetchval("SELECT published_seq = 1 FROM batchd.event_log"))

        await wait_until(published)
        # The daemon's next reading (one per http.overview_interval_s, shared by every asker) sees it.
        after = await overview_until(url, tokens["acme"], lambda body: body["last_event_id"] == 1)
        (totals,) = after["totals"]
        assert totals["succeeded"] == 1
        assert totals["input_tokens"] == 10, "numbers, not strings"
        assert totals["output_tokens"] == 20
        assert totals["cost_usd"] == 0.5
        assert totals["saved_usd"] == 0.5
        assert daemon.hub is not None


async def test_a_tenant_sees_its_own_queue_batches_and_totals_and_the_admin_sees_every_tenants(
    db: Any,
    tokens: dict[str, str],
    emulator: EmulatorHandle,
    daemon_settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A batch is flushed only when its oldest job has waited an hour: the test decides what is flushed by
    # the jobs' age.
    monkeypatch.setenv("BATCHD_ADMIN_TOKEN", ADMIN_TOKEN)
    daemon = Daemon(daemon_settings(batching={"max_wait_s": 3600}))
    async with daemon.running():
        url = daemon.http_url
        assert url is not None
        # Finished jobs, for the totals: 3 of acme's, 1 of globex's.
        await insert_aged(db, "acme", 3, 7200)
        await insert_aged(db, "globex", 1, 7200)
        await wait_for_jobs(db, done=4)
        # An open batch (the emulator now takes an hour per batch) of 2 acme and 3 globex requests...
        await emulator.admin("PATCH", "settings", {"processing_time_s": [3600, 3600]})
        in_batch = await insert_aged(db, "acme", 2, 7200) + await insert_aged(db, "globex", 3, 7200)

        async def submitted() -> bool:
            statuses = await db.fetch("SELECT status FROM batchd.jobs WHERE id = ANY($1)", in_batch)
            return [row["status"] for row in statuses] == ["submitted"] * 5

        await wait_until(submitted, timeout=20)
        (batch,) = await db.fetch(
            "SELECT id, provider_batch_id FROM batchd.batches WHERE status = 'in_progress'"
        )
        await db.execute(
            "UPDATE batchd.batches SET created_at = now() - interval '90 s' WHERE id = $1", batch["id"]
        )
        # ...and jobs queued for both tenants, younger than the hour.
        await insert_aged(db, "acme", 4, 300)
        await insert_aged(db, "acme", 1, 10)
        await insert_aged(db, "globex", 2, 40)
        acme = await overview(url, tokens["acme"])
        globex = await overview(url, tokens["globex"])
        admin = await overview(url, ADMIN_TOKEN)
        # Nothing was flushed meanwhile: what the snapshots saw is still so.
        assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE status = 'queued'") == 7
        assert await db.fetchval("SELECT count(*) FROM batchd.batches WHERE status <> 'applied'") == 1

    def queued(body: dict[str, Any]) -> dict[str, tuple[int, float]]:
        return {row["tenant_id"]: (row["jobs"], row["oldest_s"]) for row in body["queued"]}

    for body, tenants in ((acme, ["acme"]), (globex, ["globex"]), (admin, ["acme", "globex"])):
        assert sorted(queued(body)) == tenants, body["queued"]
    for body in (acme, admin):
        jobs, oldest = queued(body)["acme"]
        assert jobs == 5
        assert 300 <= oldest < 330, "the oldest queued job's age, not the newest's"
    for body in (globex, admin):
        jobs, oldest = queued(body)["globex"]
        assert jobs == 2
        assert 40 <= oldest < 70

    for body, in_flight in ((acme, 2), (globex, 3), (admin, 5)):
        (open_batch,) = body["open_batches"]
        assert open_batch["id"] == str(batch["id"])
        assert open_batch["provider_batch_id"] == batch["provider_batch_id"]
        assert open_batch["status"] == "in_progress"
        assert open_batch["in_flight"] == in_flight, "the asker's requests in it"
        assert 90 <= open_batch["age_s"] < 120
    assert admin["open_batches"][0]["request_count"] == 5
    assert "request_count" not in acme["open_batches"][0], "other tenants' share is not acme's business"

    assert acme["tenant"] == "acme"
    assert acme["admin"] is False
    assert [(row["tenant_id"], row["succeeded"]) for row in acme["totals"]] == [("acme", 3)]
    assert [(row["tenant_id"], row["succeeded"]) for row in globex["totals"]] == [("globex", 1)]
    assert admin["admin"] is True
    assert [(row["tenant_id"], row["succeeded"]) for row in admin["totals"]] == [("acme", 3), ("globex", 1)]


def token_cookie(set_cookie: str) -> Morsel[str]:
    cookies: SimpleCookie = SimpleCookie()
    cookies.load(set_cookie)
    assert list(cookies) == ["batchd_token"], set_cookie
    return cookies["batchd_token"]


async def test_the_session_cookie_is_httponly_and_the_pages_files_are_revalidated(
    tokens: dict[str, str], serve: Any
) -> None:
    # unsafe=True: aiohttp keeps no cookies for a bare IP address otherwise.
    async with serve() as (_, url), aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.post(f"{url}/v1/session", headers={"Authorization": f"Bearer {tokens['acme']}"}) as r:
            assert r.status == 200
            assert json.loads(await r.text()) == {"tenant": "acme", "admin": False}
            (set_cookie,) = r.headers.getall("Set-Cookie")
        cookie = token_cookie(set_cookie)
        assert cookie.value == tokens["acme"]
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Strict"
        assert cookie["path"] == "/"
        assert cookie["max-age"] == "43200", (
            "a browser keeps it 12 hours (http.session_max_age_s), not for good"
        )
        assert not cookie["secure"], "plain HTTP here, and http.secure_cookie unset"
        async with http.get(f"{url}/v1/session") as r:  # the cookie alone now authenticates
            assert r.status == 200
        async with http.delete(f"{url}/v1/session") as r:
            assert r.status == 200
        async with http.get(f"{url}/v1/session") as r:
            assert r.status == 401
        for path in ("/", "/static/app.js", "/static/style.css"):
            async with http.get(f"{url}{path}") as r:
                assert r.status == 200, path
                assert r.headers["Cache-Control"] == "no-cache", path


async def test_the_session_cookies_lifetime_and_secure_flag_follow_the_configuration(
    tokens: dict[str, str], serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHD_HTTP__SESSION_MAX_AGE_S", "600")
    monkeypatch.setenv("BATCHD_HTTP__SECURE_COOKIE", "true")  # behind a proxy that terminates TLS
    headers = {"Authorization": f"Bearer {tokens['acme']}"}
    async with (
        serve() as (_, url),
        aiohttp.ClientSession() as http,
        http.post(f"{url}/v1/session", headers=headers) as r,
    ):
        assert r.status == 200
        cookie = token_cookie(r.headers["Set-Cookie"])
    assert cookie["max-age"] == "600"
    assert cookie["secure"] is True
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"


async def test_many_askers_share_one_reading_and_each_tenant_sees_its_own_share(
    db: Any,
    tokens: dict[str, str],
    daemon_settings: Any,
    session: aiohttp.ClientSession,
) -> None:
    tokens = {**tokens, "initech": await add_tenant(db, "initech")}
    # Jobs that stay queued (a batch waits an hour), finished jobs' tallies, and events: acme 3, globex 1,
    # initech none (its id is the base of tenants without events).
    queued = {"acme": 4, "globex": 2, "initech": 1}
    for tenant, count in queued.items():
        await insert_aged(db, tenant, count, 60)
    await db.execute(
        "INSERT INTO batchd.tallies (tenant_id, status, jobs, input_tokens)"
        " VALUES ('acme', 'succeeded', 3, 30), ('globex', 'succeeded', 1, 10), ('globex', 'failed', 2, 0)"
    )
    await db.execute(
        "INSERT INTO batchd.events (type, tenant_id)"
        " SELECT 'job.succeeded', tenant FROM unnest(ARRAY['acme', 'acme', 'globex', 'acme']) AS tenant"
    )
    # The interval spans the whole test: every request below falls in the first one.
    settings = daemon_settings(batching={"max_wait_s": 3600}, http={"overview_interval_s": 60})
    daemon = Daemon(settings, admin_token=ADMIN_TOKEN)
    async with daemon.running():
        url = daemon.http_url
        assert url is not None

        async def published() -> bool:
            await db.execute("NOTIFY batchd_events")
            return bool(await db.fetchval("SELECT published_seq = 4 FROM batchd.event_log"))

        await wait_until(published)
        askers = [ADMIN_TOKEN, *tokens.values()]
        names = {token: name for name, token in tokens.items()}
        assert daemon.readings.overview_queries == 0
        bodies = await asyncio.gather(*(ask(session, url, askers[n % len(askers)]) for n in range(50)))
        assert daemon.readings.overview_queries == 1, "50 askers, one reading"

    for (status, body), n in zip(bodies, range(50), strict=True):
        assert status == 200, body
        asker = names.get(askers[n % len(askers)])  # None: the admin
        assert body["tenant"] == asker
        assert body["admin"] is (asker is None)
        seen = {row["tenant_id"]: row["jobs"] for row in body["queued"]}
        assert seen == (queued if asker is None else {asker: queued[asker]})
        totals = {row["tenant_id"]: (row["succeeded"], row["failed"]) for row in body["totals"]}
        every = {"acme": (3, 0), "globex": (1, 2)}
        assert totals == (every if asker is None else {k: v for k, v in every.items() if k == asker})
        heads = {None: 4, "acme": 3, "globex": 1, "initech": 0}
        assert body["last_event_id"] == heads[asker], "the asker's own stream's id"
        assert body["open_batches"] == []
        assert body["statuses"]["jobs"], "the labels as ever"
    assert {body["tenant"] for _, body in bodies} == {None, "acme", "globex", "initech"}


async def test_a_reading_stuck_behind_a_lock_ends_at_its_statement_timeout_once_per_interval(
    db: Any,
    tokens: dict[str, str],
    daemon_settings: Any,
    session: aiohttp.ClientSession,
    database_url: str,
) -> None:
    http = {"overview_interval_s": 2.0, "overview_timeout_s": 0.3}
    daemon = Daemon(daemon_settings(http=http), admin_token=ADMIN_TOKEN)
    async with daemon.running():
        url = daemon.http_url
        assert url is not None
        askers = [ADMIN_TOKEN, *tokens.values()]
        holder = await asyncpg.connect(database_url)
        try:
            # What the overview's totals read, locked by another connection until the test lets go.
            locked = holder.transaction()
            await locked.start()
            await holder.execute("LOCK TABLE batchd.rollups IN ACCESS EXCLUSIVE MODE")
            with structlog.testing.capture_logs() as logged:
                # Far less than the lock's wait (for good): the database ended the reading.
                answers = await asyncio.wait_for(
                    asyncio.gather(*(ask(session, url, askers[n % len(askers)]) for n in range(30))), 10
                )
                again = await ask(session, url, tokens["acme"])  # within the interval: the failure is kept
            assert daemon.readings.overview_queries == 1, "one try per interval, however many ask"
            for status, body in [*answers, again]:
                assert status == 503, body
                assert body == {
                    "error": {"status": 503, "message": "the database could not be read; try again shortly"}
                }, "the database's error goes to the log, not to the asker"
            (failed,) = [entry for entry in logged if entry["event"] == "readings.failed"]
            assert failed["reading"] == "overview"
            assert "statement timeout" in failed["error"], "ended by the database, not by the client"
        finally:
            await holder.close()
        # The lock gone, the next interval's reading answers again.

        async def answers_again() -> bool:
            return (await ask(session, url, tokens["acme"]))[0] == 200

        await wait_until(answers_again)
        assert daemon.readings.overview_queries == 2


async def ask(session: aiohttp.ClientSession, url: str, token: str) -> tuple[int, dict[str, Any]]:
    async with session.get(f"{url}/v1/overview", headers={"Authorization": f"Bearer {token}"}) as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


async def test_an_asker_that_leaves_does_not_end_the_reading_the_others_await(
    db: Any, tokens: dict[str, str], daemon_settings: Any, session: aiohttp.ClientSession, database_url: str
) -> None:
    daemon = Daemon(daemon_settings(http={"overview_interval_s": 60}), admin_token=ADMIN_TOKEN)
    async with daemon.running():
        url = daemon.http_url
        assert url is not None
        holder = await asyncpg.connect(database_url)
        try:
            locked = holder.transaction()
            await locked.start()
            await holder.execute("LOCK TABLE batchd.rollups IN ACCESS EXCLUSIVE MODE")
            leaving = asyncio.create_task(ask(session, url, tokens["globex"]))
            staying = asyncio.create_task(ask(session, url, tokens["acme"]))

            async def reading_waits() -> bool:
                return bool(
                    await db.fetchval(
                        "SELECT EXISTS (SELECT FROM pg_locks WHERE relation = 'batchd.rollups'::regclass"
                        " AND NOT granted AND mode = 'AccessShareLock')"
                    )
                )

            await wait_until(reading_waits)
            leaving.cancel()  # its connection closes: the daemon cancels its handler
            await asyncio.gather(leaving, return_exceptions=True)
            await locked.rollback()
        finally:
            await holder.close()
        status, body = await asyncio.wait_for(staying, 10)
        assert status == 200, body
        assert body["tenant"] == "acme"
        assert daemon.readings.overview_queries == 1, "the reading went on for the one that stayed"


async def test_each_tenant_sees_its_own_money_and_budget_and_the_admin_sees_every_tenants(
    db: Any, tokens: dict[str, str], serve: Any
) -> None:
    await add_workload(
        db, "acme", succeeded=123_456, failed=7, tokens=(9_876_543_210, 1_234_567), cost="1234.5", sync="2469"
    )
    await add_workload(db, "globex", succeeded=12, failed=0, tokens=(1_200, 340), cost="0.25", sync="0.5")
    await budgets.set_budget(db, "acme", day=Decimal(100), month=Decimal(5000))
    await budgets.set_budget(db, "globex", month=Decimal(50))
    await budgets.check(db)  # acme spent 1,234.50 of 100 today: held; globex is under its month's budget
    async with serve() as (_, url):
        acme = await overview(url, tokens["acme"])
        globex = await overview(url, tokens["globex"])
        admin = await overview(url, ADMIN_TOKEN)

    def money(body: dict[str, Any]) -> dict[str, tuple[int, float, float, float]]:
        return {
            row["tenant_id"]: (row["succeeded"], row["cost_usd"], row["sync_cost_usd"], row["saved_usd"])
            for row in body["totals"]
        }

    assert money(acme) == {"acme": (123_456, 1234.5, 2469.0, 1234.5)}
    assert money(globex) == {"globex": (12, 0.25, 0.5, 0.25)}
    assert money(admin) == {**money(acme), **money(globex)}
    assert acme["totals"][0]["failed"] == 7
    assert acme["totals"][0]["input_tokens"] == 9_876_543_210

    (held,) = acme["budgets"]
    held_since = held.pop("held_since")
    assert held == {
        "tenant_id": "acme",
        "day_usd": 100.0,
        "month_usd": 5000.0,
        "spent_day_usd": 1234.5,
        "spent_month_usd": 1234.5,
        "over_budget": "hold",
        "held": True,
        "hold_reason": "over its daily budget: 1234.5 USD spent of 100 USD today (UTC)",
    }
    since = await db.fetchval("SELECT held_since FROM batchd.tenants WHERE name = 'acme'")
    assert datetime.fromisoformat(held_since) == since
    # A tenant sees its own budget only; no other tenant's name or numbers are in its answer.
    (own,) = globex["budgets"]
    assert (own["tenant_id"], own["held"], own["hold_reason"]) == ("globex", False, None)
    assert own["held_since"] is None
    assert (own["day_usd"], own["month_usd"], own["spent_month_usd"]) == (None, 50.0, 0.25)
    assert "acme" not in json.dumps(globex)
    assert "globex" not in json.dumps(acme)
    assert [row["tenant_id"] for row in admin["budgets"]] == ["acme", "globex"]
    assert admin["budgets"][1] == own


async def test_a_tenant_with_no_budget_gets_an_empty_list(
    db: Any, tokens: dict[str, str], serve: Any
) -> None:
    await budgets.set_budget(db, "acme", day=Decimal(1))
    async with serve() as (_, url):
        assert (await overview(url, tokens["globex"]))["budgets"] == []
