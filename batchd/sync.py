"""The sync sender: jobs that must not wait for a batch, sent through the synchronous Messages API.

Each time it looks (woken with the flusher by producers' INSERTs, when a batch closes, and on a timer that
comes due when the next `auto` deadline comes within reach) it

1. takes back jobs whose sender's lease ran out (a daemon killed mid-call): they are queued again, still
   routed sync, and sent again — a call whose response was lost may be billed twice, since the Messages
   API takes no idempotency key — and each time counts as an attempt, so a job whose call kills its daemon
   every time fails at `[batching] max_attempts`;
2. routes: queued `sync` jobs, and `auto` jobs whose deadline the batch path cannot meet (the time until
   they would be flushed + the batch p90 + the margin, queries.sql route_sync), get path 'sync' and the
   reason. Decided while they wait, so an `auto` job whose deadline approaches (the batches grew slower,
   the flusher is held back) goes sync before it is too late. The flusher never claims them
   (batchd.batch_bound), and both lock with SKIP LOCKED, so a job goes one way only;
3. claims up to `[routing] concurrency` of them (minus the calls in flight), renders them as the batch path
   does (templates.prepare: a job that can never be sent fails at once), and commits them `sending` under
   this process's lease before any call;
4. calls the API, one task per job, and applies the outcome with the statement that applies batch results
   (results.apply_rows): the result, the cost ledger at the full price (`via` 'sync'), the tallies (totals
   and budgets), and events. A refusal for a passing reason (429, 5xx, 529, 408, 409, a 403, a lost
   connection) queues the job again with attempts + 1 and a backoff (the API's retry-after when it gives
   one), until `[batching] max_attempts`; a refusal of the request itself (400, 404, 413, 422) fails it with
   the API's message. A 401 is the key's fault, not the job's: the job goes back to the queue as it was,
   and nothing is claimed until the key works again (health.py).

On SIGTERM it stops claiming, lets the calls in flight finish for a few seconds, cancels the rest and hands
their jobs back to the queue at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import UUID

import anthropic
import asyncpg
import structlog

from . import budgets, store
from .aio import run_loop
from .config import API_MAX_BYTES
from .context import Context
from .provider import api_message, call_status, retry_after
from .results import apply_rows, plain_counts, row_fault, set_aside
from .store import DB_ERRORS, sql
from .templates import BODY_OVERHEAD, Prepared, prepare

log = structlog.get_logger("batchd.sync")

# The columns a sync outcome fills in the results table apply_results reads (see queries.sql).
SYNC_COLUMNS = ["job_id", "outcome", "result", "error", "retry_in_s"]
# Routing decisions made per statement: bounded, so a producer's 100,000 `sync` jobs are routed in steps.
ROUTE_CHUNK = 1_000
# Statuses that say the request itself is wrong: sending it again would get the same answer.
REQUEST_REFUSED = frozenset({400, 404, 413, 422})
MAX_BACKOFF_S = 300.0
# The key itself refused: the job is handed back untouched. A 403 stays a passing refusal that counts (a
# permission the key lacks for this request: a model, say), and is not retried for MAX_BACKOFF_S.
KEY_REFUSED_STATUS = 401
MIN_LOOK_S = 0.05
APPLY_ATTEMPTS = 5  # an outcome not recorded is a call paid for and made again: try hard to record it
SyncRow = tuple[UUID, str, str | None, str | None, float | None]


class SyncSender:
    def __init__(self, ctx: Context, budget_clock: Callable[[], datetime | None] = lambda: None) -> None:
        self.ctx = ctx
        # The clock budgets are checked at (None: the database's now()); the daemon shares the flusher's, so
        # that both paths judge a tenant's budget alike (tests move it to another day).
        self.budget_clock = budget_clock
        self.routing = store.Routing.from_settings(ctx.settings.routing)
        self.calls: dict[UUID, asyncio.Task[None]] = {}
        self.sent = 0  # calls answered (or refused) by the API, for tests and status
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        await run_loop(
            "sync",
            self._look,
            stopping=self.ctx.stopping,
            wake=self._wake,
            idle_s=self._idle_s,
            backoff=self.ctx.backoff,
            errors=DB_ERRORS,
        )

    def _idle_s(self) -> float:
        """Looks every sweep_interval_s, and while calls in flight hold leases (renewed at each look) at
        least three times a lease."""
        settings = self.ctx.settings
        if self.calls:
            return min(settings.daemon.sweep_interval_s, settings.routing.lease_s / 3)
        return settings.daemon.sweep_interval_s

    async def _look(self) -> float | None:
        delay = await self.step()
        # A floor, so that a deadline already due (a job another daemon holds) is not spun on.
        return None if delay is None else max(delay, MIN_LOOK_S)

    async def step(self) -> float | None:
        """Take back, route, claim and start what is due. Returns seconds until something more is due by
        the clock (None: only a wake-up can bring more)."""
        ctx = self.ctx
        pool = ctx.pool
        lease_s = ctx.settings.routing.lease_s
        expired = await pool.fetch(sql("requeue_expired_sync"), ctx.settings.batching.max_attempts)
        for row in expired:
            log.warning(
                "sync.lease_expired", job_id=str(row["id"]), status=row["status"], attempts=row["attempts"]
            )
        if any(row["status"] == "failed" for row in expired):
            await pool.execute(sql("notify_events"))
        if self.calls:
            await pool.execute(sql("renew_sync_leases"), ctx.instance_id, lease_s)
        await self._route()
        free = ctx.settings.routing.concurrency - len(self.calls)
        # Nothing is claimed while the API refuses the key or does not answer (health.py): the change back
        # to ok wakes the sender.
        if free > 0 and ctx.provider.health.usable:
            # Budgets are checked as the flusher checks them before each flush: a tenant over budget is
            # held (claim_sync leaves its jobs queued) or its jobs failed, whichever path they take.
            await budgets.check(pool, self.budget_clock())
            await self._claim(free)
        delay: float | None = await pool.fetchval(sql("sync_next_wake"), *self.routing.params())
        return delay

    async def _route(self) -> None:
        batching = self.ctx.settings.batching
        while True:
            rows = await self.ctx.pool.fetch(
                sql("route_sync"), ROUTE_CHUNK, *self.routing.params(), batching.max_wait_s
            )
            for row in rows:
                log.info(
                    "job.routed",
                    job_id=str(row["id"]),
                    tenant=row["tenant_id"],
                    path="sync",
                    reason=row["path_reason"],
                )
            if len(rows) < ROUTE_CHUNK:
                return

    async def _claim(self, limit: int) -> None:
        """Claim, render and commit up to `limit` jobs as `sending` under this process's lease; then call."""
        ctx = self.ctx
        settings = ctx.settings
        # The batch path's bound on one request, so that a job renders, or fails, the same either way.
        max_request = min(settings.batching.max_bytes, API_MAX_BYTES) - BODY_OVERHEAD
        async with ctx.pool.acquire() as connection, connection.transaction():
            claimed = [
                store.ClaimedJob(**dict(row)) for row in await connection.fetch(sql("claim_sync"), limit)
            ]
            if not claimed:
                return
            chosen: list[Prepared] = []
            failed: list[tuple[UUID, str]] = []
            for job in claimed:
                prepared = prepare(job, settings.job_types, max_request)
                if isinstance(prepared, str):
                    failed.append((job.id, prepared))
                else:
                    chosen.append(prepared)
            if failed:
                await connection.execute(sql("fail_jobs"), [i for i, _ in failed], [m for _, m in failed])
            if chosen:
                await connection.execute(
                    sql("start_sync"),
                    ctx.instance_id,
                    settings.routing.lease_s,
                    [p.job_id for p in chosen],
                    [p.params if p.rendered else None for p in chosen],
                )
            await connection.execute(sql("notify_events"))
        for job_id, reason in failed:
            log.info("job.failed", job_id=str(job_id), path="sync", reason=reason)
        attempts = {job.id: job.attempts for job in claimed}
        for prepared in chosen:
            # The lease is committed: from here a crash leaves the job `sending`, taken back after the lease.
            task = asyncio.create_task(
                self._send(prepared, attempts[prepared.job_id]), name=f"sync-{prepared.job_id}"
            )
            self.calls[prepared.job_id] = task
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.calls = {job_id: call for job_id, call in self.calls.items() if call is not task}
        self._wake.set()  # a slot is free
        if not task.cancelled() and task.exception() is not None:
            # Not recorded: the job stays `sending` and is taken back after its lease (and sent again).
            log.error("sync.call_crashed", task=task.get_name(), error=repr(task.exception()))

    async def _send(self, prepared: Prepared, attempts: int) -> None:
        bound = log.bind(job_id=str(prepared.job_id))
        started = time.monotonic()
        row: SyncRow
        try:
            message = await self.ctx.provider.create_message(json.loads(prepared.params))
        except anthropic.APIStatusError as error:
            if error.status_code == KEY_REFUSED_STATUS:
                self.sent += 1
                await self._hand_back(prepared.job_id, error)
                return
            row = self._refused(prepared.job_id, error, attempts)
        except anthropic.APIConnectionError as error:  # APITimeoutError too
            # Unanswered: the API may have done the work, and will be asked again (no idempotency key).
            row = (prepared.job_id, "retry", None, _error(call_status(error), str(error)), _backoff(attempts))
        except anthropic.APIResponseValidationError as error:
            # Answered 200 with something the SDK cannot read as a Message: try again, it costs a retry.
            row = (prepared.job_id, "retry", None, _error("invalid_response", str(error)), _backoff(attempts))
        else:
            row = (prepared.job_id, "succeeded", message, None, None)
        self.sent += 1
        seconds = round(time.monotonic() - started, 3)
        changed = await self._apply(row)
        outcome, reason, retry_in_s = row[1], row[3], row[4]
        if not changed:
            # Its lease ran out meanwhile and another sender took it back: that one's outcome stands.
            bound.warning("sync.outcome_dropped", outcome=outcome, seconds=seconds)
        elif outcome == "succeeded":
            bound.info("sync.sent", seconds=seconds)
        elif outcome == "failed" or attempts + 1 >= self.ctx.settings.batching.max_attempts:
            bound.warning("job.failed", path="sync", reason=reason, seconds=seconds)
        else:
            bound.warning("sync.retrying", error=reason, retry_in_s=retry_in_s, attempts=attempts + 1)

    async def _hand_back(self, job_id: UUID, error: anthropic.APIStatusError) -> None:
        """A 401: the key, not the job. The job is queued again as it was, no attempt counted; the API is
        marked refused (provider.py), so nothing is claimed until a check passes again. Left `sending` if the
        database cannot be reached: taken back after its lease, like any."""
        try:
            await self.ctx.pool.execute(sql("release_sync_job"), job_id, self.ctx.instance_id)
        except DB_ERRORS as failure:
            log.warning("sync.release_failed", error=str(failure))
            return
        log.info("sync.handed_back", job_id=str(job_id), reason=f"{error.status_code}: {api_message(error)}")

    def _refused(self, job_id: UUID, error: anthropic.APIStatusError, attempts: int) -> SyncRow:
        kind, message = _provider_error(error)
        if error.status_code in REQUEST_REFUSED:
            return (job_id, "failed", None, _error(kind, f"{error.status_code}: {message}"), None)
        delay = retry_after(error)
        if delay is None:
            delay = MAX_BACKOFF_S if error.status_code in (401, 403) else _backoff(attempts)
        return (job_id, "retry", None, _error(kind, f"{error.status_code}: {message}"), delay)

    async def _apply(self, row: SyncRow) -> int:
        """Records the outcome, trying again through a database outage; 0 when the job was no longer ours.
        A job whose own row cannot be written (results.row_fault) is set aside: failed with the database's
        reason, not left to be taken back and sent again until max_attempts."""
        ctx = self.ctx
        zeroed = False
        for attempt in range(APPLY_ATTEMPTS):
            try:
                return await apply_rows(ctx, [row], SYNC_COLUMNS, batch_id=None, owner=ctx.instance_id)
            except asyncpg.PostgresError as error:
                if isinstance(error, asyncpg.DataError) and not zeroed:
                    # A usage with odd counts (the ledger casts them plainly): zeroed, as results.py does.
                    zeroed = True
                    message = json.loads(row[2] or "null")
                    plain_counts(message)
                    row = (row[0], row[1], json.dumps(message), row[3], row[4])
                    continue
                if row_fault(error):
                    return await set_aside(ctx, row[0], error, batch_id=None)
                log.warning("sync.apply_failed", job_id=str(row[0]), error=str(error), attempt=attempt + 1)
                if await ctx.sleep(1.0):
                    break
            except DB_ERRORS as error:
                log.warning("sync.apply_failed", job_id=str(row[0]), error=str(error), attempt=attempt + 1)
                if await ctx.sleep(1.0):
                    break
        # Left `sending`: taken back after the lease and sent again.
        return 0

    async def stop(self, drain_s: float) -> None:
        """Let the calls in flight finish for up to `drain_s`, cancel the rest and hand their jobs back."""
        if self.calls:
            log.info("sync.draining", calls=len(self.calls), drain_s=drain_s)
            _, pending = await asyncio.wait(set(self.calls.values()), timeout=drain_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            released = await self.ctx.pool.fetch(sql("release_sync"), self.ctx.instance_id)
        except DB_ERRORS as error:
            log.warning("sync.release_failed", error=str(error))  # their leases run out instead
        else:
            if released:
                log.info("sync.released", jobs=len(released))


def _backoff(attempts: int) -> float:
    return min(MAX_BACKOFF_S, 2.0 ** min(attempts, 8))


def _provider_error(error: anthropic.APIStatusError) -> tuple[str, str]:
    """The API's error type and message, from its envelope when it sent one."""
    body: Any = error.body
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict):
            return str(inner.get("type", "api_error")), str(inner.get("message", error.message))
    return "api_error", str(error.message)


def _error(kind: str, message: str) -> str:
    return json.dumps({"type": kind, "message": message})
