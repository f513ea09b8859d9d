"""The live dashboard at `/`, end to end: a real daemon with its HTTP server, the emulator, a real database
and a headless Chromium (tests/browser.py) that signs in, watches jobs complete, and must never see
another tenant's work. Screenshots land in test-artifacts/ (git-ignored) for a human to look at.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from browser import WINDOW_SIZE as WINDOW
from browser import Browser, headless_chromium
from support import (
    ADMIN_TOKEN,
    QUICK,
    EmulatorHandle,
    add_workload,
    insert_aged,
    insert_raw,
    raw_request,
    wait_for_jobs,
    wait_until,
)

from batchd import budgets, statuses, tenants
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FEED_LIMIT = 200  # completions the page keeps (app.js)
PAGE_SIZE = 25  # of which the completions table shows one page

pytestmark = pytest.mark.slow

# Page probes: the dashboard's data-testid hooks; feed rows carry data-job-id, data-status, data-tenant.
FEED_ROWS = (
    "[...document.querySelectorAll('[data-testid=feed-row]')]"
    ".map((row) => ({job: row.dataset.jobId, status: row.dataset.status, tenant: row.dataset.tenant}))"
)
TENANT_ROWS = (
    "[...document.querySelectorAll('[data-testid=table-tenants] tbody tr')].map((row) => row.dataset.tenant)"
)
NO_OPEN_BATCHES = "document.querySelectorAll('[data-testid=table-batches] tbody tr').length === 0"
CONNECTION = "document.querySelector('[data-testid=connection]').dataset.state"
SIGN_IN_SHOWN = "!document.getElementById('signin-view').hidden"
SIGN_IN_ERROR = "document.querySelector('[data-testid=signin-error]')"


def card(name: str) -> str:
    """The exact number a card shows (its data-value), as a JavaScript expression."""
    return f"Number(document.querySelector('[data-testid=card-{name}] .card-value').dataset.value)"


def feed_has(job_ids: list[str], status: str = "succeeded") -> str:
    """True once every job has a feed row with that status."""
    return (
        f"(() => {{ const rows = {FEED_ROWS}; const status = {json.dumps(status)};"
        f" return {json.dumps(job_ids)}.every((id) => rows.some((r) => r.job === id && r.status === status));"
        " })()"
    )


JOB_DETAIL = "document.querySelector('[data-testid=job-detail]')"
JOB_LOADED = (
    f"({JOB_DETAIL}.dataset.state === 'loaded' && document.querySelector('[data-testid=job-dialog]').open)"
)
FEED_RANGE = "document.querySelector('[data-testid=feed-range]').textContent"


def feed_row(job_id: str) -> str:
    return f"document.querySelector('[data-testid=feed-row][data-job-id=\"{job_id}\"]')"


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


@asynccontextmanager
async def dashboard() -> AsyncIterator[Browser]:
    """A headless Chromium whose console must hold no page errors when the block ends."""
    async with headless_chromium(ARTIFACTS) as browser:
        yield browser
        assert_clean_console(browser)


def assert_clean_console(browser: Browser, allowed: tuple[str, ...] = ()) -> None:
    """No uncaught exception and no console.error from the page; of the browser's own warnings and errors,
    only the 401s by which the page learns it is signed out (GET /v1/session, a refused token) and what
    `allowed` names."""
    allowed = ("status of 401", *allowed)
    problems = [
        str(message)
        for message in browser.console
        if message.kind in ("exception", "error", "assert")
        or (
            message.kind in ("browser.warning", "browser.error")
            and not any(text in message.text for text in allowed)
        )
    ]
    assert not problems, "the page logged problems:\n" + "\n".join(problems)


async def sign_in_with_form(browser: Browser, token: str) -> None:
    await browser.wait_for(SIGN_IN_SHOWN)
    assert await browser.evaluate(CONNECTION) == "signed-out"
    await browser.evaluate(
        "(() => { const input = document.querySelector('[data-testid=token-input]');"
        f" input.focus(); input.value = {json.dumps(token)};"
        " input.dispatchEvent(new Event('input', {bubbles: true}));"
        " document.querySelector('[data-testid=sign-in]').click(); })()"
    )


async def insert_job(db: Any, tenant: str, request: Any, metadata: dict[str, Any] | None = None) -> str:
    """One job with metadata (insert_raw has none), or with a request the daemon must refuse."""
    job_id = await db.fetchval(
        "INSERT INTO batchd.jobs (tenant_id, request, metadata)"
        " VALUES ($1, $2::text::jsonb, $3::text::jsonb) RETURNING id",
        tenant,
        json.dumps(request),
        None if metadata is None else json.dumps(metadata),
    )
    return str(job_id)


async def test_a_tenant_signs_in_and_sees_its_own_completions_only(
    db: Any, tokens: dict[str, str], serve: Callable[..., Any]
) -> None:
    async with serve() as (_, url), dashboard() as browser:
        await browser.navigate(f"{url}/")
        await sign_in_with_form(browser, tokens["acme"])
        await browser.wait_for(f"{CONNECTION} === 'live'")
        identity = await browser.evaluate("document.querySelector('[data-testid=identity]').textContent")
        assert "acme" in identity
        assert await browser.evaluate("document.cookie") == "", "the token cookie must be HttpOnly"
        assert await browser.evaluate("document.querySelector('[data-testid=token-input]').value") == ""

        # Another tenant's job first: its events come before acme's in the log, so had the stream leaked
        # it, the page would hold it by the time acme's completions show.
        globex_job = str((await insert_raw(db, "globex", ["globex secret"]))[0])
        await wait_for_jobs(db, done=1)
        acme_jobs = [str(job) for job in await insert_raw(db, "acme", ["acme one", "acme two"])]

        await browser.wait_for(feed_has(acme_jobs))
        await browser.wait_for(f"{card('input-tokens')} > 0 && {card('output-tokens')} > 0")
        await browser.wait_for(f"{card('succeeded')} === 2")
        rows = await browser.evaluate(FEED_ROWS)
        assert {row["job"] for row in rows} == set(acme_jobs)
        assert {row["tenant"] for row in rows} == {"acme"}
        assert globex_job not in await browser.evaluate("document.body.innerHTML")
        assert await browser.evaluate(TENANT_ROWS) == ["acme"]
        assert await browser.evaluate(card("failed")) == 0

        # The totals agree with the database, also once the page has re-based them on a fresh snapshot
        # (after batch.ended): nothing is counted twice.
        usage = await db.fetchrow(
            "SELECT sum((usage->>'input_tokens')::bigint) AS input,"
            " sum((usage->>'output_tokens')::bigint) AS output FROM batchd.jobs WHERE tenant_id = 'acme'"
        )
        await browser.wait_for(
            f"{NO_OPEN_BATCHES} && {card('input-tokens')} === {usage['input']}"
            f" && {card('output-tokens')} === {usage['output']}"
        )
        assert await browser.evaluate(card("queued")) == 0
        assert await browser.evaluate(card("batches")) == 0
        # What the ledger says acme's jobs cost, and saved: half, at batch prices.
        cost = float(await db.fetchval("SELECT sum(cost_usd) FROM batchd.costs WHERE tenant_id = 'acme'"))
        await browser.wait_for(f"{card('cost')} > 0 && Math.abs({card('cost')} - {cost}) < 1e-12")
        saved_sub = await browser.evaluate(
            "document.querySelector('[data-testid=card-saved] .card-sub').textContent"
        )
        assert saved_sub == "50% less than the Messages API"
        await browser.screenshot(ARTIFACTS / "dashboard-tenant.png")

        # A completion row opens the job with its result.
        await browser.evaluate(f"{feed_row(acme_jobs[0])}.click()")
        detail = await browser.wait_for(f"{JOB_LOADED} && {JOB_DETAIL}.textContent")
        assert acme_jobs[0] in detail
        assert "Result" in detail
        # Its times, read by the browser from the API's ISO 8601: dates, not "—" nor "Invalid Date".
        facts = await browser.evaluate(
            "Object.fromEntries([...document.querySelectorAll('[data-testid=job-detail] .facts div')]"
            ".map((d) => [d.querySelector('dt').textContent, d.querySelector('dd').textContent]))"
        )
        for fact in ("Created", "Completed"):
            assert re.search(r"\d{1,4}\D\d{1,2}\D\d{1,4}", facts[fact]), facts

        # Signing out drops the cookie: a reload shows the form again.
        await browser.evaluate("document.querySelector('[data-testid=sign-out]').click()")
        await browser.wait_for(f"{CONNECTION} === 'signed-out'")
        await browser.navigate(f"{url}/")
        await browser.wait_for(SIGN_IN_SHOWN)


async def test_the_admin_sees_every_tenant(
    db: Any, tokens: dict[str, str], serve: Callable[..., Any]
) -> None:
    hostile_metadata = {
        "customer": "Initech <script>document.body.dataset.pwned = 1</script>",
        "note": '<img src=x onerror="document.body.dataset.pwned = 1">' + " and a very long note" * 40,
        "tags": ["quarterly", "report", "finance"],
    }
    async with serve() as (_, url), dashboard() as browser:
        # batchd can print a link with the token in its fragment: the page signs in with it and drops it.
        await browser.navigate(f"{url}/#token={ADMIN_TOKEN}")
        await browser.wait_for(f"{CONNECTION} === 'live'")
        assert await browser.evaluate("location.href") == f"{url}/"
        identity = await browser.evaluate("document.querySelector('[data-testid=identity]').textContent")
        assert "admin" in identity

        acme_jobs = [str(job) for job in await insert_raw(db, "acme", [f"acme {n}" for n in range(12)])]
        globex_jobs = [str(job) for job in await insert_raw(db, "globex", [f"globex {n}" for n in range(6)])]
        await browser.wait_for(feed_has(acme_jobs + globex_jobs))
        # Then one with long (and hostile) metadata and one the daemon refuses: the newest rows.
        globex_jobs.append(await insert_job(db, "globex", raw_request("with metadata"), hostile_metadata))
        refused = await insert_job(db, "acme", "not a request object", {"source": "nightly import"})
        await browser.wait_for(feed_has(globex_jobs[-1:]))
        await browser.wait_for(feed_has([refused], "failed"))

        await browser.wait_for(f'JSON.stringify({TENANT_ROWS}) === \'["acme","globex"]\'')
        assert {row["tenant"] for row in await browser.evaluate(FEED_ROWS)} == {"acme", "globex"}
        await browser.wait_for(f"{card('succeeded')} === {len(acme_jobs) + len(globex_jobs)}")
        await browser.wait_for(f"{card('failed')} === 1")
        assert await browser.evaluate(card("output-tokens")) > 0
        assert "JSON object" in await browser.evaluate(f"{feed_row(refused)}.textContent")

        # Text from the server is text, never markup; long metadata is cut to the row, not wrapped.
        row = feed_row(globex_jobs[-1])
        assert "<img src=x" in await browser.evaluate(f"{row}.textContent")
        assert await browser.evaluate(f"{row}.querySelectorAll('img, script').length") == 0
        assert await browser.evaluate("document.body.dataset.pwned") is None
        assert await browser.evaluate(f"{row}.getBoundingClientRect().height") < 60
        assert await browser.evaluate("document.documentElement.scrollWidth") <= 1280

        await browser.wait_for(NO_OPEN_BATCHES)
        await browser.screenshot(ARTIFACTS / "dashboard-admin.png")


def table_cells(name: str) -> str:
    """Each row of a table as the text of its cells."""
    return (
        f"[...document.querySelectorAll('[data-testid={name}] tbody tr')]"
        ".map((row) => [...row.cells].map((cell) => cell.textContent.trim()))"
    )


async def test_the_queue_and_open_batch_tables_show_counts_and_ages(
    db: Any,
    tokens: dict[str, str],
    emulator: EmulatorHandle,
    daemon_settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Jobs queued for two tenants and an open batch, as the admin and as a tenant see them on the page."""
    monkeypatch.setenv("BATCHD_ADMIN_TOKEN", ADMIN_TOKEN)
    # The page names statuses as the server does (batchd/statuses.py, through the overview), not from a list
    # of its own: a label changed on the server is the one shown.
    monkeypatch.setitem(statuses.BATCH_LABELS, statuses.BatchStatus.IN_PROGRESS, ("Working", "hint"))
    await emulator.admin("PATCH", "settings", {"processing_time_s": [3600, 3600]})  # the batch stays open
    # Flushed only once the oldest job has waited an hour: what is flushed is decided by the jobs' age.
    daemon = Daemon(daemon_settings(batching={"max_wait_s": 3600}, events={"poll_interval_s": 1.0}))
    async with daemon.running():
        url = daemon.http_url
        in_batch = await insert_aged(db, "acme", 2, 7200) + await insert_aged(db, "globex", 3, 7200)

        async def submitted() -> bool:
            rows = await db.fetch("SELECT status FROM batchd.jobs WHERE id = ANY($1)", in_batch)
            return [row["status"] for row in rows] == ["submitted"] * 5

        await wait_until(submitted, timeout=20)
        batch_id = await db.fetchval(
            "UPDATE batchd.batches SET created_at = now() - interval '90 s' RETURNING id"
        )
        await insert_aged(db, "acme", 4, 300)
        await insert_aged(db, "acme", 1, 10)
        await insert_aged(db, "globex", 2, 40)

        async with dashboard() as browser:
            await browser.navigate(f"{url}/#token={ADMIN_TOKEN}")
            await browser.wait_for(f"{CONNECTION} === 'live'")
            await browser.wait_for(f"{table_cells('table-tenants')}.length === 2")
            acme, globex = await browser.evaluate(table_cells("table-tenants"))
            # tenant, queued, oldest waiting, succeeded, failed, tokens
            assert acme[:2] == ["acme", "5"]
            assert re.fullmatch(r"5m [0-2]\ds", acme[2]), acme
            assert globex[:2] == ["globex", "2"]
            assert re.fullmatch(r"[4-6]\ds", globex[2]), globex
            assert await browser.evaluate(card("queued")) == 7
            (batch,) = await browser.evaluate(table_cells("table-batches"))
            # batch (id, provider id), status, in flight, requests, age
            assert batch[2:4] == ["5", "5"], batch
            assert batch[1] == "Working", batch
            badge = "document.querySelector('[data-testid=table-batches] tbody tr .badge')"
            assert await browser.evaluate(f"{badge}.title") == "hint"
            assert re.fullmatch(r"1m [3-5]\ds", batch[4]), batch
            assert await browser.evaluate(
                "document.querySelector('[data-testid=table-batches] tbody tr').dataset.batchId"
            ) == str(batch_id)
            assert await browser.evaluate(card("batches")) == 1
            await browser.screenshot(ARTIFACTS / "dashboard-queue-and-batches.png")
            # Tidy at 1280 px: both side tables fit their panels, no horizontal scrollbar.
            for name in ("table-tenants", "table-batches"):
                wrap = f"document.querySelector('[data-testid={name}]').parentElement"
                assert await browser.evaluate(f"{wrap}.scrollWidth <= {wrap}.clientWidth"), name

        # A tenant sees its own queue, and its own requests in the batch (not the batch's size).
        async with dashboard() as browser:
            await browser.navigate(f"{url}/#token={tokens['acme']}")
            await browser.wait_for(f"{CONNECTION} === 'live'")
            await browser.wait_for(f"{table_cells('table-tenants')}.length === 1")
            (own,) = await browser.evaluate(table_cells("table-tenants"))
            assert own[:2] == ["acme", "5"]
            (batch,) = await browser.evaluate(table_cells("table-batches"))
            assert batch[2:4] == ["2", ""], batch


async def test_the_feed_keeps_the_newest_rows_and_a_reload_counts_each_job_once(
    db: Any, tokens: dict[str, str], serve: Callable[..., Any]
) -> None:
    many = FEED_LIMIT + 40
    async with serve() as (_, url), dashboard() as browser:
        await browser.navigate(f"{url}/#token={tokens['acme']}")
        await browser.wait_for(f"{CONNECTION} === 'live'")
        await insert_raw(db, "acme", [f"acme {n}" for n in range(many)])
        await browser.wait_for(f"{card('succeeded')} === {many}")
        # It keeps the newest FEED_LIMIT, of which the table shows one page.
        await browser.wait_for(f"{FEED_RANGE} === '{page_range(1, PAGE_SIZE, FEED_LIMIT)}'")
        assert await browser.evaluate(f"{FEED_ROWS}.length") == PAGE_SIZE
        assert await browser.evaluate(f"{FEED_ROWS}.every((row) => row.status === 'succeeded')")
        output_tokens = await db.fetchval(
            "SELECT sum((usage->>'output_tokens')::bigint) FROM batchd.jobs WHERE tenant_id = 'acme'"
        )
        await browser.wait_for(f"{card('output-tokens')} === {output_tokens}")

        # A page opened now gets the totals from the snapshot and the latest completions replayed from
        # the event log into its feed: those must not be counted a second time.
        await browser.navigate(f"{url}/")
        await browser.wait_for(f"{CONNECTION} === 'live' && {FEED_ROWS}.length > 0")
        await browser.wait_for(NO_OPEN_BATCHES)
        assert await browser.evaluate(card("succeeded")) == many
        assert await browser.evaluate(card("output-tokens")) == output_tokens
        jobs = [row["job"] for row in await browser.evaluate(FEED_ROWS)]
        assert len(jobs) == len(set(jobs)), "a completion shown twice"


async def test_the_status_shows_the_server_going_away(
    db: Any, tokens: dict[str, str], serve: Callable[..., Any]
) -> None:
    async with headless_chromium(ARTIFACTS) as browser:
        async with serve() as (_, url):
            await browser.navigate(f"{url}/#token={tokens['acme']}")
            await browser.wait_for(f"{CONNECTION} === 'live'")
        # The daemon stopped: its streams end (event `disconnect`) and EventSource keeps trying.
        await browser.wait_for(f"{CONNECTION} === 'reconnecting'")
        title = await browser.evaluate("document.querySelector('[data-testid=connection]').title")
        assert title.startswith("The server is restarting"), title
        assert await browser.evaluate("document.getElementById('dashboard-view').hidden") is False
        assert_clean_console(browser, allowed=("ERR_CONNECTION_REFUSED",))


async def test_a_revoked_token_signs_the_page_out_at_once(
    db: Any, tokens: dict[str, str], serve: Callable[..., Any]
) -> None:
    async with serve(poll_interval_s=60.0) as (_, url), dashboard() as browser:
        await browser.navigate(f"{url}/#token={tokens['acme']}")
        await browser.wait_for(f"{CONNECTION} === 'live'")
        await tenants.revoke(db, "acme")
        # The stream's `disconnect` (revoked) signs the page out, rather than a reconnection that is refused.
        error = await browser.wait_for(f"!{SIGN_IN_ERROR}.hidden && {SIGN_IN_ERROR}.textContent", timeout=10)
        assert error == "This token was revoked: sign in with another."
        assert await browser.evaluate(CONNECTION) == "signed-out"
        assert await browser.evaluate("document.getElementById('dashboard-view').hidden") is True


async def test_a_bad_token_is_refused_and_the_page_stays_signed_out(
    db: Any, tokens: dict[str, str], serve: Callable[..., Any]
) -> None:
    async with serve() as (_, url), dashboard() as browser:
        await browser.navigate(f"{url}/#token=not-a-token")
        error = await browser.wait_for(f"!{SIGN_IN_ERROR}.hidden && {SIGN_IN_ERROR}.textContent")
        assert "not accepted" in error
        assert await browser.evaluate("location.href") == f"{url}/", "the token must leave the address bar"

        await sign_in_with_form(browser, "also-not-a-token")
        await browser.wait_for(f"{SIGN_IN_ERROR}.textContent === 'That token was not accepted.'")
        assert await browser.evaluate(CONNECTION) == "signed-out"
        assert await browser.evaluate("document.getElementById('dashboard-view').hidden") is True
        await browser.screenshot(ARTIFACTS / "dashboard-signin.png")


# Every element of the page whose content is wider than its box (but for a text cut with an ellipsis by
# design, whose whole text is in its title), and the page itself if wider than the window; and every card
# showing a compact number without the exact one in its title.
OVERFLOWING = """(() => {
  const name = (node) => node.tagName.toLowerCase() + (node.dataset.testid ? `[${node.dataset.testid}]` : '')
    + (node.className && typeof node.className === 'string' ? `.${node.className.split(' ').join('.')}` : '')
    + ` "${node.textContent.trim().slice(0, 40)}"`;
  const found = [];
  for (const node of document.querySelectorAll('body *')) {
    if (!(node instanceof HTMLElement) || !node.getClientRects().length) continue;
    const style = getComputedStyle(node);
    if (style.textOverflow === 'ellipsis' && style.overflowX !== 'visible'
        && (node.title || node.querySelector('[title]'))) continue;
    if (node.scrollWidth > node.clientWidth + 1 && style.display !== 'inline') {
      found.push(`${name(node)}: ${node.scrollWidth} > ${node.clientWidth}`);
    }
  }
  if (document.documentElement.scrollWidth > window.innerWidth) found.push('page too wide');
  for (const value of document.querySelectorAll('.card-value[data-exact]')) {
    if (value.textContent !== value.dataset.exact && value.title !== value.dataset.exact) {
      found.push(`${name(value)} is compact without its exact value in its title`);
    }
  }
  return found;
})()"""
NARROW = (390, 844)


def text_of(test_id: str) -> str:
    return f"document.querySelector('[data-testid={test_id}]').textContent.replace(/\\s+/g, ' ').trim()"


def card_text(name: str) -> str:
    return f"document.querySelector('[data-testid=card-{name}] .card-value').textContent"


async def assert_fits(browser: Browser, screenshot: str) -> None:
    """Nothing overflows its box at 1280 px and at 390 px; a screenshot at each width."""
    for width, height in (WINDOW, NARROW):
        await browser.set_viewport(width, height)
        await browser.wait_for(f"window.innerWidth === {width}")
        await browser.evaluate(
            "new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"
        )
        assert await browser.evaluate(OVERFLOWING) == [], f"at {width} px"
        await browser.screenshot(ARTIFACTS / f"{screenshot}-{width}.png")
        await browser.evaluate("document.querySelector('[data-testid=table-money]').scrollIntoView()")
        await browser.screenshot(ARTIFACTS / f"{screenshot}-{width}-spend.png")
        await browser.evaluate("window.scrollTo(0, 0)")
    await browser.set_viewport(*WINDOW)


async def test_money_and_budgets_per_tenant_exact_and_a_held_tenant_sees_why_its_jobs_wait(
    db: Any, tokens: dict[str, str], serve: Callable[..., Any]
) -> None:
    # A known history (the rollups' input) and budgets: acme spent $1,234.50 today, over its $100 a day, so
    # it is held; globex spent $0.25 of its $50 a month.
    await add_workload(
        db, "acme", succeeded=123_456, failed=7, tokens=(9_876_543_210, 1_234_567), cost="1234.5", sync="2469"
    )
    await add_workload(db, "globex", succeeded=12, failed=0, tokens=(1_200, 340), cost="0.25", sync="0.5")
    await budgets.set_budget(db, "acme", day=Decimal(100), month=Decimal(5000))
    await budgets.set_budget(db, "globex", month=Decimal(50))
    await budgets.check(db)
    reason = "over its daily budget: 1234.5 USD spent of 100 USD today (UTC)"
    async with serve() as (_, url):
        await insert_raw(db, "acme", [f"acme {n}" for n in range(50)])  # held: they stay queued

        async with dashboard() as browser:
            await browser.navigate(f"{url}/#token={ADMIN_TOKEN}")
            await browser.wait_for(f"{CONNECTION} === 'live' && {card('queued')} === 50")
            assert await browser.evaluate(card_text("succeeded")) == "123,468"
            assert await browser.evaluate(card_text("failed")) == "7"
            assert await browser.evaluate(card_text("cost")) == "$1,234.75"
            assert await browser.evaluate(card_text("saved")) == "$1,234.75"
            cost_sub = "document.querySelector('[data-testid=card-cost] .card-sub').textContent"
            assert await browser.evaluate(cost_sub) == "Messages API price $2,469.50"
            saved_sub = "document.querySelector('[data-testid=card-saved] .card-sub').textContent"
            assert "50% less" in await browser.evaluate(saved_sub)
            queued_sub = "document.querySelector('[data-testid=card-queued] .card-sub').textContent"
            assert "1 tenant held" in await browser.evaluate(queued_sub)
            acme, globex = await browser.evaluate(table_cells("table-money"))
            # tenant, cost, Messages API, saved, today, this month, budget
            assert acme[:4] == ["acme", "$1,234.50", "$2,469.00", "$1,234.50"]
            assert acme[4:6] == ["$1,234.50 of $100.00", "$1,234.50 of $5,000.00"]
            assert acme[6].startswith("Held since "), acme
            assert acme[6].endswith(reason), acme
            assert globex[:4] == ["globex", "$0.2500", "$0.5000", "$0.2500"]
            assert globex[4:] == ["$0.2500 · no limit", "$0.2500 of $50.00", "Within budget"]
            held = await browser.evaluate(text_of("held"))
            assert held.startswith("acme is held since "), held
            assert reason in held
            await assert_fits(browser, "dashboard-money-admin")

        async with dashboard() as browser:
            await browser.navigate(f"{url}/#token={tokens['acme']}")
            await browser.wait_for(f"{CONNECTION} === 'live' && {card('queued')} === 50")
            assert await browser.evaluate(card_text("succeeded")) == "123,456"
            assert await browser.evaluate(card("input-tokens")) == 9_876_543_210
            assert await browser.evaluate(card_text("cost")) == "$1,234.50"
            assert "held: over budget" in await browser.evaluate(queued_sub)
            (own,) = await browser.evaluate(table_cells("table-money"))
            assert own[:6] == acme[:6]
            held = await browser.evaluate(text_of("held"))
            assert held.startswith("Your jobs are held since "), held
            assert reason in held
            assert "Queued jobs wait (none is sent) until the budget allows again" in held
            assert "globex" not in await browser.evaluate("document.body.innerHTML")
            await assert_fits(browser, "dashboard-money-tenant")


HOSTILE = '<img src=x onerror="document.body.dataset.pwned = 1"><b>bold</b>'
PAGE_HEIGHT = "document.documentElement.scrollHeight"


def job_facts() -> str:
    """The job dialog's facts: field -> [shown text, the server's value]."""
    return (
        "Object.fromEntries([...document.querySelectorAll('[data-testid=job-detail] [data-field] dd')]"
        ".map((dd) => [dd.parentElement.dataset.field, [dd.textContent, dd.dataset.value]]))"
    )


async def click(browser: Browser, test_id: str) -> None:
    await browser.evaluate(f"document.querySelector('[data-testid={test_id}]').click()")


def page_range(first: int, last: int, count: int) -> str:
    """The pager's words for rows first to last of count."""
    return f"{first}\u2013{last} of {count}"


async def assert_job_dialog(browser: Browser, db: Any, job_id: str) -> None:
    """The open dialog shows the job as the database and its ledger hold it, its result as text."""
    facts = await browser.evaluate(job_facts())
    job = await db.fetchrow("SELECT * FROM batchd.jobs WHERE id = $1", uuid.UUID(job_id))
    assert facts["status"][1] == "succeeded", facts
    assert facts["status"][0].startswith("Succeeded"), facts
    for field, column in (
        ("created", "created_at"),
        ("submitted", "submitted_at"),
        ("completed", "completed_at"),
    ):
        assert datetime.fromisoformat(facts[field][1]) == job[column], field
        assert re.search(r"\d{1,4}\D\d{1,2}\D\d{1,4}", facts[field][0]), facts[field]
    assert facts["path"][1] == job["path"] == "batch"
    assert job["path_reason"]
    assert facts["path-reason"][1] == job["path_reason"], facts
    assert json.loads(facts["usage"][1]) == job["usage"]
    assert f"{job['usage']['output_tokens']} out" in facts["usage"][0]
    cost, sync = await db.fetchrow(
        "SELECT cost_usd, sync_cost_usd FROM batchd.costs WHERE job_id = $1", uuid.UUID(job_id)
    )
    assert Decimal(facts["cost"][1]) == cost
    assert Decimal(facts["sync-cost"][1]) == sync
    assert facts["cost"][0].startswith("$")
    # The result is the model's text, shown as text: the markup in it is not markup on the page.
    result = "document.querySelector('[data-testid=job-detail] [data-field=result]')"
    assert HOSTILE in await browser.evaluate(f"{result}.textContent")
    assert await browser.evaluate(f"{JOB_DETAIL}.querySelectorAll('img, b, script').length") == 0
    assert await browser.evaluate("document.body.dataset.pwned") is None


async def test_completions_page_through_and_a_job_opens_in_a_dialog_as_text(
    db: Any, tokens: dict[str, str], serve: Callable[..., Any]
) -> None:
    """A known workload: one job whose prompt (so whose emulated result) is markup, then 60 more. The table
    shows a page of them at a time, the page stays as tall whatever their count, nothing scrolls sideways at
    1280 or 390 px, and a row opens the job in a dialog, its result as text."""
    async with serve() as (_, url), dashboard() as browser:
        await browser.navigate(f"{url}/#token={tokens['acme']}")
        await browser.wait_for(f"{CONNECTION} === 'live'")
        (hostile,) = [str(job) for job in await insert_raw(db, "acme", [HOSTILE])]
        await wait_for_jobs(db, done=1)
        await browser.wait_for(feed_has([hostile]))
        await browser.wait_for(NO_OPEN_BATCHES)
        short_height = await browser.evaluate(PAGE_HEIGHT)
        later = [str(job) for job in await insert_raw(db, "acme", [f"acme {n}" for n in range(60)])]
        await browser.wait_for(
            f"{card('succeeded')} === 61 && {FEED_RANGE} === '{page_range(1, PAGE_SIZE, 61)}'"
        )
        await browser.wait_for(NO_OPEN_BATCHES)

        # One page in the table, whatever the count: the page grows by at most a page of rows.
        assert await browser.evaluate(f"{FEED_ROWS}.length") == PAGE_SIZE
        row_height = await browser.evaluate(
            "document.querySelector('[data-testid=feed-row]').getBoundingClientRect().height"
        )
        full_height = await browser.evaluate(PAGE_HEIGHT)
        assert full_height <= short_height + (PAGE_SIZE + 2) * row_height, (short_height, full_height)
        await assert_fits(browser, "dashboard-completions")

        # Older, older: every job once, the first one (the oldest) last; then back to the newest.
        seen: list[str] = []
        for first, last in ((1, PAGE_SIZE), (26, 50), (51, 61)):
            assert await browser.evaluate(FEED_RANGE) == page_range(first, last, 61)
            seen += [row["job"] for row in await browser.evaluate(FEED_ROWS)]
            if last < 61:
                await click(browser, "feed-older")
        assert await browser.evaluate("document.querySelector('[data-testid=feed-older]').disabled")
        assert sorted(seen) == sorted([hostile, *later])
        assert seen[-1] == hostile
        await browser.screenshot(ARTIFACTS / "dashboard-completions-last-page.png")

        # The oldest job opens in the dialog: its facts as the API and the ledger hold them.
        await browser.evaluate(f"{feed_row(hostile)}.click()")
        await browser.wait_for(JOB_LOADED)
        await assert_job_dialog(browser, db, hostile)
        for width, height in (WINDOW, NARROW):
            await browser.set_viewport(width, height)
            await browser.wait_for(f"window.innerWidth === {width}")
            dialog = "document.querySelector('[data-testid=job-dialog]')"
            assert await browser.evaluate(f"{dialog}.getBoundingClientRect().right") <= width
            assert await browser.evaluate(OVERFLOWING) == [], f"at {width} px"
            await browser.screenshot(ARTIFACTS / f"dashboard-job-dialog-{width}.png")
        await browser.set_viewport(*WINDOW)

        # Closed. Completions arriving meanwhile do not move the rows a reader of an older page looks at.
        await click(browser, "job-dialog-close")
        assert await browser.evaluate("document.querySelector('[data-testid=job-dialog]').open") is False
        shown = await browser.evaluate(FEED_ROWS)
        await insert_raw(db, "acme", [f"more {n}" for n in range(5)])
        await browser.wait_for(f"{FEED_RANGE} === '{page_range(56, 66, 66)}'")
        assert await browser.evaluate(FEED_ROWS) == shown
        await click(browser, "feed-newer")
        await click(browser, "feed-newer")
        assert await browser.evaluate(FEED_RANGE) == page_range(1, PAGE_SIZE, 66)
        assert await browser.evaluate("document.querySelector('[data-testid=feed-newer]').disabled")


TALLY = """
INSERT INTO batchd.tallies (at, tenant_id, status, path, model, jobs, billed, input_tokens, cache_read_tokens,
                            cost_usd, sync_cost_usd)
VALUES (now() - $1 * interval '1 minute', $2, $3, $4, 'm', $5, $5, $6, $7, $8, $9)
"""
# (minutes ago, tenant, status, path, jobs, input tokens, cache read tokens, cost, Messages API cost)
CHART_WORKLOAD = [
    (10, "acme", "succeeded", "batch", 5, 100, 300, "1", "2"),
    (10, "acme", "failed", "batch", 1, 0, 0, "0", "0"),
    (10, "acme", "succeeded", "sync", 2, 20, 0, "0.6", "0.6"),
    (10, "globex", "succeeded", "batch", 4, 40, 0, "2", "4"),
    (3 * 24 * 60, "acme", "succeeded", "batch", 9, 90, 0, "9", "18"),  # in the 30 days only
]
CHART = "document.querySelector('[data-testid=charts]')"
# The admin's spend chart's parts by tenant: their data (data-*), the interval's start and their own title.
SPEND_PARTS = (
    "[...document.querySelectorAll('[data-testid=chart-money] rect[data-tenant]')]"
    ".map((r) => ({...r.dataset, start: r.parentNode.dataset.start,"
    " title: r.querySelector('title').textContent}))"
)
MONEY_KEYS = "[...document.querySelectorAll('[data-testid=chart-money] .key')].map((k) => k.textContent)"


def chart_bars(test_id: str) -> str:
    """A chart's intervals: their data (data-*), their title, and the height of each bar part."""
    return (
        f"[...document.querySelectorAll('[data-testid={test_id}] g.bar')].map((g) => ({{...g.dataset,"
        " title: g.querySelector('title').textContent,"
        " parts: Object.fromEntries([...g.querySelectorAll('rect.part')]"
        ".map((r) => [r.dataset.part, Number(r.getAttribute('height'))]))}))"
    )


async def bar_at(browser: Browser, test_id: str, start: datetime) -> dict[str, Any]:
    bars = await browser.evaluate(chart_bars(test_id))
    (bar,) = [bar for bar in bars if datetime.fromisoformat(bar["start"]) == start]
    return dict(bar)


async def test_charts_draw_the_series_of_the_chosen_window_each_principal_its_own(
    db: Any, tokens: dict[str, str], serve: Callable[..., Any]
) -> None:
    for minutes, tenant, status, path, jobs, input_tokens, read, cost, sync in CHART_WORKLOAD:
        await db.execute(
            TALLY, minutes, tenant, status, path, jobs, input_tokens, read, Decimal(cost), Decimal(sync)
        )
    now: datetime = await db.fetchval("SELECT now()")
    hour = (now - timedelta(minutes=10)).replace(minute=0, second=0, microsecond=0)
    day = (now - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)
    async with serve() as (_, url):
        await charts_as_the_admin(url, hour)
        await charts_as_a_tenant(url, tokens["acme"], hour, day)


async def charts_as_the_admin(url: str, hour: datetime) -> None:
    """Every tenant's numbers, summed. The day window is the default: 25 hours."""
    async with dashboard() as browser:
        await browser.navigate(f"{url}/#token={ADMIN_TOKEN}")
        await browser.wait_for(f"{CHART}.dataset.state === 'loaded' && {CHART}.dataset.window === '1d'")
        assert len(await browser.evaluate(chart_bars("chart-jobs"))) == 25
        jobs = await bar_at(browser, "chart-jobs", hour)
        assert (jobs["succeeded"], jobs["failed"], jobs["canceled"]) == ("11", "1", "0")
        assert "11 succeeded · 1 failed · 0 canceled" in jobs["title"]
        assert jobs["parts"]["succeeded"] == pytest.approx(100 * 11 / 12)
        money = await bar_at(browser, "chart-money", hour)
        assert float(money["costUsd"]) == pytest.approx(3.6)
        assert float(money["savedUsd"]) == pytest.approx(3.0)
        assert "cost $3.6 · saved $3" in money["title"]
        assert "Messages API price $6.6" in money["title"]
        # Stacked by tenant, the one that spent most in the window first; each part its tenant's numbers.
        assert "\nglobex: cost $2 · saved $2\nacme: cost $1.6 · saved $1" in money["title"]
        spenders = [part for part in await browser.evaluate(SPEND_PARTS) if part["start"] == money["start"]]
        assert [part["tenant"] for part in spenders] == ["globex", "acme"]
        globex, acme = spenders
        assert [float(globex["costUsd"]), float(globex["savedUsd"])] == pytest.approx([2, 2])
        assert [float(acme["costUsd"]), float(acme["savedUsd"])] == pytest.approx([1.6, 1])
        assert acme["title"].startswith("acme, ")
        assert acme["title"].endswith(": cost $1.6 · saved $1")
        assert money["parts"]["tenant-0"] + money["parts"]["tenant-1"] == pytest.approx(100 * 3.6 / 6.6)
        assert await browser.evaluate(MONEY_KEYS) == [
            "globex (cost)",
            "acme (cost)",
            "saved (to the Messages API price)",
        ]
        share = await bar_at(browser, "chart-share", hour)
        assert float(share["batchShare"]) == pytest.approx(10 / 12)
        assert "10 in batches · 2 sync" in share["title"]
        cache = await bar_at(browser, "chart-cache", hour)
        assert float(cache["cacheHitRatio"]) == pytest.approx(300 / 460)
        total = "document.querySelector('[data-testid=chart-jobs] .chart-total').textContent"
        assert await browser.evaluate(total) == "12 jobs"
        await assert_fits(browser, "dashboard-charts-admin")
        await browser.evaluate(f"{CHART}.scrollIntoView()")
        await browser.screenshot(ARTIFACTS / "dashboard-charts-admin.png")


async def charts_as_a_tenant(url: str, token: str, hour: datetime, day: datetime) -> None:
    """acme's own numbers only, in every window."""
    async with dashboard() as browser:
        await browser.navigate(f"{url}/#token={token}")
        await browser.wait_for(f"{CHART}.dataset.state === 'loaded' && {CHART}.dataset.window === '1d'")
        jobs = await bar_at(browser, "chart-jobs", hour)
        assert (jobs["succeeded"], jobs["failed"]) == ("7", "1")
        money = await bar_at(browser, "chart-money", hour)
        assert float(money["costUsd"]) == pytest.approx(1.6)
        assert float(money["syncCostUsd"]) == pytest.approx(2.6)
        share = await bar_at(browser, "chart-share", hour)
        assert float(share["batchShare"]) == pytest.approx(6 / 8)
        cache = await bar_at(browser, "chart-cache", hour)
        assert float(cache["cacheHitRatio"]) == pytest.approx(300 / 420)
        succeeded = f"{chart_bars('chart-jobs')}.reduce((sum, bar) => sum + Number(bar.succeeded), 0)"
        assert await browser.evaluate(succeeded) == 7

        await browser.evaluate("document.querySelector('[data-testid=window-30d]').click()")
        await browser.wait_for(f"{CHART}.dataset.state === 'loaded' && {CHART}.dataset.window === '30d'")
        assert len(await browser.evaluate(chart_bars("chart-jobs"))) == 31
        assert await browser.evaluate(succeeded) == 16
        old = await bar_at(browser, "chart-money", day)
        assert float(old["costUsd"]) == pytest.approx(9)
        assert "saved $9" in old["title"]

        await browser.evaluate("document.querySelector('[data-testid=window-1h]').click()")
        await browser.wait_for(f"{CHART}.dataset.state === 'loaded' && {CHART}.dataset.window === '1h'")
        assert len(await browser.evaluate(chart_bars("chart-jobs"))) == 2
        assert "globex" not in await browser.evaluate("document.body.innerHTML")
        assert await browser.evaluate(SPEND_PARTS) == []
        assert await browser.evaluate(MONEY_KEYS) == ["cost", "saved (to the Messages API price)"]
        await assert_fits(browser, "dashboard-charts-tenant")
        await browser.evaluate(f"{CHART}.scrollIntoView()")
        await browser.screenshot(ARTIFACTS / "dashboard-charts-tenant.png")


async def test_the_admins_spend_chart_names_the_top_tenants_and_sums_the_others(
    db: Any, serve: Callable[..., Any]
) -> None:
    """Seven tenants spent in the hour: the five that spent most each have a part, the other two one."""
    for n in range(7):
        cost = Decimal(n + 1)
        await db.execute(TALLY, 10, f"tenant-{n}", "succeeded", "batch", 1, 0, 0, cost, 2 * cost)
    now: datetime = await db.fetchval("SELECT now()")
    hour = (now - timedelta(minutes=10)).replace(minute=0, second=0, microsecond=0)
    async with serve() as (_, url), dashboard() as browser:
        await browser.navigate(f"{url}/#token={ADMIN_TOKEN}")
        await browser.wait_for(f"{CHART}.dataset.state === 'loaded' && {CHART}.dataset.window === '1d'")
        money = await bar_at(browser, "chart-money", hour)
        parts = [part for part in await browser.evaluate(SPEND_PARTS) if part["start"] == money["start"]]
        assert [part["tenant"] for part in parts] == [f"tenant-{n}" for n in (6, 5, 4, 3, 2)] + [""]
        assert [float(part["costUsd"]) for part in parts] == pytest.approx([7, 6, 5, 4, 3, 3])
        assert [float(part["savedUsd"]) for part in parts] == pytest.approx([7, 6, 5, 4, 3, 3])
        assert parts[-1]["title"].startswith("2 other tenants, ")
        assert parts[-1]["title"].endswith(": cost $3 · saved $3")
        assert "\n2 other tenants: cost $3 · saved $3" in money["title"]
        assert await browser.evaluate(MONEY_KEYS) == [
            *(f"tenant-{n} (cost)" for n in (6, 5, 4, 3, 2)),
            "2 other tenants (cost)",
            "saved (to the Messages API price)",
        ]
        await assert_fits(browser, "dashboard-spend-by-tenant")
        await browser.evaluate(f"{CHART}.scrollIntoView()")
        await browser.screenshot(ARTIFACTS / "dashboard-spend-by-tenant.png")
