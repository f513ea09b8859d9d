"""The flusher: decides when queued jobs become a batch, and makes it — in the database first.

A batch is flushed when the head of the queue reaches `max_requests` or `max_bytes`, when its oldest job has
waited `max_wait_s`, or when a job's deadline is within `deadline_slack_s`; never past the API's limits nor
past `max_in_flight_requests`. The flush claims jobs with FOR UPDATE SKIP LOCKED under a database-wide
advisory lock, fails at once the jobs that can never be sent, and records the batch and its jobs
(`pending`, `submitting`) in one transaction. Only then does anyone talk to the API (see submitter.py).

Nothing is claimed while the API is not usable (health.py: the key refused, the API unreachable): the
jobs wait in the queue, their attempts untouched. Before each look at the queue it checks tenants' budgets
(budgets.py): the jobs of a tenant over budget are left out of the queue's head and of the claim
(batchd.held_tenants), or failed.

Between flushes it tells producers' trigger when to wake it (see `batchd.wakeup` in the schema): armed when
the queue is empty, else at the job count that would fill a batch. The clock covers the time threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

import structlog

from . import budgets, gcpause, store
from .aio import run_loop
from .config import API_MAX_BYTES
from .context import Context
from .store import DB_ERRORS, sql
from .templates import BODY_OVERHEAD, Prepared, create_body, new_tag, prepare

log = structlog.get_logger("batchd.flusher")


@dataclass(frozen=True)
class Flushed:
    batch_id: UUID | None  # None: the claimed jobs all failed, or none could be claimed
    jobs: int
    failed: int
    capped: bool = False  # max_in_flight_requests is reached: nothing may be claimed until a batch closes


class Flusher:
    def __init__(self, ctx: Context, on_batch: Callable[[UUID, bytes], None]) -> None:
        self.ctx = ctx
        self.on_batch = on_batch
        self._wake = asyncio.Event()
        self.batches_made = 0
        # The clock budgets are checked at: None is the database's now(). Tests move it to another day.
        self.budget_clock: Callable[[], datetime | None] = lambda: None
        # Jobs the sync path should take are never the flusher's (routing: store.Routing, batchd.batch_bound).
        self.routing = store.Routing.from_settings(ctx.settings.routing)
        self._between_looks = False

    def wake(self) -> None:
        self._wake.set()

    @property
    def waiting(self) -> bool:
        """Between two looks at the queue with nothing yet to wake it: only a NOTIFY, a closed batch or the
        clock will make it look again."""
        return self._between_looks and not self._wake.is_set()

    async def run(self) -> None:
        """Looks at the queue when woken, when the next flush comes due, and every `sweep_interval_s`."""
        await run_loop(
            "flusher",
            self._look,
            stopping=self.ctx.stopping,
            wake=self._wake,
            idle_s=self.ctx.settings.daemon.sweep_interval_s,
            backoff=self.ctx.backoff,
            errors=DB_ERRORS,
        )

    async def _look(self) -> float | None:
        self._between_looks = False
        try:
            return await self.flush_due()
        finally:
            self._between_looks = True

    async def flush_due(self) -> float | None:
        """Flush while something is due. Returns seconds until the next flush is due, None when idle."""
        batching = self.ctx.settings.batching
        pool = self.ctx.pool
        while not self.ctx.stopping.is_set():
            if not self.ctx.provider.health.usable:
                # The API refuses the key or does not answer: jobs stay queued, nothing is recorded to send;
                # the change back to ok wakes the flusher (daemon.py).
                return None
            # Tenants over budget are held (or their jobs failed) before the queue is looked at: the claim
            # and queue_head leave held tenants' jobs out; a tenant the budget allows again is released.
            await budgets.check(pool, self.budget_clock())
            # One more than a batch holds: the claim learns whether everything that may go fits in this one.
            head = await store.queue_head(pool, batching.max_requests + 1, self.routing)
            now = head.now
            if head.jobs == 0:
                await self._set_wakeup(armed=True, wake_seq=0)
                # A producer may have inserted between the look and the arming, unheard: look again.
                if (await store.queue_head(pool, 1, self.routing)).jobs == 0:
                    return None
                continue
            due_at = await self._due_at(head.oldest, now)
            full = head.jobs >= batching.max_requests or head.bytes >= batching.max_bytes
            if not full and due_at > now:
                await self._set_wakeup(armed=False, wake_seq=self._wake_seq(head))
                return (due_at - now).total_seconds()
            flushed = await self.flush_one(head)
            if flushed.capped:
                # Woken when one of this daemon's batches closes; the sweep covers other daemons' batches.
                return None
            if flushed.batch_id is None and flushed.failed == 0:
                return 1.0  # another daemon holds these jobs right now
        return None

    async def _set_wakeup(self, *, armed: bool, wake_seq: int) -> None:
        await self.ctx.pool.execute(sql("set_wakeup"), armed, wake_seq)

    async def _due_at(self, oldest: datetime | None, now: datetime) -> datetime:
        batching = self.ctx.settings.batching
        due = (oldest or now) + timedelta(seconds=batching.max_wait_s)
        deadline = await self.ctx.pool.fetchval(sql("earliest_deadline"), *self.routing.params())
        if deadline is not None:
            due = min(due, deadline - timedelta(seconds=batching.deadline_slack_s))
        return due

    def _wake_seq(self, head: store.QueueHead) -> int:
        """The job number at which the queue will hold a full batch, by count or (at the head's average
        size) by bytes: the trigger notifies when a job at or past it arrives."""
        batching = self.ctx.settings.batching
        by_count = batching.max_requests - head.jobs
        average = max(1.0, head.bytes / head.jobs)
        by_bytes = math.ceil((batching.max_bytes - head.bytes) / average)
        return (head.last_seq or 0) + max(1, min(by_count, by_bytes))

    def _prepare(
        self, jobs: list[store.ClaimedJob], max_bytes: int
    ) -> tuple[list[Prepared], list[tuple[UUID, str]], int, bool]:
        """The requests that go, in claim order, up to max_bytes; the jobs that never can, and why; the create
        body's size; and whether max_bytes cut the claim short (the rest stay queued, unlocked at commit, for
        the next batch)."""
        job_types = self.ctx.settings.job_types
        chosen: list[Prepared] = []
        failed: list[tuple[UUID, str]] = []
        size = BODY_OVERHEAD
        for job in jobs:
            prepared = prepare(job, job_types, max_bytes - BODY_OVERHEAD)
            if isinstance(prepared, str):
                failed.append((job.id, prepared))
                continue
            if size + prepared.size > max_bytes:
                return chosen, failed, size, True
            chosen.append(prepared)
            size += prepared.size
        return chosen, failed, size, False

    async def flush_one(self, head: store.QueueHead | None = None) -> Flushed:
        """Claim one batch's worth of jobs and record the batch, in one transaction. `head`, the queue as last
        looked at, tells whether everything that may go would fit: fairness then has nothing to decide and
        the claim takes it all in one pass (without it, the claim finds out)."""
        with contextlib.ExitStack() as paused:
            return await self._flush_one(head, paused)

    async def _flush_one(self, head: store.QueueHead | None, paused: contextlib.ExitStack) -> Flushed:
        settings = self.ctx.settings
        batching = settings.batching
        max_bytes = min(batching.max_bytes, API_MAX_BYTES)
        async with self.ctx.pool.acquire() as connection, connection.transaction():
            await connection.execute(sql("lock_flush"))
            # From here to the batch handed on, its rows are made and held: the collector waits (gcpause.py).
            # Not before: waiting for another daemon's flush, above, it runs as usual.
            paused.enter_context(gcpause.paused())
            in_flight = await connection.fetchval(sql("in_flight_requests"))
            budget = min(batching.max_requests, batching.max_in_flight_requests - in_flight)
            if budget <= 0:
                log.info("flusher.in_flight_cap", in_flight=in_flight, cap=batching.max_in_flight_requests)
                return Flushed(None, 0, 0, capped=True)
            now = await connection.fetchval(sql("db_now"))
            whole = head is None or (head.jobs <= budget and head.bytes < max_bytes)
            while True:
                claim = await store.claim(
                    connection,
                    budget,
                    now + timedelta(seconds=batching.deadline_slack_s),
                    math.ceil(budget * (1 + batching.cache_lookahead)),
                    self.routing,
                    whole=whole,
                )
                chosen, failed, size, cut = self._prepare(claim.jobs, max_bytes)
                if not (cut and claim.whole):
                    break
                # Taken whole, in seq order, but more than max_bytes: which jobs wait for the next batch is
                # fairness's to decide after all. Claimed again (this transaction's locks do not stand in
                # its way), in turn order.
                whole = False
            if failed:
                await connection.execute(sql("fail_jobs"), [i for i, _ in failed], [m for _, m in failed])
                await connection.execute(sql("notify_events"))
                for job_id, reason in failed:
                    log.info("job.failed", job_id=str(job_id), reason=reason)
            if not chosen:
                return Flushed(None, 0, len(failed))
            tag = new_tag()
            batch_id: UUID = await connection.fetchval(
                sql("insert_batch"), tag, len(chosen), size, self.ctx.instance_id, settings.daemon.lease_s
            )
            # Each job records its path and why, as the claim judged it (batchd.route_reason).
            reasons = {job.id: job.path_reason for job in claim.jobs}
            raw = [p.job_id for p in chosen if not p.rendered]
            rendered = [p for p in chosen if p.rendered]
            if raw:
                await connection.execute(
                    sql("assign_raw_jobs"), batch_id, raw, [reasons[job_id] for job_id in raw]
                )
            if rendered:
                await connection.execute(
                    sql("assign_rendered_jobs"),
                    batch_id,
                    [p.job_id for p in rendered],
                    [p.params for p in rendered],
                    [reasons[p.job_id] for p in rendered],
                )
        body = create_body(tag, ((p.job_id, p.params) for p in chosen))
        self.batches_made += 1
        log.info("batch.recorded", batch_id=str(batch_id), jobs=len(chosen), bytes=size, failed=len(failed))
        self.on_batch(batch_id, body)
        return Flushed(batch_id, len(chosen), len(failed))
