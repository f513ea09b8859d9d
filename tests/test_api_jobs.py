"""`POST /v1/jobs`: producers' INSERT over HTTP, against a daemon in this process and real Postgres. The
same checks as `batchd enqueue` (and the database's), all or nothing, idempotent by key, a tenant's token
writing that tenant's jobs only, and the limits."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from support import ADMIN_TOKEN, raw_request

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
