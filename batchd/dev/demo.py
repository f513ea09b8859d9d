"""`batchd demo`: everything at once on one machine — the emulator, the daemon, and a producer.

It finds PostgreSQL (the configured server, or an embedded one it starts in a data directory it names),
makes a database of its own there, starts the emulator and the daemon, and plays a producer inserting
summarize and classify jobs for three tenants — one of them wrong on purpose. It shows the jobs moving
through their states, a few results, and what it all cost in tokens, then stops what it started.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg

from batchd import migrate
from batchd.client import messages
from batchd.config import Settings
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig, serve
from batchd.redact import redact_url
from batchd.statuses import FINAL_JOB_STATUSES
from batchd.store import init_connection, sql

from . import embedded_pg

TENANTS = ("acme", "globex", "initech")
DOCUMENTS = [
    "The lighthouse keeper logged every ship that passed in the night, and the log outlived him.",
    "Bees tell each other where the flowers are with a dance whose angle points at the sun.",
    "The town council voted to turn the old railway line into a cycle path along the river.",
    "A bakery in the harbour sells bread made with seawater instead of salt.",
]
MESSAGES = [
    "Why is my invoice late again?",
    "Your support team fixed my problem in five minutes, thank you!",
    "Can I change the delivery address of an order?",
]
CATEGORIES = ["complaint", "praise", "question"]
SHOWN_EVENTS = ["job.succeeded", "job.failed", "batch.submitted"]
SHOWN_RESULTS = 6
Say = Callable[[str], None]


@asynccontextmanager
async def demo_database(server_url: str, say: Say, *, keep: bool) -> AsyncIterator[str]:
    """A database of the demo's own on the configured server, or on an embedded one when none answers."""
    if not await embedded_pg.reachable(server_url):
        data_dir = embedded_pg.DEFAULT_DATA_DIR.resolve()
        nobody = redact_url(server_url)
        say(f"No PostgreSQL answers at {nobody}: starting an embedded one in {data_dir}")
        server_url = await embedded_pg.ensure_database(server_url, data_dir)
        say(
            f"Embedded PostgreSQL: {redact_url(server_url)} (it keeps running; stop it with "
            f"`python -m batchd.dev.embedded_pg stop --data-dir {data_dir}`)"
        )
    name = f"batchd_demo_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(sql("create_database").format(database=f'"{name}"'))
    finally:
        await admin.close()
    base, _, _ = server_url.rpartition("/")
    url = f"{base}/{name}"
    say(f"Demo database: {redact_url(url)}")
    try:
        yield url
    finally:
        if keep:
            say(f"Kept the demo database: {redact_url(url)}")
        else:
            admin = await asyncpg.connect(server_url)
            try:
                await admin.execute(sql("drop_database").format(database=f'"{name}"'))
            finally:
                await admin.close()


def demo_settings(base: Settings, database_url: str, emulator_url: str) -> Settings:
    """The configured settings (job types included) with the demo's own database, emulator and pace.
    Copied, not rebuilt: the environment's overrides must not point the daemon elsewhere."""
    return base.model_copy(
        update={
            "database": base.database.model_copy(update={"url": database_url}),
            "anthropic": base.anthropic.model_copy(
                update={"base_url": emulator_url, "requests_per_minute": 600}
            ),
            "batching": base.batching.model_copy(update={"max_requests": 25, "max_wait_s": 2.0}),
            "polling": base.polling.model_copy(update={"min_interval_s": 0.5, "max_interval_s": 2.0}),
            "http": base.http.model_copy(update={"host": "127.0.0.1", "port": 0}),
        }
    )


async def produce(connection: asyncpg.Connection, say: Say) -> int:
    """What a producer does: plain INSERTs. Returns how many jobs it queued."""
    jobs = 0
    for wave in range(3):
        for t, tenant in enumerate(TENANTS):
            for i, document in enumerate(DOCUMENTS):
                await connection.execute(
                    sql("demo_insert_job"),
                    tenant,
                    "summarize",
                    {"document_text": document, "max_length": 25 + 5 * i},
                    {"user_id": f"{tenant}-user-{wave}{i}"},
                )
                jobs += 1
            for message in MESSAGES[t:] + MESSAGES[:t]:
                await connection.execute(
                    sql("demo_insert_job"),
                    tenant,
                    "classify",
                    {"text": message, "categories": CATEGORIES},
                    None,
                )
                jobs += 1
        say(f"  producer: wave {wave + 1} queued ({jobs} jobs so far)")
        await asyncio.sleep(1.0)
    # One mistake on purpose: a classify job without its categories fails at once, with the reason.
    await connection.execute(
        sql("demo_insert_job"), "globex", "classify", {"text": "This one forgot its categories."}, None
    )
    return jobs + 1


async def progress(connection: asyncpg.Connection) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for row in await connection.fetch(sql("status_by_tenant")):
        table.setdefault(row["tenant_id"], {})[row["status"]] = row["jobs"]
    return table


def progress_line(table: dict[str, dict[str, int]]) -> str:
    parts = []
    for tenant in TENANTS:
        counts = table.get(tenant, {})
        in_flight = sum(jobs for status, jobs in counts.items() if status not in FINAL_JOB_STATUSES)
        done, failed = counts.get("succeeded", 0), counts.get("failed", 0)
        parts.append(f"{tenant}: {in_flight} waiting, {done} done, {failed} failed")
    return "  " + " | ".join(parts)


async def run_demo(base: Settings, say: Say = print, *, keep: bool = False, timeout_s: float = 120.0) -> int:
    """Returns 0 when every job reached the state it should, 1 otherwise."""
    started = time.monotonic()
    async with demo_database(base.database.url, say, keep=keep) as url:
        connection = await asyncpg.connect(url)
        await init_connection(connection)
        try:
            applied = await migrate.migrate(connection)
            say(f"Schema installed ({', '.join(f'{m.version:04d}_{m.name}' for m in applied)}).")
            emulator_config = EmulatorConfig(port=0, processing_time_s=(2.0, 5.0), seed=7)
            async with serve(emulator_config) as emulator:
                say(f"Emulator of the Message Batches API: {emulator.url} (batches take 2-5 s here)")
                # The emulator takes any key; a real one is never needed for the demo.
                admin = secrets.token_urlsafe(24)
                daemon = Daemon(demo_settings(base, url, emulator.url), api_key="demo-key", admin_token=admin)
                async with daemon.running():
                    dashboard = f"{daemon.http_url}/#token={admin}"
                    say(f"Daemon ready. Its dashboard, live while the demo runs: {dashboard}")
                    say("Producing jobs:")
                    total = await produce(connection, say)
                    outcome = await _watch(connection, daemon, admin, total, say, timeout_s=timeout_s)
                stats = emulator.state.stats.summary()
            await _summarise(connection, stats, say)
        finally:
            await connection.close()
    say(f"Demo finished in {time.monotonic() - started:.0f} s.")
    return outcome


async def _watch(
    connection: asyncpg.Connection, daemon: Daemon, admin: str, total: int, say: Say, *, timeout_s: float
) -> int:
    """Narrates the run from the daemon's event stream (as any client would), beside a progress line read
    from the jobs table."""
    assert daemon.http_url is not None  # noqa: S101 - the demo's daemon serves HTTP
    async with aiohttp.ClientSession(
        base_url=daemon.http_url, headers={"Authorization": f"Bearer {admin}"}
    ) as http:
        finished: list[str] = []
        narrator = asyncio.create_task(_narrate(http, say, finished))
        try:
            outcome = await _follow_progress(connection, total, say, timeout_s)
            # The stream trails the table by a moment: let it tell the last of them.
            for _ in range(100):
                if len(finished) >= total or narrator.done():
                    break
                await asyncio.sleep(0.05)
            return outcome
        finally:
            narrator.cancel()
            await asyncio.gather(narrator, return_exceptions=True)


async def _follow_progress(connection: asyncpg.Connection, total: int, say: Say, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        table = await progress(connection)
        line = progress_line(table)
        if line != last:
            say(line)
            last = line
        finished = sum(counts.get("succeeded", 0) + counts.get("failed", 0) for counts in table.values())
        if finished >= total:
            failed = sum(counts.get("failed", 0) for counts in table.values())
            return 0 if failed == 1 else 1  # exactly the one mistake made on purpose
        await asyncio.sleep(0.5)
    say("The demo timed out before every job finished.")
    return 1


async def _narrate(http: aiohttp.ClientSession, say: Say, finished: list[str]) -> None:
    params = {"last_event_id": "0", "types": ",".join(SHOWN_EVENTS)}
    shown = 0
    async with http.get("/v1/events", params=params) as response:
        async for message in messages(response.content.iter_any()):
            if not message.is_event or message.event not in SHOWN_EVENTS:
                continue
            event = json.loads(message.data)
            if event["type"] != "batch.submitted":
                finished.append(event["job_id"])
            if event["type"] == "job.succeeded":
                shown += 1
                if shown > SHOWN_RESULTS:
                    continue  # a few results say enough; the progress line counts the rest
                async with http.get(f"/v1/jobs/{event['job_id']}") as job:
                    event["job"] = await job.json()
            say("  " + _describe(event))


def _describe(event: dict[str, Any]) -> str:
    tenant = event["tenant"]
    if event["type"] == "batch.submitted":
        return f"{tenant}: {event['requests']} requests went out in batch {event['provider_batch_id']}"
    if event["type"] == "job.failed":
        return f"{tenant}: a job failed: {event['error']['message']}"
    job = event["job"]
    text = job["result"]["content"][0]["text"]
    return f"{tenant}: {job['job_type']} done: {text[:90]}{'…' if len(text) > 90 else ''}"


async def _summarise(connection: asyncpg.Connection, stats: dict[str, Any], say: Say) -> None:
    row = await connection.fetchrow(sql("usage_totals"))
    assert row is not None  # noqa: S101 - an aggregate always returns a row
    batches = row["batches"]
    say("")
    say(
        f"{row['succeeded']} jobs succeeded and {row['failed']} failed (on purpose) in {batches} batches;"
        f" {row['input_tokens']} input and {row['output_tokens']} output tokens, all at the batch price."
    )
    twice = json.dumps(stats["duplicate_custom_ids"])
    say(f"The emulator received {stats['requests_received']} requests; sent twice: {twice}.")
