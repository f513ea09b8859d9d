"""When the flusher makes a batch, and how producers' INSERTs wake it.

Each threshold is shown on its own, with the others set out of reach. "The daemon decided to wait" is never
guessed from elapsed time: the flusher writes its decision to `batchd.wakeup` (not armed, and the job number
that would wake it lies beyond the last job), and the tests wait for that before asserting that nothing was
flushed.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from support import QUICK, EmulatorHandle, insert_raw, raw_request, wait_for_jobs, wait_until

import batchd.daemon
from batchd.emulator import EmulatorConfig
from batchd.listener import JOBS_CHANNEL, Listener
from batchd.templates import job_id_from

OUT_OF_REACH_S = 1000


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


async def batch_count(db: Any) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM batchd.batches")
    return count


async def waiting_for_more(db: Any) -> bool:
    """The flusher looked at the queue as it is now and decided to wait: it is not armed (the queue is not
    empty) and the job that would wake it has not been inserted yet."""
    row = await db.fetchrow(
        "SELECT w.armed, w.wake_seq, (SELECT coalesce(max(seq), 0) FROM batchd.jobs) AS last_seq"
        "  FROM batchd.wakeup AS w"
    )
    return not row["armed"] and row["wake_seq"] > row["last_seq"]


async def all_batches_applied(db: Any) -> bool:
    """Jobs get their results a moment before their batch is marked applied: wait for that too."""
    open_batches = await db.fetchval("SELECT count(*) FROM batchd.batches WHERE status <> 'applied'")
    return bool(open_batches == 0)


async def _true(value: bool) -> bool:
    return value


def holds(check: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return bool(await check())

    return condition


# 1. The count threshold.


async def test_nine_jobs_wait_and_the_tenth_fills_a_batch_of_ten(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    settings = daemon_settings(
        batching={"max_requests": 10, "max_wait_s": OUT_OF_REACH_S},
        daemon={"sweep_interval_s": OUT_OF_REACH_S},
    )
    async with start_daemon(settings) as daemon:
        await insert_raw(db, "acme", [f"question {i}" for i in range(9)])
        await wait_until(lambda: waiting_for_more(db))
        assert await batch_count(db) == 0, "nine jobs of ten make no batch"
        assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE status = 'queued'") == 9

        (tenth,) = await insert_raw(db, "acme", ["question 9"])
        # Only the tenth job's notification can wake the flusher (no sweep, no clock within reach).
        await wait_until(holds(lambda: batch_count(db)), timeout=20)
        counts = await wait_for_jobs(db, done=10, timeout=30)
        assert daemon.flusher.batches_made == 1
    assert counts == {"succeeded": 10}
    batches = await db.fetch("SELECT id, request_count FROM batchd.batches")
    assert [b["request_count"] for b in batches] == [10]
    assert await db.fetchval("SELECT count(DISTINCT batch_id) FROM batchd.jobs") == 1
    assert await db.fetchval("SELECT batch_id FROM batchd.jobs WHERE id = $1", tenth) == batches[0]["id"]


# 2. The bytes threshold.


async def test_the_bytes_threshold_flushes_and_no_batch_exceeds_max_bytes(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    max_bytes = 8000
    settings = daemon_settings(
        batching={"max_requests": 1000, "max_bytes": max_bytes, "max_wait_s": OUT_OF_REACH_S},
        daemon={"sweep_interval_s": OUT_OF_REACH_S},
    )

    def kilobyte() -> str:
        return os.urandom(500).hex()  # 1,000 characters that do not compress

    async with start_daemon(settings):
        await insert_raw(db, "acme", [kilobyte() for _ in range(3)])
        await wait_until(lambda: waiting_for_more(db))
        assert await batch_count(db) == 0, "3 KB of 8 KB makes no batch"

        # A producer that inserts one job at a time: each notification wakes the flusher only once the
        # queue holds (by the head's average size) a batch's worth of bytes.
        for _ in range(27):
            await insert_raw(db, "acme", [kilobyte()])

        async def settled() -> bool:
            queued_bytes = await db.fetchval(
                "SELECT coalesce(sum(pg_column_size(request)), 0) FROM batchd.jobs WHERE status = 'queued'"
            )
            return queued_bytes < max_bytes and await waiting_for_more(db)

        await wait_until(settled, timeout=10)
        batched = await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE batch_id IS NOT NULL")

        async def batched_jobs_done() -> bool:
            done = await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE status = 'succeeded'")
            return bool(done == batched)

        await wait_until(batched_jobs_done, timeout=30)
        await wait_until(lambda: all_batches_applied(db), timeout=10)
    batches = await db.fetch("SELECT request_count, bytes, status FROM batchd.batches ORDER BY created_at")
    assert len(batches) >= 3, f"30 KB in 8 KB batches: {batches}"
    for batch in batches:
        assert 0 < batch["bytes"] <= max_bytes, batch
        assert batch["request_count"] <= max_bytes // 1000
        assert batch["status"] == "applied"
    assert sum(b["request_count"] for b in batches) == batched
    counts = {
        row["status"]: row["n"]
        for row in await db.fetch("SELECT status, count(*) AS n FROM batchd.jobs GROUP BY status")
    }
    # Every job a batch took succeeded; the tail that is not yet worth a batch (by bytes) waits, untouched,
    # since no other threshold is within reach.
    assert counts.get("succeeded") == batched
    assert set(counts) <= {"succeeded", "queued"}
    assert await db.fetchval(
        "SELECT bool_and(batch_id IS NULL AND attempts = 0) FROM batchd.jobs WHERE status = 'queued'"
    ) in (True, None)


# 3. The time threshold.


async def test_one_job_flushes_once_it_has_waited_max_wait_s_and_not_before(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    max_wait_s = 1.0
    settings = daemon_settings(batching={"max_requests": 1000, "max_wait_s": max_wait_s})
    async with start_daemon(settings):
        (job_id,) = await insert_raw(db, "acme", ["a lonely question"])
        await wait_until(holds(lambda: batch_count(db)), timeout=max_wait_s + 5)
        counts = await wait_for_jobs(db, done=1, timeout=30)
    assert counts == {"succeeded": 1}
    row = await db.fetchrow(
        "SELECT extract(epoch FROM b.created_at - j.created_at)::float8 AS waited, b.request_count"
        "  FROM batchd.jobs AS j JOIN batchd.batches AS b ON b.id = j.batch_id WHERE j.id = $1",
        job_id,
    )
    assert row["request_count"] == 1
    assert row["waited"] >= max_wait_s - 0.01, f"flushed after {row['waited']:.3f} s, before max_wait_s"
    assert row["waited"] < max_wait_s + 4, f"flushed only after {row['waited']:.3f} s"
    assert await batch_count(db) == 1


# 4. Deadlines.


async def test_a_job_whose_deadline_is_near_flushes_at_once(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    settings = daemon_settings(
        batching={"max_requests": 1000, "max_wait_s": OUT_OF_REACH_S, "deadline_slack_s": 60},
        daemon={"sweep_interval_s": OUT_OF_REACH_S},
    )
    async with start_daemon(settings):
        (patient,) = await insert_raw(db, "acme", ["no hurry"])
        await wait_until(lambda: waiting_for_more(db))
        assert await batch_count(db) == 0
        urgent = await db.fetchval(
            "INSERT INTO batchd.jobs (tenant_id, request, deadline)"
            " VALUES ('acme', $1, now() + interval '30 seconds') RETURNING id",
            raw_request("in a hurry"),
        )
        # The flusher was waiting (not armed, far from wake_seq): only the deadline can wake it.
        await wait_until(holds(lambda: batch_count(db)), timeout=20)
        counts = await wait_for_jobs(db, done=2, timeout=30)
    assert counts == {"succeeded": 2}
    rows = await db.fetch(
        "SELECT j.id, j.batch_id, extract(epoch FROM b.created_at - j.created_at)::float8 AS waited"
        "  FROM batchd.jobs AS j JOIN batchd.batches AS b ON b.id = j.batch_id"
    )
    by_id = {r["id"]: r for r in rows}
    assert by_id[urgent]["waited"] < 5
    assert by_id[patient]["batch_id"] == by_id[urgent]["batch_id"], "the batch takes the queue along"
    assert await batch_count(db) == 1


async def test_an_urgent_job_behind_fifty_others_goes_in_the_first_batch(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    settings = daemon_settings(
        batching={"max_requests": 10, "max_wait_s": OUT_OF_REACH_S, "deadline_slack_s": 60},
        daemon={"sweep_interval_s": OUT_OF_REACH_S},
    )
    # All queued before the daemon starts, so that its first look sees them all.
    older = await insert_raw(db, "acme", [f"older {i}" for i in range(50)])
    urgent = await db.fetchval(
        "INSERT INTO batchd.jobs (tenant_id, request, deadline)"
        " VALUES ('acme', $1, now() + interval '30 seconds') RETURNING id",
        raw_request("in a hurry"),
    )
    async with start_daemon(settings):
        # 51 jobs: five full batches; the youngest job without a deadline waits for more.
        await wait_until(lambda: waiting_for_more(db), timeout=10)
        await wait_for_jobs(db, done=50, timeout=30)
    batches = await db.fetch("SELECT id, request_count FROM batchd.batches ORDER BY created_at")
    assert [b["request_count"] for b in batches] == [10] * 5
    first = {
        r["id"] for r in await db.fetch("SELECT id FROM batchd.jobs WHERE batch_id = $1", batches[0]["id"])
    }
    assert urgent in first, "the urgent job is claimed first, whatever its place in the queue"
    assert first == {urgent, *older[:9]}, "the rest of the first batch is the head of the queue"
    left = await db.fetch("SELECT id, status FROM batchd.jobs WHERE status <> 'succeeded'")
    assert [(r["id"], r["status"]) for r in left] == [(older[-1], "queued")]


# 5. The in-flight cap.


async def test_in_flight_requests_never_exceed_the_cap(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    cap = 10
    await emulator.admin("PATCH", "settings", {"processing_time_s": [0.5, 0.5]})
    settings = daemon_settings(
        batching={"max_requests": 10, "max_in_flight_requests": cap, "max_wait_s": OUT_OF_REACH_S}
    )
    samples: list[int] = []

    async def sample_then_check_done() -> bool:
        samples.append(
            await db.fetchval(
                "SELECT coalesce(sum(request_count), 0) FROM batchd.batches"
                " WHERE status NOT IN ('applied', 'abandoned')"
            )
        )
        done = await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE status = 'succeeded'")
        return bool(done == 40)

    async with start_daemon(settings):
        await insert_raw(db, "acme", [f"question {i}" for i in range(40)])
        await wait_until(sample_then_check_done, timeout=60, interval=0.01)
        await wait_until(lambda: all_batches_applied(db), timeout=10)
    assert max(samples) <= cap, f"in flight at once: up to {max(samples)} requests"
    assert max(samples) == cap, "the cap was reached: the samples saw a batch in flight"
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE status = 'succeeded'") == 40
    batches = await db.fetch("SELECT request_count, status FROM batchd.batches")
    assert [(b["request_count"], b["status"]) for b in batches] == [(10, "applied")] * 4


# 6. Two daemons on one database.


async def test_two_daemons_share_the_queue_without_sending_a_job_twice(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    settings = daemon_settings(batching={"max_requests": 100, "max_wait_s": 0.2})
    async with start_daemon(settings) as first, start_daemon(settings) as second:
        for chunk in range(10):
            await insert_raw(db, f"tenant-{chunk % 3}", [f"job {chunk}-{i}" for i in range(100)])
        counts = await wait_for_jobs(db, done=1000, timeout=90)
        await wait_until(lambda: all_batches_applied(db), timeout=10)
        made = first.flusher.batches_made + second.flusher.batches_made
    assert counts == {"succeeded": 1000}
    batches = {
        r["id"]: r for r in await db.fetch("SELECT id, tag, request_count, status FROM batchd.batches")
    }
    assert made == len(batches)
    assert {b["status"] for b in batches.values()} == {"applied"}
    per_batch = {
        r["batch_id"]: r["n"]
        for r in await db.fetch("SELECT batch_id, count(*) AS n FROM batchd.jobs GROUP BY batch_id")
    }
    assert None not in per_batch
    assert per_batch == {i: b["request_count"] for i, b in batches.items()}, "each batch's jobs are its own"
    assert all(n <= 100 for n in per_batch.values())
    stats = await emulator.stats()
    assert stats["requests_received"] == 1000
    assert stats["duplicate_custom_ids"] == {}
    # custom_ids carry the batch tag, so a job sent in two batches would not be a "duplicate" above: check
    # that each job went out once, in the batch the database says it is in.
    sent = (await emulator.admin("GET", "custom_ids"))["custom_ids"]
    tag_of = {str(i): b["tag"] for i, b in batches.items()}
    job_batch = {r["id"]: str(r["batch_id"]) for r in await db.fetch("SELECT id, batch_id FROM batchd.jobs")}
    sent_jobs = []
    for custom, times in sent.items():
        assert times == 1
        tag = custom.split("-")[1]
        job_id = job_id_from(custom, tag)
        assert job_id is not None
        assert tag_of[job_batch[job_id]] == tag
        sent_jobs.append(job_id)
    assert sorted(sent_jobs) == sorted(job_batch)


# 7. The listener's connection killed mid-run.


@asynccontextmanager
async def login_role(db: Any) -> AsyncIterator[str]:
    """A superuser login role of this test's own, dropped afterwards whatever happens."""
    role = f"batchd_listener_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
    try:
        yield role
    finally:
        await db.execute(f"ALTER ROLE {role} LOGIN")
        await db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        await db.execute(f"DROP ROLE IF EXISTS {role}")


def url_as(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


async def test_jobs_inserted_while_the_listener_is_cut_off_are_found_when_it_reconnects(
    db: Any,
    database_url: str,
    daemon_settings: Any,
    start_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A dead connection is noticed by the probe; probe often so the test does not wait 15 s for it, and
    # retry the connection often so it does not wait for a long backoff either.
    monkeypatch.setattr(
        batchd.daemon,
        "Listener",
        functools.partial(Listener, probe_interval_s=0.1, probe_timeout_s=5.0, max_backoff_s=0.3),
    )
    failed_connects = 0
    real_connect = asyncpg.connect

    async def counting_connect(*args: Any, **kwargs: Any) -> Any:
        nonlocal failed_connects
        try:
            return await real_connect(*args, **kwargs)
        except asyncpg.PostgresError:
            if kwargs.get("server_settings", {}).get("application_name") == "batchd-listener":
                failed_connects += 1
            raise

    monkeypatch.setattr(asyncpg, "connect", counting_connect)

    async with login_role(db) as role:
        settings = daemon_settings(
            # Every pool connection is opened at start: they keep working while the role may not log in.
            database={"url": url_as(database_url, role), "pool_min_size": 5, "pool_max_size": 5},
            batching={"max_requests": 10, "max_wait_s": OUT_OF_REACH_S},
            daemon={"sweep_interval_s": OUT_OF_REACH_S},
        )
        async with start_daemon(settings) as daemon:
            listener = daemon.listener
            assert listener.reconnects == 0

            async def listener_pids() -> list[int]:
                rows = await db.fetch(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE application_name = 'batchd-listener' AND usename = $1"
                    "   AND datname = current_database()",
                    role,
                )
                return [r["pid"] for r in rows]

            # The flusher's looks at start (one more for the listener's first connection) are over: the jobs
            # below must not be found by one of those.
            await wait_until(lambda: _true(daemon.flusher.waiting), timeout=10)
            (pid,) = await listener_pids()
            await db.execute(f"ALTER ROLE {role} NOLOGIN")
            assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
            await wait_until(lambda: _true(not listener.connected.is_set()), timeout=10)
            assert await listener_pids() == []

            # A batch's worth of jobs whose notification nobody hears.
            await insert_raw(db, "acme", [f"unheard {i}" for i in range(10)])
            seen = failed_connects
            await wait_until(lambda: _true(failed_connects >= seen + 2), timeout=10)
            assert await batch_count(db) == 0, "nothing but the reconnection can find these jobs"
            wakeup = await db.fetchrow("SELECT armed, wake_seq FROM batchd.wakeup")
            assert wakeup["armed"], "the flusher has not looked at the queue since it went idle"

            await db.execute(f"ALTER ROLE {role} LOGIN")
            await wait_until(lambda: _true(listener.connected.is_set()), timeout=10)
            counts = await wait_for_jobs(db, done=10, timeout=30)
            assert listener.reconnects >= 1
            assert len(await listener_pids()) == 1
    assert counts == {"succeeded": 10}
    assert [b["request_count"] for b in await db.fetch("SELECT request_count FROM batchd.batches")] == [10]
    assert not await db.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", role)


# 8. The trigger.


@asynccontextmanager
async def notifications(database_url: str) -> AsyncIterator[Callable[[Any], Awaitable[list[str]]]]:
    """Listens on batchd_jobs; yields `drain(db)`, which sends a marker and returns every payload that
    arrived before it (notifications arrive in commit order, so none of the earlier ones can still come)."""
    connection = await asyncpg.connect(database_url)
    payloads: list[str] = []
    await connection.add_listener(JOBS_CHANNEL, lambda *args: payloads.append(args[3]))

    async def drain(db: Any) -> list[str]:
        marker = f"marker-{uuid.uuid4().hex}"
        await db.execute("SELECT pg_notify($1, $2)", JOBS_CHANNEL, marker)
        await wait_until(lambda: _true(marker in payloads), timeout=10)
        before = payloads[: payloads.index(marker)]
        del payloads[:]
        return before

    try:
        yield drain
    finally:
        await connection.close()


async def test_an_insert_of_ten_thousand_rows_sends_one_notification_when_armed(
    db: Any, database_url: str
) -> None:
    assert (await db.fetchrow("SELECT armed, wake_seq FROM batchd.wakeup"))["armed"]
    async with notifications(database_url) as drain:
        assert await drain(db) == []
        await db.execute(
            "INSERT INTO batchd.jobs (tenant_id, request)"
            " SELECT 'acme', $1::jsonb FROM generate_series(1, 10000)",
            raw_request("one of many"),
        )
        assert await drain(db) == [""]
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 10000


async def test_an_insert_sends_nothing_when_the_daemon_waits_for_more(db: Any, database_url: str) -> None:
    await db.execute("UPDATE batchd.wakeup SET armed = false, wake_seq = 1000000000")
    async with notifications(database_url) as drain:
        await insert_raw(db, "acme", ["one"])
        await insert_raw(db, "acme", [f"many {i}" for i in range(100)])
        assert await drain(db) == []


async def test_an_insert_reaching_wake_seq_sends_one_notification(db: Any, database_url: str) -> None:
    async with notifications(database_url) as drain:
        await insert_raw(db, "acme", [f"first {i}" for i in range(5)])  # seq 1..5
        await db.execute("UPDATE batchd.wakeup SET armed = false, wake_seq = 8")
        assert await drain(db) == [""], "armed: the first insert notified"
        await insert_raw(db, "acme", ["sixth", "seventh"])  # seq 6, 7: short of wake_seq
        assert await drain(db) == []
        await insert_raw(db, "acme", ["eighth", "ninth"])  # seq 8 reaches it
        assert await drain(db) == [""]


async def test_an_insert_with_a_deadline_sends_one_notification_even_when_not_armed(
    db: Any, database_url: str
) -> None:
    await db.execute("UPDATE batchd.wakeup SET armed = false, wake_seq = 1000000000")
    async with notifications(database_url) as drain:
        await db.execute(
            "INSERT INTO batchd.jobs (tenant_id, request, deadline)"
            " VALUES ('acme', $1, now() + interval '1 hour')",
            raw_request("urgent"),
        )
        assert await drain(db) == [""]
        # One deadline among many rows of one statement: still one notification.
        await db.execute(
            "INSERT INTO batchd.jobs (tenant_id, request, deadline)"
            " SELECT 'acme', $1::jsonb, CASE WHEN i = 50 THEN now() + interval '1 hour' END"
            "   FROM generate_series(1, 100) AS i",
            raw_request("mostly patient"),
        )
        assert await drain(db) == [""]
