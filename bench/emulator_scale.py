"""How the emulator copes with a full-size batch: memory and time for N requests of ~1 KB, and for N/10.

For each size a fresh emulator process is started (so its peak memory, VmHWM, belongs to that size alone),
one batch of N requests is created through the official SDK, the emulated clock is pushed past the
batch's end, and every result is streamed back through the SDK and checked against its own request.
The emulator's resident memory is read from /proc/PID/status at idle, after the create, while the
results stream and after they have all arrived.

    .venv/bin/python bench/emulator_scale.py [--requests 100000] [--port PORT]

Exits non-zero when a check fails: a result missing, duplicated, not succeeded or not answering its own
prompt, or the batch's counts disagreeing with N.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anthropic
import httpx2
from anthropic.types.messages.batch_create_params import Request
from benchlib import MIB, EmulatorProcess, free_port, machine, markdown, running, status_mib, text_pool

MODEL = "claude-sonnet-4-5"
PROMPT_CHARS = 900  # with the custom_id and params, each request is about 1 KB of JSON
EXCERPT_CHARS = 120  # how much of the prompt the emulator echoes back
PROCESSING_TIME_S = 5
SAMPLE_EVERY_LINES = 5_000


# -- the emulator process and its memory -----------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    rss_mib: float  # VmRSS: resident now
    hwm_mib: float  # VmHWM: the most it has been resident since it started


def read_memory(pid: int | str) -> Memory:
    """From /proc/PID/status; `pid` may be "self"."""
    return Memory(rss_mib=status_mib(pid, "VmRSS"), hwm_mib=status_mib(pid, "VmHWM"))


def prompt_for(custom_id: str, index: int, pool: str) -> str:
    head = f"Request {custom_id}: "
    start = (index * 7919) % (len(pool) - PROMPT_CHARS)
    return head + pool[start : start + PROMPT_CHARS - len(head)]


def expected_reply(prompt: str) -> tuple[str, str]:
    """What a correct reply contains: the prompt's start (whitespace collapsed), and its checksum."""
    excerpt = " ".join(prompt.split())[:EXCERPT_CHARS]
    return excerpt, f"[crc32 {zlib.crc32(prompt.encode()):08x}]"


def build_requests(n: int, pool: str) -> tuple[list[Request], dict[str, tuple[str, str]]]:
    requests: list[Request] = []
    expected: dict[str, tuple[str, str]] = {}
    for i in range(n):
        custom_id = f"bench-{i + 1:06d}"
        prompt = prompt_for(custom_id, i, pool)
        requests.append(
            {
                "custom_id": custom_id,
                "params": {
                    "model": MODEL,
                    "max_tokens": 256,
                    "messages": [{"role": "user", "content": prompt}],
                },
            }
        )
        expected[custom_id] = expected_reply(prompt)
    return requests, expected


class CreateWatcher:
    """httpx event hooks: when the create POST left the client, its size, and when its answer came back."""

    def __init__(self) -> None:
        self.sent_at = 0.0
        self.answered_at = 0.0
        self.body_bytes = 0

    @staticmethod
    def _is_create(request: httpx2.Request) -> bool:
        return request.method == "POST" and request.url.path == "/v1/messages/batches"

    async def on_request(self, request: httpx2.Request) -> None:
        if self._is_create(request):
            self.sent_at = time.perf_counter()
            self.body_bytes = int(request.headers["content-length"])

    async def on_response(self, response: httpx2.Response) -> None:
        if self._is_create(response.request):
            self.answered_at = time.perf_counter()


# -- one run -----------------------------------------------------------------------------------------------

NO_MEMORY = Memory(rss_mib=0.0, hwm_mib=0.0)


@dataclass
class Run:
    n: int
    json_bytes: int = 0
    build_s: float = 0.0
    sdk_prepare_s: float = 0.0  # the SDK's own work on the params before the POST goes out
    upload_accept_s: float = 0.0  # from the POST leaving to the emulator's answer: upload and accept
    create_s: float = 0.0  # build + SDK + upload + accept
    results_s: float = 0.0
    idle: Memory = NO_MEMORY
    after_create: Memory = NO_MEMORY
    results_max_rss_mib: float = 0.0  # sampled every SAMPLE_EVERY_LINES lines
    after_results: Memory = NO_MEMORY
    failures: list[str] = field(default_factory=list)

    @property
    def lines_per_s(self) -> float:
        return self.n / self.results_s if self.results_s else 0.0

    def check(self, ok: bool, failure: str) -> None:
        if not ok:
            self.failures.append(failure)
            print(f"CHECK FAILED: {failure}", flush=True)


@dataclass
class Received:
    """What came back in the results, per custom_id."""

    lines: int = 0
    seen: Counter[str] = field(default_factory=Counter)
    not_succeeded: int = 0
    wrong: list[str] = field(default_factory=list)  # replies that do not answer their own prompt


async def run_size(n: int, port: int, pool: str, log_dir: Path) -> Run:
    """One batch of n requests against a fresh emulator."""
    run = Run(n)
    emulator = EmulatorProcess(
        log_dir / f"emulator-{port}.log", processing_time_s=PROCESSING_TIME_S, port=port
    )
    print(f"\n== N = {n:,}", flush=True)
    async with running(emulator):
        await asyncio.sleep(0.5)  # let start-up settle before the idle reading
        run.idle = read_memory(emulator.pid)
        watcher = CreateWatcher()
        http_client = anthropic.DefaultAsyncHttpxClient(
            event_hooks={"request": [watcher.on_request], "response": [watcher.on_response]}
        )
        async with anthropic.AsyncAnthropic(
            api_key="k", base_url=emulator.url, max_retries=0, timeout=600, http_client=http_client
        ) as client:
            batch_id, expected = await create(run, client, watcher, emulator, pool)
            await end_batch(run, client, emulator, batch_id)
            received = await download(run, client, emulator, batch_id, expected)
        await check_results(run, emulator, expected, received)
    return run


async def create(
    run: Run,
    client: anthropic.AsyncAnthropic,
    watcher: CreateWatcher,
    emulator: EmulatorProcess,
    pool: str,
) -> tuple[str, dict[str, tuple[str, str]]]:
    started = time.perf_counter()
    requests, expected = build_requests(run.n, pool)
    built = time.perf_counter()
    batch = await client.messages.batches.create(requests=requests)
    run.create_s = time.perf_counter() - started
    run.after_create = read_memory(emulator.pid)
    run.build_s = built - started
    run.sdk_prepare_s = watcher.sent_at - built
    run.upload_accept_s = watcher.answered_at - watcher.sent_at
    run.json_bytes = watcher.body_bytes
    print(
        f"create: {run.create_s:.2f} s (build {run.build_s:.2f} s, SDK {run.sdk_prepare_s:.2f} s, "
        f"upload + emulator accept {run.upload_accept_s:.2f} s), {run.json_bytes / MIB:.1f} MiB sent",
        flush=True,
    )
    return batch.id, expected


async def end_batch(
    run: Run, client: anthropic.AsyncAnthropic, emulator: EmulatorProcess, batch_id: str
) -> None:
    """Push the emulated clock past the batch's processing time, and check it ended with every request."""
    await emulator.admin("POST", "clock/advance", {"seconds": PROCESSING_TIME_S + 5})
    batch = await client.messages.batches.retrieve(batch_id)
    run.check(batch.processing_status == "ended", f"batch is {batch.processing_status}, not ended")
    succeeded = batch.request_counts.succeeded
    run.check(succeeded == run.n, f"request_counts.succeeded = {succeeded}, expected {run.n}")


async def download(
    run: Run,
    client: anthropic.AsyncAnthropic,
    emulator: EmulatorProcess,
    batch_id: str,
    expected: dict[str, tuple[str, str]],
) -> Received:
    """Stream every result through the SDK, checking each as it arrives and sampling the emulator's RSS."""
    received = Received()
    run.results_max_rss_mib = read_memory(emulator.pid).rss_mib
    started = time.perf_counter()
    decoder = await client.messages.batches.results(batch_id)
    try:
        async for line in decoder:
            received.lines += 1
            received.seen[line.custom_id] += 1
            if line.result.type == "succeeded":
                text = "".join(b.text for b in line.result.message.content if b.type == "text")
                excerpt, checksum = expected.get(line.custom_id, ("\0", "\0"))
                if excerpt not in text or not text.endswith(checksum):
                    received.wrong.append(line.custom_id)
            else:
                received.not_succeeded += 1
            if received.lines % SAMPLE_EVERY_LINES == 0:
                run.results_max_rss_mib = max(run.results_max_rss_mib, read_memory(emulator.pid).rss_mib)
    finally:
        await decoder.close()
    run.results_s = time.perf_counter() - started
    run.after_results = read_memory(emulator.pid)
    run.results_max_rss_mib = max(run.results_max_rss_mib, run.after_results.rss_mib)
    print(f"results: {received.lines:,} lines in {run.results_s:.2f} s", flush=True)
    return received


async def check_results(
    run: Run, emulator: EmulatorProcess, expected: dict[str, tuple[str, str]], received: Received
) -> None:
    run.check(received.lines == run.n, f"{received.lines} result lines, expected {run.n}")
    missing = sorted(expected.keys() - received.seen.keys())
    run.check(not missing, f"{len(missing)} custom_ids never came back, e.g. {missing[:3]}")
    unknown = sorted(received.seen.keys() - expected.keys())
    run.check(not unknown, f"{len(unknown)} unknown custom_ids came back, e.g. {unknown[:3]}")
    repeated = sorted(cid for cid, count in received.seen.items() if count > 1)
    run.check(not repeated, f"{len(repeated)} custom_ids came back more than once, e.g. {repeated[:3]}")
    run.check(received.not_succeeded == 0, f"{received.not_succeeded} results did not succeed")
    wrong = received.wrong
    run.check(not wrong, f"{len(wrong)} replies do not answer their own prompt, e.g. {wrong[:3]}")
    stats = await emulator.admin("GET", "stats")
    got = stats["requests_received"]
    run.check(got == run.n, f"the emulator counted {got} requests received, expected {run.n}")


# -- the report --------------------------------------------------------------------------------------------


COLUMNS = [
    "N",
    "JSON sent (MiB)",
    "create (s)",
    "of which upload + accept (s)",
    "results (s)",
    "results lines/s",
    "RSS idle (MiB)",
    "RSS after create (MiB)",
    "RSS max during results (MiB)",
    "RSS after results (MiB)",
    "peak VmHWM (MiB)",
]


def table(runs: list[Run]) -> str:
    """A Markdown table, one row per size, ready to paste into docs/benchmarks.md."""
    rows = (
        [
            f"{run.n:,}",
            f"{run.json_bytes / MIB:.1f}",
            f"{run.create_s:.2f}",
            f"{run.upload_accept_s:.2f}",
            f"{run.results_s:.2f}",
            f"{run.lines_per_s:,.0f}",
            f"{run.idle.rss_mib:.0f}",
            f"{run.after_create.rss_mib:.0f}",
            f"{run.results_max_rss_mib:.0f}",
            f"{run.after_results.rss_mib:.0f}",
            f"{run.after_results.hwm_mib:.0f}",
        ]
        for run in runs
    )
    return markdown(COLUMNS, list(rows), ["---:"] * len(COLUMNS))


async def main(args: argparse.Namespace) -> int:
    print(f"machine: {machine()}", flush=True)
    pool = text_pool(random.Random(20_250_101))
    sizes = [max(1, args.requests // 10), args.requests]
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as log_dir:
        runs = [await run_size(n, args.port or free_port(), pool, Path(log_dir)) for n in sizes]
    print("\n" + table(runs))
    print(f"\nclient (this process) peak VmHWM: {read_memory('self').hwm_mib:.0f} MiB")
    failures = [f"N={run.n}: {failure}" for run in runs for failure in run.failures]
    if failures:
        print("\nFAILED:\n" + "\n".join(failures))
        return 1
    print("\nall checks passed")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--requests", type=int, default=100_000, help="requests in the large batch (default 100,000)"
    )
    parser.add_argument("--port", type=int, help="emulator port (default: a free one per run)")
    args = parser.parse_args()
    if not 10 <= args.requests <= 100_000:
        parser.error("--requests must be between 10 and 100,000 (the API's limit per batch)")
    return args


if __name__ == "__main__":
    print("$ " + shlex.join([sys.executable, *sys.argv]), flush=True)
    sys.exit(asyncio.run(main(parse_args())))
