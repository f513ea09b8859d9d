"""`/healthz` says the process answers; `/readyz` says the database and the listener are up, and the API
takes the key. A refused key or an API that does not answer leaves the daemon running, not ready, sending
nothing and spending no job's attempt, until a check passes; each daemon keeps a row in batchd.instances
while it runs, which `batchd status` lists."""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from support import QUICK, EmulatorHandle, insert_raw, make_settings, raw_request, wait_for_jobs, wait_until

from batchd import __version__, pruner, status
from batchd.daemon import Daemon
from batchd.emulator import serve


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


# -- the API's key ------------------------------------------------------------------------------------------

RIGHT_KEY = "sk-ant-the-right-one"
WRONG_KEY = "sk-ant-a-wrong-one"


async def readyz(http: aiohttp.ClientSession, url: str | None) -> tuple[int, Any]:
    async with http.get(f"{url}/readyz") as response:
        return response.status, await response.json()


async def insert_sync(db: Any, text: str) -> Any:
    """A job routed through the synchronous Messages API."""
    return await db.fetchval(
        "INSERT INTO batchd.jobs (tenant_id, request, route) VALUES ('acme', $1, 'sync') RETURNING id",
        raw_request(text),
    )


async def jobs_by_status(db: Any) -> dict[str, list[int]]:
    """Each status, with the attempts of its jobs."""
    found: dict[str, list[int]] = {}
    for row in await db.fetch("SELECT status, attempts FROM batchd.jobs ORDER BY seq"):
        found.setdefault(row["status"], []).append(row["attempts"])
    return found


@pytest.mark.parametrize("emulator_config", [QUICK.model_copy(update={"api_key": RIGHT_KEY})])
async def test_a_refused_key_is_not_ready_sends_nothing_and_a_fixed_key_file_makes_it_ready(
    db: Any,
    emulator: EmulatorHandle,
    daemon_settings: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    key_file = tmp_path / "anthropic-key"
    key_file.write_text(WRONG_KEY + "\n")
    settings = daemon_settings(anthropic={"api_key_file": str(key_file)}, daemon={"retry_min_s": 0.2})
    await insert_raw(db, "acme", ["batched one", "batched two"])
    await insert_sync(db, "in a hurry")
    with structlog.testing.capture_logs() as logged:
        daemon = Daemon(settings)
        async with daemon.running(), aiohttp.ClientSession() as http:
            # Ready to serve, not ready to work: the API and the reason, never the key.
            code, body = await readyz(http, daemon.http_url)
            assert (code, body) == (
                503,
                {"status": "unavailable", "problems": [f"api {emulator.url}: the API key was refused (401)"]},
            )

            async def checked_again_twice() -> bool:
                return int((await emulator.stats())["statuses"].get("list 401", 0)) >= 3

            await wait_until(checked_again_twice, timeout=20)
            # Meanwhile nothing was sent: no batch, no sync call; every job queued with its attempts whole.
            assert await jobs_by_status(db) == {"queued": [0, 0, 0]}
            assert await db.fetchval("SELECT count(*) FROM batchd.batches") == 0
            calls = (await emulator.stats())["statuses"]
            assert set(calls) == {"list 401"}, calls

            # `batchd status` says it plainly, on the daemon's line.
            report = await status.collect(db)
            (row,) = report["daemons"]
            assert daemon.ctx is not None
            assert (row["instance_id"], row["api_state"]) == (daemon.ctx.instance_id, "refused")
            text = status.render(report)
            assert f"API {emulator.url}: THE API KEY IS REFUSED: the API key was refused (401)" in text

            # The operator fixes the key file: read again at the next check, no restart.
            key_file.write_text(RIGHT_KEY + "\n")

            async def ready() -> bool:
                return await readyz(http, daemon.http_url) == (200, {"status": "ready"})

            await wait_until(ready, timeout=20)
            assert await wait_for_jobs(db, done=3, timeout=30) == {"succeeded": 3}
            assert await jobs_by_status(db) == {"succeeded": [0, 0, 0]}, "no attempt was spent on the key"
        assert await db.fetchval("SELECT count(*) FROM batchd.instances") == 0, "its row goes with it"
    events = [entry["event"] for entry in logged]
    # Logged once when it happened, not at every check; then the key read again, and the API ok.
    assert events.count("api.key_refused") == 1, events
    assert events.index("api.key_refused") < events.index("api.key_reloaded") < events.index("api.ok")
    refused = next(entry for entry in logged if entry["event"] == "api.key_refused")
    assert refused["log_level"] == "error"
    assert (refused["status"], refused["endpoint"], refused["api"]) == (401, "list", emulator.url)
    ready_line = next(entry for entry in logged if entry["event"] == "daemon.ready")
    assert ready_line["api_state"] == "refused"
    assert WRONG_KEY not in repr(logged)
    assert RIGHT_KEY not in repr(logged)


@pytest.mark.parametrize("emulator_config", [QUICK])
async def test_a_401_to_any_call_holds_everything_until_a_check_passes_and_spends_no_attempt(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    """A key refused while the daemon runs (revoked, say): the create and the sync call that met the 401
    are tried again once a check passes, and no job counts an attempt for it."""
    await emulator.set_faults(
        http=[
            {"endpoint": "create", "status": 401, "count": 1},
            {"endpoint": "messages", "status": 401, "count": 1},
        ]
    )
    with structlog.testing.capture_logs() as logged:
        async with start_daemon(daemon_settings(daemon={"retry_min_s": 0.2})):
            await insert_raw(db, "acme", [f"question {i}" for i in range(5)])
            await insert_sync(db, "in a hurry")
            assert await wait_for_jobs(db, done=6, timeout=30) == {"succeeded": 6}
    assert await jobs_by_status(db) == {"succeeded": [0] * 6}
    statuses = (await emulator.stats())["statuses"]
    assert (statuses.get("create 401"), statuses.get("messages 401")) == (1, 1), statuses
    assert statuses.get("create 200") == 1
    refusals = [entry for entry in logged if entry["event"] == "api.key_refused"]
    assert refusals, "the 401 marked the API refused"
    assert {entry["endpoint"] for entry in refusals} <= {"create", "messages"}
    events = [entry["event"] for entry in logged]
    assert "sync.handed_back" in events
    assert events.index("api.key_refused") < len(events) - 1 - events[::-1].index("api.ok")
    assert "job.failed" not in events


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_an_api_unreachable_at_start_does_not_stop_the_start_and_holds_the_jobs_until_it_answers(
    db: Any, database_url: str, monkeypatch: pytest.MonkeyPatch, fail_on_task_errors: None
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    (job,) = await insert_raw(db, "acme", ["anyone there?"])
    daemon = Daemon(make_settings(database_url, url, daemon={"retry_min_s": 0.2}))
    async with daemon.running(), aiohttp.ClientSession() as http:
        code, body = await readyz(http, daemon.http_url)
        assert code == 503
        (problem,) = body["problems"]
        assert problem.startswith(f"api {url}: unreachable: "), problem
        assert await db.fetchval("SELECT status FROM batchd.jobs WHERE id = $1", job) == "queued"
        assert await db.fetchval("SELECT api_state FROM batchd.instances") == "unreachable"

        async with serve(QUICK.model_copy(update={"port": port})):

            async def ready() -> bool:
                return await readyz(http, daemon.http_url) == (200, {"status": "ready"})

            await wait_until(ready, timeout=20)
            assert await wait_for_jobs(db, done=1, timeout=30) == {"succeeded": 1}


async def test_a_base_url_that_is_not_the_api_is_not_ready_and_says_so(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any
) -> None:
    """A server that answers, but not as the API (here the emulator under a path it does not serve: 404)."""
    url = f"{emulator.url}/not-the-api"
    daemon = Daemon(daemon_settings(anthropic={"base_url": url}))
    async with daemon.running(), aiohttp.ClientSession() as http:
        code, body = await readyz(http, daemon.http_url)
    assert code == 503
    (problem,) = body["problems"]
    assert problem.startswith(f"api {url}"), problem
    assert problem.endswith("unreachable: answered 404: is [anthropic] base_url the API?"), problem


# -- the daemons' rows --------------------------------------------------------------------------------------


async def test_a_daemon_has_a_row_that_heartbeats_counts_its_leases_and_goes_when_it_stops(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any
) -> None:
    daemon = Daemon(daemon_settings(daemon={"lease_s": 1.5}), serve_http=False)
    async with daemon.running():
        assert daemon.ctx is not None
        row = await db.fetchrow("SELECT * FROM batchd.instances")
        assert row is not None
        assert (row["instance_id"], row["host"], row["pid"], row["version"]) == (
            daemon.ctx.instance_id,
            socket.gethostname(),
            os.getpid(),
            __version__,
        )
        assert (row["api_url"], row["api_state"], row["heartbeat_s"]) == (emulator.url, "ok", 0.5)
        assert row["api_checked_at"] is not None

        async def beat() -> bool:
            later = "SELECT heartbeat_at > $1 FROM batchd.instances"
            return bool(await db.fetchval(later, row["heartbeat_at"]))

        await wait_until(beat, timeout=10)

        # A batch in flight (the emulator's batches take a minute of its clock): the daemon's lease.
        await insert_raw(db, "acme", ["a question"])

        async def leasing() -> bool:
            report: status.Report = {}
            await status.collect_daemons(db, report)
            (daemon_row,) = report["daemons"]
            return bool(daemon_row["batches_leased"] == 1)

        await wait_until(leasing, timeout=10)
        text = status.render(await status.collect(db))
        assert f"  {daemon.ctx.instance_id}  on {socket.gethostname()} (pid {os.getpid()}" in text
        assert "leases: 1 batch, 0 sync jobs" in text
        assert f"API {emulator.url}: ok (checked " in text
        assert "SILENT" not in text
    assert await db.fetchval("SELECT count(*) FROM batchd.instances") == 0


async def add_instance(db: Any, instance_id: str, silent_s: float) -> None:
    await db.execute(
        "INSERT INTO batchd.instances (instance_id, host, pid, version, started_at, heartbeat_at,"
        " heartbeat_s, api_url, api_state) VALUES ($1, 'elsewhere', 42, '0.1.0', now() - interval '3 days',"
        " now() - make_interval(secs => $2), 20, 'https://api.anthropic.com', 'ok')",
        instance_id,
        silent_s,
    )


async def test_a_dead_daemons_row_shows_silent_then_is_pruned_a_day_after_its_last_heartbeat(db: Any) -> None:
    await add_instance(db, "batchd-alive", 5)
    await add_instance(db, "batchd-stuck", 300)  # three heartbeats missed
    await add_instance(db, "batchd-dead", 86_400 + 60)
    text = status.render(await status.collect(db))
    silent = [line for line in text.splitlines() if "SILENT" in line]
    assert len(silent) == 2, text
    assert re.search(r"last heartbeat 5m 0\ds ago — SILENT", text), text
    assert await pruner.prune_instances(db, chunk=1) == 1
    kept = await db.fetch("SELECT instance_id FROM batchd.instances ORDER BY instance_id")
    assert [row["instance_id"] for row in kept] == ["batchd-alive", "batchd-stuck"]
    assert await pruner.prune_instances(db, chunk=1) == 0
