"""`batchd enqueue`: producers' INSERT from the command line, one job or a file of them.

Every job is checked before it is written, by the rules the daemon applies when it claims it: a raw
request by templates.request_problem (the database's batchd.request_problem, in Python), a job type's input
by rendering it through its template from batchd.toml, and either by the size a batch may hold. A job that
would fail there is refused here, with the reason, instead of failing minutes later.

A file goes in as one transaction, all or nothing: every job is read and checked, each bad one named by its
line (or its place in a JSON array), and when any is bad the transaction is rolled back, so a retried
command never leaves half a file queued. Jobs whose idempotency key is already taken are skipped, as
`ON CONFLICT DO NOTHING` does for any producer.

Each job's JSON object goes to the database as its text, and the database reads `request`, `input` and
`metadata` out of it: numbers arrive exactly as written (Python would round them to doubles), and the
checks here read numbers as Decimal for the same reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import IO, Any
from uuid import UUID

from .config import API_MAX_BYTES, Settings
from .store import ClaimedJob, Connection, sql
from .templates import BODY_OVERHEAD, prepare, request_problem
from .text import parse_duration

CHUNK = 1_000
# batchd.jobs.route's check allows exactly these (tests/test_enqueue.py compares).
ROUTES = ("batch", "sync", "auto")
KEYS = ("tenant_id", "request", "job_type", "input", "metadata", "idempotency_key", "deadline", "route")


class BadJob(Exception):  # noqa: N818 - reads as the verdict it is
    """What is wrong with a job; `field` names the member at fault, when one is (the HTTP API's answer
    carries it)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BadInput(Exception):  # noqa: N818 - the same
    """The input cannot be read on (a JSON array broken in the middle): nothing after it is checked."""


@dataclass(frozen=True)
class NewJob:
    text: str  # the job's JSON object as written (the database reads request, input and metadata from it)
    tenant_id: str
    job_type: str | None
    idempotency_key: str | None
    deadline: datetime | None
    route: str


@dataclass(frozen=True)
class Defaults:
    """What the options give a file's jobs that do not say it themselves."""

    tenant_id: str | None = None
    route: str | None = None
    deadline: datetime | None = None
    metadata: str | None = None  # a JSON object's text
    tenant_hint: str = " (or give --tenant)"  # how a job without tenant_id gets one, said when it has none


@dataclass
class Checker:
    """The daemon's rules, from the settings the command runs with (its batchd.toml: the job types there
    should be the daemon's)."""

    settings: Settings
    warn: Callable[[str], None] = lambda _message: None
    _unpriced: set[str] = field(default_factory=set)

    @property
    def max_request_bytes(self) -> int:
        # How sync.py bounds one request, so a job is refused here exactly when it would fail there.
        return min(self.settings.batching.max_bytes, API_MAX_BYTES) - BODY_OVERHEAD

    def check(self, value: Any, text: str, defaults: Defaults) -> NewJob:
        """A job as a producer writes it (parsed by `loads`), checked; BadJob says what is wrong."""
        if not isinstance(value, dict):
            raise BadJob("a job must be a JSON object")
        unknown = set(value) - set(KEYS)
        if unknown:
            raise BadJob(
                f"unknown field(s) {', '.join(sorted(unknown))}; a job has {', '.join(KEYS)}", min(unknown)
            )
        tenant = value.get("tenant_id", defaults.tenant_id)
        if not isinstance(tenant, str) or not tenant:
            raise BadJob(f"tenant_id must be a non-empty string{defaults.tenant_hint}", "tenant_id")
        if ("request" in value) == ("job_type" in value):
            raise BadJob(
                "a job has either `request` (Messages API params) or `job_type` with `input`",
                "request" if "request" in value else "job_type",
            )
        if "input" in value and "job_type" not in value:
            raise BadJob("`input` goes with `job_type`", "input")
        for key in ("job_type", "idempotency_key"):
            if key in value and not isinstance(value[key], str):
                raise BadJob(f"{key} must be a string", key)
        route = value.get("route", defaults.route or "batch")
        if route not in ROUTES:
            raise BadJob(f"route must be one of {', '.join(ROUTES)}, not {route!r}", "route")
        deadline = defaults.deadline
        if "deadline" in value and value["deadline"] is not None:
            if not isinstance(value["deadline"], str):
                raise BadJob(
                    "deadline must be a string: an ISO 8601 time with a time zone, or 30m, 2h, 1d", "deadline"
                )
            deadline = parse_deadline(value["deadline"])
        metadata = value.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise BadJob("metadata must be a JSON object", "metadata")
        self._check_request(value, tenant)
        if defaults.metadata is not None and "metadata" not in value:
            text = _with_member(text, "metadata", defaults.metadata)
        return NewJob(text, tenant, value.get("job_type"), value.get("idempotency_key"), deadline, route)

    def _check_request(self, value: dict[str, Any], tenant: str) -> None:
        """What the daemon decides when it claims the job (templates.prepare): a raw request's shape, a job
        type's rendering, and the size."""
        request = value.get("request")
        if "request" in value and (problem := request_problem(request)) is not None:
            raise BadJob(problem, "request")
        claimed = ClaimedJob(
            id=UUID(int=0),
            tenant_id=tenant,
            request=_as_jsonb_text(request) if "request" in value else None,
            job_type=value.get("job_type"),
            input=_as_jsonb_text(value["input"]) if value.get("input") is not None else None,
            attempts=0,
            problem=None,
        )
        outcome = prepare(claimed, self.settings.job_types, self.max_request_bytes)
        if isinstance(outcome, str):
            if "request" in value:
                raise BadJob(outcome, "request")
            raise BadJob(outcome, "job_type" if outcome.startswith("unknown job type") else "input")
        if isinstance(request, dict):
            self._priced(request["model"])

    def _priced(self, model: str) -> None:
        if model not in self._unpriced and self.settings.pricing.rates_for(model) is None:
            self._unpriced.add(model)
            self.warn(
                f"model {model!r} has no price in [pricing.models]: its jobs' cost will be recorded as null "
                "(a typo? the API refuses a model it does not know, when the batch ends)"
            )


def _as_jsonb_text(value: Any) -> str:
    """About the text the database gives back for this value (jsonb's spacing), to measure and render it as
    the daemon will."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=float)


def _with_member(text: str, key: str, value_text: str) -> str:
    """A JSON object's text with one more member (it has none by that name)."""
    body = text.rstrip()[:-1].rstrip()
    separator = "" if body.endswith("{") else ", "
    return f"{body}{separator}{json.dumps(key)}: {value_text}}}"


def parse_deadline(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time with a time zone, or a duration from now (30m, 2h, 1d)."""
    seconds = parse_duration(text)
    if seconds is not None:
        return (now or datetime.now(UTC)) + timedelta(seconds=seconds)
    try:
        deadline = datetime.fromisoformat(text)
    except ValueError:
        raise BadJob(
            f"deadline {text!r} is neither an ISO 8601 time with a time zone (2026-12-01T12:00:00Z) nor a "
            "duration from now (30m, 2h, 1d)",
            "deadline",
        ) from None
    if deadline.tzinfo is None:
        raise BadJob(f"deadline {text!r} must carry a time zone (e.g. 2026-12-01T12:00:00Z)", "deadline")
    return deadline


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# Numbers as Decimal, as the database reads them; NaN and Infinity, which Python's json takes and the
# database does not, refused.
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=_no_constant)
_SPACE = re.compile(r"[ \t\n\r]*")


def loads(text: str) -> Any:
    """JSON as the database will read it: numbers exact, and no text PostgreSQL cannot store (\\u0000, an
    unpaired surrogate)."""
    value = _DECODER.decode(text)
    if "\\u" in text:
        _storable(value)
    return value


def _skip_space(text: str, position: int) -> int:
    match = _SPACE.match(text, position)
    return position if match is None else match.end()


def _storable(value: Any) -> None:
    strings: Iterable[Any]
    if isinstance(value, str):
        strings = (value,)
    elif isinstance(value, dict):
        strings = value.keys()
        for item in value.values():
            _storable(item)
    elif isinstance(value, list):
        strings = ()
        for item in value:
            _storable(item)
    else:
        return
    for string in strings:
        if "\x00" in string:
            raise ValueError("\\u0000 in a string, which PostgreSQL cannot store")
        try:
            string.encode()
        except UnicodeEncodeError:
            raise ValueError(
                "an unpaired surrogate (\\ud800 to \\udfff), which PostgreSQL cannot store"
            ) from None


# What reading a file yields: a job's place (`line 4`, `job 3`; None for the job the options make) and the
# job, or what is wrong with it.
Checked = tuple[str | None, NewJob | str]


def read_jobs(stream: IO[str], checker: Checker, defaults: Defaults) -> Iterator[Checked]:
    """A file's jobs, checked: JSON lines (one job a line, blank lines skipped), or one JSON array of jobs
    (a file whose first character, past white space, is `[`)."""
    blank = 0
    for first in stream:
        if first.strip():
            break
        blank += 1
    else:
        return  # no job at all
    if first.lstrip().startswith("["):
        yield from _read_array(first + stream.read(), checker, defaults, blank)
        return
    for number, line in enumerate(_chain(first, stream), start=blank + 1):
        if line.strip():
            yield f"line {number}", check_text(line.strip(), checker, defaults)


def _chain(first: str, rest: Iterable[str]) -> Iterator[str]:
    yield first
    yield from rest


def check_text(text: str, checker: Checker, defaults: Defaults) -> NewJob | str:
    """One job's JSON text, checked: the job, or what is wrong with it."""
    try:
        return check_job(text, checker, defaults)
    except BadJob as error:
        return str(error)


def check_job(text: str, checker: Checker, defaults: Defaults) -> NewJob:
    """One job's JSON text, checked: the job; BadJob says what is wrong with it."""
    try:
        value = loads(text)
    except json.JSONDecodeError as error:
        raise BadJob(f"not JSON: {error.msg} (column {error.colno})") from None
    except (ValueError, RecursionError) as error:  # _storable, _no_constant, json's limits on integers
        raise BadJob(f"not JSON the database can read: {error}") from None
    return checker.check(value, text, defaults)


def _read_array(text: str, checker: Checker, defaults: Defaults, blank: int) -> Iterator[Checked]:
    """A JSON array's jobs, each checked from its own text; a break in the array's syntax ends the reading.
    `blank`: the blank lines before `text` in the file."""

    def where(position: int) -> str:
        return f" (line {blank + text.count(chr(10), 0, position) + 1})"

    for number, (start, end) in enumerate(array_items(text, where, "the file"), start=1):
        yield f"job {number}{where(start)}", check_text(text[start:end], checker, defaults)


def array_items(
    text: str, where: Callable[[int], str] = lambda _position: "", whole: str = "the input"
) -> Iterator[tuple[int, int]]:
    """Where each item of the JSON array `text` holds (past white space, it starts with `[`) begins and
    ends, read as it goes: each item's own text is then read as a job. A break in the array's syntax raises
    BadInput, naming the item (`job N`) and, by `where`, its place in `whole`."""
    position = _skip_space(text, 0) + 1  # past the `[`
    number = 0
    while True:
        position = _skip_space(text, position)
        if number == 0 and text.startswith("]", position):
            break
        number += 1
        try:
            _, end = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise BadInput(f"job {number}{where(position)}: not JSON: {error.msg}") from None
        except (ValueError, RecursionError) as error:
            problem = f"not JSON the database can read: {error}"
            raise BadInput(f"job {number}{where(position)}: {problem}") from None
        yield position, end
        position = _skip_space(text, end)
        if text.startswith(",", position):
            position += 1
            continue
        if text.startswith("]", position):
            break
        raise BadInput(f"after job {number}: expected `,` or `]`{where(position)}")
    if _skip_space(text, position + 1) != len(text):
        raise BadInput(f"{whole} goes on after its JSON array{where(position)}")


def job_text(members: dict[str, str]) -> str:
    """A job's JSON object from its members' JSON texts (each one already read as JSON)."""
    return "{" + ", ".join(f"{json.dumps(key)}: {value}" for key, value in members.items()) + "}"


@dataclass
class Outcome:
    """What an enqueue did: each job's id in the input's order, and whether it was added (else its
    idempotency key was taken: `holders` has the job that holds it, when asked for)."""

    ids: list[UUID | None] = field(default_factory=list)
    added: list[bool] = field(default_factory=list)
    keys: list[tuple[str, str | None]] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    read: int = 0

    @property
    def inserted(self) -> int:
        return sum(self.added)

    @property
    def skipped(self) -> int:
        return len(self.added) - self.inserted


class Refused(Exception):  # noqa: N818 - reads as the verdict it is
    """Bad jobs: nothing was written. `outcome.bad` names each."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"{len(outcome.bad)} bad job(s)")
        self.outcome = outcome


async def insert_jobs(
    connection: Connection,
    jobs: Iterable[Checked],
    progress: IO[str] | None = None,
    total: int | None = None,
    *,
    holders: bool = False,
) -> Outcome:
    """Inserts the jobs in chunks, in one transaction, in their order, and returns what became of each.
    A bad job stops the writing, not the reading: every bad job is named (Refused), and the transaction
    is rolled back. With `holders`, a skipped job's id is the one of the job holding its key."""
    outcome = Outcome()
    bar = ProgressBar(progress, total)
    async with connection.transaction():
        chunk: list[NewJob] = []
        for place, job in jobs:
            outcome.read += 1
            if isinstance(job, str):
                outcome.bad.append(job if place is None else f"{place}: {job}")
            elif not outcome.bad:
                chunk.append(job)
                if len(chunk) >= CHUNK:
                    await _insert(connection, chunk, outcome)
                    bar.update(outcome.read)
                    chunk = []
        if outcome.bad:
            raise Refused(outcome)  # rolls the transaction back
        if chunk:
            await _insert(connection, chunk, outcome)
        if holders and outcome.skipped:
            await _find_holders(connection, outcome)
    bar.finish(outcome.read)
    return outcome


async def _insert(connection: Connection, jobs: list[NewJob], outcome: Outcome) -> None:
    rows = await connection.fetch(
        sql("insert_jobs"),
        [j.text for j in jobs],
        [j.tenant_id for j in jobs],
        [j.job_type for j in jobs],
        [j.idempotency_key for j in jobs],
        [j.deadline for j in jobs],
        [j.route for j in jobs],
    )
    # RETURNING gives the rows added in the order given; the jobs between them were skipped (their key was
    # taken, by an earlier job or one of this chunk).
    added = iter(rows)
    row = next(added, None)
    for job in jobs:
        mine = row is not None and (row["tenant_id"], row["idempotency_key"]) == (
            job.tenant_id,
            job.idempotency_key,
        )
        if row is not None and mine:
            outcome.ids.append(row["id"])
            row = next(added, None)
        else:
            outcome.ids.append(None)
        outcome.added.append(mine)
        outcome.keys.append((job.tenant_id, job.idempotency_key))
    if row is not None:
        raise AssertionError("insert_jobs returned more rows than jobs were sent")


async def _find_holders(connection: Connection, outcome: Outcome) -> None:
    skipped = [i for i, added in enumerate(outcome.added) if not added]
    rows = await connection.fetch(
        sql("jobs_by_idempotency_key"),
        [outcome.keys[i][0] for i in skipped],
        [outcome.keys[i][1] for i in skipped],
    )
    holder = {(row["tenant_id"], row["idempotency_key"]): row["id"] for row in rows}
    for i in skipped:
        outcome.ids[i] = holder.get(outcome.keys[i])


class ProgressBar:
    """A one-line bar on a terminal; nothing at all when the stream is not one (logs stay clean)."""

    WIDTH = 30

    def __init__(self, stream: IO[str] | None, total: int | None) -> None:
        self.stream = stream if stream is not None and stream.isatty() else None
        self.total = total

    def update(self, done: int) -> None:
        if self.stream is None:
            return
        if self.total:
            filled = int(self.WIDTH * min(done, self.total) / self.total)
            line = f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done:,}/{self.total:,} jobs"
        else:
            line = f"\r{done:,} jobs"
        self.stream.write(line)
        self.stream.flush()

    def finish(self, done: int) -> None:
        if self.stream is not None:
            self.update(done)
            self.stream.write("\n")


def count_jobs(path: str) -> int | None:
    """How many jobs a JSON lines file holds (its lines that are not blank); None for a JSON array, which
    is counted as it is read."""
    with open(path, "rb") as file:  # noqa: PTH123 - a plain count, no Path needed
        count = 0
        for line in file:
            if line.strip():
                if count == 0 and line.lstrip().startswith(b"["):
                    return None
                count += 1
        return count
