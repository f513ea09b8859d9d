"""The whole pipeline at 100,000 jobs of about 1 KB, each stage next to the plain SQL doing the same work.

One run, on a scratch database made for it and dropped afterwards, with the emulator in a subprocess. Each
stage is a benchmark of its own over bench/benchlib.py, and all but stage 2/3 can be run alone too:

1. Producers' INSERTs, by the state of the `jobs_inserted` trigger (bench/trigger_cost.py): disabled (the
   baseline), steady, armed and stuck; bulk statements of 1,000 rows and 8 one-row producers, short slices
   taking turns for a number of rounds, medians reported with the range.
2. `Flusher.flush_one()` (claim, encode, record) and `submitter.submit()` (the create through the SDK),
   next to the raw claim (one UPDATE ... FROM a FOR UPDATE SKIP LOCKED CTE) and a raw create (the same
   kind of body POSTed with aiohttp, then one UPDATE), in turns for --pipeline-rounds rounds. Each round
   empties the tables and queues N jobs for the first side, then N more behind its batch for the second;
   the raw side goes first in odd rounds, batchd in even ones. (This file.)
   2b. The claim path by queue shape (bench/fair.py): `Flusher.flush_one()` next to the raw claim, in turns
   for a few rounds, on one tenant's 100,000 jobs (the FIFO case), 100 tenants' 1,000 each, and 100,000 + 10.
3. In each round of stage 2, once the emulator has ended both batches: `results.apply_results()` next to a
   raw COPY of the same results into a temporary table and one UPDATE ... FROM, in the round's order; then
   both batches are deleted from the emulator (DELETE /v1/messages/batches/{id}, as the real API allows
   once a batch has ended), so its memory does not grow with the rounds. Each apply runs in a subprocess
   of its own, whose peak resident memory (VmHWM, reset just before the step) is the step's alone: after
   the rounds, batches of N/10 and N/2 are applied once, next to the round at N with the highest peak.
   (This file.)
4. A burst of N jobs (statements of 1,000) into a running daemon (bench/burst.py), timed until the batch has
   its provider_batch_id, and until its jobs are recorded submitted; --burst-rounds times.
5. pgqueuer draining N jobs of 1 KB with a no-op entrypoint, 5 consumers, batch size 500
   (bench/pgqueuer_drain.py, in a subprocess each time), --claim-rounds times back to back; batchd's claim
   (the FIFO case's median in stage 2b) is held against pgqueuer's best round.

Every row with a baseline shows batchd's median and range (min-max) over its rounds next to the baseline's;
the verdicts are on the medians. The machine's load average is printed at the start, after each stage and
at the end, and listed in the table's last row. Every timed step on the database starts after VACUUM
(ANALYZE) and CHECKPOINT, and autovacuum is off on batchd.jobs in the scratch database, so no step inherits
another's dirty pages or a vacuum mid-way.

    .venv/bin/python bench/pipeline.py [--jobs 100000] [--rounds 8] [--producer-seconds 0.5]
                                       [--pipeline-rounds 3] [--claim-rounds 3] [--burst-rounds 3]
                                       [--apply-only]

Prints a Markdown table with a verdict per target, and exits non-zero when a target is missed or a check
(every job claimed, sent, applied, drained exactly once) fails. Needs pgqueuer (a bench-only dependency)
unless --apply-only.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import burst as burst_stage
import fair as fair_stage
import trigger_cost
from benchlib import (
    API_KEY,
    CHUNK_ROWS,
    INSERT_CHUNK,
    MIB,
    RAW_BATCH,
    RAW_CLAIM,
    EmulatorProcess,
    LoadLog,
    Row,
    api_headers,
    bench_parser,
    bench_settings,
    build_requests,
    check_arguments,
    chunked,
    finish,
    fresh_queue,
    in_turns,
    interrupt_on_sigterm,
    machine,
    per_s,
    rate_spread,
    run_json_child,
    running,
    settle,
    speed_ratio,
    status_mib,
    timing_database,
)
from pgqueuer_drain import PGQUEUER_BATCH_SIZE, PGQUEUER_CONSUMERS

from batchd import log as batchd_log
from batchd import store
from batchd.context import Context
from batchd.flusher import Flusher
from batchd.poller import poll_until_ended
from batchd.provider import Provider
from batchd.publisher import publish
from batchd.ratelimit import RateLimiter
from batchd.results import apply_results, publish_prices
from batchd.store import Batch
from batchd.submitter import submit

EMULATOR_PROCESSING_S = 3_600  # batches end only when the clock is pushed
CHILD_TIMEOUT_S = 300.0
SCRIPT = str(Path(__file__).resolve())
PGQUEUER_SCRIPT = str(Path(__file__).resolve().with_name("pgqueuer_drain.py"))

# Targets.
MIN_RAW_RATIO = 0.5  # each batchd stage at least half the speed of its raw SQL
MIN_PGQUEUER_RATIO = 2.0  # batchd's claim at least twice pgqueuer's drain
MAX_MEMORY_GROWTH_MIB = 8.0  # the apply's peak at N at most this much above its peak at N/10

RAW_SUBMITTED = """
UPDATE batchd.jobs SET status = 'submitted', submitted_at = now()
 WHERE batch_id = $1 AND status = 'submitting'
"""
RAW_RESULTS_TABLE = "CREATE TEMPORARY TABLE raw_results (job_id uuid NOT NULL, result text) ON COMMIT DROP"
RAW_APPLY = """
UPDATE batchd.jobs AS j SET status = 'succeeded', result = r.result::jsonb, completed_at = now()
  FROM raw_results AS r
 WHERE j.id = r.job_id AND j.batch_id = $1 AND j.status = 'submitted'
"""


# -- small things ------------------------------------------------------------------------------------------


def reset_peak_rss() -> None:
    """Makes VmHWM start again from the current RSS (Linux 4.0+), so the next peak is one step's alone."""
    Path("/proc/self/clear_refs").write_text("5")


def new_provider(emulator_url: str) -> Provider:
    return Provider(API_KEY, base_url=emulator_url, limiter=RateLimiter(6000), timeout_s=600)


async def run_child(args: list[str]) -> dict[str, Any]:
    """This script again, in a subprocess of its own; its last line of output is a JSON report."""
    return await run_json_child(SCRIPT, args, CHILD_TIMEOUT_S)


# -- 2. and 3. claim, submit, apply ------------------------------------------------------------------------


@dataclass
class ApplyReport:
    jobs: int
    seconds: float
    rss_before_mib: float
    peak_mib: float
    succeeded: int
    status: str
    published: int = 0  # events numbered for the SSE log after the apply (its and the submit's)
    publish_s: float = 0.0
    note: str = ""  # which apply this is, in the memory rows

    @property
    def extra_mib(self) -> float:
        return max(0.0, self.peak_mib - self.rss_before_mib)


@dataclass
class PipelineResults:
    """Stages 2 and 3: each list holds one time per round, batchd's and its baseline's taken in turns."""

    jobs: int
    raw_claim_s: list[float] = field(default_factory=list)
    raw_submit_s: list[float] = field(default_factory=list)
    raw_apply_s: list[float] = field(default_factory=list)
    raw_download_s: list[float] = field(default_factory=list)
    result_line_bytes: float = 0.0  # the average results line, as the emulator sends it
    claim_s: list[float] = field(default_factory=list)
    submit_s: list[float] = field(default_factory=list)
    applies: list[ApplyReport] = field(default_factory=list)  # batchd's apply of N jobs, one per round
    memory: list[ApplyReport] = field(default_factory=list)  # N/10, N/2, then one of the rounds' at N
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, failure: str) -> None:
        if not ok:
            self.failures.append(failure)
            print(f"CHECK FAILED: {failure}", flush=True)


async def raw_path(
    connection: asyncpg.Connection, emulator: EmulatorProcess, results: PipelineResults
) -> tuple[UUID, str]:
    """The baseline: one UPDATE claims, aiohttp POSTs the same kind of body, one UPDATE records."""
    n = results.jobs
    started = time.perf_counter()
    async with connection.transaction():
        batch_id: UUID = await connection.fetchval(RAW_BATCH, uuid.uuid4().hex[:12], n)
        rows = await connection.fetch(RAW_CLAIM, batch_id, n)
    results.raw_claim_s.append(time.perf_counter() - started)
    results.check(len(rows) == n, f"the raw claim took {len(rows)} jobs, not {n}")
    body = (
        '{"requests":['
        + ",".join(f'{{"custom_id":"r-{row["id"].hex}","params":{row["request"]}}}' for row in rows)
        + "]}"
    ).encode()
    del rows
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(
            f"{emulator.url}/v1/messages/batches", data=body, headers=api_headers()
        ) as response:
            response.raise_for_status()
            created = await response.json()
        async with connection.transaction():
            await connection.execute(
                "UPDATE batchd.batches SET provider_batch_id = $2, status = 'in_progress' WHERE id = $1",
                batch_id,
                created["id"],
            )
            status = await connection.execute(RAW_SUBMITTED, batch_id)
        results.raw_submit_s.append(time.perf_counter() - started)
    results.check(status == f"UPDATE {n}", f"the raw submit recorded {status}, not {n} jobs")
    return batch_id, created["id"]


async def raw_apply(
    connection: asyncpg.Connection,
    emulator: EmulatorProcess,
    batch_id: UUID,
    provider_batch_id: str,
    results: PipelineResults,
) -> None:
    """Downloads the raw batch's results (timed apart), then COPY + one UPDATE ... FROM (the baseline)."""
    records: list[tuple[UUID, str]] = []
    started = time.perf_counter()
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{emulator.url}/v1/messages/batches/{provider_batch_id}/results", headers=api_headers()
        ) as response,
    ):
        response.raise_for_status()
        total_bytes = 0
        async for raw_line in response.content:
            total_bytes += len(raw_line)
            if raw_line.strip():
                line = json.loads(raw_line)
                message = json.dumps(line["result"]["message"], separators=(",", ":"))
                records.append((UUID(hex=line["custom_id"][2:]), message))
    results.raw_download_s.append(time.perf_counter() - started)
    results.result_line_bytes = total_bytes / max(1, len(records))
    started = time.perf_counter()
    async with connection.transaction():
        await connection.execute(RAW_RESULTS_TABLE)
        await connection.copy_records_to_table("raw_results", records=records, columns=["job_id", "result"])
        status = await connection.execute(RAW_APPLY, batch_id)
    results.raw_apply_s.append(time.perf_counter() - started)
    results.check(status == f"UPDATE {results.jobs}", f"the raw apply recorded {status}, not {results.jobs}")


async def make_batch(ctx: Context) -> tuple[Batch, float, float]:
    """Flusher.flush_one() then submit(), as the daemon runs them; returns the batch and both times."""
    made: list[tuple[UUID, bytes]] = []
    flusher = Flusher(ctx, on_batch=lambda batch_id, body: made.append((batch_id, body)))
    started = time.perf_counter()
    flushed = await flusher.flush_one()
    claim_s = time.perf_counter() - started
    if flushed.batch_id is None or len(made) != 1:
        raise RuntimeError(f"the flusher made no batch: {flushed}")
    batch = await store.get_batch(ctx.pool, flushed.batch_id)
    assert batch is not None
    body = made.pop()[1]
    started = time.perf_counter()
    await submit(ctx, batch, body)
    submit_s = time.perf_counter() - started
    submitted = await store.get_batch(ctx.pool, flushed.batch_id)
    if submitted is None or submitted.provider_batch_id is None:
        raise RuntimeError(f"batch {flushed.batch_id} was not created")
    return submitted, claim_s, submit_s


async def job_statuses(connection: store.Connection, batch_id: UUID) -> dict[str, int]:
    rows = await connection.fetch(
        "SELECT status, count(*) AS n FROM batchd.jobs WHERE batch_id = $1 GROUP BY status", batch_id
    )
    return {row["status"]: row["n"] for row in rows}


async def apply_in_child(
    url: str, emulator: EmulatorProcess, batch: Batch, results: PipelineResults
) -> ApplyReport:
    """batchd's apply of an ended batch, in a subprocess of its own (its peak RSS the apply's alone)."""
    report = ApplyReport(
        **await run_child(
            [
                *("--child", "apply", "--database-url", url),
                *("--emulator-url", emulator.url, "--batch-id", str(batch.id)),
            ]
        )
    )
    results.check(
        report.succeeded == batch.request_count and report.status == "applied",
        f"applying {batch.request_count:,}: {report.succeeded} succeeded, batch {report.status}",
    )
    return report


async def end_batches(ctx: Context, emulator: EmulatorProcess, batches: list[Batch], raw: list[str]) -> bool:
    """Ends every batch in the emulator; batchd's are polled until recorded ended, the raw ones (provider
    ids) until the API says so."""
    await emulator.end_all_batches()
    ended = True
    for batch in batches:
        ended = await poll_until_ended(ctx, batch) and ended
    for provider_batch_id in raw:
        await emulator.wait_ended(provider_batch_id)
    return ended


async def pipeline_round(
    connection: asyncpg.Connection,
    ctx: Context,
    emulator: EmulatorProcess,
    chunks: list[list[str]],
    *,
    round_number: int,
    results: PipelineResults,
) -> None:
    """One self-contained round: the raw claim + create and batchd's flush + submit on N queued jobs each
    (the first side on a fresh queue, the second on N more queued after it), then both batches ended and
    applied, the sides in this round's turn; the ended batches deleted from the emulator."""
    n = results.jobs
    url = ctx.settings.database.url
    sides = in_turns(round_number, ("raw", "batchd"))
    await fresh_queue(connection, chunks)
    raw: tuple[UUID, str] | None = None
    ours: Batch | None = None
    for i, side in enumerate(sides):
        if i > 0:  # the second side's N jobs, queued behind the first side's batch
            for chunk in chunks:
                await connection.execute(INSERT_CHUNK, chunk)
            await settle(connection)
        if side == "raw":
            raw = await raw_path(connection, emulator, results)
        else:
            ours, claim_s, submit_s = await make_batch(ctx)
            results.claim_s.append(claim_s)
            results.submit_s.append(submit_s)
            statuses = await job_statuses(connection, ours.id)
            results.check(statuses == {"submitted": n}, f"batchd's batch holds {statuses}, not {n} submitted")
    assert raw is not None
    assert ours is not None
    assert ours.provider_batch_id is not None
    results.check(await end_batches(ctx, emulator, [ours], [raw[1]]), f"batch {ours.id} did not end")
    for side in sides:
        await settle(connection)
        if side == "raw":
            await raw_apply(connection, emulator, *raw, results)
        else:
            results.applies.append(await apply_in_child(url, emulator, ours, results))
    applied = results.applies[-1]
    print(
        f"  round {round_number + 1} ({' first, '.join(sides)} second):"
        f" claim {results.claim_s[-1]:.2f} s, raw {results.raw_claim_s[-1]:.2f} s;"
        f" submit {results.submit_s[-1]:.2f} s, raw {results.raw_submit_s[-1]:.2f} s;"
        f" apply {applied.seconds:.2f} s (peak RSS +{applied.extra_mib:.1f} MiB),"
        f" raw {results.raw_apply_s[-1]:.2f} s (+ download {results.raw_download_s[-1]:.2f} s)",
        flush=True,
    )
    await emulator.delete_batches([raw[1], ours.provider_batch_id])


async def memory_benchmark(
    connection: asyncpg.Connection,
    ctx: Context,
    emulator: EmulatorProcess,
    requests: list[str],
    results: PipelineResults,
) -> None:
    """The apply's peak memory at N/10 and N/2 (one batch each, after the rounds), next to the rounds' at N:
    the round with the highest peak, the least flattering."""
    n = len(requests)
    sizes = sorted({max(1, n // 10), max(1, n // 2)} - {n})
    print(f"  batchd: batches of {', '.join(f'{s:,}' for s in sizes)} for the memory of applying", flush=True)
    await fresh_queue(connection, [])
    batches = []
    for size in sizes:
        for chunk in chunked(requests[:size], CHUNK_ROWS):
            await connection.execute(INSERT_CHUNK, chunk)
        # The rounds' owner: polling and applying write only a batch whose lease they hold.
        settings = bench_settings(ctx.settings.database.url, emulator.url, size)
        sized = Context(pool=ctx.pool, settings=settings, provider=ctx.provider, instance_id=ctx.instance_id)
        batches.append((await make_batch(sized))[0])
    results.check(await end_batches(ctx, emulator, batches, []), "a batch for the memory did not end")
    for batch in batches:
        await settle(connection)
        report = await apply_in_child(ctx.settings.database.url, emulator, batch, results)
        report.note = "after the rounds"
        results.memory.append(report)
    await emulator.delete_batches([batch.provider_batch_id for batch in batches if batch.provider_batch_id])
    rounds = len(results.applies)
    highest = max(range(rounds), key=lambda i: results.applies[i].extra_mib)
    results.memory.append(results.applies[highest])
    results.memory[-1].note = f"round {highest + 1} of {rounds}, the highest peak"


async def pipeline_benchmark(
    url: str, emulator: EmulatorProcess, requests: list[str], rounds: int
) -> PipelineResults:
    n = len(requests)
    results = PipelineResults(jobs=n)
    chunks = chunked(requests, CHUNK_ROWS)
    connection = await asyncpg.connect(url)
    pool = await store.create_pool(url, min_size=2, max_size=10)
    provider = new_provider(emulator.url)
    ctx = Context(pool=pool, settings=bench_settings(url, emulator.url, n), provider=provider)
    try:
        for number in range(rounds):
            await pipeline_round(connection, ctx, emulator, chunks, round_number=number, results=results)
        await memory_benchmark(connection, ctx, emulator, requests, results)
    finally:
        await provider.close()
        await pool.close()
        await connection.close()
    return results


async def child_apply(args: argparse.Namespace) -> dict[str, Any]:
    """In a process of its own: apply one ended batch's results; the peak RSS is this step's alone."""
    pool = await store.create_pool(args.database_url, min_size=2, max_size=4)
    provider = new_provider(args.emulator_url)
    try:
        settings = bench_settings(args.database_url, args.emulator_url, 1)
        async with pool.acquire() as connection:
            await publish_prices(connection, settings.pricing)  # as the daemon does when it starts
        batch = await store.get_batch(pool, UUID(args.batch_id))
        if batch is None or batch.owner is None:
            raise RuntimeError(f"no batch {args.batch_id} with an owner")
        # As the daemon that made the batch: applying writes only a batch whose lease it holds.
        ctx = Context(pool=pool, settings=settings, provider=provider, instance_id=batch.owner)
        gc.collect()
        rss_before = status_mib("self", "VmRSS")
        reset_peak_rss()
        started = time.perf_counter()
        await apply_results(ctx, batch)
        seconds = time.perf_counter() - started
        peak = status_mib("self", "VmHWM")
        async with pool.acquire() as connection:
            statuses = await job_statuses(connection, batch.id)
            status = await connection.fetchval("SELECT status FROM batchd.batches WHERE id = $1", batch.id)
            # What the daemon's publisher does next for SSE: number the new events in commit order.
            publish_started = time.perf_counter()
            published = await publish(connection, settings.events.publish_chunk)
            publish_s = time.perf_counter() - publish_started
    finally:
        await provider.close()
        await pool.close()
    return {
        "jobs": batch.request_count,
        "seconds": seconds,
        "rss_before_mib": rss_before,
        "peak_mib": peak,
        "succeeded": statuses.get("succeeded", 0),
        "status": status,
        "published": published,
        "publish_s": publish_s,
    }


# -- the report --------------------------------------------------------------------------------------------


def rate_row(measure: str, jobs: int, seconds: list[float], baseline_s: list[float], what: str) -> Row:
    ratio = speed_ratio(seconds, baseline_s)
    return Row(
        measure,
        f"{rate_spread(jobs, seconds)}, {statistics.median(seconds):.2f} s",
        f"{what}: {rate_spread(jobs, baseline_s)}, {statistics.median(baseline_s):.2f} s",
        f"{ratio:.2f}x",
        f">= {MIN_RAW_RATIO:.1f}x",
        ratio >= MIN_RAW_RATIO,
    )


def memory_rows(memory: list[ApplyReport], line_bytes: float) -> list[Row]:
    rows = [
        Row(
            f"apply_results, {report.jobs:,} jobs ({report.note}): peak RSS above its start",
            f"{report.extra_mib:.1f} MiB (peak {report.peak_mib:.0f} MiB)",
            "",
            f"{per_s(report.jobs, report.seconds):,.0f} jobs/s",
            "",
            None,
        )
        for report in memory
    ]
    smallest, largest = memory[0], memory[-1]
    growth = largest.extra_mib - smallest.extra_mib
    whole = (largest.jobs - smallest.jobs) * line_bytes / MIB
    rows.append(
        Row(
            f"apply_results memory, {smallest.jobs:,} -> {largest.jobs:,} jobs",
            f"{growth:+.1f} MiB",
            f"the extra results held whole: +{whole:.0f} MiB",
            f"{growth * MIB / max(1, largest.jobs - smallest.jobs):+.0f} B per extra job",
            f"flat: < +{MAX_MEMORY_GROWTH_MIB:.0f} MiB",
            growth < MAX_MEMORY_GROWTH_MIB,
        )
    )
    return rows


def stage2_rows(pipeline: PipelineResults) -> list[Row]:
    n, rounds = pipeline.jobs, len(pipeline.claim_s)
    return [
        rate_row(
            f"claim + encode + record (Flusher.flush_one), {rounds} rounds in turns",
            n,
            pipeline.claim_s,
            pipeline.raw_claim_s,
            "raw claim",
        ),
        rate_row(
            f"submit: create through the SDK + record, {rounds} rounds in turns",
            n,
            pipeline.submit_s,
            pipeline.raw_submit_s,
            "raw create",
        ),
    ]


def pgqueuer_row(fifo: fair_stage.ShapeResults, pgq: list[dict[str, Any]]) -> Row:
    """batchd's claim (stage 2b's FIFO rounds, on their median) next to pgqueuer's best round."""
    claim_rate = per_s(fifo.batch, statistics.median(fifo.flush_s))
    best = max(per_s(run["jobs"], run["seconds"]) for run in pgq)
    jobs = pgq[0]["jobs"]
    return Row(
        f"batchd's claim path (Flusher.flush_one, stage 2b's {len(fifo.flush_s)} FIFO rounds) next to"
        f" pgqueuer draining the same jobs ({len(pgq)} rounds), on its best round",
        rate_spread(fifo.batch, fifo.flush_s),
        f"pgqueuer, {PGQUEUER_CONSUMERS} consumers x {PGQUEUER_BATCH_SIZE}: best {best:,.0f} jobs/s; "
        f"{rate_spread(jobs, [run['seconds'] for run in pgq])}",
        f"{claim_rate / best:.1f}x the best" if best else "",
        f">= {MIN_PGQUEUER_RATIO:.0f}x",
        claim_rate >= MIN_PGQUEUER_RATIO * best,
    )


def report_rows(
    inserts: trigger_cost.InsertResults,
    pipeline: PipelineResults,
    shapes: list[fair_stage.ShapeResults],
    *,
    bursts: list[burst_stage.BurstResults],
    pgq: list[dict[str, Any]],
) -> list[Row]:
    rows = trigger_cost.insert_rows(inserts)
    rows += stage2_rows(pipeline)
    rows += fair_stage.fair_rows(shapes)
    rows += apply_rows(pipeline)
    rows.append(burst_stage.burst_row(bursts))
    rows.append(pgqueuer_row(shapes[0], pgq))
    return rows


def apply_rows(pipeline: PipelineResults) -> list[Row]:
    """Stage 3's rows: the apply next to the raw one, its publish, its memory."""
    n, rounds = pipeline.jobs, len(pipeline.applies)
    ours_s = [report.seconds for report in pipeline.applies]
    rows = [
        rate_row(
            f"apply_results: download, parse, COPY + UPDATE, {rounds} rounds in turns",
            n,
            ours_s,
            pipeline.raw_apply_s,
            "raw apply",
        )
    ]
    raw_whole_s = [d + a for d, a in zip(pipeline.raw_download_s, pipeline.raw_apply_s, strict=True)]
    rows.append(
        Row(
            "(reference) apply_results next to a raw download + parse, then the raw apply",
            rate_spread(n, ours_s),
            f"{rate_spread(n, raw_whole_s)} (medians {statistics.median(pipeline.raw_download_s):.2f} s"
            f" + {statistics.median(pipeline.raw_apply_s):.2f} s)",
            f"{speed_ratio(ours_s, raw_whole_s):.2f}x",
            "",
            None,
        )
    )
    publish_s = [report.publish_s for report in pipeline.applies]
    published = pipeline.applies[0].published
    rows.append(
        Row(
            "publish: number the events of the submit and the apply for SSE (publisher.py)",
            f"{rate_spread(published, publish_s, ' events/s')}, {statistics.median(publish_s):.2f} s",
            f"apply_results: {statistics.median(ours_s):.2f} s (median)",
            f"{statistics.median(publish_s) / statistics.median(ours_s) * 100:.0f} % of the apply's time",
            "",
            None,
        )
    )
    return rows + memory_rows(pipeline.memory, pipeline.result_line_bytes)


async def main(args: argparse.Namespace) -> int:
    batchd_log.configure("warning")
    os.environ.setdefault("ANTHROPIC_API_KEY", API_KEY)  # the daemon insists on a key; the emulator takes any
    n = args.jobs
    print(f"machine: {machine()}", flush=True)
    load = LoadLog()
    load.mark("at the start")
    started = time.perf_counter()
    requests = build_requests(n)
    stage23 = f"claim, submit, apply: {n:,} jobs, {args.pipeline_rounds} rounds in turns"
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as log_dir:
        emulator = EmulatorProcess(Path(log_dir) / "emulator.log", processing_time_s=EMULATOR_PROCESSING_S)
        async with timing_database(args.database_url) as url, running(emulator):
            if args.apply_only:
                print(f"\n== 2./3. {stage23} (--apply-only)", flush=True)
                pipeline = await pipeline_benchmark(url, emulator, requests, args.pipeline_rounds)
                load.mark("at the end")
                rows = [*stage2_rows(pipeline), *apply_rows(pipeline), load.row()]
                return finish(started, pipeline.failures, rows)
            print(f"\n== 1. {trigger_cost.describe(args)}", flush=True)
            inserts = await trigger_cost.insert_benchmark(url, requests, args.rounds, args.producer_seconds)
            print(f"  notifications heard: {inserts.notifications}", flush=True)
            load.mark("after stage 1")

            print(f"\n== 2./3. {stage23}", flush=True)
            pipeline = await pipeline_benchmark(url, emulator, requests, args.pipeline_rounds)
            load.mark("after stages 2/3")

            print(f"\n== 2b. the claim path by queue shape, {args.claim_rounds} rounds in turns", flush=True)
            shapes, shape_failures = await fair_stage.fair_benchmark(url, requests, args.claim_rounds)
            load.mark("after stage 2b")

            print(
                f"\n== 4. a burst of {n:,} jobs into a running daemon, {args.burst_rounds} rounds", flush=True
            )
            bursts = await burst_stage.burst_benchmark(url, emulator, requests, args.burst_rounds)
            load.mark("after stage 4")

            print(
                f"\n== 5. pgqueuer: {n:,} jobs drained by {PGQUEUER_CONSUMERS} consumers, "
                f"batch size {PGQUEUER_BATCH_SIZE}, {args.claim_rounds} rounds",
                flush=True,
            )
            pgq = []
            for round_number in range(args.claim_rounds):
                run = await run_json_child(
                    PGQUEUER_SCRIPT, ["--database-url", url, "--jobs", str(n)], CHILD_TIMEOUT_S
                )
                print(
                    f"  round {round_number + 1}: {per_s(run['jobs'], run['seconds']):,.0f} jobs/s",
                    flush=True,
                )
                pgq.append(run)
            load.mark("at the end")

    failures = [*pipeline.failures, *shape_failures, *burst_stage.burst_failures(bursts)]
    failures += [
        f"pgqueuer round {i + 1} ran {run['done']} of {n} jobs, {run['remaining']} left"
        for i, run in enumerate(pgq)
        if run["done"] != n or run["remaining"] != 0
    ]
    rows = report_rows(inserts, pipeline, shapes, bursts=bursts, pgq=pgq)
    return finish(started, failures, [*rows, load.row()])


def parse_args() -> argparse.Namespace:
    parser = bench_parser(__doc__)
    trigger_cost.add_arguments(parser)
    parser.add_argument(
        "--apply-only",
        action="store_true",
        help="stages 2 and 3 only (claim, submit, apply, in turns with their baselines)",
    )
    parser.add_argument(
        "--pipeline-rounds",
        type=int,
        default=3,
        help="rounds of stages 2 and 3, batchd and the raw SQL in turns (default 3)",
    )
    parser.add_argument(
        "--claim-rounds",
        type=int,
        default=3,
        help="rounds per side and queue shape in stage 2b, and of pgqueuer's drain in stage 5 (default 3)",
    )
    parser.add_argument("--burst-rounds", type=int, default=3, help="bursts in stage 4 (default 3)")
    parser.add_argument("--child", choices=["apply"], help=argparse.SUPPRESS)
    parser.add_argument("--emulator-url", help=argparse.SUPPRESS)
    parser.add_argument("--batch-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is None:
        check_arguments(parser, args, "rounds", "pipeline_rounds", "claim_rounds", "burst_rounds")
    return args


def child_main(args: argparse.Namespace) -> int:
    batchd_log.configure("warning")
    print(json.dumps(asyncio.run(child_apply(args))))
    return 0


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.child is not None:
        sys.exit(child_main(arguments))
    interrupt_on_sigterm()
    sys.exit(asyncio.run(main(arguments)))
