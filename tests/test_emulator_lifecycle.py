"""The batch lifecycle through the official SDK over real HTTP.

Create, retrieve, list, cancel, delete and results."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse
from support import MODEL, EmulatorHandle, request, wait_until

from batchd.emulator import EmulatorConfig

BATCH_KEYS = {
    "id",
    "type",
    "processing_status",
    "request_counts",
    "ended_at",
    "created_at",
    "expires_at",
    "archived_at",
    "cancel_initiated_at",
    "results_url",
}


async def results_of(
    client: anthropic.AsyncAnthropic, batch_id: str
) -> dict[str, MessageBatchIndividualResponse]:
    decoder = await client.messages.batches.results(batch_id)
    lines: list[MessageBatchIndividualResponse] = []
    try:
        lines.extend([line async for line in decoder])
    finally:
        await decoder.close()
    by_id = {line.custom_id: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id came back twice"
    return by_id


async def test_create_answers_an_in_progress_batch_with_every_field(
    anthropic_client: anthropic.AsyncAnthropic,
) -> None:
    raw = await anthropic_client.messages.batches.with_raw_response.create(
        requests=[request("a"), request("b"), request("c")]
    )
    body = raw.http_response.json()
    assert set(body) == BATCH_KEYS, "every key present, nulls explicit"
    batch = await raw.parse()
    assert batch.id.startswith("msgbatch_")
    assert batch.type == "message_batch"
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.model_dump() == {
        "processing": 3,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert batch.expires_at - batch.created_at == timedelta(hours=24)
    assert batch.ended_at is None
    assert batch.results_url is None
    assert body["archived_at"] is None
    assert body["cancel_initiated_at"] is None
    assert body["created_at"].endswith("Z")


async def test_a_batch_ends_after_its_processing_time_with_results_for_every_request(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    prompts = {
        f"req-{i}": f"Summarise document number {i} about {'lighthouses' if i % 2 else 'bees'}"
        for i in range(20)
    }
    batch = await anthropic_client.messages.batches.create(
        requests=[request(cid, text) for cid, text in prompts.items()]
    )
    await emulator.advance(30)
    assert (await anthropic_client.messages.batches.retrieve(batch.id)).processing_status == "in_progress"
    await emulator.advance(31)
    ended = await anthropic_client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert ended.ended_at is not None
    assert ended.request_counts.succeeded == 20
    assert ended.request_counts.processing == 0
    assert ended.results_url == f"{emulator.url}/v1/messages/batches/{batch.id}/results"

    results = await results_of(anthropic_client, batch.id)
    assert set(results) == set(prompts)
    for custom_id, line in results.items():
        assert line.result.type == "succeeded"
        message = line.result.message
        assert message.model == MODEL
        assert message.role == "assistant"
        assert message.stop_reason == "end_turn"
        block = message.content[0]
        assert block.type == "text"
        text = block.text
        assert prompts[custom_id] in text, "the reply answers this request's own prompt"
        assert message.usage.input_tokens > 0
        assert message.usage.output_tokens > 0
        assert message.usage.cache_read_input_tokens == 0
        assert message.usage.service_tier == "batch"


async def test_results_are_jsonl_with_lf_endings_and_not_in_request_order(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    ids = [f"r{i:03d}" for i in range(50)]
    batch = await anthropic_client.messages.batches.create(requests=[request(cid) for cid in ids])
    await emulator.advance(61)
    ended = await anthropic_client.messages.batches.retrieve(batch.id)
    assert ended.results_url is not None
    async with httpx2.AsyncClient() as http:
        response = await http.get(
            ended.results_url, headers={"x-api-key": "k", "Accept": "application/binary"}
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-jsonl"
    assert response.headers["request-id"].startswith("req_")
    body = response.content
    assert b"\r" not in body
    assert body.endswith(b"\n")
    lines = body.split(b"\n")[:-1]
    assert all(lines), "no blank line"
    returned = [MessageBatchIndividualResponse.model_validate_json(line).custom_id for line in lines]
    assert sorted(returned) == ids
    assert returned != ids


async def test_all_four_result_types(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    # errored: params the API refuses (asynchronously); expired: the fault plan; canceled: a cancel mid-way.
    await emulator.set_faults(expired_rate=0.25)
    requests = [request(f"ok-{i}") for i in range(40)]
    requests += [request(f"bad-{i}", model="claude-nope") for i in range(10)]
    batch = await anthropic_client.messages.batches.create(requests=requests)
    await emulator.set_faults()
    await emulator.advance(30)  # about half the requests are done by now
    await anthropic_client.messages.batches.cancel(batch.id)
    await emulator.advance(6)
    ended = await anthropic_client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    results = await results_of(anthropic_client, batch.id)
    kinds = {line.result.type for line in results.values()}
    assert kinds == {"succeeded", "errored", "canceled", "expired"}
    counts = ended.request_counts
    assert counts.succeeded + counts.errored + counts.canceled + counts.expired == 50
    assert counts.succeeded == sum(line.result.type == "succeeded" for line in results.values())
    assert counts.canceled == sum(line.result.type == "canceled" for line in results.values())
    for custom_id, line in results.items():
        if line.result.type == "errored":
            assert custom_id.startswith("bad-"), "only the refused params error"
            assert line.result.error.error.type == "invalid_request_error"
            assert "claude-nope" in line.result.error.error.message


async def test_cancel_goes_through_canceling_to_ended(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    batch = await anthropic_client.messages.batches.create(requests=[request("x"), request("y")])
    canceling = await anthropic_client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    assert canceling.request_counts.processing == 2
    assert canceling.request_counts.canceled == 0, "per-outcome counts stay zero until the batch ends"
    again = await anthropic_client.messages.batches.cancel(batch.id)
    assert again.cancel_initiated_at == canceling.cancel_initiated_at, "a second cancel changes nothing"
    await emulator.advance(5)
    ended = await anthropic_client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert ended.request_counts.canceled == 2
    assert ended.ended_at is not None
    with pytest.raises(anthropic.BadRequestError, match="already ended"):
        await anthropic_client.messages.batches.cancel(batch.id)


async def test_cancel_arrives_with_a_json_content_type_and_an_empty_body(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    batch = await anthropic_client.messages.batches.create(requests=[request("x")])
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            f"{emulator.url}/v1/messages/batches/{batch.id}/cancel",
            headers={"x-api-key": "k", "content-type": "application/json"},
        )
    assert response.status_code == 200
    assert response.json()["processing_status"] == "canceling"


async def test_delete_only_once_ended(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    batch = await anthropic_client.messages.batches.create(requests=[request("x")])
    with pytest.raises(anthropic.BadRequestError, match="still processing"):
        await anthropic_client.messages.batches.delete(batch.id)
    await emulator.advance(61)
    deleted = await anthropic_client.messages.batches.delete(batch.id)
    assert deleted.id == batch.id
    assert deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        await anthropic_client.messages.batches.retrieve(batch.id)
    with pytest.raises(anthropic.NotFoundError):
        await anthropic_client.messages.batches.delete(batch.id)


async def test_list_pages_newest_first(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    created = [
        (await anthropic_client.messages.batches.create(requests=[request(f"b{i}")])).id for i in range(7)
    ]
    newest_first = created[::-1]

    first = await anthropic_client.messages.batches.list(limit=3)
    assert [b.id for b in first.data] == newest_first[:3]
    assert first.has_more is True
    assert first.first_id == newest_first[0]
    assert first.last_id == newest_first[2]

    walked: list[str] = [b.id async for b in await anthropic_client.messages.batches.list(limit=3)]
    assert walked == newest_first, "auto-paging with after_id visits every batch once, newest first"
    calls = (await emulator.stats())["calls"]["list"]
    assert calls == 1 + 3, "one page for the first call, then three pages of 3, 3 and 1"

    last = await anthropic_client.messages.batches.list(limit=3, after_id=newest_first[5])
    assert [b.id for b in last.data] == newest_first[6:]
    assert last.has_more is False

    newer = await anthropic_client.messages.batches.list(limit=2, before_id=newest_first[4])
    assert [b.id for b in newer.data] == newest_first[2:4], "the page just before the cursor, newest first"
    assert newer.has_more is True
    backwards: list[str] = [
        b.id async for b in await anthropic_client.messages.batches.list(limit=2, before_id=newest_first[6])
    ]
    assert sorted(backwards) == sorted(newest_first[:6])

    empty = await anthropic_client.messages.batches.list(limit=5, after_id=newest_first[6])
    assert empty.data == []
    assert empty.first_id is None
    assert empty.has_more is False


async def test_list_refuses_bad_parameters(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(anthropic.BadRequestError, match="limit"):
        await anthropic_client.messages.batches.list(limit=0)
    with pytest.raises(anthropic.BadRequestError, match="limit"):
        await anthropic_client.messages.batches.list(limit=1001)
    with pytest.raises(anthropic.BadRequestError, match="msgbatch_unknown"):
        await anthropic_client.messages.batches.list(after_id="msgbatch_unknown")


async def test_results_before_the_end_and_after_archiving(
    emulator: EmulatorHandle, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    batch = await anthropic_client.messages.batches.create(requests=[request("x")])
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        await anthropic_client.messages.batches.results(batch.id)
    async with httpx2.AsyncClient() as http:
        early = await http.get(
            f"{emulator.url}/v1/messages/batches/{batch.id}/results", headers={"x-api-key": "k"}
        )
    assert early.status_code == 400
    assert early.json()["error"]["type"] == "invalid_request_error"

    await emulator.advance(61 + 29 * 86_400)
    archived = await anthropic_client.messages.batches.retrieve(batch.id)
    assert archived.archived_at is not None
    with pytest.raises(anthropic.NotFoundError, match="no longer available"):
        await anthropic_client.messages.batches.results(batch.id)


async def test_a_stuck_batch_expires_at_its_24_hour_mark(make_client: Any, emulator: EmulatorHandle) -> None:
    # With the clock scaled, a stuck batch expires at its 24-hour mark: every unprocessed request `expired`.
    await emulator.set_faults(stuck_batches=1)
    client = make_client()
    batch: MessageBatch = await client.messages.batches.create(requests=[request("s1"), request("s2")])
    await emulator.advance(23 * 3600)
    assert (await client.messages.batches.retrieve(batch.id)).processing_status == "in_progress"
    await emulator.advance(3600)
    ended = await client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert ended.ended_at == ended.expires_at
    assert ended.request_counts.expired == 2


@pytest.mark.parametrize(
    "emulator_config", [EmulatorConfig(time_scale=200_000, processing_time_s=(1e9, 1e9), seed=7)]
)
async def test_the_time_scale_makes_a_day_pass_in_real_seconds(
    anthropic_client: anthropic.AsyncAnthropic,
) -> None:
    # A batch that would take 30 years expires at its 24-hour mark, which this scale reaches in 0.43 s.
    batch = await anthropic_client.messages.batches.create(requests=[request("slow")])

    async def ended() -> bool:
        return (await anthropic_client.messages.batches.retrieve(batch.id)).processing_status == "ended"

    await wait_until(ended, timeout=20)
    final = await anthropic_client.messages.batches.retrieve(batch.id)
    assert final.ended_at == final.expires_at
    assert final.request_counts.expired == 1
