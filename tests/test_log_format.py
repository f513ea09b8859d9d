"""One log format on stderr: what the libraries log through the standard library's `logging` comes out as
the same JSON events as batchd's own (log.py), never as plain text between them."""

from __future__ import annotations

import json
import re

from support import run_python

# An aiohttp server whose handler fails (aiohttp logs the error, with its traceback, on aiohttp.server), a
# library's info line (below the libraries' threshold), and one event of batchd's own.
SCRIPT = """
import asyncio, logging
import aiohttp, structlog
from aiohttp import web
from batchd import log

async def fail(request):
    raise RuntimeError("the handler broke")

async def main():
    log.configure("info", json_output=True)
    structlog.get_logger().info("batch.applied", batch_id="b1")
    logging.getLogger("httpx").info("HTTP Request: GET http://example.invalid 200")
    app = web.Application()
    app.router.add_get("/", fail)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as answer:
        assert answer.status == 500
    await runner.cleanup()

asyncio.run(main())
"""


async def test_a_librarys_error_is_one_json_event_with_batchds_keys() -> None:
    code, _, err = await run_python("-c", SCRIPT)
    assert code == 0, err
    lines = err.splitlines()
    events = [json.loads(line) for line in lines]  # every line is JSON: no plain-text traceback between
    ours, theirs = events[0], [event for event in events if event.get("logger") == "aiohttp.server"]
    assert ours["event"] == "batch.applied"
    assert len(theirs) == 1, lines
    (error,) = theirs
    assert set(ours) - {"batch_id"} <= set(error), "the same keys as batchd's own events"
    assert error["level"] == "error"
    assert error["event"].startswith("Error handling request")
    assert "RuntimeError: the handler broke" in error["exception"]  # the traceback, folded into the line
    assert not any("HTTP Request" in line for line in lines), "the libraries' info lines stay off"


async def test_a_terminal_gets_the_same_readable_lines_from_both() -> None:
    """Not JSON on a terminal (json_output=False stands in for one): the library's line is rendered as
    batchd's are, with its logger named."""
    script = (
        "import logging, structlog\n"
        "from batchd import log\n"
        "log.configure('info', json_output=False)\n"
        "structlog.get_logger().warning('daemon.stopping')\n"
        "logging.getLogger('asyncpg.pool').warning('connection lost')\n"
    )
    code, _, err = await run_python("-c", script)
    assert code == 0, err
    ours, theirs = re.sub(r"\x1b\[[0-9;]*m", "", err).splitlines()  # without the colours
    assert "[warning  ] daemon.stopping" in ours
    assert "[warning  ] connection lost" in theirs
    assert "asyncpg.pool" in theirs
