"""The HTTP API's OpenAPI 3.1 document (batchd/openapi.py, served at `GET /v1/openapi.json`): valid by the
specification, naming exactly the routes the server registers, and true to the server: every answer of a
daemon in this process on real Postgres, successes and errors of every endpoint, event frames included, has
a documented status and media type and a body that the documented schema accepts (JSON Schema 2020-12,
formats checked); and every documented status is seen, but the few listed with the reason they are not."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any, cast

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from openapi_spec_validator.validation import OpenAPIV31SpecValidator
from prometheus_client import CollectorRegistry
from sse_support import Collector, sse_stream
from support import ADMIN_TOKEN, QUICK, insert_raw, raw_request, wait_until

from batchd import budgets, enqueue, openapi, server, webhooks
from batchd.config import EventsSettings
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig
from batchd.events import EventHub
from batchd.metrics import Metrics
from batchd.readings import Overview, Readings, Series
from batchd.sse import EVENT_TYPES
from batchd.store import sql

DOC = openapi.document()
JSON = "application/json"
# The dashboard's page and files: for a browser, left out of the document (openapi.py says so).
UNDOCUMENTED = {"/", "/static"}
# Documented answers this test does not provoke, and why.
NOT_PROVOKED = {
    ("/v1/jobs", "post", "503"): "the database failing in the middle of a POST's transaction",
}
MAX_POST_JOBS = 3
BATCH_SIZE = 3  # a batch is flushed when this many jobs are queued (and never by age, while a test runs)


def test_the_document_is_valid_openapi_3_1() -> None:
    validate_spec(DOC, cls=OpenAPIV31SpecValidator)
    assert json.loads(openapi.document_text()) == DOC
    for schema in DOC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_the_document_says_what_the_code_does() -> None:
    schemas = DOC["components"]["schemas"]
    assert tuple(schemas["NewJob"]["properties"]) == enqueue.KEYS
    event_types = [
        type_
        for name in ("JobEvent", "BatchEvent", "TenantEvent")
        for type_ in schemas[name]["properties"]["type"]["enum"]
    ]
    assert sorted(event_types) == sorted(EVENT_TYPES)
    assert (openapi.LIST_LIMIT_DEFAULT, openapi.LIST_LIMIT_MAX) == (
        server.LIST_LIMIT_DEFAULT,
        server.LIST_LIMIT_MAX,
    )
    assert tuple(schemas["JobSummary"]["properties"]) == server.LIST_FIELDS
    assert tuple(schemas["Job"]["properties"]) == server.JOB_FIELDS
    assert tuple(schemas["WebhookEndpoint"]["properties"]) == server.ENDPOINT_FIELDS
    assert tuple(schemas["WebhookDelivery"]["properties"]) == server.DELIVERY_FIELDS
    assert openapi.DELIVERY_STATUSES == webhooks.STATUSES


def test_every_route_the_server_registers_is_documented_and_no_other() -> None:
    pool = cast("asyncpg.Pool", None)  # routes only: nothing is served
    app = server.create_app(pool, lambda: True, hub=EventHub(pool, EventsSettings()), metrics=Metrics())
    registered = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"  # aiohttp's, beside each GET
    }
    registered = {(path, method) for path, method in registered if path not in UNDOCUMENTED}
    documented = {
        (path, method) for path, item in DOC["paths"].items() for method in item if method != "parameters"
    }
    assert registered - documented == set(), "routes the document lacks"
    assert documented - registered == set(), "documented routes the server does not have"


def _validate(schema: dict[str, Any], instance: Any, where: str) -> None:
    # The document's components beside the schema, so that its "#/components/..." references resolve.
    root = {"components": DOC["components"], **schema}
    errors = list(
        Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER).iter_errors(instance)
    )
    assert not errors, f"{where}: {errors[0].message} at {list(errors[0].absolute_path)}"


class Observed:
    """Checks every answer against the document, and notes which documented answers were seen."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str, str]] = set()
        self.event_types: set[str] = set()

    def answer(
        self, path: str, method: str, status: int, content_type: str, *, body: Any, headers: Any
    ) -> None:
        where = f"{method.upper()} {path} {status}"
        response = DOC["paths"][path][method]["responses"].get(str(status))
        assert response is not None, f"{where}: a status the document does not give"
        assert content_type in response["content"], f"{where}: {content_type}"
        media = response["content"][content_type]
        if content_type == JSON:
            _validate(media["schema"], body, where)
        for name in response.get("headers", {}):
            if name == "Location" and "jobs" in body:
                continue  # one job's only
            assert name in headers, f"{where}: no {name} header"
        self.seen.add((path, method, str(status)))

    def frames(self, messages: list[Any]) -> None:
        schemas = DOC["paths"]["/v1/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
        for message in messages:
            if not message.is_event:
                continue
            data = json.loads(message.data)
            name = {"reset": "ResetEvent", "disconnect": "DisconnectEvent"}.get(message.event, "Event")
            assert schemas["x-data-schema"]["oneOf"].count({"$ref": f"#/components/schemas/{name}"}) == 1
            _validate({"$ref": f"#/components/schemas/{name}"}, data, f"event: {message.event}")
            if name == "Event":
                assert data["type"] == message.event
                self.event_types.add(message.event)


def tenant_events(count: int) -> Callable[[Collector], bool]:
    """A stream has carried `count` events of tenants."""
    return lambda c: sum(m.event.startswith("tenant.") for m in c.messages) == count


class UnreadableReadings(Readings):
    """The database's readings failing, as they do when it is away or times out."""

    async def overview(self, _pool: asyncpg.Pool) -> Overview | None:
        return None

    async def series(self, _pool: asyncpg.Pool, _window: str) -> Series | None:
        return None


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    # A batch stays open a second or so (its overview is read meanwhile), then ends.
    return QUICK.model_copy(update={"processing_time_s": (2.0, 2.0)})


@pytest.fixture
def daemon(daemon_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    monkeypatch.setenv("BATCHD_ADMIN_TOKEN", ADMIN_TOKEN)
    settings = daemon_settings(
        http={"max_post_jobs": MAX_POST_JOBS, "overview_interval_s": 0},
        batching={"max_requests": BATCH_SIZE, "max_wait_s": 3600.0},
        events={"poll_interval_s": 1.0, "max_streams_per_tenant": 1},
        # Endpoints on loopback, where nothing listens: their deliveries fail, and the log shows it.
        webhooks={"allowed_networks": ["127.0.0.0/8"], "max_endpoints_per_tenant": 2},
    )
    return Daemon(settings)


@pytest.mark.slow
async def test_every_answer_of_the_server_is_as_documented(  # noqa: C901, PLR0915 - one daemon, every endpoint
    db: Any, tokens: dict[str, str], daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    observed = Observed()
    acme, globex = tokens["acme"], tokens["globex"]
    answers: dict[str, list[Any]] = {}

    async def call(  # noqa: PLR0917 - reads as the request line it is
        method: str,
        path: str,
        url_path: str | None = None,
        token: str | None = ADMIN_TOKEN,
        body: Any = None,
        headers: dict[str, str] | None = None,
        base: str | None = None,
    ) -> tuple[int, Any]:
        sent = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        data = None if body is None else json.dumps(body)
        target = f"{base or url}{url_path or path}"
        async with session.request(method, target, headers=sent, data=data) as response:
            text = await response.text()
            answer = json.loads(text) if response.content_type == JSON else text
            if response.status == 200:
                answers.setdefault(path, []).append(answer)
            observed.answer(
                path,
                method.lower(),
                response.status,
                response.content_type,
                body=answer,
                headers=response.headers,
            )
            return response.status, answer

    # The admin's stream outlives the daemon (`streams`), to see how it ends when the daemon stops.
    async with AsyncExitStack() as streams, AsyncExitStack() as stack:
        await stack.enter_async_context(daemon.running())
        assert daemon.http_url is not None
        assert daemon.ctx is not None
        url = daemon.http_url

        async def ready() -> bool:
            async with session.get(f"{url}/readyz") as response:
                return response.status == 200

        await wait_until(ready, timeout=20)
        # The admin's stream from the start: every event of the test, then `disconnect` when the daemon stops.
        admin_stream = await streams.enter_async_context(
            sse_stream(session, url, ADMIN_TOKEN, last_event_id=0)
        )

        created = await add_webhooks(call, acme)

        # A batch's life, and a job sent alone: events of jobs and batches, and jobs with a result.
        status, posted = await call(
            "POST",
            "/v1/jobs",
            token=globex,
            body=[{"request": raw_request(f"b{i}")} for i in range(BATCH_SIZE)],
        )
        assert status == 202
        status, _ = await call(
            "POST", "/v1/jobs", token=globex, body={"request": raw_request("s"), "route": "sync"}
        )
        assert status == 202

        # Both asked in every round while the batch is open: it may end before a second wait began.
        shown: set[str] = set()

        async def both_shown_an_open_batch() -> bool:
            for asker in {ADMIN_TOKEN, globex} - shown:
                _, overview = await call("GET", "/v1/overview", token=asker)
                if overview["open_batches"]:
                    shown.add(asker)
            return len(shown) == 2

        await wait_until(both_shown_an_open_batch, timeout=10, interval=0.05)
        await admin_stream.until(
            lambda c: (
                sum(m.event == "job.succeeded" for m in c.messages) == BATCH_SIZE + 1
                and any(m.event == "batch.ended" for m in c.messages)
            ),
            timeout=30,
        )
        done = posted["jobs"][0]["id"]
        # Budgets: globex reaches one, then may spend again (one of each event); acme stays held.
        # (The daemon checks budgets before each flush too: either check may make the change.)
        for changes, (tenant, budget) in enumerate([("globex", 0), ("globex", 1000), ("acme", 0)], start=1):
            await db.execute("UPDATE batchd.tenants SET budget_day_usd = $2 WHERE name = $1", tenant, budget)
            await budgets.check(db)
            await admin_stream.until(tenant_events(changes))
        # A job failed as the flusher fails one.
        (failed,) = await insert_raw(db, "acme", ["fails"])
        await db.execute(sql("fail_jobs"), [failed], ["request lacks model"])

        await call("GET", "/healthz", token=None)
        await call("GET", "/readyz", token=None)
        await call("GET", "/v1/openapi.json", token=None)
        status, served = await call("GET", "/v1/openapi.json", token="wrong")
        assert (status, served) == (200, DOC)

        # Jobs: enqueued (two stay queued: fewer than a batch), refused.
        one: dict[str, Any] = {"request": raw_request("one"), "metadata": {"user": 7}, "deadline": "2h"}
        status, queued = await call(
            "POST", "/v1/jobs", token=acme, body=one, headers={"Idempotency-Key": "k1"}
        )
        assert status == 202
        status, again = await call(
            "POST", "/v1/jobs", token=acme, body=one, headers={"Idempotency-Key": "k1"}
        )
        assert (status, again) == (202, {"id": queued["id"], "enqueued": False})
        status, _ = await call("POST", "/v1/jobs", body=[{**one, "tenant_id": "acme"}])
        assert status == 202
        refusals: list[tuple[str | None, Any, dict[str, str]]] = [
            (acme, {"request": {}}, {}),
            (acme, [{"request": {}}, {"job_type": "nope"}], {}),
            (acme, [one], {"Idempotency-Key": "k2"}),
            (acme, [], {}),
            (acme, {**one, "tenant_id": "globex"}, {}),
            (acme, [one] * (MAX_POST_JOBS + 1), {}),
            (None, one, {}),
        ]
        for token, body, headers in refusals:
            status, _ = await call("POST", "/v1/jobs", token=token, body=body, headers=headers)
            assert status in {400, 401, 403, 413}, body
        await db.execute("UPDATE batchd.tenants SET max_queued = 2 WHERE name = 'acme'")
        status, _ = await call("POST", "/v1/jobs", token=acme, body=[one, one])
        assert status == 429

        job = "/v1/jobs/{job_id}"
        for token, job_id in [(ADMIN_TOKEN, done), (globex, done), (acme, failed), (acme, queued["id"])]:
            status, _ = await call("GET", job, f"/v1/jobs/{job_id}", token)
            assert status == 200
        for token, job_id in [(acme, done), (ADMIN_TOKEN, "not-a-job"), (None, done)]:
            await call("GET", job, f"/v1/jobs/{job_id}", token)
        for token, job_id in [(acme, queued["id"]), (globex, done), (acme, done), (None, done), (acme, "x")]:
            await call("DELETE", job, f"/v1/jobs/{job_id}", token)
        for token, query in [
            (ADMIN_TOKEN, "limit=2"),
            (ADMIN_TOKEN, "tenant=acme&status=succeeded&since=1d"),
            (acme, ""),
            (acme, "status=canceled&since=2026-01-01T00:00:00Z"),
            (acme, "tenant=globex"),
            (acme, "limit=0"),
            (acme, "status=lost"),
            (acme, "cursor=x"),
            (acme, "since=yesterday"),
            (None, ""),
        ]:
            await call("GET", "/v1/jobs", f"/v1/jobs?{query}", token)
        _, page = await call("GET", "/v1/jobs", "/v1/jobs?limit=2")
        await call("GET", "/v1/jobs", f"/v1/jobs?limit=2&cursor={page['next_cursor']}")

        await walk_webhook(call, created["id"], acme, globex)

        # The dashboard's readings, the session, the metrics.
        for token in (ADMIN_TOKEN, acme, None):
            await call("GET", "/v1/overview", token=token)
            await call("GET", "/v1/session", token=token)
            await call("POST", "/v1/session", token=token)
            for window in ("1h", "1d", "30d", "1y"):
                await call("GET", "/v1/series", f"/v1/series?window={window}", token)
            await call("GET", "/v1/series", token=token)
            await call("GET", "/metrics", token=token)
        await call("GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        await call("DELETE", "/v1/session", token=None)

        # Events: refusals, a stream reset, one stream too many.
        events = "/v1/events"
        for token, query in [
            (acme, "types=job.lost"),
            (acme, "job_id=nope"),
            (acme, f"job_id={done}"),
            (None, ""),
        ]:
            await call("GET", events, f"{events}?{query}", token)
        await call("GET", events, headers={"Last-Event-ID": "-1"})
        async with sse_stream(session, url, acme, last_event_id=10**9) as stream:
            await stream.until(lambda c: any(m.event == "reset" for m in c.messages))
            observed.answer(events, "get", 200, "text/event-stream", body=None, headers={})
            observed.frames(stream.messages)
            await call("GET", events, token=acme)  # the tenant's one stream is open

        # What a daemon answers when its database or its readings fail.
        pool = daemon.ctx.pool
        failing = server.create_app(
            pool,
            lambda: False,
            readings=UnreadableReadings(CollectorRegistry()),
            api_problem=lambda: "api https://api.example: not checked yet",
        )
        async with TestServer(failing, host="127.0.0.1") as test_server:
            base = str(test_server.make_url("")).rstrip("/")
            status, _ = await call("GET", "/readyz", token=None, base=base)
            assert status == 503
            for token in (ADMIN_TOKEN, acme):
                await call("GET", "/v1/overview", token=token, base=base)
                await call("GET", "/v1/series", token=token, base=base)

        await stack.aclose()  # the daemon stops: its streams end with `disconnect`
        await admin_stream.until(lambda c: any(m.event == "disconnect" for m in c.messages), timeout=10)
        observed.answer(events, "get", 200, "text/event-stream", body=None, headers={})
        observed.frames(admin_stream.messages)

    documented = {
        (path, method, status)
        for path, item in DOC["paths"].items()
        for method, operation in item.items()
        if method != "parameters"
        for status in operation["responses"]
    }
    assert documented - observed.seen == set(NOT_PROVOKED), "documented answers this test does not see"
    assert observed.event_types >= {
        "job.submitted",
        "job.succeeded",
        "job.failed",
        "job.canceled",
        "batch.submitted",
        "batch.ended",
        "tenant.held",
        "tenant.released",
    }
    # The overview's lists were seen with rows in them, and a held tenant's budget.
    for member in ("queued", "open_batches", "totals", "budgets", "sync_last_hour"):
        assert any(overview[member] for overview in answers["/v1/overview"]), member
    assert any(budget["held"] for overview in answers["/v1/overview"] for budget in overview["budgets"])


async def add_webhooks(call: Any, acme: str) -> Any:
    """Endpoints added (acme's, one by the admin for acme) and refused; the principal's lists. First, so that
    the test's events give the delivery log rows."""
    hooks = "/v1/webhooks"
    status, created = await call("POST", hooks, token=acme, body={"url": "http://127.0.0.1:9/a"})
    assert status == 201
    status, _ = await call(
        "POST", hooks, body={"url": "http://127.0.0.1:9/b", "events": ["job.failed"], "tenant_id": "acme"}
    )
    assert status == 201
    for token, hook_body in [
        (acme, {"url": "http://127.0.0.1:9/c"}),  # a third: over max_endpoints_per_tenant
        (acme, {"url": "http://10.0.0.1/"}),
        (acme, {"url": "ftp://127.0.0.1/"}),
        (acme, {"url": "http://127.0.0.1:9/", "secret": "mine"}),
        (acme, {"url": "http://127.0.0.1:9/", "events": ["job.lost"]}),
        (acme, {"url": "http://127.0.0.1:9/", "events": []}),
        (acme, ["http://127.0.0.1:9/"]),
        (ADMIN_TOKEN, {"url": "http://127.0.0.1:9/"}),
        (acme, {"url": "http://127.0.0.1:9/", "tenant_id": "globex"}),
        (acme, {"url": "http://127.0.0.1:9/" + "x" * 20_000}),
        (None, {"url": "http://127.0.0.1:9/"}),
    ]:
        status, _ = await call("POST", hooks, token=token, body=hook_body)
        assert status in {400, 401, 403, 409, 413}, hook_body
    for token, query in [
        (acme, ""),
        (ADMIN_TOKEN, ""),
        (ADMIN_TOKEN, "?tenant=acme"),
        (acme, "?tenant=globex"),
    ]:
        await call("GET", hooks, f"{hooks}{query}", token)
    await call("GET", hooks, token=None)
    return created


async def walk_webhook(call: Any, endpoint: int, acme: str, globex: str) -> None:
    """An endpoint, its delivery log (deliveries to a port where nothing listens fail), a retry, removal."""
    hooks, hook = "/v1/webhooks", "/v1/webhooks/{endpoint_id}"
    own = f"/v1/webhooks/{endpoint}"

    async def failed_once() -> bool:
        _, log = await call("GET", f"{hook}/deliveries", f"{own}/deliveries", acme)
        return any(delivery["last_error"] for delivery in log["deliveries"])

    await wait_until(failed_once, timeout=20)
    for token, target in [
        (acme, own),
        (ADMIN_TOKEN, own),
        (globex, own),
        (acme, f"{hooks}/x"),
        (None, own),
    ]:
        await call("GET", hook, target, token)
    for token, query in [(acme, "?status=pending&limit=5"), (acme, "?status=lost"), (acme, "?limit=0")]:
        await call("GET", f"{hook}/deliveries", f"{own}/deliveries{query}", token)
    for token in (globex, None):
        await call("GET", f"{hook}/deliveries", f"{own}/deliveries", token)
    for token in (acme, globex, None):
        await call("POST", f"{hook}/retry", f"{own}/retry", token)
    for token in (globex, None, acme, acme):  # 404, 401, 200, then 404: gone
        await call("DELETE", hook, own, token)
