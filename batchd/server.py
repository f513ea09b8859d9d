"""batchd's HTTP server: `/healthz` (the process answers), `/readyz` (database and listener up, and the API
taking the key; both without a token, so they reveal nothing but that and the API's URL), the
tenant-scoped API under `/v1/` (jobs: read, and posted as a producer's INSERT; the dashboard's overview,
the SSE stream of sse.py, a tenant's webhook endpoints), `/metrics` (Prometheus, admin token only: it
names every tenant) and the dashboard itself at `/` (static files from batchd/dashboard/).

A token comes as `Authorization: Bearer …` (preferred: it stays out of logs), or, for a browser's
EventSource, which cannot set headers, as the `access_token` query parameter (it ends up in proxy and
access logs: use short-lived tokens there) or the `batchd_token` cookie (HttpOnly, set by the page).
No token or a bad one: 401. A job of another tenant: 404, the same as one that does not exist.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from . import enqueue, openapi, statuses, webhooks
from .config import HttpSettings, Settings
from .events import EventHub
from .metrics import Metrics
from .readings import WINDOWS, Readings
from .sse import HUB, stream_events
from .store import DB_ERRORS, sql
from .targets import TargetPolicy, TargetRefused
from .tenants import Principal, authenticate
from .text import parse_duration

log = structlog.get_logger("batchd.server")
READY_CHECK: web.AppKey[Callable[[], bool]] = web.AppKey("ready_check")
API_PROBLEM: web.AppKey[Callable[[], str | None]] = web.AppKey("api_problem")
POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool")
ADMIN_TOKEN: web.AppKey[str | None] = web.AppKey("admin_token")
SECURE_COOKIE: web.AppKey[bool | None] = web.AppKey("secure_cookie")
SESSION_MAX_AGE_S: web.AppKey[int] = web.AppKey("session_max_age_s")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
READINGS: web.AppKey[Readings] = web.AppKey("readings", Readings)
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
CHECKER: web.AppKey[enqueue.Checker] = web.AppKey("checker", enqueue.Checker)
TOKEN_COOKIE = "batchd_token"  # noqa: S105 - the cookie's name, not a secret
DASHBOARD = Path(__file__).parent / "dashboard"
STREAMS_CLOSE_TIMEOUT_S = 3.0
JOB_JSON_FIELDS = ("metadata", "error", "usage", "result")
LIST_LIMIT_DEFAULT = 100
LIST_LIMIT_MAX = 1_000
LIST_SCAN_FACTOR = 10  # a page filtered by status reads at most this many jobs per job it may hold
NIL_UUID = uuid.UUID(int=0)
JOB_FIELDS = (
    "id",
    "tenant_id",
    "status",
    "attempts",
    "batch_id",
    "job_type",
    "route",
    "path",
    "path_reason",
    "metadata",
    "error",
    "usage",
    "result",
    "created_at",
    "submitted_at",
    "completed_at",
    "cost_usd",
    "sync_cost_usd",
)
LIST_FIELDS = tuple(field for field in JOB_FIELDS if field != "result")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"status": status, "message": message}}, status=status)


def _token(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get("access_token") or request.cookies.get(TOKEN_COOKIE) or None


@web.middleware
async def authenticate_api(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Signing out must work with a revoked token too; the API's description holds no data (openapi.py).
    if (
        not request.path.startswith("/v1/")
        or (request.method == "DELETE" and request.path == "/v1/session")
        or request.path == "/v1/openapi.json"
    ):
        return await handler(request)
    principal = await authenticate(request.app[POOL], _token(request), request.app[ADMIN_TOKEN])
    if principal is None:
        response = _error(401, "a valid token is required (Authorization: Bearer, access_token or cookie)")
        response.headers["WWW-Authenticate"] = 'Bearer realm="batchd"'
        return response
    request[PRINCIPAL] = principal
    return await handler(request)


async def get_job(request: web.Request) -> web.Response:
    try:
        job_id = uuid.UUID(request.match_info["job_id"])
    except ValueError:
        return _error(404, "no such job")
    row = await request.app[POOL].fetchrow(sql("get_job"), job_id)
    if row is None or not request[PRINCIPAL].may_see(row["tenant_id"]):
        return _error(404, "no such job")
    return web.Response(text=_job_json(row, JOB_FIELDS), content_type="application/json")


def _job_json(row: asyncpg.Record, names: tuple[str, ...]) -> str:
    # The jsonb columns come as the database's own text, spliced in as they are (see get_job's query).
    fields = {field: row[field] for field in names if field not in JOB_JSON_FIELDS}
    spliced = "".join(f', "{field}": {row[field] or "null"}' for field in JOB_JSON_FIELDS if field in names)
    return _dumps(fields)[:-1] + spliced + "}"


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a `GET /v1/jobs` asks for: whose jobs (None: every tenant's), after which id, of which status."""

    tenant: str | None
    after: uuid.UUID
    cursor: uuid.UUID | None
    status: str | None
    limit: int


async def list_jobs(request: web.Request) -> web.Response:
    """A page of jobs, oldest first, keyset on the id (time-ordered: a UUID version 7, by the millisecond;
    jobs of one millisecond in their ids' order). The cost of a page is bounded whatever the history: it
    reads at most LIST_SCAN_FACTOR times `limit` jobs (and one) of an index from the cursor on
    (jobs_tenant_id for a tenant, the primary key for the admin), and filters the status among those. A
    page may so hold fewer than `limit` jobs, even none, with `more` true: follow `next_cursor` while
    `more` is; a page with `more` false still has the cursor to ask again later, for newer jobs."""
    try:
        listing = _listing(request.query, request[PRINCIPAL])
    except Refusal as refusal:
        return refusal.response()
    pool = request.app[POOL]
    scan = listing.limit * (LIST_SCAN_FACTOR if listing.status is not None else 1)
    # One more than is read, to tell whether any job follows.
    if listing.tenant is None:
        rows = await pool.fetch(sql("scan_jobs"), listing.after, scan + 1)
    else:
        rows = await pool.fetch(sql("scan_tenant_jobs"), listing.tenant, listing.after, scan + 1)
    scanned = rows[:scan]
    picked = [row["id"] for row in scanned if listing.status in (None, row["status"])][: listing.limit]
    if len(picked) == listing.limit:
        last, more = picked[-1], picked[-1] != rows[-1]["id"]
    else:
        last, more = (scanned[-1]["id"] if scanned else listing.cursor), len(rows) > scan
    found = await pool.fetch(sql("list_jobs"), picked) if picked else []
    # A job whose status changed between the two reads is left out rather than shown under another status.
    jobs = [_job_json(row, LIST_FIELDS) for row in found if listing.status in (None, row["status"])]
    head = _dumps({"next_cursor": None if last is None else str(last), "more": more})
    return web.Response(
        text=head[:-1] + ', "jobs": [' + ", ".join(jobs) + "]}", content_type="application/json"
    )


def _listing(query: Mapping[str, str], principal: Principal) -> Listing:
    tenant = query.get("tenant") or principal.tenant_id
    if not principal.may_see(tenant or ""):
        raise Refusal(403, f"this token reads tenant {principal.tenant_id}'s jobs only")
    status = query.get("status") or None
    if status is not None and status not in statuses.JOB_STATUSES:
        raise Refusal(400, f"status must be one of {', '.join(statuses.JOB_STATUSES)}", field="status")
    limit = _bounded_int(query.get("limit"), LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, "limit")
    cursor = None
    if "cursor" in query:
        try:
            cursor = uuid.UUID(query["cursor"])
        except ValueError:
            raise Refusal(400, "cursor must be a next_cursor a listing gave", field="cursor") from None
    after = max(cursor or NIL_UUID, _since(query["since"]) if "since" in query else NIL_UUID)
    return Listing(tenant, after, cursor, status, limit)


def _since(text: str) -> uuid.UUID:
    """The largest id below every job made at or after `since` (an ISO 8601 time with a time zone, or a
    duration before now: 30m, 2h, 1d). A job's id begins with the milliseconds it was made at."""
    seconds = parse_duration(text)
    try:
        since = (
            datetime.now(UTC) - timedelta(seconds=seconds)
            if seconds is not None
            else datetime.fromisoformat(text)
        )
    except (ValueError, OverflowError):
        since = None
    if since is None or since.tzinfo is None:
        message = (
            "since must be an ISO 8601 time with a time zone (2026-12-01T12:00:00Z) or a duration: 30m, 2h"
        )
        raise Refusal(400, message, field="since")
    milliseconds = min(max(math.floor(since.timestamp() * 1000), 0), 2**48 - 1)
    return uuid.UUID(int=max((milliseconds << 80) - 1, 0))


async def cancel_job(request: web.Request) -> web.Response:
    """`DELETE /v1/jobs/{id}`: cancels a queued job, as a producer's `batchd.cancel_job` does. Another
    tenant's job is a 404, as on GET; a job no longer queued (in a batch, sent, finished) is a 409."""
    try:
        job_id = uuid.UUID(request.match_info["job_id"])
    except ValueError:
        return _error(404, "no such job")
    pool = request.app[POOL]
    tenant = await pool.fetchval(sql("job_tenant"), job_id)
    if tenant is None or not request[PRINCIPAL].may_see(tenant):
        return _error(404, "no such job")
    if not await pool.fetchval(sql("cancel_job"), job_id):
        row = await pool.fetchrow(sql("get_job"), job_id)
        if row is None:  # pruned meanwhile
            return _error(404, "no such job")
        message = f"the job is {row['status']}: only a queued job can be canceled"
        return Refusal(409, message, job_status=row["status"]).response()
    return web.json_response({"id": str(job_id), "status": statuses.JobStatus.CANCELED})


class Refusal(Exception):  # noqa: N818 - reads as the answer it is
    """A request of the jobs' API refused (for a POST: none of its jobs written): the HTTP status, the
    error's other members, and headers."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, **members: object
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.members = members

    def response(self) -> web.Response:
        body = {"error": {"status": self.status, "message": str(self), **self.members}}
        return web.json_response(body, status=self.status, dumps=_dumps, headers=self.headers)


async def post_jobs(request: web.Request) -> web.Response:
    """Producers' INSERT over HTTP: one job (a JSON object) or several (a JSON array), checked as `batchd
    enqueue` checks them (enqueue.py: the database's request_problem and the daemon's templates, in Python)
    and written in one transaction, all or none. A tenant's token writes that tenant's jobs only; the admin
    token names each job's tenant_id. A job whose idempotency key its tenant already holds is not added:
    the answer gives the holder's id (`enqueued`: false), so a retried POST never makes a job twice.

    The pool's role is batchd's own, which the database's producer checks (jobs_guard_insert) trust with
    every column: the strictness is here instead. A job may carry the producer contract's members only
    (any other is refused, naming it), and insert_jobs names only the columns a producer may write."""
    try:
        single, jobs = await _posted_jobs(request)
        ids, added = await _insert_posted(request, jobs)
    except Refusal as refusal:
        return refusal.response()
    answers = [{"id": str(job_id), "enqueued": new} for job_id, new in zip(ids, added, strict=True)]
    if single:
        response = web.json_response(answers[0], status=202)
        response.headers["Location"] = f"/v1/jobs/{ids[0]}"
        return response
    return web.json_response({"jobs": answers}, status=202)


async def _posted_jobs(request: web.Request) -> tuple[bool, list[enqueue.NewJob]]:
    """(whether the body is one job, its jobs checked), or the Refusal saying why not."""
    principal = request[PRINCIPAL]
    http = request.app[SETTINGS].http
    texts, single = _job_texts(await _body_text(request, http.max_post_bytes), http.max_post_jobs)
    key = _idempotency_header(request, single)
    defaults = enqueue.Defaults(
        tenant_id=principal.tenant_id, tenant_hint=" (the admin token names each job's)"
    )
    checker = request.app[CHECKER]
    jobs, problems = [], []
    for index, job_text in enumerate(texts):
        try:
            job = enqueue.check_job(job_text, checker, defaults)
        except enqueue.BadJob as error:
            problems.append({"index": index, "field": error.field, "message": str(error)})
            continue
        if not principal.may_see(job.tenant_id):
            raise Refusal(403, f"job {index}: this token writes tenant {principal.tenant_id}'s jobs only")
        if key is not None:
            if job.idempotency_key not in (None, key):
                raise Refusal(400, "the Idempotency-Key header and the job's idempotency_key differ")
            job = dataclasses.replace(job, idempotency_key=key)
        jobs.append(job)
    if problems:
        first = problems[0]
        message = f"job {first['index']}: {first['message']}" if not single else str(first["message"])
        if len(problems) > 1:
            message += f" (and {len(problems) - 1:,} more bad job(s); none was enqueued)"
        raise Refusal(400, message, problems=problems)
    return single, jobs


def _idempotency_header(request: web.Request, single: bool) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not single:
        raise Refusal(400, "the Idempotency-Key header goes with one job; give each job its idempotency_key")
    if key is not None and not key.strip():
        raise Refusal(400, "the Idempotency-Key header is empty")
    return key


def _job_texts(text: str, max_jobs: int) -> tuple[list[str], bool]:
    """(each job's JSON text, whether the body is one job rather than an array)."""
    start = len(text) - len(text.lstrip())
    if not text.startswith("[", start):
        return [text], True
    try:
        spans = list(enqueue.array_items(text, whole="the body"))
    except enqueue.BadInput as error:
        raise Refusal(400, str(error)) from None
    if not spans:
        raise Refusal(400, "the array holds no job")
    if len(spans) > max_jobs:
        raise Refusal(
            413, f"{len(spans):,} jobs; a request may carry at most {max_jobs:,} ([http] max_post_jobs)"
        )
    return [text[a:b] for a, b in spans], False


async def _body_text(request: web.Request, limit: int) -> str:
    too_large = Refusal(413, f"the body is larger than {limit:,} bytes ([http] max_post_bytes)")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.content.iter_any():  # read as it comes, refused as soon as it is too large
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return body.decode()
    except UnicodeDecodeError as error:
        raise Refusal(400, f"the body is not UTF-8: {error}") from None


async def _insert_posted(
    request: web.Request, jobs: list[enqueue.NewJob]
) -> tuple[list[uuid.UUID], list[bool]]:
    settings = request.app[SETTINGS]
    try:
        async with request.app[POOL].acquire() as connection:
            outcome = await enqueue.insert_jobs(connection, [(None, job) for job in jobs], holders=True)
    except asyncpg.ConfigurationLimitExceededError as error:
        # The tenant's max_queued. Queued jobs leave the queue when they are flushed, within max_wait_s.
        retry = str(max(1, math.ceil(settings.batching.max_wait_s)))
        raise Refusal(
            429, error.message, {"Retry-After": retry}, detail=error.detail, hint=error.hint
        ) from None
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as error:
        raise Refusal(400, f"the database refused the jobs: {error.message}", detail=error.detail) from None
    except DB_ERRORS as error:
        log.warning("http.enqueue_failed", error=str(error) or type(error).__name__)
        raise Refusal(503, "the database could not be written; try again shortly") from None
    if any(job_id is None for job_id in outcome.ids):
        # A key's holder gone between the INSERT and the look-up (pruned): a retry will add the job.
        raise Refusal(503, "a job holding an idempotency key went away meanwhile; try again")
    return [job_id for job_id in outcome.ids if job_id is not None], outcome.added


def _dumps(value: object) -> str:
    return json.dumps(value, default=_jsonable)


def _jsonable(value: object) -> object:
    """Times as ISO 8601 with `T` and their offset (what the events' `at` is, and what every browser's Date
    reads; str() gives a space); ids and the rest as their text."""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# -- webhooks: a tenant's own endpoints (webhooks.py; docs/webhooks.md) -------------------------------------

WEBHOOK_MEMBERS = frozenset({"url", "events", "tenant_id"})
WEBHOOK_POST_MAX_BYTES = 16_384
ENDPOINT_FIELDS = (
    "id",
    "tenant_id",
    "url",
    "events",
    "created_at",
    "disabled_at",
    "disabled_reason",
    "failures",
    "last_success_at",
    "pending",
)
DELIVERY_FIELDS = (
    "id",
    "webhook_id",
    "event_type",
    "status",
    "attempts",
    "created_at",
    "last_attempt_at",
    "next_attempt_at",
    "last_status",
    "last_error",
    "finished_at",
)
DELIVERIES_LIMIT_MAX = 1_000


def _endpoint_json(row: Mapping[str, object]) -> dict[str, object]:
    return {field: row["event_types"] if field == "events" else row[field] for field in ENDPOINT_FIELDS}


def _delivery_json(row: Mapping[str, object]) -> dict[str, object]:
    return {field: row["message_id"] if field == "webhook_id" else row[field] for field in DELIVERY_FIELDS}


async def list_webhooks(request: web.Request) -> web.Response:
    """`GET /v1/webhooks`: the principal's endpoints (the admin's: every tenant's, or `tenant`'s), without
    their secrets."""
    principal = request[PRINCIPAL]
    tenant = request.query.get("tenant")
    if tenant is not None and not principal.may_see(tenant):
        return _error(403, "a tenant's token lists its own endpoints only")
    rows = await webhooks.list_endpoints(request.app[POOL], tenant or principal.tenant_id)
    return web.json_response({"endpoints": [_endpoint_json(row) for row in rows]}, dumps=_dumps)


async def post_webhook(request: web.Request) -> web.Response:
    """`POST /v1/webhooks`: a new endpoint for the token's tenant (the admin names `tenant_id`); the answer
    holds its secret, the only time it is shown."""
    try:
        tenant, url, types = _posted_webhook(
            await _body_text(request, WEBHOOK_POST_MAX_BYTES), request[PRINCIPAL]
        )
        settings = request.app[SETTINGS].webhooks
        async with request.app[POOL].acquire() as connection:
            endpoint_id, secret = await webhooks.add_endpoint(
                connection,
                tenant,
                url,
                types,
                TargetPolicy.from_settings(settings),
                max_endpoints=settings.max_endpoints_per_tenant,
            )
    except Refusal as refusal:
        return refusal.response()
    except TargetRefused as error:
        return Refusal(400, f"refused url: {error}", field="url").response()
    except webhooks.TooManyEndpoints as error:
        return _error(409, str(error))
    answer = {"id": endpoint_id, "tenant_id": tenant, "url": url, "events": types, "secret": secret}
    response = web.json_response(answer, status=201)
    response.headers["Location"] = f"/v1/webhooks/{endpoint_id}"
    return response


def _posted_webhook(text: str, principal: Principal) -> tuple[str, str, list[str] | None]:
    """(tenant, url, event types or None for all) from a POST's body, or the Refusal saying why not."""
    try:
        body = json.loads(text)
    except ValueError as error:
        raise Refusal(400, f"the body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise Refusal(400, 'the body must be a JSON object: {"url", "events"}')
    unknown = sorted(set(body) - WEBHOOK_MEMBERS)
    if unknown:
        raise Refusal(400, f"unknown member {unknown[0]!r}", field=unknown[0])
    url, types, tenant = body.get("url"), body.get("events"), body.get("tenant_id", principal.tenant_id)
    if not isinstance(url, str):
        raise Refusal(400, "url must be a string: where the events go (http:// or https://)", field="url")
    types = None if types is None else _posted_event_types(types)
    if principal.is_admin and tenant is None:
        raise Refusal(400, "the admin token names the endpoint's tenant_id", field="tenant_id")
    if not isinstance(tenant, str) or not tenant or tenant != tenant.strip():
        raise Refusal(400, "tenant_id must be a tenant's name", field="tenant_id")
    if not principal.may_see(tenant):
        raise Refusal(403, f"this token adds tenant {principal.tenant_id}'s endpoints only")
    return tenant, url, types


def _posted_event_types(types: object) -> list[str]:
    if not isinstance(types, list) or not all(isinstance(kind, str) for kind in types):
        raise Refusal(400, "events must be an array of event types, or null for every type", field="events")
    try:
        return webhooks.check_event_types(types)
    except ValueError as error:
        raise Refusal(400, str(error), field="events") from None


async def _principals_endpoint(request: web.Request) -> dict[str, object]:
    """The endpoint the path names, if the principal's; else the Refusal (404 for another tenant's too)."""
    try:
        endpoint_id = int(request.match_info["endpoint_id"])
    except ValueError:
        raise Refusal(404, "no such webhook endpoint") from None
    row = None
    if 1 <= endpoint_id < 2**63:
        row = await webhooks.get_endpoint(request.app[POOL], endpoint_id)
    if row is None or not request[PRINCIPAL].may_see(str(row["tenant_id"])):
        raise Refusal(404, "no such webhook endpoint")
    return row


async def get_webhook(request: web.Request) -> web.Response:
    try:
        row = await _principals_endpoint(request)
    except Refusal as refusal:
        return refusal.response()
    return web.json_response(_endpoint_json(row), dumps=_dumps)


async def delete_webhook(request: web.Request) -> web.Response:
    """`DELETE /v1/webhooks/{id}`: the endpoint and its delivery log."""
    try:
        row = await _principals_endpoint(request)
    except Refusal as refusal:
        return refusal.response()
    removed = await webhooks.remove_endpoint(request.app[POOL], int(str(row["id"])))
    if not removed:  # removed meanwhile
        return _error(404, "no such webhook endpoint")
    return web.json_response({"id": row["id"], "removed": True})


async def webhook_deliveries(request: web.Request) -> web.Response:
    """`GET /v1/webhooks/{id}/deliveries`: its delivery log, newest event first."""
    try:
        row = await _principals_endpoint(request)
        status = request.query.get("status")
        if status is not None and status not in webhooks.STATUSES:
            raise Refusal(400, f"status must be one of {', '.join(webhooks.STATUSES)}", field="status")
        limit = _bounded_int(request.query.get("limit"), 100, DELIVERIES_LIMIT_MAX, "limit")
    except Refusal as refusal:
        return refusal.response()
    rows = await webhooks.deliveries(request.app[POOL], int(str(row["id"])), limit, status)
    return web.json_response({"deliveries": [_delivery_json(delivery) for delivery in rows]}, dumps=_dumps)


def _bounded_int(text: str | None, default: int, maximum: int, name: str) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0  # refused below, as a number out of range is
    if not 1 <= value <= maximum:
        raise Refusal(400, f"{name} must be a whole number from 1 to {maximum:,}", field=name)
    return value


async def retry_webhook(request: web.Request) -> web.Response:
    """`POST /v1/webhooks/{id}/retry`: enables the endpoint and sends its dead deliveries again."""
    try:
        row = await _principals_endpoint(request)
    except Refusal as refusal:
        return refusal.response()
    retried = await webhooks.retry_endpoint(request.app[POOL], int(str(row["id"])))
    if retried is None:  # removed meanwhile
        return _error(404, "no such webhook endpoint")
    return web.json_response({"id": row["id"], "enabled": True, "retried": retried})


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready, or which dependency is not. Anyone may ask (load balancers and health checks send no token),
    so the answer names the dependency and nothing of it: the driver's error would show the database's
    host, port, role or database name. That goes to the log. The API is named by its URL, which is no
    secret (the key never is), with the reason: the key refused (401 or 403), unreachable, not checked
    yet (health.py): a daemon that may send nothing is not ready."""
    problems = []
    try:
        await request.app[POOL].fetchval(sql("db_now"), timeout=2)
    except DB_ERRORS as error:
        log.warning("readyz.database_error", error=str(error) or type(error).__name__)
        problems.append("database: unavailable")
    if not request.app[READY_CHECK]():
        problems.append("listener: not connected")
    api = request.app[API_PROBLEM]()
    if api is not None:
        problems.append(api)
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


async def scrape(request: web.Request) -> web.Response:
    """Prometheus' scrape, in the text format (or OpenMetrics when asked for). The admin token only: the
    metrics name every tenant and its volume. Scrapes read the database at most once per
    `[http] metrics_interval_s`, however many come at once (readings.py)."""
    principal = await authenticate(request.app[POOL], _token(request), request.app[ADMIN_TOKEN])
    if principal is None:
        response = _error(401, "the admin token is required (Authorization: Bearer)")
        response.headers["WWW-Authenticate"] = 'Bearer realm="batchd"'
        return response
    if not principal.is_admin:
        return _error(403, "metrics are for the admin token only")
    metrics = request.app[METRICS]
    await request.app[READINGS].refresh(request.app[POOL])
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(metrics.registry), headers={"Content-Type": content_type})


async def events(request: web.Request) -> web.StreamResponse:
    return await stream_events(request, request[PRINCIPAL])


async def overview(request: web.Request) -> web.Response:
    """What the dashboard shows when it opens: queued jobs, open batches, totals, all of one snapshot, and
    the event id it was taken at (the page then asks for the events after it); and every job and batch
    status with the label the page shows for it. The snapshot is the daemon's shared reading (readings.py,
    at most once per `[http] overview_interval_s` for every asker): a request takes its principal's share."""
    principal = request[PRINCIPAL]
    readings = request.app[READINGS]
    snapshot = await readings.overview(request.app[POOL])
    if snapshot is None:
        response = _error(503, "the database could not be read; try again shortly")
        response.headers["Retry-After"] = str(max(1, math.ceil(readings.overview_interval_s)))
        return response
    view = snapshot.view(principal.tenant_id)
    body = {
        "tenant": principal.tenant_id,
        "admin": principal.is_admin,
        "last_event_id": view.last_event_id,
        "queued": view.queued,
        "open_batches": view.open_batches,
        "totals": view.totals,
        "budgets": view.budgets,
        "turnaround": snapshot.turnaround,
        "sync_last_hour": view.sync_last_hour,
        "statuses": statuses.described(),  # the page's names for them: it keeps no list of its own
    }
    return web.json_response(body, dumps=_dumps)


async def series(request: web.Request) -> web.Response:
    """What the dashboard's charts draw: per interval of the window (`?window=1h|1d|30d`: hours for the
    first two, UTC days for the last), the jobs finished by outcome and by path, spend and savings, the
    share sent in batches and the prompt cache's hit ratio; and per interval of its own (minutes for the last
    hour) the queue's depth and oldest wait, the routing p90 in use and batch turnaround p50/p90 (flow.py).
    The principal's own (every tenant's for the admin). Read from the rollups and the flow's history only,
    shared as the overview's snapshot is (readings.py)."""
    window = request.query.get("window", "1d")
    if window not in WINDOWS:
        return _error(400, f"window must be one of {', '.join(WINDOWS)}")
    principal = request[PRINCIPAL]
    readings = request.app[READINGS]
    reading = await readings.series(request.app[POOL], window)
    if reading is None:
        response = _error(503, "the database could not be read; try again shortly")
        response.headers["Retry-After"] = str(max(1, math.ceil(readings.overview_interval_s)))
        return response
    body: dict[str, object] = {
        "tenant": principal.tenant_id,
        "admin": principal.is_admin,
        "window": window,
        "interval": reading.interval,
        "intervals": reading.view(principal.tenant_id),
        "flow": {
            "interval": reading.flow.interval,
            "routing_margin_s": request.app[READINGS].routing_margin_s,
            "intervals": reading.flow.view(principal.tenant_id),
        },
    }
    if principal.is_admin:
        # Which tenant spent what is the admin's alone: a tenant's answer has no such key.
        body["spend_by_tenant"], body["spend_others"] = reading.spend_by_tenant()
    return web.json_response(body, dumps=_dumps)


async def who_am_i(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    return web.json_response({"tenant": principal.tenant_id, "admin": principal.is_admin})


async def no_cache_by_default(_request: web.Request, response: web.StreamResponse) -> None:
    # The page and its scripts must change together after an upgrade: browsers revalidate, never guess.
    response.headers.setdefault("Cache-Control", "no-cache")


async def start_session(request: web.Request) -> web.Response:
    """Turns the token the request authenticated with into an HttpOnly cookie, so that the dashboard's
    EventSource (which cannot send headers) is authenticated without a token in its URL. The cookie holds
    the token itself: scripts cannot read it (HttpOnly), other sites cannot send it (SameSite=Strict), it
    crosses the network only over HTTPS when it came so (Secure), and a browser drops it after Max-Age, so
    a forgotten browser is not signed in for good."""
    response = await who_am_i(request)
    response.set_cookie(
        TOKEN_COOKIE,
        _token(request) or "",
        httponly=True,
        samesite="Strict",
        secure=request.secure if request.app[SECURE_COOKIE] is None else request.app[SECURE_COOKIE],
        path="/",
        max_age=request.app[SESSION_MAX_AGE_S],
    )
    return response


async def end_session(_request: web.Request) -> web.Response:
    response = web.json_response({"signed_out": True})
    response.del_cookie(TOKEN_COOKIE, path="/")
    return response


async def openapi_document(_request: web.Request) -> web.Response:
    return web.Response(text=openapi.document_text(), content_type="application/json")


async def dashboard(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(DASHBOARD / "index.html", headers={"Cache-Control": "no-cache"})


def create_app(
    pool: asyncpg.Pool,
    ready: Callable[[], bool],
    admin_token: str | None = None,
    hub: EventHub | None = None,
    secure_cookie: bool | None = None,
    *,
    metrics: Metrics | None = None,
    readings: Readings | None = None,
    session_max_age_s: int = HttpSettings().session_max_age_s,
    api_problem: Callable[[], str | None] = lambda: None,
    settings: Settings | None = None,
) -> web.Application:
    """`settings`: the daemon's, for checking posted jobs as it will (its job types, its batches' size) and
    the [http] limits on a POST."""
    app = web.Application(middlewares=[authenticate_api])
    app[POOL] = pool
    app[READY_CHECK] = ready
    app[API_PROBLEM] = api_problem
    app[ADMIN_TOKEN] = admin_token
    app[SECURE_COOKIE] = secure_cookie
    app[SESSION_MAX_AGE_S] = session_max_age_s
    app[SETTINGS] = settings if settings is not None else Settings()
    app[CHECKER] = enqueue.Checker(app[SETTINGS])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    # The database's readings, for the overview and (registered on the metrics' registry) for /metrics.
    if readings is None:
        readings = Readings(metrics.registry if metrics is not None else CollectorRegistry())
    app[READINGS] = readings
    if metrics is not None:
        app[METRICS] = metrics
        app.router.add_get("/metrics", scrape)
    # Any segment reaches get_job, which reads every spelling uuid.UUID does and answers 404 in JSON for the
    # rest: aiohttp's default pattern refuses braces ({uuid} is one of those spellings) with a plain-text 404.
    app.router.add_get("/v1/jobs/{job_id:[^/]+}", get_job)
    app.router.add_delete("/v1/jobs/{job_id:[^/]+}", cancel_job)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_post("/v1/jobs", post_jobs)
    app.router.add_get("/v1/webhooks", list_webhooks)
    app.router.add_post("/v1/webhooks", post_webhook)
    app.router.add_get("/v1/webhooks/{endpoint_id:[^/]+}", get_webhook)
    app.router.add_delete("/v1/webhooks/{endpoint_id:[^/]+}", delete_webhook)
    app.router.add_get("/v1/webhooks/{endpoint_id:[^/]+}/deliveries", webhook_deliveries)
    app.router.add_post("/v1/webhooks/{endpoint_id:[^/]+}/retry", retry_webhook)
    app.router.add_get("/v1/overview", overview)
    app.router.add_get("/v1/series", series)
    app.router.add_get("/v1/session", who_am_i)
    app.router.add_post("/v1/session", start_session)
    app.router.add_delete("/v1/session", end_session)
    app.router.add_get("/v1/openapi.json", openapi_document)
    app.router.add_get("/", dashboard)
    app.router.add_static("/static/", DASHBOARD)
    app.on_response_prepare.append(no_cache_by_default)
    if hub is not None:
        app[HUB] = hub
        app.router.add_get("/v1/events", events)

        async def close_streams(_app: web.Application) -> None:
            await hub.close_all(STREAMS_CLOSE_TIMEOUT_S)

        app.on_shutdown.append(close_streams)
    return app
