"""The supervisor: one task per open batch, driving it from wherever it stands to the end.

    pending (not attempted) --submit--> pending (made: its provider id) --its jobs--> in_progress
    in_progress --poll--> ended --apply results--> applied
    pending (attempted: maybe made) --reconcile--> in_progress (adopted) | pending (send again)
    pending with no jobs left --> abandoned

Which batches this process drives is decided by leases in the database: it takes those it owns, and those
whose owner's lease ran out (a daemon that died), and renews its leases while it lives; each renewal is also
the daemon's heartbeat in batchd.instances (instances.py). Every step starts from what the database says,
so a task can be cancelled at any await and started again anywhere. A step that would call the API waits
while the API is not usable (health.py: the key refused, the API unreachable), its batch left as it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from uuid import UUID

import anthropic
import structlog

from . import instances, store
from .aio import run_loop
from .context import Context
from .poller import poll_until_ended
from .provider import CONNECTION_ERRORS
from .results import NotOurBatch, apply_results
from .statuses import FINAL_BATCH_STATUSES
from .store import DB_ERRORS, sql
from .submitter import reconcile, record_jobs_submitted, submit

log = structlog.get_logger("batchd.supervisor")

STEP_ERRORS = (*DB_ERRORS, anthropic.APIStatusError, *CONNECTION_ERRORS)


class Supervisor:
    def __init__(self, ctx: Context, on_batch_closed: Callable[[], None] | None = None) -> None:
        self.ctx = ctx
        self.on_batch_closed: Callable[[], None] = on_batch_closed or (lambda: None)
        self.workers: dict[UUID, asyncio.Task[None]] = {}
        self._bodies: dict[UUID, bytes] = {}
        self._wake = asyncio.Event()

    def start(self, batch_id: UUID, body: bytes | None = None) -> None:
        """Drive this batch now (the flusher just made it: its body is at hand, no need to rebuild it)."""
        if body is not None:
            self._bodies[batch_id] = body
        if batch_id not in self.workers:
            self.workers[batch_id] = asyncio.create_task(self._drive(batch_id), name=f"batch-{batch_id}")

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Take and renew leases, three times a lease; start a task for every batch this process holds."""
        await run_loop(
            "supervisor",
            self._take_leases,
            stopping=self.ctx.stopping,
            wake=self._wake,
            idle_s=self.ctx.settings.daemon.lease_s / 3,
            backoff=self.ctx.backoff,
            errors=DB_ERRORS,
        )

    async def _take_leases(self) -> None:
        rows = await self.ctx.pool.fetch(
            sql("take_batches"), self.ctx.instance_id, self.ctx.settings.daemon.lease_s
        )
        for row in rows:
            if row["id"] not in self.workers:
                # At start, when a dead daemon's lease ran out, or when a batch's task ended early.
                log.info("batch.leased", batch_id=str(row["id"]), status=row["status"])
            self.start(row["id"])
        await instances.heartbeat(self.ctx)

    async def stop(self) -> None:
        """Cancel every batch task (each is safe to stop at any await) and hand the leases back."""
        for task in self.workers.values():
            task.cancel()
        await asyncio.gather(*self.workers.values(), return_exceptions=True)
        try:
            status = await self.ctx.pool.execute(sql("release_batches"), self.ctx.instance_id)
        except DB_ERRORS as error:
            log.warning("supervisor.release_failed", error=str(error))
        else:
            log.info("supervisor.leases_released", batches=int(status.split()[-1]))  # "UPDATE n"

    async def _drive(self, batch_id: UUID) -> None:
        failures = 0  # steps failed in a row: a step that keeps failing is tried less and less often
        try:
            while not self.ctx.stopping.is_set():
                try:
                    if not await self._step(batch_id):
                        return
                except STEP_ERRORS as error:
                    failures += 1
                    wait = self.ctx.backoff.wait_s(failures)
                    log.warning(
                        "batch.step_failed",
                        batch_id=str(batch_id),
                        error=str(error),
                        failures=failures,
                        retry_in_s=round(wait, 3),
                    )
                    if await self.ctx.sleep(wait):
                        return
                else:
                    failures = 0
        finally:
            self.workers.pop(batch_id, None)
            self._bodies.pop(batch_id, None)
            self.on_batch_closed()

    async def _step(self, batch_id: UUID) -> bool:
        """One step of the batch's life; False when there is nothing more for this process to do."""
        ctx = self.ctx
        batch = await store.get_batch(ctx.pool, batch_id)
        if batch is None or batch.status in FINAL_BATCH_STATUSES or batch.owner != ctx.instance_id:
            return False
        if batch.status == "pending" and batch.provider_batch_id is not None:
            # The create was answered and its id recorded, not yet its jobs (a daemon stopped in between).
            await record_jobs_submitted(ctx, batch, batch.provider_batch_id, adopted=False)
            return True
        if not ctx.provider.health.usable:
            # Every step below calls the API. Looked at again when the API is ok, and every lease meanwhile.
            await ctx.provider.health.wait_usable(ctx.stopping, ctx.settings.daemon.lease_s)
            return not ctx.stopping.is_set()
        if batch.wait_s > 0 and batch.status == "pending":
            return not await ctx.sleep(batch.wait_s)
        if batch.status == "pending":
            if batch.create_attempted_at is None:
                await submit(ctx, batch, self._bodies.pop(batch_id, None))
                # A 413 may have split off a new pending batch: take it now, not at the next lease renewal.
                self.wake()
            else:
                await reconcile(ctx, batch)
        elif batch.status == "in_progress":
            return await poll_until_ended(ctx, batch)
        elif batch.status == "ended":
            try:
                await apply_results(ctx, batch)
            except NotOurBatch as verdict:
                log.error("batch.not_ours", batch_id=str(batch_id), reason=str(verdict))  # noqa: TRY400
                await ctx.pool.execute(sql("disown_batch"), batch_id, str(verdict), ctx.instance_id)
        return True
