"""batchd's HTTP server: `/healthz` (the process answers), `/readyz` (database and listener up), and the
tenant-scoped API under `/v1/`.

A token comes as `Authorization: Bearer …` (preferred: it stays out of logs), or, for a browser's
EventSource, which cannot set headers, as the `access_token` query parameter (it ends up in proxy and
access logs: use short-lived tokens there) or the `batchd_token` cookie (HttpOnly, set by the page).
No token or a bad one: 401. A job of another tenant: 404, the same as one that does not exist.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler

from .store import sql
from .tenants import Principal, authenticate

READY_CHECK: web.AppKey[Callable[[], bool]] = web.AppKey("ready_check")
POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool")
ADMIN_TOKEN: web.AppKey[str | None] = web.AppKey("admin_token")
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)
TOKEN_COOKIE = "batchd_token"  # noqa: S105 - the cookie's name, not a secret
JOB_FIELDS = (
    "id",
    "tenant_id",
    "status",
    "attempts",
    "batch_id",
    "job_type",
    "metadata",
    "error",
    "usage",
    "result",
    "created_at",
    "submitted_at",
    "completed_at",
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
    if not request.path.startswith("/v1/"):
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
    return web.json_response({field: row[field] for field in JOB_FIELDS}, dumps=_dumps)


def _dumps(value: object) -> str:
    return json.dumps(value, default=str)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    problems = []
    try:
        await request.app[POOL].fetchval(sql("db_now"), timeout=2)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
        problems.append(f"database: {error}")
    if not request.app[READY_CHECK]():
        problems.append("listener: not connected")
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


def create_app(
    pool: asyncpg.Pool, ready: Callable[[], bool], admin_token: str | None = None
) -> web.Application:
    app = web.Application(middlewares=[authenticate_api])
    app[POOL] = pool
    app[READY_CHECK] = ready
    app[ADMIN_TOKEN] = admin_token
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/jobs/{job_id}", get_job)
    return app
