"""The poller: watches one submitted batch until the provider says it has ended.

The interval starts at `min_interval_s` and grows by half each time, with jitter, up to `max_interval_s`:
most batches end within the hour, and polls spend the per-minute budget every batch call shares.
"""

from __future__ import annotations

import random

import anthropic
import structlog

from .context import Context
from .store import Batch, sql

log = structlog.get_logger("batchd.poller")

GROWTH = 1.5


def next_interval(current: float, low: float, high: float) -> float:
    return min(high, max(low, current * GROWTH))


def jittered(seconds: float) -> float:
    # Spread polls so that batches submitted together are not polled together.
    return seconds * random.uniform(0.8, 1.2)


async def poll_until_ended(ctx: Context, batch: Batch) -> bool:
    """Polls until the batch has ended (recorded as `ended`, True) or the daemon stops (False).

    A batch the provider no longer knows (deleted by someone) is recorded as ended with no results:
    its jobs are then retried like any others that came back without a result.
    """
    polling = ctx.settings.polling
    interval = polling.min_interval_s
    assert batch.provider_batch_id is not None  # noqa: S101 - in_progress batches always have one
    bound = log.bind(batch_id=str(batch.id), provider_batch_id=batch.provider_batch_id)
    while not ctx.stopping.is_set():
        try:
            remote = await ctx.provider.retrieve(batch.provider_batch_id)
        except anthropic.NotFoundError:
            bound.error("batch.vanished")
            # A dict, not JSON text: the pool's jsonb codec encodes it (text would become a JSON string).
            await ctx.pool.execute(sql("batch_ended"), batch.id, {"vanished": True}, None)
            return True
        except (anthropic.APIStatusError, anthropic.APIConnectionError) as error:
            bound.warning("batch.poll_failed", error=str(error))
        else:
            counts = remote.request_counts.model_dump()
            if remote.processing_status == "ended":
                lag = await ctx.pool.fetchval(sql("batch_ended"), batch.id, counts, remote.ended_at)
                if lag is not None:  # None: the provider gave no ended_at, or another daemon was first
                    lag = max(0.0, lag)  # the provider's clock may be ahead of the database's
                    ctx.metrics.poll_lag.observe(lag)
                bound.info(
                    "batch.ended", request_counts=counts, poll_lag_s=None if lag is None else round(lag, 3)
                )
                return True
            await ctx.pool.execute(sql("batch_polled"), batch.id, counts, interval)
        if await ctx.sleep(jittered(interval)):
            return False
        interval = next_interval(interval, polling.min_interval_s, polling.max_interval_s)
    return False
