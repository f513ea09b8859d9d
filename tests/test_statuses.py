"""batchd/statuses.py is the one list of job and batch statuses: the database's checks allow exactly these,
and the dashboard is given them (with their labels) by the API. (The metrics' and `batchd status`'s use of
it: tests/test_metrics.py, tests/test_cli_daemon.py.)"""

from __future__ import annotations

import re
from typing import Any

import aiohttp

from batchd import statuses
from batchd.statuses import (
    BATCH_LABELS,
    BATCH_STATUSES,
    FINAL_BATCH_STATUSES,
    FINAL_JOB_STATUSES,
    IN_FLIGHT_JOB_STATUSES,
    JOB_LABELS,
    JOB_STATUSES,
    OPEN_BATCH_STATUSES,
    BatchStatus,
    JobStatus,
)

# The CHECK constraints on a table's status column alone, as the database prints them.
STATUS_CHECKS = """
SELECT pg_get_constraintdef(c.oid) AS definition
  FROM pg_constraint AS c
  JOIN pg_attribute AS a ON a.attrelid = c.conrelid AND a.attname = 'status'
 WHERE c.conrelid = $1::regclass AND c.contype = 'c' AND c.conkey = ARRAY[a.attnum]
"""


async def allowed_statuses(db: Any, table: str) -> list[str]:
    (definition,) = [row["definition"] for row in await db.fetch(STATUS_CHECKS, table)]
    # CHECK ((status = ANY (ARRAY['queued'::text, 'submitting'::text, ...])))
    assert re.fullmatch(r"CHECK \(\(status = ANY \(ARRAY\[('[a-z_]+'::text(, )?)+\]\)\)\)", definition), (
        definition
    )
    return re.findall(r"'([a-z_]+)'::text", definition)


async def test_the_databases_checks_allow_exactly_the_enumerated_statuses(db: Any) -> None:
    assert await allowed_statuses(db, "batchd.jobs") == list(JOB_STATUSES)
    assert await allowed_statuses(db, "batchd.batches") == list(BATCH_STATUSES)


def test_the_groups_of_statuses_cover_each_status_once() -> None:
    assert tuple(JobStatus) == JOB_STATUSES
    assert "sending" in JOB_STATUSES
    assert FINAL_JOB_STATUSES.isdisjoint(IN_FLIGHT_JOB_STATUSES)
    assert set(JOB_STATUSES) == FINAL_JOB_STATUSES | IN_FLIGHT_JOB_STATUSES | {JobStatus.QUEUED}
    assert set(BATCH_STATUSES) == OPEN_BATCH_STATUSES | FINAL_BATCH_STATUSES
    assert {BatchStatus.APPLIED, BatchStatus.ABANDONED} == FINAL_BATCH_STATUSES


def test_every_status_has_a_label_and_a_hint() -> None:
    assert list(JOB_LABELS) == list(JOB_STATUSES)
    assert list(BATCH_LABELS) == list(BATCH_STATUSES)
    for label, hint in [*JOB_LABELS.values(), *BATCH_LABELS.values()]:
        assert label
        assert hint


async def test_the_overview_gives_the_dashboard_every_status_with_its_label(
    db: Any, tokens: dict[str, str], serve: Any
) -> None:
    async with (
        serve() as (_, url),
        aiohttp.ClientSession() as http,
        http.get(f"{url}/v1/overview", headers={"Authorization": f"Bearer {tokens['acme']}"}) as response,
    ):
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["statuses"] == statuses.described()
    assert [row["status"] for row in body["statuses"]["jobs"]] == list(JOB_STATUSES)
    assert [row["status"] for row in body["statuses"]["batches"]] == list(BATCH_STATUSES)
    sending = next(row for row in body["statuses"]["jobs"] if row["status"] == "sending")
    assert sending["label"] == "Sending"
