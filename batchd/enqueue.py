"""`batchd enqueue`: producers' INSERT from the command line, one job or a JSONL file of them.

A file goes in as one transaction, all or nothing: a bad line stops it with the line's number before
anything is written, so a retried command never leaves half a file queued. Lines whose idempotency key is
already taken are skipped, as `ON CONFLICT DO NOTHING` does for any producer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from .store import Connection, sql

CHUNK = 1_000
_KEYS = {"tenant_id", "request", "job_type", "input", "metadata", "idempotency_key", "deadline"}


class BadJob(Exception):  # noqa: N818 - reads as the verdict it is
    pass


@dataclass(frozen=True)
class NewJob:
    tenant_id: str
    request: str | None
    job_type: str | None
    input: str | None
    metadata: str | None
    idempotency_key: str | None
    deadline: datetime | None


def parse_job(value: Any, default_tenant: str | None = None) -> NewJob:
    """A job as a producer writes it, checked the way the database will check it, with clearer words."""
    if not isinstance(value, dict):
        raise BadJob("a job must be a JSON object")
    unknown = set(value) - _KEYS
    if unknown:
        raise BadJob(f"unknown field(s) {', '.join(sorted(unknown))}; a job has {', '.join(sorted(_KEYS))}")
    tenant = value.get("tenant_id", default_tenant)
    if not isinstance(tenant, str) or not tenant:
        raise BadJob("tenant_id must be a non-empty string")
    if ("request" in value) == ("job_type" in value):
        raise BadJob("a job has either `request` (Messages API params) or `job_type` with `input`")
    if "input" in value and "job_type" not in value:
        raise BadJob("`input` goes with `job_type`")
    if "job_type" in value and not isinstance(value["job_type"], str):
        raise BadJob("job_type must be a string")
    for key in ("idempotency_key",):
        if key in value and not isinstance(value[key], str):
            raise BadJob(f"{key} must be a string")
    deadline = value.get("deadline")
    if deadline is not None:
        try:
            deadline = datetime.fromisoformat(deadline)
        except (TypeError, ValueError):
            raise BadJob("deadline must be an ISO 8601 timestamp with a time zone") from None
        if deadline.tzinfo is None:
            raise BadJob("deadline must carry a time zone (e.g. 2026-12-01T12:00:00Z)")
    return NewJob(
        tenant_id=tenant,
        request=_json(value, "request"),
        job_type=value.get("job_type"),
        input=_json(value, "input"),
        metadata=_json(value, "metadata"),
        idempotency_key=value.get("idempotency_key"),
        deadline=deadline,
    )


def _json(value: dict[str, Any], key: str) -> str | None:
    return json.dumps(value[key]) if key in value and value[key] is not None else None


def read_jsonl(lines: Iterable[str], default_tenant: str | None) -> Iterator[NewJob]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield parse_job(json.loads(line), default_tenant)
        except json.JSONDecodeError as error:
            raise BadJob(f"line {number}: not JSON: {error}") from None
        except BadJob as error:
            raise BadJob(f"line {number}: {error}") from None


async def insert_jobs(
    connection: Connection, jobs: Iterable[NewJob], progress: IO[str] | None = None, total: int | None = None
) -> tuple[int, int]:
    """Inserts in chunks, in one transaction. Returns (inserted, skipped as duplicates)."""
    inserted = skipped = 0
    bar = ProgressBar(progress, total)
    async with connection.transaction():
        chunk: list[NewJob] = []
        for job in jobs:
            chunk.append(job)
            if len(chunk) >= CHUNK:
                added = await _insert(connection, chunk)
                inserted, skipped = inserted + added, skipped + len(chunk) - added
                bar.update(inserted + skipped)
                chunk = []
        if chunk:
            added = await _insert(connection, chunk)
            inserted, skipped = inserted + added, skipped + len(chunk) - added
    bar.finish(inserted + skipped)
    return inserted, skipped


async def _insert(connection: Connection, jobs: list[NewJob]) -> int:
    rows = await connection.fetch(
        sql("insert_jobs"),
        [j.tenant_id for j in jobs],
        [j.request for j in jobs],
        [j.job_type for j in jobs],
        [j.input for j in jobs],
        [j.metadata for j in jobs],
        [j.idempotency_key for j in jobs],
        [j.deadline for j in jobs],
    )
    return len(rows)


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
            filled = int(self.WIDTH * done / self.total)
            line = f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total} jobs"
        else:
            line = f"\r{done} jobs"
        self.stream.write(line)
        self.stream.flush()

    def finish(self, done: int) -> None:
        if self.stream is not None:
            self.update(done)
            self.stream.write("\n")


def count_lines(path: str) -> int:
    with open(path, "rb") as file:  # noqa: PTH123 - a plain count, no Path needed
        return sum(1 for line in file if line.strip())
