"""The poller: watches one submitted batch until the provider says it has ended.

The interval starts at `min_interval_s` and grows by half each time, with jitter, up to `max_interval_s`:
most batches end within the hour, and polls spend the per-minute budget every batch call shares. A poll
that fails waits at least the failing-step backoff (backoff.py), which grows while failures go on.
"""

from __future__ import annotations

import anthropic
import structlog

from .backoff import jittered
from .context import Context
from .store import Batch, sql

log = structlog.get_logger("batchd.poller")

GROWTH = 1.5
VANISHED = "vanished: the provider no longer has this batch ({call} answered 404)"


def next_interval(current: float, low: float, high: float) -> float:
    return min(high, max(low, current * GROWTH))


async def batch_gone(ctx: Context, batch: Batch, call: str) -> None:
    """The provider's copy is gone before its results were applied (deleted behind batchd's back, results
    expired): the batch ends, marked vanished, and applying it retries its jobs like any without a result."""
    log.error("batch.vanished", batch_id=str(batch.id), provider_batch_id=batch.provider_batch_id, call=call)
    await ctx.pool.execute(sql("batch_gone"), batch.id, ctx.instance_id, VANISHED.format(call=call))


async def poll_until_ended(ctx: Context, batch: Batch) -> bool:
    """Polls until the batch has ended (recorded as `ended`, True), is no longer this process's or the API is
    not usable (True: the supervisor's next step sees it), or the daemon stops (False).

    A batch the provider no longer knows (deleted by someone) is recorded as ended with no results:
    its jobs are then retried like any others that came back without a result.
    """
    polling = ctx.settings.polling
    interval = polling.min_interval_s
    failures = 0
    assert batch.provider_batch_id is not None  # noqa: S101 - in_progress batches always have one
    bound = log.bind(batch_id=str(batch.id), provider_batch_id=batch.provider_batch_id)
    while not ctx.stopping.is_set():
        if not ctx.provider.health.usable:
            return True  # the supervisor's next step waits until the API is ok (health.py)
        wait = jittered(interval)
        try:
            remote = await ctx.provider.retrieve(batch.provider_batch_id)
        except anthropic.NotFoundError:
            await batch_gone(ctx, batch, "retrieve")
            return True
        except (anthropic.APIStatusError, anthropic.APIConnectionError) as error:
            failures += 1
            wait = max(wait, ctx.backoff.wait_s(failures))
            bound.warning("batch.poll_failed", error=str(error), failures=failures, retry_in_s=round(wait, 3))
        else:
            failures = 0
            counts = remote.request_counts.model_dump()
            if remote.processing_status == "ended":
                lag = await ctx.pool.fetchval(
                    sql("batch_ended"), batch.id, counts, remote.ended_at, ctx.instance_id
                )
                if lag is not None:  # None: the provider gave no ended_at, or the batch is not ours any more
                    lag = max(0.0, lag)  # the provider's clock may be ahead of the database's
                    ctx.metrics.poll_lag.observe(lag)
                bound.info(
                    "batch.ended", request_counts=counts, poll_lag_s=None if lag is None else round(lag, 3)
                )
                return True
            status = await ctx.pool.execute(sql("batch_polled"), batch.id, counts, interval, ctx.instance_id)
            if status == "UPDATE 0":
                bound.warning("batch.lease_lost")
                return True  # taken over: the supervisor's next step sees another owner and lets it go
        if await ctx.sleep(wait):
            return False
        interval = next_interval(interval, polling.min_interval_s, polling.max_interval_s)
    return False
