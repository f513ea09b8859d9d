"""The API's real ceiling: 100,000 requests of about 1 KB in one batch, through the SDK, results streamed."""

from __future__ import annotations

from collections.abc import Callable

import anthropic
import pytest
from support import EmulatorHandle, request

N = 100_000


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_100k_request_batch_is_accepted_processed_and_streamed(
    emulator: EmulatorHandle, make_client: Callable[..., anthropic.AsyncAnthropic]
) -> None:
    client = make_client(timeout=300, max_retries=0)
    filler = "lorem ipsum dolor sit amet " * 33  # about 900 characters: 1 KB a request with the rest
    batch = await client.messages.batches.create(
        requests=[request(f"big-{i:06d}", f"{i:06d} {filler}") for i in range(N)]
    )
    assert batch.request_counts.processing == N
    await emulator.advance(61)
    ended = await client.messages.batches.retrieve(batch.id)
    assert ended.request_counts.succeeded == N

    decoder = await client.messages.batches.results(batch.id)
    seen: set[str] = set()
    try:
        async for line in decoder:
            assert line.result.type == "succeeded"
            block = line.result.message.content[0]
            assert block.type == "text"
            assert line.custom_id[4:] in block.text
            seen.add(line.custom_id)
    finally:
        await decoder.close()
    assert len(seen) == N


@pytest.mark.slow
async def test_100001_requests_are_one_too_many(anthropic_client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="at most 100000 items"):
        await anthropic_client.messages.batches.create(requests=[request(f"r{i}", "x") for i in range(N + 1)])
