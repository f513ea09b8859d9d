"""The cost ledger and `batchd report`: every succeeded job priced once, by the rates typed by hand here
(from the pricing page, not from batchd's table); errored, expired and canceled requests cost nothing; a
result applied twice is counted once; the report's totals are the jobs' usage priced by hand."""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from pricing_by_hand import BATCH, MTOK, RATES, D, cached, sync_price, token_counts
from pydantic import ValidationError
from support import QUICK, EmulatorHandle, insert_raw, run_python, wait_for_jobs

from batchd import report, results
from batchd.config import Settings, load_settings
from batchd.emulator import EmulatorConfig
from batchd.metrics import Metrics
from batchd.pricing import PricingSettings
from batchd.store import create_pool
from batchd.templates import custom_id

UNPRICED = "claude-test-unpriced"
SYSTEM = "You are a careful analyst. " * 200  # about 1,350 tokens: long enough to be cached


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK.model_copy(update={"extra_models": frozenset({UNPRICED})})


async def ledger(db: Any) -> dict[str, dict[str, Any]]:
    return {str(row["job_id"]): dict(row) for row in await db.fetch("SELECT * FROM batchd.costs")}


async def test_each_succeeded_job_costs_what_its_usage_priced_by_hand_says(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, start_daemon: Any
) -> None:
    async with start_daemon(daemon_settings(batching={"max_requests": 100, "max_wait_s": 0.3})):
        await insert_raw(db, "acme", [f"plain question {i}" for i in range(5)])
        await insert_raw(db, "acme", [f"1h cached {i}" for i in range(4)], system=cached(SYSTEM, "1h"))
        await insert_raw(
            db, "acme", [f"5m cached {i}" for i in range(3)], system=cached("5m: " + SYSTEM, "5m")
        )
        await insert_raw(db, "globex", [f"sonnet {i}" for i in range(3)], model="claude-sonnet-4-5")
        await insert_raw(db, "globex", ["dated 1", "dated 2"], model="claude-haiku-4-5-20251001")
        await insert_raw(db, "globex", ["short haiku 5.5"], model="claude-haiku-5-5")
        await insert_raw(db, "globex", ["long " + "x" * 400_400], model="claude-haiku-5-5")  # > 100k tokens
        await insert_raw(db, "initech", ["no price 1", "no price 2"], model=UNPRICED)
        counts = await wait_for_jobs(db, done=21, timeout=60)
    assert counts == {"succeeded": 21}
    jobs = await db.fetch(
        "SELECT id, tenant_id, attempts, job_type, usage, result ->> 'model' AS model FROM batchd.jobs"
    )
    rows = await ledger(db)
    assert len(rows) == 21, "one ledger row per succeeded job"
    spent: dict[str, Decimal] = defaultdict(Decimal)
    for job in jobs:
        row = rows[str(job["id"])]
        assert (row["tenant_id"], row["model"], row["attempt"]) == (
            job["tenant_id"],
            job["model"],
            job["attempts"],
        )
        counts_ = token_counts(job["usage"])
        assert (
            row["input_tokens"],
            row["output_tokens"],
            row["cache_write_5m_tokens"],
            row["cache_write_1h_tokens"],
            row["cache_read_tokens"],
        ) == counts_
        if job["model"] == UNPRICED:
            assert row["cost_usd"] is None, "no price: null, the tokens kept"
            assert row["sync_cost_usd"] is None
            continue
        sync = sync_price(job["model"], job["usage"])
        assert row["sync_cost_usd"] == sync, job["model"]
        assert row["cost_usd"] == sync * BATCH, "the batch discount stacks with every rate"
        spent[job["tenant_id"]] += sync * BATCH
    # Every kind of token was billed at least once, so every rate was checked.
    assert all(
        sum(row[f] for row in rows.values()) > 0 for f in ("cache_write_5m_tokens", "cache_write_1h_tokens")
    )
    assert sum(row["cache_read_tokens"] for row in rows.values()) > 0
    long_job = next(row for row in rows.values() if row["input_tokens"] > 100_000)
    assert (
        long_job["sync_cost_usd"]
        == long_job["input_tokens"] * D("0.50") / MTOK + long_job["output_tokens"] * D("2.50") / MTOK
    ), "a long prompt is billed at the long-prompt rates, output included"
    # A cache read inside a batch costs 0.05x the base input price.
    reader = next(
        row for row in rows.values() if row["cache_read_tokens"] and row["model"] == "claude-haiku-4-5"
    )
    assert reader["cache_write_5m_tokens"] == reader["cache_write_1h_tokens"] == 0
    base_input = RATES["claude-haiku-4-5"][0]
    assert reader["cost_usd"] == (
        reader["input_tokens"] * base_input + reader["output_tokens"] * D(5)
    ) / MTOK * BATCH + (reader["cache_read_tokens"] * D("0.05") * base_input / MTOK)
    # The tenants' spend (what budgets read) is the ledger's.
    spend = await db.fetch(
        "SELECT tenant_id, sum(cost_usd) AS usd FROM batchd.spend GROUP BY tenant_id HAVING sum(cost_usd) > 0"
    )
    assert {row["tenant_id"]: row["usd"] for row in spend} == dict(spent)


# -- the apply, driven directly: the same chunk twice, and results that are not billed ---------------------


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=2)
    yield pool
    await pool.close()


OWNER = "batchd-test00000000"  # the daemon holding the batches' lease: results apply only under it


async def submitted_batch(db: Any, tenant: str, count: int) -> tuple[Any, list[uuid.UUID]]:
    """Jobs in an ended batch, as the poller leaves them before the results are applied."""
    batch_id = await db.fetchval(
        "INSERT INTO batchd.batches (tag, request_count, bytes, status, owner)"
        " VALUES ($1, $2, 0, 'ended', $3) RETURNING id",
        uuid.uuid4().hex[:12],
        count,
        OWNER,
    )
    job_ids = await insert_raw(db, tenant, [f"{tenant} job {i}" for i in range(count)])
    await db.execute(
        "UPDATE batchd.jobs SET status = 'submitted', batch_id = $1 WHERE id = ANY($2::uuid[])",
        batch_id,
        job_ids,
    )
    return SimpleNamespace(id=batch_id, tag="abcdefabcdef"), job_ids


def message(model: str, usage: dict[str, Any]) -> str:
    return json.dumps(
        {
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
    )


async def apply(pool: asyncpg.Pool, batch: Any, rows: list[results.Row]) -> int:
    ctx: Any = SimpleNamespace(pool=pool, settings=Settings(), instance_id=OWNER)
    return await results._apply_rows(ctx, batch, rows)


async def test_a_result_applied_twice_is_counted_once(db: Any, pool: asyncpg.Pool) -> None:
    batch, job_ids = await submitted_batch(db, "acme", 3)
    # Old-style usage: cache writes without the TTL split are all priced as 5-minute writes.
    usage = {
        "input_tokens": 1000,
        "output_tokens": 200,
        "cache_creation_input_tokens": 2048,
        "cache_read_input_tokens": 0,
    }
    rows: list[results.Row] = [
        (job_id, "succeeded", message("claude-sonnet-4-5", usage), None) for job_id in job_ids
    ]
    per_job = (1000 * D(3) + 200 * D(15) + 2048 * D("3.75")) / MTOK * BATCH
    assert await apply(pool, batch, rows) == 3
    assert await apply(pool, batch, rows) == 0, "the second time changes no job"
    # Even a job put back to `submitted` by hand and applied again (the same attempt) is not billed again.
    await db.execute("UPDATE batchd.jobs SET status = 'submitted' WHERE id = $1", job_ids[0])
    assert await apply(pool, batch, rows[:1]) == 1
    costs = await db.fetch("SELECT cost_usd, cache_write_5m_tokens FROM batchd.costs")
    assert [row["cost_usd"] for row in costs] == [per_job] * 3
    assert {row["cache_write_5m_tokens"] for row in costs} == {2048}
    assert await db.fetchval("SELECT sum(cost_usd) FROM batchd.spend") == per_job * 3


async def test_errored_expired_and_canceled_requests_cost_nothing(db: Any, pool: asyncpg.Pool) -> None:
    batch, job_ids = await submitted_batch(db, "acme", 5)
    rows: list[results.Row] = []
    lines = [
        {
            "type": "errored",
            "error": {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}},
        },
        {"type": "errored", "error": {"type": "error", "error": {"type": "api_error", "message": "oops"}}},
        {
            "type": "errored",
            "error": {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
        },
        {"type": "expired"},
        {"type": "canceled"},
    ]
    tag = "abcdefabcdef"
    for job_id, result in zip(job_ids, lines, strict=True):
        row = results.classify_parsed({"custom_id": custom_id(tag, job_id), "result": result}, tag)
        assert row is not None
        rows.append(row)
    assert await apply(pool, batch, rows) == 5
    statuses = await db.fetch("SELECT status, count(*) AS n FROM batchd.jobs GROUP BY status")
    assert {row["status"]: row["n"] for row in statuses} == {"failed": 1, "queued": 4}
    assert await db.fetchval("SELECT count(*) FROM batchd.costs") == 0
    assert await db.fetchval("SELECT sum(cost_usd) FROM batchd.spend") == 0


async def test_a_usage_with_odd_counts_is_applied_with_them_at_zero(db: Any, pool: asyncpg.Pool) -> None:
    batch, job_ids = await submitted_batch(db, "acme", 2)
    tag = "abcdefabcdef"
    usages = [
        {"input_tokens": "lots", "output_tokens": 10},
        {"input_tokens": 100, "output_tokens": 10, "cache_creation": {"ephemeral_1h_input_tokens": 1.5}},
    ]
    raw = [
        json.dumps(
            {
                "custom_id": custom_id(tag, job_id),
                "result": {"type": "succeeded", "message": json.loads(message("claude-haiku-4-5", usage))},
            },
            separators=(",", ":"),
        ).encode()
        for job_id, usage in zip(job_ids, usages, strict=True)
    ]
    rows = [row for row in (results.classify(line, tag) for line in raw) if row is not None]
    ctx: Any = SimpleNamespace(pool=pool, settings=Settings(), metrics=Metrics(), instance_id=OWNER)
    await results._apply_chunk(ctx, batch, rows, raw)  # the plain casts fail; the lines are parsed one by one
    assert await db.fetchval("SELECT count(*) FROM batchd.jobs WHERE status = 'succeeded'") == 2
    costs = {
        row["job_id"]: row
        for row in await db.fetch(
            "SELECT job_id, input_tokens, cache_write_1h_tokens, cost_usd FROM batchd.costs"
        )
    }
    assert costs[job_ids[0]]["input_tokens"] == 0
    assert costs[job_ids[0]]["cost_usd"] == 10 * D(5) / MTOK * BATCH
    assert costs[job_ids[1]]["cache_write_1h_tokens"] == 0
    assert costs[job_ids[1]]["cost_usd"] == (100 * D(1) + 10 * D(5)) / MTOK * BATCH


# -- `batchd report` -----------------------------------------------------------------------------------------


async def seed_ledger(db: Any, pool: asyncpg.Pool) -> dict[tuple[str, str], dict[str, Any]]:
    """Three tenants' jobs applied; returns, per (tenant, model), jobs, tokens and the costs by hand."""
    shapes: dict[tuple[str, str], dict[str, Any]] = {
        ("acme", "claude-haiku-4-5"): {"input_tokens": 310, "output_tokens": 95},
        ("acme", "claude-opus-4-5"): {
            "input_tokens": 52,
            "output_tokens": 400,
            "cache_creation_input_tokens": 3000,
            "cache_read_input_tokens": 9000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
        },
        ("globex", "claude-sonnet-4-5"): {"input_tokens": 7000, "output_tokens": 1200},
        ("initech", "claude-haiku-4-5-20251001"): {"input_tokens": 18, "output_tokens": 7},
    }
    expected: dict[tuple[str, str], dict[str, Any]] = {}
    for n, ((tenant, model), usage) in enumerate(shapes.items(), start=2):
        batch, job_ids = await submitted_batch(db, tenant, n)
        await apply(pool, batch, [(job_id, "succeeded", message(model, usage), None) for job_id in job_ids])
        sync = sync_price(model, usage) * n
        counts = token_counts(usage)
        expected[(tenant, model)] = {
            "jobs": n,
            "input_tokens": counts[0] * n,
            "output_tokens": counts[1] * n,
            "cache_write_tokens": (counts[2] + counts[3]) * n,
            "cache_read_tokens": counts[4] * n,
            "cost_usd": sync * BATCH,
            "sync_cost_usd": sync,
        }
    return expected


async def test_the_report_totals_are_the_usage_priced_by_hand(db: Any, pool: asyncpg.Pool) -> None:
    expected = await seed_ledger(db, pool)
    collected = await report.collect(db)
    by_key = {(row["tenant_id"], row["model"]): row for row in collected["rows"]}
    assert set(by_key) == set(expected)
    for key, hand in expected.items():
        for field, value in hand.items():
            assert by_key[key][field] == value, (key, field)
    cost = sum((hand["cost_usd"] for hand in expected.values()), D(0))
    sync = sum((hand["sync_cost_usd"] for hand in expected.values()), D(0))
    totals = collected["totals"]
    assert (totals["cost_usd"], totals["sync_cost_usd"], totals["saved_usd"]) == (cost, sync, sync - cost)
    assert totals["jobs"] == sum(hand["jobs"] for hand in expected.values())
    assert sync - cost == cost, "at half price, batching saved as much as it cost"
    acme = next(t for t in collected["tenants"] if t["tenant_id"] == "acme")
    assert (
        acme["cost_usd"]
        == expected[("acme", "claude-haiku-4-5")]["cost_usd"]
        + expected[("acme", "claude-opus-4-5")]["cost_usd"]
    )

    table = report.render_table(collected)
    (total_line,) = [line for line in table.splitlines() if line.startswith("TOTAL")]
    assert table.startswith("Costs, "), "the costs come first, the prompt cache after them"
    assert total_line.split()[:2] == ["TOTAL", str(totals["jobs"])]
    assert f"{cost:,.4f}" in total_line
    assert f"{sync:,.4f}" in total_line
    assert "50.0%" in total_line
    assert "(all models)" in table, "a tenant with two models gets a subtotal"

    parsed = list(csv.DictReader(io.StringIO(report.render_csv(collected))))
    assert parsed[-1]["tenant_id"] == "TOTAL"
    assert D(parsed[-1]["cost_usd"]) == cost, "CSV keeps every digit"
    assert D(parsed[-1]["saved_usd"]) == sync - cost
    assert sum(D(row["cost_usd"]) for row in parsed[:-1]) == cost

    as_json = json.loads(report.render_json(collected), parse_float=D)
    assert as_json["totals"]["cost_usd"] == cost.quantize(D("1e-9"))
    assert as_json["totals"]["saved_usd"] == (sync - cost).quantize(D("1e-9"))

    only_globex = await report.collect(db, tenant="globex")
    assert [row["tenant_id"] for row in only_globex["rows"]] == ["globex"]
    assert only_globex["totals"]["cost_usd"] == expected[("globex", "claude-sonnet-4-5")]["cost_usd"]
    later = await report.collect(db, since=report.parse_since("2999-01-01"))
    assert later["rows"] == []
    assert later["totals"]["cost_usd"] == 0


async def test_the_report_command_prints_table_csv_and_json(
    db: Any, pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    expected = await seed_ledger(db, pool)
    cost = sum((hand["cost_usd"] for hand in expected.values()), D(0))
    env = {**os.environ, "BATCHD_DATABASE__URL": database_url}
    env.pop("BATCHD_CONFIG", None)
    status, out, err = await run_python("-m", "batchd", "report", "--since", "7d", env=env, cwd=tmp_path)
    assert status == 0, err
    assert any(line.startswith("TOTAL") for line in out.splitlines())
    assert "globex" in out
    assert "initech" in out
    status, out, err = await run_python("-m", "batchd", "report", "--format", "json", env=env, cwd=tmp_path)
    assert status == 0, err
    assert json.loads(out, parse_float=D)["totals"]["cost_usd"] == cost.quantize(D("1e-9"))
    status, out, err = await run_python(
        "-m", "batchd", "report", "--format", "csv", "--tenant", "acme", env=env, cwd=tmp_path
    )
    assert status == 0, err
    assert [row["model"] for row in csv.DictReader(io.StringIO(out))] == [
        "claude-haiku-4-5",
        "claude-opus-4-5",
        "",
    ]
    status, _, err = await run_python(
        "-m", "batchd", "report", "--since", "last tuesday", env=env, cwd=tmp_path
    )
    assert status == 65
    assert "--since" in err


# -- the pricing table -------------------------------------------------------------------------------------


def test_the_pricing_table_in_batchd_toml_is_the_built_in_one_and_is_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repository = load_settings(Path(__file__).resolve().parent.parent / "batchd.toml")
    assert repository.pricing == PricingSettings()
    for model, (input_, output, write_5m, write_1h, read) in RATES.items():
        rates = repository.pricing.rates_for(model)
        assert rates is not None
        assert (rates.input, rates.output, rates.cache_write_5m, rates.cache_write_1h, rates.cache_read) == (
            input_,
            output,
            write_5m,
            write_1h,
            read,
        )
    assert repository.pricing.rates_for("claude-opus-4-5-20251101") == repository.pricing.rates_for(
        "claude-opus-4-5"
    )
    assert repository.pricing.rates_for("claude-nope-1") is None
    # An entry replaces one model's rates, the rest stay; cache rates default to the page's multipliers.
    custom = Settings(pricing={"models": {"claude-haiku-4-5": {"input": "2", "output": "8"}}})
    haiku = custom.pricing.rates_for("claude-haiku-4-5")
    assert haiku is not None
    assert (haiku.cache_write_5m, haiku.cache_write_1h, haiku.cache_read) == (D("2.50"), D(4), D("0.2"))
    assert custom.pricing.rates_for("claude-sonnet-4-5") == repository.pricing.rates_for("claude-sonnet-4-5")
    monkeypatch.setenv("BATCHD_PRICING__BATCH_FACTOR", "0.4")
    assert Settings().pricing.batch_factor == D("0.4")
    monkeypatch.delenv("BATCHD_PRICING__BATCH_FACTOR")
    with pytest.raises(ValidationError, match="job type 'x' uses model 'claude-nope-1', which has no price"):
        Settings(job_types={"x": {"model": "claude-nope-1", "max_tokens": 5, "prompt": "hi"}})
    with pytest.raises(ValidationError, match="batch_factor"):
        Settings(pricing={"batch_factor": 0})
