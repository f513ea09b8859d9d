"""An emulator of Anthropic's Message Batches API, faithful enough for the official SDK, nasty on demand."""

from .app import EMULATOR, Emulator, create_app
from .config import EmulatorConfig
from .faults import FaultPlan, HttpFault
from .server import RunningEmulator, serve

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
