"""Fixtures every batchd test may use: real PostgreSQL databases, a running emulator, an SDK client.

- `database_server`: the server's URL, which every fixture reaching PostgreSQL asks for (the tests whose
  fixtures do not are marked `nodb`: `pytest -m nodb` runs them without a server).
- `database_url`: a fresh database per test module with batchd's schema, cloned from a session template
  (fast: a file copy), dropped when the module ends; `db`, a connection to it reset for each test
  (`reset_database`); `blank_database_url`, an empty database for one test.
- `emulator`: the Message Batches API emulator served on a free loopback port for one test.
- `anthropic_client` / `make_client`: the official `AsyncAnthropic` pointed at it, with strict response
  validation so a missing field fails instead of becoming None.
- `daemon_settings` and `start_daemon`: a real daemon, in this process, against both.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import anthropic
import asyncpg
import pytest
from support import ADMIN_TOKEN, EmulatorHandle, make_settings, running_daemon, start_emulator

from batchd import migrate, tenants
from batchd.config import Settings
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig
from batchd.store import init_connection

SERVER_URL = os.environ.get("BATCHD_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _database_url(name: str) -> str:
    base, _, _ = SERVER_URL.rpartition("/")
    return f"{base}/{name}"


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks `nodb` every test whose fixtures (all of them, however indirect) do not include database_server,
    so that `pytest -m nodb` runs without PostgreSQL."""
    for item in items:
        if "database_server" not in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.nodb)


async def _admin(*statements: str) -> None:
    connection = await asyncpg.connect(SERVER_URL)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def _migrate(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await migrate.migrate(connection)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def database_server() -> str:
    """The PostgreSQL server's URL, once it has answered. Every fixture or test that reaches PostgreSQL asks
    for this one (database_template and blank_database_url do): the others are marked `nodb`."""
    try:
        asyncio.run(_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError) as error:
        pytest.fail(
            f"PostgreSQL is not usable at {SERVER_URL} ({error}); `make test` starts the local cluster"
        )
    return SERVER_URL


@pytest.fixture(scope="session")
def database_template(database_server: str) -> Iterator[str]:
    """A template database for the session with batchd's schema installed (`batchd migrate`)."""
    name = f"batchd_template_{os.getpid()}"
    asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}"))
    asyncio.run(_migrate(_database_url(name)))
    yield name
    asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="module")
def database_url(database_template: str) -> Iterator[str]:
    """A database of this module's own, cloned from the template and dropped afterwards."""
    name = f"batchd_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f"CREATE DATABASE {name} TEMPLATE {database_template}"))
    yield _database_url(name)
    asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def blank_database_url(database_server: str) -> Iterator[str]:
    """An empty database (no batchd schema) for one test, dropped afterwards."""
    name = f"batchd_blank_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f"CREATE DATABASE {name}"))
    yield _database_url(name)
    asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# Tables whose rows a test may rely on across tests: none but the migrations' own record (the schema stays).
# Every other table of batchd's schema, one a future migration adds included, is emptied before each test.
KEPT_TABLES = frozenset({"migrations"})

TABLES = """
SELECT quote_ident(c.relname) AS relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
 WHERE n.nspname = 'batchd' AND c.relkind IN ('r', 'p') AND c.relname <> ALL($1::text[]) ORDER BY 1
"""
# Columns an INSERT may set (not generated ones), by table.
INSERTABLE = """
SELECT quote_ident(c.relname) AS relname, array_agg(quote_ident(a.attname) ORDER BY a.attnum) AS columns
  FROM pg_attribute AS a JOIN pg_class AS c ON c.oid = a.attrelid
  JOIN pg_namespace AS n ON n.oid = c.relnamespace
 WHERE n.nspname = 'batchd' AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
 GROUP BY c.relname
"""


async def batchd_tables(connection: asyncpg.Connection) -> list[str]:
    """batchd's tables as the catalog lists them now (quoted identifiers), the kept ones aside."""
    return [row["relname"] for row in await connection.fetch(TABLES, sorted(KEPT_TABLES))]


async def _seeded_rows(url: str) -> dict[str, str]:
    """The rows the migrations themselves insert (singletons such as batchd.wakeup), by table, as JSON: what
    each test starts from again."""
    connection = await asyncpg.connect(url)
    try:
        seeded = {}
        for table in await batchd_tables(connection):
            # The names are the catalog's, quoted.
            rows = await connection.fetchval(f"SELECT jsonb_agg(t)::text FROM batchd.{table} AS t")  # noqa: S608
            if rows is not None:
                seeded[table] = rows
        return seeded
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def seeded_rows(database_template: str) -> dict[str, str]:
    return asyncio.run(_seeded_rows(_database_url(database_template)))


@pytest.fixture(scope="session")
def reset_database(seeded_rows: dict[str, str]) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    """`await reset_database(connection)`: every batchd table but the kept ones emptied (sequences restarted)
    and the migrations' seeded rows put back as they were in the template, in one transaction."""

    async def reset(connection: asyncpg.Connection) -> None:
        tables = await batchd_tables(connection)
        columns = {row["relname"]: row["columns"] for row in await connection.fetch(INSERTABLE)}
        async with connection.transaction():
            await connection.execute(
                f"TRUNCATE {', '.join(f'batchd.{table}' for table in tables)} RESTART IDENTITY"
            )
            for table, rows in seeded_rows.items():
                # The names are the catalog's, quoted.
                names = ", ".join(columns[table])
                source = f"jsonb_populate_recordset(NULL::batchd.{table}, $1::text::jsonb)"
                insert = f"INSERT INTO batchd.{table} ({names}) SELECT {names} FROM {source}"  # noqa: S608
                await connection.execute(insert, rows)

    return reset


@pytest.fixture
async def db(
    database_url: str, reset_database: Callable[[asyncpg.Connection], Awaitable[None]]
) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the module's database, reset first to what the migrations left (see reset_database)."""
    connection = await asyncpg.connect(database_url)
    try:
        await init_connection(connection)
        await reset_database(connection)
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def daemon_settings(
    database_url: str, emulator: EmulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Settings]:
    """Builds daemon settings pointed at this module's database and the test's emulator; keyword
    arguments are sections to merge, e.g. batching={"max_requests": 10}."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")

    def make(**sections: dict[str, Any]) -> Settings:
        return make_settings(database_url, emulator.url, **sections)

    return make


@pytest.fixture
async def start_daemon() -> AsyncIterator[Callable[[Settings], Any]]:
    """`async with start_daemon(settings) as daemon:` runs a daemon in this process until the block ends.
    Daemons still running when the test ends (a failing test) are stopped too."""
    async with AsyncExitStack() as stack:

        def start(settings: Settings) -> Any:
            return running_daemon(settings, stack)

        yield start


@pytest.fixture
async def tokens(db: asyncpg.Connection) -> dict[str, str]:
    """Two tenants, acme and globex, and a token for each."""
    return {name: await tenants.add_tenant(db, name) for name in ("acme", "globex")}


@pytest.fixture
def serve(
    emulator: EmulatorHandle, daemon_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Any]:
    """`async with serve(**events_settings) as (daemon, url):` runs a daemon with its HTTP server and
    support.ADMIN_TOKEN as the admin token."""
    monkeypatch.setenv("BATCHD_ADMIN_TOKEN", ADMIN_TOKEN)

    @asynccontextmanager
    async def run(**events: Any) -> AsyncIterator[tuple[Daemon, str]]:
        daemon = Daemon(daemon_settings(events={"poll_interval_s": 1.0, **events}))
        async with daemon.running():
            assert daemon.http_url is not None
            yield daemon, daemon.http_url

    return run


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for the test, without aiohttp's cap on connections (SSE tests hold many streams)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        yield http


@pytest.fixture
async def fail_on_task_errors() -> AsyncIterator[None]:
    """Fails the test if any asyncio task died with an exception nobody retrieved."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield
    loop.set_exception_handler(previous)
    assert not errors, f"unhandled errors in asyncio tasks: {errors}"


# Batches end only when a test pushes the emulated clock past their processing time: nothing waits on luck.
FAST = EmulatorConfig(processing_time_s=(60.0, 60.0), cancel_time_s=5.0, seed=1234)


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    """Override in a module (or parametrize indirectly) to start the emulator differently."""
    return FAST


@pytest.fixture
async def emulator(
    emulator_config: EmulatorConfig, fail_on_task_errors: None
) -> AsyncIterator[EmulatorHandle]:
    async with start_emulator(emulator_config) as handle:
        yield handle


@pytest.fixture
async def make_client(emulator: EmulatorHandle) -> AsyncIterator[Callable[..., anthropic.AsyncAnthropic]]:
    """Builds SDK clients pointed at the emulator (options override the defaults); all closed afterwards."""
    clients: list[anthropic.AsyncAnthropic] = []

    def make(**options: Any) -> anthropic.AsyncAnthropic:
        settings: dict[str, Any] = {
            "api_key": "test-key",
            "base_url": emulator.url,
            "_strict_response_validation": True,
            "timeout": 30.0,
        }
        settings.update(options)
        client = anthropic.AsyncAnthropic(**settings)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def anthropic_client(make_client: Callable[..., anthropic.AsyncAnthropic]) -> anthropic.AsyncAnthropic:
    """The official SDK client, strict, with its default retries, pointed at the emulator."""
    return make_client()
