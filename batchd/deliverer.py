"""The deliverer: the events outbox, sent to tenants' webhook endpoints, signed, at least once.

Two loops. The enqueuer follows the published events (seq, which the publisher gives out in commit order)
with a cursor in batchd.webhook_log: under the cursor row's lock it inserts one delivery per matching
endpoint for the events after the cursor and moves the cursor, in one transaction, so a crash rolls both back
and no event is skipped or enqueued twice; the pruner keeps every event the cursor has not passed. It wakes
when events are published (this daemon's publisher, or `batchd_published` from another) and every
`[webhooks] poll_interval_s`.

The dispatcher claims due deliveries (`webhook_claim`: at most `concurrency_per_endpoint` in flight per
endpoint across daemons, `max_in_flight` in this one) with a lease, and sends each in its own task: a slow or
failing endpoint holds only its own slots, never another's. A 2xx answer is success; anything else (a 3xx
too: redirects are not followed), a timeout or a refused address is a failure, tried again after a random
wait up to `retry_base_s * 2^(n-1)` (at most `retry_cap_s`) until `max_attempts`, when the delivery is dead
and, unless another delivery to the endpoint succeeded since, the endpoint is disabled. A daemon killed
mid-request leaves its leases to run out: the delivery is sent again, with the same webhook-id.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

import aiohttp
import asyncpg
import structlog

from . import __version__
from .aio import run_loop
from .context import Context
from .store import DB_ERRORS, Connection, sql
from .targets import GuardedResolver, TargetPolicy, TargetRefused, ip_literal, parse_url
from .webhooks import retry_in_s, sign

log = structlog.get_logger("batchd.deliverer")

RELEASE_TIMEOUT_S = 1.0
ERROR_EXCERPT = 200  # characters of an endpoint's answer kept in the delivery log


async def enqueue(db: Connection, chunk: int) -> int:
    """Enqueues the deliveries of every event published after the cursor, `chunk` events per transaction;
    returns how many deliveries."""
    added = 0
    while True:
        async with db.transaction():
            cursor: int = await db.fetchval(sql("webhook_lock_cursor"))
            row = await db.fetchrow(sql("webhook_enqueue"), cursor, chunk)
        assert row is not None  # noqa: S101 - an aggregate always returns a row
        added += row["deliveries"]
        if row["events"] < chunk:
            return int(added)


class Outcome:
    """One attempt's result: its HTTP status (None without an answer) and why it failed (None: success)."""

    __slots__ = ("error", "status")

    def __init__(self, status: int | None, error: str | None) -> None:
        self.status = status
        self.error = error


class Deliverer:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.settings = ctx.settings.webhooks
        self.policy = TargetPolicy.from_settings(self.settings)
        self._published = asyncio.Event()
        self._slots = asyncio.Event()
        self.in_flight: dict[int, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def wake(self) -> None:
        """Events were published: the enqueuer looks."""
        self._published.set()

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self.policy), use_dns_cache=False, limit=self.settings.max_in_flight
        )
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        try:
            await asyncio.gather(
                run_loop(
                    "webhook-enqueuer",
                    self._enqueue,
                    stopping=self.ctx.stopping,
                    wake=self._published,
                    idle_s=self.settings.poll_interval_s,
                    backoff=self.ctx.backoff,
                    errors=DB_ERRORS,
                ),
                run_loop(
                    "webhook-dispatcher",
                    self._dispatch,
                    stopping=self.ctx.stopping,
                    wake=self._slots,
                    idle_s=self.settings.poll_interval_s,
                    backoff=self.ctx.backoff,
                    errors=DB_ERRORS,
                ),
            )
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Cuts the attempts in flight and hands their deliveries back (due at once, for any daemon); a
        lease not handed back (the database away) runs out instead."""
        tasks = dict(self.in_flight)
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        if tasks:
            try:
                await asyncio.wait_for(
                    self.ctx.pool.execute(sql("webhook_release"), list(tasks), self.ctx.instance_id),
                    timeout=RELEASE_TIMEOUT_S,
                )
            except (*DB_ERRORS, asyncpg.InterfaceError) as error:
                log.warning("webhook.release_failed", error=str(error) or repr(error))
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _enqueue(self) -> None:
        async with self.ctx.pool.acquire() as connection:
            added = await enqueue(connection, self.settings.enqueue_chunk)
        if added:
            self._slots.set()

    async def _dispatch(self) -> None:
        free = self.settings.max_in_flight - len(self.in_flight)
        if free <= 0:
            return
        rows = await self.ctx.pool.fetch(
            sql("webhook_claim"),
            self.ctx.instance_id,
            self.settings.concurrency_per_endpoint,
            free,
            self.settings.lease_s,
        )
        metrics = self.ctx.metrics
        for row in rows:
            metrics.webhooks_in_flight.inc()
            task = asyncio.create_task(self._deliver(dict(row)), name=f"webhook-{row['id']}")
            self.in_flight[row["id"]] = task
            task.add_done_callback(partial(self._done, row["id"]))

    def _done(self, delivery: int, _: asyncio.Task[None]) -> None:
        self.ctx.metrics.webhooks_in_flight.dec()
        self.in_flight.pop(delivery, None)
        self._slots.set()

    async def _deliver(self, row: dict[str, Any]) -> None:
        outcome = await self.attempt(row)
        try:
            await self._record(row, outcome)
        except DB_ERRORS as error:
            # The lease runs out and the delivery is sent again: at least once.
            log.warning("webhook.record_failed", delivery_id=row["id"], error=str(error) or repr(error))

    async def attempt(self, row: dict[str, Any]) -> Outcome:  # noqa: PLR0911 - one return per way it ends
        """One signed POST of the delivery's body to its endpoint."""
        session = self._session
        assert session is not None  # noqa: S101 - run() opened it
        body = row["body"].encode()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": f"batchd/{__version__}",
            "webhook-id": row["message_id"],
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(row["secret"], row["message_id"], timestamp, body),
        }
        settings = self.settings
        timeout = aiohttp.ClientTimeout(total=settings.timeout_s, connect=settings.connect_timeout_s)
        try:
            host = parse_url(row["url"]).hostname or ""
            if ip_literal(host):  # aiohttp connects to an IP literal without asking the resolver
                self.policy.check_address(host)
            async with session.post(
                row["url"], data=body, headers=headers, allow_redirects=False, timeout=timeout
            ) as response:
                answer = await response.content.read(settings.max_response_bytes)
                status = response.status
                location = response.headers.get("location")
        except TargetRefused as error:
            return Outcome(None, f"refused: {error}")
        except aiohttp.ClientConnectorDNSError as error:
            if isinstance(error.os_error, TargetRefused):
                return Outcome(None, f"refused: {error.os_error}")
            return Outcome(None, f"unreachable: {error}")
        except TimeoutError:
            return Outcome(None, f"no answer within {settings.timeout_s:g}s")
        except (aiohttp.ClientError, OSError, ValueError) as error:
            return Outcome(None, f"{type(error).__name__}: {error}")
        if 200 <= status < 300:
            return Outcome(status, None)
        if 300 <= status < 400:
            return Outcome(status, f"a redirect (to {location!r}) is not followed")
        excerpt = answer[:ERROR_EXCERPT].decode("utf-8", "replace").strip()
        return Outcome(status, excerpt or "not a 2xx answer")

    async def _record(self, row: dict[str, Any], outcome: Outcome) -> None:
        owner = self.ctx.instance_id
        counted = self.ctx.metrics.webhook_attempts
        if outcome.error is None:
            counted.labels("delivered").inc()
            await self.ctx.pool.execute(sql("webhook_delivered"), row["id"], owner, outcome.status)
            return
        settings = self.settings
        counted.labels("failed" if row["attempts"] < settings.max_attempts else "dead").inc()
        attempts = row["attempts"]
        retry = (
            None
            if attempts >= settings.max_attempts
            else retry_in_s(attempts, settings.retry_base_s, settings.retry_cap_s)
        )
        reason = f"disabled after {attempts} failed attempts of delivery {row['id']} ({outcome.error})"
        state = await self.ctx.pool.fetchrow(
            sql("webhook_failed"), row["id"], owner, outcome.status, outcome.error, retry, reason
        )
        if state is None:
            return  # the lease ran out meanwhile: another attempt owns the delivery now
        fields = {
            "delivery_id": row["id"],
            "endpoint_id": row["endpoint_id"],
            "webhook_id": row["message_id"],
            "attempts": attempts,
            "status": outcome.status,
            "error": outcome.error,
        }
        if retry is not None:
            log.info("webhook.failed", retry_in_s=round(retry, 3), **fields)
            return
        log.warning("webhook.dead", **fields)
        if state["disabled"]:
            log.warning(
                "webhook.endpoint_disabled", endpoint_id=row["endpoint_id"], failures=state["failures"]
            )
