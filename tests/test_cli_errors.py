"""The operator's mistakes and the environment's failures, each as a real `batchd` process: one line on
stderr naming what was tried (the database URL without its password, the address, the migration) and what to
do, never a traceback, and the exit status README.md documents (78 configuration, 77 a privilege the role
lacks, 69 unavailable, 141 a reader that left)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from support import BATCHD, run_batchd, write_config

from batchd import __version__, migrate

EX_CONFIG = 78
EX_NOPERM = 77
EX_UNAVAILABLE = 69
EX_PIPE = 141
SECRET = "not-this-secret"  # a password in every URL below: it must never be shown
API_KEY = {"ANTHROPIC_API_KEY": "k"}
# `run` logs its start at info; warning leaves stderr to the failure alone.
QUIET = ("--log-level", "warning")


def only_line(err: str) -> str:
    """The one line a failure prints, checked: alone on stderr, `batchd: …`, no traceback, no password."""
    assert "Traceback" not in err, err
    assert SECRET not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert err == lines[0] + "\n", err
    assert lines[0].startswith("batchd: "), err
    return lines[0]


def with_user(url: str, user: str, password: str = SECRET) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process (this one) listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


# -- the database cannot be reached, or its URL cannot be parsed ---------------------------------------------


@pytest.mark.parametrize("command", [["run", *QUIET], ["status"], ["migrate"], ["tenant", "list"]])
async def test_a_database_that_is_down_is_one_line_exit_69(command: list[str], tmp_path: Path) -> None:
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/postgres"
    config = write_config(tmp_path / "batchd.toml", url)
    code, _, err = await run_batchd(*command, "--config", str(config), cwd=tmp_path, env=API_KEY)
    line = only_line(err)
    assert code == EX_UNAVAILABLE, err
    assert f"cannot connect to postgresql://postgres:***@127.0.0.1:{urlsplit(url).port}/postgres" in line


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"mysql://root:{SECRET}@127.0.0.1/batchd", "invalid DSN"),
        (f"postgresql://postgres:{SECRET}@127.0.0.1:5432/postgres?nonsense", "bad query field"),
        (f"postgresql://postgres:{SECRET}@127.0.0.1:99999/postgres", "port must be 0-65535"),
        (f"postgresql://postgres:{SECRET}@127.0.0.1:port/postgres", "invalid literal for int()"),
        (f"postgresql://postgres@127.0.0.1:5432/postgres?sslmode=bogus&password={SECRET}", "sslmode"),
    ],
)
@pytest.mark.parametrize("command", [["run", *QUIET], ["status"]])
async def test_a_malformed_database_url_is_a_configuration_error(
    url: str, problem: str, command: list[str], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "batchd.toml", url)
    code, _, err = await run_batchd(*command, "--config", str(config), cwd=tmp_path, env=API_KEY)
    line = only_line(err)
    assert code == EX_CONFIG, err
    assert "is not a PostgreSQL URL" in line
    assert problem in line
    assert "fix database.url" in line


# -- a port another process holds ----------------------------------------------------------------------------


async def test_run_on_a_port_in_use_names_it_exit_69(
    database_url: str, held_port: int, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "batchd.toml", database_url)
    code, _, err = await run_batchd(
        "run", *QUIET, "--config", str(config), cwd=tmp_path,
        env={**API_KEY, "BATCHD_HTTP__PORT": str(held_port)},
    )  # fmt: skip
    line = only_line(err)
    assert code == EX_UNAVAILABLE, err
    assert f"cannot listen on 127.0.0.1:{held_port}: the address is already in use" in line
    assert "[http] port" in line


async def test_the_emulator_on_a_port_in_use_names_it_exit_69(held_port: int, tmp_path: Path) -> None:
    code, _, err = await run_batchd("emulator", "--port", str(held_port), cwd=tmp_path)
    line = only_line(err)
    assert code == EX_UNAVAILABLE, err
    assert f"cannot listen on 127.0.0.1:{held_port}: the address is already in use" in line
    assert "--port" in line


# -- a database without batchd's schema, a role without the privileges, an edited migration ------------------


@pytest.mark.parametrize(
    "command", [["status"], ["tenant", "list"], ["tenant", "add", "acme"], ["report"], ["run", *QUIET]]
)
async def test_a_database_without_the_schema_says_to_migrate(
    command: list[str], blank_database_url: str, tmp_path: Path
) -> None:
    url = with_user(blank_database_url, "postgres")
    config = write_config(tmp_path / "batchd.toml", url)
    code, _, err = await run_batchd(*command, "--config", str(config), cwd=tmp_path, env=API_KEY)
    line = only_line(err)
    assert code == EX_CONFIG, err
    assert line.startswith(f"batchd: {with_user(blank_database_url, 'postgres', '***')}: ")
    assert line.endswith("run `batchd migrate`")


@pytest.fixture
async def weak_role(database_server: str) -> AsyncIterator[str]:
    """A role that may log in and nothing more, dropped afterwards."""
    name = f"batchd_weak_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_server)
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN")
        yield name
        await admin.execute(f"DROP ROLE IF EXISTS {name}")
    finally:
        await admin.close()


async def test_migrate_as_a_role_that_may_not_create_the_schema_exit_77(
    blank_database_url: str, weak_role: str, tmp_path: Path
) -> None:
    url = with_user(blank_database_url, weak_role)
    config = write_config(tmp_path / "batchd.toml", url)
    code, _, err = await run_batchd("migrate", "--config", str(config), cwd=tmp_path)
    line = only_line(err)
    assert code == EX_NOPERM, err
    assert f"{with_user(blank_database_url, weak_role, '***')} refused {weak_role}: permission denied" in line
    assert "run `batchd migrate` as the database's owner" in line


async def test_a_command_as_a_role_that_may_not_read_the_tables_exit_77(
    database_url: str, weak_role: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "batchd.toml", with_user(database_url, weak_role))
    code, _, err = await run_batchd("status", "--config", str(config), cwd=tmp_path)
    line = only_line(err)
    assert code == EX_NOPERM, err
    assert f"refused {weak_role}: permission denied" in line
    assert "deploy/sql/roles.sql" in line


async def test_an_applied_migration_that_was_edited_is_one_line_exit_78(
    blank_database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "batchd.toml", with_user(blank_database_url, "postgres"))
    code, _, err = await run_batchd("migrate", "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    connection = await asyncpg.connect(blank_database_url)
    try:
        await connection.execute("UPDATE batchd.migrations SET checksum = 'edited' WHERE version = 2")
    finally:
        await connection.close()
    code, _, err = await run_batchd("migrate", "--config", str(config), cwd=tmp_path)
    line = only_line(err)
    assert code == EX_CONFIG, err
    assert "migration 0002_" in line
    assert "was changed after it was applied" in line
    assert "restore the file as it was" in line


# -- a database a newer batchd migrated ----------------------------------------------------------------------


async def migrated_by_a_newer_batchd(url: str) -> str:
    """Migrates the database, then records one migration more, as a newer batchd would have; returns its
    name as batchd shows it."""
    connection = await asyncpg.connect(url)
    try:
        await migrate.migrate(connection)
        newest = migrate.shipped_migrations()[-1].version
        await connection.execute(
            "INSERT INTO batchd.migrations (version, name, checksum) VALUES ($1, 'from_the_future', 'x')",
            newest + 1,
        )
    finally:
        await connection.close()
    return f"{newest + 1:04d}_from_the_future"


async def test_a_database_a_newer_batchd_migrated_is_refused_by_run_migrate_and_status_exit_78(
    blank_database_url: str, tmp_path: Path
) -> None:
    theirs = await migrated_by_a_newer_batchd(blank_database_url)
    last = migrate.shipped_migrations()[-1]
    ours = f"{last.version:04d}_{last.name}"
    config = write_config(tmp_path / "batchd.toml", with_user(blank_database_url, "postgres"))
    commands = (["run", *QUIET], ["migrate"], ["status"], ["tenant", "list"])
    results = await asyncio.gather(
        *(run_batchd(*command, "--config", str(config), cwd=tmp_path, env=API_KEY) for command in commands)
    )
    for command, (code, out, err) in zip(commands, results, strict=True):
        line = only_line(err)
        assert (code, out) == (EX_CONFIG, ""), (command, err)
        assert line.startswith(f"batchd: {with_user(blank_database_url, 'postgres', '***')}: "), line
        assert "the database is ahead of this batchd" in line, line  # `migrate` too: not "up to date"
        assert f"its newest migration is {theirs}, this batchd's ({__version__}) is {ours}" in line, line
        assert "upgrade batchd" in line, line
    connection = await asyncpg.connect(blank_database_url)
    try:
        assert await connection.fetchval("SELECT max(version) FROM batchd.migrations") == last.version + 1
    finally:
        await connection.close()


# -- how far `batchd run` got --------------------------------------------------------------------------------


def start_and_failure(err: str) -> tuple[list[dict[str, object]], str]:
    """`batchd run`'s stderr at info: its log (JSON lines, stderr not being a terminal), then one failure
    line, the last."""
    assert "Traceback" not in err, err
    assert SECRET not in err, err
    *logged, last = err.splitlines()
    assert last.startswith("batchd: "), err
    return [json.loads(line) for line in logged], last


async def test_run_at_info_logs_what_it_is_starting_with_before_its_one_failure_line(
    blank_database_url: str, tmp_path: Path
) -> None:
    down_url = f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/postgres"
    await migrated_by_a_newer_batchd(blank_database_url)
    down = write_config(tmp_path / "down.toml", down_url)
    ahead = write_config(tmp_path / "ahead.toml", with_user(blank_database_url, "postgres"))
    (down_code, _, down_err), (ahead_code, _, ahead_err) = await asyncio.gather(
        run_batchd("run", "--config", str(down), cwd=tmp_path, env=API_KEY),
        run_batchd("run", "--config", str(ahead), cwd=tmp_path, env=API_KEY),
    )

    logged, last = start_and_failure(down_err)
    assert down_code == EX_UNAVAILABLE, down_err
    assert [entry["event"] for entry in logged] == ["daemon.starting", "daemon.stopped"]
    starting = logged[0]
    assert starting["level"] == "info"
    assert starting["config"] == str(down)
    assert starting["database"] == f"postgresql://postgres:***@127.0.0.1:{urlsplit(down_url).port}/postgres"
    assert starting["api"] == "http://127.0.0.1:1"
    assert starting["http"] == "127.0.0.1:0"
    assert (starting["version"], str(starting["instance_id"])[:7]) == (__version__, "batchd-")
    assert "cannot connect to postgresql://postgres:***@127.0.0.1:" in last

    logged, last = start_and_failure(ahead_err)
    assert ahead_code == EX_CONFIG, ahead_err
    assert [entry["event"] for entry in logged] == ["daemon.starting", "daemon.stopped"]
    assert "the database is ahead of this batchd" in last


# -- a reader that stops reading -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["report", "--format", "csv"]])
async def test_a_reader_that_left_ends_the_command_quietly_exit_141(
    command: list[str], database_url: str, tmp_path: Path
) -> None:
    """`batchd status | head -3` where head has already gone: standard output is a pipe nobody reads."""
    config = write_config(tmp_path / "batchd.toml", database_url)
    read, write = os.pipe()
    os.close(read)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "ANTHROPIC_"))}
    try:
        process = await asyncio.create_subprocess_exec(
            *BATCHD, *command, "--config", str(config),
            stdout=write, stderr=asyncio.subprocess.PIPE, env=clean, cwd=tmp_path,
        )  # fmt: skip
    finally:
        os.close(write)
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    # Nothing but the report's warning about an empty database, which goes to stderr before any output.
    assert all(line.startswith("batchd: warning: ") for line in err.decode().splitlines()), err.decode()
    assert process.returncode == EX_PIPE
