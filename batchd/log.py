"""structlog set-up: readable lines on a terminal, one JSON object per line anywhere else.

batchd's own events go through structlog. What the libraries log through the standard library's `logging`
(aiohttp's errors and access lines, asyncpg's, asyncio's "Task exception was never retrieved", Python's
warnings) goes through the same processors on a handler of the root logger, so stderr carries one format:
the same keys (`event`, `level`, `timestamp`, and `logger`, the library's logger), a traceback folded into
`exception`, never a plain-text line between the JSON ones.
"""

from __future__ import annotations

import logging
import sys

import structlog

# The libraries speak at warning and above: their info lines are chatter (httpx logs every request the SDK
# sends) and their debug may carry prompts. A logger can still be opened up on purpose, as the emulator's
# --access-log opens aiohttp.access.
LIBRARY_LEVEL = logging.WARNING

_handler: logging.Handler | None = None


def configure(level: str = "info", *, json_output: bool | None = None) -> None:
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    threshold = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_stdlib_logging(shared, renderer, max(threshold, LIBRARY_LEVEL))


def _route_stdlib_logging(
    shared: list[structlog.typing.Processor], renderer: structlog.typing.Processor, level: int
) -> None:
    global _handler  # noqa: PLW0603 - one handler of ours on the root logger, replaced when reconfigured
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                *shared,
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(),  # e.g. aiohttp.access's remote_address, response_status
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(level)
    _handler = handler
    logging.captureWarnings(capture=True)
