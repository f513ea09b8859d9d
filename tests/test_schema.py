"""batchd/sql/schema.sql is the schema the migrations add up to: a database built from it and one built by
`batchd migrate` are identical, as pg_dump sees them (every table, column, default, constraint, index, view,
function, trigger and privilege, and the rows a new database starts with). A migration that changes the
schema must change schema.sql the same way, or this fails."""

from __future__ import annotations

import asyncio
import difflib
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from importlib import resources

import asyncpg
import pytest
from conftest import SERVER_URL, _admin, _database_url

from batchd import migrate

PG_DUMP = shutil.which("pg_dump") or "/usr/bin/pg_dump"
# Lines that differ between two dumps of the same schema: comments (the header, each object's heading) and
# pg_dump's per-run \restrict key.
NOISE = re.compile(r"^(--.*|\\(un)?restrict .*|)$")


def schema_sql() -> str:
    return resources.files("batchd.sql").joinpath("schema.sql").read_text()


@pytest.fixture
async def two_blank_databases(database_server: str) -> AsyncIterator[tuple[str, str]]:
    names = [f"batchd_schema_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    await _admin(*(f"CREATE DATABASE {name}" for name in names))
    try:
        yield _database_url(names[0]), _database_url(names[1])
    finally:
        await _admin(*(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)" for name in names))


async def pg_dump(url: str, *options: str) -> list[str]:
    """pg_dump's plain output for batchd's schema (without batchd.migrations, which only records how the
    database was made), as lines, without the ones that differ from run to run."""
    process = await asyncio.create_subprocess_exec(
        PG_DUMP,
        "--schema=batchd",
        "--exclude-table=batchd.migrations",
        *options,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode()
    return [line for line in out.decode().splitlines() if not NOISE.match(line)]


async def test_the_schema_file_builds_what_the_migrations_build(two_blank_databases: tuple[str, str]) -> None:
    assert SERVER_URL  # the server the fixture made both databases on
    migrated_url, from_file_url = two_blank_databases
    connection = await asyncpg.connect(migrated_url)
    try:
        assert len(await migrate.migrate(connection)) == len(migrate.shipped_migrations())
    finally:
        await connection.close()
    connection = await asyncpg.connect(from_file_url)
    try:
        await connection.execute(schema_sql())
    finally:
        await connection.close()

    for what, options in (("schema", ("--schema-only",)), ("rows", ("--data-only",))):
        migrated = await pg_dump(migrated_url, *options)
        from_file = await pg_dump(from_file_url, *options)
        diff = "\n".join(difflib.unified_diff(migrated, from_file, "migrations", "schema.sql", lineterm=""))
        assert migrated == from_file, f"schema.sql and the migrations differ ({what}):\n{diff}"
    schema = "\n".join(await pg_dump(from_file_url, "--schema-only"))
    assert "CREATE TABLE batchd.jobs (" in schema  # the dump is of something
    assert "CREATE FUNCTION batchd.jobs_inserted()" in schema


def test_the_schema_file_names_the_last_migration() -> None:
    """Its heading says which migration it is current with: a new migration must touch it."""
    last = migrate.shipped_migrations()[-1].version
    assert f"after the last migration ({last:04d})" in schema_sql().split("\n", 1)[0]
