"""The daemon when things go wrong: bad input, failing requests, lost and refused creates, batches that
vanish, and a daemon stopped (or killed) mid-run. Every job still ends exactly once, and nothing is ever
sent to the provider twice."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import (
    QUICK,
    EmulatorHandle,
    daemon_config,
    daemon_process,
    insert_raw,
    job_counts,
    log_events,
    raw_request,
    wait_for_jobs,
    wait_until,
)

from batchd.emulator import EmulatorConfig


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


def hex_id(job_id: Any) -> str:
    return uuid.UUID(str(job_id)).hex


async def sends_per_job(emulator: EmulatorHandle) -> Counter[str]:
    """How many times the provider received each job, whatever batch it was in: custom_ids are
    `bd-<batch tag>-<job uuid hex>`, so the job is the part after the last dash."""
    received = (await emulator.admin("GET", "custom_ids"))["custom_ids"]
    per_job: Counter[str] = Counter()
    for custom_id, times in received.items():
        prefix, tag, job = custom_id.split("-")
        assert prefix == "bd"
        assert len(tag) == 12
        per_job[job] += times
    return per_job


async def events_per_job(db: Any) -> dict[str, Counter[str]]:
    """job id (hex) -> how many events of each type it has."""
    per_job: dict[str, Counter[str]] = {}
    for row in await db.fetch("SELECT job_id, type FROM batchd.events WHERE job_id IS NOT NULL"):
        per_job.setdefault(hex_id(row["job_id"]), Counter())[row["type"]] += 1
    return per_job


async def insert_jobs(db: Any, rows: list[tuple[str | None, str | None, str | None, str]]) -> dict[str, Any]:
    """Inserts (request JSON, job_type, input JSON, label) rows in one statement, in order, each with
    {"case": label} as metadata; returns label -> job id."""
    inserted = await db.fetch(
        "INSERT INTO batchd.jobs (tenant_id, request, job_type, input, metadata)"
        " SELECT 'acme', r::jsonb, t, i::jsonb, jsonb_build_object('case', l)"
        "   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS x (r, t, i, l, n)"
        "  ORDER BY n"
        " RETURNING id, metadata ->> 'case' AS label",
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
    )
    ids = {row["label"]: row["id"] for row in inserted}
    assert len(ids) == len(rows), "labels are unique"
    return ids


async def wait_until_all_done(db: Any, jobs: int, timeout: float = 60) -> dict[str, int]:
    """Every job final and every batch closed: a batch is marked applied a moment after its jobs."""
    counts = await wait_for_jobs(db, done=jobs, timeout=timeout)

    async def no_open_batch() -> bool:
        return not await db.fetchval(
            "SELECT count(*) FROM batchd.batches WHERE status IN ('pending', 'in_progress', 'ended')"
        )

    await wait_until(no_open_batch, timeout=30)
    return counts


def raw(**params: Any) -> str:
    return json.dumps(raw_request("a well-formed question", **params))


def without(key: str) -> str:
    body = raw_request("a question missing a part")
    del body[key]
    return json.dumps(body)


LONG_PROMPT = " ".join(f"word{i}" for i in range(1700))  # about 10 KB, and not a run that compresses away

# label -> (request, job_type, input, what error.message must say)
BAD_JOBS: dict[str, tuple[str | None, str | None, str | None, str]] = {
    "unknown job type": (None, "translate", '{"text": "hola"}', "unknown job type 'translate'"),
    "missing template field": (
        None,
        "summarize",
        '{"document_text": "a document"}',
        "input lacks max_length, required by job type 'summarize'",
    ),
    "no input at all": (None, "classify", None, "input lacks text, categories"),
    "input is a list": (None, "classify", '["text", "categories"]', "must be a JSON object"),
    "input is a string": (None, "summarize", '"summarise this"', "must be a JSON object"),
    "too large for any batch": (
        json.dumps(raw_request(LONG_PROMPT)),
        None,
        None,
        "more than a batch may hold (4081 bytes)",
    ),
    "params a string": ('"What is the capital of France?"', None, None, "must be a JSON object"),
    "params a list": (json.dumps([raw_request("x")]), None, None, "must be a JSON object"),
    "params null": ("null", None, None, "must be a JSON object"),
    "no model": (without("model"), None, None, "request lacks model"),
    "model not a string": (raw(model=42), None, None, "request.model must be a string"),
    "no max_tokens": (without("max_tokens"), None, None, "request lacks max_tokens"),
    "max_tokens 0": (raw(max_tokens=0), None, None, "max_tokens must be at least 1"),
    "max_tokens a string": (raw(max_tokens="many"), None, None, "max_tokens must be an integer"),
    "max_tokens a fraction": (raw(max_tokens=1.5), None, None, "max_tokens must be an integer"),
    "no messages": (without("messages"), None, None, "request lacks messages"),
    "messages empty": (raw(messages=[]), None, None, "messages must be a non-empty array"),
    "stream true": (raw(stream=True), None, None, "stream is not allowed in a batch"),
}


async def test_every_bad_input_fails_at_once_with_its_reason_and_the_good_jobs_still_succeed(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    # Batches take an emulated hour: a job that fails before then failed without any batch ending.
    await emulator.admin("PATCH", "settings", {"processing_time_s": [3600, 3600]})
    rows: list[tuple[str | None, str | None, str | None, str]] = []
    good: list[str] = []
    for i, (label, (request, job_type, input_, _)) in enumerate(BAD_JOBS.items()):
        # Bad jobs sit between good ones in the queue, so they are claimed into the same flushes.
        for j in range(2):
            good.append(f"good {i}.{j}")
            rows.append(
                (raw(messages=[{"role": "user", "content": f"good question {i}.{j}"}]), None, None, good[-1])
            )
        rows.append((request, job_type, input_, label))
    rows.append((raw(stream=False), None, None, "stream false is allowed"))
    rows.append((None, "summarize", '{"document_text": "doc", "max_length": 5, "extra": 1}', "extra input"))
    good += ["stream false is allowed", "extra input"]

    async with start_daemon(daemon_settings(batching={"max_bytes": 4096})):
        ids = await insert_jobs(db, rows)

        async def bad_failed_and_good_submitted() -> bool:
            counts = await job_counts(db)
            return counts == {"failed": len(BAD_JOBS), "submitted": len(good)}

        await wait_until(bad_failed_and_good_submitted, timeout=30)
        assert (await emulator.stats())["batches_created"] >= 2, "max_bytes 4096 holds ~20 requests a batch"
        await emulator.advance(3601)
        counts = await wait_until_all_done(db, len(rows), timeout=30)
    assert counts == {"failed": len(BAD_JOBS), "succeeded": len(good)}

    jobs = {row["id"]: row for row in await db.fetch("SELECT * FROM batchd.jobs")}
    for label, (_, _, _, reason) in BAD_JOBS.items():
        job = jobs[ids[label]]
        assert job["status"] == "failed", label
        assert job["error"]["type"] == "invalid_request", label
        assert reason in job["error"]["message"], (label, job["error"]["message"])
        assert job["attempts"] == 0, label
        assert job["batch_id"] is None, f"{label}: never put in a batch"
        assert job["completed_at"] is not None, label
        assert job["result"] is None, label
    for label in good:
        job = jobs[ids[label]]
        assert job["status"] == "succeeded", label
        assert job["error"] is None, label

    sent = await sends_per_job(emulator)
    assert sent == {hex_id(ids[label]): 1 for label in good}, "good jobs sent once each, bad ones never"
    events = await events_per_job(db)
    for label in BAD_JOBS:
        assert events[hex_id(ids[label])] == {"job.failed": 1}, label
    for label in good:
        assert events[hex_id(ids[label])] == {"job.submitted": 1, "job.succeeded": 1}, label
    failed_events = await db.fetch("SELECT job_id, data FROM batchd.events WHERE type = 'job.failed'")
    by_job = {row["job_id"]: row["data"] for row in failed_events}
    for label, (_, _, _, reason) in BAD_JOBS.items():
        data = by_job[ids[label]]
        assert data["status"] == "failed"
        assert reason in data["error"]["message"]
        assert data["metadata"] == {"case": label}, "the producer's metadata comes back with the event"


FAULT_ERRORS = {"api_error_rate": "api_error", "expired_rate": "expired"}


@pytest.mark.parametrize("fault", sorted(FAULT_ERRORS))
async def test_a_request_that_keeps_failing_is_retried_until_max_attempts_then_fails(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any, fault: str
) -> None:
    error_type = FAULT_ERRORS[fault]
    await emulator.set_faults(**{fault: 1.0})
    settings = daemon_settings(batching={"max_requests": 100, "max_wait_s": 0.2, "max_attempts": 3})
    async with start_daemon(settings):
        ids = await insert_raw(db, "acme", [f"doomed question {i}" for i in range(20)])
        counts = await wait_until_all_done(db, 20, timeout=60)
    assert counts == {"failed": 20}
    rows = await db.fetch("SELECT id, attempts, error, batch_id, completed_at FROM batchd.jobs")
    for row in rows:
        assert row["attempts"] == 3
        assert row["error"]["type"] == error_type
        assert row["batch_id"] is not None, "the batch of its last attempt"
        assert row["completed_at"] is not None

    sent = await sends_per_job(emulator)
    assert sent == {hex_id(job_id): 3 for job_id in ids}, "each attempt sent once, three attempts each"
    received = (await emulator.admin("GET", "custom_ids"))["custom_ids"]
    tags_per_job: dict[str, set[str]] = {}
    for custom_id, times in received.items():
        assert times == 1, "a retry goes out under a new batch tag, never the same custom_id"
        _, tag, job = custom_id.split("-")
        tags_per_job.setdefault(job, set()).add(tag)
    assert all(len(tags) == 3 for tags in tags_per_job.values())

    events = await events_per_job(db)
    assert set(events) == {hex_id(job_id) for job_id in ids}
    for job_events in events.values():
        assert job_events == {"job.submitted": 3, "job.retrying": 2, "job.failed": 1}
    retrying = await db.fetch(
        "SELECT (data ->> 'attempts')::int AS attempts, data -> 'error' ->> 'type' AS error,"
        " data ->> 'status' AS status FROM batchd.events WHERE type = 'job.retrying'"
    )
    assert Counter(row["attempts"] for row in retrying) == {1: 20, 2: 20}
    assert {(row["error"], row["status"]) for row in retrying} == {(error_type, "queued")}
    final = await db.fetch("SELECT data FROM batchd.events WHERE type = 'job.failed'")
    assert {(row["data"]["attempts"], row["data"]["error"]["type"]) for row in final} == {(3, error_type)}


async def test_a_request_the_provider_calls_invalid_fails_without_a_retry(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    async with start_daemon(daemon_settings()):
        # The database cannot know which models exist: the shape passes, the provider says no.
        bad = await insert_raw(
            db, "acme", [f"ask a model that is not {i}" for i in range(5)], model="claude-nope-1"
        )
        good = await insert_raw(db, "acme", [f"ask a real model {i}" for i in range(5)])
        counts = await wait_until_all_done(db, 10, timeout=30)
    assert counts == {"failed": 5, "succeeded": 5}
    for job_id in bad:
        row = await db.fetchrow("SELECT status, attempts, error FROM batchd.jobs WHERE id = $1", job_id)
        assert row["status"] == "failed"
        assert row["attempts"] == 0, "not retried: sending it again cannot help"
        assert row["error"]["type"] == "invalid_request_error"
        assert "claude-nope-1" in row["error"]["message"]
    sent = await sends_per_job(emulator)
    assert sent == {hex_id(job_id): 1 for job_id in [*bad, *good]}
    assert (await emulator.stats())["batches_created"] == 1, "one batch, bad and good together"
    events = await events_per_job(db)
    for job_id in bad:
        assert events[hex_id(job_id)] == {"job.submitted": 1, "job.failed": 1}


async def test_a_create_whose_response_is_lost_is_adopted_not_sent_twice(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    await emulator.set_faults(lose_create_responses=1)
    async with start_daemon(daemon_settings()):
        ids = await insert_raw(db, "acme", [f"question {i}" for i in range(30)])
        counts = await wait_until_all_done(db, 30, timeout=30)
    assert counts == {"succeeded": 30}
    stats = await emulator.stats()
    assert stats["lost_responses"] == 1, "the fault did fire"
    assert stats["batches_created"] == 1, "the batch made by the lost create is the one used"
    assert stats["duplicate_custom_ids"] == {}
    assert await sends_per_job(emulator) == {hex_id(job_id): 1 for job_id in ids}
    batch = await db.fetchrow("SELECT * FROM batchd.batches")
    assert batch["status"] == "applied"
    assert batch["create_attempts"] == 1, "adopted: never sent again"
    assert batch["request_counts"]["succeeded"] == 30, "the provider's counts, stored as a JSON object"
    submitted = await db.fetch("SELECT data FROM batchd.events WHERE type = 'batch.submitted'")
    assert [row["data"]["adopted"] for row in submitted] == [True]
    assert submitted[0]["data"]["provider_batch_id"] == batch["provider_batch_id"]


async def test_a_500_on_create_is_reconciled_then_sent_again(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    await emulator.set_faults(http=[{"endpoint": "create", "status": 500, "count": 1}])
    # A 500 may come from a gateway while the API goes on with the create: it is sent again only once the
    # create's window (timeout_s + clock_skew_s) has passed with nothing of it in the provider's list.
    settings = daemon_settings(anthropic={"timeout_s": 2}, daemon={"clock_skew_s": 1})
    async with start_daemon(settings):
        ids = await insert_raw(db, "acme", [f"question {i}" for i in range(30)])
        counts = await wait_until_all_done(db, 30, timeout=30)
    assert counts == {"succeeded": 30}
    stats = await emulator.stats()
    assert stats["statuses"].get("create 500") == 1
    assert stats["statuses"].get("create 200") == 1
    # One list is the key's check at start (health.py); the others are the reconciliation's.
    assert stats["calls"].get("list", 0) >= 2, "the provider's batches were listed before sending again"
    assert stats["batches_created"] == 1
    assert stats["duplicate_custom_ids"] == {}
    assert await sends_per_job(emulator) == {hex_id(job_id): 1 for job_id in ids}
    batch = await db.fetchrow("SELECT * FROM batchd.batches")
    assert batch["create_attempts"] == 2, "the same batch row, sent a second time"
    waited = await db.fetchval(
        "SELECT extract(epoch FROM min(j.submitted_at) - b.created_at) FROM batchd.jobs j"
        " JOIN batchd.batches b ON b.id = j.batch_id GROUP BY b.created_at"
    )
    assert waited >= 3, "not before the first create's window (2 s + 1 s) had passed"
    assert batch["request_counts"]["succeeded"] == 30, "the provider's counts, stored as a JSON object"
    submitted = await db.fetch("SELECT data FROM batchd.events WHERE type = 'batch.submitted'")
    assert [row["data"]["adopted"] for row in submitted] == [False]


async def test_a_429_on_create_waits_the_retry_after_then_sends(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    await emulator.set_faults(http=[{"endpoint": "create", "status": 429, "count": 1, "retry_after_s": 2}])
    async with start_daemon(daemon_settings()):
        ids = await insert_raw(db, "acme", [f"question {i}" for i in range(30)])
        counts = await wait_until_all_done(db, 30, timeout=30)
    assert counts == {"succeeded": 30}
    stats = await emulator.stats()
    assert stats["statuses"].get("create 429") == 1
    assert stats["batches_created"] == 1
    assert stats["duplicate_custom_ids"] == {}
    assert await sends_per_job(emulator) == {hex_id(job_id): 1 for job_id in ids}
    waited = await db.fetchval(
        "SELECT min(extract(epoch FROM j.submitted_at - b.created_at))"
        "  FROM batchd.jobs j JOIN batchd.batches b ON b.id = j.batch_id"
    )
    assert waited >= 1.9, "the create was sent again only after the provider's retry-after"
    assert await db.fetchval("SELECT create_attempts FROM batchd.batches") == 2


@pytest.mark.parametrize(
    "emulator_config", [EmulatorConfig(max_body_bytes=20_000, processing_time_s=(0.1, 0.2), seed=7)]
)
async def test_a_413_splits_the_batch_until_each_part_fits(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    # A long lease: the supervisor's lease loop comes round only every 100 s, so a part split off must be
    # taken up as it is made, not when the loop next looks.
    settings = daemon_settings(
        batching={"max_requests": 200, "max_bytes": 10_000_000, "max_wait_s": 0.3}, daemon={"lease_s": 300}
    )
    texts = [f"question {i:03d}: " + "please elaborate at length " * 7 for i in range(200)]
    async with start_daemon(settings):
        ids = await insert_raw(db, "acme", texts)
        counts = await wait_until_all_done(db, 200, timeout=30)
    assert counts == {"succeeded": 200}
    stats = await emulator.stats()
    assert stats["statuses"].get("create 413", 0) >= 3, "200 requests of ~360 bytes: halved at least twice"
    assert stats["batches_created"] >= 4
    assert stats["duplicate_custom_ids"] == {}
    assert await sends_per_job(emulator) == {hex_id(job_id): 1 for job_id in ids}
    rows = await db.fetch("SELECT status, request_count FROM batchd.batches")
    assert {row["status"] for row in rows} == {"applied"}
    assert sum(row["request_count"] for row in rows) == 200


async def test_a_results_download_that_breaks_midway_is_resumed_by_the_batchs_own_task(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    # The connection drops after 50 lines, once. With leases of 10 minutes, a task that died of it would
    # be restarted only at the next renewal, minutes later: the batch's own task must retry the download.
    await emulator.set_faults(results_break_after=50, results_break_count=1)
    settings = daemon_settings(batching={"max_requests": 200, "max_wait_s": 0.2}, daemon={"lease_s": 600})
    await insert_raw(db, "acme", [f"question {i}" for i in range(200)])
    async with start_daemon(settings):
        counts = await wait_for_jobs(db, done=200, timeout=30)
    assert counts == {"succeeded": 200}
    assert (await emulator.stats())["calls"].get("results", 0) >= 2, "the download broke and was retried"


async def test_batches_the_provider_forgot_are_retried_and_succeed(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    await emulator.admin("PATCH", "settings", {"processing_time_s": [3600, 3600]})
    settings = daemon_settings(batching={"max_requests": 20, "max_wait_s": 0.2})
    async with start_daemon(settings):
        ids = await insert_raw(db, "acme", [f"question {i}" for i in range(40)])

        async def all_submitted() -> bool:
            return await job_counts(db) == {"submitted": 40}

        await wait_until(all_submitted, timeout=30)
        assert await db.fetchval("SELECT count(*) FROM batchd.batches WHERE status = 'in_progress'") == 2
        # The provider loses every batch (as if deleted behind batchd's back), and gets quick again.
        await emulator.admin("POST", "reset")
        await emulator.admin("PATCH", "settings", {"processing_time_s": [0.1, 0.3]})
        counts = await wait_until_all_done(db, 40, timeout=60)
    assert counts == {"succeeded": 40}
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE attempts = 1") == 40
    vanished = await db.fetch(
        "SELECT status FROM batchd.batches WHERE (request_counts ->> 'vanished')::boolean"
    )
    assert [row["status"] for row in vanished] == ["applied", "applied"]
    # Since the reset the provider has seen each job exactly once more.
    assert await sends_per_job(emulator) == {hex_id(job_id): 1 for job_id in ids}
    events = await events_per_job(db)
    for job_id in ids:
        assert events[hex_id(job_id)] == {"job.submitted": 2, "job.retrying": 1, "job.succeeded": 1}


# -- the real daemon, as a process, stopped and killed ----------------------------------------------------


async def in_progress_batches(db: Any) -> int:
    return int(await db.fetchval("SELECT count(*) FROM batchd.batches WHERE status = 'in_progress'"))


@pytest.mark.slow
async def test_sigterm_mid_run_then_a_restart_finishes_every_job_once(
    db: Any, emulator: EmulatorHandle, database_url: str, tmp_path: Path
) -> None:
    await emulator.admin("PATCH", "settings", {"processing_time_s": [2.0, 4.0]})
    config = daemon_config(tmp_path / "batchd.toml", database_url, emulator.url)
    log = tmp_path / "daemon.log"
    ids = await insert_raw(db, "acme", [f"question {i}" for i in range(500)])
    async with daemon_process(config, log) as first:

        async def some_in_flight() -> bool:
            return await in_progress_batches(db) >= 1

        await wait_until(some_in_flight, timeout=30)
        first.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.wait(), timeout=10) == 0
    assert log_events(log)["daemon.stopped"] == 1
    done = await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE status = 'succeeded'")
    assert done < 500, "stopped mid-run: work was left for the restart"
    # The leases were handed back: a new daemon need not wait for them to run out.
    held = await db.fetchval(
        "SELECT count(*) FROM batchd.batches WHERE status IN ('pending', 'in_progress', 'ended')"
        " AND lease_until > now()"
    )
    assert held == 0

    await emulator.admin("PATCH", "settings", {"processing_time_s": [0.1, 0.3]})
    async with daemon_process(config, log) as second:
        counts = await wait_until_all_done(db, 500, timeout=90)
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), timeout=10) == 0
    assert counts == {"succeeded": 500}
    stats = await emulator.stats()
    assert stats["duplicate_custom_ids"] == {}
    assert await sends_per_job(emulator) == {hex_id(job_id): 1 for job_id in ids}, "each job sent once"
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE attempts <> 0") == 0


@pytest.mark.slow
async def test_sigkill_after_creates_went_unanswered_then_a_restart_adopts_them(
    db: Any, emulator: EmulatorHandle, database_url: str, tmp_path: Path
) -> None:
    # Every create is made at the provider but its answer is lost, and batchd waits a while before it
    # reconciles: killed now, the database holds batches that may or may not exist, and some never sent.
    # The batches made take 20-22 s: the restarted daemon finds several of the same size still running, even
    # on a loaded machine where its start and the reconcile grace take several seconds.
    await emulator.set_faults(lose_create_responses=1000)
    await emulator.admin("PATCH", "settings", {"processing_time_s": [20, 22]})
    config = daemon_config(
        tmp_path / "batchd.toml", database_url, emulator.url, daemon={"reconcile_grace_s": 3}
    )
    log = tmp_path / "daemon.log"
    ids = await insert_raw(db, "acme", [f"question {i}" for i in range(300)])
    async with daemon_process(config, log) as first:

        async def two_made() -> bool:
            created: int = (await emulator.stats())["batches_created"]
            return created >= 2

        await wait_until(two_made, timeout=30)
        first.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(first.wait(), timeout=10) == -signal.SIGKILL
    assert log_events(log)["daemon.stopped"] == 0, "killed, not stopped"
    made = (await emulator.stats())["batches_created"]
    maybe_made = await db.fetchval(
        "SELECT count(*) FROM batchd.batches"
        " WHERE status = 'pending' AND create_attempted_at IS NOT NULL AND provider_batch_id IS NULL"
    )
    assert maybe_made >= 2, "batches were killed in the 'maybe created' state"
    assert await db.fetchval("SELECT count(*) FROM batchd.batches WHERE provider_batch_id IS NOT NULL") == 0
    await emulator.set_faults()
    await emulator.admin("PATCH", "settings", {"processing_time_s": [0.1, 0.3]})

    async with daemon_process(config, log) as second:
        counts = await wait_until_all_done(db, 300, timeout=90)
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), timeout=10) == 0
    assert counts == {"succeeded": 300}
    stats = await emulator.stats()
    assert stats["duplicate_custom_ids"] == {}
    assert await sends_per_job(emulator) == {hex_id(job_id): 1 for job_id in ids}, "each job sent once"
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE attempts <> 0") == 0
    # Several batches of the same size were made unanswered: none could be told from the others until it
    # ended, when its results named its batch. Each was adopted once, by its own batch: no guess, no resend.
    events = log_events(log)
    assert events["batch.reconcile_waiting"] >= 1, "the restarted daemon met candidates still running"
    assert events["batch.not_ours"] == 0, "never adopted a batch that was not its own"
    submitted = dict(
        await db.fetch(
            "SELECT (data ->> 'adopted')::boolean, count(*) FROM batchd.events"
            " WHERE type = 'batch.submitted' GROUP BY 1"
        )
    )
    assert submitted.get(True, 0) >= made, "every batch made before the kill was adopted"
    assert sum(submitted.values()) == stats["batches_created"], "each provider batch recorded once"
    applied = await db.fetch(
        "SELECT status, provider_batch_id FROM batchd.batches WHERE provider_batch_id IS NOT NULL"
    )
    assert {row["status"] for row in applied} == {"applied"}
    assert len(applied) == stats["batches_created"], "every provider batch belongs to exactly one of ours"
    for row in await db.fetch("SELECT request, result FROM batchd.jobs"):
        assert f"to: {row['request']['messages'][0]['content']} [crc32" in row["result"]["content"][0]["text"]
