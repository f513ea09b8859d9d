"""Chaos: the real daemon, as a process, killed with SIGKILL at each dangerous step, its database cut off and
restarted, the API failing — and every job still ends once, in one terminal state, with its own result.

A kill point is a gate in SQL: the test installs a trigger on the statement of that step which waits for a
shared advisory lock the test holds, so the daemon stops exactly there (seen in pg_locks), and is killed
while it waits. No hook in batchd's code, no timing luck. The gate is removed before the restart.

Replay a failure with its seed: BATCHD_CHAOS_SEED=<seed> (the emulator's draws and the test's choices)
and BATCHD_CHAOS_REPEAT=<n> to run each scenario n times (seed, seed + 1, ...).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support import (
    QUICK,
    EmulatorHandle,
    daemon_config,
    daemon_process,
    insert_raw,
    log_events,
    wait_until,
)

from batchd.dev.embedded_pg import EmbeddedPostgres
from batchd.emulator import EmulatorConfig
from batchd.emulator.app import EMULATOR
from batchd.migrate import migrate
from batchd.store import init_connection

SEED = int(os.environ.get("BATCHD_CHAOS_SEED", "20261125"))
REPEAT = int(os.environ.get("BATCHD_CHAOS_REPEAT", "1"))
JOBS = 300
GATE_KEY = 770_001  # the advisory lock the gates wait on (classid 0, objid 770001 in pg_locks)

pytestmark = [pytest.mark.chaos, pytest.mark.slow]
repeats = pytest.mark.parametrize("seed", [SEED + n for n in range(REPEAT)], ids=lambda seed: f"seed{seed}")


@pytest.fixture
def emulator_config(seed: int) -> EmulatorConfig:
    """The emulator of each repeat draws from that repeat's seed (seed, seed + 1, ...)."""
    return QUICK.model_copy(update={"seed": seed})


@pytest.fixture(autouse=True)
def emulator_seeded(emulator: EmulatorHandle, seed: int) -> None:
    """The emulator really runs on this repeat's seed."""
    assert emulator.app[EMULATOR].config.seed == seed


# -- gates --------------------------------------------------------------------------------------------------

GATE_FUNCTION = f"""
CREATE OR REPLACE FUNCTION batchd.chaos_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Once TG_ARGV[0] jobs have succeeded (0: at once), wait for the test's lock: the daemon stops here.
    -- Counted from what is committed (and this transaction's own rows), not from the rows that went by:
    -- chunks applied side by side would take turns past a row count, and all wait with none committed.
    IF (SELECT count(*) FROM batchd.jobs WHERE status = 'succeeded') >= TG_ARGV[0]::bigint THEN
        PERFORM pg_advisory_xact_lock_shared({GATE_KEY});
    END IF;
    RETURN NEW;
END
$$;
"""  # noqa: S608 - GATE_KEY is this module's constant

# Each dangerous step, as the statement that begins it.
GATES = {
    # Jobs claimed (FOR UPDATE SKIP LOCKED), the batch not yet recorded: inside the flush's transaction.
    "after_claim": "BEFORE INSERT ON batchd.batches FOR EACH ROW",
    # The batch and its jobs recorded and committed; the create call not yet attempted.
    "after_record": "BEFORE UPDATE ON batchd.batches FOR EACH ROW"
    " WHEN (OLD.create_attempted_at IS NULL AND NEW.create_attempted_at IS NOT NULL)",
    # The provider made the batch and answered; batchd has not recorded its id.
    "after_create": "BEFORE UPDATE ON batchd.batches FOR EACH ROW"
    " WHEN (OLD.provider_batch_id IS NULL AND NEW.provider_batch_id IS NOT NULL)",
    # Results being applied: some chunks committed, the next one waiting mid-transaction.
    "mid_apply": "BEFORE UPDATE ON batchd.jobs FOR EACH ROW"
    " WHEN (OLD.status = 'submitted' AND NEW.status <> 'submitted')",
}


# Backends waiting at the gate.
WAITING = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND NOT granted"
    # Only this test's database: the same key is taken in the databases of tests running beside it.
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
TERMINATE_WAITING = WAITING.replace("count(*)", "pg_terminate_backend(pid)")


class Gate:
    """A trigger that stops the daemon at one statement until the test lets go (or kills it)."""

    def __init__(self, db: asyncpg.Connection, database_url: str) -> None:
        self.db = db
        self.database_url = database_url
        self.holder: asyncpg.Connection | None = None

    async def close(self, step: str, after_succeeded: int = 0) -> None:
        self.holder = await asyncpg.connect(self.database_url)
        await self.holder.execute(f"SELECT pg_advisory_lock({GATE_KEY})")
        await self.db.execute(GATE_FUNCTION)
        await self.db.execute(
            f"CREATE TRIGGER chaos_gate {GATES[step]} EXECUTE FUNCTION batchd.chaos_gate('{after_succeeded}')"
        )

    async def reached(self) -> bool:
        return bool(await self.db.fetchval(WAITING, GATE_KEY))

    async def remove(self) -> None:
        # A killed daemon's backends still wait at the gate (the server notices a dead client only when it
        # next talks to it); they go first, or their statement would finish, and commit, after the "crash".
        await self.db.execute(TERMINATE_WAITING, GATE_KEY)
        for table in ("batches", "jobs"):
            await self.db.execute(f"DROP TRIGGER IF EXISTS chaos_gate ON batchd.{table}")
        await self.db.execute("DROP FUNCTION IF EXISTS batchd.chaos_gate()")
        if self.holder is not None:
            await self.holder.close()
            self.holder = None


@pytest.fixture
async def gate(db: asyncpg.Connection, database_url: str) -> AsyncIterator[Gate]:
    opened = Gate(db, database_url)
    try:
        yield opened
    finally:
        await opened.remove()


# -- what must hold after every scenario ---------------------------------------------------------------------


def hex_id(job_id: Any) -> str:
    return uuid.UUID(str(job_id)).hex


async def assert_every_job_ended_once(
    db: asyncpg.Connection, emulator: EmulatorHandle, texts: dict[str, str], *, resent: set[str] | None = None
) -> None:
    """Every job succeeded with the answer to its own prompt, with exactly one terminal event; no batch is
    left open; the provider never received a custom_id twice, nor a job twice unless it was retried
    (`resent`: jobs whose first batch expired or errored, sent again in a new batch by design)."""
    rows = await db.fetch("SELECT id, status, result, attempts FROM batchd.jobs")
    assert Counter(row["status"] for row in rows) == {"succeeded": len(texts)}
    for row in rows:
        assert texts[str(row["id"])] in row["result"]["content"][0]["text"], "its own result"
    terminal = await db.fetch(
        "SELECT job_id, count(*) AS n FROM batchd.events"
        " WHERE type IN ('job.succeeded', 'job.failed', 'job.canceled') GROUP BY job_id"
    )
    assert {str(row["job_id"]): row["n"] for row in terminal} == dict.fromkeys(texts, 1)
    assert await db.fetchval("SELECT count(*) FROM batchd.batches WHERE status <> 'applied'") == 0
    stats = await emulator.stats()
    assert stats["duplicate_custom_ids"] == {}, "a custom_id submitted twice"
    received = (await emulator.admin("GET", "custom_ids"))["custom_ids"]
    per_job: Counter[str] = Counter()
    for custom_id, times in received.items():
        per_job[custom_id.rsplit("-", 1)[1]] += times
    resent = resent or set()
    for job_id in texts:
        expected = per_job[hex_id(job_id)]
        assert expected >= 1
        if job_id not in resent:
            assert expected == 1, f"job {job_id} sent {expected} times"


async def queue_jobs(db: asyncpg.Connection, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    texts = [f"chaos {seed} question {n} {rng.randrange(10**9)}" for n in range(JOBS)]
    ids = await insert_raw(db, "acme", texts)
    return {str(job_id): text for job_id, text in zip(ids, texts, strict=True)}


async def all_done(db: asyncpg.Connection, count: int) -> bool:
    done = await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE status IN ('succeeded', 'failed')")
    open_batches = await db.fetchval("SELECT count(*) FROM batchd.batches WHERE status <> 'applied'")
    return bool(done == count and open_batches == 0)


async def progress(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE status = 'succeeded'"))


async def kill(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(process.wait(), timeout=10) == -signal.SIGKILL


@asynccontextmanager
async def restarted(config: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    async with daemon_process(config, log) as process:
        yield process
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0


# -- SIGKILL at each dangerous step --------------------------------------------------------------------------


@repeats
@pytest.mark.parametrize("step", list(GATES))
async def test_sigkill_at_each_step_then_a_restart_ends_every_job_once(  # noqa: PLR0917 - fixtures
    step: str, seed: int, db: Any, emulator: EmulatorHandle, database_url: str, gate: Gate, tmp_path: Path
) -> None:
    rng = random.Random(f"{seed}-{step}")
    config = daemon_config(tmp_path / "batchd.toml", database_url, emulator.url, results={"apply_chunk": 10})
    log = tmp_path / "daemon.log"
    texts = await queue_jobs(db, seed)
    # mid_apply lets some jobs succeed first (their chunks committed), then catches the next chunk halfway.
    await gate.close(step, after_succeeded=rng.randrange(15, 45) if step == "mid_apply" else 0)
    async with daemon_process(config, log) as first:
        await wait_until(gate.reached, timeout=30)
        await kill(first)
    await gate.remove()
    await assert_stopped_at(step, db, emulator)

    async with restarted(config, log):
        await wait_until(lambda: all_done(db, JOBS), timeout=60)
    await assert_every_job_ended_once(db, emulator, texts)
    assert log_events(log)["daemon.stopped"] == 1, "the first was killed; the second stopped"


async def assert_stopped_at(step: str, db: asyncpg.Connection, emulator: EmulatorHandle) -> None:
    """The kill left the state that step implies: the test broke what it meant to break."""
    batches = await db.fetch("SELECT status, create_attempted_at, provider_batch_id FROM batchd.batches")
    statuses = Counter(await db.fetchval("SELECT array_agg(status) FROM batchd.jobs"))
    if step == "after_claim":
        assert batches == [], "the flush's transaction rolled back with the kill"
        assert statuses == {"queued": JOBS}
    elif step == "after_record":
        assert any(b["status"] == "pending" and b["create_attempted_at"] is None for b in batches)
    elif step == "after_create":
        assert (await emulator.stats())["batches_created"] >= 1
        assert any(b["create_attempted_at"] and b["provider_batch_id"] is None for b in batches)
    else:
        assert 0 < statuses["succeeded"] < JOBS, "some results applied, not all"
        assert any(b["status"] == "ended" for b in batches)


@repeats
async def test_sigkill_while_results_stream_then_a_restart_ends_every_job_once(
    seed: int, db: Any, emulator: EmulatorHandle, database_url: str, tmp_path: Path
) -> None:
    # A batch's 50 results (about 30 KB) would fit in one default 64 KiB chunk: in 2 KiB chunks (three or
    # four results each) 0.3 s apart, a download takes about 5 s, and results are applied ten at a time, so
    # there is a long moment with some of a batch's results applied and the rest still on the wire.
    await emulator.set_faults(results_chunk_delay_s=0.3, results_chunk_bytes=2048)
    config = daemon_config(tmp_path / "batchd.toml", database_url, emulator.url, results={"apply_chunk": 10})
    log = tmp_path / "daemon.log"
    texts = await queue_jobs(db, seed)
    # A batch whose results are being streamed: ended at the provider, some of its jobs applied, some not.
    half_applied = (
        "SELECT count(*) FROM batchd.batches AS b WHERE b.status = 'ended'"
        " AND EXISTS (SELECT 1 FROM batchd.jobs WHERE batch_id = b.id AND status = 'succeeded')"
        " AND EXISTS (SELECT 1 FROM batchd.jobs WHERE batch_id = b.id AND status = 'submitted')"
    )
    async with daemon_process(config, log) as first:

        async def streaming() -> bool:
            return bool(await db.fetchval(half_applied))

        await wait_until(streaming, timeout=30, interval=0.005)
        await kill(first)
    # The kill landed mid-stream: a batch is still half applied (the rest of its download never arrived),
    # and nothing was lost or finished twice on the way.
    assert await db.fetchval(half_applied) >= 1, "the download was cut off part way"
    assert 0 < await progress(db) < JOBS
    await emulator.set_faults()
    async with restarted(config, log):
        await wait_until(lambda: all_done(db, JOBS), timeout=60)
    await assert_every_job_ended_once(db, emulator, texts)


# -- the database cut off, and restarted ---------------------------------------------------------------------


@repeats
async def test_connections_cut_again_and_again_mid_run_lose_nothing(
    seed: int, db: Any, emulator: EmulatorHandle, database_url: str, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    await emulator.admin("PATCH", "settings", {"processing_time_s": [0.5, 1.5]})
    config = daemon_config(tmp_path / "batchd.toml", database_url, emulator.url)
    log = tmp_path / "daemon.log"
    texts = await queue_jobs(db, seed)
    cuts = 0
    async with restarted(config, log):
        for cut in range(4):
            # At four stages of the run (a growing share of jobs done, the point drawn from the seed), while
            # batches are open, every connection the daemon has is cut by the server.
            share = (cut + rng.random()) / 6

            async def stage(share: float = share) -> bool:
                return await all_done(db, JOBS) or await progress(db) >= share * JOBS

            await wait_until(stage, timeout=60, interval=0.01)
            if await all_done(db, JOBS):
                break
            await db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            cuts += 1
        await wait_until(lambda: all_done(db, JOBS), timeout=90)
    await assert_every_job_ended_once(db, emulator, texts)
    assert cuts >= 2, "the run was cut mid-way more than once"
    assert log_events(log)["listener.disconnected"] >= 1


@repeats
async def test_postgresql_restarted_mid_run_loses_nothing(
    seed: int, emulator: EmulatorHandle, tmp_path: Path
) -> None:
    # A server of this test's own (the embedded one), so that restarting it disturbs nothing else.
    server = EmbeddedPostgres(tmp_path / "pgdata")
    url = await asyncio.to_thread(server.start)
    try:
        db = await asyncpg.connect(url)
        await init_connection(db)
        try:
            await migrate(db)
            await emulator.admin("PATCH", "settings", {"processing_time_s": [1.0, 2.0]})
            config = daemon_config(tmp_path / "batchd.toml", url, emulator.url)
            log = tmp_path / "daemon.log"
            texts = await queue_jobs(db, seed)
            async with restarted(config, log):

                async def in_flight() -> bool:
                    return bool(
                        await db.fetchval("SELECT count(*) FROM batchd.batches WHERE status = 'in_progress'")
                    )

                await wait_until(in_flight, timeout=30)
                await db.close()
                await asyncio.to_thread(server.stop)
                assert not await _answers(url)
                await asyncio.to_thread(server.start)
                db = await asyncpg.connect(url)
                await init_connection(db)
                await wait_until(lambda: all_done(db, JOBS), timeout=90)
            await assert_every_job_ended_once(db, emulator, texts)
            events = log_events(log)
            assert events["listener.disconnected"] >= 1
            assert events["listener.connected"] >= 2
        finally:
            await db.close()
    finally:
        await asyncio.to_thread(server.stop)


async def _answers(url: str) -> bool:
    try:
        connection = await asyncpg.connect(url, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await connection.close()
    return True


# -- the API failing -----------------------------------------------------------------------------------------


async def failures(emulator: EmulatorHandle, status: int) -> int:
    """Calls the emulator answered with `status`, every endpoint together."""
    statuses = (await emulator.stats())["statuses"]  # {"create 429": n, ...}
    return sum(n for key, n in statuses.items() if key.endswith(f" {status}"))


# Emulated seconds of 500s and 529s: an hour, so that the real time the test takes (the daemon backs off, and
# waits out each failed create's window before sending it again) cannot end the outage before the test does.
OUTAGE_S = 3600
OUTAGE_TRIES = 6  # new failures the daemon must make during the outage, one after the other


@repeats
async def test_a_minute_of_500s_and_529s_on_every_endpoint_loses_nothing(
    seed: int, db: Any, emulator: EmulatorHandle, database_url: str, tmp_path: Path
) -> None:
    config = daemon_config(tmp_path / "batchd.toml", database_url, emulator.url)
    log = tmp_path / "daemon.log"
    texts = await queue_jobs(db, seed)
    # For an hour of the emulator's time, every call fails, half with 500 and half with 529; then the API
    # answers again on its own.
    await emulator.set_faults(
        http=[
            {"endpoint": "*", "status": 500, "rate": 0.5, "for_s": OUTAGE_S},
            {"endpoint": "*", "status": 529, "rate": 1.0, "for_s": OUTAGE_S},
        ]
    )

    async def failed() -> int:
        return await failures(emulator, 500) + await failures(emulator, 529)

    async with restarted(config, log):
        # The daemon keeps trying all through the outage, and nothing gets through.
        for _ in range(OUTAGE_TRIES):
            before = await failed()

            async def failed_again(before: int = before) -> bool:
                return await failed() > before

            await wait_until(failed_again, timeout=30)
            assert (await emulator.stats())["batches_created"] == 0
            assert await progress(db) == 0
        assert await failures(emulator, 500)
        assert await failures(emulator, 529)
        # The hour passes: the API answers again, and every job ends once.
        await emulator.advance(OUTAGE_S)
        await wait_until(lambda: all_done(db, JOBS), timeout=90)
    await assert_every_job_ended_once(db, emulator, texts)


@repeats
async def test_a_429_storm_is_waited_out_and_loses_nothing(
    seed: int, db: Any, emulator: EmulatorHandle, database_url: str, tmp_path: Path
) -> None:
    config = daemon_config(tmp_path / "batchd.toml", database_url, emulator.url)
    log = tmp_path / "daemon.log"
    texts = await queue_jobs(db, seed)
    await emulator.set_faults(http=[{"endpoint": "*", "status": 429, "rate": 1.0, "retry_after_s": 1}])
    async with restarted(config, log):

        async def stormed() -> bool:
            return await failures(emulator, 429) >= 5

        await wait_until(stormed, timeout=60)
        refused = await failures(emulator, 429)
        await emulator.set_faults()
        await wait_until(lambda: all_done(db, JOBS), timeout=90)
    await assert_every_job_ended_once(db, emulator, texts)
    # retry-after is honoured: the daemon does not hammer an API that asked it to wait.
    assert refused < 40


@repeats
async def test_a_batch_that_expires_mostly_unprocessed_is_retried_and_loses_nothing(
    seed: int, db: Any, emulator: EmulatorHandle, database_url: str, tmp_path: Path
) -> None:
    config = daemon_config(tmp_path / "batchd.toml", database_url, emulator.url)
    log = tmp_path / "daemon.log"
    texts = await queue_jobs(db, seed)
    await emulator.set_faults(expired_rate=0.9)
    async with restarted(config, log):

        async def one_expired() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE attempts > 0"))

        await wait_until(one_expired, timeout=60)
        await emulator.set_faults()
        await wait_until(lambda: all_done(db, JOBS), timeout=90)
    retried = {str(row["id"]) for row in await db.fetch("SELECT id FROM batchd.jobs WHERE attempts > 0")}
    assert len(retried) >= 10, "a batch expired with most of its requests unprocessed"
    await assert_every_job_ended_once(db, emulator, texts, resent=retried)
