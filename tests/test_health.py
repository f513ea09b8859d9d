"""`/healthz` says the process answers; `/readyz` says the database and the listener are up."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import structlog
from support import EmulatorHandle, wait_until

from batchd.daemon import Daemon


async def test_health_and_readiness(db: Any, emulator: EmulatorHandle, daemon_settings: Any) -> None:
    daemon = Daemon(daemon_settings())
    async with daemon.running(), aiohttp.ClientSession() as http:
        assert daemon.http_url is not None
        async with http.get(f"{daemon.http_url}/healthz") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok"}
        async with http.get(f"{daemon.http_url}/readyz") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ready"}

        # The listener's connection cut: not ready until it is back.
        assert daemon.listener is not None
        daemon.listener.connected.clear()
        async with http.get(f"{daemon.http_url}/readyz") as response:
            assert response.status == 503
            assert "listener: not connected" in (await response.json())["problems"]
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'batchd-listener' AND datname = current_database()"
        )

        async def ready_again() -> bool:
            async with http.get(f"{daemon.http_url}/readyz") as again:
                return again.status == 200

        await wait_until(ready_again, timeout=20)
        assert daemon.listener.reconnects >= 1


async def test_readyz_is_503_while_the_database_is_unreachable_and_200_once_it_is_back(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, database_url: str
) -> None:
    """The daemon connects as a role of its own; the test makes it NOLOGIN and cuts its connections, so the
    database is out of the daemon's reach (and only the daemon's), then lets it log in again."""
    role = f"batchd_readyz_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
    url = database_url.replace("postgres@", f"{role}@", 1)
    assert role in url
    try:
        daemon = Daemon(daemon_settings(database={"url": url, "pool_max_size": 5}))
        async with daemon.running(), aiohttp.ClientSession() as http:
            assert daemon.http_url is not None

            async def readyz() -> tuple[int, Any]:
                async with http.get(f"{daemon.http_url}/readyz") as response:
                    return response.status, await response.json()

            assert await readyz() == (200, {"status": "ready"})
            await db.execute(f"ALTER ROLE {role} NOLOGIN")
            await db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
            )

            async def unreachable() -> bool:
                status, body = await readyz()
                return status == 503 and "database: unavailable" in body["problems"]

            with structlog.testing.capture_logs() as logged:
                await wait_until(unreachable, timeout=20)
                async with http.get(f"{daemon.http_url}/readyz") as response:
                    status, text = response.status, await response.text()
            assert await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role) == 0
            # Anyone may ask /readyz: it names the dependency, never the driver's error, which names the
            # role, the database's host and port. The log has the error.
            assert status == 503
            body = json.loads(text)
            assert body["status"] == "unavailable"
            # The listener, which logs in as the same role, may be down too.
            assert "database: unavailable" in body["problems"]
            assert set(body["problems"]) <= {"database: unavailable", "listener: not connected"}, body
            errors = [entry["error"] for entry in logged if entry["event"] == "readyz.database_error"]
            assert errors, logged
            assert all(
                entry["log_level"] == "warning"
                for entry in logged
                if entry["event"] == "readyz.database_error"
            )
            host, port = database_url.rpartition("@")[2].split("/")[0].split(":")
            for secret in (role, host, port, *errors):
                assert secret not in text, (secret, text)

            await db.execute(f"ALTER ROLE {role} LOGIN")

            async def ready_again() -> bool:
                return await readyz() == (200, {"status": "ready"})

            await wait_until(ready_again, timeout=30)
    finally:
        await db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        await db.execute(f"DROP ROLE IF EXISTS {role}")
