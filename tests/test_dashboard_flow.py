"""The dashboard's queue and turnaround charts over the chosen window (GET /v1/series' `flow`), in a headless
Chromium against a real daemon that samples its queue: a known history written by SQL ten minutes ago and
the daemon's own samples of the queue now, each principal its own numbers (the admin every tenant's), and
the queue's chart moving with the page's snapshots. Screenshots at 1280 and 390 px in test-artifacts/."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from browser import WINDOW_SIZE as WINDOW
from support import ADMIN_TOKEN, APPLIED_BATCHES, insert_aged
from test_dashboard import ARTIFACTS, CHART, CONNECTION, NARROW, assert_fits, chart_bars, dashboard
from test_flow import FLOW_ROW, TURNAROUND

from batchd import flow
from batchd.daemon import Daemon

pytestmark = pytest.mark.slow

SIXTY, TEN_MINUTES, HOUR = flow.bucket_of(60), flow.bucket_of(600), flow.bucket_of(3600)
# Per principal, the interval ten minutes ago: average and most queued, longest wait, jobs batches finished
# and their p50 and p90 buckets.
WANT = {
    "acme": (4, 5, 600, 10, SIXTY, SIXTY),
    "globex": (3, 4, 900, 10, HOUR, HOUR),
    None: (7, 8, 900, 20, TEN_MINUTES, HOUR),
}
# The queue now, as the daemon samples it: per principal, jobs queued (and the oldest's age, at least).
NOW = {"acme": (3, 120), None: (5, 300)}


async def known_history(db: Any) -> datetime:
    """Ten minutes ago: two samples (routing p90 100 then 200 s), acme 5 then 3 queued, globex 2 then 4;
    acme's batch jobs 9 in a minute and 1 in ten, globex's 10 in an hour. Returns that minute."""
    ago: datetime = await db.fetchval("SELECT now() - interval '10 minutes'")
    await db.execute(FLOW_ROW, "minute", ago, "", 2, 14, 8, 900.0, 300.0)
    await db.execute(FLOW_ROW, "minute", ago, "acme", 2, 8, 5, 600.0, 0.0)
    await db.execute(FLOW_ROW, "minute", ago, "globex", 2, 6, 4, 900.0, 0.0)
    await db.execute(TURNAROUND, ago, "acme", SIXTY, 9)
    await db.execute(TURNAROUND, ago, "acme", TEN_MINUTES, 1)
    await db.execute(TURNAROUND, ago, "globex", HOUR, 10)
    return ago.replace(second=0, microsecond=0)


async def bar(browser: Any, test_id: str, start: datetime) -> dict[str, Any]:
    bars = await browser.evaluate(chart_bars(test_id))
    (found,) = [entry for entry in bars if datetime.fromisoformat(entry["start"]) == start]
    return dict(found)


def last_bar(test_id: str) -> str:
    return f"{chart_bars(test_id)}.at(-1)"


LINES = (
    "Object.fromEntries([...document.querySelectorAll('[data-testid=chart-turnaround] polyline,"
    " [data-testid=chart-queue] polyline')].map((line) => [line.dataset.line, line.getAttribute('points')]))"
)


@pytest.mark.timeout(180)
async def test_queue_and_turnaround_charts_show_each_principal_its_own_over_the_window(
    db: Any, tokens: dict[str, str], daemon_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHD_ADMIN_TOKEN", ADMIN_TOKEN)
    await db.execute(APPLIED_BATCHES)  # the routing p90 in use: 91 s
    ago = await known_history(db)
    await insert_aged(db, "acme", 3, 120)
    await insert_aged(db, "globex", 2, 300)
    settings = daemon_settings(
        events={"poll_interval_s": 1.0},
        routing={"window": 10, "min_samples": 5},
        batching={"max_wait_s": 3600, "max_requests": 10_000},  # the queue stays as it is
        rollups={"flow_sample_interval_s": 1.0},
    )
    daemon = Daemon(settings)
    async with daemon.running():
        url = daemon.http_url
        # acme last: it queues more jobs, which the others' numbers of now do not count.
        for principal, token in ((None, ADMIN_TOKEN), ("globex", tokens["globex"]), ("acme", tokens["acme"])):
            async with dashboard() as browser:
                await browser.navigate(f"{url}/#token={token}")
                await browser.wait_for(f"{CONNECTION} === 'live' && {CHART}.dataset.state === 'loaded'")
                await browser.evaluate("document.querySelector('[data-testid=window-1h]').click()")
                # Loaded with the daemon's sample of this minute in it.
                await browser.wait_for(
                    f"{CHART}.dataset.window === '1h' && {CHART}.dataset.state === 'loaded'"
                    f" && Number({last_bar('chart-queue')}.samples) > 0"
                )
                await charts_show(browser, principal, ago)
                if principal == "acme":
                    await the_queue_moves_with_snapshots(browser, db)
                if principal != "globex":
                    await screenshots(browser, "tenant" if principal else "admin")


async def charts_show(browser: Any, principal: str | None, ago: datetime) -> None:
    """The known history's interval and this minute's sample, as `principal` may see them."""
    assert len(await browser.evaluate(chart_bars("chart-queue"))) in (61, 62)
    queued, most, oldest, jobs, p50, p90 = WANT[principal]
    past = await bar(browser, "chart-queue", ago)
    assert (float(past["queued"]), int(past["queuedMax"]), float(past["oldestWaitS"])) == (
        queued,
        most,
        oldest,
    )
    assert f"{queued} queued on average, {most} at most" in past["title"]
    assert past["parts"]["queued"] > 0
    turnaround = await bar(browser, "chart-turnaround", ago)
    assert int(turnaround["turnaroundJobs"]) == jobs
    assert float(turnaround["turnaroundP50S"]) == pytest.approx(flow.bucket_middle(p50))
    assert float(turnaround["turnaroundP90S"]) == pytest.approx(flow.bucket_middle(p90))
    assert float(turnaround["routingP90S"]) == 150.0
    assert f"{jobs} jobs · p50 " in turnaround["title"]
    if p50 != p90:
        assert turnaround["parts"]["p90"] > 0
    assert set(await browser.evaluate(LINES)) == {"wait", "routing"}
    if principal in NOW:
        queued_now, oldest_now = NOW[principal]
        now = await browser.evaluate(last_bar("chart-queue"))
        assert int(now["queuedMax"]) == queued_now
        assert float(now["oldestWaitS"]) >= oldest_now
        # The daemon's own sample of the routing p90 in use: the applied batches' p90.
        assert float(now["routingP90S"]) == pytest.approx(91.0)
    if principal is not None:
        other = "globex" if principal == "acme" else "acme"
        assert other not in await browser.evaluate("document.body.innerHTML")


SERIES_READS = (
    "performance.getEntriesByType('resource').filter((entry) => entry.name.includes('/v1/series')).length"
)


async def the_queue_moves_with_snapshots(browser: Any, db: Any) -> None:
    """Two more queued, a snapshot after a batch event: the last interval has them, the series unread."""
    reads = await browser.evaluate(SERIES_READS)
    await insert_aged(db, "acme", 2, 10)
    await db.execute(
        "INSERT INTO batchd.events (type, tenant_id, batch_id, data)"
        " VALUES ('batch.ended', 'acme', $1, '{\"status\": \"ended\"}')",
        uuid.uuid4(),
    )
    await db.execute("NOTIFY batchd_events")
    await browser.wait_for(f"Number({last_bar('chart-queue')}.queuedMax) === 5")
    assert await browser.evaluate(SERIES_READS) == reads


async def screenshots(browser: Any, name: str) -> None:
    """Nothing cut off at either width (assert_fits), and the two charts in view at each."""
    await assert_fits(browser, f"dashboard-flow-charts-{name}")
    for width, height in (WINDOW, NARROW):
        await browser.set_viewport(width, height)
        await browser.wait_for(f"window.innerWidth === {width}")
        await browser.evaluate(
            "window.scrollTo(0, window.scrollY - 80"
            " + document.querySelector('[data-testid=chart-queue]').getBoundingClientRect().top)"
        )
        await browser.screenshot(ARTIFACTS / f"dashboard-flow-charts-{name}-{width}-charts.png")
    await browser.set_viewport(*WINDOW)
