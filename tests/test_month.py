"""A simulated month: three tenants with different traffic shapes go through the daemon and the emulator for
thirty emulated days (each day the emulator's clock moves a day on, so prompt caches written one day have
expired the next), with some requests erroring and expiring on the way. The report's totals at the end are
the jobs' usage priced by hand, and the savings against sending everything synchronously are shown."""

from __future__ import annotations

import functools
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pricing_by_hand import BATCH, cached, sync_price
from support import QUICK, EmulatorHandle, insert_raw, wait_until

from batchd import report
from batchd.emulator import EmulatorConfig
from batchd.emulator.faults import FaultPlan

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
DAYS = 30
DAY_S = 86_400.0
SHARED_CONTEXT = "Our refund policy, in full: " + "Refunds are due within thirty days of purchase. " * 120


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    # One request in ten errors (api_error) or expires: retried, and billed only when it finally succeeds.
    faults = FaultPlan(api_error_rate=0.05, expired_rate=0.05)
    return QUICK.model_copy(update={"faults": faults, "seed": 2026})


def traffic(day: int) -> dict[tuple[str, str], list[str]]:
    """The day's jobs per (tenant, kind): a steady stream, weekly bursts, a cached assistant."""
    jobs = {
        ("steady", "haiku"): [f"day {day}: classify ticket {i}" for i in range(12)],
        ("assistant", "cached"): [f"day {day}: question {i} about refunds" for i in range(6)],
    }
    if day % 7 == 0:
        jobs[("bursty", "sonnet")] = [
            f"day {day}: summarise report {i}: " + "figures " * 150 for i in range(40)
        ]
    return jobs


async def finished(db: Any, count: int) -> bool:
    done = await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE status IN ('succeeded', 'failed')")
    return bool(done >= count)


@pytest.mark.slow
async def test_a_month_of_three_tenants_reports_the_usage_priced_by_hand(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    inserted = 0
    settings = daemon_settings(batching={"max_requests": 200, "max_wait_s": 0.1})
    async with start_daemon(settings):
        for day in range(1, DAYS + 1):
            for (tenant, kind), texts in traffic(day).items():
                if kind == "haiku":
                    await insert_raw(db, tenant, texts, max_tokens=64)
                elif kind == "sonnet":
                    await insert_raw(db, tenant, texts, model="claude-sonnet-4-5")
                else:
                    await insert_raw(
                        db, tenant, texts, model="claude-opus-4-5", system=cached(SHARED_CONTEXT, "1h")
                    )
                inserted += len(texts)
            await wait_until(functools.partial(finished, db, inserted), timeout=60, interval=0.05)
            await emulator.advance(DAY_S)  # the next day: yesterday's prompt cache has expired

    jobs = await db.fetch(
        "SELECT tenant_id, status, attempts, usage, result ->> 'model' AS model FROM batchd.jobs"
    )
    assert len(jobs) == inserted == DAYS * 18 + 4 * 40
    statuses = Counter(job["status"] for job in jobs)
    assert statuses["succeeded"] + statuses["failed"] == inserted
    assert sum(job["attempts"] for job in jobs) > 0, "some requests errored or expired on the way"

    # By hand: every succeeded job's usage at the pricing page's rates; failed attempts cost nothing.
    hand: dict[str, dict[str, Any]] = {}
    for job in jobs:
        if job["status"] != "succeeded":
            continue
        totals = hand.setdefault(job["tenant_id"], {"jobs": 0, "sync": Decimal(0)})
        totals["jobs"] += 1
        totals["sync"] += sync_price(job["model"], job["usage"])
    sync = sum((t["sync"] for t in hand.values()), Decimal(0))

    month = await report.collect(db)
    assert month["totals"]["jobs"] == statuses["succeeded"]
    assert month["totals"]["sync_cost_usd"] == sync
    assert month["totals"]["cost_usd"] == sync * BATCH
    assert month["totals"]["saved_usd"] == sync - sync * BATCH
    for subtotal in month["tenants"]:
        by_hand = hand[subtotal["tenant_id"]]
        assert subtotal["jobs"] == by_hand["jobs"]
        assert subtotal["cost_usd"] == by_hand["sync"] * BATCH, subtotal["tenant_id"]
    assistant = next(row for row in month["rows"] if row["tenant_id"] == "assistant")
    assert assistant["cache_write_1h_tokens"] > 0, "the shared context is written to the cache each day..."
    assert assistant["cache_read_tokens"] > assistant["cache_write_1h_tokens"], "...and read the rest of it"
    table = report.render_table(month)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "month-report.txt").write_text(table + "\n")  # the month's report, to read
    (total,) = [line for line in table.splitlines() if line.startswith("TOTAL")]
    assert f"{sync * BATCH:,.4f}" in total
    assert "50.0%" in total, "at half price, batching saved half of what all-sync would have cost"
