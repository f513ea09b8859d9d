"""deploy/sql/roles.sql, rls.sql and tenant_producer.sql as an operator runs them (psql, as a superuser), and
then each role at work: the producer's contract and nothing more, tenants kept apart by row-level security,
the daemon running the real pipeline, the owner migrating an empty database.

Roles belong to the whole cluster: each test makes its own, with names unique to it, in a database of its
own, and drops both at the end (the database first, which takes the roles' privileges with it)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from support import (
    ADMIN_TOKEN,
    QUICK,
    EmulatorHandle,
    insert_raw,
    raw_request,
    run_python,
    wait_for_jobs,
    wait_until,
)

from batchd import migrate, pruner, tenants
from batchd.client import messages
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig
from batchd.store import init_connection

SQL = Path(__file__).resolve().parent.parent / "deploy" / "sql"
SERVER_URL = os.environ.get("BATCHD_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK  # batches end within a fraction of a second: the daemon test waits on real polling


def psql_program() -> str:
    """The machine's psql, else the one in the embedded PostgreSQL's wheel."""
    found = shutil.which("psql")
    if found:
        return found
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "pginstall" / "bin" / "psql"
        if bundled.exists():
            return str(bundled)
    pytest.fail("psql is missing: install Debian's postgresql-client")


def url_for(
    url: str, database: str | None = None, user: str | None = None, password: str | None = None
) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    login = user or (parts.username or "postgres")
    if password is not None:
        login += f":{password}"
    return urlunsplit(
        parts._replace(netloc=f"{login}@{host}", path=f"/{database}" if database else parts.path)
    )


@dataclass
class Deployment:
    """A database of its own and the names of its roles (none exists until roles.sql makes it)."""

    url: str  # as the superuser
    prefix: str
    password: str = field(default_factory=lambda: secrets.token_hex(12))

    @property
    def owner(self) -> str:
        return f"{self.prefix}_owner"

    @property
    def daemon(self) -> str:
        return f"{self.prefix}_daemon"

    @property
    def producer(self) -> str:
        return f"{self.prefix}_producer"

    def tenant_role(self, tenant: str) -> str:
        return f"{self.prefix}_producer_{tenant}"

    def url_as(self, role: str) -> str:
        return url_for(self.url, user=role, password=self.password)

    async def connect(self, role: str | None = None) -> asyncpg.Connection:
        connection = await asyncpg.connect(self.url if role is None else self.url_as(role))
        await init_connection(connection)
        return connection

    async def psql(self, script: str, **variables: str) -> str:
        """Runs deploy/sql/SCRIPT as the superuser; returns what it printed, or fails with it."""
        code, out, err = await self.psql_status(script, **variables)
        assert code == 0, f"psql -f {script} exited {code}:\n{out}\n{err}"
        return out

    async def psql_status(self, script: str, **variables: str) -> tuple[int, str, str]:
        argv = [psql_program(), "-X", "-d", self.url, "-f", str(SQL / script)]
        for name, value in variables.items():
            argv += ["-v", f"{name}={value}"]
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    async def roles(self) -> str:
        """roles.sql with this deployment's names and passwords."""
        return await self.psql(
            "roles.sql",
            owner=self.owner,
            daemon=self.daemon,
            producer=self.producer,
            owner_password=self.password,
            daemon_password=self.password,
            producer_password=self.password,
        )

    async def tenant(self, tenant: str) -> str:
        """A producer role for one tenant, named tenant_role(tenant) (tenant_producer.sql); returns what
        psql printed."""
        return await self.psql(
            "tenant_producer.sql",
            tenant=tenant,
            role=self.tenant_role(tenant),
            producer=self.producer,
            password=self.password,
        )


async def _admin(statement: str, *arguments: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(SERVER_URL)
    try:
        return list(await connection.fetch(statement, *arguments))
    finally:
        await connection.close()


async def _roles_named(prefix: str) -> list[str]:
    rows = await _admin("SELECT rolname FROM pg_roles WHERE rolname LIKE $1 || '%' ORDER BY rolname", prefix)
    return [row["rolname"] for row in rows]


@asynccontextmanager
async def _deployment(template: str | None) -> AsyncIterator[Deployment]:
    suffix = uuid.uuid4().hex[:10]
    name = f"batchd_roles_{suffix}"
    await _admin(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    # As on a locked-down cluster: whatever a role may do here, roles.sql granted it.
    await _admin(f"REVOKE ALL ON DATABASE {name} FROM PUBLIC")
    deployment = Deployment(url=url_for(SERVER_URL, database=name), prefix=f"bdr{suffix}")
    try:
        yield deployment
    finally:
        await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        for role in await _roles_named(deployment.prefix):
            await _admin(f'DROP ROLE "{role}"')


@pytest.fixture
async def deployment(database_template: str) -> AsyncIterator[Deployment]:
    """A database installed (migrated as the superuser) the way it was before roles existed."""
    async with _deployment(database_template) as made:
        yield made


@pytest.fixture
async def blank_deployment(database_server: str) -> AsyncIterator[Deployment]:
    """An empty database."""
    async with _deployment(None) as made:
        yield made


@pytest.fixture
def database_url(deployment: Deployment) -> str:
    """This module's `db` and `daemon_settings` use the test's deployment (as the superuser)."""
    return deployment.url


# -- roles.sql -----------------------------------------------------------------------------------------------


async def table_privileges(db: asyncpg.Connection, role: str) -> dict[str, set[str]]:
    rows = await db.fetch(
        "SELECT table_name, privilege_type FROM information_schema.role_table_grants"
        " WHERE grantee = $1 AND table_schema = 'batchd'",
        role,
    )
    found: dict[str, set[str]] = {}
    for row in rows:
        found.setdefault(row["table_name"], set()).add(row["privilege_type"])
    return found


async def executable(db: asyncpg.Connection, role: str) -> set[str]:
    rows = await db.fetch(
        "SELECT proname FROM pg_proc WHERE pronamespace = 'batchd'::regnamespace"
        " AND has_function_privilege($1, oid, 'EXECUTE')",
        role,
    )
    return {row["proname"] for row in rows}


async def test_roles_sql_takes_over_an_installed_schema_and_grants_exactly_what_each_role_needs(
    deployment: Deployment, db: asyncpg.Connection
) -> None:
    first = await deployment.roles()
    assert f"{deployment.owner} owns schema batchd" in first
    assert await deployment.roles() == first, "run again, it changes nothing and says the same"

    owners = await db.fetch(
        "SELECT DISTINCT pg_get_userbyid(relowner) AS owner FROM pg_class"
        " WHERE relnamespace = 'batchd'::regnamespace"
        " UNION SELECT DISTINCT pg_get_userbyid(proowner) FROM pg_proc"
        " WHERE pronamespace = 'batchd'::regnamespace"
        " UNION SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'batchd'"
    )
    assert [row["owner"] for row in owners] == [deployment.owner]
    roles = await db.fetch(
        "SELECT rolname, rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolbypassrls,"
        " rolpassword IS NOT NULL AS has_password"
        " FROM pg_authid WHERE rolname LIKE $1 || '%' ORDER BY rolname",
        deployment.prefix,
    )
    assert [tuple(row.values()) for row in roles] == [
        (name, True, False, False, False, False, True)
        for name in sorted((deployment.owner, deployment.daemon, deployment.producer))
    ]

    # The triggers that write on a producer's behalf run as the owner, with a search_path of their own.
    security = await db.fetch(
        "SELECT proname, prosecdef, proconfig FROM pg_proc"
        " WHERE pronamespace = 'batchd'::regnamespace AND prorettype = 'trigger'::regtype ORDER BY proname"
    )
    assert [tuple(row.values()) for row in security] == [
        ("jobs_canceled", True, ["search_path=pg_catalog, pg_temp"]),
        ("jobs_guard_insert", False, ["search_path=pg_catalog, pg_temp"]),
        ("jobs_guard_update", False, ["search_path=pg_catalog, pg_temp"]),
        ("jobs_inserted", True, ["search_path=pg_catalog, pg_temp"]),
        ("jobs_status_changed", False, None),
        ("max_queued_changed", True, ["search_path=pg_catalog, pg_temp"]),
        ("tokens_changed", False, None),  # only notifies, for the daemon's or an operator's revocations
    ]

    # The daemon: DML on every table and view (those of migrations to come included), only SELECT on
    # batchd.migrations and batchd.daemon_roles (which names it); every function but the triggers'.
    tables = [
        row["relname"]
        for row in await db.fetch(
            "SELECT relname FROM pg_class"
            " WHERE relnamespace = 'batchd'::regnamespace AND relkind IN ('r', 'v')"
        )
    ]
    assert {"jobs", "batches", "batch_tenants", "events", "event_log", "wakeup", "tenants", "tokens"} < set(
        tables
    )
    assert await table_privileges(db, deployment.daemon) == {
        table: {"SELECT"}
        if table in {"migrations", "daemon_roles"}
        else {"SELECT", "INSERT", "UPDATE", "DELETE"}
        for table in tables
    }
    assert await table_privileges(db, deployment.producer) == {"jobs": {"SELECT", "INSERT"}}
    columns = await db.fetch(
        "SELECT table_name, column_name, privilege_type FROM information_schema.column_privileges"
        " WHERE grantee = $1 AND privilege_type = 'UPDATE'",
        deployment.producer,
    )
    assert [tuple(row.values()) for row in columns] == [("jobs", "status", "UPDATE")]
    functions = await db.fetch(
        "SELECT proname, prorettype = 'trigger'::regtype AS is_trigger FROM pg_proc"
        " WHERE pronamespace = 'batchd'::regnamespace"
    )
    daemon_functions = await executable(db, deployment.daemon)
    assert daemon_functions == {row["proname"] for row in functions if not row["is_trigger"]}
    assert {"publish_events", "request_problem", "cancel_job"} <= daemon_functions
    # And the predicates and the id maker that run on behalf of whoever writes batchd.jobs (anyone may call
    # them).
    assert await executable(db, deployment.producer) == {
        "request_problem",
        "cancel_job",
        "trusted_writer",
        "trusted_writer_now",
        "plausible_time",
        "time_ordered_uuid",
    }
    assert [r["role_name"] for r in await db.fetch("SELECT role_name FROM batchd.daemon_roles")] == [
        deployment.daemon
    ]

    checks = await db.fetchrow(
        "SELECT has_database_privilege($1, current_database(), 'CREATE') AS owner_creates,"
        "       has_database_privilege($2, current_database(), 'CREATE') AS daemon_creates,"
        "       has_database_privilege($2, current_database(), 'TEMPORARY') AS daemon_temporary,"
        "       has_schema_privilege($2, 'batchd', 'CREATE') AS daemon_ddl,"
        "       has_schema_privilege($3, 'batchd', 'CREATE') AS producer_ddl,"
        "       has_schema_privilege($3, 'batchd', 'USAGE') AS producer_usage",
        deployment.owner,
        deployment.daemon,
        deployment.producer,
    )
    assert checks is not None
    assert dict(checks) == {
        "owner_creates": True,
        "daemon_creates": False,
        "daemon_temporary": True,
        "daemon_ddl": False,
        "producer_ddl": False,
        "producer_usage": True,
    }


async def test_roles_sql_refuses_a_superuser_and_changes_nothing(deployment: Deployment) -> None:
    code, _, err = await deployment.psql_status("roles.sql", owner="postgres", daemon=deployment.daemon)
    assert code != 0
    assert "refusing to use postgres" in err
    assert await _roles_named(deployment.prefix) == [], "all or nothing: no role was left behind"


# -- the producer --------------------------------------------------------------------------------------------


async def test_a_producer_inserts_reads_and_cancels_its_jobs(
    deployment: Deployment, db: asyncpg.Connection
) -> None:
    await deployment.roles()
    producer = await deployment.connect(deployment.producer)
    heard: list[str] = []
    await db.add_listener("batchd_jobs", lambda *args: heard.append(args[2]))
    await db.add_listener("batchd_events", lambda *args: heard.append(args[2]))

    async def heard_of(channel: str) -> bool:
        return channel in heard

    try:
        raw = await producer.fetchrow(
            "INSERT INTO batchd.jobs (tenant_id, request, metadata, idempotency_key)"
            " VALUES ('acme', $1, $2, 'k1') RETURNING *",
            raw_request("summarise this"),
            {"user": 7},
        )
        assert raw is not None
        assert raw["status"] == "queued"
        await wait_until(lambda: heard_of("batchd_jobs"))  # the INSERT trigger read batchd.wakeup
        retried = await producer.fetchval(
            "INSERT INTO batchd.jobs (tenant_id, request, idempotency_key) VALUES ('acme', $1, 'k1')"
            " ON CONFLICT DO NOTHING RETURNING id",
            raw_request("summarise this"),
        )
        assert retried is None
        typed = await producer.fetchval(
            "INSERT INTO batchd.jobs (tenant_id, job_type, input)"
            " VALUES ('acme', 'classify', $1) RETURNING id",
            {"text": "Why is my invoice late?", "categories": ["complaint", "question"]},
        )
        read = await producer.fetch("SELECT id, status, metadata FROM batchd.jobs ORDER BY seq")
        assert [(r["id"], r["status"], r["metadata"]) for r in read] == [
            (raw["id"], "queued", {"user": 7}),
            (typed, "queued", None),
        ]
        assert await producer.fetchval("SELECT batchd.request_problem($1::jsonb)", {"model": "m"}) == (
            "request lacks max_tokens"
        )

        status = await producer.execute(
            "UPDATE batchd.jobs SET status = 'canceled' WHERE id = $1 AND status = 'queued'", raw["id"]
        )
        assert status == "UPDATE 1"
        assert await producer.fetchval("SELECT batchd.cancel_job($1)", typed) is True
        assert await producer.fetchval("SELECT batchd.cancel_job($1)", typed) is False
        await wait_until(lambda: heard_of("batchd_events"))  # the cancel's event was announced
        rows = await producer.fetch("SELECT status, completed_at FROM batchd.jobs")
        assert {r["status"] for r in rows} == {"canceled"}
        assert all(r["completed_at"] is not None for r in rows)
        events = await db.fetch("SELECT type, tenant_id, job_id, data FROM batchd.events ORDER BY id")
        assert [tuple(e.values()) for e in events] == [
            ("job.canceled", "acme", raw["id"], {"status": "canceled", "metadata": {"user": 7}}),
            ("job.canceled", "acme", typed, {"status": "canceled", "metadata": None}),
        ]

        # A job already in a batch still cannot be canceled, whoever asks.
        submitted = await producer.fetchval(
            "INSERT INTO batchd.jobs (tenant_id, request) VALUES ('acme', $1) RETURNING id", raw_request("x")
        )
        batch = await db.fetchval(
            "INSERT INTO batchd.batches (tag, request_count, bytes, status)"
            " VALUES ('abcdef123456', 1, 100, 'in_progress') RETURNING id"
        )
        await db.execute(
            "UPDATE batchd.jobs SET status = 'submitted', batch_id = $2 WHERE id = $1", submitted, batch
        )
        with pytest.raises(asyncpg.CheckViolationError, match="only a queued job can be canceled"):
            await producer.execute("UPDATE batchd.jobs SET status = 'canceled' WHERE id = $1", submitted)
        assert await producer.fetchval("SELECT batchd.cancel_job($1)", submitted) is False
    finally:
        await producer.close()


REFUSED = [
    "SELECT 1 FROM batchd.batches",
    "SELECT 1 FROM batchd.batch_tenants",
    "SELECT 1 FROM batchd.events",
    "SELECT 1 FROM batchd.event_log",
    "SELECT 1 FROM batchd.wakeup",
    "SELECT 1 FROM batchd.tenants",
    "SELECT 1 FROM batchd.tokens",
    "SELECT 1 FROM batchd.migrations",
    # The rollups hold every tenant's money, and a forged tally would change what every reader shows.
    "SELECT 1 FROM batchd.rollups",
    "SELECT 1 FROM batchd.tallies",
    "SELECT * FROM batchd.totals_since(NULL, NULL)",
    "INSERT INTO batchd.tallies (tenant_id, status, jobs, cost_usd) VALUES ('acme', 'succeeded', 1, 1e9)",
    "DELETE FROM batchd.rollups",
    # The queue's history names every tenant's queue; a producer holding the sampler's gate would stop it.
    "SELECT 1 FROM batchd.flow",
    "SELECT 1 FROM batchd.turnarounds",
    "SELECT 1 FROM batchd.turnaround_tallies",
    "INSERT INTO batchd.turnaround_tallies (tenant_id, bucket, jobs) VALUES ('acme', 0, 1000000)",
    "UPDATE batchd.flow_clock SET sampled_at = 'infinity'",
    "DELETE FROM batchd.flow",
    "INSERT INTO batchd.events (type) VALUES ('job.succeeded')",
    # The daemons' rows say who runs where and whether the API takes the key: not a producer's to read, nor
    # to forge (a fake live daemon would hide a dead one from the operator).
    "SELECT 1 FROM batchd.instances",
    (
        "INSERT INTO batchd.instances (instance_id, host, pid, version, started_at, heartbeat_s, api_url,"
        " api_state) VALUES ('batchd-fake', 'h', 1, '0', now(), 20, 'https://api.anthropic.com', 'ok')"
    ),
    "UPDATE batchd.instances SET heartbeat_at = now()",
    "DELETE FROM batchd.instances",
    "INSERT INTO batchd.tenants (name) VALUES ('mine')",
    # Webhook endpoints hold every tenant's signing secret and say where batchd connects: neither to read nor
    # to aim (an endpoint of another tenant's, or at the operator's network); nor a delivery to forge.
    "SELECT secret FROM batchd.webhook_endpoints",
    (
        "INSERT INTO batchd.webhook_endpoints (tenant_id, url, secret, after_seq)"
        " VALUES ('acme', 'http://127.0.0.1/', 'whsec_AAAA', 0)"
    ),
    "UPDATE batchd.webhook_endpoints SET url = 'http://169.254.169.254/'",
    "SELECT 1 FROM batchd.webhook_deliveries",
    "UPDATE batchd.webhook_deliveries SET status = 'pending'",
    "UPDATE batchd.webhook_log SET enqueued_seq = 0",
    "UPDATE batchd.wakeup SET armed = true",
    "UPDATE batchd.jobs SET tenant_id = tenant_id WHERE id = $1",
    "UPDATE batchd.jobs SET request = request WHERE id = $1",
    "UPDATE batchd.jobs SET metadata = metadata WHERE id = $1",
    "UPDATE batchd.jobs SET attempts = attempts WHERE id = $1",
    "UPDATE batchd.jobs SET batch_id = batch_id WHERE id = $1",
    "UPDATE batchd.jobs SET params = params WHERE id = $1",
    "UPDATE batchd.jobs SET result = result WHERE id = $1",
    "UPDATE batchd.jobs SET error = error WHERE id = $1",
    "UPDATE batchd.jobs SET usage = usage WHERE id = $1",
    "UPDATE batchd.jobs SET completed_at = completed_at WHERE id = $1",
    "UPDATE batchd.jobs SET deadline = deadline WHERE id = $1",
    "UPDATE batchd.jobs SET status = 'canceled', result = '{}' WHERE id = $1",
    "DELETE FROM batchd.jobs WHERE id = $1",
    "TRUNCATE batchd.jobs",
    "SELECT batchd.publish_events(10)",
    "SELECT batchd.jobs_canceled()",
    "CREATE TABLE batchd.mine (i int)",
    "ALTER TABLE batchd.jobs DISABLE ROW LEVEL SECURITY",
]


async def job_row(db: asyncpg.Connection, job: uuid.UUID) -> dict[str, Any]:
    (row,) = await db.fetch("SELECT * FROM batchd.jobs WHERE id = $1", job)
    return dict(row)


async def test_a_producer_is_refused_everything_else(deployment: Deployment, db: asyncpg.Connection) -> None:
    await deployment.roles()
    job = (await insert_raw(db, "acme", ["keep me"]))[0]
    before = await job_row(db, job)
    producer = await deployment.connect(deployment.producer)
    try:
        for statement in REFUSED:
            arguments = [job] if "$1" in statement else []
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await producer.execute(statement, *arguments)
        # The status column is the producer's to cancel with, and for nothing else: putting a job back in
        # the queue, or marking it done, would make the daemon send it again or never.
        for status in ("succeeded", "failed", "submitted"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="may only cancel"):
                await producer.execute("UPDATE batchd.jobs SET status = $2 WHERE id = $1", job, status)
        await producer.execute("UPDATE batchd.jobs SET status = 'canceled' WHERE id = $1", job)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not set its status to queued"):
            await producer.execute("UPDATE batchd.jobs SET status = 'queued' WHERE id = $1", job)
    finally:
        await producer.close()
    after = await job_row(db, job)
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {"status", "completed_at", "updated_at"}, "only the cancel went through"
    assert await db.fetchval("SELECT count(*) FROM batchd.events") == 1
    # Counted by the cancel's trigger, as batchd's owner: the producer needs no right on the rollups.
    assert await db.fetchval("SELECT jobs FROM batchd.tallies WHERE status = 'canceled'") == 1


# -- row-level security --------------------------------------------------------------------------------------


async def test_with_row_level_security_a_tenant_producer_sees_and_touches_only_its_tenant(
    deployment: Deployment, db: asyncpg.Connection
) -> None:
    await deployment.roles()
    unprotected = await deployment.tenant("acme")
    assert "row-level security is off" in unprotected
    assert "sees every tenant" in await deployment.psql("rls.sql", daemon=deployment.daemon)
    assert "sees only tenant acme" in await deployment.tenant("acme"), "idempotent"
    await deployment.tenant("globex")
    acme = await deployment.connect(deployment.tenant_role("acme"))
    globex = await deployment.connect(deployment.tenant_role("globex"))
    shared = await deployment.connect(deployment.producer)
    insert = "INSERT INTO batchd.jobs (tenant_id, request) VALUES ($1, $2) RETURNING id"
    try:
        mine = await acme.fetchval(insert, "acme", raw_request("acme's"))
        theirs = await globex.fetchval(insert, "globex", raw_request("globex's"))
        for connection, tenant in ((acme, "globex"), (globex, "acme")):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await connection.execute(insert, tenant, raw_request("not mine"))
        assert [r["id"] for r in await acme.fetch("SELECT id FROM batchd.jobs")] == [mine]
        assert [r["id"] for r in await globex.fetch("SELECT id FROM batchd.jobs")] == [theirs]
        assert await acme.fetchval("SELECT count(*) FROM batchd.jobs WHERE id = $1", theirs) == 0

        # acme cannot cancel globex's job, either way: it is not there for acme.
        assert (
            await acme.execute("UPDATE batchd.jobs SET status = 'canceled' WHERE id = $1", theirs)
            == "UPDATE 0"
        )
        assert await acme.fetchval("SELECT batchd.cancel_job($1)", theirs) is False
        assert await db.fetchval("SELECT status FROM batchd.jobs WHERE id = $1", theirs) == "queued"
        assert await acme.fetchval("SELECT batchd.cancel_job($1)", mine) is True
        assert await db.fetchval("SELECT tenant_id FROM batchd.events WHERE type = 'job.canceled'") == "acme"

        # An idempotency key is still per tenant; a retried insert is still no second job.
        keyed = (
            "INSERT INTO batchd.jobs (tenant_id, request, idempotency_key) VALUES ($1, $2, 'order-1')"
            " ON CONFLICT DO NOTHING RETURNING id"
        )
        assert await acme.fetchval(keyed, "acme", raw_request("a")) is not None
        assert await acme.fetchval(keyed, "acme", raw_request("a")) is None
        assert await globex.fetchval(keyed, "globex", raw_request("g")) is not None

        # A role without a tenant's policy sees nothing and inserts nothing; the superuser sees everything.
        assert await shared.fetchval("SELECT count(*) FROM batchd.jobs") == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await shared.execute(insert, "acme", raw_request("shared"))
        assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 4

        # Off again, as the guide says: the tenant roles are plain producers once more.
        await db.execute("ALTER TABLE batchd.jobs DISABLE ROW LEVEL SECURITY")
        assert await acme.fetchval("SELECT count(*) FROM batchd.jobs") == 4
    finally:
        for connection in (acme, globex, shared):
            await connection.close()


DEAD_DAEMON = (
    "INSERT INTO batchd.instances (instance_id, host, pid, version, started_at, heartbeat_at, heartbeat_s,"
    " api_url, api_state) VALUES ('batchd-dead', 'h', 1, '0', now(), now() - interval '2 days', 20,"
    " 'https://api.anthropic.com', 'ok')"
)


async def pruned_as_the_daemon(db: asyncpg.Connection, daemon_db: asyncpg.Connection) -> None:
    events = await db.fetchval("SELECT count(*) FROM batchd.events")
    assert await pruner.prune_events(daemon_db, 1e-6, 1000) == events, "the pruner's DELETE is allowed"
    await db.execute(DEAD_DAEMON)
    assert await pruner.prune_instances(daemon_db, 100) == 1, "and so is the dead daemons' prune"


async def instance_rows(connection: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await connection.fetch("SELECT instance_id, api_state FROM batchd.instances")
    return [(row["instance_id"], row["api_state"]) for row in rows]


async def test_the_daemon_role_runs_the_daemon_for_every_tenant_under_row_level_security(
    deployment: Deployment,
    db: asyncpg.Connection,
    emulator: EmulatorHandle,
    daemon_settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await deployment.roles()
    await deployment.psql("rls.sql", daemon=deployment.daemon)
    producers = {}
    for tenant in ("acme", "globex"):
        await deployment.tenant(tenant)
        producers[tenant] = await deployment.connect(deployment.tenant_role(tenant))
    daemon_db = await deployment.connect(deployment.daemon)
    monkeypatch.setenv("BATCHD_ADMIN_TOKEN", ADMIN_TOKEN)
    settings = daemon_settings(
        database={"url": deployment.url_as(deployment.daemon)}, events={"poll_interval_s": 0.5}
    )
    try:
        # The operator's commands run as the daemon role too: a tenant's token for the HTTP API.
        token = await tenants.add_tenant(daemon_db, "acme")
        jobs: dict[str, list[Any]] = {}
        async with Daemon(settings).running() as daemon, aiohttp.ClientSession() as http:
            # Its own row, written as the daemon role (and deleted by it when it stops, below).
            assert await instance_rows(daemon_db) == [(daemon.instance_id, "ok")]
            for tenant, producer in producers.items():
                jobs[tenant] = await insert_raw(
                    producer, tenant, [f"{tenant} question {i}" for i in range(5)]
                )
                jobs[tenant] += [
                    await producer.fetchval(
                        "INSERT INTO batchd.jobs (tenant_id, job_type, input) VALUES ($1, 'classify', $2)"
                        " RETURNING id",
                        tenant,
                        {"text": f"{tenant} complaint", "categories": ["praise", "complaint"]},
                    )
                ]
            counts = await wait_for_jobs(db, done=12)
            assert counts == {"succeeded": 12}
            for tenant, producer in producers.items():
                rows = await producer.fetch("SELECT id, tenant_id, status, result FROM batchd.jobs")
                assert sorted(r["id"] for r in rows) == sorted(jobs[tenant]), "each sees its own results"
                assert all(r["status"] == "succeeded" and tenant in json.dumps(r["result"]) for r in rows)

            assert daemon.http_url is not None
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(f"{daemon.http_url}/readyz") as response:
                assert response.status == 200
            async with http.get(f"{daemon.http_url}/v1/jobs/{jobs['acme'][0]}", headers=headers) as response:
                assert response.status == 200
                assert (await response.json())["status"] == "succeeded"
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            async with http.get(f"{daemon.http_url}/v1/overview", headers=admin) as response:
                assert response.status == 200
                totals = {row["tenant_id"]: row["succeeded"] for row in (await response.json())["totals"]}
                assert totals == {"acme": 6, "globex": 6}
            # acme's stream, replayed from the start: its own jobs' events, published by the daemon role.
            url = f"{daemon.http_url}/v1/events?last_event_id=0&types=job.succeeded"
            async with asyncio.timeout(20), http.get(url, headers=headers) as response:
                seen = set()
                async for message in messages(response.content.iter_any()):
                    if message.is_event:
                        seen.add(json.loads(message.data)["job_id"])
                    if len(seen) == len(jobs["acme"]):
                        break
            assert seen == {str(job) for job in jobs["acme"]}

            async def settled() -> bool:
                unsettled: int = await db.fetchval(
                    "SELECT (SELECT count(*) FROM batchd.batches WHERE status <> 'applied')"
                    "     + (SELECT count(*) FROM batchd.events WHERE seq IS NULL)"
                )
                return unsettled == 0

            await wait_until(settled)

        assert await instance_rows(db) == [], "it deleted its row"
        await pruned_as_the_daemon(db, daemon_db)
    finally:
        for connection in (*producers.values(), daemon_db):
            await connection.close()


# -- the owner -----------------------------------------------------------------------------------------------


async def test_the_owner_migrates_an_empty_database_and_the_daemon_sees_it_up_to_date(
    blank_deployment: Deployment, tmp_path: Path
) -> None:
    deployment = blank_deployment
    before = await deployment.roles()
    assert "Run batchd migrate as" in before

    environment = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "ANTHROPIC_"))}
    environment["BATCHD_DATABASE__URL"] = deployment.url_as(deployment.owner)
    code, out, err = await run_python("-m", "batchd", "migrate", env=environment, cwd=tmp_path)
    assert code == 0, err
    assert out.strip().splitlines() == [
        f"applied {m.version:04d}_{m.name}" for m in migrate.shipped_migrations()
    ]

    assert "have their privileges" in await deployment.roles()
    daemon = await deployment.connect(deployment.daemon)
    producer = await deployment.connect(deployment.producer)
    try:
        assert await migrate.pending(daemon) == []
        job = await producer.fetchval(
            "INSERT INTO batchd.jobs (tenant_id, request) VALUES ('acme', $1) RETURNING id", raw_request("hi")
        )
        assert await producer.fetchval("SELECT batchd.cancel_job($1)", job) is True
        assert await daemon.fetchval("SELECT count(*) FROM batchd.events WHERE job_id = $1", job) == 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await daemon.execute("CREATE TABLE batchd.mine (i int)")
        superuser = await deployment.connect()
        owners = await superuser.fetch(
            "SELECT DISTINCT pg_get_userbyid(relowner) AS owner FROM pg_class"
            " WHERE relnamespace = 'batchd'::regnamespace"
        )
        await superuser.close()
        assert [row["owner"] for row in owners] == [deployment.owner], "the owner made every table"
    finally:
        await daemon.close()
        await producer.close()


async def test_the_operators_commands_run_as_the_daemon_and_enqueue_as_a_producer(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Every database command checks the schema is migrated first, but a producer may not read
    batchd.migrations (roles.sql): its `batchd enqueue` goes on without the check."""
    await deployment.roles()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "ANTHROPIC_"))}

    async def batchd(role: str, *args: str) -> tuple[int, str, str]:
        env = {**environment, "BATCHD_DATABASE__URL": deployment.url_as(role)}
        return await run_python("-m", "batchd", *args, env=env, cwd=tmp_path)

    request = json.dumps(raw_request("from the command line"))
    code, out, err = await batchd(deployment.producer, "enqueue", "--tenant", "acme", "--request", request)
    assert (code, err.strip()) == (0, "enqueued 1 job(s)"), err
    assert uuid.UUID(out.strip()), "the job's id"
    code, out, err = await batchd(deployment.daemon, "status", "--json")
    assert code == 0, err
    assert json.loads(out)["tenants"]["acme"]["queued"] == 1
