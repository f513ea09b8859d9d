"""How a results line becomes a row to apply: the fast path for compact successes, and the sure one."""

from __future__ import annotations

import json
from typing import Any, cast
from uuid import uuid4

import pytest
from support import make_settings

from batchd import results, store
from batchd.context import Context
from batchd.provider import Provider
from batchd.templates import custom_id

TAG = "abcdefghij12"
MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "content": [{"type": "text", "text": "hi"}],
    "usage": {"input_tokens": 3},
}


def line(job: Any, result: dict[str, Any], *, compact: bool = True) -> bytes:
    value = {"custom_id": custom_id(TAG, job), "result": result}
    return json.dumps(value, separators=(",", ":") if compact else (", ", ": ")).encode()


def test_a_compact_success_is_cut_out_as_text_not_parsed() -> None:
    job = uuid4()
    row = results.classify(line(job, {"type": "succeeded", "message": MESSAGE}), TAG)
    assert row is not None
    assert row[:2] == (job, "succeeded")
    assert json.loads(row[2] or "") == MESSAGE
    assert row[2] == json.dumps(MESSAGE, separators=(",", ":")), "the provider's own text, untouched"


def test_any_other_form_is_parsed_to_the_same_outcome() -> None:
    job = uuid4()
    spaced = results.classify(line(job, {"type": "succeeded", "message": MESSAGE}, compact=False), TAG)
    reordered = results.classify(
        json.dumps(
            {"result": {"message": MESSAGE, "type": "succeeded"}, "custom_id": custom_id(TAG, job)}
        ).encode(),
        TAG,
    )
    for row in (spaced, reordered):
        assert row is not None
        assert row[:2] == (job, "succeeded")
        assert json.loads(row[2] or "") == MESSAGE


@pytest.mark.parametrize(
    ("result", "outcome", "error_type"),
    [
        (
            {
                "type": "errored",
                "error": {"type": "error", "error": {"type": "invalid_request_error", "message": "x"}},
            },
            "failed",
            "invalid_request_error",
        ),
        (
            {"type": "errored", "error": {"type": "error", "error": {"type": "api_error", "message": "x"}}},
            "retry",
            "api_error",
        ),
        (
            {
                "type": "errored",
                "error": {"type": "error", "error": {"type": "overloaded_error", "message": "x"}},
            },
            "retry",
            "overloaded_error",
        ),
        ({"type": "expired"}, "retry", "expired"),
        ({"type": "canceled"}, "retry", "canceled"),
        ({"type": "something_new"}, "retry", "something_new"),
    ],
)
def test_other_results(result: dict[str, Any], outcome: str, error_type: str) -> None:
    job = uuid4()
    row = results.classify(line(job, result), TAG)
    assert row is not None
    assert row[1] == outcome
    assert row[2] is None
    assert json.loads(row[3] or "")["type"] == error_type


def test_lines_of_other_batches_are_not_ours() -> None:
    other = custom_id("zzzzzzzzzzzz", uuid4())
    compact = json.dumps(
        {"custom_id": other, "result": {"type": "succeeded", "message": MESSAGE}}, separators=(",", ":")
    )
    assert results.classify(compact.encode(), TAG) is None
    assert results.classify(b'{"custom_id": "someone-elses", "result": {"type": "expired"}}', TAG) is None


async def test_a_line_that_only_looks_compact_is_caught_by_the_database_and_parsed(
    db: Any, database_url: str
) -> None:
    # An extra key after the message: the cut-out text is not JSON; the cast fails; the chunk is re-parsed.
    batch_id = await db.fetchval(
        "INSERT INTO batchd.batches (tag, request_count, bytes, status, owner)"
        " VALUES ($1, 1, 1, 'ended', 'batchd-test00000000') RETURNING id",
        TAG,
    )
    job = await db.fetchval(
        "INSERT INTO batchd.jobs (tenant_id, request, status, batch_id) VALUES ('t', '{}', 'submitted', $1)"
        " RETURNING id",
        batch_id,
    )
    raw = (
        b'{"custom_id":"'
        + custom_id(TAG, job).encode()
        + b'","result":{"type":"succeeded","message":'
        + json.dumps(MESSAGE, separators=(",", ":")).encode()
        + b',"extra":{"note":1}}}'
    )
    row = results.classify(raw, TAG)
    assert row is not None
    with pytest.raises(json.JSONDecodeError):
        json.loads(row[2] or "")
    pool = await store.create_pool(database_url, max_size=2)
    try:
        ctx = Context(
            pool=pool,
            settings=make_settings(database_url, "http://unused"),
            provider=cast("Provider", None),  # applying a chunk never calls the API
            instance_id="batchd-test00000000",  # the batch's lease holder: results apply only under it
        )
        batch = await store.get_batch(pool, batch_id)
        assert batch is not None
        await results._apply_chunk(ctx, batch, [row], [raw])
    finally:
        await pool.close()
    job_row = await db.fetchrow("SELECT status, result, usage FROM batchd.jobs WHERE id = $1", job)
    assert job_row["status"] == "succeeded"
    assert job_row["result"] == MESSAGE
    assert job_row["usage"] == {"input_tokens": 3}, "usage is taken from the message by the database"
