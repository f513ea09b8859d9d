"""`POST /v1/jobs`: producers' INSERT over HTTP, against a daemon in this process and real Postgres. The
same checks as `batchd enqueue` (and the database's), all or nothing, idempotent by key, a tenant's token
writing that tenant's jobs only, and the limits."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from support import ADMIN_TOKEN, raw_request, wait_until

from batchd.daemon import Daemon

MAX_POST_BYTES = 20_000
MAX_POST_JOBS = 5
# No flush while a test runs: its jobs stay queued (max_queued counts them), whatever the test takes.
MAX_WAIT_S = 3600.0


@pytest.fixture
async def url(
    db: Any, tokens: dict[str, str], daemon_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    monkeypatch.setenv("BATCHD_ADMIN_TOKEN", ADMIN_TOKEN)
    settings = daemon_settings(
        http={"max_post_bytes": MAX_POST_BYTES, "max_post_jobs": MAX_POST_JOBS},
        batching={"max_requests": 100, "max_wait_s": MAX_WAIT_S},
    )
    daemon = Daemon(settings)
    async with daemon.running():
        assert daemon.http_url is not None
        yield daemon.http_url


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: Any,
    token: str | None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    sent = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    async with session.post(f"{url}/v1/jobs", data=data, headers=sent) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json(), response.headers


def job(text: str = "hello", **members: Any) -> dict[str, Any]:
    return {"request": raw_request(text), **members}


async def jobs_of(db: Any) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT id, tenant_id, idempotency_key, metadata::text, route, status, request ->> 'max_tokens' AS m"
        " FROM batchd.jobs ORDER BY seq"
    )
    return [dict(row) for row in rows]


async def test_one_job_is_accepted_with_its_id_and_location(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    # Numbers arrive as written: metadata's big integer is not rounded through a double.
    body = '{"request": %s, "metadata": {"n": 12345678901234567890123}, "route": "auto", "deadline": "2h"}'
    status, answer, headers = await post(session, url, body % json.dumps(raw_request("hi")), tokens["acme"])
    assert status == 202, answer
    assert answer["enqueued"] is True
    assert headers["Location"] == f"/v1/jobs/{answer['id']}"
    [row] = await jobs_of(db)
    assert str(row["id"]) == answer["id"]
    assert (row["tenant_id"], row["route"], row["status"]) == ("acme", "auto", "queued")
    assert row["metadata"] == '{"n": 12345678901234567890123}'
    # And the tenant reads it back where Location says.
    async with session.get(
        f"{url}{headers['Location']}", headers={"Authorization": f"Bearer {tokens['acme']}"}
    ) as response:
        assert response.status == 200
        assert (await response.json())["id"] == answer["id"]


async def test_a_job_type_and_a_list_are_accepted_in_order(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    jobs = [
        {"job_type": "classify", "input": {"text": "late invoice", "categories": ["a", "b"]}},
        job("second", idempotency_key="k-2"),
        job("third"),
    ]
    status, answer, headers = await post(session, url, jobs, tokens["globex"])
    assert status == 202, answer
    assert "Location" not in headers
    ids = [item["id"] for item in answer["jobs"]]
    assert [item["enqueued"] for item in answer["jobs"]] == [True, True, True]
    assert [str(row["id"]) for row in await jobs_of(db)] == ids
    assert {row["tenant_id"] for row in await jobs_of(db)} == {"globex"}


async def test_a_retried_post_returns_the_same_ids_and_adds_nothing(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    key = {"Idempotency-Key": "order-1234"}
    first = await post(session, url, job(), tokens["acme"], key)
    again = await post(session, url, job(), tokens["acme"], key)
    assert first[0] == again[0] == 202
    assert again[1] == {"id": first[1]["id"], "enqueued": False}
    assert again[2]["Location"] == first[2]["Location"]
    # The header is the job's idempotency key: the same key in the body is the same job.
    in_body = await post(session, url, job(idempotency_key="order-1234"), tokens["acme"])
    assert in_body[1]["id"] == first[1]["id"]

    # A list: each job's key, one of them already held, one twice in the list.
    jobs = [job(idempotency_key="order-1234"), job(idempotency_key="new"), job(idempotency_key="new")]
    status, answer, _ = await post(session, url, jobs, tokens["acme"])
    assert status == 202
    assert answer["jobs"][0] == {"id": first[1]["id"], "enqueued": False}
    assert answer["jobs"][1]["enqueued"] is True
    assert answer["jobs"][2] == {"id": answer["jobs"][1]["id"], "enqueued": False}
    retried = await post(session, url, jobs, tokens["acme"])
    assert [item["id"] for item in retried[1]["jobs"]] == [item["id"] for item in answer["jobs"]]
    assert not any(item["enqueued"] for item in retried[1]["jobs"])
    assert [row["idempotency_key"] for row in await jobs_of(db)] == ["order-1234", "new"]

    # Keys are per tenant: globex's job with acme's key is a job of its own.
    other = await post(session, url, job(), tokens["globex"], key)
    assert other[1]["enqueued"] is True
    assert other[1]["id"] != first[1]["id"]


async def test_concurrent_posts_of_one_key_make_one_job(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    """Retries that overlap (a client that timed out and sent again): the INSERTs conflict in the database,
    the later ones wait for the first to commit, skip, and answer its id."""
    key = {"Idempotency-Key": "overlapping"}
    answers = await asyncio.gather(*(post(session, url, job(), tokens["acme"], key) for _ in range(8)))
    assert {status for status, _, _ in answers} == {202}
    assert len({answer["id"] for _, answer, _ in answers}) == 1
    assert sum(answer["enqueued"] for _, answer, _ in answers) == 1
    assert len(await jobs_of(db)) == 1


async def test_a_list_with_a_bad_job_adds_none_and_names_each_bad_one(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    jobs = [
        job("fine"),
        {"request": {**raw_request("x"), "max_tokens": 0}},
        job("fine too"),
        {"job_type": "summarize", "input": {"document_text": "no max_length"}},
        {"job_type": "nope", "input": {}},
        job(route="later"),
    ]
    status, answer, _ = await post(session, url, jobs[:5], tokens["acme"])
    assert status == 400
    assert answer["error"]["problems"] == [
        {"index": 1, "field": "request", "message": "request.max_tokens must be at least 1 in a batch"},
        {
            "index": 3,
            "field": "input",
            "message": "input lacks max_length, required by job type 'summarize'",
        },
        {
            "index": 4,
            "field": "job_type",
            "message": "unknown job type 'nope' (known: classify, summarize)",
        },
    ]
    assert answer["error"]["message"].startswith("job 1: request.max_tokens must be at least 1")
    status, answer, _ = await post(session, url, jobs[5], tokens["acme"])
    assert status == 400
    assert answer["error"]["problems"][0]["field"] == "route"
    assert await jobs_of(db) == []


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ("{", None, "not JSON"),
        ('[{"request": {}} {"request": {}}]', None, "after job 1: expected `,` or `]`"),
        ("[]", None, "the array holds no job"),
        ("[1] 2", None, "the body goes on after its JSON array"),
        ('"a job"', None, "a job must be a JSON object"),
        ('{"request": {"model": "m"}, "job_type": "classify"}', "request", "either `request`"),
        ('{"request": {"model": "m", "max_tokens": 5, "messages": [], "stream": true}}', "request", ""),
        ('{"request": {"model": 1}}', "request", "request.model must be a string"),
        ('{"job_type": "classify", "input": {"text": 1, "categories": 2}, "metadata": []}', "metadata", ""),
        ('{"request": {}, "deadline": "tomorrow"}', "deadline", "neither an ISO 8601 time"),
        ('{"request": {}, "deadline": "2026-12-01T12:00:00"}', "deadline", "must carry a time zone"),
        ('{"request": {}, "idempotency_key": 7}', "idempotency_key", "must be a string"),
        ('{"request": {"model": "m", "max_tokens": 1, "messages": [1], "x": "\\u0000"}}', None, "\\u0000"),
    ],
)
async def test_a_bad_job_is_refused_naming_its_field(
    db: Any,
    tokens: dict[str, str],
    url: str,
    session: aiohttp.ClientSession,
    *,
    body: str,
    field: Any,
    message: str,
) -> None:
    status, answer, _ = await post(session, url, body, tokens["acme"])
    assert status == 400, answer
    assert message in answer["error"]["message"]
    if "problems" in answer["error"]:
        assert answer["error"]["problems"][0]["field"] == field
        assert answer["error"]["problems"][0]["index"] == 0
    assert await jobs_of(db) == []


async def test_a_body_may_not_set_what_only_batchd_writes(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    """The daemon's pool role is trusted by the database with every column: the HTTP path refuses them
    itself, as jobs_guard_insert refuses a producer's INSERT."""
    batchd_only: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "seq": 1,
        "status": "succeeded",
        "attempts": 3,
        "batch_id": str(uuid.uuid4()),
        "params": {},
        "result": {"content": []},
        "error": {"type": "x"},
        "usage": {"input_tokens": 1},
        "created_at": "2020-01-01T00:00:00Z",
        "completed_at": "2020-01-01T00:00:00Z",
        "path": "sync",
        "path_reason": "forged",
        "sync_owner": "me",
        "not_before": "2030-01-01T00:00:00Z",
    }
    for column, value in batchd_only.items():
        status, answer, _ = await post(session, url, job(**{column: value}), tokens["acme"])
        assert status == 400, column
        assert answer["error"]["problems"][0]["field"] == column
        assert column in answer["error"]["message"]
    assert await jobs_of(db) == []


async def test_a_tenant_never_writes_another_tenants_jobs(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    status, answer, _ = await post(session, url, job(tenant_id="globex"), tokens["acme"])
    assert status == 403
    assert "acme" in answer["error"]["message"]
    # One such job in a list refuses the list.
    status, _, _ = await post(session, url, [job(), job(tenant_id="globex")], tokens["acme"])
    assert status == 403
    # Naming its own tenant is allowed.
    status, _, _ = await post(session, url, job(tenant_id="acme"), tokens["acme"])
    assert status == 202
    assert [row["tenant_id"] for row in await jobs_of(db)] == ["acme"]


async def test_the_admin_names_each_jobs_tenant(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    status, answer, _ = await post(session, url, job(), ADMIN_TOKEN)
    assert status == 400
    assert answer["error"]["problems"][0]["field"] == "tenant_id"
    status, answer, _ = await post(
        session, url, [job(tenant_id="acme"), job(tenant_id="initech")], ADMIN_TOKEN
    )
    assert status == 202, answer
    assert [row["tenant_id"] for row in await jobs_of(db)] == ["acme", "initech"]


async def test_no_token_or_a_bad_one_is_401(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    for token in (None, "bdt_wrong"):
        status, _, headers = await post(session, url, job(), token)
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Bearer realm="batchd"'
    await db.execute("UPDATE batchd.tokens SET revoked_at = now()")
    status, _, _ = await post(session, url, job(), tokens["acme"])
    assert status == 401
    assert await jobs_of(db) == []


async def test_the_limits_on_a_post(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    status, answer, _ = await post(session, url, [job()] * (MAX_POST_JOBS + 1), tokens["acme"])
    assert status == 413
    assert f"at most {MAX_POST_JOBS}" in answer["error"]["message"]
    status, answer, _ = await post(session, url, job("x" * MAX_POST_BYTES), tokens["acme"])
    assert status == 413
    assert "max_post_bytes" in answer["error"]["message"]
    # Sent in chunks, without a Content-Length: refused as it is read.

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_POST_BYTES // 1000 + 1):
            yield b" " * 1000

    headers = {"Authorization": f"Bearer {tokens['acme']}"}
    async with session.post(f"{url}/v1/jobs", data=chunks(), headers=headers) as response:
        assert response.status == 413
    status, answer, _ = await post(session, url, [job()] * MAX_POST_JOBS, tokens["acme"])
    assert status == 202
    assert len(answer["jobs"]) == MAX_POST_JOBS
    status, answer, _ = await post(session, url, job(), tokens["acme"], {"Idempotency-Key": ""})
    assert status == 400
    status, answer, _ = await post(session, url, [job()], tokens["acme"], {"Idempotency-Key": "k"})
    assert status == 400
    assert "goes with one job" in answer["error"]["message"]
    status, answer, _ = await post(
        session, url, job(idempotency_key="a"), tokens["acme"], {"Idempotency-Key": "b"}
    )
    assert status == 400
    status, answer, _ = await post(session, url, b"\xff{}", tokens["acme"])
    assert status == 400
    assert "UTF-8" in answer["error"]["message"]


async def test_a_tenant_at_its_max_queued_is_refused_with_429(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    await db.execute("UPDATE batchd.tenants SET max_queued = 3 WHERE name = 'acme'")
    status, _, _ = await post(session, url, [job(), job()], tokens["acme"])
    assert status == 202
    status, answer, headers = await post(session, url, [job(), job()], tokens["acme"])
    assert status == 429
    assert answer["error"]["message"] == "tenant acme may have at most 3 queued jobs"
    assert "--max-queued" in answer["error"]["hint"]
    assert headers["Retry-After"] == str(math.ceil(MAX_WAIT_S))
    assert len(await jobs_of(db)) == 2, "all or nothing: neither of the two was added"
    status, _, _ = await post(session, url, job(), tokens["acme"])
    assert status == 202
    # Another tenant's queue is its own.
    status, _, _ = await post(session, url, [job(), job()], tokens["globex"])
    assert status == 202


async def get_json(session: aiohttp.ClientSession, url: str, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def pages(
    session: aiohttp.ClientSession, url: str, token: str, query: str = ""
) -> tuple[list[dict[str, Any]], int]:
    """Every job a listing gives, following its cursor; and how many pages it took."""
    jobs, count, cursor = [], 0, None
    while True:
        suffix = "" if cursor is None else f"&cursor={cursor}"
        status, page = await get_json(session, f"{url}/v1/jobs?{query}{suffix}", token)
        assert status == 200, page
        count += 1
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if not page["more"]:
            return jobs, count


async def test_a_tenant_lists_its_own_jobs_a_page_at_a_time(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    _, acme, _ = await post(session, url, [job(str(i), metadata={"i": i}) for i in range(5)], tokens["acme"])
    await post(session, url, [job("g"), job("g")], tokens["globex"])
    _, more, _ = await post(session, url, [job("late", metadata={"i": 5})], tokens["acme"])
    # By the millisecond each was made in; those of one millisecond in their ids' order.
    ids = sorted((item["id"] for item in acme["jobs"] + more["jobs"]), key=uuid.UUID)

    listed, count = await pages(session, url, tokens["acme"], "limit=2")
    assert [item["id"] for item in listed] == ids, "every one of acme's jobs, oldest first, none of globex's"
    assert count == 3
    assert sorted(item["metadata"]["i"] for item in listed) == list(range(6))
    assert {item["tenant_id"] for item in listed} == {"acme"}
    assert "result" not in listed[0]
    assert listed[0]["status"] == "queued"
    async with session.get(
        f"{url}/v1/jobs/{ids[0]}", headers={"Authorization": f"Bearer {tokens['acme']}"}
    ) as one:
        shown = await one.json()
    assert listed[0] == {key: value for key, value in shown.items() if key != "result"}, "as GET shows it"

    # By status: canceled ones only, however few among the others.
    for job_id in ids[1:3]:
        await db.execute("SELECT batchd.cancel_job($1)", uuid.UUID(job_id))
    canceled, _ = await pages(session, url, tokens["acme"], "status=canceled&limit=1")
    assert [item["id"] for item in canceled] == ids[1:3]
    queued, _ = await pages(session, url, tokens["acme"], "status=queued")
    assert [item["id"] for item in queued] == [ids[0], *ids[3:]]

    # The admin sees every tenant's, or one tenant's; a tenant may not ask for another's.
    every, _ = await pages(session, url, ADMIN_TOKEN, "limit=3")
    assert len(every) == 8
    globex, _ = await pages(session, url, ADMIN_TOKEN, "tenant=globex")
    assert {item["tenant_id"] for item in globex} == {"globex"}
    assert len(globex) == 2
    status, answer = await get_json(session, f"{url}/v1/jobs?tenant=globex", tokens["acme"])
    assert status == 403
    assert "acme" in answer["error"]["message"]
    status, _ = await get_json(session, f"{url}/v1/jobs", None)
    assert status == 401


async def test_a_listing_by_status_reads_a_bounded_number_of_jobs(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    """A page filtered by status reads at most LIST_SCAN_FACTOR jobs per job it may hold: a rare status
    among many jobs is reached through pages that are short, even empty, but never a read of the whole
    history."""
    await post(session, url, [job()] * 5, tokens["acme"])
    await post(session, url, [job()] * 5, tokens["acme"])
    await post(session, url, job(), tokens["acme"])
    rows = await db.fetch("SELECT id FROM batchd.jobs ORDER BY id")
    await db.execute("SELECT batchd.cancel_job($1)", rows[-1]["id"])
    status, page = await get_json(session, f"{url}/v1/jobs?status=canceled&limit=1", tokens["acme"])
    assert status == 200
    assert page["jobs"] == []
    assert page["more"] is True
    assert page["next_cursor"] == str(rows[9]["id"])  # LIST_SCAN_FACTOR (10) jobs read, the 10th the cursor
    listed, count = await pages(session, url, tokens["acme"], "status=canceled&limit=1")
    assert [item["id"] for item in listed] == [str(rows[-1]["id"])]
    assert count == 2


async def test_since_starts_a_listing_at_a_time(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    await post(session, url, [job(), job()], tokens["acme"])
    # A job's id carries the millisecond it was made in: `middle` is in a millisecond after the first two
    # jobs' and before the third's.
    await wait_until_later(db, await db.fetchval("SELECT clock_timestamp()"))
    middle = await db.fetchval("SELECT clock_timestamp()")
    await wait_until_later(db, middle)
    _, newer, _ = await post(session, url, job(), tokens["acme"])
    listed, _ = await pages(session, url, tokens["acme"], f"since={middle.isoformat().replace('+', '%2B')}")
    assert [item["id"] for item in listed] == [newer["id"]]
    everything, _ = await pages(session, url, tokens["acme"], "since=1h")
    assert len(everything) == 3
    for query, field in [
        ("since=yesterday", "since"),
        ("since=2026-01-01T00:00:00", "since"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=x", "limit"),
        ("status=done", "status"),
        ("cursor=nope", "cursor"),
    ]:
        status, answer = await get_json(session, f"{url}/v1/jobs?{query}", tokens["acme"])
        assert status == 400, query
        assert answer["error"]["field"] == field


async def wait_until_later(db: Any, instant: Any) -> None:
    """Until the database's clock is past `instant`'s millisecond (ids are made in milliseconds)."""

    async def later() -> bool:
        return bool(await db.fetchval("SELECT clock_timestamp() - $1 > interval '2 milliseconds'", instant))

    await wait_until(later, timeout=5, interval=0.001)


async def test_delete_cancels_a_queued_job_of_ones_own(
    db: Any, tokens: dict[str, str], url: str, session: aiohttp.ClientSession
) -> None:
    _, first, _ = await post(session, url, job(), tokens["acme"])
    _, other, _ = await post(session, url, job(), tokens["globex"])

    async def delete(job_id: str, token: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with session.delete(f"{url}/v1/jobs/{job_id}", headers=headers) as response:
            assert response.content_type == "application/json"
            return response.status, await response.json()

    for missing in (other["id"], str(uuid.uuid4()), "not-a-job"):
        status, answer = await delete(missing, tokens["acme"])
        assert status == 404, "another tenant's job looks exactly like one that does not exist"
        assert answer["error"]["message"] == "no such job"
    assert (await delete(first["id"], None))[0] == 401

    status, answer = await delete(first["id"], tokens["acme"])
    assert status == 200
    assert answer == {"id": first["id"], "status": "canceled"}
    assert (
        await db.fetchval("SELECT status FROM batchd.jobs WHERE id = $1", uuid.UUID(first["id"]))
        == "canceled"
    )
    status, answer = await delete(first["id"], tokens["acme"])
    assert status == 409
    assert answer["error"]["job_status"] == "canceled"

    await db.execute("UPDATE batchd.jobs SET status = 'failed' WHERE id = $1", uuid.UUID(other["id"]))
    status, answer = await delete(other["id"], ADMIN_TOKEN)
    assert status == 409
    assert "the job is failed" in answer["error"]["message"]
    assert (
        await db.fetchval("SELECT status FROM batchd.jobs WHERE id = $1", uuid.UUID(other["id"])) == "failed"
    )
