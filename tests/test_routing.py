"""Deadline-aware routing: `batch`, `sync` and `auto` jobs, the batch p90 they are judged by, and the sync
path — real PostgreSQL, the emulator over HTTP, the official SDK, the daemon in process (and as a process,
killed mid-call).

The emulator's batches are slow here (an emulated hour: they end only when a test moves its clock), so a
job that finishes on its own went through the Messages API.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support import (
    MODEL,
    EmulatorHandle,
    daemon_config,
    daemon_process,
    raw_request,
    wait_until,
)

from batchd.emulator import EmulatorConfig
from batchd.store import sql

SLOW = EmulatorConfig(processing_time_s=(3600.0, 3600.0), cancel_time_s=1.0, seed=7)
ROUTING = {"prior_turnaround_s": 900.0, "min_samples": 3, "margin_s": 30.0, "lease_s": 5.0, "window": 50}


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return SLOW


async def insert_job(
    db: Any, text: str, *, route: str | None = None, deadline_s: float | None = None, **params: Any
) -> Any:
    """One raw job, as a producer writes it: with a route, or none (the INSERT of before routing), and a
    deadline in `deadline_s` seconds (or none)."""
    request = raw_request(text, **params)  # the db fixture encodes jsonb itself
    if route is None:
        return await db.fetchval(
            "INSERT INTO batchd.jobs (tenant_id, request, deadline)"
            " VALUES ('acme', $1, now() + make_interval(secs => $2::float8)) RETURNING id",
            request,
            deadline_s,
        )
    return await db.fetchval(
        "INSERT INTO batchd.jobs (tenant_id, request, route, deadline)"
        " VALUES ('acme', $1, $2, now() + make_interval(secs => $3::float8)) RETURNING id",
        request,
        route,
        deadline_s,
    )


async def record_batches(db: Any, turnarounds: list[float], *, ended_ago_s: float = 0.0) -> None:
    """A history of applied batches, each `turnaround` seconds from its flush to its results applied, the
    last of them applied `ended_ago_s` ago, in list order."""
    for n, turnaround in enumerate(turnarounds):
        applied_ago = ended_ago_s + (len(turnarounds) - n) * 10.0
        await db.execute(
            "INSERT INTO batchd.batches (tag, status, request_count, bytes, created_at, applied_at)"
            " VALUES (substr(md5(random()::text), 1, 12), 'applied', 1, 100,"
            "         now() - make_interval(secs => $1::float8 + $2::float8),"
            "         now() - make_interval(secs => $1::float8))",
            applied_ago,
            turnaround,
        )


async def job(db: asyncpg.Connection, job_id: Any) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM batchd.jobs WHERE id = $1", job_id)
    assert row is not None
    return row


def has_status(db: Any, job_id: Any, *statuses: str) -> Any:
    async def check() -> bool:
        return bool(
            await db.fetchval(
                "SELECT status = ANY($2) FROM batchd.jobs WHERE id = $1", job_id, list(statuses)
            )
        )

    return check


def percentile_90(values: list[float]) -> float:
    """PostgreSQL's percentile_cont(0.9): linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = 0.9 * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# -- the p90 ----------------------------------------------------------------------------------------------


async def test_the_batch_p90_is_taken_over_the_most_recent_applied_batches(db: Any) -> None:
    # Old, fast batches beyond the window; the 12 recent ones are slow and spread out.
    await record_batches(db, [5.0] * 8, ended_ago_s=10_000)
    recent = [120.0, 300.0, 90.0, 1800.0, 600.0, 240.0, 60.0, 900.0, 450.0, 3000.0, 150.0, 75.0]
    await record_batches(db, recent)
    # Batches not applied do not count, whatever their times.
    await db.execute(
        "INSERT INTO batchd.batches (tag, status, request_count, bytes, created_at)"
        " VALUES ('openbatch001', 'in_progress', 1, 100, now() - interval '5 days')"
    )
    row = await db.fetchrow("SELECT * FROM batchd.batch_turnaround(12, 3, 999)")
    assert row["measured"] is True
    assert row["samples"] == 12
    assert row["p90_s"] == pytest.approx(percentile_90(recent), abs=0.01)
    # A wider window takes the old fast ones in.
    row = await db.fetchrow("SELECT * FROM batchd.batch_turnaround(20, 3, 999)")
    assert row["samples"] == 20
    assert row["p90_s"] == pytest.approx(percentile_90(recent + [5.0] * 8), abs=0.01)
    # Fewer samples than the minimum: the prior stands in, and says so.
    row = await db.fetchrow("SELECT * FROM batchd.batch_turnaround(50, 21, 999)")
    assert (row["p90_s"], row["samples"], row["measured"]) == (999.0, 20, False)
    await db.execute("DELETE FROM batchd.batches")
    row = await db.fetchrow("SELECT * FROM batchd.batch_turnaround(50, 1, 42.5)")
    assert (row["p90_s"], row["samples"], row["measured"]) == (42.5, 0, False)


async def test_an_insert_without_a_route_is_a_batch_job(db: Any) -> None:
    job_id = await insert_job(db, "an old producer's insert")
    row = await job(db, job_id)
    assert (row["route"], row["path"], row["path_reason"]) == ("batch", None, None)
    with pytest.raises(asyncpg.CheckViolationError):
        await insert_job(db, "a route that does not exist", route="carrier-pigeon")


async def test_the_sync_senders_clock_has_nothing_due_when_nothing_waits(db: Any) -> None:
    """sync_next_wake is the seconds until the sync sender must look again unwoken, null for never: with no
    `auto` job waiting it read as 100 years ago, and an idle sync sender looked every 50 ms."""
    params = (50, 3, 900.0, 30.0)  # window, min_samples, prior p90, margin
    assert await db.fetchval(sql("sync_next_wake"), *params) is None
    await insert_job(db, "a batch job, no deadline")
    assert await db.fetchval(sql("sync_next_wake"), *params) is None
    # An auto job due in an hour goes sync when the batch p90 (the prior, 900 s) + margin no longer fit.
    await insert_job(db, "an auto job", route="auto", deadline_s=3600.0)
    due_in = await db.fetchval(sql("sync_next_wake"), *params)
    assert 3600.0 - 930.0 - 5.0 < due_in <= 3600.0 - 930.0


# -- the daemon ---------------------------------------------------------------------------------------------


async def test_near_deadlines_go_sync_and_the_others_wait_for_the_slow_batch(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    # Recent batches took 10 minutes from flush to results: the p90 is 600 s, measured on 5 batches.
    await record_batches(db, [600.0] * 5)
    settings = daemon_settings(routing=ROUTING)
    async with start_daemon(settings):
        near = await insert_job(db, "near deadline", route="auto", deadline_s=120)
        far = await insert_job(db, "far deadline", route="auto", deadline_s=3 * 3600)
        undated = await insert_job(db, "auto without a deadline", route="auto")
        batch = await insert_job(db, "a batch job with a near deadline", route="batch", deadline_s=120)
        plain = await insert_job(db, "an old producer's insert")
        sync = await insert_job(db, "sync at once", route="sync")
        for job_id in (near, sync):
            await wait_until(has_status(db, job_id, "succeeded"), timeout=20)
        for job_id in (far, undated, batch, plain):
            await wait_until(has_status(db, job_id, "submitted"), timeout=20)

        near_row, sync_row = await job(db, near), await job(db, sync)
        assert near_row["path"] == sync_row["path"] == "sync"
        assert near_row["batch_id"] is None
        assert sync_row["batch_id"] is None
        assert near_row["path_reason"].startswith("auto: deadline in 1")
        assert " < flush in " in near_row["path_reason"]
        assert near_row["path_reason"].endswith("+ batch p90 600 s + margin 30 s (5 batches)")
        assert sync_row["path_reason"] == "sync: route = sync"
        assert "near deadline" in near_row["result"]["content"][0]["text"], "its own answer"
        assert near_row["usage"]["input_tokens"] > 0
        # Priced at the full price: the sync call saved nothing.
        costs = {row["job_id"]: row for row in await db.fetch("SELECT * FROM batchd.costs")}
        assert set(costs) == {near, sync}
        for row in costs.values():
            assert row["via"] == "sync"
            assert row["batch_id"] is None
            assert row["cost_usd"] == row["sync_cost_usd"] > 0
        usage = near_row["usage"]
        priced = (Decimal(usage["input_tokens"]) * 1 + Decimal(usage["output_tokens"]) * 5) / 1_000_000
        assert costs[near]["cost_usd"] == priced  # claude-haiku-4-5: $1 / $5 per MTok
        assert await db.fetchval("SELECT count(*) FROM batchd.spend WHERE tenant_id = 'acme'") >= 1
        events = await db.fetch(
            "SELECT type, batch_id, data FROM batchd.events WHERE job_id = $1 ORDER BY id", near
        )
        assert [e["type"] for e in events] == ["job.submitted", "job.succeeded"]
        assert events[0]["data"]["path"] == "sync"
        assert all(e["batch_id"] is None for e in events)

        waiting = {
            row["id"]: row
            for row in await db.fetch(
                "SELECT * FROM batchd.jobs WHERE id = ANY($1)", [far, undated, batch, plain]
            )
        }
        assert {row["path"] for row in waiting.values()} == {"batch"}
        assert waiting[far]["path_reason"].startswith("auto: deadline in 10")
        assert ">= flush in 0 s + batch p90 600 s + margin 30 s (5 batches)" in waiting[far]["path_reason"]
        assert waiting[undated]["path_reason"] == "auto: no deadline, so the batch"
        assert waiting[batch]["path_reason"] == waiting[plain]["path_reason"] == "batch: route = batch"
        stats = await emulator.stats()
        assert stats["statuses"].get("messages 200") == 2, "two sync calls, no more"

        # The batch ends (the emulated clock moves past its hour): the others finish, at the batch price.
        await emulator.advance(3600)
        for job_id in (far, undated, batch, plain):
            await wait_until(has_status(db, job_id, "succeeded"), timeout=20)
    rows = await db.fetch(
        "SELECT via, cost_usd, sync_cost_usd FROM batchd.costs WHERE job_id = ANY($1)",
        [far, undated, batch, plain],
    )
    assert len(rows) == 4
    assert all(r["via"] == "batch" and r["cost_usd"] * 2 == r["sync_cost_usd"] for r in rows)


async def test_an_auto_job_kept_waiting_goes_sync_before_its_deadline_is_out_of_reach(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    # Room for one request in flight, taken by a batch that will not end: nothing more can be flushed.
    settings = daemon_settings(routing=ROUTING, batching={"max_in_flight_requests": 1})
    async with start_daemon(settings):
        first = await insert_job(db, "takes the only slot")
        await wait_until(has_status(db, first, "submitted"), timeout=20)
        # The prior p90 (900 s) + margin (30 s) = 930 s: a deadline 934 s away can wait for a batch, at
        # first; four seconds later it cannot, and the job must go sync then.
        waiting = await insert_job(db, "kept waiting", route="auto", deadline_s=934)
        await wait_until(has_status(db, waiting, "succeeded"), timeout=20)
    row = await job(db, waiting)
    assert row["path"] == "sync"
    assert row["batch_id"] is None
    assert row["path_reason"].startswith("auto: deadline in 9")
    assert (
        "< flush in 0 s + batch p90 900 s + margin 30 s (prior: 0 of 3 batches measured)"
        in row["path_reason"]
    )
    # It became due only when its deadline came within reach, not at once.
    decided = await db.fetchval(
        "SELECT extract(epoch FROM completed_at - created_at) FROM batchd.jobs WHERE id = $1", waiting
    )
    assert decided >= 3.0


async def test_a_request_the_api_refuses_fails_with_the_api_reason(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    async with start_daemon(daemon_settings(routing=ROUTING)):
        # A batch would take it and fail it hours later; the Messages API says so at once (400).
        refused = await insert_job(db, "too long an answer", route="sync", max_tokens=500_000)
        await wait_until(has_status(db, refused, "failed"), timeout=20)
    row = await job(db, refused)
    assert row["error"]["type"] == "invalid_request_error"
    assert row["error"]["message"].startswith("400: max_tokens: 500000 > 128000")
    assert row["attempts"] == 0
    assert row["result"] is None
    assert await db.fetchval("SELECT count(*) FROM batchd.costs") == 0
    types = [
        r["type"]
        for r in await db.fetch("SELECT type FROM batchd.events WHERE job_id = $1 ORDER BY id", refused)
    ]
    assert types == ["job.submitted", "job.failed"]


async def test_429_and_500_are_retried_with_backoff_until_the_call_succeeds(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    await emulator.set_faults(
        http=[
            {"endpoint": "messages", "status": 429, "count": 1, "retry_after_s": 0.3},
            {"endpoint": "messages", "status": 500, "count": 1},
        ]
    )
    async with start_daemon(daemon_settings(routing=ROUTING)):
        retried = await insert_job(db, "retried twice", route="sync")
        await wait_until(has_status(db, retried, "succeeded"), timeout=20)
    row = await job(db, retried)
    assert row["attempts"] == 2
    assert "retried twice" in row["result"]["content"][0]["text"]
    statuses = (await emulator.stats())["statuses"]
    assert (statuses["messages 429"], statuses["messages 500"], statuses["messages 200"]) == (1, 1, 1)
    types = [
        r["type"]
        for r in await db.fetch("SELECT type FROM batchd.events WHERE job_id = $1 ORDER BY id", retried)
    ]
    assert types == ["job.submitted", "job.retrying"] * 2 + ["job.submitted", "job.succeeded"]
    cost = await db.fetchrow("SELECT attempt, via FROM batchd.costs WHERE job_id = $1", retried)
    assert (cost["attempt"], cost["via"]) == (2, "sync")


async def test_a_job_that_keeps_failing_fails_at_max_attempts(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    await emulator.set_faults(http=[{"endpoint": "messages", "status": 529, "retry_after_s": 0.2}])
    async with start_daemon(daemon_settings(routing=ROUTING, batching={"max_attempts": 2})):
        doomed = await insert_job(db, "always overloaded", route="sync")
        await wait_until(has_status(db, doomed, "failed"), timeout=20)
    row = await job(db, doomed)
    assert row["attempts"] == 2
    assert row["error"]["type"] == "overloaded_error"
    assert (await emulator.stats())["statuses"]["messages 529"] == 2


async def test_a_job_whose_sender_keeps_dying_mid_call_fails_at_max_attempts(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    # Two jobs left `sending` by a daemon that died mid-call, their leases run out: one has had max_attempts
    # - 1 such calls, the other none. A call that kills its daemon every time must end, not be paid forever.
    doomed = await insert_job(db, "kills its sender", route="sync")
    lucky = await insert_job(db, "lost once", route="sync")
    await db.execute(
        "UPDATE batchd.jobs SET status = 'sending', path = 'sync', sync_owner = 'batchd-dead',"
        " sync_lease_until = now() - interval '1 second', submitted_at = now(),"
        " attempts = CASE WHEN id = $1 THEN 2 ELSE 0 END WHERE id = ANY($2::uuid[])",
        doomed,
        [doomed, lucky],
    )
    async with start_daemon(daemon_settings(routing=ROUTING, batching={"max_attempts": 3})):
        await wait_until(has_status(db, lucky, "succeeded"), timeout=20)
        await wait_until(has_status(db, doomed, "failed"), timeout=20)
    row = await job(db, doomed)
    assert row["attempts"] == 3
    assert row["error"] == {
        "type": "sender_lost",
        "message": "the daemon sending it stopped mid-call 3 times (max_attempts)",
    }
    assert row["completed_at"] is not None
    events = await db.fetch("SELECT type, data FROM batchd.events WHERE job_id = $1", doomed)
    assert [(e["type"], e["data"]["attempts"]) for e in events] == [("job.failed", 3)]
    assert (await job(db, lucky))["attempts"] == 1, "the lost call counted"
    # Only the lucky one was sent again.
    assert (await emulator.stats())["statuses"]["messages 200"] == 1


def calls_received(emulator: EmulatorHandle, count: int) -> Callable[[], Awaitable[bool]]:
    async def received() -> bool:
        return bool((await emulator.stats())["calls"].get("messages", 0) >= count)

    return received


@pytest.mark.slow
async def test_on_stop_calls_in_flight_finish_or_go_back_to_the_queue_at_once(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    # A call answered within the drain (5 s) is applied before the daemon exits.
    await emulator.set_faults(messages_delay_s=1.0)
    async with start_daemon(daemon_settings(routing=ROUTING)):
        answered = await insert_job(db, "answered while the daemon stops", route="sync")
        # The call has reached the emulator (a job is `sending` a moment before its call starts).
        await wait_until(calls_received(emulator, 1), timeout=20)
    assert (await job(db, answered))["status"] == "succeeded"
    # One that takes longer is cancelled and its job queued again at once, not after its lease.
    await emulator.set_faults(messages_delay_s=8.0)
    async with start_daemon(daemon_settings(routing=ROUTING)):
        cut = await insert_job(db, "cut off by the stop", route="sync")
        await wait_until(calls_received(emulator, 2), timeout=20)
    row = await job(db, cut)
    assert row["status"] == "queued"
    assert row["path"] == "sync"
    assert row["sync_owner"] is None
    assert row["attempts"] == 0


# -- a daemon killed mid-call -------------------------------------------------------------------------------

GATE_KEY = 770_006
GATE = f"""
CREATE OR REPLACE FUNCTION batchd.routing_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({GATE_KEY});
    RETURN NEW;
END
$$;
CREATE TRIGGER routing_gate BEFORE UPDATE ON batchd.jobs FOR EACH ROW
    WHEN (OLD.status = 'sending' AND NEW.status <> 'sending') EXECUTE FUNCTION batchd.routing_gate();
"""
WAITING = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND NOT granted"
    # Only this test's database: the same key is taken in the databases of tests running beside it.
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


@pytest.mark.slow
async def test_a_sync_job_of_a_daemon_killed_mid_call_is_sent_again_and_ends_once(
    db: Any, emulator: EmulatorHandle, database_url: str, tmp_path: Path
) -> None:
    config = daemon_config(
        tmp_path / "batchd.toml",
        database_url,
        emulator.url,
        routing={"lease_s": 2},
    )
    log = tmp_path / "daemon.log"
    job_id = await insert_job(db, "killed mid-call", route="sync")
    # The gate: the daemon's UPDATE that records the call's outcome waits for a lock the test holds. The
    # call has been answered; its answer is in the killed process only: lost, as a crash mid-call loses it.
    holder = await asyncpg.connect(database_url)
    try:
        await holder.execute(f"SELECT pg_advisory_lock({GATE_KEY})")
        await db.execute(GATE)
        async with daemon_process(config, log) as first:
            await wait_until(lambda: _gate_reached(db), timeout=30)
            first.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(first.wait(), timeout=10) == -signal.SIGKILL
        await db.execute(WAITING.replace("count(*)", "pg_terminate_backend(pid)"), GATE_KEY)
    finally:
        await db.execute("DROP TRIGGER IF EXISTS routing_gate ON batchd.jobs")
        await db.execute("DROP FUNCTION IF EXISTS batchd.routing_gate()")
        await holder.close()
    row = await job(db, job_id)
    assert row["status"] == "sending", "the kill left the job mid-call"
    async with daemon_process(config, log) as second:
        await wait_until(has_status(db, job_id, "succeeded"), timeout=30)
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), timeout=15) == 0
    row = await job(db, job_id)
    assert "killed mid-call" in row["result"]["content"][0]["text"]
    terminal = await db.fetchval(
        "SELECT count(*) FROM batchd.events WHERE job_id = $1"
        " AND type IN ('job.succeeded', 'job.failed', 'job.canceled')",
        job_id,
    )
    assert terminal == 1
    assert await db.fetchval("SELECT count(*) FROM batchd.costs WHERE job_id = $1", job_id) == 1
    # Sent twice: the first answer was lost with the process (the Messages API has no idempotency key).
    assert (await emulator.stats())["statuses"]["messages 200"] == 2
    assert row["attempts"] == 1, "the call lost with the process counts as an attempt"
    assert MODEL in row["result"]["model"]


async def _gate_reached(db: Any) -> bool:
    return bool(await db.fetchval(WAITING, GATE_KEY))
