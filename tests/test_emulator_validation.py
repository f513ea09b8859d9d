"""What the emulator refuses, and how.

Synchronously for a malformed create, as `errored` results for bad params; with the API's error envelope,
status codes, headers and authentication."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import anthropic
import httpx2
import pytest
from anthropic.types import TextBlockParam
from anthropic.types.messages import MessageBatchResult
from anthropic.types.messages.batch_create_params import Request
from support import MODEL, EmulatorHandle, request

from batchd.emulator import EmulatorConfig


async def errored_results(
    emulator: EmulatorHandle, client: anthropic.AsyncAnthropic, requests: list[Request]
) -> dict[str, MessageBatchResult]:
    batch = await client.messages.batches.create(requests=requests)
    assert batch.processing_status == "in_progress", "bad params never fail the create itself"
    await emulator.advance(61)
    decoder = await client.messages.batches.results(batch.id)
    try:
        return {line.custom_id: line.result async for line in decoder}
    finally:
        await decoder.close()


@pytest.mark.parametrize(
    ("custom_id", "message"),
    [
        ("", "should match pattern"),
        ("has space", "should match pattern"),
        ("dots.are.refused", "should match pattern"),
        ("ünïcode", "should match pattern"),
        ("x" * 65, "at most 64 characters"),
    ],
)
async def test_custom_id_must_match_the_pattern(
    anthropic_client: anthropic.AsyncAnthropic, emulator: EmulatorHandle, custom_id: str, message: str
) -> None:
    with pytest.raises(anthropic.BadRequestError, match=message) as caught:
        await anthropic_client.messages.batches.create(requests=[request("fine"), request(custom_id)])
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict), body
    assert body["error"]["type"] == "invalid_request_error"
    assert "requests.1.custom_id" in caught.value.message
    assert (await emulator.stats())["batches_created"] == 0


async def test_custom_id_of_64_allowed_characters_is_accepted(
    anthropic_client: anthropic.AsyncAnthropic,
) -> None:
    longest = "aZ09_-" * 10 + "abcd"
    assert len(longest) == 64
    batch = await anthropic_client.messages.batches.create(requests=[request(longest)])
    assert batch.request_counts.processing == 1


async def test_custom_id_must_be_unique_within_a_batch(
    anthropic_client: anthropic.AsyncAnthropic, emulator: EmulatorHandle
) -> None:
    with pytest.raises(anthropic.BadRequestError, match="unique"):
        await anthropic_client.messages.batches.create(
            requests=[request("same"), request("other"), request("same")]
        )
    assert (await emulator.stats())["batches_created"] == 0
    # ... but the same custom_id in two batches is fine.
    await anthropic_client.messages.batches.create(requests=[request("same")])
    await anthropic_client.messages.batches.create(requests=[request("same")])
    assert (await emulator.stats())["duplicate_custom_ids"] == {"same": 2}


@pytest.mark.parametrize(
    "body",
    [
        {"requests": []},
        {},
        {"requests": "nope"},
        {"requests": [{"custom_id": "x"}]},
        {"requests": [{"custom_id": "x", "params": "not an object"}]},
        {"requests": [{"params": {}}]},
        {"requests": [7]},
        [1, 2],
    ],
)
async def test_malformed_create_bodies_are_refused_at_once(emulator: EmulatorHandle, body: Any) -> None:
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            f"{emulator.url}/v1/messages/batches", json=body, headers={"x-api-key": "k"}
        )
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_a_body_that_is_not_json(emulator: EmulatorHandle) -> None:
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            f"{emulator.url}/v1/messages/batches", content=b"{not json", headers={"x-api-key": "k"}
        )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "emulator_config", [EmulatorConfig(max_batch_requests=100, processing_time_s=(60, 60))]
)
async def test_more_requests_than_a_batch_may_hold_is_a_validation_error(
    anthropic_client: anthropic.AsyncAnthropic,
) -> None:
    # The API's schema says maxItems 100000: a 400 invalid_request_error, not a 413 (the limit is lowered here
    # to keep the test small; the scale test sends the real 100,000).
    await anthropic_client.messages.batches.create(requests=[request(f"r{i}") for i in range(100)])
    with pytest.raises(anthropic.BadRequestError, match="at most 100 items"):
        await anthropic_client.messages.batches.create(requests=[request(f"r{i}") for i in range(101)])


@pytest.mark.parametrize("emulator_config", [EmulatorConfig(max_body_bytes=64 * 1024)])
async def test_a_body_over_the_size_limit_is_413_request_too_large(
    anthropic_client: anthropic.AsyncAnthropic, emulator: EmulatorHandle
) -> None:
    big = [request(f"r{i}", "x" * 1000) for i in range(100)]  # about 120 KB of JSON
    with pytest.raises(anthropic.RequestTooLargeError) as caught:
        await anthropic_client.messages.batches.create(requests=big)
    assert caught.value.status_code == 413
    body = caught.value.body
    assert isinstance(body, dict), body
    assert body["error"]["type"] == "request_too_large"
    assert (await emulator.stats())["batches_created"] == 0


async def test_a_declared_body_over_256_mb_is_refused_before_it_is_read(emulator: EmulatorHandle) -> None:
    # Only the headers and a few bytes go out (over a raw socket: HTTP clients refuse to under-send), and the
    # emulator answers from Content-Length alone.
    host, port = emulator.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /v1/messages/batches HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {256 * 1024 * 1024 + 1}\r\n\r\n".encode()
            + b'{"requests": ['
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    finally:
        writer.close()
    status_line, *header_lines = head.decode().split("\r\n")
    assert status_line.startswith("HTTP/1.1 413")
    assert any(line.lower().startswith("request-id: req_") for line in header_lines)


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}, "model: Field required"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens: Field required"),
        ({"model": MODEL, "max_tokens": 10}, "messages: Field required"),
        (
            {"model": "claude-unknown-9", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
            "is not a known model",
        ),
        ({"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 10**7, "messages": [{"role": "user", "content": "hi"}]}, "maximum"),
        ({"model": MODEL, "max_tokens": "ten", "messages": [{"role": "user", "content": "hi"}]}, "integer"),
        ({"model": MODEL, "max_tokens": 10, "messages": []}, "non-empty"),
        ({"model": MODEL, "max_tokens": 10, "messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": ""}]}, "non-empty"),
        (
            {
                "model": MODEL,
                "max_tokens": 10,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
            "stream",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 10,
                "temperature": 3,
                "messages": [{"role": "user", "content": "hi"}],
            },
            "temperature",
        ),
    ],
)
async def test_bad_params_end_as_errored_invalid_request_results(
    anthropic_client: anthropic.AsyncAnthropic, emulator: EmulatorHandle, params: dict[str, Any], reason: str
) -> None:
    # The bad params are ill-typed on purpose: the emulator, not the SDK's types, must refuse them.
    ill_typed = cast("Request", {"custom_id": "bad", "params": params})
    results = await errored_results(emulator, anthropic_client, [request("good"), ill_typed])
    assert results["good"].type == "succeeded", "one bad request does not spoil the batch"
    bad = results["bad"]
    assert bad.type == "errored"
    assert bad.error.type == "error"
    assert bad.error.error.type == "invalid_request_error"
    assert reason in bad.error.error.message


async def test_max_tokens_cuts_the_reply_short(
    anthropic_client: anthropic.AsyncAnthropic, emulator: EmulatorHandle
) -> None:
    results = await errored_results(emulator, anthropic_client, [request("short", max_tokens=3)])
    short = results["short"]
    assert short.type == "succeeded", "a reply cut short still succeeds"
    message = short.message
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3


async def test_every_response_carries_a_request_id_and_errors_the_envelope(emulator: EmulatorHandle) -> None:
    async with httpx2.AsyncClient() as http:
        ok = await http.get(f"{emulator.url}/v1/messages/batches", headers={"x-api-key": "k"})
        missing = await http.get(f"{emulator.url}/v1/messages/batches/msgbatch_x", headers={"x-api-key": "k"})
        no_route = await http.get(f"{emulator.url}/v1/nothing-here", headers={"x-api-key": "k"})
        wrong_method = await http.put(f"{emulator.url}/v1/messages/batches", headers={"x-api-key": "k"})
    assert ok.status_code == 200
    for response, status, error_type in [
        (missing, 404, "not_found_error"),
        (no_route, 404, "not_found_error"),
        (wrong_method, 405, "invalid_request_error"),
    ]:
        assert response.status_code == status
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert set(body) == {"type", "error", "request_id"}
        assert body["error"]["type"] == error_type
        assert body["error"]["message"]
        assert body["request_id"] == response.headers["request-id"]
    ids = {r.headers["request-id"] for r in (ok, missing, no_route, wrong_method)}
    assert len(ids) == 4
    assert all(i.startswith("req_") for i in ids)


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "sk-test"},
        {"authorization": "Bearer sk-test"},
        {"x-api-key": "sk-test", "anthropic-version": "2023-06-01"},
        {"authorization": "Bearer sk-test", "anthropic-version": "2099-01-01"},
    ],
)
async def test_both_key_headers_and_any_version_are_accepted(
    emulator: EmulatorHandle, headers: dict[str, str]
) -> None:
    async with httpx2.AsyncClient() as http:
        response = await http.get(f"{emulator.url}/v1/messages/batches", headers=headers)
    assert response.status_code == 200


@pytest.mark.parametrize(
    "headers", [{}, {"x-api-key": ""}, {"authorization": "Basic abc"}, {"authorization": "Bearer"}]
)
async def test_no_api_key_is_401(emulator: EmulatorHandle, headers: dict[str, str]) -> None:
    async with httpx2.AsyncClient() as http:
        response = await http.get(f"{emulator.url}/v1/messages/batches", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.headers["request-id"].startswith("req_")


@pytest.mark.parametrize("emulator_config", [EmulatorConfig(api_key="sk-right")])
async def test_a_configured_key_refuses_others_through_the_sdk(make_client: Any) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        await make_client(api_key="sk-wrong").messages.batches.list()
    page = await make_client(api_key="sk-right").messages.batches.list()
    assert page.data == []


async def test_the_synchronous_messages_endpoint(anthropic_client: anthropic.AsyncAnthropic) -> None:
    message = await anthropic_client.messages.create(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "What is a lighthouse?"}]
    )
    assert message.type == "message"
    block = message.content[0]
    assert block.type == "text"
    assert "What is a lighthouse?" in block.text
    assert message.usage.service_tier == "standard"
    with pytest.raises(anthropic.NotFoundError, match="claude-nope"):
        await anthropic_client.messages.create(
            model="claude-nope", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        await anthropic_client.messages.create(
            model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "hi"}]
        )


async def test_prompt_cache_writes_then_reads_a_marked_prefix(
    anthropic_client: anthropic.AsyncAnthropic, emulator: EmulatorHandle
) -> None:
    system: list[TextBlockParam] = [
        {
            "type": "text",
            "text": "You are a careful analyst. " * 400,
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        }
    ]
    first = await anthropic_client.messages.create(
        model=MODEL, max_tokens=50, system=system, messages=[{"role": "user", "content": "first"}]
    )
    second = await anthropic_client.messages.create(
        model=MODEL, max_tokens=50, system=system, messages=[{"role": "user", "content": "second"}]
    )
    assert first.usage.cache_creation is not None
    assert first.usage.cache_creation.ephemeral_1h_input_tokens > 1024
    assert first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens == 0
    await emulator.advance(3601)
    third = await anthropic_client.messages.create(
        model=MODEL, max_tokens=50, system=system, messages=[{"role": "user", "content": "third"}]
    )
    assert third.usage.cache_read_input_tokens == 0, "the 1-hour entry has expired"
