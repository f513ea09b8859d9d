"""A producer writes only what a producer may write (migration 0008), and no row, however odd, stops or slows
the daemon's work on the others.

The producers here are set up as an operator sets them up (deploy/sql/roles.sql, rls.sql and
tenant_producer.sql, run with psql: tests/test_roles.py's Deployment), and write as those roles. The odd
rows the daemon must survive can no longer be written by a producer: they are written as the superuser, as
rows left from before 0008 would be."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support import QUICK, EmulatorHandle, insert_raw, raw_request, run_python, wait_until
from test_roles import Deployment, _deployment

from batchd import migrate
from batchd.emulator import EmulatorConfig
from batchd.store import init_connection, sql

PRODUCER_COLUMNS = {
    "tenant_id",
    "request",
    "job_type",
    "input",
    "metadata",
    "idempotency_key",
    "deadline",
    "route",
}
# For every other column of batchd.jobs, a value a plain INSERT would not give it (as text, cast by the
# database). A column missing here fails the test: a migration that adds one to batchd.jobs adds it to
# batchd.jobs_guard_insert too, and here.
FORGED = {
    "id": str(uuid.uuid4()),
    "seq": "-1",
    "created_at": "2000-01-01T00:00:00Z",
    "updated_at": "2000-01-01T00:00:00Z",
    "status": "sending",
    "attempts": "2147483647",
    "batch_id": None,  # another tenant's batch: made by the test
    "params": '{"model": "m"}',
    "result": '{"content": [{"type": "text", "text": "made up"}]}',
    "error": '{"type": "made_up", "message": "made up"}',
    "usage": '{"input_tokens": 1000000}',
    "submitted_at": "2000-01-01T00:00:00Z",
    "completed_at": "2000-01-01T00:00:00Z",
    "path": "sync",
    "path_reason": "made up",
    "sync_owner": "nobody",
    "sync_lease_until": "2000-01-01T00:00:00Z",
    "not_before": "2000-01-01T00:00:00Z",
}
SLOW = EmulatorConfig(processing_time_s=(3600.0, 3600.0), cancel_time_s=1.0, seed=11)


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


@pytest.fixture
async def deployment(database_template: str) -> Any:
    """A migrated database of its own, with the roles, row-level security and two tenants' producers."""
    async with _deployment(database_template) as made:
        await made.roles()
        await made.psql("rls.sql", daemon=made.daemon)
        for tenant in ("acme", "globex"):
            await made.tenant(tenant)
        yield made


async def job_columns(connection: asyncpg.Connection) -> dict[str, str]:
    rows = await connection.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute"
        " WHERE attrelid = 'batchd.jobs'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    )
    return {row["attname"]: row["type"] for row in rows}


async def make_batch(connection: asyncpg.Connection) -> Any:
    return await connection.fetchval(
        "INSERT INTO batchd.batches (tag, request_count, bytes, status)"
        " VALUES (substr(md5(random()::text), 1, 12), 1, 100, 'in_progress') RETURNING id"
    )


def assert_refused(error: asyncpg.PostgresError, column: str) -> None:
    assert error.sqlstate == "42501", error
    assert f"batchd.jobs.{column}" in str(error)
    assert error.column_name == column
    assert "leave " + column + " out" in (error.hint or "")


# -- INSERT --------------------------------------------------------------------------------------------------


async def test_a_tenant_producer_sets_its_own_columns_and_is_refused_every_other_naming_it(
    deployment: Deployment, tmp_path: Path
) -> None:
    superuser = await deployment.connect()
    acme = await deployment.connect(deployment.tenant_role("acme"))
    try:
        # Another tenant's batch, in flight: what a forged row would have joined.
        forged = {**FORGED, "batch_id": str(await make_batch(superuser))}
        columns = await job_columns(superuser)
        unknown = set(columns) - PRODUCER_COLUMNS - set(forged)
        assert not unknown, f"new columns {unknown}: add them to jobs_guard_insert (a migration) and FORGED"
        for column, value in forged.items():
            # Names from the catalog, the value bound.
            into = f"INSERT INTO batchd.jobs (tenant_id, request, {column})"
            statement = into + f" VALUES ('acme', $1, $2::text::{columns[column]})"
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
                await acme.execute(statement, raw_request("forged"), value)
            assert_refused(refused.value, column)
        # Among honest rows, one forged row: the whole statement is refused.
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
            await acme.execute(
                "INSERT INTO batchd.jobs (tenant_id, request, status)"
                " VALUES ('acme', $1, 'queued'), ('acme', $1, 'succeeded'), ('acme', $1, DEFAULT)",
                raw_request("mixed"),
            )
        assert_refused(refused.value, "status")
        assert await superuser.fetchval("SELECT count(*) FROM batchd.jobs") == 0

        # Every producer column still works, route and deadline included; a value equal to what a plain
        # INSERT gives is no forgery.
        row = await acme.fetchrow(
            "INSERT INTO batchd.jobs (tenant_id, request, metadata, idempotency_key, deadline, route, status,"
            " attempts) VALUES ('acme', $1, $2, 'k1', now() + interval '1 hour', 'sync', 'queued', 0)"
            " RETURNING *",
            raw_request("honest"),
            {"ticket": 7},
        )
        assert row is not None
        assert (row["status"], row["route"], row["attempts"], row["metadata"]) == (
            "queued",
            "sync",
            0,
            {"ticket": 7},
        )
        assert row["id"] is not None
        assert row["seq"] is not None
        typed = await acme.fetchrow(
            "INSERT INTO batchd.jobs (tenant_id, job_type, input) VALUES ('acme', 'classify', $1)"
            " RETURNING seq",
            {"text": "t", "categories": ["a"]},
        )
        assert typed is not None
        assert typed["seq"] > row["seq"]
        assert (
            await acme.fetchval(
                "INSERT INTO batchd.jobs (tenant_id, request, idempotency_key) VALUES ('acme', $1, 'k1')"
                " ON CONFLICT DO NOTHING RETURNING id",
                raw_request("retried"),
            )
            is None
        )
        # The daemon, the owner and the superuser write any column (tests, repairs, a restore).
        daemon = await deployment.connect(deployment.daemon)
        owner = await deployment.connect(deployment.owner)
        try:
            for writer in (daemon, owner, superuser):
                await writer.execute(
                    "INSERT INTO batchd.jobs (tenant_id, request, status, attempts, error, seq, id)"
                    " VALUES ('globex', $1, 'failed', 2, '{\"type\": \"repair\"}', 5, $2)",
                    raw_request("by hand"),
                    uuid.uuid4(),
                )
            await daemon.execute("UPDATE batchd.jobs SET attempts = 1 WHERE tenant_id = 'globex'")
        finally:
            await daemon.close()
            await owner.close()

        # `batchd enqueue` runs as the daemon role.
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "ANTHROPIC_"))}
        environment["BATCHD_DATABASE__URL"] = deployment.url_as(deployment.daemon)
        code, out, err = await run_python(
            "-m",
            "batchd",
            "enqueue",
            "--tenant",
            "globex",
            "--request",
            json.dumps(raw_request("cli")),
            env=environment,
            cwd=tmp_path,
        )
        assert (code, err.strip()) == (0, "enqueued 1 job(s)"), err
        assert uuid.UUID(out.strip()), "the job's id"
        counts = await superuser.fetch(
            "SELECT tenant_id, status, count(*) AS n FROM batchd.jobs GROUP BY 1, 2 ORDER BY 1, 2"
        )
        assert [tuple(r.values()) for r in counts] == [
            ("acme", "queued", 2),
            ("globex", "failed", 3),
            ("globex", "queued", 1),
        ]
    finally:
        await acme.close()
        await superuser.close()


# -- UPDATE --------------------------------------------------------------------------------------------------


async def test_whatever_an_operator_grants_a_producer_it_only_cancels_its_queued_jobs(
    deployment: Deployment,
) -> None:
    superuser = await deployment.connect()
    # Too generous an operator: everything on batchd.jobs, to the tenant's role and to the shared one.
    await superuser.execute(
        f'GRANT ALL ON batchd.jobs TO "{deployment.producer}", "{deployment.tenant_role("acme")}"'
    )
    acme = await deployment.connect(deployment.tenant_role("acme"))
    try:
        queued, done, second = await insert_raw(acme, "acme", ["queued", "done", "second"])
        await superuser.execute(
            "UPDATE batchd.jobs SET status = 'failed', error = '{\"type\": \"x\"}' WHERE id = $1", done
        )
        before = await superuser.fetch("SELECT * FROM batchd.jobs ORDER BY seq")
        refused = {
            'UPDATE batchd.jobs SET result = \'{"made": "up"}\' WHERE id = $1': "result",
            "UPDATE batchd.jobs SET attempts = 2147483647 WHERE id = $1": "attempts",
            "UPDATE batchd.jobs SET sync_lease_until = '2000-01-01' WHERE id = $1": "sync_lease_until",
            "UPDATE batchd.jobs SET seq = -1 WHERE id = $1": "seq",
            "UPDATE batchd.jobs SET tenant_id = tenant_id, request = '{}' WHERE id = $1": "request",
            "UPDATE batchd.jobs SET status = 'canceled', usage = '{}' WHERE id = $1": "usage",
        }
        for statement, column in refused.items():
            with pytest.raises(
                asyncpg.InsufficientPrivilegeError, match=re.escape(f"may not change batchd.jobs.{column}")
            ):
                await acme.execute(statement, queued)
        for status in ("succeeded", "failed", "submitted", "sending"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="may only cancel"):
                await acme.execute("UPDATE batchd.jobs SET status = $2 WHERE id = $1", queued, status)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not set its status to queued"):
            await acme.execute("UPDATE batchd.jobs SET status = 'queued' WHERE id = $1", done)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=re.escape("batchd.jobs.status")):
            await acme.execute(
                "INSERT INTO batchd.jobs (tenant_id, request, status) VALUES ('acme', $1, 'succeeded')",
                raw_request("forged"),
            )
        assert [dict(r) for r in await superuser.fetch("SELECT * FROM batchd.jobs ORDER BY seq")] == [
            dict(r) for r in before
        ]

        # A cancel still goes through, both ways; a finished job still cannot be canceled.
        assert (
            await acme.execute("UPDATE batchd.jobs SET status = 'canceled' WHERE id = $1", queued)
            == "UPDATE 1"
        )
        assert await acme.fetchval("SELECT batchd.cancel_job($1)", second) is True
        with pytest.raises(asyncpg.CheckViolationError, match="only a queued job can be canceled"):
            await acme.execute("UPDATE batchd.jobs SET status = 'canceled' WHERE id = $1", done)
        assert (
            await superuser.fetchval(
                "SELECT count(*) FROM batchd.events WHERE type = 'job.canceled' AND tenant_id = 'acme'"
            )
            == 2
        )

        # Asked for each statement, not once per session: the superuser's session, set to the tenant's role,
        # is refused; reset, it writes anything again.
        await superuser.execute(f'SET ROLE "{deployment.tenant_role("acme")}"')
        with pytest.raises(
            asyncpg.InsufficientPrivilegeError, match=re.escape("may not change batchd.jobs.attempts")
        ):
            await superuser.execute("UPDATE batchd.jobs SET attempts = 9 WHERE id = $1", done)
        await superuser.execute("RESET ROLE")
        assert (
            await superuser.execute("UPDATE batchd.jobs SET attempts = 9 WHERE id = $1", done) == "UPDATE 1"
        )
    finally:
        await acme.close()
        await superuser.close()


# -- odd rows ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("emulator_config", [SLOW])
async def test_odd_rows_are_set_aside_and_another_tenants_batch_and_sync_jobs_finish(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    settings = daemon_settings(
        routing={"lease_s": 5.0, "prior_turnaround_s": 900.0, "min_samples": 3, "margin_s": 30.0},
        batching={"max_attempts": 3},
    )
    # Left from before 0008 (a producer could write them then): a sync job "in flight" whose lease ran out
    # long ago, at the top of the attempts range; a made-up success; queued jobs with deadlines at the ends of
    # time.
    lost = await db.fetchval(
        "INSERT INTO batchd.jobs (tenant_id, request, status, route, path, sync_owner, sync_lease_until,"
        " attempts) VALUES ('mallory', $1, 'sending', 'sync', 'sync', 'ghost', '2000-01-01', 2147483647)"
        " RETURNING id",
        raw_request("lost"),
    )
    made_up = await db.fetchval(
        "INSERT INTO batchd.jobs (tenant_id, request, status, result, usage, completed_at)"
        " VALUES ('mallory', $1, 'succeeded', '{\"made\": \"up\"}', '{\"input_tokens\": \"lots\"}', now())"
        " RETURNING id",
        raw_request("made up"),
    )
    await db.execute(
        "INSERT INTO batchd.jobs (tenant_id, request, route, deadline)"
        " VALUES ('mallory', $1, 'auto', 'infinity'), ('mallory', $1, 'batch', '-infinity')",
        raw_request("the ends of time"),
    )
    async with start_daemon(settings):
        honest_sync = await db.fetchval(
            "INSERT INTO batchd.jobs (tenant_id, request, route) VALUES ('globex', $1, 'sync') RETURNING id",
            raw_request("globex, at once"),
        )
        honest_batch = await insert_raw(db, "globex", [f"globex {i}" for i in range(3)])

        async def in_flight() -> bool:
            return bool(
                await db.fetchval(
                    "SELECT bool_and(status = 'submitted') FROM batchd.jobs WHERE id = ANY($1)", honest_batch
                )
            )

        await wait_until(in_flight, timeout=30)
        batch = await db.fetchval("SELECT batch_id FROM batchd.jobs WHERE id = $1", honest_batch[0])
        # Slipped into globex's batch, unknown to the provider: its retry once the batch ends used to
        # overflow, and the batch was never applied.
        stowaway = await db.fetchval(
            "INSERT INTO batchd.jobs (tenant_id, request, status, batch_id, attempts)"
            " VALUES ('mallory', $1, 'submitted', $2, 2147483647) RETURNING id",
            raw_request("stowaway"),
            batch,
        )
        await emulator.advance(3600)

        async def applied() -> bool:
            status: str = await db.fetchval("SELECT status FROM batchd.batches WHERE id = $1", batch)
            return status == "applied"

        await wait_until(applied, timeout=60)

        async def sync_done() -> bool:
            status: str = await db.fetchval("SELECT status FROM batchd.jobs WHERE id = $1", honest_sync)
            return status == "succeeded"

        await wait_until(sync_done, timeout=60)

        async def all_published() -> bool:
            # The overview counts a finished job once its event is published (overview_totals): wait for the
            # publisher, or a job that finished just now is in the jobs table and not yet in the totals.
            return not await db.fetchval("SELECT EXISTS (SELECT FROM batchd.events WHERE seq IS NULL)")

        await wait_until(all_published, timeout=30)

    statuses = {
        row["id"]: (row["status"], row["error_type"])
        for row in await db.fetch("SELECT id, status, error ->> 'type' AS error_type FROM batchd.jobs")
    }
    for job_id in (*honest_batch, honest_sync):
        assert statuses[job_id] == ("succeeded", None)
    assert statuses[lost] == ("failed", "sender_lost"), "set aside, with its reason"
    assert statuses[stowaway] == ("failed", "missing"), "set aside, with its reason"
    assert statuses[made_up] == ("succeeded", None), "left alone"
    ended = await db.fetch(
        "SELECT tenant_id FROM batchd.events WHERE type = 'batch.ended' AND batch_id = $1", batch
    )
    assert "globex" in [row["tenant_id"] for row in ended], "globex heard its batch end"
    # The dashboard's totals count the made-up usage as nothing, and still answer.
    totals = {row["tenant_id"]: row for row in await db.fetch(sql("overview_totals"))}
    honest_usage = await db.fetch(
        "SELECT usage FROM batchd.jobs WHERE tenant_id = 'mallory' AND status = 'succeeded' AND id <> $1",
        made_up,
    )
    assert totals["mallory"]["input_tokens"] == sum(row["usage"]["input_tokens"] for row in honest_usage)


# -- rows from before ----------------------------------------------------------------------------------------


async def test_the_migration_makes_rows_written_before_it_sane_and_keeps_them_so(
    blank_database_url: str,
) -> None:
    connection = await asyncpg.connect(blank_database_url)
    await init_connection(connection)
    try:
        async with connection.transaction():
            await connection.execute(sql("create_migrations_table"))
            for migration in migrate.shipped_migrations():
                if migration.version < 8:
                    await connection.execute(migration.text)
                    await connection.execute(
                        sql("record_migration"), migration.version, migration.name, migration.checksum
                    )
        batch = await make_batch(connection)
        odd = {
            "negative": await connection.fetchval(
                "INSERT INTO batchd.jobs (tenant_id, request, attempts) VALUES ('m', $1, -5) RETURNING id",
                raw_request("negative"),
            ),
            "timeless": await connection.fetchval(
                "INSERT INTO batchd.jobs (tenant_id, request, status, batch_id, created_at, submitted_at)"
                " VALUES ('m', $1, 'submitted', $2, '-infinity', '4713-01-01 BC') RETURNING id",
                raw_request("timeless"),
                batch,
            ),
            "leased": await connection.fetchval(
                "INSERT INTO batchd.jobs (tenant_id, request, status, route, path, sync_owner,"
                " sync_lease_until, not_before, updated_at) VALUES ('m', $1, 'sending', 'sync', 'sync', 'x',"
                " 'infinity', 'infinity', '294276-01-01') RETURNING id",
                raw_request("leased"),
            ),
            "usage": await connection.fetchval(
                "INSERT INTO batchd.jobs (tenant_id, request, status, usage, completed_at)"
                " VALUES ('m', $1, 'succeeded', '{\"input_tokens\": \"lots\"}', 'infinity') RETURNING id",
                raw_request("usage"),
            ),
        }
        assert [m.version for m in await migrate.migrate(connection)] == [
            m.version for m in migrate.shipped_migrations() if m.version >= 8
        ]

        rows = {
            row["id"]: row
            for row in await connection.fetch(
                "SELECT id, status, attempts, created_at, updated_at, submitted_at, completed_at,"
                " sync_lease_until, not_before, now() AS now FROM batchd.jobs"
            )
        }
        assert rows[odd["negative"]]["attempts"] == 0
        # What was out of range is now the migration's now(): a lease so set has run out.
        migrated_at = rows[odd["timeless"]]["created_at"]
        assert abs((rows[odd["negative"]]["now"] - migrated_at).total_seconds()) < 600
        assert rows[odd["timeless"]]["submitted_at"] == migrated_at
        leased = rows[odd["leased"]]
        assert (leased["sync_lease_until"], leased["not_before"], leased["updated_at"]) == (
            migrated_at,
            None,
            migrated_at,
        )
        assert rows[odd["usage"]]["completed_at"] == migrated_at
        assert {row["status"] for row in rows.values()} == {"queued", "submitted", "sending", "succeeded"}
        assert (
            await connection.fetchval(
                "SELECT count(*) FROM pg_constraint WHERE conrelid = 'batchd.jobs'::regclass AND convalidated"
                " AND conname IN ('jobs_attempts_not_negative', 'jobs_times_plausible')"
            )
            == 2
        )
        for statement in (
            "UPDATE batchd.jobs SET attempts = -1 WHERE id = $1",
            "UPDATE batchd.jobs SET sync_lease_until = 'infinity' WHERE id = $1",
        ):
            with pytest.raises(asyncpg.CheckViolationError):
                await connection.execute(statement, odd["leased"])
        totals = await connection.fetch(sql("overview_totals"))
        assert [(row["tenant_id"], row["input_tokens"]) for row in totals] == [("m", 0)]
    finally:
        await connection.close()


# A trigger that refuses to record a job marked "poison" as succeeded: a row the apply cannot write.
POISON_SUCCESS = (
    "CREATE FUNCTION public.poisoned() RETURNS trigger LANGUAGE plpgsql AS"
    " $$ BEGIN RAISE EXCEPTION 'poisoned row %', NEW.id; END $$;"
    "CREATE TRIGGER poisoned BEFORE UPDATE ON batchd.jobs FOR EACH ROW"
    " WHEN (NEW.metadata ? 'poison' AND NEW.status = 'succeeded') EXECUTE FUNCTION public.poisoned()"
)


async def test_a_row_that_fails_the_apply_is_set_aside_and_its_batch_ends(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    # A row no statement foresaw: here, one that a trigger refuses to record as succeeded (as a value the
    # apply cannot write would). It used to fail its whole chunk, and the batch was retried every 2 s forever.
    await db.execute(POISON_SUCCESS)
    try:
        good = await insert_raw(db, "globex", [f"good {i}" for i in range(3)])
        poisoned = await db.fetchval(
            "INSERT INTO batchd.jobs (tenant_id, request, metadata) VALUES ('mallory', $1, $2) RETURNING id",
            raw_request("poisoned"),
            {"poison": True},
        )
        async with start_daemon(daemon_settings()):

            async def applied() -> bool:
                return bool(
                    await db.fetchval(
                        "SELECT count(*) = 1 AND bool_and(status = 'applied') FROM batchd.batches"
                    )
                )

            await wait_until(applied, timeout=60)
        rows = {
            row["id"]: row
            for row in await db.fetch("SELECT id, status, error, batch_id, tenant_id FROM batchd.jobs")
        }
        assert [rows[job]["status"] for job in good] == ["succeeded"] * 3
        assert rows[poisoned]["status"] == "failed"
        assert rows[poisoned]["error"]["type"] == "set_aside"
        assert "poisoned row" in rows[poisoned]["error"]["message"]
        events = await db.fetch(
            "SELECT type, tenant_id FROM batchd.events WHERE job_id = $1 OR type = 'batch.ended' ORDER BY id",
            poisoned,
        )
        assert ("job.failed", "mallory") in [tuple(e.values()) for e in events]
        assert {e["tenant_id"] for e in events if e["type"] == "batch.ended"} == {"globex", "mallory"}
    finally:
        await db.execute("DROP TRIGGER poisoned ON batchd.jobs; DROP FUNCTION public.poisoned()")


# -- deployment --------------------------------------------------------------------------------------------


async def test_an_upgraded_deployment_keeps_its_daemon_working_before_roles_sql_runs_again(
    blank_deployment: Deployment,
) -> None:
    deployment = blank_deployment
    await deployment.roles()
    owner = await deployment.connect(deployment.owner)
    try:
        # The version before, installed by the owner, with the roles of its day.
        async with owner.transaction():
            await owner.execute(sql("create_migrations_table"))
            for migration in migrate.shipped_migrations():
                if migration.version < 8:
                    await owner.execute(migration.text)
                    await owner.execute(
                        sql("record_migration"), migration.version, migration.name, migration.checksum
                    )
        await deployment.roles()
        await deployment.tenant("acme")
        # The upgrade: batchd migrate, and roles.sql not yet run again.
        assert [m.version for m in await migrate.migrate(owner)] == [
            m.version for m in migrate.shipped_migrations() if m.version >= 8
        ]
    finally:
        await owner.close()
    daemon = await deployment.connect(deployment.daemon)
    acme = await deployment.connect(deployment.tenant_role("acme"))
    try:
        job = (await insert_raw(acme, "acme", ["after the upgrade"]))[0]
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=re.escape("batchd.jobs.attempts")):
            await acme.execute(
                "INSERT INTO batchd.jobs (tenant_id, request, attempts) VALUES ('acme', $1, 7)",
                raw_request("forged"),
            )
        # The daemon, found by its privileges on batchd.batches, still writes what it must.
        batch = await make_batch(daemon)
        assert (
            await daemon.execute(
                "UPDATE batchd.jobs SET status = 'submitted', batch_id = $2, attempts = 1 WHERE id = $1",
                job,
                batch,
            )
            == "UPDATE 1"
        )
        # And once roles.sql has run, it is the daemon by name.
        await deployment.roles()
        assert await daemon.fetchval("SELECT role_name FROM batchd.daemon_roles") == deployment.daemon
        assert await daemon.execute("UPDATE batchd.jobs SET attempts = 2 WHERE id = $1", job) == "UPDATE 1"
        # A tenant's role that is also the daemon's would write anything: tenant_producer.sql refuses it.
        await daemon.close()
        daemon = await deployment.connect()
        await daemon.execute(f'GRANT "{deployment.daemon}" TO "{deployment.tenant_role("acme")}"')
        code, _, err = await deployment.psql_status(
            "tenant_producer.sql",
            tenant="acme",
            role=deployment.tenant_role("acme"),
            producer=deployment.producer,
        )
        assert code != 0
        assert "member of batchd's owner or daemon role" in err
    finally:
        await daemon.close()
        await acme.close()


@pytest.fixture
async def blank_deployment(database_server: str) -> Any:
    """An empty database, and no roles yet."""
    async with _deployment(None) as made:
        yield made


async def test_a_sync_job_whose_row_fails_the_apply_is_set_aside_not_sent_again(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    # As above, on the sync path: the call was made and paid for; sending it again until max_attempts (its
    # lease taken back each time) would pay again and fail the same way.
    await db.execute(POISON_SUCCESS)
    try:
        insert = (
            "INSERT INTO batchd.jobs (tenant_id, request, route, metadata)"
            " VALUES ($1, $2, 'sync', $3) RETURNING id"
        )
        settings = daemon_settings(routing={"lease_s": 2.0}, batching={"max_attempts": 3})
        async with start_daemon(settings):
            poisoned = await db.fetchval(insert, "mallory", raw_request("poisoned"), {"poison": True})
            honest = await db.fetchval(insert, "globex", raw_request("honest"), None)

            async def final() -> bool:
                return bool(
                    await db.fetchval(
                        "SELECT bool_and(status IN ('succeeded', 'failed')) FROM batchd.jobs"
                        " WHERE id = ANY($1)",
                        [poisoned, honest],
                    )
                )

            await wait_until(final, timeout=30)
        rows = {
            row["id"]: row for row in await db.fetch("SELECT id, status, error, attempts FROM batchd.jobs")
        }
        assert rows[honest]["status"] == "succeeded"
        assert (rows[poisoned]["status"], rows[poisoned]["error"]["type"]) == ("failed", "set_aside")
        assert "poisoned row" in rows[poisoned]["error"]["message"]
        stats = await emulator.stats()
        assert stats["statuses"].get("messages 200") == 2, "each job was sent once"
    finally:
        await db.execute("DROP TRIGGER poisoned ON batchd.jobs; DROP FUNCTION public.poisoned()")


async def test_a_jobs_id_is_time_ordered(db: Any) -> None:
    """Ids are UUIDs version 7 (0012): the newest jobs, those in flight, sit together at the end of every
    index keyed by a job's id, however long the history (docs/benchmarks.md, Months of history)."""
    insert = "INSERT INTO batchd.jobs (tenant_id, request) VALUES ('acme', '{}') RETURNING id, created_at"
    rows = [await db.fetchrow(insert) for _ in range(20)]
    for row in rows:
        assert row["id"].version == 7
        assert row["id"].variant == uuid.RFC_4122
        at_ms = int(row["id"].hex[:12], 16)
        assert abs(at_ms / 1000 - row["created_at"].timestamp()) < 5, "its first 48 bits are its time"
    in_order = [row["id"].hex[:12] for row in rows]
    assert in_order == sorted(in_order), "later inserts, later (or equal) times"
