"""`batchd status`, `tenant list` and `report` as an operator reads them: every status shown (zeros too),
counts with thousands separators, a header on each table, a warning for what would make an empty answer
misleading. In process: the commands' handlers on the test's connection (the real processes:
tests/test_cli_daemon.py)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support import insert_raw, write_config

from batchd import cli, status
from batchd.config import Settings, load_settings
from batchd.statuses import BATCH_STATUSES, JOB_STATUSES
from batchd.store import sql
from batchd.tenants import add_tenant, revoke

Handler = Callable[[Any, Settings, Any], Awaitable[int]]
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return load_settings(write_config(tmp_path / "batchd.toml", database_url))


@pytest.fixture
def batchd(
    db: Any, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Awaitable[tuple[int, str, str]]]:
    """`await batchd(handler, *argv)`: the command as main runs it, on the test's connection."""

    async def run(handler: Handler, *argv: str) -> tuple[int, str, str]:
        args = cli.build_parser().parse_args(argv)
        try:
            code = await handler(db, settings, args)
        except cli.CommandError as error:
            code = error.code
            sys.stderr.write(f"batchd: {error}\n")
        out, err = capsys.readouterr()
        return code, out, err

    return run


def row_of(out: str, first: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.split()[:1] == [first])


# -- status --------------------------------------------------------------------------------------------------


async def open_batch(
    db: Any, requests: int, counts: dict[str, int] | None, status_: str = "in_progress"
) -> Any:
    return await db.fetchval(
        "INSERT INTO batchd.batches (tag, request_count, bytes, provider_batch_id, status, request_counts,"
        " created_at) VALUES (substr(md5(random()::text), 1, 12), $1, 1, $2, $3, $4,"
        " now() - interval '65 min')"
        " RETURNING id",
        requests,
        None if counts is None else "msgbatch_1",
        status_,
        counts,
    )


async def test_status_shows_every_status_with_zeros_counts_with_separators_and_batches_as_columns(
    db: Any, batchd: Callable[..., Awaitable[tuple[int, str, str]]]
) -> None:
    await insert_raw(db, "acme", [f"q{i}" for i in range(1234)])
    (failed,) = await insert_raw(db, "globex", ["f"])
    await db.execute(sql("fail_jobs"), [failed], ["request lacks model"])
    ended = {"processing": 0, "succeeded": 12_345, "errored": 2, "canceled": 0, "expired": 1}
    running = await open_batch(db, 12_348, ended)
    pending = await open_batch(db, 3, None, "pending")
    await db.execute("UPDATE batchd.batches SET last_error = 'create refused: 500' WHERE id = $1", pending)

    code, out, err = await batchd(cli.cmd_status, "status")
    assert code == 0, err
    assert row_of(out, "tenant") == ["tenant", *JOB_STATUSES]
    assert row_of(out, "acme") == ["acme", "1,234", "0", "0", "0", "0", "0", "0"]
    assert row_of(out, "globex") == ["globex", "0", "0", "0", "0", "0", "1", "0"]
    assert row_of(out, "TOTAL") == ["TOTAL", "1,234", "0", "0", "0", "0", "1", "0"]
    assert row_of(out, "pending") == list(BATCH_STATUSES)
    header = row_of(out, "batch")
    assert header == ["batch", "status", "requests", *ended, "age", "provider", "batch"]
    shown = ["in_progress", "12,348", "0", "12,345", "2", "0", "1", "1h", "05m", "msgbatch_1"]
    assert row_of(out, str(running)) == [str(running), *shown]
    assert row_of(out, str(pending))[:8] == [str(pending), "pending", "3", "0", "0", "0", "0", "0"]
    assert "      last error: create refused: 500" in out.splitlines()
    # Batches by status: every one, zeros too (its numbers are the line after its header).
    lines = out.splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("Batches by status"))
    counts = lines[heading + 2].split()
    assert counts == ["1", "1", "0", "0", "0"]
    finished = lines[next(i for i, line in enumerate(lines) if line.startswith("Jobs finished since")) + 2]
    assert finished.split() == ["0", "1", "0"]

    code, out, err = await batchd(cli.cmd_status, "status", "--json")
    assert code == 0, err
    report = json.loads(out)
    zeros: dict[str, int] = dict.fromkeys(JOB_STATUSES, 0)
    assert report["tenants"]["acme"] == {**zeros, "queued": 1234}
    assert report["totals"]["failed"] == 1
    assert report["batches"] == {"pending": 1, "in_progress": 1, "ended": 0, "applied": 0, "abandoned": 0}
    assert report["open_batches"][1]["request_counts"] == dict.fromkeys(ended, 0), "not yet the provider's"
    assert report["finished"] == {"succeeded": 0, "failed": 1, "canceled": 0}
    for moment in (report["finished_since"], *(batch["created_at"] for batch in report["open_batches"])):
        assert ISO.fullmatch(moment), moment


async def test_an_empty_database_shows_every_section(
    batchd: Callable[..., Awaitable[tuple[int, str, str]]],
) -> None:
    code, out, err = await batchd(cli.cmd_status, "status")
    hour = f"{datetime.now(UTC) - timedelta(hours=1):%Y-%m-%d %H:00} UTC"
    assert code == 0, err
    headings = [line.split(" (")[0] for line in out.splitlines() if line.endswith(":")]
    assert headings == [
        "Jobs by tenant:",
        "Batches by status",
        "Open batches:",
        f"Jobs finished since {hour}:",
        "Daemons:",
    ]
    assert "(no jobs)" in out
    assert "(none running)" in out
    assert "(none)" in out


def test_the_window_is_a_duration_as_report_since_takes_one() -> None:
    parse = cli.build_parser().parse_args
    assert parse(["status"]).window == 3600
    for text, seconds in (("30m", 1800), ("2h", 7200), ("1d", 86_400), ("1w", 604_800), ("90", 90)):
        assert parse(["status", "--window", text]).window == seconds, text
    for text in ("soon", "0", "-2h", "inf"):
        with pytest.raises(SystemExit):
            parse(["status", "--window", text])


async def test_the_window_sets_where_finished_jobs_and_batches_are_counted_from(db: Any) -> None:
    for age in ("0 s", "3 days"):
        await db.execute(
            "INSERT INTO batchd.batches (tag, request_count, bytes, status, created_at)"
            " VALUES (substr(md5(random()::text), 1, 12), 1, 1, 'applied', now() - $1::text::interval)",
            age,
        )
    report = await status.collect(db, 86_400)
    since = datetime.now(UTC) - timedelta(days=1)
    assert report["finished_since"] == since.replace(minute=0, second=0, microsecond=0)
    assert report["batches"]["applied"] == 1
    assert (await status.collect(db, 7 * 86_400))["batches"]["applied"] == 2


def test_a_section_is_a_collector_and_a_renderer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another block slots in as one more pair: render shows the blocks in SECTIONS' order, and leaves out
    the empty ones."""

    async def nothing(_connection: Any, _report: dict[str, Any]) -> None:
        pass

    sections = [
        (nothing, lambda _r: ["First:"]),
        (nothing, lambda _r: []),
        (nothing, lambda _r: ["Extra:", "  x"]),
    ]
    monkeypatch.setattr(status, "SECTIONS", sections)
    assert status.render({}) == "First:\n\nExtra:\n  x"


# -- tenant list ---------------------------------------------------------------------------------------------


async def test_tenant_list_has_a_header_and_every_tenant_with_jobs_or_tokens(
    db: Any, batchd: Callable[..., Awaitable[tuple[int, str, str]]]
) -> None:
    code, out, _ = await batchd(cli.cmd_tenant_list, "tenant", "list")
    assert (code, out) == (0, "(no tenant has a token or a job yet)\n")
    await add_tenant(db, "acme")
    await add_tenant(db, "acme")
    await revoke(db, "acme")
    await add_tenant(db, "acme")
    await add_tenant(db, "initech")  # a token, no job
    await insert_raw(db, "acme", ["a"])
    # globex has jobs and no row in batchd.tenants: a producer named it by writing them.
    globex = await insert_raw(db, "globex", [f"g{i}" for i in range(1500)])
    await db.execute(sql("fail_jobs"), globex[:2], ["request lacks model", "request lacks model"])
    await db.execute("UPDATE batchd.jobs SET status = 'sending' WHERE id = $1", globex[2])

    code, out, err = await batchd(cli.cmd_tenant_list, "tenant", "list")
    assert code == 0, err
    assert [line.split() for line in out.splitlines()] == [
        ["tenant", "tokens", "revoked", "queued", "in", "flight", "succeeded", "failed", "canceled"],
        ["acme", "1", "2", "1", "0", "0", "0", "0"],
        ["globex", "0", "0", "1,497", "1", "0", "2", "0"],
        ["initech", "1", "0", "0", "0", "0", "0", "0"],
    ]


# -- report --------------------------------------------------------------------------------------------------

BILLED = """
INSERT INTO batchd.tallies (tenant_id, status, path, job_type, model, jobs, billed, input_tokens,
                            output_tokens, cost_usd, sync_cost_usd)
VALUES ('acme', 'succeeded', 'batch', 'faq', 'claude-haiku-4-5', 1, 1, 10, 20, 0.5, 1)
"""


async def test_report_warns_of_an_unknown_tenant_and_of_an_empty_window(
    db: Any, batchd: Callable[..., Awaitable[tuple[int, str, str]]]
) -> None:
    code, out, err = await batchd(cli.cmd_report, "report")
    assert code == 0
    assert err == "batchd: warning: nothing was billed at all: the report is empty\n"
    assert out.startswith("Costs, all recorded, every tenant")

    await add_tenant(db, "globex")
    await db.execute(BILLED)
    code, out, err = await batchd(cli.cmd_report, "report")
    assert (code, err) == (0, ""), "no warning when there is something to show"
    lines = out.splitlines()
    assert lines[0].startswith("Costs, all recorded, every tenant"), "the costs first"
    assert any(line.startswith("Prompt cache per job type") for line in lines[3:]), "then the cache"

    code, out, err = await batchd(cli.cmd_report, "report", "--tenant", "acm")
    assert code == 0
    assert (
        err
        == "batchd: warning: no tenant 'acm': none has a job or a token by that name (did you mean 'acme'?)\n"
    )
    code, _, err = await batchd(cli.cmd_report, "report", "--tenant", "zzz", "--format", "csv")
    assert err == (
        "batchd: warning: no tenant 'zzz': none has a job or a token by that name (`batchd tenant list` lists"
        " them)\n"
    )
    code, _, err = await batchd(cli.cmd_report, "report", "--tenant", "globex", "--since", "2h")
    since = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    assert err == (
        f"batchd: warning: nothing was billed since {since:%Y-%m-%d %H:%M} UTC for tenant 'globex': the"
        " report is empty\n"
    )
    code, out, err = await batchd(cli.cmd_report, "report", "--since", "2999-01-01", "--format", "json")
    assert code == 0
    assert err == "batchd: warning: nothing was billed since 2999-01-01 00:00 UTC: the report is empty\n"
    assert json.loads(out)["rows"] == [], "the warning goes to stderr: standard output stays the format's"
