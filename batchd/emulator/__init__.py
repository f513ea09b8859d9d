"""An emulator of Anthropic's Message Batches API, faithful enough for the official SDK, nasty on demand."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import EmulatorConfig
from .faults import FaultPlan, HttpFault

# The settings are plain pydantic, loaded at once: batchd.config types its [emulator] section with them, and
# `batchd status` must not load aiohttp or the SDK for that. The server's side loads when first named.
if TYPE_CHECKING:
    from .app import EMULATOR, Emulator, create_app
    from .server import RunningEmulator, serve

_SERVER_SIDE = {
    "EMULATOR": "app",
    "Emulator": "app",
    "create_app": "app",
    "RunningEmulator": "server",
    "serve": "server",
}

__all__ = [
    "EMULATOR",
    "Emulator",
    "EmulatorConfig",
    "FaultPlan",
    "HttpFault",
    "RunningEmulator",
    "create_app",
    "serve",
]


def __getattr__(name: str) -> Any:
    module = _SERVER_SIDE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
