"""Prices as data (migration 0010): each daemon publishes batchd.toml's price table at start, as a set named
by a digest of its contents, and the statement that applies results joins the set of the daemon applying.
Daemons sharing a database with different prices each bill at their own; the rates here are typed by hand,
never read back from batchd's table."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from pricing_by_hand import BATCH, MTOK, RATES, D
from support import QUICK, insert_raw, wait_for_jobs, wait_until
from test_costs import OWNER, submitted_batch

from batchd import results
from batchd.config import Settings
from batchd.emulator import EmulatorConfig
from batchd.store import create_pool, sql

# Two price tables for claude-haiku-4-5 (the tests' model), as two batchd.toml files would give them. Cache
# rates are left out, so they default to 1.25x, 2x and 0.1x the input rate.
CHEAP = {"models": {"claude-haiku-4-5": {"input": "2", "output": "8"}}}
DEAR = {"batch_factor": "0.4", "models": {"claude-haiku-4-5": {"input": "3", "output": "9"}}}


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    return QUICK


def plain_cost(row: Any, input_rate: str, output_rate: str, factor: Decimal) -> Decimal:
    """A request without cache reads or writes, priced by hand."""
    assert row["cache_write_5m_tokens"] == row["cache_write_1h_tokens"] == row["cache_read_tokens"] == 0
    tokens_cost: Decimal = row["input_tokens"] * D(input_rate) + row["output_tokens"] * D(output_rate)
    return tokens_cost / MTOK * factor


async def price_set(db: Any, name: str) -> tuple[Any, dict[str, tuple[Any, ...]]]:
    """A set's batch factor and rows as the database holds them (the factor None when there is no set)."""
    factor = await db.fetchval("SELECT batch_factor FROM batchd.price_sets WHERE id = $1", name)
    rows = await db.fetch(
        "SELECT model, input, output, write_5m, write_1h, read, long_above, long_input, long_output,"
        " long_write_5m, long_write_1h, long_read FROM batchd.prices WHERE price_set = $1",
        name,
    )
    return factor, {row["model"]: tuple(row.values())[1:] for row in rows}


async def test_a_daemon_publishes_its_prices_at_start_and_its_new_ones_when_restarted_with_them(
    db: Any, daemon_settings: Any, start_daemon: Any
) -> None:
    await db.execute("TRUNCATE batchd.price_sets CASCADE")
    first, second = daemon_settings(), daemon_settings(pricing=DEAR)
    assert first.pricing.price_set != second.pricing.price_set
    async with start_daemon(first):
        factor, rows = await price_set(db, first.pricing.price_set)
        assert factor == D("0.5")
        assert rows["claude-haiku-4-5"] == (D(1), D(5), D("1.25"), D(2), D("0.10"), *[None] * 6)
        assert rows["claude-haiku-5-5"] == (
            *(D("0.10"), D("0.50"), D("0.125"), D("0.20"), D("0.01")),
            *(100_000, D("0.50"), D("2.50"), D("0.625"), D(1), D("0.05")),
        ), "with its long-prompt tier"
        assert len(rows) == len(first.pricing.models)
    # Someone edits the set by hand; a start with the same prices writes it whole again.
    await db.execute(
        "UPDATE batchd.prices SET input = 100 WHERE price_set = $1 AND model = 'claude-haiku-4-5'",
        first.pricing.price_set,
    )
    await db.execute(
        "DELETE FROM batchd.prices WHERE price_set = $1 AND model = 'claude-opus-4-5'",
        first.pricing.price_set,
    )
    async with start_daemon(first):
        assert await price_set(db, first.pricing.price_set) == (factor, rows)

    async with start_daemon(second):
        factor, rows = await price_set(db, second.pricing.price_set)
        assert factor == D("0.4")
        assert rows["claude-haiku-4-5"] == (D(3), D(9), D("3.75"), D(6), D("0.3"), *[None] * 6)
        # What it applies is priced at its new prices, not at those of the daemon before it.
        await insert_raw(db, "acme", ["after the restart"])
        assert await wait_for_jobs(db, done=1, timeout=60) == {"succeeded": 1}
    cost = await db.fetchrow("SELECT * FROM batchd.costs")
    assert cost["sync_cost_usd"] == plain_cost(cost, "3", "9", D(1))
    assert cost["cost_usd"] == plain_cost(cost, "3", "9", D("0.4"))
    # The earlier set stays: a daemon still running with it (a rolling restart) prices by it.
    assert await db.fetchval("SELECT count(*) FROM batchd.price_sets") == 2


async def test_two_daemons_with_different_prices_each_bill_what_it_applies_at_its_own(
    db: Any, daemon_settings: Any, start_daemon: Any
) -> None:
    # A rolling change of batchd.toml: `old` runs with the old prices, `new` starts with new ones (publishing
    # last), then `old` stops. `new` sends a batch only when two jobs are queued, so that the one job sent
    # while both run is old's to send and to apply.
    cheap = daemon_settings(pricing=CHEAP)
    dear = daemon_settings(pricing=DEAR, batching={"max_requests": 2, "max_wait_s": 3600})
    running_old = start_daemon(cheap)
    old = await running_old.__aenter__()
    async with start_daemon(dear) as new:
        await insert_raw(db, "acme", ["while both run"])
        assert await wait_for_jobs(db, done=1, timeout=60) == {"succeeded": 1}

        async def finished() -> bool:
            # A job succeeds when its results are applied, a moment before its batch is finished: stopped
            # in between, `old` would hand the batch back and `new` would finish it, and own it.
            return bool(await db.fetchval("SELECT bool_and(status = 'applied') FROM batchd.batches"))

        await wait_until(finished, timeout=30)
        await running_old.__aexit__(None, None, None)
        await insert_raw(db, "acme", ["after the old one stopped 1", "after the old one stopped 2"])
        assert await wait_for_jobs(db, done=3, timeout=60) == {"succeeded": 3}
    costs = await db.fetch(
        "SELECT c.*, b.owner FROM batchd.costs AS c JOIN batchd.batches AS b ON b.id = c.batch_id"
        " ORDER BY c.at, c.job_id"
    )
    owners = {old.ctx.instance_id: "old", new.ctx.instance_id: "new"}
    assert [owners[row["owner"]] for row in costs] == ["old", "new", "new"]
    assert costs[0]["cost_usd"] == plain_cost(costs[0], "2", "8", BATCH), "old's prices, published first"
    for row in costs[1:]:
        assert row["cost_usd"] == plain_cost(row, "3", "9", D("0.4"))
    assert costs[0]["sync_cost_usd"] == plain_cost(costs[0], "2", "8", D(1))
    assert all(row["sync_cost_usd"] == plain_cost(row, "3", "9", D(1)) for row in costs[1:])


# -- the statement, driven directly ------------------------------------------------------------------------


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=4)
    yield pool
    await pool.close()


def succeeded(job_id: uuid.UUID, model: str = "claude-haiku-4-5") -> results.Row:
    usage = {"input_tokens": 1000, "output_tokens": 100}
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "usage": usage,
    }
    return (job_id, "succeeded", json.dumps(message), None)


async def test_the_apply_statement_takes_four_parameters_not_the_price_table(db: Any) -> None:
    async with db.transaction():
        await db.execute(sql("create_results_table"))
        statement = await db.prepare(sql("apply_results"))
        assert [t.name for t in statement.get_parameters()] == ["uuid", "int4", "text", "text"]


async def test_an_apply_into_a_database_without_the_set_publishes_it_and_prices_by_it(
    db: Any, pool: asyncpg.Pool
) -> None:
    # A process that applies without having started a daemon here (a tool, a test), or a set removed by
    # hand: the first apply finds no set, writes nothing, publishes it, and applies.
    await db.execute("TRUNCATE batchd.price_sets CASCADE")
    settings = Settings(pricing=CHEAP)
    ctx: Any = SimpleNamespace(pool=pool, settings=settings, instance_id=OWNER)
    batch, job_ids = await submitted_batch(db, "acme", 3)
    rows = [succeeded(job_ids[0]), succeeded(job_ids[1]), succeeded(job_ids[2], "claude-sonnet-4-5")]
    changed = await results.apply_rows(ctx, rows, results.RESULT_COLUMNS, batch_id=batch.id, owner=OWNER)
    assert changed == 3
    assert (await price_set(db, settings.pricing.price_set))[0] == BATCH
    costs = await db.fetch("SELECT model, cost_usd, sync_cost_usd FROM batchd.costs ORDER BY model")
    sonnet = RATES["claude-sonnet-4-5"]
    assert [tuple(row) for row in costs] == [
        ("claude-haiku-4-5", D("0.0028") * BATCH, D("0.0028")),
        ("claude-haiku-4-5", D("0.0028") * BATCH, D("0.0028")),
        (
            "claude-sonnet-4-5",
            (1000 * sonnet[0] + 100 * sonnet[1]) / MTOK * BATCH,
            (1000 * sonnet[0] + 100 * sonnet[1]) / MTOK,
        ),
    ]
    assert await db.fetchval("SELECT count(*) FROM batchd.events WHERE type = 'job.succeeded'") == 3


async def test_daemons_starting_together_all_publish_their_prices(db: Any, database_url: str) -> None:
    # Instances restarted at once, some with the same prices: none fails, and every set is whole.
    configs = [Settings(), Settings(pricing=CHEAP), Settings(pricing=DEAR)]
    connections = [await asyncpg.connect(database_url) for _ in range(6)]
    try:
        for _ in range(10):
            names = await asyncio.gather(
                *(results.publish_prices(c, configs[n % 3].pricing) for n, c in enumerate(connections))
            )
            assert names == [configs[n % 3].pricing.price_set for n in range(6)]
            for config in configs:
                factor, rows = await price_set(db, config.pricing.price_set)
                assert factor == config.pricing.batch_factor
                assert len(rows) == len(config.pricing.models)
    finally:
        for connection in connections:
            await connection.close()
