"""The submitter: sends a recorded batch to the provider, exactly once, whatever fails in between.

Before the create call, `create_attempted_at` is committed. From then on, until the provider's answer is
recorded, the database says "maybe created". So:

- an answer with the batch: recorded, the jobs become `submitted`;
- a refusal the provider surely did not act on (429, 4xx): the attempt is cleared and retried later with
  the same jobs and custom_ids (a 413 splits the batch in two first; a 400 that names a request fails it);
- no answer (connection lost, timeout, a crash, or a 5xx, which a gateway may send while the API goes on
  with the request): the batch is *reconciled* before anything is sent again. batchd lists the provider's
  batches made around the attempt, of the batch's size and not already ours. A candidate is adopted only
  once it has ended and its results name our batch tag (until then the batch waits: its results would not
  come sooner). The batch was never made only when no candidate is ours *and* the create's whole window
  has passed: `anthropic.timeout_s` + `daemon.clock_skew_s` since it was sent, by the database's clock.
  Until then the create may still land (a gateway answered 502 and passed it on later), so batchd lists
  again rather than send a second, billed, batch. A batch that is not ours is never adopted, canceled or
  deleted.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from uuid import UUID

import anthropic
import asyncpg
import structlog
from anthropic.types.messages import MessageBatch

from .backoff import backoff_s
from .context import Context
from .provider import api_message, retry_after
from .store import Batch, sql
from .templates import BODY_OVERHEAD, ITEM_OVERHEAD, create_body, job_id_from, new_tag

log = structlog.get_logger("batchd.submitter")

_REQUEST_INDEX = re.compile(r"requests\.(\d+)")
_STATUS = re.compile(r"^(\d{3}): ")
# A create the provider keeps failing (a 500, or a 4xx that names no request) at least this many times, over
# [daemon] isolate_after_s at least, is split in two, each half once more per failure, until a single request
# fails alone: one request the provider cannot take must not hold the rest of its batch back forever
# (tests/test_fuzz_producer.py found one: JSON that PostgreSQL accepts and a parser with the usual limits
# cannot read). Being overloaded or rate limited, and key problems, say nothing about the requests: those
# are never isolated, and an outage fails every create for a while, whatever the requests: hence the time.
ISOLATE_AFTER_ATTEMPTS = 4
NOT_ABOUT_THE_REQUESTS = frozenset({401, 403, 408, 409, 429, 502, 503, 504, 529})


async def submit(ctx: Context, batch: Batch, body: bytes | None) -> None:
    bound = log.bind(batch_id=str(batch.id), tag=batch.tag)
    rows: list[asyncpg.Record] | None = None
    # The body the flusher built is sent as is on the batch's first attempt: until a create is answered,
    # nothing changes a batch's jobs (a refusal splits or shrinks it). Otherwise (a restart, a retry) it is
    # rebuilt from the params stored with each job, exactly as first claimed. (Counting the batch's jobs to
    # check took 0.1 to 0.4 s for 100,000.)
    if body is None or batch.create_attempts > 0:
        rows = await ctx.pool.fetch(sql("batch_payload"), batch.id)
        if not rows:
            await ctx.pool.execute(sql("abandon_batch"), batch.id, "no jobs left to send", ctx.instance_id)
            bound.info("batch.abandoned", reason="no jobs left to send")
            return
        body = create_body(batch.tag, ((row["id"], row["params"]) for row in rows))
    grace = ctx.settings.daemon.reconcile_grace_s
    started = await ctx.pool.fetchval(sql("begin_create"), batch.id, ctx.instance_id, grace)
    if started is None:
        return  # no longer ours, or no longer pending
    try:
        created = await ctx.provider.create_batch(body)
    except anthropic.APIStatusError as error:
        if rows is None:
            rows = await ctx.pool.fetch(sql("batch_payload"), batch.id)
        await _refused(ctx, batch, rows, error)
        return
    except (anthropic.APIConnectionError, anthropic.APITimeoutError) as error:
        # Unknown: it may exist. begin_create already put off the next step until the provider has surely
        # finished with the request; then the batch is reconciled.
        bound.warning("batch.create_unanswered", error=str(error))
        return
    await record_submitted(ctx, batch, created, adopted=False)


async def record_submitted(ctx: Context, batch: Batch, created: MessageBatch, *, adopted: bool) -> None:
    """The provider made the batch: its id, then its jobs `submitted`. The id is committed on its own first
    when the create answered (recording 100,000 jobs takes seconds): a daemon that dies before its jobs are
    recorded leaves a batch its successor records without reconciling, which would wait for the provider's
    batch to end. An adopted batch, found by reconciling, is recorded in one transaction."""
    if not adopted:
        await ctx.pool.execute(sql("batch_created"), batch.id, created.id, ctx.instance_id)
    await record_jobs_submitted(ctx, batch, created.id, adopted=adopted)


async def record_jobs_submitted(ctx: Context, batch: Batch, provider_batch_id: str, *, adopted: bool) -> None:
    """The batch in progress, its jobs `submitted`, and the events saying so (at once: batch_submitted)."""
    async with ctx.pool.acquire() as connection, connection.transaction():
        status = await connection.execute(
            sql("batch_submitted"), batch.id, provider_batch_id, adopted, ctx.instance_id
        )
        await connection.execute(sql("notify_events"))
    if status.split()[-1] != "0":  # "INSERT 0 n": n batch.submitted events, none when it was not pending
        ctx.metrics.submitted(batch.request_count)
    log.info(
        "batch.submitted",
        batch_id=str(batch.id),
        provider_batch_id=provider_batch_id,
        requests=batch.request_count,
        adopted=adopted,
    )


async def _refused(
    ctx: Context, batch: Batch, rows: list[asyncpg.Record], error: anthropic.APIStatusError
) -> None:
    bound = log.bind(batch_id=str(batch.id), status=error.status_code)
    message = f"{error.status_code}: {api_message(error)}"
    if error.status_code >= 500:
        # A gateway may answer 5xx after the work was done: treat it as unanswered, and reconcile, no sooner
        # than the provider asked (529 overloaded carries a retry-after).
        wait = max(ctx.settings.daemon.reconcile_grace_s, retry_after(error) or 0.0)
        await ctx.pool.execute(sql("retry_later"), batch.id, wait, message, ctx.instance_id)
        bound.warning("batch.create_failed_maybe_made", error=message, retry_in_s=wait)
        return
    if error.status_code == 413:
        await _split(ctx, batch, rows, message)
        return
    if error.status_code == 400:
        index = _request_index(message)
        if index is not None and index < len(rows):
            await _fail_one(ctx, batch, rows[index]["id"], message)
            return
    if _isolating(ctx, batch, error.status_code):
        await _isolate(ctx, batch, rows, message)
        return
    delay = retry_after(error) or _refused_backoff(ctx, batch.create_attempts, error.status_code)
    await ctx.pool.execute(sql("create_refused"), batch.id, delay, message, ctx.instance_id)
    bound.warning("batch.create_refused", error=message, retry_in_s=delay)


def _refused_backoff(ctx: Context, attempts: int, status: int) -> float:
    daemon = ctx.settings.daemon
    if status == 403:
        return daemon.retry_max_s  # a permission the key lacks: an operator must act; do not hammer the API
    # A 401 marked the API refused (provider.py): the batch's next step waits until a check passes, then
    # sends at once, rather than sit out a long delay after the key was fixed.
    return backoff_s(attempts, daemon.retry_min_s, daemon.retry_max_s)


def _request_index(message: str) -> int | None:
    match = _REQUEST_INDEX.search(message)
    return int(match[1]) if match else None


async def _fail_one(ctx: Context, batch: Batch, job_id: object, message: str) -> None:
    """The provider named one request as the problem: fail it, send the rest."""
    async with ctx.pool.acquire() as connection, connection.transaction():
        if not await connection.fetchval(sql("hold_batch"), batch.id, ctx.instance_id):
            return  # taken over: the new owner decides
        await connection.execute(sql("fail_jobs"), [job_id], [f"refused by the API: {message}"])
        await connection.execute(sql("shrink_batch"), batch.id, ctx.instance_id)
        await connection.execute(sql("notify_events"))
    log.warning("job.failed", job_id=str(job_id), batch_id=str(batch.id), reason=message)


def _isolating(ctx: Context, batch: Batch, status: int | None) -> bool:
    # Time as well as attempts: an outage fails every create for a while, whatever the requests.
    failing_s = (datetime.now(UTC) - _utc(batch.created_at)).total_seconds()
    return (
        batch.create_attempts >= ISOLATE_AFTER_ATTEMPTS
        and failing_s >= ctx.settings.daemon.isolate_after_s
        and status is not None
        and status not in NOT_ABOUT_THE_REQUESTS
    )


async def _isolate(ctx: Context, batch: Batch, rows: list[asyncpg.Record], message: str) -> None:
    """The provider failed this batch's create again and again: look for the request it cannot take."""
    reason = f"the provider failed {batch.create_attempts} creates holding this request ({message})"
    new_id = await _split(ctx, batch, rows, reason)
    if new_id is not None:
        # Each half fails once more before it is halved again: a poisoned batch of n takes log2(n) rounds.
        await ctx.pool.execute(
            sql("set_create_attempts"), [batch.id, new_id], ISOLATE_AFTER_ATTEMPTS - 1, ctx.instance_id
        )


async def _split(ctx: Context, batch: Batch, rows: list[asyncpg.Record], message: str) -> UUID | None:
    """Halve the batch (413: the body is too large for the provider); a single request fails. Returns the
    new batch's id."""
    if len(rows) == 1:
        await _fail_one(ctx, batch, rows[0]["id"], message)
        return None
    half = len(rows) // 2
    moved = rows[half:]
    moved_bytes = sum(len(row["params"].encode()) + ITEM_OVERHEAD for row in moved) + BODY_OVERHEAD
    async with ctx.pool.acquire() as connection, connection.transaction():
        if not await connection.fetchval(sql("hold_batch"), batch.id, ctx.instance_id):
            return None  # taken over: the new owner decides
        new_id = await connection.fetchval(
            sql("insert_batch"),
            new_tag(),
            len(moved),
            moved_bytes,
            ctx.instance_id,
            ctx.settings.daemon.lease_s,
        )
        await connection.execute(
            sql("split_batch"),
            batch.id,
            new_id,
            [row["id"] for row in moved],
            batch.bytes - moved_bytes,
            message,
            ctx.instance_id,
        )
    log.warning("batch.split", batch_id=str(batch.id), new_batch_id=str(new_id), moved=len(moved))
    return UUID(str(new_id))


async def reconcile(ctx: Context, batch: Batch) -> None:
    """Find out whether an unanswered create made a batch, and act on the answer."""
    assert batch.create_attempted_at is not None  # noqa: S101 - only called for attempted batches
    bound = log.bind(batch_id=str(batch.id), tag=batch.tag)
    skew = timedelta(seconds=ctx.settings.daemon.clock_skew_s)
    earliest = batch.create_attempted_at - skew
    latest = batch.create_attempted_at + timedelta(seconds=ctx.settings.anthropic.timeout_s) + skew
    # Measured before listing: a batch made before the window closed is in a list taken after it closed.
    window_left = create_window_left(ctx, batch)
    candidates = await _candidates(ctx, batch, earliest, latest)
    if not candidates:
        if window_left > 0:
            await _look_again(ctx, batch, window_left, "reconciling: the create may still land")
            return
        # Listed back past the attempt, after its window, and found nothing of its size: it was never made.
        await _not_made(ctx, batch, "reconciled: the provider made no batch")
        bound.info("batch.reconciled_not_made")
        return
    # Only a batch's results prove whose it is, and they come when it ends. Adopting a candidate before then
    # would gain nothing (the jobs' results come no sooner) and, with several creates unanswered at once (a
    # crash, a stop mid-create), could take another batch's: which, left without a candidate, would conclude
    # "never made" and send its jobs twice.
    ours = await _ours_among(ctx, batch, candidates)
    if ours is not None:
        await record_submitted(ctx, batch, ours, adopted=True)
        bound.info("batch.adopted", provider_batch_id=ours.id)
        return
    if all(c.processing_status == "ended" for c in candidates):
        if window_left > 0:
            await _look_again(
                ctx, batch, window_left, "reconciling: none ours yet; the create may still land"
            )
            return
        await _not_made(ctx, batch, "reconciled: no batch made was ours")
        bound.info("batch.reconciled_not_made", not_ours=[c.id for c in candidates])
        return
    wait = _reconcile_interval(ctx)
    await ctx.pool.execute(sql("retry_later"), batch.id, wait, None, ctx.instance_id)
    bound.info("batch.reconcile_waiting", candidates=[c.id for c in candidates], retry_in_s=wait)


def create_window_left(ctx: Context, batch: Batch) -> float:
    """Seconds until the last create surely can no longer make a batch: it was sent at create_attempted_at
    (by the database's clock, as `attempt_age_s` is measured); the SDK gives up on it timeout_s later, and
    whatever the API does with it is done by then; the skew margin covers clocks and lists that lag."""
    window = ctx.settings.anthropic.timeout_s + ctx.settings.daemon.clock_skew_s
    return window - (batch.attempt_age_s or 0.0)


def _reconcile_interval(ctx: Context) -> float:
    return max(ctx.settings.polling.min_interval_s, ctx.settings.daemon.reconcile_grace_s, 1.0)


async def _look_again(ctx: Context, batch: Batch, window_left: float, reason: str) -> None:
    """No batch of ours yet, but the create's window is still open: list again later, and once more just
    after the window closes."""
    wait = min(_reconcile_interval(ctx), window_left + 0.1)
    await ctx.pool.execute(sql("retry_later"), batch.id, wait, None, ctx.instance_id)
    log.info(
        "batch.reconcile_window_open",
        batch_id=str(batch.id),
        window_left_s=round(window_left, 3),
        reason=reason,
    )


async def _not_made(ctx: Context, batch: Batch, reason: str) -> None:
    """The provider surely made nothing: send again, or, when it keeps failing this batch, isolate."""
    last_error = await ctx.pool.fetchval(sql("batch_last_error"), batch.id) or ""
    match = _STATUS.match(last_error)
    if _isolating(ctx, batch, int(match[1]) if match else None):
        rows = await ctx.pool.fetch(sql("batch_payload"), batch.id)
        if rows:
            await _isolate(ctx, batch, rows, last_error)
            return
    await ctx.pool.execute(sql("create_refused"), batch.id, 0.0, reason, ctx.instance_id)


async def _ours_among(ctx: Context, batch: Batch, candidates: list[MessageBatch]) -> MessageBatch | None:
    """The ended candidate whose results name this batch's tag; None while none can say so."""
    for candidate in candidates:
        if candidate.processing_status != "ended":
            continue
        try:
            async with ctx.provider.results(candidate.id) as lines:
                first = await anext(lines, None)
        except anthropic.NotFoundError:
            continue  # its results are gone (deleted, expired): it cannot be proven ours, so it is not
        if (
            first is not None
            and job_id_from(str(json.loads(first).get("custom_id", "")), batch.tag) is not None
        ):
            return candidate
    return None


async def _candidates(ctx: Context, batch: Batch, earliest: datetime, latest: datetime) -> list[MessageBatch]:
    """The provider's batches made in the attempt's window with this batch's request count, not yet
    claimed by any local batch and not already proven foreign."""
    found: list[MessageBatch] = []
    after: str | None = None
    while True:
        page, more = await ctx.provider.list_page(after)
        found.extend(
            remote
            for remote in page
            if earliest <= _utc(remote.created_at) <= latest and _total(remote) == batch.request_count
        )
        if not more or not page or _utc(page[-1].created_at) < earliest:
            break
        after = page[-1].id
    if not found:
        return []
    known = {
        row["provider_batch_id"]
        for row in await ctx.pool.fetch(sql("known_provider_ids"), [f.id for f in found])
    }
    rejected = set(batch.rejected_provider_ids)
    return [f for f in found if f.id not in known and f.id not in rejected]


def _total(remote: MessageBatch) -> int:
    counts = remote.request_counts
    return counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
