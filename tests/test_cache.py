"""Prompt caching inside batches: a job type with `cache = "1h"` sends its system prompt marked for the
1-hour cache; the emulator's cache writes it once and the batch's other jobs read it; the ledger prices the
write at the 1-hour rate and the reads at a tenth of the input rate, both times the batch factor (rates
typed by hand, not batchd's table); `batchd report` gives the job type's hit ratio worked out here by hand,
and GET /metrics shows the same per tenant and model numbers as `batchd report --format json`."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pricing_by_hand import BATCH, MTOK, RATES, D, sync_price, token_counts
from support import ADMIN_TOKEN, QUICK, EmulatorHandle, insert_raw, run_python, wait_for_jobs, wait_until
from test_metrics import Scrape, scrape, settled

from batchd import report
from batchd.config import ConfigError, load_settings
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig

MODEL = "claude-haiku-4-5"
# About 1,150 tokens by the emulator's count: over the 1,024 a prefix needs to be cached.
SYSTEM = "You answer questions about our refund policy, which is: refunds within thirty days. " * 55
FAQ = {
    "model": MODEL,
    "max_tokens": 256,
    "fields": ["question"],
    "system": SYSTEM,
    "prompt": "Question: {question}",
    "cache": "1h",
}


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    # A second model, for a second row per tenant and model (the installed SDK may not list it).
    return QUICK.model_copy(update={"extra_models": frozenset({"claude-sonnet-4-5"})})


async def test_a_cached_job_type_writes_once_reads_after_and_is_reported_and_scraped_alike(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, database_url: str, tmp_path: Path
) -> None:
    settings = daemon_settings(
        batching={"max_requests": 100, "max_wait_s": 0.3},
        job_types={"faq": FAQ, "plain": {**FAQ, "cache": None, "system": None}},
    )
    daemon = Daemon(settings, admin_token=ADMIN_TOKEN)
    async with daemon.running(), aiohttp.ClientSession() as http:
        assert daemon.http_url is not None
        await db.execute(
            "INSERT INTO batchd.jobs (tenant_id, job_type, input)"
            " SELECT 'acme', 'faq', jsonb_build_object('question', 'may I return item ' || i)"
            "   FROM generate_series(1, 6) AS i"
        )
        await db.execute(
            "INSERT INTO batchd.jobs (tenant_id, job_type, input)"
            " VALUES ('acme', 'plain', '{\"question\": \"hi\"}')"
        )
        await insert_raw(db, "globex", [f"sonnet question {i}" for i in range(3)], model="claude-sonnet-4-5")
        assert await wait_for_jobs(db, done=10) == {"succeeded": 10}
        await wait_until(lambda: settled(db), timeout=20)
        # The first scrape since the daemon started: it reads the ledger as it stands (and it stands still).
        got = await scrape(http, daemon.http_url)
        again = await scrape(http, daemon.http_url)
        assert again.by_labels("batchd_cost_usd_total") == got.by_labels("batchd_cost_usd_total")
        assert daemon.readings.ledger_queries == 1, (
            "the money is read at most once per http.metrics_interval_s"
        )

    # The params as sent: the system prompt as one text block marked for the 1-hour cache.
    faq = await db.fetch(
        "SELECT id, params, usage, result ->> 'model' AS model FROM batchd.jobs"
        " WHERE job_type = 'faq' ORDER BY submitted_at, id"
    )
    for job in faq:
        assert job["params"]["system"] == [
            {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
        ]
    plain = await db.fetchval("SELECT params FROM batchd.jobs WHERE job_type = 'plain'")
    assert "system" not in plain, "a job type without `cache` (and here without a system) is sent unmarked"

    # The emulator's cache: one job wrote the prefix for an hour, every other one read it.
    counts = [token_counts(job["usage"]) for job in faq]
    writers = [c for c in counts if c[3] > 0]
    readers = [c for c in counts if c[4] > 0]
    assert len(writers) == 1
    assert len(readers) == 5
    assert all(c[2] == 0 for c in counts), "no 5-minute writes: the mark asked for 1 hour"
    assert writers[0][3] == readers[0][4], "the reads are of the prefix written"

    # The ledger: the 1h write at the 1h rate x the batch factor, reads at 0.1x input x the batch factor.
    input_rate, output_rate, _, write_1h_rate, read_rate = RATES[MODEL]
    assert write_1h_rate == 2 * input_rate
    assert read_rate == input_rate / 10
    costs = {row["job_id"]: row for row in await db.fetch("SELECT * FROM batchd.costs")}
    for job, (inp, out, _, w1h, read) in zip(faq, counts, strict=True):
        row = costs[job["id"]]
        assert row["job_type"] == "faq"
        assert (row["cache_write_1h_tokens"], row["cache_read_tokens"]) == (w1h, read)
        by_hand = (
            inp * input_rate * BATCH
            + out * output_rate * BATCH
            + w1h * D(2) * input_rate * BATCH
            + read * D("0.1") * input_rate * BATCH
        ) / MTOK
        assert row["cost_usd"] == by_hand
        assert row["sync_cost_usd"] == sync_price(MODEL, job["usage"])

    # The hit ratio by hand: cache reads over every prompt token (input, cache writes, cache reads).
    prompt = sum(inp + w5 + w1h + read for inp, _, w5, w1h, read in counts)
    hand_ratio = sum(c[4] for c in counts) / prompt
    assert 0.5 < hand_ratio < 1

    as_json = await check_report(database_url, tmp_path, hand_ratio, counts)

    # /metrics: the report's numbers per tenant and model, and the hit ratio per job type.
    assert_scrape_matches_report(got, as_json)
    assert got.value("batchd_cache_hit_ratio", job_type="faq") == pytest.approx(hand_ratio, abs=1e-12)
    assert got.value("batchd_prompt_tokens_total", job_type="faq", kind="cache_read") == sum(
        c[4] for c in counts
    )
    assert got.value("batchd_cache_hit_ratio", job_type="") == 0, "raw requests, unmarked"


async def check_report(
    database_url: str, tmp_path: Path, hand_ratio: float, counts: list[tuple[int, int, int, int, int]]
) -> dict[str, Any]:
    """`batchd report` in its three formats gives faq the ratio worked out by hand; returns its JSON."""
    env = {**os.environ, "BATCHD_DATABASE__URL": database_url}
    env.pop("BATCHD_CONFIG", None)
    status, out, err = await run_python("-m", "batchd", "report", "--format", "json", env=env, cwd=tmp_path)
    assert status == 0, err
    as_json: dict[str, Any] = json.loads(out)
    by_type = {row["job_type"]: row for row in as_json["job_types"]}
    assert set(by_type) == {"faq", "plain", None}, "raw requests are job type null"
    assert by_type["faq"]["cache_hit_ratio"] == hand_ratio
    assert by_type["faq"]["cache_read_tokens"] == sum(c[4] for c in counts)
    assert by_type["faq"]["cache_write_1h_tokens"] == max(c[3] for c in counts)
    assert by_type["plain"]["cache_hit_ratio"] == 0
    status, table, err = await run_python("-m", "batchd", "report", env=env, cwd=tmp_path)
    assert status == 0, err
    faq_line = next(line for line in table.splitlines() if line.startswith("faq "))
    assert faq_line.split()[-1] == f"{hand_ratio:.1%}"
    assert "(raw requests)" in table
    status, out, err = await run_python(
        "-m", "batchd", "report", "--cache", "--format", "csv", env=env, cwd=tmp_path
    )
    assert status == 0, err
    rows = {row["job_type"]: row for row in csv.DictReader(io.StringIO(out))}
    assert float(rows["faq"]["cache_hit_ratio"]) == hand_ratio

    return as_json


def assert_scrape_matches_report(got: Scrape, as_json: dict[str, Any]) -> None:
    rows = as_json["rows"]
    assert {
        (s.labels["tenant"], s.labels["model"]) for s in got.samples if s.name == "batchd_saved_usd_total"
    } == {(row["tenant_id"], row["model"]) for row in rows}
    for row in rows:
        tenant, model = row["tenant_id"], row["model"]

        def summed(name: str, row_: dict[str, Any] = row, **labels: str) -> float:
            return sum(
                s.value
                for s in got.samples
                if s.name == name
                and s.labels.get("tenant") == row_["tenant_id"]
                and s.labels.get("model") == row_["model"]
                and all(s.labels.get(k) == v for k, v in labels.items())
            )

        assert summed("batchd_billed_jobs_total") == row["jobs"], (tenant, model)
        assert summed("batchd_cost_usd_total") == pytest.approx(row["cost_usd"], abs=1e-9)
        assert summed("batchd_sync_cost_usd_total") == pytest.approx(row["sync_cost_usd"], abs=1e-9)
        assert summed("batchd_saved_usd_total") == pytest.approx(row["saved_usd"], abs=1e-9)
        for kind in ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read"):
            assert summed("batchd_tokens_total", kind=kind) == row[f"{kind}_tokens"], (tenant, model, kind)
    assert sum(row["saved_usd"] for row in rows) > 0


def test_the_cache_option_is_checked_at_start(tmp_path: Path) -> None:
    def config(cache: str, system: str = 'system = "Shared instructions."') -> Path:
        path = tmp_path / "batchd.toml"
        path.write_text(
            f"""
[job_types.faq]
model = "{MODEL}"
max_tokens = 100
fields = ["q"]
prompt = "{{q}}"
{system}
{cache}
"""
        )
        return path

    assert load_settings(config('cache = "1h"')).job_types["faq"].cache == "1h"
    assert load_settings(config('cache = "5m"')).job_types["faq"].cache == "5m"
    assert load_settings(config("")).job_types["faq"].cache is None
    with pytest.raises(ConfigError, match=r'job_types\.faq\.cache: .*must be "5m" or "1h".*got \'2h\''):
        load_settings(config('cache = "2h"'))
    with pytest.raises(ConfigError, match=r"job_types\.faq\.cache: .*got 3600"):
        load_settings(config("cache = 3600"))
    with pytest.raises(ConfigError, match="this job type has no `system`"):
        load_settings(config('cache = "1h"', system=""))
    # The shipped example marks one job type.
    shipped = load_settings(Path(__file__).resolve().parent.parent / "batchd.toml")
    assert any(job_type.cache == "1h" for job_type in shipped.job_types.values())


def test_the_hit_ratio_is_reads_over_every_prompt_token() -> None:
    assert report.cache_hit_ratio(100, 0, 0) == 0
    assert report.cache_hit_ratio(10, 1000, 0) == 0
    assert report.cache_hit_ratio(10, 0, 990) == 990 / 1000
    assert report.cache_hit_ratio(0, 0, 0) is None
