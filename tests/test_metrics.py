"""GET /metrics: Prometheus' text format, the admin token only, and values that say what really happened —
jobs and batches as the database has them, requests and API calls as the emulator saw them, SSE streams as
they open and close, the event loop's lag."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import asyncpg
import httpx2
import pytest
import structlog
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sse_support import sse_stream
from support import ADMIN_TOKEN, QUICK, EmulatorHandle, insert_raw, wait_for_jobs, wait_until

from batchd import readings as readings_module
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig
from batchd.metrics import Metrics
from batchd.provider import call_status
from batchd.readings import Readings, Snapshot
from batchd.statuses import BATCH_STATUSES, JOB_STATUSES


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


class Scrape:
    """One scrape, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples = [sample for family in self.families.values() for sample in family.samples]

    def value(self, name: str, **labels: str) -> float | None:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, f"{name}{labels} appears {len(found)} times"
        return found[0] if found else None

    def by_labels(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(s.labels.items())): s.value for s in self.samples if s.name == name}


async def scrape(http: aiohttp.ClientSession, url: str, token: str = ADMIN_TOKEN) -> Scrape:
    async with http.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(await response.text())


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """A value straight from a registry (0 when absent)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def holds(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A plain condition, for wait_until."""

    async def condition() -> bool:
        return check()

    return condition


async def db_job_counts(db: Any) -> dict[tuple[str, str], int]:
    rows = await db.fetch("SELECT tenant_id, status, count(*) AS n FROM batchd.jobs GROUP BY 1, 2")
    return {(row["tenant_id"], row["status"]): row["n"] for row in rows}


async def settled(db: Any) -> bool:
    """No open batch, every event published: nothing in the database moves any more."""
    return bool(
        await db.fetchval(
            "SELECT NOT EXISTS (SELECT 1 FROM batchd.batches"
            "                    WHERE status IN ('pending', 'in_progress', 'ended'))"
            "   AND NOT EXISTS (SELECT 1 FROM batchd.events WHERE seq IS NULL)"
        )
    )


async def test_a_scrape_says_what_the_database_and_the_emulator_saw(
    db: Any, tokens: dict[str, str], serve: Any, emulator: EmulatorHandle
) -> None:
    async with serve() as (daemon, url), aiohttp.ClientSession() as http:
        await insert_raw(db, "acme", [f"acme question {i}" for i in range(7)])
        await insert_raw(db, "globex", [f"globex question {i}" for i in range(5)])
        await db.execute(
            "INSERT INTO batchd.jobs (tenant_id, request) VALUES ('globex', '\"not an object\"')"
        )  # fails at the flush: a third status for globex
        await wait_for_jobs(db, done=13)
        await wait_until(lambda: settled(db), timeout=20)
        # The loop-lag monitor has measured at least once (every half second).
        await wait_until(holds(lambda: sample(daemon.metrics, "batchd_event_loop_lag_seconds_count") >= 1))
        # Nothing scraped before: this scrape reads the database now, as it stands (and it stands still).
        got = await scrape(http, url)

    # Jobs by tenant and status: exactly the database's counts, every status present for each tenant.
    expected = await db_job_counts(db)
    assert expected == {("acme", "succeeded"): 7, ("globex", "succeeded"): 5, ("globex", "failed"): 1}
    jobs = got.by_labels("batchd_jobs")
    assert jobs == {
        (("status", status), ("tenant", tenant)): float(expected.get((tenant, status), 0))
        for tenant in ("acme", "globex")
        for status in JOB_STATUSES
    }
    batches = await db.fetchval("SELECT count(*) FROM batchd.batches WHERE status = 'applied'")
    assert batches >= 1
    assert got.value("batchd_batches", status="applied") == batches
    assert got.value("batchd_batches", status="in_progress") == 0
    assert got.value("batchd_queue_oldest_job_age_seconds") == 0, "nothing is queued"

    # Requests submitted: the jobs sent, as the provider received them.
    stats = await emulator.stats()
    assert stats["requests_received"] == 12
    assert got.value("batchd_requests_submitted_total") == 12
    assert got.value("batchd_batches_submitted_total") == batches == stats["batches_created"]
    assert got.value("batchd_results_applied_total", type="succeeded") == 12
    assert got.value("batchd_results_applied_total", type="errored") == 0

    # API calls by endpoint and status; no errors.
    assert got.value("batchd_api_calls_total", endpoint="create", status="200") == batches
    assert (
        got.value("batchd_api_calls_total", endpoint="create", status="200")
        == stats["statuses"]["create 200"]
    )
    retrieves = got.value("batchd_api_calls_total", endpoint="retrieve", status="200")
    assert retrieves is not None
    assert retrieves >= batches
    assert got.value("batchd_api_calls_total", endpoint="results", status="200") == batches
    assert got.by_labels("batchd_api_errors_total") == {}
    assert got.value("batchd_api_call_duration_seconds_count", endpoint="create") == batches

    # Poll lag: one observation per batch, each within a few polling intervals.
    assert got.value("batchd_poll_lag_seconds_count") == batches
    assert got.value("batchd_poll_lag_seconds_bucket", le="5.0") == batches

    # The event loop: measured, and small (nothing here blocks it).
    assert (got.value("batchd_event_loop_lag_seconds_count") or 0) >= 1
    last = got.value("batchd_event_loop_last_lag_seconds")
    assert last is not None
    assert 0 <= last < 0.5

    assert daemon.ctx is not None
    assert got.value("batchd_info", version="0.1.0", instance_id=daemon.ctx.instance_id) == 1
    assert (got.value("process_resident_memory_bytes") or 0) > 0
    for family in got.families.values():
        assert family.documentation, f"{family.name} has a help text"


async def test_injected_api_faults_show_as_errors_with_their_status(
    db: Any, tokens: dict[str, str], serve: Any, emulator: EmulatorHandle
) -> None:
    await emulator.set_faults(
        http=[
            {"endpoint": "create", "status": 500, "count": 1},
            {"endpoint": "retrieve", "status": 503, "count": 2},
        ]
    )
    async with serve() as (_, url), aiohttp.ClientSession() as http:
        await insert_raw(db, "acme", [f"question {i}" for i in range(10)])
        assert await wait_for_jobs(db, done=10) == {"succeeded": 10}
        await wait_until(lambda: settled(db), timeout=20)
        got = await scrape(http, url)
    stats = await emulator.stats()
    assert stats["statuses"]["create 500"] == 1
    assert stats["statuses"]["retrieve 503"] == 2
    assert got.by_labels("batchd_api_errors_total") == {
        (("endpoint", "create"), ("status", "500")): 1.0,
        (("endpoint", "retrieve"), ("status", "503")): 2.0,
    }
    assert got.value("batchd_api_calls_total", endpoint="create", status="500") == 1
    assert got.value("batchd_api_calls_total", endpoint="retrieve", status="503") == 2
    # The 500 may have made a batch (a gateway's 500 can come after the work): batchd listed the provider's
    # batches before sending again (besides the list of one that checks the key at start).
    assert (got.value("batchd_api_calls_total", endpoint="list", status="200") or 0) >= 2
    assert (
        got.value("batchd_api_calls_total", endpoint="create", status="200")
        == stats["statuses"]["create 200"]
    )
    assert got.value("batchd_requests_submitted_total") == 10


async def test_a_lost_create_is_a_connection_error_and_the_adopted_batch_counts_once(
    db: Any, tokens: dict[str, str], serve: Any, emulator: EmulatorHandle
) -> None:
    await emulator.set_faults(lose_create_responses=1)
    async with serve() as (_, url), aiohttp.ClientSession() as http:
        await insert_raw(db, "acme", [f"question {i}" for i in range(10)])
        assert await wait_for_jobs(db, done=10, timeout=30) == {"succeeded": 10}
        await wait_until(lambda: settled(db), timeout=20)
        got = await scrape(http, url)
    stats = await emulator.stats()
    assert stats["lost_responses"] == 1
    assert stats["requests_received"] == 10, "adopted, not sent again"
    assert got.value("batchd_api_errors_total", endpoint="create", status="connection_error") == 1
    assert got.value("batchd_api_calls_total", endpoint="create", status="200") is None
    assert got.value("batchd_requests_submitted_total") == 10
    assert got.value("batchd_batches_submitted_total") == 1


async def test_sse_clients_go_up_with_open_streams_and_back_down(
    db: Any, tokens: dict[str, str], serve: Any
) -> None:
    async with serve() as (daemon, url), aiohttp.ClientSession() as http:
        assert (await scrape(http, url)).value("batchd_sse_clients") == 0
        async with sse_stream(http, url, tokens["acme"]) as acme, sse_stream(http, url, ADMIN_TOKEN):
            got = await scrape(http, url)
            assert got.value("batchd_sse_clients") == 2
            assert got.value("batchd_sse_events_fanned_out_total") == 0
            await insert_raw(db, "acme", [f"question {i}" for i in range(3)])
            await acme.until(lambda c: sum(m.event == "job.succeeded" for m in c.events) == 3)
            got = await scrape(http, url)
            assert got.value("batchd_sse_clients") == 2
            # At least 3 job.submitted, batch.submitted, 3 job.succeeded (batch.ended may still be coming).
            fanned_out = got.value("batchd_sse_events_fanned_out_total")
            assert fanned_out is not None
            assert fanned_out >= 7
            assert got.value("batchd_sse_streams_cut_off_total") == 0
            assert got.value("batchd_sse_streams_fell_behind_total") == 0

        async def streams_closed() -> bool:
            return (await scrape(http, url)).value("batchd_sse_clients") == 0

        await wait_until(streams_closed, timeout=10, interval=0.1)
        assert daemon.hub is not None
        assert daemon.hub.open_streams == 0


async def test_metrics_want_the_admin_token(db: Any, tokens: dict[str, str], serve: Any) -> None:
    async with serve() as (_, url), aiohttp.ClientSession() as http:
        async with http.get(f"{url}/metrics") as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get(f"{url}/metrics", headers={"Authorization": "Bearer not-a-token"}) as response:
            assert response.status == 401
        async with http.get(
            f"{url}/metrics", headers={"Authorization": f"Bearer {tokens['acme']}"}
        ) as response:
            assert response.status == 403, "a tenant must not see the others' names and volumes"
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Accept": "application/openmetrics-text"}
        async with http.get(f"{url}/metrics", headers=headers) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await response.text()).endswith("# EOF\n")


async def test_a_scrape_storm_reads_the_database_once_per_interval(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any
) -> None:
    # Jobs that stay queued (the flush waits an hour), one of them queued 90 s ago.
    daemon = Daemon(daemon_settings(batching={"max_wait_s": 3600}), admin_token=ADMIN_TOKEN)
    await db.execute(
        "INSERT INTO batchd.jobs (tenant_id, request, created_at)"
        " SELECT 'acme', $1::jsonb, now() - make_interval(secs => 90 - i) FROM generate_series(0, 2) AS i",
        '{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}',
    )
    async with daemon.running(), aiohttp.ClientSession() as http:
        assert daemon.http_url is not None
        started = time.monotonic()
        scrapes = await asyncio.gather(*(scrape(http, daemon.http_url) for _ in range(20)))
        if time.monotonic() - started < daemon.settings.http.metrics_interval_s:
            assert daemon.readings.snapshot_queries == 1
            assert daemon.readings.ledger_queries == 1
        for got in scrapes:
            assert got.value("batchd_jobs", tenant="acme", status="queued") == 3
            age = got.value("batchd_queue_oldest_job_age_seconds")
            assert age is not None
            assert 90 <= age < 120
        # Once the snapshot is older than the interval, the next scrape reads the database again and sees a
        # new job.
        await insert_raw(db, "globex", ["one more"])

        async def seen() -> bool:
            return (await scrape(http, daemon.http_url or "")).value(
                "batchd_jobs", tenant="globex", status="queued"
            ) == 1

        await wait_until(seen, timeout=10, interval=0.2)
        assert daemon.readings.snapshot_queries >= 2


async def test_a_scrape_storm_against_a_locked_table_costs_one_try_per_reading(
    db: Any, daemon_settings: Any, session: aiohttp.ClientSession, database_url: str
) -> None:
    http = {"metrics_interval_s": 2.0, "metrics_timeout_s": 0.3}
    daemon = Daemon(daemon_settings(http=http), admin_token=ADMIN_TOKEN)
    async with daemon.running():
        url = daemon.http_url
        assert url is not None
        holder = await asyncpg.connect(database_url)
        try:
            # What both readings read (the counts of finished jobs and the money: the rollups), locked by
            # another connection until the test lets go.
            locked = holder.transaction()
            await locked.start()
            await holder.execute("LOCK TABLE batchd.rollups IN ACCESS EXCLUSIVE MODE")
            with structlog.testing.capture_logs() as logged:
                # Far less than the lock's wait (for good): the database ended the readings.
                scrapes = await asyncio.wait_for(
                    asyncio.gather(*(scrape(session, url) for _ in range(30))), 10
                )
                again = await scrape(session, url)  # within the interval: the failure is kept
            assert (daemon.readings.snapshot_queries, daemon.readings.ledger_queries) == (1, 1)
            for got in [*scrapes, again]:
                assert "batchd_jobs" not in got.families, "no stale numbers"
                assert "batchd_billed_jobs" not in got.families, "no stale money"
                assert got.value("batchd_metrics_database_errors_total") == 2
                assert got.value("batchd_sse_clients") == 0, "the daemon's own metrics are still there"
            failed = {
                entry["reading"]: entry["error"] for entry in logged if entry["event"] == "readings.failed"
            }
            assert sorted(failed) == ["metrics_ledger", "metrics_snapshot"]
            assert all("statement timeout" in error for error in failed.values()), failed
        finally:
            await holder.close()

        # The lock gone, the next interval's readings report the database again.
        async def reported() -> bool:
            return {"batchd_jobs", "batchd_billed_jobs"} <= set((await scrape(session, url)).families)

        await wait_until(reported)
        assert (daemon.readings.snapshot_queries, daemon.readings.ledger_queries) == (2, 2)


async def test_a_failed_database_read_leaves_the_database_metrics_out() -> None:
    metrics = Metrics()
    readings = Readings(metrics.registry)
    # A port bound but not listening: connecting is refused, as when the database is away.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        pool = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{port}/batchd", min_size=0)
        try:
            await readings.refresh(pool)
            got = Scrape(generate_latest(metrics.registry).decode())
            assert got.value("batchd_metrics_database_errors_total") == 2, "the counts and the ledger"
            assert "batchd_jobs" not in got.families
            assert "batchd_queue_oldest_job_age_seconds" not in got.families
            assert "batchd_cost_usd" not in got.families
            await readings.refresh(pool)
            assert (readings.snapshot_queries, readings.ledger_queries) == (1, 1), (
                "a failure is kept for the interval too"
            )
        finally:
            await pool.close()


async def test_every_status_is_exported_sync_jobs_in_flight_included(db: Any, database_url: str) -> None:
    """batchd_jobs and batchd_batches name every status of batchd/statuses.py, `sending` (a sync job whose
    call is in flight) too, with the database's counts."""
    acme = await insert_raw(db, "acme", ["a", "b", "c"])
    await db.execute("UPDATE batchd.jobs SET status = 'sending' WHERE id = ANY($1)", acme[:2])
    await db.execute(
        "INSERT INTO batchd.batches (tag, request_count, bytes, status)"
        " VALUES ('abcdefghijkl', 0, 0, 'abandoned')"
    )
    metrics = Metrics()
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as pool:
        await Readings(metrics.registry).refresh(pool)
    got = Scrape(generate_latest(metrics.registry).decode())
    assert got.value("batchd_jobs", tenant="acme", status="sending") == 2
    assert got.value("batchd_jobs", tenant="acme", status="queued") == 1
    assert {s.labels["status"] for s in got.samples if s.name == "batchd_jobs"} == set(JOB_STATUSES)
    assert {s.labels["status"] for s in got.samples if s.name == "batchd_batches"} == set(BATCH_STATUSES)
    assert got.value("batchd_batches", status="abandoned") == 1


def test_tenants_past_the_cap_are_summed_under_an_empty_label(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readings_module, "MAX_TENANTS", 2)
    metrics = Metrics()
    Readings(metrics.registry).snapshot = Snapshot(
        jobs={
            ("big", "succeeded"): 100,
            ("mid", "queued"): 10,
            ("small", "queued"): 3,
            ("tiny", "failed"): 1,
        },
        batches={"applied": 4},
    )
    got = Scrape(generate_latest(metrics.registry).decode())
    tenants = {s.labels["tenant"] for s in got.samples if s.name == "batchd_jobs"}
    assert tenants == {"big", "mid", ""}
    assert got.value("batchd_jobs", tenant="", status="queued") == 3
    assert got.value("batchd_jobs", tenant="", status="failed") == 1
    assert got.value("batchd_jobs", tenant="big", status="succeeded") == 100
    assert sum(s.value for s in got.samples if s.name == "batchd_jobs") == 114
    assert got.value("batchd_batches", status="applied") == 4
    assert got.value("batchd_batches", status="pending") == 0


async def test_the_loop_lag_monitor_sees_a_blocked_loop() -> None:
    metrics = Metrics()
    stopping = asyncio.Event()
    monitor = asyncio.create_task(metrics.watch_loop_lag(stopping, interval_s=0.05))
    try:
        await wait_until(holds(lambda: sample(metrics, "batchd_event_loop_lag_seconds_count") >= 1))
        # Blocked for longer than a whole interval: the sleep under way ends at least 0.15 s late.
        time.sleep(0.2)  # noqa: ASYNC251 - blocking the loop is the point
        await wait_until(
            holds(
                lambda: (
                    sample(metrics, "batchd_event_loop_lag_seconds_count")
                    > sample(metrics, "batchd_event_loop_lag_seconds_bucket", le="0.1")
                )
            )
        )
        assert sample(metrics, "batchd_event_loop_lag_seconds_bucket", le="0.1") >= 1, "the others were small"
    finally:
        stopping.set()
        await asyncio.wait_for(monitor, timeout=5)


def test_call_status_names_what_kept_an_answer_from_coming() -> None:
    request = httpx2.Request("POST", "http://127.0.0.1/v1/messages/batches")
    response = httpx2.Response(529, request=request, json={"error": {"type": "overloaded_error"}})
    assert call_status(anthropic.InternalServerError("overloaded", response=response, body=None)) == "529"
    assert call_status(anthropic.APITimeoutError(request=request)) == "timeout"
    assert call_status(anthropic.APIConnectionError(request=request)) == "connection_error"
    assert call_status(httpx2.ReadTimeout("slow", request=request)) == "timeout"
    assert call_status(httpx2.RemoteProtocolError("cut", request=request)) == "connection_error"
    assert call_status(ValueError("what")) == "other"
