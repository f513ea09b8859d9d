"""Running the emulator app on a socket, for the command line, the demo and the tests alike."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from .app import EMULATOR, Emulator, create_app
from .config import EmulatorConfig


@dataclass(frozen=True)
class RunningEmulator:
    url: str
    app: web.Application

    @property
    def state(self) -> Emulator:
        return self.app[EMULATOR]


@asynccontextmanager
async def serve(
    config: EmulatorConfig, *, access_log: logging.Logger | None = None
) -> AsyncIterator[RunningEmulator]:
    """Serve on `config.host` and `config.port` (0: a free port) until the block exits."""
    runner = web.AppRunner(create_app(config), access_log=access_log)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        host, port = runner.addresses[0][:2]
        yield RunningEmulator(url=f"http://{host}:{port}", app=runner.app)
    finally:
        await runner.cleanup()
