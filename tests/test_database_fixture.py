"""The database fixtures: a fresh database per module with batchd's schema, on the real server."""

from __future__ import annotations

import asyncpg


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
