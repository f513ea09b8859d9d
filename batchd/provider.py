"""Every call batchd makes to Anthropic, through the official SDK, each one through the shared limiter.

The SDK's own retries are off: a retried create after a lost response makes a second batch (the SDK sends
no idempotency key), and a retry the limiter does not see spends the per-minute budget twice. The callers
decide what to retry and when.

Every call is reported to `on_call` as (endpoint, status, seconds): the daemon counts them in its metrics
(`batchd_api_calls_total` by endpoint and status, metrics.py). A success is 200 (every batch endpoint
answers 200), a failure its HTTP status, or `connection_error` / `timeout` when none came back.

A 401 or 403 from any call also marks the API refused in `health` (health.py), which holds back everything
that sends until a check (`check`) passes again.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import httpx2
from anthropic.resources.messages import AsyncMessages
from anthropic.types.messages import DeletedMessageBatch, MessageBatch

from .health import KEY_REFUSED, ApiHealth
from .ratelimit import RateLimiter

DEFAULT_RETRY_AFTER_S = 5.0
# The list of batches is never missing at the API itself: an answer like these comes from another server.
NOT_THE_API = frozenset({404, 405})
# Told of each API call once answered or failed: its endpoint, its status (call_status), its seconds.
OnCall = Callable[[str, str, float], None]
# The Messages API params the installed SDK takes as arguments of messages.create.
_MESSAGE_ARGUMENTS = frozenset(inspect.signature(AsyncMessages.create).parameters) - {
    "self",
    "extra_headers",
    "extra_query",
    "extra_body",
    "timeout",
}


class Provider:
    def __init__(
        self,
        api_key: str,
        *,
        base_url: str | None,
        limiter: RateLimiter,
        timeout_s: float,
        on_call: OnCall | None = None,
    ) -> None:
        self.limiter = limiter
        self.on_call: OnCall = on_call or _not_counted
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s
        )
        # Unchecked, a provider is assumed to work (tests', benchmarks'); the daemon's starts `unchecked`.
        self.health = ApiHealth(str(self.client.base_url))

    async def close(self) -> None:
        await self.client.close()

    def set_api_key(self, key: str) -> bool:
        """Uses `key` for the calls from now on (the SDK reads it at each request); True when it changed."""
        if key == self.client.api_key:
            return False
        self.client.api_key = key
        return True

    async def check(self, timeout_s: float) -> None:
        """Does the API take this key? One cheap authenticated call, a list of one batch, through the limiter
        like every batch call; its answer sets `health`: 401 or 403 refused; no answer, or one no API would
        give (404, 405, a body that is not a list of batches), unreachable; any other answer ok (the API is
        there and did not refuse the key: a 429 or a 5xx is for each call to handle)."""
        try:
            await self._call("list", self.client.messages.batches.list(limit=1, timeout=timeout_s))
        except anthropic.APIStatusError as error:
            if error.status_code in NOT_THE_API:
                self.health.unreachable(f"answered {error.status_code}: is [anthropic] base_url the API?")
            elif error.status_code not in KEY_REFUSED:  # a refusal was noted by _call
                self.health.passed(f"the check was answered {error.status_code}")
        except anthropic.APIConnectionError as error:  # a timeout too
            cause = str(error.__cause__ or "")
            self.health.unreachable(f"{error} ({cause})" if cause and cause not in str(error) else str(error))
        except anthropic.APIResponseValidationError as error:
            self.health.unreachable(f"not the API's answer ({error}): is [anthropic] base_url the API?")
        else:
            self.health.passed()

    def _refused(self, endpoint: str, error: BaseException) -> None:
        if isinstance(error, anthropic.APIStatusError) and error.status_code in KEY_REFUSED:
            self.health.refused(error.status_code, endpoint, api_message(error))

    async def _call(self, endpoint: str, request: Any) -> Any:
        await self.limiter.acquire()
        started = time.monotonic()
        try:
            result = await request
        except Exception as error:
            if isinstance(error, anthropic.RateLimitError):
                self.limiter.pause(retry_after(error) or DEFAULT_RETRY_AFTER_S)
            self._refused(endpoint, error)
            self.on_call(endpoint, call_status(error), time.monotonic() - started)
            raise
        self.on_call(endpoint, "200", time.monotonic() - started)
        return result

    async def create_message(self, params: dict[str, Any]) -> str:
        """One request through the synchronous Messages API (the sync path, sync.py): the Message as the API
        wrote it, JSON text, checked by the SDK first. Not through the limiter, which paces the batch
        endpoints (the Messages API has limits of its own), and with the SDK's retries off like every call
        here: the sync sender retries through the database, with backoff. Params the installed SDK has no
        argument for (temperature in this version, a newer API field) go as they are, in extra_body."""
        known = {key: value for key, value in params.items() if key in _MESSAGE_ARGUMENTS}
        extra = {key: value for key, value in params.items() if key not in _MESSAGE_ARGUMENTS}
        started = time.monotonic()
        try:
            raw = await self.client.messages.with_raw_response.create(**known, extra_body=extra or None)
            await raw.parse()  # a response that is no Message fails here, like any other call's
            text: str = await raw.text()
        except Exception as error:
            # A 429 here does not pause the batch endpoints' limiter: the Messages API's limits are others.
            self._refused("messages", error)
            self.on_call("messages", call_status(error), time.monotonic() - started)
            raise
        self.on_call("messages", "200", time.monotonic() - started)
        return text

    async def create_batch(self, body: bytes) -> MessageBatch:
        """Create from a body already encoded (see templates.create_body)."""
        result: MessageBatch = await self._call(
            "create",
            self.client.post(
                "/v1/messages/batches",
                cast_to=MessageBatch,
                content=body,
                options={"headers": {"content-type": "application/json"}},
            ),
        )
        return result

    async def retrieve(self, provider_batch_id: str) -> MessageBatch:
        result: MessageBatch = await self._call(
            "retrieve", self.client.messages.batches.retrieve(provider_batch_id)
        )
        return result

    async def list_page(self, after_id: str | None, limit: int = 100) -> tuple[list[MessageBatch], bool]:
        """One page of the workspace's batches, newest first."""
        if after_id is None:
            page = await self._call("list", self.client.messages.batches.list(limit=limit))
        else:
            page = await self._call("list", self.client.messages.batches.list(limit=limit, after_id=after_id))
        return list(page.data), bool(page.has_more)

    async def delete(self, provider_batch_id: str) -> DeletedMessageBatch:
        result: DeletedMessageBatch = await self._call(
            "delete", self.client.messages.batches.delete(provider_batch_id)
        )
        return result

    @asynccontextmanager
    async def results(self, provider_batch_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """The results file's lines, raw, streamed; the response is closed however the reading ends.

        Two API calls (the SDK retrieves the batch for its results_url first), so two tokens, but one
        `results` call reported: its status is the response's, or what broke the body's stream (an error
        raised by the reader of the lines is the reader's, not the call's). Lines are not built into SDK
        models: the message goes to the database as JSON anyway (see results.py).
        """
        await self.limiter.acquire()
        await self.limiter.acquire()
        started = time.monotonic()
        status: str | None = None  # None until answered: a call cancelled before then is not counted
        broken: list[str] = []
        try:
            streaming = self.client.messages.batches.with_streaming_response.results(provider_batch_id)
            async with streaming as response:
                status = str(response.status_code)
                elapsed = time.monotonic() - started
                yield _lines(_noting_failure(response.iter_bytes(), broken))
        except Exception as error:
            if isinstance(error, anthropic.RateLimitError):
                self.limiter.pause(retry_after(error) or DEFAULT_RETRY_AFTER_S)
            self._refused("results", error)
            if status is None:
                status, elapsed = call_status(error), time.monotonic() - started
            raise
        finally:
            if status is not None:
                self.on_call("results", broken[0] if broken else status, elapsed)


def _not_counted(_endpoint: str, _status: str, _seconds: float) -> None:
    """A provider nobody counts the calls of (a test's, a benchmark's)."""


async def _noting_failure(chunks: AsyncIterator[bytes], failures: list[str]) -> AsyncIterator[bytes]:
    """The chunks, as they come; what broke the stream, if anything did, is noted in `failures`."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as error:
        failures.append(call_status(error))
        raise


# The SDK raises its own APIConnectionError for a call that fails to start, but a results body that breaks
# midway raises the transport's error from the iteration itself.
CONNECTION_ERRORS = (anthropic.APIConnectionError, httpx2.TransportError)


def call_status(error: BaseException) -> str:
    """An API call's failure as a metrics label: its HTTP status, or what kept one from coming back."""
    if isinstance(error, anthropic.APIStatusError):
        return str(error.status_code)
    if isinstance(error, anthropic.APITimeoutError | httpx2.TimeoutException):
        return "timeout"
    if isinstance(error, anthropic.APIConnectionError | httpx2.TransportError):
        return "connection_error"
    return "other"


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """JSON Lines from the body's bytes, split as the SDK's own JSONL decoder splits them: on \\n, \\r\\n
    or \\r; blank lines skipped; line ends removed. (httpx's iter_lines decodes to text and splits in Python
    first: at 100,000 results of about 1 KB, that took most of a second of CPU.)"""
    pending = b""
    async for chunk in chunks:
        for piece in chunk.splitlines(keepends=True):
            pending += piece
            if pending.endswith((b"\n", b"\r")):
                line = pending.strip(b"\r\n")
                if line:
                    yield line
                pending = b""
    line = pending.strip(b"\r\n")
    if line:
        yield line


def api_message(error: anthropic.APIStatusError) -> str:
    """The API's own message, from its error envelope when it sent one."""
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return str(error.message)


def retry_after(error: anthropic.APIStatusError) -> float | None:
    headers = error.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None
