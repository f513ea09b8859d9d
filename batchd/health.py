"""batchd's small HTTP server: `/healthz` (the process answers) and `/readyz` (database and listener up)."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
from aiohttp import web

from .store import sql

READY_CHECK: web.AppKey[Callable[[], bool]] = web.AppKey("ready_check")
POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool")


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


def create_health_app(pool: asyncpg.Pool, ready: Callable[[], bool]) -> web.Application:
    app = web.Application()
    app[POOL] = pool
    app[READY_CHECK] = ready
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
