"""The operator's mistakes and the environment's failures, each as a real `batchd` process: one line on
stderr naming what was tried (the database URL without its password, the address, the migration) and what to
do, never a traceback, and the exit status README.md documents (78 configuration, 77 a privilege the role
lacks, 69 unavailable, 141 a reader that left)."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from support import BATCHD, run_batchd, write_config

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
