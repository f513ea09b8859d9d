"""What a producer may rely on when it writes to batchd.jobs directly: the database enforces the contract."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest
from support import raw_request

INSERT_RAW = "INSERT INTO batchd.jobs (tenant_id, request) VALUES ($1, $2) RETURNING id"


async def test_a_job_needs_exactly_one_of_request_and_job_type(db: Any) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as neither:
        await db.execute("INSERT INTO batchd.jobs (tenant_id) VALUES ('t')")
    assert neither.value.constraint_name == "jobs_request_or_job_type"
    with pytest.raises(asyncpg.CheckViolationError) as both:
        await db.execute(
            "INSERT INTO batchd.jobs (tenant_id, request, job_type, input) VALUES ('t', $1, 'classify', $2)",
            raw_request("hello"),
            {"text": "hello", "categories": ["a", "b"]},
        )
    assert both.value.constraint_name == "jobs_request_or_job_type"
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 0


async def test_input_without_a_job_type_is_refused(db: Any) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await db.execute(
            "INSERT INTO batchd.jobs (tenant_id, request, input) VALUES ('t', $1, $2)",
            raw_request("hello"),
            {"text": "hello"},
        )
    assert refused.value.constraint_name == "jobs_input_with_job_type"
    # The same input with a job type (and no request) is fine.
    await db.execute(
        "INSERT INTO batchd.jobs (tenant_id, job_type, input) VALUES ('t', 'classify', $1)", {"text": "hello"}
    )
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 1


async def test_an_empty_tenant_is_refused(db: Any) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(INSERT_RAW, "", raw_request("hello"))
    with pytest.raises(asyncpg.NotNullViolationError):
        await db.execute(INSERT_RAW, None, raw_request("hello"))
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 0


async def test_an_idempotency_key_is_unique_per_tenant(db: Any) -> None:
    insert = (
        "INSERT INTO batchd.jobs (tenant_id, request, idempotency_key) VALUES ($1, $2, 'order-42')"
        " ON CONFLICT DO NOTHING RETURNING id"
    )
    first = await db.fetchval(insert, "acme", raw_request("first"))
    assert first is not None
    retried = await db.fetchval(insert, "acme", raw_request("first, retried"))
    assert retried is None, "a retried INSERT ... ON CONFLICT DO NOTHING makes no second job"
    other_tenant = await db.fetchval(insert, "globex", raw_request("first"))
    assert other_tenant is not None, "the same key is another tenant's own"
    # Without ON CONFLICT, the duplicate is an error, not a silent second job.
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(
            "INSERT INTO batchd.jobs (tenant_id, request, idempotency_key) VALUES ('acme', $1, 'order-42')",
            raw_request("again"),
        )
    rows = await db.fetch("SELECT id, tenant_id, request FROM batchd.jobs ORDER BY seq")
    assert [(r["id"], r["tenant_id"]) for r in rows] == [(first, "acme"), (other_tenant, "globex")]
    assert rows[0]["request"]["messages"][0]["content"] == "first", "the first write stands"
    # Jobs without a key never conflict with each other.
    await db.execute(INSERT_RAW, "acme", raw_request("no key"))
    await db.execute(INSERT_RAW, "acme", raw_request("no key"))
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE idempotency_key IS NULL") == 2


async def test_defaults_of_a_new_job(db: Any) -> None:
    before = await db.fetchval("SELECT now()")
    row = await db.fetchrow(
        "INSERT INTO batchd.jobs (tenant_id, request) VALUES ('t', $1) RETURNING *", raw_request("hello")
    )
    assert isinstance(row["id"], uuid.UUID)
    assert row["status"] == "queued"
    assert row["attempts"] == 0
    assert row["created_at"] is not None
    assert row["created_at"] >= before
    assert row["updated_at"] is not None
    assert row["seq"] >= 1
    for column in ("batch_id", "result", "error", "usage", "params", "submitted_at", "completed_at"):
        assert row[column] is None, column
    second = await db.fetchrow(
        "INSERT INTO batchd.jobs (tenant_id, request) VALUES ('t', $1) RETURNING id, seq",
        raw_request("again"),
    )
    assert second["id"] != row["id"]
    assert second["seq"] > row["seq"], "claim order follows insert order"


async def _insert_with_metadata(db: Any, metadata: dict[str, Any]) -> uuid.UUID:
    job_id: uuid.UUID = await db.fetchval(
        "INSERT INTO batchd.jobs (tenant_id, request, metadata) VALUES ('acme', $1, $2) RETURNING id",
        raw_request("cancel me"),
        metadata,
    )
    return job_id


async def _canceled_events(db: Any) -> list[Any]:
    return list(
        await db.fetch("SELECT type, tenant_id, job_id, data FROM batchd.events WHERE type = 'job.canceled'")
    )


async def test_a_producer_cancels_a_queued_job_with_an_update(db: Any) -> None:
    job_id = await _insert_with_metadata(db, {"order": 7, "note": "by update"})
    status = await db.execute("UPDATE batchd.jobs SET status = 'canceled' WHERE id = $1", job_id)
    assert status == "UPDATE 1"
    job = await db.fetchrow("SELECT status, completed_at FROM batchd.jobs WHERE id = $1", job_id)
    assert job["status"] == "canceled"
    assert job["completed_at"] is not None
    events = await _canceled_events(db)
    assert len(events) == 1
    assert events[0]["tenant_id"] == "acme"
    assert events[0]["job_id"] == job_id
    assert events[0]["data"] == {"status": "canceled", "metadata": {"order": 7, "note": "by update"}}


async def test_a_producer_cancels_a_queued_job_with_cancel_job(db: Any) -> None:
    job_id = await _insert_with_metadata(db, {"order": 8})
    keep = await _insert_with_metadata(db, {"order": 9})
    assert await db.fetchval("SELECT batchd.cancel_job($1)", job_id) is True
    assert await db.fetchval("SELECT status FROM batchd.jobs WHERE id = $1", job_id) == "canceled"
    assert await db.fetchval("SELECT status FROM batchd.jobs WHERE id = $1", keep) == "queued"
    events = await _canceled_events(db)
    assert [(e["job_id"], e["tenant_id"], e["data"]) for e in events] == [
        (job_id, "acme", {"status": "canceled", "metadata": {"order": 8}})
    ]
    # Canceling again changes nothing and writes no second event.
    assert await db.fetchval("SELECT batchd.cancel_job($1)", job_id) is False
    assert len(await _canceled_events(db)) == 1


async def test_cancel_job_of_an_unknown_id_is_false(db: Any) -> None:
    assert await db.fetchval("SELECT batchd.cancel_job($1)", uuid.uuid4()) is False
    assert await _canceled_events(db) == []


async def test_a_submitted_job_cannot_be_canceled(db: Any) -> None:
    job_id = await _insert_with_metadata(db, {"order": 10})
    batch_id = await db.fetchval(
        "INSERT INTO batchd.batches (tag, request_count, bytes, status)"
        " VALUES ('abcdef123456', 1, 100, 'in_progress') RETURNING id"
    )
    await db.execute(
        "UPDATE batchd.jobs SET status = 'submitted', batch_id = $2, submitted_at = now() WHERE id = $1",
        job_id,
        batch_id,
    )
    with pytest.raises(asyncpg.CheckViolationError, match="only a queued job can be canceled") as refused:
        await db.execute("UPDATE batchd.jobs SET status = 'canceled' WHERE id = $1", job_id)
    assert "submitted" in str(refused.value)
    # cancel_job does not pretend either: it answers false and leaves the job on its way.
    assert await db.fetchval("SELECT batchd.cancel_job($1)", job_id) is False
    assert await db.fetchval("SELECT status FROM batchd.jobs WHERE id = $1", job_id) == "submitted"
    assert await _canceled_events(db) == []


GOOD = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != key}


@pytest.mark.parametrize(
    ("request_value", "reason"),
    [
        pytest.param(
            ["not", "an", "object"], "request must be a JSON object of Messages API params", id="array"
        ),
        pytest.param("just text", "request must be a JSON object of Messages API params", id="string"),
        pytest.param(_without("model"), "request lacks model", id="no-model"),
        pytest.param({**GOOD, "model": 5}, "request.model must be a string", id="model-not-string"),
        pytest.param(_without("max_tokens"), "request lacks max_tokens", id="no-max-tokens"),
        pytest.param({**GOOD, "max_tokens": 1.5}, "request.max_tokens must be an integer", id="fractional"),
        pytest.param(
            {**GOOD, "max_tokens": "16"}, "request.max_tokens must be an integer", id="string-tokens"
        ),
        pytest.param(
            {**GOOD, "max_tokens": "lots"}, "request.max_tokens must be an integer", id="word-tokens"
        ),
        pytest.param({**GOOD, "max_tokens": None}, "request.max_tokens must be an integer", id="null-tokens"),
        pytest.param(
            {**GOOD, "max_tokens": 0}, "request.max_tokens must be at least 1 in a batch", id="zero"
        ),
        pytest.param(_without("messages"), "request lacks messages", id="no-messages"),
        pytest.param({**GOOD, "messages": []}, "request.messages must be a non-empty array", id="empty"),
        pytest.param(
            {**GOOD, "messages": "hi"}, "request.messages must be a non-empty array", id="not-array"
        ),
        pytest.param({**GOOD, "stream": True}, "request.stream is not allowed in a batch", id="stream"),
    ],
)
async def test_request_problem_names_what_is_wrong(db: Any, request_value: Any, reason: str) -> None:
    assert await db.fetchval("SELECT batchd.request_problem($1::jsonb)", request_value) == reason


@pytest.mark.parametrize(
    "request_value",
    [
        pytest.param(GOOD, id="minimal"),
        pytest.param({**GOOD, "stream": False}, id="stream-false"),
        pytest.param({**GOOD, "max_tokens": 16.0}, id="integral-number"),
        pytest.param(raw_request("hello", temperature=0.5), id="with-options"),
    ],
)
async def test_request_problem_is_null_for_a_good_request(db: Any, request_value: Any) -> None:
    assert await db.fetchval("SELECT batchd.request_problem($1::jsonb)", request_value) is None
