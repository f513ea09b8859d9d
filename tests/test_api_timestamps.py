"""Every time the HTTP API sends is ISO 8601 with `T` and an offset (what the events' `at` is, and what
every browser's Date reads): the test walks every JSON answer of every route the server has, event frames
included, and checks each string that looks like a time, and each `…_at` or `at` member."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import aiohttp
from sse_support import sse_stream
from support import ADMIN_TOKEN, insert_raw, raw_request

from batchd import webhooks
from batchd.config import EventsSettings
from batchd.events import EventHub
from batchd.metrics import Metrics
from batchd.server import create_app
from batchd.store import sql
from batchd.targets import TargetPolicy

PERMISSIVE = TargetPolicy(allow_private=True)

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
TIME_LIKE = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d")
# Routes that answer something other than JSON: the page, its files, Prometheus' text; and the API's
# description, whose `…_at` members are the schemas of times (tests/test_openapi.py checks those).
NOT_JSON = {"/", "/static", "/metrics", "/v1/openapi.json"}


def times(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(where, value) of every member that is, or looks like, a time. A job's metadata is the producer's,
    sent back untouched: not walked."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "metadata":
                continue
            where = f"{path}.{key}"
            if key == "at" or key.endswith("_at"):
                yield where, item
            elif isinstance(item, dict | list | str):
                yield from times(item, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from times(item, f"{path}[{i}]")
    elif isinstance(value, str) and TIME_LIKE.search(value):
        yield path, value


def test_the_walk_finds_times_and_refuses_a_space() -> None:
    found = dict(
        times(
            {"created_at": None, "a": [{"at": "2026-01-01 10:00:00+00"}], "b": "x", "metadata": {"x_at": 1}}
        )
    )
    assert found == {".created_at": None, ".a[0].at": "2026-01-01 10:00:00+00"}
    assert not ISO.fullmatch("2026-01-01 10:00:00+00:00")
    assert ISO.fullmatch("2026-01-01T10:00:00.123456+00:00")
    assert ISO.fullmatch("2026-01-01T10:00:00Z")


async def test_every_time_the_http_api_sends_is_iso_8601_with_t_and_an_offset(  # noqa: PLR0915 - every route
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    # A job with every time set, one canceled (its event written by the database's trigger), one failed as
    # the flusher fails one, and one in an open batch.
    done, canceled, failed, submitted = await insert_raw(db, "acme", ["done", "cancel", "fail", "in a batch"])
    await db.execute(
        "UPDATE batchd.jobs SET status = 'succeeded', submitted_at = now(), completed_at = now(),"
        " result = '{\"content\": []}', usage = '{\"input_tokens\": 1}' WHERE id = $1",
        done,
    )
    await db.execute(sql("cancel_job"), canceled)
    await db.execute(sql("fail_jobs"), [failed], ["request lacks model"])
    batch = await db.fetchval(
        "INSERT INTO batchd.batches (tag, request_count, bytes, provider_batch_id, status)"
        " VALUES ('timestampsxx', 1, 1, 'msgbatch_t', 'in_progress') RETURNING id"
    )
    await db.execute(
        "UPDATE batchd.jobs SET status = 'submitted', batch_id = $2, submitted_at = now() WHERE id = $1",
        submitted,
        batch,
    )
    await db.execute("NOTIFY batchd_events")

    answers: dict[str, list[Any]] = {}

    async with serve() as (daemon, url):

        async def call(
            method: str,
            path: str,
            token: str | None = ADMIN_TOKEN,
            route: str | None = None,
            body: Any = None,
        ) -> None:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            data = None if body is None else json.dumps(body)
            async with session.request(method, f"{url}{path}", headers=headers, data=data) as response:
                assert response.content_type == "application/json", (path, response.status)
                answers.setdefault(route or path, []).append(await response.json())

        await call("GET", "/healthz", None)
        await call("GET", "/readyz", None)
        for token in (ADMIN_TOKEN, tokens["acme"], tokens["globex"], "wrong"):
            await call("GET", "/v1/overview", token)
            await call("GET", "/v1/session", token)
            await call("POST", "/v1/session", token)
            for window in ("1h", "1d", "30d", "1y"):
                await call("GET", f"/v1/series?window={window}", token, route="/v1/series")
        await call("DELETE", "/v1/session")
        for job in (done, canceled, failed, submitted, "not-a-job", "00000000-0000-0000-0000-000000000000"):
            await call("GET", f"/v1/jobs/{job}", route="/v1/jobs/{job_id}")
            await call("GET", f"/v1/jobs/{job}", tokens["acme"], route="/v1/jobs/{job_id}")
        await call("GET", "/v1/events?job_id=nope", route="/v1/events")
        posted = {"request": raw_request("posted"), "deadline": "2026-12-01T12:00:00Z"}
        await call("POST", "/v1/jobs", tokens["acme"], body=posted)
        await call("POST", "/v1/jobs", body=[{**posted, "tenant_id": "acme"}])
        await call("POST", "/v1/jobs", tokens["acme"], body={"request": {}})
        for query in ("limit=2", "status=succeeded&tenant=acme", "limit=0"):
            await call("GET", f"/v1/jobs?{query}", route="/v1/jobs")
        for token in (tokens["acme"], tokens["globex"]):  # 409, 404
            await call("DELETE", f"/v1/jobs/{done}", token, route="/v1/jobs/{job_id}")
        await walk_webhooks(db, call, tokens["acme"])
        # The event stream's frames: the events (after every one was published), and a reset.
        async with sse_stream(session, url, ADMIN_TOKEN, last_event_id=0) as stream:
            await stream.until(lambda c: len(c.data()) >= 2)
            answers["/v1/events"] += stream.data()
        async with sse_stream(session, url, ADMIN_TOKEN, last_event_id=10**9) as stream:
            await stream.until(lambda c: any(m.event == "reset" for m in c.messages))
            answers["/v1/events"] += [json.loads(m.data) for m in stream.messages if m.event == "reset"]

        # Every route the server has is walked, save those that answer no JSON.
        assert daemon.ctx is not None
        app = create_app(
            daemon.ctx.pool, lambda: True, hub=EventHub(daemon.ctx.pool, EventsSettings()), metrics=Metrics()
        )
        routes = {route.resource.canonical for route in app.router.routes() if route.resource is not None}
        assert routes - NOT_JSON == set(answers), "a route this test does not walk"

    found = [
        (route, where, value)
        for route, bodies in answers.items()
        for body in bodies
        for where, value in times(body)
    ]
    assert {where for route, where, _ in found if route == "/v1/jobs"} >= {".jobs[0].created_at"}
    assert {where for route, where, _ in found if route == "/v1/jobs/{job_id}"} >= {
        ".created_at",
        ".submitted_at",
        ".completed_at",
    }
    assert any(where == ".at" for route, where, _ in found if route == "/v1/events"), "the events' times"
    assert {where for route, where, _ in found if route == "/v1/webhooks"} >= {
        ".endpoints[0].created_at",
        ".endpoints[0].last_success_at",
    }
    assert {where for route, where, _ in found if route == "/v1/webhooks/{endpoint_id}/deliveries"} >= {
        ".deliveries[0].created_at",
        ".deliveries[0].last_attempt_at",
        ".deliveries[0].next_attempt_at",
    }
    # And they are the database's instants, to the microsecond.
    shown = next(body for body in answers["/v1/jobs/{job_id}"] if body.get("id") == str(done))
    stored = await db.fetchrow(
        "SELECT created_at, submitted_at, completed_at FROM batchd.jobs WHERE id = $1", done
    )
    for field, value in stored.items():
        assert datetime.fromisoformat(shown[field]) == value, field
    wrong = [
        (route, where, value)
        for route, where, value in found
        if value is not None and not (isinstance(value, str) and ISO.fullmatch(value))
    ]
    assert not wrong, wrong


async def walk_webhooks(db: Any, call: Any, acme: str) -> None:
    """The webhook routes, with an endpoint whose log holds a delivery failed once (every time set)."""
    endpoint, _ = await webhooks.add_endpoint(db, "acme", "http://127.0.0.1:9/", None, PERMISSIVE)
    await db.execute(
        "INSERT INTO batchd.webhook_deliveries (endpoint_id, event_seq, message_id, event_type, body,"
        " attempts, first_attempt_at, last_attempt_at, last_status, last_error, next_attempt_at)"
        " VALUES ($1, 1, 'evt_1', 'job.succeeded', '{}', 1, now(), now(), 500, 'no',"
        " now() + interval '1h')",
        endpoint,
    )
    await db.execute("UPDATE batchd.webhook_endpoints SET failures = 1, last_success_at = now()")
    hook = "/v1/webhooks/{endpoint_id}"
    await call("GET", "/v1/webhooks", acme)
    await call("POST", "/v1/webhooks", acme, body={"url": "ftp://x/"})
    await call("GET", f"/v1/webhooks/{endpoint}", acme, route=hook)
    await call("GET", f"/v1/webhooks/{endpoint}/deliveries", route=f"{hook}/deliveries")
    await call("POST", f"/v1/webhooks/{endpoint}/retry", route=f"{hook}/retry")
    await call("DELETE", f"/v1/webhooks/{endpoint}", route=hook)
