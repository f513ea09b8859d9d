"""`GET /v1/overview` (the dashboard's snapshot), the session cookie, and how the page's files are served."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import asyncpg
import pytest
from support import ADMIN_TOKEN, QUICK, insert_raw, wait_for_jobs, wait_until

from batchd.emulator import EmulatorConfig

FINISHED_JOB = """
WITH job AS (
    INSERT INTO batchd.jobs (tenant_id, request, status, completed_at, usage)
    VALUES ('acme', '{}', 'succeeded', now(), '{"input_tokens": 10, "output_tokens": 20}')
    RETURNING id, tenant_id
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
        assert before["totals"] == [], "its event comes after the snapshot's id: the page counts it then"

        async def published() -> bool:
            return bool(await db.fetchval("SELECT published_seq = 1 FROM batchd.event_log"))

        await wait_until(published)
        after = await overview(url, tokens["acme"])
        assert after["last_event_id"] == 1
        (totals,) = after["totals"]
        assert totals["succeeded"] == 1
        assert totals["input_tokens"] == 10, "numbers, not strings"
        assert totals["output_tokens"] == 20
        assert daemon.hub is not None


async def test_a_tenant_sees_its_own_queue_and_batches_and_the_admin_sees_every_tenants(
    db: Any, tokens: dict[str, str], serve: Any
) -> None:
    async with serve() as (_, url):
        await insert_raw(db, "acme", ["a1", "a2", "a3"])
        await insert_raw(db, "globex", ["g1"])
        await wait_for_jobs(db, done=4)
        acme = await overview(url, tokens["acme"])
        admin = await overview(url, ADMIN_TOKEN)
    assert acme["tenant"] == "acme"
    assert acme["admin"] is False
    assert [row["tenant_id"] for row in acme["totals"]] == ["acme"]
    assert acme["totals"][0]["succeeded"] == 3
    assert admin["admin"] is True
    assert [row["tenant_id"] for row in admin["totals"]] == ["acme", "globex"]


async def test_the_session_cookie_is_httponly_and_the_pages_files_are_revalidated(
    tokens: dict[str, str], serve: Any
) -> None:
    # unsafe=True: aiohttp keeps no cookies for a bare IP address otherwise.
    async with serve() as (_, url), aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.post(f"{url}/v1/session", headers={"Authorization": f"Bearer {tokens['acme']}"}) as r:
            assert r.status == 200
            assert json.loads(await r.text()) == {"tenant": "acme", "admin": False}
            cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert "Secure" not in cookie, "plain HTTP here, and http.secure_cookie unset"
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
