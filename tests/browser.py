"""A small headless Chromium harness for end-to-end browser tests, over the Chrome DevTools Protocol.

    async with headless_chromium(artifacts_dir) as browser:
        await browser.navigate(url)
        await browser.wait_for("document.querySelector('#status').textContent === 'ready'")
        assert await browser.evaluate("1 + 1") == 2
        await browser.screenshot(artifacts_dir / "page.png")

It runs Debian's /usr/bin/chromium (or $BATCHD_CHROMIUM; `make chromium` installs it) with a profile in a
temporary directory, and speaks CDP to one page over aiohttp's websocket client: no other dependency.
Console messages and uncaught exceptions are collected in `browser.console` and shown by a failing
`wait_for`. When the block fails and `artifacts_dir` is given, a screenshot (`failure.png`) and the
console (`console.txt`) are saved there. The browser's processes and profile are removed on exit, however
the block ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp

CHROMIUM = "/usr/bin/chromium"
STARTUP_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
WINDOW_SIZE = (1280, 900)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BrowserError(RuntimeError):
    """Chromium could not start, a DevTools command failed, or page script threw."""


@dataclass(frozen=True)
class ConsoleMessage:
    """One console call (`kind` is log, info, warning, error, debug, ...), an uncaught exception
    (`kind` "exception"), or a message the browser itself logged (`kind` "browser.<level>")."""

    kind: str
    text: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.text}"


def _preview_text(preview: dict[str, Any]) -> str:
    """An object as DevTools shows it in the console: `{answer: 42}`, `[1, 2]`, `… ` when cut short."""
    properties = preview.get("properties", [])
    more = ", …" if preview.get("overflow") else ""
    if preview.get("subtype") == "array":
        return "[" + ", ".join(str(item.get("value", item.get("type"))) for item in properties) + more + "]"
    fields = ", ".join(f"{item['name']}: {item.get('value', item.get('type'))}" for item in properties)
    return "{" + fields + more + "}"


def _remote_object_text(value: dict[str, Any]) -> str:
    """How a console argument reads: its value for primitives, a preview of objects, else a description."""
    if "value" in value:
        inner = value["value"]
        return inner if isinstance(inner, str) else json.dumps(inner)
    if value.get("type") == "object" and "preview" in value and value.get("subtype") in (None, "array"):
        return _preview_text(value["preview"])
    if "unserializableValue" in value:
        return str(value["unserializableValue"])
    if "description" in value:
        return str(value["description"])
    return str(value.get("type", "?"))


def _exception_text(details: dict[str, Any]) -> str:
    exception = details.get("exception") or {}
    description = exception.get("description")
    if description:
        return str(description)
    if "value" in exception:
        return f"{details.get('text', 'Uncaught')} {_remote_object_text(exception)}"
    return str(details.get("text", "exception"))


class Browser:
    """One page of a headless Chromium, driven over its DevTools websocket."""

    def __init__(self, websocket: aiohttp.ClientWebSocketResponse, artifacts_dir: Path | None) -> None:
        self._websocket = websocket
        self.artifacts_dir = artifacts_dir
        self.console: list[ConsoleMessage] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._closed_error: BaseException | None = None
        self._reader = asyncio.create_task(self._read(), name="chromium-devtools-reader")

    async def _read(self) -> None:
        try:
            async for message in self._websocket:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    continue
                data: dict[str, Any] = json.loads(message.data)
                if "id" in data:
                    future = self._pending.pop(data["id"], None)
                    if future is not None and not future.done():
                        future.set_result(data)
                else:
                    self._on_event(data["method"], data.get("params", {}))
            self._closed_error = BrowserError("the DevTools websocket closed")
        except Exception as failure:  # noqa: BLE001  (handed to every waiter below)
            self._closed_error = failure
        finally:
            closed = self._closed_error or BrowserError("the DevTools connection is closed")
            for future in [*self._pending.values(), *itertools.chain(*self._waiters.values())]:
                if not future.done():
                    future.set_exception(closed)
            self._pending.clear()
            self._waiters.clear()

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(_remote_object_text(argument) for argument in params.get("args", []))
            self.console.append(ConsoleMessage(params.get("type", "log"), text))
        elif method == "Runtime.exceptionThrown":
            self.console.append(ConsoleMessage("exception", _exception_text(params["exceptionDetails"])))
        elif method == "Log.entryAdded":
            entry = params["entry"]
            url = f" ({entry['url']})" if entry.get("url") else ""
            self.console.append(ConsoleMessage(f"browser.{entry.get('level', 'info')}", entry["text"] + url))
        for future in self._waiters.pop(method, []):
            if not future.done():
                future.set_result(params)

    def _expect(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next `method` event; take it before sending the command that causes it."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if self._closed_error is not None or self._reader.done():
            future.set_exception(BrowserError(f"the DevTools connection is closed: {self._closed_error}"))
        else:
            self._waiters.setdefault(method, []).append(future)
        return future

    async def send(self, method: str, timeout: float = COMMAND_TIMEOUT, **params: Any) -> dict[str, Any]:
        """Sends one DevTools command to the page and returns its result."""
        if self._reader.done():
            raise BrowserError(f"the DevTools connection is closed: {self._closed_error}")
        command_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        try:
            await self._websocket.send_json({"id": command_id, "method": method, "params": params})
            async with asyncio.timeout(timeout):
                response = await future
        except TimeoutError:
            raise BrowserError(f"{method}: no answer from Chromium in {timeout:g} s") from None
        finally:
            self._pending.pop(command_id, None)
        if "error" in response:
            error = response["error"]
            raise BrowserError(
                f"{method}: {error.get('message')} ({error.get('code')}) {error.get('data', '')}"
            )
        result: dict[str, Any] = response.get("result", {})
        return result

    async def _enable(self) -> None:
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        # --window-size counts headless Chromium's make-believe toolbars (the page got 1280x757): the page
        # itself is made the window's size, so screenshots show what a 1280x900 window's content would.
        await self.set_viewport(*WINDOW_SIZE)

    async def set_viewport(self, width: int, height: int) -> None:
        """Lays the page out as a window of that size would (media queries included)."""
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        await self.send("Emulation.setDeviceMetricsOverride", **metrics)

    async def navigate(self, url: str, timeout: float = COMMAND_TIMEOUT) -> None:
        """Loads `url` and returns once the page's load event fired."""
        loaded = self._expect("Page.loadEventFired")
        try:
            result = await self.send("Page.navigate", url=url)
            if result.get("errorText"):
                raise BrowserError(f"navigating to {url}: {result['errorText']}")
            async with asyncio.timeout(timeout):
                await loaded
        except TimeoutError:
            raise BrowserError(f"{url} did not finish loading in {timeout:g} s") from None
        finally:
            if loaded.done() and not loaded.cancelled():
                loaded.exception()  # retrieved: the error raised above already tells it
            loaded.cancel()

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited), as JSON-able data;
        raises BrowserError with the exception's text if it throws."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {_exception_text(result['exceptionDetails'])}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.05) -> Any:
        """Polls a JavaScript expression until it is truthy and returns its value; fails with the page's
        console when `timeout` seconds pass first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Any = None
        while True:
            try:
                last = await self.evaluate(expression)
            except BrowserError as error:
                if self._reader.done():
                    raise
                last = error
            else:
                if last:
                    return last
            if loop.time() >= deadline:
                break
            await asyncio.sleep(min(interval, max(0.0, deadline - loop.time())))
        console = "\n".join(f"  {message}" for message in self.console) or "  (nothing)"
        raise AssertionError(
            f"{expression!r} still not truthy after {timeout:g} s; last result: {last!r}\nconsole:\n{console}"
        )

    async def screenshot(self, path: Path | str) -> Path:
        """Saves a PNG of the viewport; a relative path is taken inside artifacts_dir when one was given."""
        target = Path(path)
        if not target.is_absolute() and self.artifacts_dir is not None:
            target = self.artifacts_dir / target
        result = await self.send("Page.captureScreenshot", format="png")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(result["data"]))
        return target

    async def set_cookie(self, name: str, value: str, url: str) -> None:
        """Sets a cookie for `url` (before navigating there, for the first request to carry it)."""
        result = await self.send("Network.setCookie", name=name, value=value, url=url)
        if result.get("success") is False:
            raise BrowserError(f"Chromium refused the cookie {name} for {url}")

    async def save_failure_artifacts(self) -> None:
        """Best effort: the page as it was and its console, into artifacts_dir."""
        if self.artifacts_dir is None:
            return
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        (self.artifacts_dir / "console.txt").write_text("".join(f"{message}\n" for message in self.console))
        if not self._reader.done():
            with contextlib.suppress(BrowserError, OSError, TimeoutError):
                async with asyncio.timeout(5.0):
                    await self.screenshot(self.artifacts_dir / "failure.png")

    async def close(self) -> bool:
        """Asks Chromium to quit (it then reaps its own helpers) and closes the connection; True if asked."""
        asked = False
        if not self._reader.done():
            with contextlib.suppress(BrowserError, OSError, aiohttp.ClientError):
                await self.send("Browser.close", timeout=2.0)
                asked = True
        await self._websocket.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        return asked


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return text[-limit:].strip() or "(no output)"


async def _devtools_port(process: asyncio.subprocess.Process, profile: Path, stderr: Path) -> int:
    """Chromium writes the port it chose into <profile>/DevToolsActivePort once it listens."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT
    active_port = profile / "DevToolsActivePort"
    while True:
        with contextlib.suppress(OSError):
            lines = active_port.read_text().splitlines()
            if len(lines) >= 2 and lines[0].strip().isdigit():
                return int(lines[0])
        if process.returncode is not None:
            raise BrowserError(f"Chromium exited with status {process.returncode}:\n{_tail(stderr)}")
        if loop.time() >= deadline:
            raise BrowserError(
                f"Chromium did not open its DevTools port in {STARTUP_TIMEOUT:g} s:\n{_tail(stderr)}"
            )
        await asyncio.sleep(0.05)


async def _page_websocket_url(http: aiohttp.ClientSession, port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    async with http.get(f"{base}/json/list") as response:
        response.raise_for_status()
        targets: list[dict[str, Any]] = await response.json()
    pages = [target for target in targets if target.get("type") == "page"]
    if not pages:
        async with http.put(f"{base}/json/new?about:blank") as response:
            response.raise_for_status()
            pages = [await response.json()]
    return str(pages[0]["webSocketDebuggerUrl"])


def _kill_group(process: asyncio.subprocess.Process) -> None:
    """Chromium's helpers (zygote, renderers, GPU) share its process group: none may outlive the test."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


async def _exited(process: asyncio.subprocess.Process, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            await process.wait()
    except TimeoutError:
        return False
    return True


async def _stop(process: asyncio.subprocess.Process, asked_to_close: bool) -> None:
    """Waits for a Chromium told to close, else terminates it, and kills its process group past a deadline."""
    try:
        if asked_to_close and await _exited(process, STOP_TIMEOUT):
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        if not await _exited(process, STOP_TIMEOUT):
            _kill_group(process)
            await _exited(process, STOP_TIMEOUT)
    finally:
        _kill_group(process)


@contextlib.asynccontextmanager
async def headless_chromium(artifacts_dir: Path | None = None) -> AsyncIterator[Browser]:
    """A headless Chromium with one blank page, stopped and its profile removed when the block ends."""
    executable = os.environ.get("BATCHD_CHROMIUM", CHROMIUM)
    if shutil.which(executable) is None:
        raise BrowserError(f"{executable} not found: `make chromium` installs Debian's chromium")
    workdir = Path(tempfile.mkdtemp(prefix="batchd-chromium-"))
    profile = workdir / "profile"
    stderr_path = workdir / "chromium.log"
    process: asyncio.subprocess.Process | None = None
    stderr_file: IO[bytes] | None = None
    asked_to_close = False
    try:
        stderr_file = stderr_path.open("wb")
        process = await asyncio.create_subprocess_exec(
            executable,
            "--headless=new",
            "--no-sandbox",  # the tests run as root
            "--disable-gpu",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}",
            # Nothing but the pages a test opens: no first-run UI, no update or metrics traffic.
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--disable-features=Translate,MediaRouter,OptimizationHints",
            "--mute-audio",
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stderr_file,
            stderr=stderr_file,
            start_new_session=True,
        )
        port = await _devtools_port(process, profile, stderr_path)
        async with aiohttp.ClientSession() as http:
            websocket = await http.ws_connect(await _page_websocket_url(http, port), max_msg_size=0)
            browser = Browser(websocket, artifacts_dir)
            try:
                await browser._enable()
                yield browser
            except Exception:
                with contextlib.suppress(Exception):
                    await browser.save_failure_artifacts()
                raise
            finally:
                asked_to_close = await browser.close()
    finally:
        try:
            if process is not None:
                await _stop(process, asked_to_close)
        finally:
            if process is not None:
                _kill_group(process)
            if stderr_file is not None:
                stderr_file.close()
            shutil.rmtree(workdir, ignore_errors=True)
