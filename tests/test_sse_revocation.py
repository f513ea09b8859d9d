"""A revoked token's open event streams end (`event: disconnect`, reason `revoked`) on every instance sharing
the database, and no other stream does: not another tenant's, not the admin's."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sse_support import Collector, add_events, carried_events, sse_stream
from support import ADMIN_TOKEN, run_python, wait_until

from batchd import tenants

# The deadline for a revoked stream to end. With a NOTIFY it is a matter of milliseconds; the slack is for a
# loaded machine. The tests that rely on the notification poll every 60 s, so only the notification can end
# their streams in time.
ENDS_WITHIN_S = 10.0
NO_POLL = {"poll_interval_s": 60.0}


@pytest.fixture
def cli_config(database_url: str, tmp_path: Path) -> Path:
    """A batchd.toml for the operator's commands."""
    config = tmp_path / "batchd.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n')
    return config


async def ended_revoked(stream: Collector) -> None:
    """The stream ends, within the deadline, with `event: disconnect` (reason revoked) and no id."""
    await wait_until(lambda: _is_set(stream), timeout=ENDS_WITHIN_S)
    final = stream.messages[-1]
    assert final.event == "disconnect", stream.messages[-3:]
    assert final.id is None, "a disconnect carries no id: the client's last id stands"
    assert json.loads(final.data)["reason"] == "revoked"


async def _is_set(stream: Collector) -> bool:
    return stream.ended.is_set()


async def status_of(session: aiohttp.ClientSession, url: str, token: str, last_event_id: int | None) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    async with session.get(f"{url}/v1/events", headers=headers) as response:
        return response.status


async def test_revoking_a_tenant_ends_its_open_streams_and_no_one_elses(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    async with serve(**NO_POLL) as (daemon, url), AsyncExitStack() as streams:
        hub = daemon.hub
        assert hub is not None
        acme = await streams.enter_async_context(sse_stream(session, url, tokens["acme"]))
        # The same token in the query (EventSource's last resort), resuming from the start: replayed, then
        # live.
        acme_query = await streams.enter_async_context(
            sse_stream(
                session, url, None, last_event_id=0, in_query=True, query={"access_token": tokens["acme"]}
            )
        )
        globex = await streams.enter_async_context(sse_stream(session, url, tokens["globex"]))
        admin = await streams.enter_async_context(sse_stream(session, url, ADMIN_TOKEN))
        await add_events(db, "acme", 3)
        await add_events(db, "globex", 2)
        for stream, count in ((acme, 3), (acme_query, 3), (globex, 2), (admin, 5)):
            await stream.until(carried_events(count))

        assert await tenants.revoke(db, "acme") == 1  # what `batchd tenant revoke acme` does
        await ended_revoked(acme)
        await ended_revoked(acme_query)
        assert hub.revoked == 2
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with session.get(f"{url}/metrics", headers=headers) as response:
            assert "batchd_sse_streams_revoked_total 2.0" in (await response.text()).splitlines()

        # The others go on: new events reach them, and they are still open.
        await add_events(db, "globex", 1)
        await globex.until(lambda c: len(c.ids) == 3)
        await admin.until(lambda c: len(c.ids) == 6)
        assert not globex.ended.is_set()
        assert not admin.ended.is_set()
        assert [m.event for m in globex.events] == ["job.canceled"] * 3
        # Reconnecting as EventSource would (with its last id) is refused: the token stands for no one.
        assert await status_of(session, url, tokens["acme"], acme.last_id) == 401
        assert await status_of(session, url, tokens["globex"], None) == 200


async def test_a_revocation_ends_the_streams_of_every_instance_sharing_the_database(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession, cli_config: Path
) -> None:
    async with serve(**NO_POLL) as (first, first_url), serve(**NO_POLL) as (second, second_url):
        async with AsyncExitStack() as streams:
            on_first = await streams.enter_async_context(sse_stream(session, first_url, tokens["acme"]))
            on_second = await streams.enter_async_context(sse_stream(session, second_url, tokens["acme"]))
            globex = await streams.enter_async_context(sse_stream(session, second_url, tokens["globex"]))
            admin = await streams.enter_async_context(sse_stream(session, second_url, ADMIN_TOKEN))
            # By the command, in a process of its own: neither daemon hears of it but through the database.
            code, out, err = await run_python(
                "-m",
                "batchd",
                "tenant",
                "revoke",
                "acme",
                "--config",
                str(cli_config),
                env={"PATH": "/usr/bin:/bin"},
            )
            assert (code, out.strip()) == (0, "revoked 1 token(s) of 'acme'"), err
            await ended_revoked(on_first)
            await ended_revoked(on_second)
            await add_events(db, "globex", 1)
            await globex.until(lambda c: len(c.ids) == 1)
            await admin.until(lambda c: len(c.ids) == 1)
            assert not globex.ended.is_set()
            assert not admin.ended.is_set()
            for url in (first_url, second_url):
                assert await status_of(session, url, tokens["acme"], None) == 401
        assert first.hub is not None
        assert second.hub is not None
        assert (first.hub.revoked, second.hub.revoked) == (1, 1)


async def test_without_a_notification_the_periodic_check_ends_the_stream(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    """A notification lost (its listener was reconnecting): the hub's own check, every poll_interval_s."""
    async with serve(poll_interval_s=1.0) as (_, url), sse_stream(session, url, tokens["acme"]) as acme:
        async with db.transaction():
            # No trigger fires in this transaction: the revocation sends no NOTIFY.
            await db.execute("SET LOCAL session_replication_role = replica")
            await db.execute("UPDATE batchd.tokens SET revoked_at = now() WHERE tenant_id = 'acme'")
        await ended_revoked(acme)
