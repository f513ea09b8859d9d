"""`/healthz` says the process answers; `/readyz` says the database and the listener are up."""

from __future__ import annotations

from typing import Any

import aiohttp
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
