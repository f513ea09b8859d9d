"""`batchd enqueue` checks each job as the daemon will before writing any: the Python twin of the database's
batchd.request_problem agrees with it on every input tried, a file names each bad job and writes nothing,
and what it writes arrives as written. In process: the command's handler on the test's connection (the
real processes, exit statuses and all: tests/test_cli_daemon.py)."""

from __future__ import annotations

import io
import itertools
import json
import re
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support import raw_request, write_config

from batchd import cli, enqueue
from batchd.config import Settings, load_settings
from batchd.templates import request_problem

EX_DATAERR = 65

# -- the database's rule and its Python twin -----------------------------------------------------------------

# Each member's values at the boundaries of the function's CASE ("absent" leaves the member out).
MODELS = ['"claude-haiku-4-5"', '""', "1", "null", "[]", '{"a": 1}', "true"]
MAX_TOKENS = [
    "1", "0", "-1", "1.0", "1.5", "2E0", "-0.0", "0.999999999999999999999", "1.0000000000000000001",
    "100000000000000000000000000", "1e400", "1e-400", '"1"', "true", "false", "null", "[]", "{}",
]  # fmt: skip
MESSAGES = ['[{"role": "user", "content": "x"}]', "[1]", "[]", '"x"', "{}", "null", "0"]
STREAMS = ["false", "true", "0", "null", '"false"', "[]", "{}"]
ABSENT = None


def requests() -> list[str]:
    """Every combination of the members' values (absent included), and what is no object at all."""
    texts = ["[]", '"s"', "1", "null", "true", "{}", '[{"model": "m"}]']
    for model, max_tokens, messages, stream in itertools.product(
        [ABSENT, *MODELS], [ABSENT, *MAX_TOKENS], [ABSENT, *MESSAGES], [ABSENT, *STREAMS]
    ):
        members = {"model": model, "max_tokens": max_tokens, "messages": messages, "stream": stream}
        texts.append("{" + ", ".join(f'"{k}": {v}' for k, v in members.items() if v is not ABSENT) + "}")
    # A member given twice: the last one counts, for json and jsonb alike.
    texts.append('{"model": 1, "model": "m", "max_tokens": 0, "max_tokens": 5, "messages": [1]}')
    return texts


async def test_the_python_request_problem_is_the_databases_on_every_input(db: Any) -> None:
    texts = requests()
    rows = await db.fetch(
        "SELECT t.n, batchd.request_problem(t.text::jsonb) AS problem"
        " FROM unnest($1::text[]) WITH ORDINALITY AS t (text, n) ORDER BY t.n",
        texts,
    )
    database = [row["problem"] for row in rows]
    python = [request_problem(enqueue.loads(text)) for text in texts]
    disagree = [(t, d, p) for t, d, p in zip(texts, database, python, strict=True) if d != p]
    assert not disagree, f"{len(disagree)} of {len(texts)} disagree, e.g. {disagree[:5]}"
    # Each of the function's nine reasons was given, and so was none.
    assert len(set(database)) == 10, set(database)
    # Sendable: a string model (2), an integral max_tokens of at least 1 (5), a non-empty messages array (2),
    # no stream or a false one (2); and the request with members given twice.
    assert database.count(None) == 2 * 5 * 2 * 2 + 1


async def test_the_routes_are_the_databases(db: Any) -> None:
    definition = await db.fetchval(
        "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint AS c JOIN pg_attribute AS a"
        " ON a.attrelid = c.conrelid AND a.attname = 'route'"
        " WHERE c.conrelid = 'batchd.jobs'::regclass AND c.contype = 'c' AND c.conkey = ARRAY[a.attnum]"
    )
    assert re.findall(r"'([a-z]+)'::text", definition) == list(enqueue.ROUTES) == list(cli.ROUTES)


# -- the command, in process --------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """A summarize job type (document_text), and batches of at most 4,000 bytes."""
    extra = "[batching]\nmax_bytes = 4000\n"
    return load_settings(write_config(tmp_path / "batchd.toml", database_url, extra))


async def batchd_enqueue(
    db: Any, settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    """`batchd enqueue ARGV` as main runs it, on the test's connection: (exit status, stdout, stderr)."""
    args = cli.build_parser().parse_args(["enqueue", *argv])
    try:
        code = await cli.cmd_enqueue(db, settings, args)
    except cli.CommandError as error:
        code = error.code
        sys.stderr.write(f"batchd: {error}\n")
    out, err = capsys.readouterr()
    return code, out, err


GOOD = {"request": raw_request("fine")}
SUMMARY = {"job_type": "summarize", "input": {"document_text": "a report"}}
# Each bad job with the words that say why.
BAD: list[tuple[Any, str]] = [
    ({**GOOD, "priority": 1}, "unknown field(s) priority; a job has tenant_id, request, job_type"),
    ({**GOOD, "tenant_id": ""}, "tenant_id must be a non-empty string"),
    ({**GOOD, **SUMMARY}, "a job has either `request` (Messages API params) or `job_type` with `input`"),
    ({**GOOD, "input": {}}, "`input` goes with `job_type`"),
    ({"job_type": 7}, "job_type must be a string"),
    ({**GOOD, "idempotency_key": 7}, "idempotency_key must be a string"),
    ({**GOOD, "route": "fast"}, "route must be one of batch, sync, auto, not 'fast'"),
    ({**GOOD, "deadline": "2030-01-01T12:00:00"}, "must carry a time zone"),
    ({**GOOD, "deadline": "soon"}, "is neither an ISO 8601 time with a time zone"),
    ({**GOOD, "deadline": 1700000000}, "deadline must be a string"),
    ({**GOOD, "metadata": [1, 2]}, "metadata must be a JSON object"),
    ({"request": {"model": "m", "max_tokens": 0, "messages": [1]}}, "request.max_tokens must be at least 1"),
    ({"request": None}, "request must be a JSON object of Messages API params"),
    ({"job_type": "summarise", "input": {}}, "unknown job type 'summarise' (known: summarize)"),
    ({"job_type": "summarize", "input": {}}, "input lacks document_text, required by job type 'summarize'"),
    ({"job_type": "summarize", "input": [1]}, "input of a summarize job must be a JSON object"),
    ({"job_type": "summarize", "input": {"document_text": "x" * 5000}}, "more than a batch may hold"),
    ({"request": raw_request("y" * 5000)}, "more than a batch may hold"),
    ('{"request": {"model": "m", "max_tokens": NaN, "messages": [1]}}', "NaN is not a JSON number"),
    ('{"request": {"model": "m\\u0000", "max_tokens": 1, "messages": [1]}}', "\\u0000 in a string"),
    ('{"request": {"model": "\\udc80", "max_tokens": 1, "messages": [1]}}', "an unpaired surrogate"),
    ("{oops", "not JSON: Expecting property name enclosed in double quotes (column 2)"),
    ("[1, 2]", "a job must be a JSON object"),
]


def as_line(job: Any) -> str:
    return job if isinstance(job, str) else json.dumps(job)


async def test_a_file_with_bad_jobs_names_each_and_writes_nothing(
    db: Any, settings: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = [as_line(GOOD)]
    for job, _ in BAD:
        lines += [as_line(job), as_line(SUMMARY)]  # good jobs among the bad ones
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = await batchd_enqueue(db, settings, capsys, "--tenant", "acme", "--file", str(path))
    assert (code, out) == (EX_DATAERR, "")
    said = err.splitlines()
    assert said[-1] == f"batchd: nothing was enqueued: {len(BAD)} bad job(s) of {len(lines)} read"
    problems = [line for line in said if line.startswith("batchd: line ")]
    assert len(problems) == len(BAD), err
    for number, (line, (_, words)) in enumerate(zip(problems, BAD, strict=True)):
        assert line.startswith(f"batchd: line {2 + 2 * number}: "), line
        assert words in line, (line, words)
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 0


async def test_one_job_from_the_options_is_checked_the_same_way(
    db: Any, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["--job-type", "summarize", "--input", "{}"], "nothing was enqueued: input lacks document_text"),
        (["--request", '{"model": "m"}'], "nothing was enqueued: request lacks max_tokens"),
        (["--request", "{", "--job-type", "x"], "--request is not JSON"),
        (["--request", "[NaN]"], "--request is not JSON: NaN is not a JSON number"),
        (["--job-type", "summarize", "--metadata", "7"], "--metadata must be a JSON object"),
        (["--job-type", "summarize", "--deadline", "Tuesday"], "--deadline: deadline 'Tuesday' is neither"),
    ]
    for argv, message in cases:
        code, out, err = await batchd_enqueue(db, settings, capsys, "--tenant", "acme", *argv)
        assert (code, out) == (EX_DATAERR, ""), (argv, err)
        assert err.count("\n") == 1, (argv, err)
        assert message in err, (argv, err)
    code, _, err = await batchd_enqueue(db, settings, capsys, "--job-type", "summarize")
    assert (code, err) == (
        EX_DATAERR,
        "batchd: nothing was enqueued: --tenant is required (the job's tenant_id)\n",
    )
    code, _, err = await batchd_enqueue(
        db, settings, capsys, "--file", "-", "--request", "{}", "--idempotency-key", "k"
    )
    assert code == EX_DATAERR
    assert "--request, --idempotency-key make(s) one job and cannot go with --file" in err
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 0


async def test_a_json_array_with_defaults_goes_in_as_written_in_order(
    db: Any, settings: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Numbers a double would round, and metadata as given: the database reads them from the job's text.
    exact = '{"n": 1.10, "big": 123456789012345678901234567890, "tiny": 1e-30}'
    text = f"""
    [
      {{"request": {json.dumps(raw_request("one"))}, "metadata": {exact}}},
      {json.dumps({**SUMMARY, "tenant_id": "globex", "route": "sync", "idempotency_key": "k1"})},
      {json.dumps({**GOOD, "deadline": "2030-01-01T00:00:00+02:00", "metadata": None})}
    ]
    """
    path = tmp_path / "jobs.json"
    path.write_text(text)
    before = datetime.now(UTC)
    argv = ["--tenant", "acme", "--route", "auto", "--deadline", "2h", "--metadata", '{"import": 3}']
    code, out, err = await batchd_enqueue(db, settings, capsys, *argv, "--file", str(path))
    assert (code, err) == (0, "enqueued 3 job(s)\n")
    rows = await db.fetch(
        "SELECT id, tenant_id, route, deadline, metadata::text AS metadata, idempotency_key, job_type"
        " FROM batchd.jobs ORDER BY seq"
    )
    assert out.splitlines() == [str(row["id"]) for row in rows]
    assert [(r["tenant_id"], r["route"], r["idempotency_key"]) for r in rows] == [
        ("acme", "auto", None),
        ("globex", "sync", "k1"),
        ("acme", "auto", None),
    ]
    assert rows[0]["metadata"] == (
        '{"n": 1.10, "big": 123456789012345678901234567890, "tiny": 0.000000000000000000000000000001}'
    )
    assert json.loads(rows[1]["metadata"]) == {"import": 3}, "the default, for a job without metadata"
    assert rows[2]["metadata"] is None, "a job's own null wins over the default"
    for row in rows[:2]:
        assert before + timedelta(hours=2) <= row["deadline"] <= datetime.now(UTC) + timedelta(hours=2)
    assert rows[2]["deadline"] == datetime(2029, 12, 31, 22, tzinfo=UTC)

    # Again, as a retried import: the keyed job is skipped; --json says which job holds its key.
    code, out, err = await batchd_enqueue(db, settings, capsys, *argv, "--file", str(path), "--json")
    assert (code, err) == (0, "enqueued 2 job(s), skipped 1: their idempotency key is taken\n")
    said = [json.loads(line) for line in out.splitlines()]
    assert [(s["tenant_id"], s["enqueued"]) for s in said] == [
        ("acme", True),
        ("globex", False),
        ("acme", True),
    ]
    assert said[1] == {
        "id": str(rows[1]["id"]),
        "tenant_id": "globex",
        "enqueued": False,
        "idempotency_key": "k1",
    }
    assert all(uuid.UUID(s["id"]) for s in said)
    code, out, err = await batchd_enqueue(db, settings, capsys, *argv, "--file", str(path), "--quiet")
    assert (code, out, err) == (0, "", "")
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs") == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"request": {}},\n {"oops"}]', "job 2 (line 2): not JSON: Expecting ':' delimiter"),
        ('[{"request": {}} {"request": {}}]', "after job 1: expected `,` or `]` (line 1)"),
        ("[]\n[]", "the file goes on after its JSON array"),
    ],
)
async def test_a_broken_json_array_stops_the_reading(  # noqa: PLR0917 - fixtures and parameters
    db: Any, settings: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "jobs.json"
    path.write_text(text)
    code, out, err = await batchd_enqueue(db, settings, capsys, "--tenant", "acme", "--file", str(path))
    assert (code, out) == (EX_DATAERR, ""), err
    assert message in err, err
    assert err.count("\n") <= 2, err


async def test_standard_input_and_an_empty_file(
    db: Any,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(
        sys, "stdin", io.StringIO("\n\n" + json.dumps(GOOD) + "\n" + json.dumps({"x": 1}) + "\n")
    )
    code, _, err = await batchd_enqueue(db, settings, capsys, "--tenant", "acme", "--file", "-")
    assert code == EX_DATAERR
    assert "batchd: line 4: unknown field(s) x" in err, "blank lines are counted"
    (tmp_path / "empty.jsonl").write_text("\n \n")
    (tmp_path / "empty.json").write_text(" [ ] ")
    for name in ("empty.jsonl", "empty.json"):
        code, out, err = await batchd_enqueue(db, settings, capsys, "--file", str(tmp_path / name))
        assert (code, out, err) == (0, "", "enqueued 0 job(s)\n")


async def test_a_raw_model_without_a_price_is_a_warning_once(
    db: Any, settings: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(
        "".join(json.dumps({"request": raw_request("x", model="claude-haiku-4.5")}) + "\n" for _ in range(3))
    )
    code, out, err = await batchd_enqueue(db, settings, capsys, "--tenant", "acme", "--file", str(path))
    assert code == 0, err
    assert len(out.splitlines()) == 3
    assert err.splitlines() == [
        (
            "batchd: warning: model 'claude-haiku-4.5' has no price in [pricing.models]: its jobs' cost will "
            "be recorded as null (a typo? the API refuses a model it does not know, when the batch ends)"
        ),
        "enqueued 3 job(s)",
    ]


def test_a_deadline_is_a_time_with_a_zone_or_a_duration_from_now() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert enqueue.parse_deadline("90m", now) == now + timedelta(minutes=90)
    assert enqueue.parse_deadline("1d", now) == now + timedelta(days=1)
    assert enqueue.parse_deadline("2026-03-02T00:00:00Z", now) == datetime(2026, 3, 2, tzinfo=UTC)
    for text in ("2026-03-02", "tomorrow", "-2h"):
        with pytest.raises(enqueue.BadJob):
            enqueue.parse_deadline(text, now)
