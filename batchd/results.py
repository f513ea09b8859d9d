"""Results: a batch's results file, streamed, applied to its jobs in bulk, once.

Lines are read as they arrive (the file is never held whole) and applied a chunk at a time: COPY into a
temporary table, then one UPDATE for the chunk, in one transaction. While the database applies up to two
chunks, the next is read and parsed, so memory stays at three chunks however large the batch. Only jobs
still `submitted` in this batch change, so a chunk applied again after a crash changes nothing. Jobs with no
line in the file are retried; so are all those not yet applied when the provider no longer has the batch
(results 404: it vanished, poller.batch_gone). Every write names this process as the batch's lease owner.

    succeeded                                   -> succeeded, with the message, its usage
    errored: invalid_request_error              -> failed (the request itself is wrong)
    errored: anything else, expired, canceled   -> queued again with attempts + 1, failed at max_attempts

A job whose own row makes the apply fail (an error of its data, not of the connection: a value no statement
expected, a check, a limit) is set aside — failed with the database's reason — and the rest of its chunk
applied: the chunk is halved until the row is found, so one odd row costs a few statements, not the batch.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable
from typing import Any
from uuid import UUID

import anthropic
import asyncpg
import structlog

from . import pricing
from .context import Context
from .poller import batch_gone
from .pricing import PricingSettings
from .store import Batch, Connection, sql
from .templates import job_id_from

log = structlog.get_logger("batchd.results")

RESULT_COLUMNS = ["job_id", "outcome", "result", "error"]
IN_FLIGHT_CHUNKS = 2
# json.dumps(value, separators=(",", ":")), without building an encoder for each of the two calls per result
# line, nor looking for cycles in values fresh from json.loads (which has none): the same text, sooner.
_ENCODE = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
Row = tuple[UUID, str, str | None, str | None]


class NotOurBatch(Exception):  # noqa: N818 - a verdict, not a malfunction
    """An adopted batch's results name none of this batch's jobs: it belongs to someone else."""


# A succeeded line as the provider writes it: {"custom_id":"…","result":{"type":"succeeded","message":{…}}}
_HEAD = b'{"custom_id":"'
_SUCCEEDED = b'","result":{"type":"succeeded","message":'


def classify(raw: bytes, tag: str) -> Row | None:
    """One results line as a row to apply, or None when it is not one of this batch's requests.

    Most lines are successes in the provider's compact form: their message is cut out of the line as
    text, not parsed and written again, and the database checks it when it casts it to jsonb (a line that
    only looked like the form fails that cast, and its chunk is then parsed line by line: `reparse`).
    """
    compact, row = _succeeded_as_text(raw, tag)
    return row if compact else classify_parsed(json.loads(raw), tag)


def _succeeded_as_text(raw: bytes, tag: str) -> tuple[bool, Row | None]:
    """(True, its row — None when not ours) for a line in the compact succeeded form; (False, None) else."""
    if not raw.startswith(_HEAD):
        return False, None
    end = raw.find(b'"', len(_HEAD))
    if end < 0 or not raw.startswith(_SUCCEEDED, end) or not raw.endswith(b"}}"):
        return False, None
    job_id = job_id_from(raw[len(_HEAD) : end].decode(), tag)
    if job_id is None:
        return True, None
    return True, (job_id, "succeeded", raw[end + len(_SUCCEEDED) : -2].decode(), None)


def reparse(lines: list[bytes], tag: str) -> list[Row]:
    """The slow, sure way: every line parsed as JSON."""
    rows = (classify_parsed(json.loads(raw), tag) for raw in lines)
    return [row for row in rows if row is not None]


def result_types(rows: Iterable[Row]) -> Counter[str]:
    """What the provider said of each row (as `classify` made it), for the metrics: succeeded, errored,
    canceled, expired or missing. Only rows that are not successes are parsed, and those are few."""
    types: Counter[str] = Counter()
    for _, outcome, _, error in rows:
        if outcome == "succeeded":
            types["succeeded"] += 1
        elif outcome == "failed" or error is None:
            types["errored"] += 1
        else:
            kind = json.loads(error).get("type")
            types[kind if kind in ("canceled", "expired", "missing") else "errored"] += 1
    return types


def classify_parsed(line: dict[str, Any], tag: str) -> Row | None:
    job_id = job_id_from(str(line.get("custom_id", "")), tag)
    if job_id is None:
        return None
    result = line.get("result") or {}
    kind = result.get("type")
    if kind == "succeeded":
        message = result.get("message") or {}
        plain_counts(message)
        return (job_id, "succeeded", _text(message), None)
    if kind == "errored":
        inner = (result.get("error") or {}).get("error") or {}
        error = {"type": inner.get("type", "api_error"), "message": inner.get("message", "")}
        outcome = "failed" if error["type"] == "invalid_request_error" else "retry"
        return (job_id, outcome, None, _text(error))
    # expired, canceled, and any type this code does not know: the request was not done; do it again.
    reason = {"type": str(kind), "message": f"the provider reported the request {kind}"}
    return (job_id, "retry", None, _text(reason))


_COUNTS = (
    ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"),
    ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"),  # in usage.cache_creation
)


def plain_counts(message: Any) -> None:
    """The ledger reads the usage's counts with plain casts (queries.sql, apply_results), which a count that
    is not an integer fails: here, on the line-by-line path such a chunk is applied by, it becomes 0 (and
    is logged), so that one odd line cannot stop its batch's results from being applied."""
    usage = message.get("usage") if isinstance(message, dict) else None
    if not isinstance(usage, dict):
        return
    for counts, keys in ((usage, _COUNTS[0]), (usage.get("cache_creation"), _COUNTS[1])):
        if not isinstance(counts, dict):
            continue
        for key in keys:
            value = counts.get(key)
            if value is not None and not (type(value) is int and abs(value) < 2**63):
                log.warning("results.odd_usage", key=key, value=repr(value)[:40])
                counts[key] = 0


def _text(value: Any) -> str | None:
    return None if value is None else _ENCODE(value)


async def apply_results(ctx: Context, batch: Batch) -> None:
    assert batch.provider_batch_id is not None  # noqa: S101 - ended batches always have one
    bound = log.bind(batch_id=str(batch.id), provider_batch_id=batch.provider_batch_id)
    chunk_size = ctx.settings.results.apply_chunk
    applied = foreign = 0
    types: Counter[str] = Counter()  # what the provider said of the results this call applied
    vanished = await ctx.pool.fetchval(sql("batch_vanished"), batch.id)
    if not vanished:
        try:
            applied, foreign = await _download(ctx, batch, chunk_size, types)
        except anthropic.NotFoundError:
            # Ended, but its copy is gone (deleted behind batchd's back, or its results expired): the same
            # road as a batch that vanished while running. What was applied stays; the rest is retried.
            await batch_gone(ctx, batch, "results")
            vanished = True
    if applied == 0 and foreign > 0:
        raise NotOurBatch(f"{batch.provider_batch_id} holds {foreign} requests, none of batch {batch.tag}")
    missing = await _retry_unreported(ctx, batch, types)
    async with ctx.pool.acquire() as connection, connection.transaction():
        if not await connection.fetchval(sql("hold_batch"), batch.id, ctx.instance_id):
            # Taken over meanwhile (every write above then changed nothing): the new owner finishes it, and
            # only the owner may delete the provider's copy, which the other may still be reading.
            bound.warning("batch.lease_lost")
            return
        await connection.execute(sql("finish_batch"), batch.id, ctx.instance_id)
        await connection.execute(sql("notify_events"))
    bound.info(
        "batch.applied",
        applied=applied,
        missing=missing,
        foreign=foreign,
        results=dict(sorted(types.items())),
        vanished=vanished,
    )
    if ctx.settings.results.delete_after_apply and not vanished:
        await ctx.provider.delete(batch.provider_batch_id)
        await ctx.pool.execute(sql("provider_copy_deleted"), batch.id, ctx.instance_id)
        bound.info("batch.provider_copy_deleted")


async def _download(ctx: Context, batch: Batch, chunk_size: int, types: Counter[str]) -> tuple[int, int]:
    """Streams the results file and applies it; returns (lines applied, lines of other batches)."""
    assert batch.provider_batch_id is not None  # noqa: S101 - ended batches always have one
    applied = foreign = 0
    # Chunks are applied while the next are read, up to IN_FLIGHT_CHUNKS at once on their own connections,
    # so that reading and parsing (here) and applying (in the database, on every core) overlap instead of
    # taking turns. Chunks touch disjoint jobs; each is one transaction. The reader takes a slot before it
    # hands a chunk over, so at most IN_FLIGHT_CHUNKS + 1 chunks are in memory. A chunk that fails stops the
    # apply: the task group cancels the reading and the other chunks (their transactions roll back), and
    # the batch's next step applies it all again (applying twice changes nothing).
    slots = asyncio.Semaphore(IN_FLIGHT_CHUNKS)

    async def apply_in_slot(chunk: list[Row], raw: list[bytes]) -> None:
        try:
            await _apply_chunk(ctx, batch, chunk, raw, types)
        finally:
            slots.release()

    try:
        async with asyncio.TaskGroup() as applying, ctx.provider.results(batch.provider_batch_id) as lines:
            chunk: list[Row] = []
            raw: list[bytes] = []
            async for line in lines:
                row = classify(line, batch.tag)
                if row is None:
                    foreign += 1
                    continue
                chunk.append(row)
                raw.append(line)
                if len(chunk) >= chunk_size:
                    await slots.acquire()
                    applying.create_task(apply_in_slot(chunk, raw))
                    applied += len(chunk)
                    chunk, raw = [], []
            if chunk:
                await slots.acquire()
                applying.create_task(apply_in_slot(chunk, raw))
                applied += len(chunk)
    except BaseExceptionGroup as failed:
        # The first failure, as the caller expects it (a database error is retried, a 404 means vanished).
        raise failed.exceptions[0] from None
    return applied, foreign


async def _retry_unreported(ctx: Context, batch: Batch, types: Counter[str]) -> int:
    """Jobs the results file had no line for are retried; returns how many."""
    missing = [row["id"] for row in await ctx.pool.fetch(sql("unreported_jobs"), batch.id)]
    if missing:
        reason = _text({"type": "missing", "message": "the batch's results had no line for this request"})
        await _apply_chunk(ctx, batch, [(job_id, "retry", None, reason) for job_id in missing], None, types)
    return len(missing)


# SQLSTATE classes of an error caused by the rows a statement wrote, not by the connection or the server's
# state: data exceptions, integrity constraints, program limits (a jsonb too large), a trigger's RAISE.
ROW_FAULTS = ("22", "23", "54", "P0")


def row_fault(error: BaseException) -> bool:
    return isinstance(error, asyncpg.PostgresError) and str(error.sqlstate or "").startswith(ROW_FAULTS)


async def _apply_chunk(
    ctx: Context,
    batch: Batch,
    rows: list[Row],
    raw: list[bytes] | None = None,
    types: Counter[str] | None = None,
) -> None:
    try:
        changed = await _apply_rows(ctx, batch, rows)
    except asyncpg.DataError:
        if raw is None:
            changed = await _apply_setting_aside(ctx, batch, rows)
        else:
            # A line cut out as a message was not one (the provider wrote something this code did not
            # expect): parse the chunk properly and apply that.
            log.warning("results.reparsed_chunk", batch_id=str(batch.id), lines=len(raw))
            rows = reparse(raw, batch.tag)
            changed = await _apply_setting_aside(ctx, batch, rows)
    except asyncpg.PostgresError as error:
        if not row_fault(error):
            raise
        changed = await _apply_setting_aside(ctx, batch, rows)
    if changed:
        # Counted once committed. A chunk applied again after a failure changes nothing and is not counted
        # again (one that changes some of its jobs, after a partial overlap, is counted whole: rare).
        applied = result_types(rows)
        ctx.metrics.applied(applied)
        if types is not None:
            types.update(applied)


async def _apply_setting_aside(ctx: Context, batch: Batch, rows: list[Row]) -> int:
    """Applies the rows, setting aside those whose own job makes the statement fail: halves the rows until
    each failing one is alone, and fails that job with the database's reason. Returns how many changed."""
    try:
        return await _apply_rows(ctx, batch, rows)
    except asyncpg.PostgresError as error:
        if not row_fault(error):
            raise
        if len(rows) > 1:
            half = len(rows) // 2
            return await _apply_setting_aside(ctx, batch, rows[:half]) + await _apply_setting_aside(
                ctx, batch, rows[half:]
            )
        return await set_aside(ctx, rows[0][0], error, batch_id=batch.id)


async def set_aside(
    ctx: Context, job_id: UUID, error: asyncpg.PostgresError, *, batch_id: UUID | None
) -> int:
    """Fails a job whose own row the apply could not write, with the database's reason: still `submitted`
    in batch `batch_id` (whose lease this process holds), or (batch_id None) `sending` under this process's
    lease. Returns 1 if it did."""
    reason = f"batchd could not record this job's result: {error.sqlstate}: {error}"[:1000]
    async with ctx.pool.acquire() as connection, connection.transaction():
        changed = await connection.fetchval(sql("set_aside_job"), batch_id, job_id, reason, ctx.instance_id)
        await connection.execute(sql("notify_events"))
    log.warning(
        "job.set_aside",
        job_id=str(job_id),
        batch_id=None if batch_id is None else str(batch_id),
        error=str(error)[:200],
    )
    return int(changed)


async def _apply_rows(ctx: Context, batch: Batch, rows: list[Row]) -> int:
    """Applies the rows in one transaction; returns how many jobs changed."""
    return await apply_rows(ctx, rows, RESULT_COLUMNS, batch_id=batch.id, owner=ctx.instance_id)


async def publish_prices(connection: Connection, prices: PricingSettings) -> str:
    """Writes the table to the database as its price set (replacing that set's rows, which are the same
    unless edited by hand), in one transaction; returns the set's name. Other sets are left alone: they are
    the prices of other daemons, or of this one before it restarted with new ones."""
    rows = prices.price_rows()
    async with connection.transaction():
        await connection.execute(sql("publish_price_set"), prices.price_set, prices.batch_factor)
        await connection.execute(sql("clear_prices"), prices.price_set)
        columns = [list(column) for column in zip(*rows, strict=True)]
        await connection.execute(sql("insert_prices"), prices.price_set, *columns)
    log.info("pricing.published", price_set=prices.price_set, models=len(rows))
    return prices.price_set


async def apply_rows(
    ctx: Context,
    rows: list[Any],
    columns: list[str],
    *,
    batch_id: UUID | None,
    owner: str,
) -> int:
    """Applies outcomes in one transaction with the one statement that writes results, the cost ledger,
    spend and events (queries.sql, apply_results): a batch's (`batch_id`), while `owner` holds its lease,
    or the sync path's (`batch_id` None), for jobs still sent under the lease of `owner` (priced without the
    batch discount). Prices are this process's own set (publish_prices). Returns how many jobs changed."""
    prices = ctx.settings.pricing
    async with ctx.pool.acquire() as connection, connection.transaction():
        await connection.execute(sql("create_results_table"))
        await connection.copy_records_to_table("batchd_results", records=rows, columns=columns)
        arguments = (batch_id, ctx.settings.batching.max_attempts, prices.price_set, owner)
        applied = await connection.fetchrow(sql("apply_results"), *arguments)
        if applied is not None and not applied["priced"]:
            # The daemon published its prices when it started, but this database has not got them (a
            # process that applies without starting a daemon, or a set removed by hand): nothing was
            # applied; publish them and apply.
            await publish_prices(connection, prices)
            applied = await connection.fetchrow(sql("apply_results"), *arguments)
        await connection.execute(sql("notify_events"))
    assert applied is not None  # noqa: S101 - the statement ends in a one-row SELECT
    if applied["unpriced"]:
        pricing.warn_unpriced(applied["unpriced"])
    return int(applied["changed"])
