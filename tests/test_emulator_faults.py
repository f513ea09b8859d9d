"""Faults on demand, and what the official SDK makes of each one after its own retries."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import anthropic
import httpx2
import pytest
from packaging.version import Version
from support import EmulatorHandle, request

from batchd.emulator import EmulatorConfig, FaultPlan, HttpFault
from batchd.emulator.config import checked_processing_time

PROCESSING_TIME_RULE = "processing_time_s must be (low, high) with 0 <= low <= high"

FAST_RETRY = 0.01  # seconds the emulator asks the SDK to wait before retrying


@pytest.mark.parametrize(
    ("status", "exception", "error_type"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
        (503, anthropic.ServiceUnavailableError, "api_error"),
    ],
)
async def test_each_error_surfaces_as_the_sdks_own_exception_after_its_retries(
    emulator: EmulatorHandle,
    anthropic_client: anthropic.AsyncAnthropic,
    status: int,
    exception: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    await emulator.set_faults(http=[{"endpoint": "create", "status": status, "retry_after_s": FAST_RETRY}])
    with pytest.raises(exception) as caught:
        await anthropic_client.messages.batches.create(requests=[request("a")])
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict), body
    assert body["error"]["type"] == error_type
    assert caught.value.request_id is not None
    stats = await emulator.stats()
    assert stats["calls"]["create"] == 3, "the SDK tried once and retried twice (max_retries=2)"
    assert stats["statuses"] == {f"create {status}": 3}
    assert stats["batches_created"] == 0
    assert "list" not in stats["calls"], "a fault on one endpoint leaves the others alone"


async def test_a_counted_fault_runs_out_and_the_sdks_retry_then_succeeds(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    await emulator.set_faults(
        http=[{"endpoint": "retrieve", "status": 529, "count": 2, "retry_after_s": FAST_RETRY}]
    )
    batch = await anthropic_client.messages.batches.create(requests=[request("a")])
    again = await anthropic_client.messages.batches.retrieve(batch.id)
    assert again.id == batch.id
    stats = await emulator.stats()
    assert stats["statuses"]["retrieve 529"] == 2
    assert stats["statuses"]["retrieve 200"] == 1
    assert (await emulator.admin("GET", "faults"))["http"][0]["count"] == 0


async def test_429_carries_retry_after_and_an_sdk_without_retries_sees_it(
    emulator: EmulatorHandle, make_client: Any
) -> None:
    await emulator.set_faults(http=[{"status": 429, "count": 1, "retry_after_s": 7}])
    with pytest.raises(anthropic.RateLimitError) as caught:
        await make_client(max_retries=0).messages.batches.list()
    headers = caught.value.response.headers
    assert headers["retry-after"] == "7"
    assert headers["retry-after-ms"] == "7000"


async def test_a_fault_rate_fails_only_a_share_of_calls(emulator: EmulatorHandle) -> None:
    await emulator.set_faults(http=[{"endpoint": "list", "status": 500, "rate": 0.5}])
    async with httpx2.AsyncClient() as http:
        statuses = [
            (await http.get(f"{emulator.url}/v1/messages/batches", headers={"x-api-key": "k"})).status_code
            for _ in range(200)
        ]
    assert 50 < statuses.count(500) < 150
    assert statuses.count(500) + statuses.count(200) == 200


async def test_a_lost_create_response_makes_the_sdk_create_a_second_batch(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    # The SDK sends no idempotency key, so its retry after a dropped connection creates the batch again: the
    # very duplicate the daemon must defend against. The emulator's counters show it.
    await emulator.set_faults(lose_create_responses=1)
    ids = [f"job-{i}" for i in range(5)]
    batch = await anthropic_client.messages.batches.create(requests=[request(cid) for cid in ids])
    stats = await emulator.stats()
    assert stats["calls"]["create"] == 2
    assert stats["batches_created"] == 2
    assert stats["lost_responses"] == 1
    assert stats["statuses"] == {"create dropped": 1, "create 200": 1}
    assert stats["duplicate_custom_ids"] == dict.fromkeys(ids, 2)
    listed = [b.id async for b in await anthropic_client.messages.batches.list()]
    assert len(listed) == 2
    assert batch.id in listed


async def test_a_lost_create_response_without_retries_is_a_connection_error(
    emulator: EmulatorHandle, make_client: Any
) -> None:
    await emulator.set_faults(lose_create_responses=1)
    with pytest.raises(anthropic.APIConnectionError):
        await make_client(max_retries=0).messages.batches.create(requests=[request("only")])
    stats = await emulator.stats()
    assert stats["batches_created"] == 1, "the batch exists although its creator never heard of it"
    assert stats["distinct_custom_ids"] == 1


async def test_requests_end_errored_or_expired_at_the_planned_rates(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    await emulator.set_faults(api_error_rate=0.2, overloaded_rate=0.2, expired_rate=0.2)
    batch = await anthropic_client.messages.batches.create(requests=[request(f"r{i}") for i in range(500)])
    await emulator.advance(61)
    decoder = await anthropic_client.messages.batches.results(batch.id)
    kinds: dict[str, int] = {}
    try:
        async for line in decoder:
            kind: str = line.result.type
            if line.result.type == "errored":
                kind = line.result.error.error.type
            kinds[kind] = kinds.get(kind, 0) + 1
    finally:
        await decoder.close()
    assert set(kinds) == {"succeeded", "api_error", "overloaded_error", "expired"}
    for kind in ("api_error", "overloaded_error", "expired"):
        assert 60 < kinds[kind] < 140, kinds
    ended = await anthropic_client.messages.batches.retrieve(batch.id)
    assert ended.request_counts.errored == kinds["api_error"] + kinds["overloaded_error"]
    assert ended.request_counts.expired == kinds["expired"]


async def test_a_stuck_batch_completes_only_part_of_its_work_before_it_expires(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    await emulator.set_faults(stuck_batches=1, stuck_progress=0.25)
    stuck = await anthropic_client.messages.batches.create(requests=[request(f"s{i}") for i in range(400)])
    normal = await anthropic_client.messages.batches.create(requests=[request("n")])
    await emulator.advance(3600)
    assert (await anthropic_client.messages.batches.retrieve(normal.id)).processing_status == "ended"
    assert (await anthropic_client.messages.batches.retrieve(stuck.id)).processing_status == "in_progress"
    await emulator.advance(86_400)
    counts = (await anthropic_client.messages.batches.retrieve(stuck.id)).request_counts
    assert counts.expired + counts.succeeded == 400
    assert 60 < counts.succeeded < 140, "about a quarter was processed before expiry"


async def test_a_results_download_that_breaks_off_midway(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    batch = await anthropic_client.messages.batches.create(requests=[request(f"r{i}") for i in range(3000)])
    await emulator.advance(61)
    await emulator.set_faults(results_break_after=1000, results_break_count=1)
    decoder = await anthropic_client.messages.batches.results(batch.id)
    received: list[str] = []

    async def read_all() -> None:
        try:
            async for line in decoder:
                received.append(line.custom_id)  # noqa: PERF401 - keep what arrived before the break
        finally:
            await decoder.close()

    # The SDK does not retry a stream that broke after it started. Since anthropic 2.17 its JSONL decoder
    # wraps the transport's error; before, httpx2.RemoteProtocolError came through as it was. batchd, which
    # reads the raw body, handles both (tests/test_sdk_errors.py); this pins which one each SDK raises.
    wrapped = Version(anthropic.__version__) >= Version("2.17")
    with pytest.raises(anthropic.APIConnectionError if wrapped else httpx2.RemoteProtocolError) as raised:
        await read_all()
    assert "peer closed connection" in str(raised.value)
    assert 0 < len(received) <= 1000
    # The fault was for one download only: the next one is whole.
    decoder = await anthropic_client.messages.batches.results(batch.id)
    try:
        complete = [line.custom_id async for line in decoder]
    finally:
        await decoder.close()
    assert len(complete) == 3000


async def test_a_slow_results_stream_still_delivers_everything(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    batch = await anthropic_client.messages.batches.create(requests=[request(f"r{i}") for i in range(2000)])
    await emulator.advance(61)
    await emulator.set_faults(results_chunk_delay_s=0.05)
    decoder = await anthropic_client.messages.batches.results(batch.id)
    try:
        ids = {line.custom_id async for line in decoder}
    finally:
        await decoder.close()
    assert len(ids) == 2000


async def test_results_are_written_in_chunks_of_the_planned_size(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    batch = await anthropic_client.messages.batches.create(requests=[request(f"r{i}") for i in range(100)])
    await emulator.advance(61)

    async def http_chunks() -> tuple[int, int]:
        """(HTTP chunks, lines) of one results download, read over plain HTTP."""
        url = f"{emulator.url}/v1/messages/batches/{batch.id}/results"
        body, chunks = b"", 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, headers={"x-api-key": "test-key"}) as response,
        ):
            assert response.status == 200
            async for data, end_of_chunk in response.content.iter_chunks():
                body += data
                chunks += end_of_chunk
        return chunks, len(body.splitlines())

    whole, lines = await http_chunks()
    assert lines == 100
    assert whole <= 2, "100 results (about 60 KB) fit in one 64 KiB chunk by default"
    await emulator.set_faults(results_chunk_bytes=2048)
    small, lines = await http_chunks()
    assert lines == 100
    assert small >= 20, f"100 results in 2 KiB chunks: {small} chunks"


async def test_a_timed_fault_lasts_its_emulated_seconds_then_stops(
    emulator: EmulatorHandle, make_client: Any
) -> None:
    client = make_client(max_retries=0)
    await emulator.set_faults(http=[{"endpoint": "*", "status": 529, "for_s": 60}])
    with pytest.raises(anthropic.OverloadedError):
        await client.messages.batches.list()
    await emulator.advance(59)
    with pytest.raises(anthropic.OverloadedError):
        await client.messages.batches.list()
    await emulator.advance(2)
    await client.messages.batches.list()  # the minute is over
    assert (await emulator.stats())["statuses"] == {"list 529": 2, "list 200": 1}


@pytest.mark.parametrize(
    "emulator_config", [EmulatorConfig(rate_limit_rpm=5, time_scale=1.0, processing_time_s=(60, 60))]
)
async def test_the_per_minute_limit_counts_every_batch_call(
    emulator: EmulatorHandle, make_client: Any
) -> None:
    client = make_client(max_retries=0)
    batch = await client.messages.batches.create(requests=[request("a")])
    for _ in range(3):
        await client.messages.batches.retrieve(batch.id)
    await client.messages.batches.list()
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.batches.retrieve(batch.id)
    assert 0 < float(caught.value.response.headers["retry-after-ms"]) <= 60_000
    await emulator.advance(61)
    await client.messages.batches.retrieve(batch.id)  # a new minute, a new budget


async def test_the_fault_admin_api(emulator: EmulatorHandle) -> None:
    plan = await emulator.set_faults(
        http=[{"endpoint": "cancel", "status": 500, "count": 3}], expired_rate=0.1
    )
    assert plan["http"][0]["status"] == 500
    assert plan["expired_rate"] == 0.1
    assert (await emulator.admin("GET", "faults")) == plan
    cleared = await emulator.admin("DELETE", "faults")
    assert cleared == FaultPlan().model_dump(mode="json")
    async with httpx2.AsyncClient() as http:
        bad = await http.put(f"{emulator.url}/_emulator/faults", json={"http": [{"status": 200}]})
        unknown = await http.put(f"{emulator.url}/_emulator/faults", json={"explode": True})
        rates = await http.put(
            f"{emulator.url}/_emulator/faults", json={"api_error_rate": 0.6, "expired_rate": 0.6}
        )
    assert bad.status_code == 400
    assert unknown.status_code == 400
    assert rates.status_code == 400
    assert "must not exceed 1" in rates.json()["error"]["message"]


@pytest.mark.parametrize(
    "emulator_config",
    [EmulatorConfig(faults=FaultPlan(http=[HttpFault(endpoint="list", status=500, count=1)]), seed=3)],
)
async def test_faults_can_be_set_at_start(emulator: EmulatorHandle, make_client: Any) -> None:
    with pytest.raises(anthropic.InternalServerError):
        await make_client(max_retries=0).messages.batches.list()
    await make_client(max_retries=0).messages.batches.list()


async def test_settings_clock_and_reset_through_the_admin_api(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    settings = await emulator.admin("PATCH", "settings", {"processing_time_s": [5, 5], "rate_limit_rpm": 100})
    assert settings["processing_time_s"] == [5, 5]
    assert settings["rate_limit_rpm"] == 100
    batch = await anthropic_client.messages.batches.create(requests=[request("a")])
    before = await emulator.admin("GET", "clock")
    after = await emulator.admin("POST", "clock/advance", {"seconds": 6})
    assert after["now"] > before["now"]
    assert (await anthropic_client.messages.batches.retrieve(batch.id)).processing_status == "ended"
    custom_ids = await emulator.admin("GET", "custom_ids")
    assert custom_ids == {"custom_ids": {"a": 1}}
    await emulator.admin("POST", "reset")
    assert (await emulator.stats())["batches_created"] == 0
    with pytest.raises(anthropic.NotFoundError):
        await anthropic_client.messages.batches.retrieve(batch.id)
    async with httpx2.AsyncClient() as http:
        backwards = await http.post(f"{emulator.url}/_emulator/clock/advance", json={"seconds": -5})
        inverted = await http.patch(f"{emulator.url}/_emulator/settings", json={"processing_time_s": [9, 1]})
    assert backwards.status_code == 400
    assert inverted.status_code == 400


@pytest.mark.parametrize("bad", [(9, 1), (-1, 2)])
async def test_a_processing_time_is_checked_alike_at_start_and_while_running(
    emulator: EmulatorHandle, bad: tuple[float, float]
) -> None:
    """One check (emulator/config.py, checked_processing_time) for both ways in, with one message."""
    with pytest.raises(ValueError, match=re.escape(PROCESSING_TIME_RULE)):
        EmulatorConfig(processing_time_s=bad)
    with pytest.raises(ValueError, match=re.escape(PROCESSING_TIME_RULE)):
        checked_processing_time(bad)
    async with httpx2.AsyncClient() as http:
        answer = await http.patch(f"{emulator.url}/_emulator/settings", json={"processing_time_s": list(bad)})
    assert answer.status_code == 400
    assert answer.json()["error"] == {"type": "invalid_request_error", "message": PROCESSING_TIME_RULE}
    assert checked_processing_time((0, 0)) == (0, 0)
