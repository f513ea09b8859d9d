"""The daemon end to end: producers INSERT; batchd batches, submits, polls and stores each result."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from support import QUICK, EmulatorHandle, insert_raw, wait_for_jobs, wait_until

from batchd.emulator import EmulatorConfig


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


@pytest.mark.slow
async def test_2000_jobs_from_three_tenants_each_get_their_own_result(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    settings = daemon_settings(batching={"max_requests": 300, "max_wait_s": 0.3})
    expected: dict[str, str] = {}  # job id -> text its result must echo
    async with start_daemon(settings):
        for tenant in ("acme", "globex", "initech"):
            raw = 224 if tenant == "acme" else 222  # 3 x 222 of each kind, and 2 more: 2,000
            texts = [f"{tenant} raw question {i}" for i in range(raw)]
            for job_id, text in zip(await insert_raw(db, tenant, texts), texts, strict=True):
                expected[str(job_id)] = text
            summarize = await db.fetch(
                "INSERT INTO batchd.jobs (tenant_id, job_type, input, metadata)"
                " SELECT $1, 'summarize', jsonb_build_object('document_text', $1 || ' document ' || i,"
                "        'max_length', 50), jsonb_build_object('n', i)"
                " FROM generate_series(1, 222) AS i RETURNING id, input",
                tenant,
            )
            expected.update({str(r["id"]): r["input"]["document_text"] for r in summarize})
            classify = await db.fetch(
                "INSERT INTO batchd.jobs (tenant_id, job_type, input)"
                " SELECT $1, 'classify', jsonb_build_object('text', $1 || ' complaint ' || i,"
                "        'categories', jsonb_build_array('praise', 'complaint'))"
                " FROM generate_series(1, 222) AS i RETURNING id, input",
                tenant,
            )
            expected.update({str(r["id"]): r["input"]["text"] for r in classify})
        assert len(expected) == 2000
        counts = await wait_for_jobs(db, done=2000, timeout=120)

        async def all_applied() -> bool:
            # The last batch's batch.ended events come just after its jobs' results.
            return not await db.fetchval(
                "SELECT count(*) FROM batchd.batches WHERE status IN ('pending', 'in_progress', 'ended')"
            )

        await wait_until(all_applied)
    assert counts == {"succeeded": 2000}
    rows = await db.fetch(
        "SELECT id, tenant_id, result, usage, metadata, job_type, batch_id FROM batchd.jobs"
    )
    for row in rows:
        text = row["result"]["content"][0]["text"]
        assert expected[str(row["id"])] in text, "the result answers this job's own request"
        assert row["usage"]["output_tokens"] > 0
        assert row["result"]["usage"] == row["usage"]
        assert row["tenant_id"] in text
    summarize_meta = [row["metadata"] for row in rows if row["job_type"] == "summarize"]
    assert all(isinstance(m["n"], int) for m in summarize_meta), "metadata comes back untouched"
    stats = await emulator.stats()
    assert stats["requests_received"] == 2000, "every job sent once"
    assert stats["duplicate_custom_ids"] == {}
    events = {
        row["type"]: row["n"]
        for row in await db.fetch("SELECT type, count(*) AS n FROM batchd.events GROUP BY type")
    }
    batches = await db.fetchval("SELECT count(*) FROM batchd.batches WHERE status = 'applied'")
    # A batch event per tenant with jobs in the batch: each tenant hears only of its own share.
    shares = await db.fetch(
        "SELECT tenant_id, sum(requests) AS n FROM batchd.batch_tenants GROUP BY tenant_id"
    )
    assert {row["tenant_id"]: row["n"] for row in shares} == dict(Counter(row["tenant_id"] for row in rows))
    share_count = await db.fetchval("SELECT count(*) FROM batchd.batch_tenants")
    assert events == {
        "job.submitted": 2000,
        "job.succeeded": 2000,
        "batch.submitted": share_count,
        "batch.ended": share_count,
    }
    assert batches >= 2000 // 300


async def test_a_rendered_job_stores_the_params_it_was_sent_with(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    async with start_daemon(daemon_settings()):
        await db.execute(
            "INSERT INTO batchd.jobs (tenant_id, job_type, input) VALUES ('t', 'classify', $1)",
            {"text": "Where is my parcel?", "categories": ["question", "praise"]},
        )
        await wait_for_jobs(db, done=1)
    row = await db.fetchrow("SELECT status, params, result FROM batchd.jobs")
    assert row["status"] == "succeeded"
    assert row["params"]["messages"][0]["content"] == (
        "Categories: question, praise. Text: Where is my parcel?. Category:"
    )
    assert row["params"]["model"] == "claude-haiku-4-5"
    assert json.dumps(row["params"]["messages"][0]["content"])[1:20] in json.dumps(row["result"])


async def test_the_providers_copy_is_deleted_once_results_are_applied(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    settings = daemon_settings(results={"delete_after_apply": True}, batching={"max_requests": 10})
    async with start_daemon(settings):
        await insert_raw(db, "t", [f"question {i}" for i in range(30)])
        await wait_for_jobs(db, done=30)

        async def all_deleted() -> bool:
            deleted: bool = await db.fetchval(
                "SELECT count(*) = 0 FROM batchd.batches WHERE provider_deleted_at IS NULL"
            )
            return deleted

        await wait_until(all_deleted, timeout=30)
    assert await db.fetchval("SELECT count(*) FROM batchd.batches WHERE status = 'applied'") == 3
    assert emulator.state.store.page(limit=10, before_id=None, after_id=None, now=0)[0] == []
    assert (await emulator.stats())["calls"]["delete"] == 3
