"""What the benchmark scripts share: a free port, and `batchd emulator` run as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def text_pool(rng: random.Random, size: int = 256 * 1024) -> str:
    """Random lowercase words: prompts are slices of it, so no two requests are (or compress) alike."""
    words: list[str] = []
    length = 0
    while length < size:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10)))
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


class EmulatorProcess:
    """`batchd emulator` in a subprocess, its output kept in a log file for when something goes wrong."""

    def __init__(self, log_path: Path, *, processing_time_s: float, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.processing_time_s = processing_time_s
        self.command = [
            sys.executable,
            "-m",
            "batchd",
            "emulator",
            "--port",
            str(self.port),
            "--processing-time",
            str(processing_time_s),
        ]
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the emulator is not running")
        return self._process.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("wb") as log:
            return subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603

    async def start(self) -> None:
        self._process = self._spawn()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"the emulator exited with {self._process.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"{self.url}/_emulator/stats") as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the emulator did not answer within {STARTUP_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no output)"

    async def admin(self, method: str, path: str, payload: Any = None) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"{self.url}/_emulator/{path}", json=payload) as response,
        ):
            response.raise_for_status()
            return await response.json()

    async def end_all_batches(self) -> None:
        """Push the emulated clock past every batch's processing time."""
        await self.admin("POST", "clock/advance", {"seconds": self.processing_time_s * 10 + 5})
