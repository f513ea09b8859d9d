"""The headless Chromium harness (tests/browser.py) drives a real page served on the loopback."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from browser import PNG_MAGIC, BrowserError, headless_chromium

PAGE = """<!doctype html>
<html>
  <head><meta charset="utf-8"><title>harness</title></head>
  <body>
    <h1>batchd browser harness</h1>
    <p id="status">loading</p>
    <p id="timer">waiting</p>
    <script>
      console.log("page script ran", {answer: 42});
      fetch("/api/status")
        .then((response) => response.json())
        .then((body) => {
          document.getElementById("status").textContent = `ready: ${body.jobs} jobs, cookie ${body.cookie}`;
        });
      setTimeout(() => { document.getElementById("timer").textContent = "fired"; }, 200);
      setTimeout(() => { throw new Error("deliberate uncaught error"); }, 0);
    </script>
  </body>
</html>
"""


@asynccontextmanager
async def serve_page() -> AsyncIterator[str]:
    async def index(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"jobs": 3, "cookie": request.cookies.get("session", "none")})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.slow
async def test_harness_drives_a_page(tmp_path: Path) -> None:
    async with serve_page() as url, headless_chromium(tmp_path / "artifacts") as browser:
        await browser.set_cookie("session", "abc123", url)
        await browser.navigate(f"{url}/")

        status = await browser.wait_for(
            "document.getElementById('status').textContent.startsWith('ready')"
            " && document.getElementById('status').textContent"
        )
        assert status == "ready: 3 jobs, cookie abc123"
        assert await browser.wait_for("document.getElementById('timer').textContent === 'fired'") is True

        assert await browser.evaluate("document.title") == "harness"
        assert await browser.evaluate("({a: [1, 2], b: null})") == {"a": [1, 2], "b": None}
        assert await browser.evaluate("fetch('/api/status').then((r) => r.json())") == {
            "jobs": 3,
            "cookie": "abc123",
        }
        assert await browser.evaluate("undefined") is None
        with pytest.raises(BrowserError, match="nope"):
            await browser.evaluate("(() => { throw new Error('nope'); })()")

        texts = [(message.kind, message.text) for message in browser.console]
        assert ("log", "page script ran {answer: 42}") in texts
        assert any(kind == "exception" and "deliberate uncaught error" in text for kind, text in texts)

        with pytest.raises(AssertionError, match=r"(?s)still not truthy.*page script ran"):
            await browser.wait_for("document.getElementById('missing')", timeout=0.3)

        shot = await browser.screenshot("page.png")
        assert shot == tmp_path / "artifacts" / "page.png"
        png = shot.read_bytes()
        assert png.startswith(PNG_MAGIC)
        assert struct.unpack(">II", png[16:24]) == (1280, 900)  # IHDR: the page fills the whole window
