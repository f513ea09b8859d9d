"""batchd's HTTP server: `/healthz` (the process answers), `/readyz` (database and listener up, and the API
taking the key; both without a token, so they reveal nothing but that and the API's URL), the
tenant-scoped API under `/v1/` (jobs, the dashboard's overview, the SSE stream of sse.py), `/metrics`
(Prometheus, admin token only: it names every tenant) and the dashboard itself at `/` (static files from
batchd/dashboard/).

A token comes as `Authorization: Bearer …` (preferred: it stays out of logs), or, for a browser's
EventSource, which cannot set headers, as the `access_token` query parameter (it ends up in proxy and
access logs: use short-lived tokens there) or the `batchd_token` cookie (HttpOnly, set by the page).
No token or a bad one: 401. A job of another tenant: 404, the same as one that does not exist.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import asyncpg
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from . import statuses
from .config import HttpSettings
from .events import EventHub
from .metrics import Metrics
from .readings import WINDOWS, Readings
from .sse import HUB, stream_events
from .store import DB_ERRORS, sql
from .tenants import Principal, authenticate

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
TOKEN_COOKIE = "batchd_token"  # noqa: S105 - the cookie's name, not a secret
DASHBOARD = Path(__file__).parent / "dashboard"
STREAMS_CLOSE_TIMEOUT_S = 3.0
JOB_JSON_FIELDS = ("metadata", "error", "usage", "result")
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


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"status": status, "message": message}}, status=status)


def _token(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get("access_token") or request.cookies.get(TOKEN_COOKIE) or None


@web.middleware
async def authenticate_api(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/") or (request.method == "DELETE" and request.path == "/v1/session"):
        return await handler(request)  # signing out must work with a revoked token too
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
    # The jsonb columns come as the database's own text, spliced in as they are (see the query).
    fields = {field: row[field] for field in JOB_FIELDS if field not in JOB_JSON_FIELDS}
    spliced = "".join(f', "{field}": {row[field] or "null"}' for field in JOB_JSON_FIELDS)
    return web.Response(text=_dumps(fields)[:-1] + spliced + "}", content_type="application/json")


def _dumps(value: object) -> str:
    return json.dumps(value, default=_jsonable)


def _jsonable(value: object) -> object:
    """Times as ISO 8601 with `T` and their offset (what the events' `at` is, and what every browser's Date
    reads; str() gives a space); ids and the rest as their text."""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


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
        "statuses": statuses.described(),  # the page's names for them: it keeps no list of its own
    }
    return web.json_response(body, dumps=_dumps)


async def series(request: web.Request) -> web.Response:
    """What the dashboard's charts draw: per interval of the window (`?window=1h|1d|30d`: hours for the
    first two, UTC days for the last), the jobs finished by outcome and by path, spend and savings, the
    share sent in batches and the prompt cache's hit ratio; the principal's own (every tenant's for the
    admin). Read from the rollups only, shared as the overview's snapshot is (readings.py)."""
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
    body = {
        "tenant": principal.tenant_id,
        "admin": principal.is_admin,
        "window": window,
        "interval": reading.interval,
        "intervals": reading.view(principal.tenant_id),
    }
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
) -> web.Application:
    app = web.Application(middlewares=[authenticate_api])
    app[POOL] = pool
    app[READY_CHECK] = ready
    app[API_PROBLEM] = api_problem
    app[ADMIN_TOKEN] = admin_token
    app[SECURE_COOKIE] = secure_cookie
    app[SESSION_MAX_AGE_S] = session_max_age_s
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
    app.router.add_get("/v1/overview", overview)
    app.router.add_get("/v1/series", series)
    app.router.add_get("/v1/session", who_am_i)
    app.router.add_post("/v1/session", start_session)
    app.router.add_delete("/v1/session", end_session)
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
