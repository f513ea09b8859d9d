"""Helpers shared by the tests: running the emulator, waiting on conditions, building requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from batchd.emulator import EmulatorConfig, RunningEmulator, serve

MODEL = "claude-haiku-4-5"


class EmulatorHandle(RunningEmulator):
    """A running emulator with the operator's side door at hand: its state is for assertions only."""

    async def admin(self, method: str, path: str, payload: Any = None) -> Any:
        """Call the /_emulator/ side door over HTTP, as an operator would."""
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"{self.url}/_emulator/{path}", json=payload) as response,
        ):
            body = await response.json()
            if response.status != 200:
                raise AssertionError(f"{method} /_emulator/{path} answered {response.status}: {body}")
            return body

    async def advance(self, seconds: float) -> None:
        await self.admin("POST", "clock/advance", {"seconds": seconds})

    async def set_faults(self, **plan: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.admin("PUT", "faults", plan)
        return result

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.admin("GET", "stats")
        return result


@asynccontextmanager
async def start_emulator(config: EmulatorConfig) -> AsyncIterator[EmulatorHandle]:
    async with serve(config.model_copy(update={"host": "127.0.0.1", "port": 0})) as running:
        yield EmulatorHandle(url=running.url, app=running.app)


def request(custom_id: str, text: str | None = None, **params: Any) -> dict[str, Any]:
    """One batch request; its prompt names the custom_id unless a text is given."""
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 256,
        "messages": [
            {"role": "user", "content": text if text is not None else f"Tell me about {custom_id}."}
        ],
    }
    body.update(params)
    return {"custom_id": custom_id, "params": body}


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Polls `condition` until it holds; fails after `timeout` seconds. A deadline, never a bare sleep."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
