"""Event ids that tell a tenant nothing of other tenants (migration 0009): a tenant's stream carries its own
gap-free count (tenant_seq), the admin's the log's seq; either resumes exactly from any id, on any instance;
an id the tenant was never sent gets `event: reset`, never another tenant's events; ids sent before the
upgrade still resume exactly after it."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from sse_support import add_events, carried, ends_at, logged, sse_stream
from support import ADMIN_TOKEN, make_settings, wait_until

from batchd import migrate, tenants
from batchd.config import EventsSettings
from batchd.daemon import Daemon
from batchd.events import EventHub
from batchd.server import create_app
from batchd.store import create_pool, init_connection, sql

# Each tenant's events come in runs between the other's: (tenant, how many).
INTERLEAVED = [
    ("acme", 3),
    ("globex", 5),
    ("acme", 2),
    ("globex", 7),
    ("acme", 1),
    ("globex", 1),
    ("acme", 4),
]


async def interleave(db: Any, runs: list[tuple[str, int]]) -> None:
    """Each run published on its own, so that the tenants' events alternate in the log."""
    for tenant, count in runs:
        await add_events(db, tenant, count, notify=False)
        await db.execute("SELECT batchd.publish_events(1000)")


def counts(runs: list[tuple[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for tenant, count in runs:
        total[tenant] = total.get(tenant, 0) + count
    return total


async def test_a_tenants_ids_count_its_own_events_and_resume_exactly_from_every_id_on_either_instance(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    per_tenant = counts(INTERLEAVED)
    async with serve() as (_, first), serve() as (_, second), AsyncExitStack() as streams:
        acme = await streams.enter_async_context(sse_stream(session, first, tokens["acme"]))
        globex = await streams.enter_async_context(sse_stream(session, second, tokens["globex"]))
        admin = await streams.enter_async_context(sse_stream(session, second, ADMIN_TOKEN))
        await interleave(db, INTERLEAVED)
        await db.execute("NOTIFY batchd_published")
        await acme.until(lambda c: len(c.ids) == per_tenant["acme"])
        await globex.until(lambda c: len(c.ids) == per_tenant["globex"])
        await admin.until(lambda c: len(c.ids) == sum(per_tenant.values()))
        logs = {name: await logged(db, name) for name in ("acme", "globex")}
        logs["admin"] = await logged(db)
        live = {"acme": acme, "globex": globex, "admin": admin}

        # Live, each tenant's ids are 1, 2, 3, ...: its own count, with no gap where the other's events went.
        # The same for acme whatever globex did: its ids say nothing of globex's volume.
        assert acme.ids == list(range(1, per_tenant["acme"] + 1))
        assert globex.ids == list(range(1, per_tenant["globex"] + 1))
        assert admin.ids == list(range(1, sum(per_tenant.values()) + 1)), "the admin's are the log's"
        for name, stream in live.items():
            assert carried(stream) == logs[name], name
        assert {d["tenant"] for d in acme.data()} == {"acme"}
        assert {d["tenant"] for d in globex.data()} == {"globex"}

        # Resuming after every id, alternately on each instance and by header or query: exactly the rest.
        tokens_of = {"acme": tokens["acme"], "globex": tokens["globex"], "admin": ADMIN_TOKEN}
        for name, log in logs.items():
            for index in range(len(log)):
                last = log[index - 1][0] if index else 0
                url = (first, second)[index % 2]
                async with sse_stream(
                    session, url, tokens_of[name], last_event_id=last, in_query=index % 3 == 0
                ) as resumed:
                    await resumed.until(ends_at(log[-1][0]))
                assert carried(resumed) == log[index:], (name, last)
                assert not [m for m in resumed.events if m.event == "reset"], (name, last)

        # After the last id of each: nothing until the next event, then that event once.
        at_end = {
            name: await streams.enter_async_context(
                sse_stream(session, (first, second)[n % 2], tokens_of[name], last_event_id=logs[name][-1][0])
            )
            for n, name in enumerate(logs)
        }
        await interleave(db, [("globex", 1), ("acme", 1)])
        await db.execute("NOTIFY batchd_published")
        after = {name: await logged(db, None if name == "admin" else name) for name in logs}
        for name, stream in at_end.items():
            await stream.until(ends_at(after[name][-1][0]))
            assert carried(stream) == after[name][len(logs[name]) :], name
        assert at_end["acme"].ids == [per_tenant["acme"] + 1]
        assert at_end["admin"].ids == [len(logs["admin"]) + 1, len(logs["admin"]) + 2]


async def test_an_id_a_tenant_was_never_sent_gets_a_reset_to_its_own_position_and_nothing_of_others(
    db: Any, tokens: dict[str, str], serve: Any, session: aiohttp.ClientSession
) -> None:
    per_tenant = counts(INTERLEAVED)
    await interleave(db, INTERLEAVED)
    head = sum(per_tenant.values())
    async with serve() as (_, url):
        # Past acme's own count but within the log's (an id of globex's or the admin's): never acme's. The
        # largest id the header may hold must not overflow anything either.
        for forged in (per_tenant["acme"] + 1, head, 2**63 - 1):
            async with sse_stream(session, url, tokens["acme"], last_event_id=forged) as stream:
                await stream.until(lambda c: bool(c.events))
                reset = stream.events[0]
                assert reset.event == "reset", forged
                assert reset.id == str(per_tenant["acme"]), "acme's own last id, not the log's head"
                data = json.loads(reset.data)
                assert data["last_event_id"] == forged
                assert data["resume_from"] == per_tenant["acme"]
                await add_events(db, "globex", 1)
                await add_events(db, "acme", 1)
                per_tenant["acme"] += 1
                await stream.until(ends_at(per_tenant["acme"]))
            assert [m.event for m in stream.events] == ["reset", "job.canceled"], forged
            assert {json.loads(m.data)["tenant"] for m in stream.events if m.event != "reset"} == {"acme"}


async def test_a_resume_on_an_instance_whose_hub_is_behind_sends_nothing_twice(
    db: Any, tokens: dict[str, str], database_url: str, session: aiohttp.ClientSession
) -> None:
    """The client was sent up to its id by an instance further on than this one: this hub has not yet
    fanned out events the client already has."""
    await interleave(db, INTERLEAVED)
    pool = await create_pool(database_url, max_size=3)
    hub = EventHub(pool, EventsSettings(poll_interval_s=60.0))  # not started: its head stays at 0
    runner = web.AppRunner(create_app(pool, lambda: True, ADMIN_TOKEN, hub), handler_cancellation=True)
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        acme_log = await logged(db, "acme")
        for index, name in ((3, "acme"), (9, "admin")):
            token = tokens["acme"] if name == "acme" else ADMIN_TOKEN
            log = acme_log if name == "acme" else await logged(db)
            last = log[index - 1][0]
            async with sse_stream(session, url, token, last_event_id=last) as stream:
                await wait_until(_holds(lambda: hub.subscribers == 1))
                await hub._catch_up()  # the hub's one step, driven by hand
                await stream.until(ends_at(log[-1][0]))
            assert carried(stream) == log[index:], name
            await wait_until(_holds(lambda: hub.subscribers == 0))
            hub.head = 0  # behind again, for the next stream
    finally:
        await runner.cleanup()
        await pool.close()


def _holds(check: Any) -> Any:
    async def condition() -> bool:
        return bool(check())

    return condition


async def test_ids_sent_before_the_upgrade_still_resume_exactly_after_it(
    blank_database_url: str, emulator: Any, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection = await asyncpg.connect(blank_database_url)
    try:
        await init_connection(connection)
        # The schema as it was before 0009, its events published and their ids sent as the log's seq.
        before = [m for m in migrate.shipped_migrations() if m.version < 9]
        await connection.execute(sql("create_migrations_table"))
        for migration in before:
            await connection.execute(migration.text)
            await connection.execute(
                sql("record_migration"), migration.version, migration.name, migration.checksum
            )
        await interleave(connection, INTERLEAVED)
        old = await connection.fetch(
            "SELECT seq, job_id FROM batchd.events WHERE tenant_id = 'acme' ORDER BY seq"
        )
        base = await connection.fetchval("SELECT published_seq FROM batchd.event_log")
        # Left unpublished at the upgrade: numbered after it, as new events are.
        await add_events(connection, "acme", 2, notify=False)
        assert [m.version for m in await migrate.migrate(connection)] == [
            m.version for m in migrate.shipped_migrations() if m.version >= 9
        ]
        await interleave(connection, [("globex", 3), ("acme", 2), ("globex", 1), ("acme", 1)])
        acme_token = await tenants.add_tenant(connection, "acme")
        rows = await connection.fetch(
            "SELECT seq, tenant_seq, job_id FROM batchd.events WHERE tenant_id = 'acme' ORDER BY seq"
        )
    finally:
        await connection.close()
    assert [r["tenant_seq"] for r in rows[: len(old)]] == [r["seq"] for r in old], "old ids kept"
    new_ids = [r["tenant_seq"] for r in rows[len(old) :]]
    assert new_ids == list(range(base + 1, base + 6)), "new ids: acme's own count, from the base"

    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    settings = make_settings(blank_database_url, emulator.url)
    async with Daemon(settings).running() as daemon:
        url = daemon.http_url or ""
        everything = [(r["tenant_seq"], r["seq"], str(r["job_id"])) for r in rows]
        # Any id an acme client could hold before: one of its events', 0, the log's head (a snapshot's or a
        # reset's), one of globex's; and after: each new one.
        held = [0, *(r["seq"] for r in old), 4, base - 1, base, *new_ids]
        for last in held:
            # Before the base an id was a seq; after it, acme's count.
            expected = [e for e in everything if (e[1] if last <= base else e[0]) > last]
            if not expected:
                continue  # nothing to wait for: the other test shows a stream at its end carries nothing
            async with sse_stream(session, url, acme_token, last_event_id=last) as stream:
                await stream.until(ends_at(expected[-1][0]))
            got = [(int(m.id), json.loads(m.data)["job_id"]) for m in stream.events if m.id is not None]
            assert got == [(e[0], e[2]) for e in expected], last
            assert not [m for m in stream.events if m.event == "reset"], last
