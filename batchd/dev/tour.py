"""`batchd demo --emulator-only`: a scripted tour of the emulator, driven by the official SDK over HTTP.

It starts the emulator on a free loopback port, then walks a batch through its life (create, poll, results),
cancels another, shows a bad request coming back `errored`, and finally injects the nastiest fault, a create
whose response is lost, to show why batchd never trusts the SDK's retries for create.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import anthropic
from aiohttp import web
from anthropic.types.messages.batch_create_params import Request

from batchd.emulator import EMULATOR, EmulatorConfig, FaultPlan, serve

MODEL = "claude-haiku-4-5"
PROMPTS = {
    "summary-1": "Summarise: the lighthouse keeper logged every ship that passed in the night.",
    "summary-2": "Summarise: bees communicate the direction of flowers with a waggle dance.",
    "classify-1": "Classify as praise, complaint or question: 'Why is my invoice late again?'",
}


def _request(custom_id: str, text: str, model: str = MODEL) -> Request:
    return {
        "custom_id": custom_id,
        "params": {"model": model, "max_tokens": 200, "messages": [{"role": "user", "content": text}]},
    }


class Tour:
    def __init__(
        self, client: anthropic.AsyncAnthropic, app: web.Application, say: Callable[[str], None]
    ) -> None:
        self.client = client
        self.app = app
        self.say = say

    async def run(self) -> None:
        await self.batch_lifecycle()
        await self.cancel()
        await self.lost_response()
        self.say("\nThe tour is over: every call above went through the official SDK over HTTP.")

    async def batch_lifecycle(self) -> None:
        batches = self.client.messages.batches
        self.say("1. Create a batch of four requests (one names a model that does not exist).")
        requests = [_request(cid, text) for cid, text in PROMPTS.items()]
        requests.append(_request("bad-model", "Hello?", model="claude-does-not-exist"))
        batch = await batches.create(requests=requests)
        self.say(f"   {batch.id}: {batch.processing_status}, counts {batch.request_counts.model_dump()}")
        self.say("2. Poll until it ends (the emulator takes a couple of seconds here).")
        started = time.monotonic()
        while batch.processing_status != "ended":
            await asyncio.sleep(0.5)
            batch = await batches.retrieve(batch.id)
        self.say(f"   ended after {time.monotonic() - started:.1f} s: {batch.request_counts.model_dump()}")
        self.say(f"3. Stream the results from {batch.results_url}")
        decoder = await batches.results(batch.id)
        try:
            async for line in decoder:
                result = line.result
                if result.type == "succeeded":
                    text = result.message.content[0].text  # type: ignore[union-attr]
                    usage = result.message.usage
                    self.say(
                        f"   {line.custom_id}: {text}  ({usage.input_tokens} in, {usage.output_tokens} out)"
                    )
                elif result.type == "errored":
                    error = result.error.error
                    self.say(f"   {line.custom_id}: errored, {error.type}: {error.message}")
                else:
                    self.say(f"   {line.custom_id}: {result.type}")
        finally:
            await decoder.close()
        deleted = await batches.delete(batch.id)
        self.say(f"4. Delete the provider's copy once the results are safe: {deleted.type}")

    async def cancel(self) -> None:
        batches = self.client.messages.batches
        batch = await batches.create(requests=[_request("to-cancel", "This one will be canceled.")])
        batch = await batches.cancel(batch.id)
        self.say(
            f"5. Cancel a fresh batch: {batch.processing_status} at {batch.cancel_initiated_at:%H:%M:%S}"
        )
        while batch.processing_status != "ended":
            await asyncio.sleep(0.2)
            batch = await batches.retrieve(batch.id)
        self.say(f"   then ended: {batch.request_counts.model_dump()}")

    async def lost_response(self) -> None:
        emulator = self.app[EMULATOR]
        emulator.faults.plan = FaultPlan(lose_create_responses=1)
        self.say("6. Fault: the next create succeeds on the server, but its response is lost.")
        batch = await self.client.messages.batches.create(requests=[_request("once-only", "Send me once.")])
        stats = emulator.stats.summary()
        made = stats["batches_created"] - 2  # less the batches of steps 1 and 5
        self.say(f"   The SDK retried and got {batch.id}; the emulator created {made} batches")
        self.say(f"   for that one call: custom_ids sent twice = {json.dumps(stats['duplicate_custom_ids'])}")
        self.say(
            "   (the SDK sends no idempotency key; the batchd daemon reconciles instead of retrying blindly)"
        )


async def run_tour(say: Callable[[str], None] = print) -> None:
    config = EmulatorConfig(port=0, processing_time_s=(1.5, 3.0), cancel_time_s=0.5)
    async with serve(config) as emulator:
        say(f"The Message Batches API emulator is listening on {emulator.url}\n")
        async with anthropic.AsyncAnthropic(api_key="demo-key", base_url=emulator.url) as client:
            await Tour(client, emulator.app, say).run()
