"""The SDK's error shapes that batchd's own code branches on, pinned down with the locked SDK over real HTTP.

batchd tells "the call never completed" (retry later, reconcile a create) from "the provider answered no"
(status errors) and from its own bugs. The SDK decides which exception means which, and it moved once:
anthropic 2.17 wraps a results body that breaks midway in `APIConnectionError` where 2.16 let
`httpx2.RemoteProtocolError` through. Each test here goes through `batchd.provider.Provider`, the only place
batchd calls the SDK, so a new release that moves a shape fails here (`make test-latest`) before it reaches
the lock.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import httpx2
import pytest
from support import EmulatorHandle, request

from batchd.metrics import Metrics
from batchd.provider import CONNECTION_ERRORS, Provider, call_status
from batchd.ratelimit import RateLimiter


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def provider(emulator: EmulatorHandle, metrics: Metrics) -> AsyncIterator[Provider]:
    client = Provider(
        "test-key", base_url=emulator.url, limiter=RateLimiter(6000), timeout_s=10.0, on_call=metrics.api_call
    )
    try:
        yield client
    finally:
        await client.close()


def calls(metrics: Metrics, endpoint: str, status: str) -> float:
    value = metrics.registry.get_sample_value(
        "batchd_api_calls_total", {"endpoint": endpoint, "status": status}
    )
    return value or 0.0


async def ended_batch(emulator: EmulatorHandle, provider: Provider, size: int) -> str:
    created = await provider.client.messages.batches.create(requests=[request(f"r{i}") for i in range(size)])
    await emulator.advance(61)
    return created.id


async def test_a_results_body_broken_midway_is_a_connection_error_to_batchd(
    emulator: EmulatorHandle, provider: Provider, metrics: Metrics
) -> None:
    batch_id = await ended_batch(emulator, provider, 600)
    await emulator.set_faults(results_break_after=200, results_break_count=1)
    lines: list[bytes] = []

    async def read_all() -> None:
        async with provider.results(batch_id) as body:
            async for line in body:
                lines.append(line)  # noqa: PERF401 - keep what arrived before the break

    with pytest.raises(CONNECTION_ERRORS) as raised:
        await read_all()
    assert 0 < len(lines) <= 200
    assert call_status(raised.value) == "connection_error"
    assert calls(metrics, "results", "connection_error") == 1
    # The next download is whole: the break was one fault, not a state batchd must clear.
    async with provider.results(batch_id) as body:
        assert len([line async for line in body]) == 600
    assert calls(metrics, "results", "200") == 1


def test_both_shapes_of_a_broken_body_count_as_connection_errors() -> None:
    """What 2.16 raised (the transport's error) and what 2.17 raises (the SDK's, the transport's as its
    cause)."""
    http_request = httpx2.Request("GET", "http://127.0.0.1/v1/messages/batches/x/results")
    transport = httpx2.RemoteProtocolError("peer closed connection", request=http_request)
    wrapped = anthropic.APIConnectionError(message="Connection failed: peer closed", request=http_request)
    wrapped.__cause__ = transport
    for error in (transport, wrapped):
        assert isinstance(error, CONNECTION_ERRORS)
        assert call_status(error) == "connection_error"
    timeout = httpx2.ReadTimeout("slow", request=http_request)
    assert call_status(timeout) == "timeout"
    assert call_status(anthropic.APITimeoutError(request=http_request)) == "timeout"


async def test_a_create_whose_answer_is_lost_is_a_connection_error_and_is_not_retried(
    emulator: EmulatorHandle, provider: Provider, metrics: Metrics
) -> None:
    """The submitter reconciles on APIConnectionError: it must come, and the SDK must not have sent the
    create again by itself (its retries are off in Provider)."""
    await emulator.set_faults(lose_create_responses=1)
    with pytest.raises(anthropic.APIConnectionError):
        await provider.create_batch(json.dumps({"requests": [request("only")]}).encode())
    stats = await emulator.stats()
    assert stats["calls"]["create"] == 1
    assert stats["batches_created"] == 1
    assert calls(metrics, "create", "connection_error") == 1


async def test_a_poll_answered_5xx_is_a_status_error_and_a_gone_provider_a_connection_error(
    emulator: EmulatorHandle, provider: Provider, metrics: Metrics
) -> None:
    batch_id = await ended_batch(emulator, provider, 1)
    await emulator.set_faults(http=[{"endpoint": "retrieve", "status": 503, "count": 1}])
    with pytest.raises(anthropic.APIStatusError) as raised:
        await provider.retrieve(batch_id)
    assert raised.value.status_code == 503
    assert calls(metrics, "retrieve", "503") == 1
    assert (await provider.retrieve(batch_id)).processing_status == "ended"

    closed = Provider("test-key", base_url="http://127.0.0.1:9", limiter=RateLimiter(6000), timeout_s=5.0)
    try:
        with pytest.raises(anthropic.APIConnectionError) as refused:
            await closed.retrieve(batch_id)
        assert call_status(refused.value) == "connection_error"
    finally:
        await closed.close()
