"""`batchd migrate | run | enqueue | status | cancel` as an operator runs them: real processes, real exit
statuses (78 a configuration error, 65 bad input data, 1 a refusal), against a real database."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from support import (
    BATCHD,
    QUICK,
    daemon_config,
    daemon_env,
    daemon_process,
    insert_raw,
    log_events,
    raw_request,
    run_batchd,
    start_emulator,
    wait_until,
    write_config,
)

from batchd.config import CREDENTIAL_NAME
from batchd.migrate import shipped_migrations
from batchd.statuses import JOB_STATUSES
from batchd.store import init_connection, sql

EX_CONFIG = 78
EX_DATAERR = 65


@pytest.fixture
def config(tmp_path: Path, database_url: str) -> Path:
    """A config file for the module's (migrated) database."""
    return write_config(tmp_path / "batchd.toml", database_url)


async def connect(url: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(url)
    await init_connection(connection)
    return connection


# -- migrate -------------------------------------------------------------------------------------------------


async def schema_state(url: str) -> tuple[int, int]:
    """(rows in batchd.migrations, batchd's tables)."""
    connection = await connect(url)
    try:
        migrations = await connection.fetchval("SELECT count(*) FROM batchd.migrations")
        tables = await connection.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'batchd' AND tablename <> 'migrations'"
        )
    finally:
        await connection.close()
    return migrations, tables


MIGRATIONS = shipped_migrations()
APPLIED_ALL = "\n".join(f"applied {m.version:04d}_{m.name}" for m in MIGRATIONS)
# Every table the shipped migrations create (none drops one), besides batchd.migrations itself.
# The tables the migrations leave: those they create, less those they drop (0012 drops batchd.spend).
SCHEMA = (
    len(MIGRATIONS),
    sum(m.text.count("CREATE TABLE batchd.") - m.text.count("DROP TABLE batchd.") for m in MIGRATIONS),
)


async def test_migrate_installs_the_schema_says_it_is_up_to_date_and_refuses_an_edited_one(
    blank_database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "batchd.toml", blank_database_url)
    code, out, err = await run_batchd("migrate", "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    assert out.strip() == APPLIED_ALL
    code, out, err = await run_batchd("migrate", "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    assert out.strip() == "the database is up to date"
    assert await schema_state(blank_database_url) == SCHEMA

    # A migration edited after it was applied: the database no longer matches the files.
    connection = await connect(blank_database_url)
    try:
        await connection.execute("UPDATE batchd.migrations SET checksum = 'edited' WHERE version = 1")
    finally:
        await connection.close()
    code, out, err = await run_batchd("migrate", "--config", str(config), cwd=tmp_path)
    assert (code, out) == (EX_CONFIG, ""), err
    assert f"migration 0001_{MIGRATIONS[0].name} was changed after it was applied" in err
    assert err.count("\n") == 1, err


async def test_two_migrates_at_once_on_a_blank_database_both_succeed_and_apply_once(
    blank_database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "batchd.toml", blank_database_url)
    results = await asyncio.gather(
        run_batchd("migrate", "--config", str(config), cwd=tmp_path),
        run_batchd("migrate", "--config", str(config), cwd=tmp_path),
    )
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    assert sorted(out.strip() for _, out, _ in results) == [APPLIED_ALL, "the database is up to date"]
    assert await schema_state(blank_database_url) == SCHEMA


# -- run: refusing to start ----------------------------------------------------------------------------------


async def test_run_refuses_bad_configuration_with_exit_78_naming_the_key(
    tmp_path: Path, database_url: str
) -> None:
    cases: list[tuple[str, dict[str, str], str]] = [
        ("[batching]\nmax_requests = 0\n", {}, "batching.max_requests"),
        ("[daemon]\nleese_s = 5\n", {}, "daemon.leese_s"),
        ("", {"BATCHD_BATCHING__MAX_WAIT_S": "-1"}, "batching.max_wait_s"),
    ]
    runs = []
    for i, (extra, env, _) in enumerate(cases):
        path = tmp_path / f"bad{i}.toml"
        write_config(path, database_url, extra)
        runs.append(
            run_batchd("run", "--config", str(path), cwd=tmp_path, env={"ANTHROPIC_API_KEY": "k", **env})
        )
    for (code, out, err), (_, _, message) in zip(await asyncio.gather(*runs), cases, strict=True):
        assert code == EX_CONFIG, (message, out, err)
        assert "configuration error" in err
        assert message in err, (message, err)


async def test_run_without_an_api_key_exits_78(config: Path, tmp_path: Path) -> None:
    code, _, err = await run_batchd("run", "--config", str(config), cwd=tmp_path)
    assert code == EX_CONFIG
    assert "no API key" in err
    assert "ANTHROPIC_API_KEY" in err


def key_env(tmp_path: Path, credential: str | None) -> dict[str, str]:
    """The daemon's environment with no ANTHROPIC_API_KEY; with `credential`, a credentials directory as
    systemd's LoadCredential= makes it, holding that key under batchd's credential name."""
    env = {k: v for k, v in daemon_env().items() if not k.startswith("ANTHROPIC_")}
    env.pop("CREDENTIALS_DIRECTORY", None)
    if credential is not None:
        directory = tmp_path / "credentials"
        directory.mkdir(mode=0o700)
        (directory / CREDENTIAL_NAME).write_text(credential + "\n")
        env["CREDENTIALS_DIRECTORY"] = str(directory)
    return env


@pytest.mark.parametrize("source", ["credential", "api_key_file"])
async def test_run_reads_the_api_key_from_a_systemd_credential_or_a_key_file(
    source: str, db: Any, database_url: str, tmp_path: Path
) -> None:
    key = f"sk-ant-{uuid.uuid4().hex}"
    # The emulator accepts this key and no other.
    async with start_emulator(QUICK.model_copy(update={"api_key": key})) as emulator:
        env = key_env(tmp_path, key if source == "credential" else None)
        anthropic: dict[str, Any] = {}
        if source == "api_key_file":
            key_file = tmp_path / "anthropic-key"
            key_file.write_text(key + "\n")
            anthropic["api_key_file"] = str(key_file)
        config = daemon_config(tmp_path / "batchd.toml", database_url, emulator.url, anthropic=anthropic)
        (job,) = await insert_raw(db, "acme", ["Which key opened the door?"])
        log = tmp_path / "daemon.log"
        async with daemon_process(config, log, env=env) as process:

            async def succeeded() -> bool:
                status: str = await db.fetchval("SELECT status FROM batchd.jobs WHERE id = $1", job)
                return status == "succeeded"

            await wait_until(succeeded, timeout=30)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=15) == 0
        statuses = (await emulator.stats())["statuses"]
        assert statuses.get("create 200") == 1
        assert not [call for call in statuses if call.endswith(" 401")], statuses
        assert key not in log.read_text(), "the key is never logged"


async def test_run_with_a_wrong_key_is_not_ready_sends_nothing_and_says_so_until_the_key_is_fixed(
    db: Any, database_url: str, tmp_path: Path
) -> None:
    """The real daemon with a wrong key in its credential: it starts, `/readyz` answers 503 naming the API
    and the refusal, nothing is sent (the job stays queued, its attempts whole), `batchd status` says so;
    the credential's file fixed, it is read again at the next check and the job goes through."""
    right, wrong = "sk-ant-the-right-one", "sk-ant-a-wrong-one"
    async with start_emulator(QUICK.model_copy(update={"api_key": right})) as emulator:
        config = daemon_config(
            tmp_path / "batchd.toml", database_url, emulator.url, daemon={"retry_min_s": 0.2}
        )
        (job,) = await insert_raw(db, "acme", ["Let me in"])
        log = tmp_path / "daemon.log"
        env = key_env(tmp_path, wrong)
        async with daemon_process(config, log, env=env) as process, aiohttp.ClientSession() as http:

            async def started() -> bool:
                return log_events(log)["daemon.ready"] == 1

            await wait_until(started, timeout=30)
            ready = next(json.loads(line) for line in log.read_text().splitlines() if "daemon.ready" in line)
            assert ready["api_state"] == "refused"
            async with http.get(f"{ready['http']}/readyz") as response:
                assert response.status == 503
                problems = (await response.json())["problems"]
            assert problems == [f"api {emulator.url}: the API key was refused (401)"]

            async def checked_again() -> bool:
                return int((await emulator.stats())["statuses"].get("list 401", 0)) >= 3

            await wait_until(checked_again, timeout=30)
            row = await db.fetchrow("SELECT status, attempts FROM batchd.jobs WHERE id = $1", job)
            assert tuple(row.values()) == ("queued", 0)
            code, out, err = await run_batchd("status", "--config", str(config), cwd=tmp_path)
            assert code == 0, err
            assert "THE API KEY IS REFUSED: the API key was refused (401)" in out, out

            (Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME).write_text(right + "\n")

            async def succeeded() -> bool:
                status: str = await db.fetchval("SELECT status FROM batchd.jobs WHERE id = $1", job)
                return status == "succeeded"

            await wait_until(succeeded, timeout=30)
            async with http.get(f"{ready['http']}/readyz") as response:
                assert response.status == 200
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=15) == 0
        stats = await emulator.stats()
        assert (stats["batches_created"], stats["statuses"].get("create 401")) == (1, None)
        assert await db.fetchval("SELECT attempts FROM batchd.jobs WHERE id = $1", job) == 0
        assert await db.fetchval("SELECT count(*) FROM batchd.instances") == 0
        events = log_events(log)
        assert (events["api.key_refused"], events["api.key_reloaded"]) == (1, 1), events
        text = log.read_text()
        assert wrong not in text, "the key is never logged"
        assert right not in text


async def test_run_with_a_missing_or_empty_credential_exits_78_naming_it(
    config: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / CREDENTIAL_NAME).write_text("\n")
    missing = tmp_path / "missing"
    missing.mkdir()
    for directory, problem in ((missing, "cannot read"), (empty, "is empty")):
        code, _, err = await run_batchd(
            "run", "--config", str(config), cwd=tmp_path, env={"CREDENTIALS_DIRECTORY": str(directory)}
        )
        assert code == EX_CONFIG, err
        assert f"{directory / CREDENTIAL_NAME}" in err
        assert problem in err
        assert f"credential {CREDENTIAL_NAME}" in err, err


async def test_run_against_a_database_without_the_schema_exits_78_saying_to_migrate(
    blank_database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "batchd.toml", blank_database_url)
    code, _, err = await run_batchd(
        "run", "--config", str(config), cwd=tmp_path, env={"ANTHROPIC_API_KEY": "k"}
    )
    assert code == EX_CONFIG, err
    assert "run `batchd migrate`" in err


# -- enqueue -------------------------------------------------------------------------------------------------


async def test_enqueue_one_raw_request_and_one_job_type_job(db: Any, config: Path, tmp_path: Path) -> None:
    request = raw_request("What is a batch?")
    raw_run = run_batchd(
        "enqueue",
        "--config",
        str(config),
        "--tenant",
        "acme",
        "--request",
        json.dumps(request),
        "--metadata",
        '{"ticket": 7}',
        "--deadline",
        "2030-01-01T12:00:00Z",
        "--route",
        "auto",
        cwd=tmp_path,
    )
    typed_args = ["enqueue", "--config", str(config), "--tenant", "globex", "--job-type", "summarize"]
    typed_args += ["--input", '{"document_text": "a long report"}', "--idempotency-key", "report-1"]
    (code, out, err), (typed_code, typed_out, typed_err) = await asyncio.gather(
        raw_run, run_batchd(*typed_args, cwd=tmp_path)
    )
    assert (code, err.strip()) == (0, "enqueued 1 job(s)"), err
    assert (typed_code, typed_err.strip()) == (0, "enqueued 1 job(s)"), typed_err

    rows = {row["tenant_id"]: row for row in await db.fetch("SELECT * FROM batchd.jobs")}
    assert set(rows) == {"acme", "globex"}
    # Standard output is the job's id alone, for `batchd cancel "$(batchd enqueue …)"`.
    assert out == f"{rows['acme']['id']}\n"
    assert typed_out == f"{rows['globex']['id']}\n"
    assert rows["acme"]["route"] == "auto"
    assert rows["acme"]["request"] == request
    assert rows["acme"]["metadata"] == {"ticket": 7}
    assert rows["acme"]["deadline"].isoformat() == "2030-01-01T12:00:00+00:00"
    assert rows["acme"]["status"] == "queued"
    assert rows["globex"]["job_type"] == "summarize"
    assert rows["globex"]["input"] == {"document_text": "a long report"}
    assert rows["globex"]["idempotency_key"] == "report-1"

    # The same idempotency key again: skipped, not queued twice; --json names the job holding the key.
    code, out, err = await run_batchd(*typed_args, "--json", cwd=tmp_path)
    assert code == 0, err
    assert err.strip() == "enqueued 0 job(s), skipped 1: their idempotency key is taken"
    assert json.loads(out) == {
        "id": str(rows["globex"]["id"]),
        "tenant_id": "globex",
        "enqueued": False,
        "idempotency_key": "report-1",
    }
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 2


async def test_enqueue_refuses_bad_options(db: Any, config: Path, tmp_path: Path) -> None:
    base = ["enqueue", "--config", str(config), "--tenant", "acme"]
    results = await asyncio.gather(
        run_batchd(*base, cwd=tmp_path),  # neither a request nor a job type
        run_batchd(*base, "--request", "{}", "--deadline", "2030-01-01T12:00:00", cwd=tmp_path),
    )
    messages = ["either `request`", "time zone"]
    for (code, _, err), message in zip(results, messages, strict=True):
        assert code == EX_DATAERR, err
        assert message in err, err
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 0


def jsonl(jobs: list[Any]) -> str:
    return "".join((job if isinstance(job, str) else json.dumps(job)) + "\n" for job in jobs)


@pytest.mark.slow
async def test_enqueue_a_file_is_all_or_nothing_and_names_the_bad_line(
    db: Any, config: Path, tmp_path: Path
) -> None:
    good = [{"request": raw_request(f"question {i}"), "idempotency_key": f"q{i}"} for i in range(1500)]
    # Past the first 1,000-job chunk, which was already inserted when the bad line is read.
    cases: dict[str, tuple[list[Any], str]] = {
        "missing.jsonl": ([*good, {"tenant_id": "acme"}], "line 1501: a job has either `request`"),
        "broken.jsonl": ([*good[:3], "{oops", *good[3:5]], "line 4: not JSON"),
        # Every bad job is named, each on its line of stderr, good ones among them notwithstanding.
        "several.jsonl": (
            [good[0], {"job_type": "summarise", "input": {}}, good[1], {"request": {"model": "m"}}],
            (
                "batchd: line 2: unknown job type 'summarise' (known: summarize)\n"
                "batchd: line 4: request lacks max_tokens\n"
                "batchd: nothing was enqueued: 2 bad job(s) of 4 read\n"
            ),
        ),
    }
    for name, (jobs, _) in cases.items():
        (tmp_path / name).write_text(jsonl(jobs))
    results = await asyncio.gather(
        *(
            run_batchd("enqueue", "--config", str(config), "--tenant", "acme", "--file", name, cwd=tmp_path)
            for name in cases
        )
    )
    for (code, out, err), (name, (_, message)) in zip(results, cases.items(), strict=True):
        assert (code, out) == (EX_DATAERR, ""), (name, out, err)
        assert "nothing was enqueued" in err, (name, err)
        assert message in err, (name, err)
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 0

    # The file fixed: every line goes in (blank lines skipped, a line's own tenant wins over --tenant).
    typed = {"tenant_id": "globex", "job_type": "summarize", "input": {"document_text": "d"}}
    lines = [jsonl(good), "\n", jsonl([typed])]
    (tmp_path / "good.jsonl").write_text("".join(lines))
    args = ["enqueue", "--config", str(config), "--tenant", "acme", "--file", "good.jsonl"]
    code, out, err = await run_batchd(*args, cwd=tmp_path)
    assert (code, err.strip()) == (0, "enqueued 1,501 job(s)"), err
    ids = [uuid.UUID(line) for line in out.splitlines()]
    assert ids == [row["id"] for row in await db.fetch("SELECT id FROM batchd.jobs ORDER BY seq")]
    counts = dict(await db.fetch("SELECT tenant_id, count(*) FROM batchd.jobs GROUP BY tenant_id"))
    assert counts == {"acme": 1500, "globex": 1}
    # Run again, as a retried import would be: the keyed lines are skipped, the unkeyed one goes in again.
    code, out, err = await run_batchd(*args, cwd=tmp_path)
    assert (code, err.strip()) == (0, "enqueued 1 job(s), skipped 1,500: their idempotency key is taken"), err
    assert len(out.splitlines()) == 1
    # From standard input, too.
    code, out, err = await run_batchd(
        "enqueue", "--config", str(config), "--tenant", "initech", "--file", "-", cwd=tmp_path,
        stdin=jsonl(good[:3]).encode(),
    )  # fmt: skip
    assert (code, err.strip(), len(out.splitlines())) == (0, "enqueued 3 job(s)", 3), err
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE tenant_id = 'initech'") == 3


# -- status --------------------------------------------------------------------------------------------------


async def test_status_shows_tenants_and_open_batches_as_text_and_json(
    db: Any, config: Path, tmp_path: Path
) -> None:
    await insert_raw(db, "acme", ["a", "b", "c"])
    globex = await insert_raw(db, "globex", ["d", "e"])
    # Failed as the flusher fails a job it cannot send (the statement counts it in the rollups).
    await db.execute(sql("fail_jobs"), [globex[0]], ["request lacks model"])
    # In flight on the sync path: shown like every other status (batchd/statuses.py).
    await db.execute("UPDATE batchd.jobs SET status = 'sending' WHERE id = $1", globex[1])
    batch = await db.fetchval(
        "INSERT INTO batchd.batches (tag, request_count, bytes, provider_batch_id, status, request_counts,"
        " last_error) VALUES ('abcdefghijkl', 2, 300, 'msgbatch_x', 'in_progress', $1, 'poll failed: 500')"
        " RETURNING id",
        {"processing": 2, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
    )
    await db.execute(
        "INSERT INTO batchd.batches (tag, request_count, bytes, status)"
        " VALUES ('zzzzzzzzzzzz', 1, 1, 'applied')"
    )
    (code, out, err), (json_code, json_out, json_err) = await asyncio.gather(
        run_batchd("status", "--config", str(config), cwd=tmp_path),
        run_batchd("status", "--config", str(config), "--json", cwd=tmp_path),
    )
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.strip().startswith("tenant"))
    assert header.split()[1:] == list(JOB_STATUSES)
    assert "sending" in header
    acme = next(line for line in lines if line.strip().startswith("acme"))
    assert acme.split()[1:] == ["3", "0", "0", "0", "0", "0", "0"]
    globex_line = next(line for line in lines if line.strip().startswith("globex"))
    assert dict(zip(JOB_STATUSES, globex_line.split()[1:], strict=True)) == {
        "queued": "0",
        "submitting": "0",
        "submitted": "0",
        "sending": "1",
        "succeeded": "0",
        "failed": "1",
        "canceled": "0",
    }
    assert "Open batches:" in out
    assert str(batch) in out
    assert "msgbatch_x" in out
    assert "last error: poll failed: 500" in out
    assert "zzzzzzzzzzzz" not in out

    assert json_code == 0, json_err
    report = json.loads(json_out)
    zeros: dict[str, int] = dict.fromkeys(JOB_STATUSES, 0)
    assert report["tenants"] == {
        "acme": {**zeros, "queued": 3},
        "globex": {**zeros, "sending": 1, "failed": 1},
    }
    assert [b["id"] for b in report["open_batches"]] == [str(batch)]
    assert report["open_batches"][0]["status"] == "in_progress"
    assert report["open_batches"][0]["request_counts"] == {
        "processing": 2,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert report["batches"] == {"pending": 0, "in_progress": 1, "ended": 0, "applied": 1, "abandoned": 0}
    assert report["finished"] == {"succeeded": 0, "failed": 1, "canceled": 0}


async def test_status_of_an_empty_database(db: Any, config: Path, tmp_path: Path) -> None:
    code, out, err = await run_batchd("status", "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    assert "(no jobs)" in out
    assert "(none)" in out


# -- cancel --------------------------------------------------------------------------------------------------


async def test_cancel_a_queued_job_and_refuse_the_rest(db: Any, config: Path, tmp_path: Path) -> None:
    queued, done = await insert_raw(db, "acme", ["cancel me", "already done"])
    await db.execute("UPDATE batchd.jobs SET status = 'succeeded' WHERE id = $1", done)
    unknown = uuid.uuid4()
    base = ["cancel", "--config", str(config)]
    results = await asyncio.gather(
        run_batchd(*base, str(queued), cwd=tmp_path),
        run_batchd(*base, str(unknown), cwd=tmp_path),
        run_batchd(*base, str(done), cwd=tmp_path),
        run_batchd(*base, "job-42", cwd=tmp_path),
    )
    (code, out, err), (unknown_code, _, unknown_err), (done_code, _, done_err), (bad_code, _, bad_err) = (
        results
    )
    assert (code, out.strip()) == (0, f"canceled {queued}"), err
    assert unknown_code == 1
    assert f"no job {unknown}" in unknown_err
    assert done_code == 1
    assert f"job {done} is succeeded; only a queued job can be canceled" in done_err
    assert bad_code == EX_DATAERR
    assert "'job-42' is not a job id" in bad_err

    statuses = dict(await db.fetch("SELECT id, status FROM batchd.jobs"))
    assert statuses == {queued: "canceled", done: "succeeded"}
    events = await db.fetch("SELECT type, job_id FROM batchd.events")
    assert [(row["type"], row["job_id"]) for row in events] == [("job.canceled", queued)]
    # Canceled once; a second cancel is refused: the job is no longer queued.
    code, _, err = await run_batchd(*base, str(queued), cwd=tmp_path)
    assert code == 1
    assert "is canceled; only a queued job can be canceled" in err


# -- every command: the global options, and how it fails -----------------------------------------------------


def test_the_global_options_go_before_or_after_the_command() -> None:
    from batchd.cli import build_parser  # noqa: PLC0415 - the parser alone, no database

    def parsed(*argv: str) -> tuple[str | None, str]:
        args = build_parser().parse_args(argv)
        return args.config, args.log_level

    assert parsed("status") == (None, "info")
    assert parsed("--config", "a.toml", "--log-level", "debug", "status") == ("a.toml", "debug")
    assert parsed("status", "--config", "a.toml", "--log-level", "error") == ("a.toml", "error")
    assert parsed("--log-level", "debug", "tenant", "set", "acme", "--config", "a.toml") == (
        "a.toml",
        "debug",
    )
    assert parsed("tenant", "--config", "a.toml", "list") == ("a.toml", "info")
    assert parsed("--config", "a.toml", "emulator", "--log-level", "warning") == ("a.toml", "warning")


async def test_the_config_file_from_before_or_after_the_command_or_batchd_config(
    db: Any, config: Path, tmp_path: Path
) -> None:
    await insert_raw(db, "acme", ["a", "b"])
    runs = await asyncio.gather(
        run_batchd("--config", str(config), "status", "--json", cwd=tmp_path),
        run_batchd("status", "--json", "--config", str(config), "--log-level", "error", cwd=tmp_path),
        run_batchd(
            "--log-level", "warning", "status", "--json", cwd=tmp_path, env={"BATCHD_CONFIG": str(config)}
        ),
    )
    for code, out, err in runs:
        assert code == 0, err
        assert json.loads(out)["tenants"]["acme"]["queued"] == 2


def unreachable_config(tmp_path: Path) -> Path:
    """Nothing listens on port 1; the password must never be shown."""
    return write_config(tmp_path / "down.toml", "postgresql://batchd:hunter2@127.0.0.1:1/batchd")


async def test_each_expected_failure_is_one_line_and_its_exit_status(
    config: Path, blank_database_url: str, tmp_path: Path
) -> None:
    down = str(unreachable_config(tmp_path))
    blank = str(write_config(tmp_path / "blank.toml", blank_database_url))
    key = {"ANTHROPIC_API_KEY": "k"}
    refused = "cannot connect to postgresql://batchd:***@127.0.0.1:1/"
    cases: list[tuple[list[str], dict[str, str], int, str]] = [
        (["status", "--config", str(tmp_path / "absent.toml")], {}, EX_CONFIG, "no such configuration file"),
        (["status", "--config", down], {}, 69, refused + "batchd: "),
        (["tenant", "list", "--config", down], {}, 69, refused),
        # At info, `run` logs its start first (tests/test_cli_errors.py): warning leaves the failure alone.
        (["run", "--log-level", "warning", "--config", down], key, 69, refused + "batchd: "),
        (["status", "--config", blank], {}, EX_CONFIG, "migration(s) not applied; run `batchd migrate`"),
        (["cancel", "job-42", "--config", str(config)], {}, EX_DATAERR, "'job-42' is not a job id"),
        (["cancel", str(uuid.UUID(int=7)), "--config", str(config)], {}, 1, "no job 00000000-0000"),
        (["report", "--since", "soonish", "--config", str(config)], {}, EX_DATAERR, "soonish"),
        (
            ["enqueue", "--file", "absent.jsonl", "--config", str(config)],
            {},
            EX_DATAERR,
            "cannot read absent",
        ),
        (["enqueue", "--request", "{", "--config", str(config)], {}, EX_DATAERR, "--request is not JSON"),
    ]
    results = await asyncio.gather(*(run_batchd(*argv, cwd=tmp_path, env=env) for argv, env, _, _ in cases))
    for (code, out, err), (argv, _, expected_code, message) in zip(results, cases, strict=True):
        assert (code, out) == (expected_code, ""), (argv, out, err)
        assert err.startswith("batchd: "), (argv, err)
        assert err.count("\n") == 1, (argv, err)  # one line: no traceback
        assert message in err, (argv, err)
        assert "hunter2" not in err


async def test_a_connection_lost_during_a_command_is_one_line_exit_69(
    db: Any, config: Path, tmp_path: Path
) -> None:
    """`enqueue --file -` holds its transaction open while it reads standard input: the server ends that
    session (as a restart or an administrator would) before the first line arrives."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "ANTHROPIC_"))}
    process = await asyncio.create_subprocess_exec(
        *BATCHD, "enqueue", "--tenant", "acme", "--file", "-", "--config", str(config),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=clean, cwd=tmp_path,
    )  # fmt: skip
    assert process.stdin is not None
    try:

        async def waiting_in_its_transaction() -> bool:
            return bool(
                await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state = 'idle in transaction' AND pid <> pg_backend_pid()"
                )
            )

        await wait_until(waiting_in_its_transaction, timeout=30)
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'idle in transaction' AND pid <> pg_backend_pid()"
        )
        line = jsonl([{"request": raw_request("hi")}]).encode()
        out, err = await asyncio.wait_for(process.communicate(line), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 69, err
    assert out == b""
    message = err.decode()
    assert message.startswith("batchd: lost the connection to postgresql://"), message
    assert message.count("\n") == 1, message
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 0
