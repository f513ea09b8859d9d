"""Three daemons on one database: batches polled by exactly one, a dead owner's batches taken over within the
lease, claims never overlapping, and SSE clients of any instance seeing every event."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sse_support import carried, logged, sse_stream
from support import (
    ADMIN_TOKEN,
    QUICK,
    EmulatorHandle,
    daemon_config,
    daemon_process,
    insert_raw,
    log_tail,
    wait_for_jobs,
    wait_until,
)

from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig

pytestmark = pytest.mark.slow


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK.model_copy(update={"processing_time_s": (0.3, 1.0)})


async def sends_per_job(emulator: EmulatorHandle) -> Counter[str]:
    received = (await emulator.admin("GET", "custom_ids"))["custom_ids"]
    per_job: Counter[str] = Counter()
    for custom_id, times in received.items():
        per_job[custom_id.rsplit("-", 1)[1]] += times
    return per_job


async def test_three_daemons_share_the_work_without_overlap_and_every_instance_streams_every_event(
    db: Any, tokens: dict[str, str], emulator: EmulatorHandle, daemon_settings: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("BATCHD_ADMIN_TOKEN", ADMIN_TOKEN)
    settings = daemon_settings(
        batching={"max_requests": 40, "max_wait_s": 0.1}, events={"poll_interval_s": 1}
    )
    daemons = [Daemon(settings) for _ in range(3)]
    overlaps: list[set[uuid.UUID]] = []
    drivers: Counter[uuid.UUID] = Counter()
    async with AsyncExitStack() as stack, aiohttp.ClientSession() as http:
        for daemon in daemons:
            await stack.enter_async_context(daemon.running())
        streams = [
            await stack.enter_async_context(
                sse_stream(http, daemon.http_url or "", ADMIN_TOKEN, last_event_id=0)
            )
            for daemon in daemons
        ]
        acme = await stack.enter_async_context(sse_stream(http, daemons[2].http_url or "", tokens["acme"]))
        watching = asyncio.Event()

        async def watch_owners() -> None:
            # Sampled all along: a batch driven by two daemons at once would show up here.
            while not watching.is_set():
                held = [set(d.supervisor.workers) if d.supervisor else set() for d in daemons]
                for batch_id in set().union(*held):
                    owners = sum(batch_id in h for h in held)
                    drivers[batch_id] = max(drivers[batch_id], owners)
                    if owners > 1:
                        overlaps.append({batch_id})
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch_owners())
        ids = []
        for n in range(10):
            ids += await insert_raw(db, "acme", [f"acme {n}.{i}" for i in range(40)])
            ids += await insert_raw(db, "globex", [f"globex {n}.{i}" for i in range(20)])
        await wait_for_jobs(db, done=len(ids), timeout=90)
        watching.set()
        await watcher
        everything = await logged(db)
        for stream in streams:
            await stream.until(lambda c: c.last_id == everything[-1][0], timeout=30)
        acme_log = await logged(db, "acme")
        await acme.until(lambda c: c.last_id == acme_log[-1][0], timeout=30)

    assert not overlaps, f"batches driven by two daemons at once: {overlaps[:3]}"
    assert len(drivers) == await db.fetchval("SELECT count(*) FROM batchd.batches"), "every batch was driven"
    owners = {row["owner"] for row in await db.fetch("SELECT DISTINCT owner FROM batchd.batches")}
    assert len(owners) >= 2, "the work was shared"
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE status = 'succeeded'") == len(ids)
    assert await sends_per_job(emulator) == {uuid.UUID(str(i)).hex: 1 for i in ids}, "each job sent once"
    assert (await emulator.stats())["duplicate_custom_ids"] == {}
    # Every stream, on whichever instance, carried the whole log once, in order.
    for stream in streams:
        assert carried(stream) == everything
    assert carried(acme) == acme_log


async def test_a_dead_owners_batches_are_taken_over_within_the_lease(
    db: Any, emulator: EmulatorHandle, database_url: str, tmp_path: Path
) -> None:
    lease_s = 2.0
    await emulator.admin("PATCH", "settings", {"processing_time_s": [3.0, 4.0]})
    config = daemon_config(tmp_path / "batchd.toml", database_url, emulator.url, daemon={"lease_s": lease_s})
    ids = await insert_raw(db, "acme", [f"question {i}" for i in range(400)])
    async with AsyncExitStack() as stack:
        processes = [
            await stack.enter_async_context(daemon_process(config, tmp_path / f"daemon{n}.log"))
            for n in range(3)
        ]

        async def all_in_flight() -> bool:
            return bool(
                await db.fetchval(
                    "SELECT count(*) = 0 FROM batchd.jobs WHERE status IN ('queued', 'submitting')"
                )
            )

        await wait_until(all_in_flight, timeout=30)
        # All three must be there to take over (two daemons that stopped at start once left none to do it).
        for n, process in enumerate(processes):
            assert process.returncode is None, f"daemon {n} stopped: {log_tail(tmp_path / f'daemon{n}.log')}"
        owners = Counter(
            row["owner"]
            for row in await db.fetch("SELECT owner FROM batchd.batches WHERE status = 'in_progress'")
        )
        victim_owner, orphaned = owners.most_common(1)[0]
        # Which process is it? Each logs its instance id when ready.
        victim = next(
            process
            for n, process in enumerate(processes)
            if victim_owner in (tmp_path / f"daemon{n}.log").read_text()
        )
        victim.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(victim.wait(), timeout=10) == -signal.SIGKILL
        killed_at = time.monotonic()

        async def taken_over() -> bool:
            left: int = await db.fetchval(
                "SELECT count(*) FROM batchd.batches WHERE owner = $1 AND status <> 'applied'", victim_owner
            )
            return left == 0

        try:
            await wait_until(taken_over, timeout=30)
        except AssertionError as error:
            rows = await db.fetch("SELECT id, status, owner, lease_until, now() AS now FROM batchd.batches")
            error.add_note("the batches: " + "\n".join(str(dict(row)) for row in rows))
            raise
        takeover_s = time.monotonic() - killed_at
        await wait_for_jobs(db, done=400, timeout=90)
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    assert orphaned >= 1
    # The lease runs out at most lease_s after the kill (it was renewed before), and a survivor's supervisor
    # looks every lease_s / 3; three seconds more for the survivor's own steps on a loaded machine (the
    # suite runs three tests at a time on two cores). Without the takeover it would be never.
    assert takeover_s <= lease_s + lease_s / 3 + 3.0, f"taken over after {takeover_s:.1f} s"
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE status = 'succeeded'") == 400
    assert await sends_per_job(emulator) == {uuid.UUID(str(i)).hex: 1 for i in ids}
