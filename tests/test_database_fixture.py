"""The database fixtures: a fresh database per module with batchd's schema, on the real server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from conftest import batchd_tables
from support import insert_raw

from batchd import tenants


async def test_each_module_gets_its_own_fresh_database(database_url: str, database_template: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        name = await connection.fetchval("SELECT current_database()")
        assert name.startswith("batchd_test_")
        assert name != database_template
        schemas = await connection.fetch(
            "SELECT DISTINCT table_schema FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        assert [row["table_schema"] for row in schemas] == ["batchd"], "batchd's schema and nothing else"
        assert await connection.fetchval("SELECT count(*) FROM batchd.jobs") == 0
    finally:
        await connection.close()


async def test_a_blank_database_has_no_schema(blank_database_url: str) -> None:
    connection = await asyncpg.connect(blank_database_url)
    try:
        assert await connection.fetchval("SELECT to_regnamespace('batchd') IS NULL")
    finally:
        await connection.close()


async def test_the_reset_empties_every_table_a_migration_adds_and_restores_the_seeded_rows(
    db: asyncpg.Connection,
    reset_database: Callable[[asyncpg.Connection], Awaitable[None]],
    seeded_rows: dict[str, str],
) -> None:
    # A table no conftest names, as the next migration would add, and rows in each kind of table.
    await db.execute("CREATE TABLE batchd.zz_probe (id bigserial PRIMARY KEY, note text)")
    await db.execute("INSERT INTO batchd.zz_probe (note) VALUES ('left by an earlier test')")
    await insert_raw(db, "acme", ["a job"])
    await tenants.add_tenant(db, "acme")
    seeded = {"wakeup", "event_log"}
    assert seeded <= set(seeded_rows), "the singletons the migrations insert are recorded"
    await db.execute("UPDATE batchd.wakeup SET armed = false, wake_seq = 7, queue_limited = true")
    await db.execute("UPDATE batchd.event_log SET published_seq = 5, tenant_seq_base = 3")
    before = await db.fetchval("SELECT count(*) FROM batchd.migrations")

    await reset_database(db)

    for table in ("zz_probe", "jobs", "tenants", "tokens"):
        assert await db.fetchval(f"SELECT count(*) FROM batchd.{table}") == 0, table  # noqa: S608 - constants
    await db.execute("INSERT INTO batchd.zz_probe (note) VALUES ('mine')")
    assert await db.fetchval("SELECT id FROM batchd.zz_probe") == 1, "its sequence restarted"
    wakeup = await db.fetchrow("SELECT * FROM batchd.wakeup")
    event_log = await db.fetchrow("SELECT * FROM batchd.event_log")
    assert wakeup is not None
    assert event_log is not None
    assert dict(wakeup) == {
        "singleton": True,
        "armed": True,
        "wake_seq": 0,
        "queue_limited": False,
    }
    assert dict(event_log) == {
        "singleton": True,
        "published_seq": 0,
        "tenant_seq_base": 0,
    }
    after = await db.fetchval("SELECT count(*) FROM batchd.migrations")
    assert after == before > 0, "the schema's record stays"
    await db.execute("DROP TABLE batchd.zz_probe")


async def test_the_reset_covers_every_table_of_the_catalog_but_the_migrations_record(
    db: asyncpg.Connection,
) -> None:
    catalog = await db.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'batchd'"
        " AND table_type = 'BASE TABLE'"
    )
    assert set(await batchd_tables(db)) == {row["table_name"] for row in catalog} - {"migrations"}


def test_a_test_whose_fixtures_reach_a_database_is_not_marked_nodb(
    database_url: str, request: pytest.FixtureRequest
) -> None:
    assert request.node.get_closest_marker("nodb") is None
