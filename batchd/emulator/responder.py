"""The emulated model: checks a request's params as the API would, and answers it deterministically.

The answer echoes the start of the last user turn, so whoever receives it can tell it answers *their*
request; token counts follow the text's length (about four characters a token), and a small prompt cache
reports cache writes and reads for prefixes marked with `cache_control`, as the real API does.
"""

from __future__ import annotations

import math
import typing
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import anthropic.types

from batchd.pricing import DEFAULT_MODELS

# The API refuses a larger max_tokens for every current model; the exact cap differs per model.
MAX_OUTPUT_TOKENS = 128_000
# Below this many tokens a prefix is not cached (the API's minimum for most models), silently.
MIN_CACHEABLE_TOKENS = 1024
CACHE_TTL_S = {"5m": 300.0, "1h": 3600.0}
_EXCERPT_CHARS = 120
_CACHE_PRUNE_AT = 10_000
_ROLES = ("user", "assistant")

ServiceTier = Literal["batch", "standard"]


def sdk_models() -> frozenset[str]:
    """The model names the installed SDK knows (its `Model` type is a union of literals and `str`)."""
    names: set[str] = set()
    for arg in typing.get_args(anthropic.types.Model):
        names.update(a for a in typing.get_args(arg) if isinstance(a, str))
    return frozenset(names)


@dataclass(slots=True)
class Completion:
    """Everything needed to write one Message later, kept small: a batch may hold 100,000 of them."""

    model: str
    text: str
    stop_reason: str
    input_tokens: int
    output_tokens: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int

    def message(self, message_id: str, service_tier: ServiceTier) -> dict[str, Any]:
        return {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": self.text}],
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "cache_creation_input_tokens": self.cache_write_5m + self.cache_write_1h,
                "cache_read_input_tokens": self.cache_read,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": self.cache_write_5m,
                    "ephemeral_1h_input_tokens": self.cache_write_1h,
                },
                "service_tier": service_tier,
            },
        }


def _tokens(chars: int) -> int:
    return max(1, math.ceil(chars / 4))


def _text_length(value: Any) -> int:
    """Characters of text in a JSON value: what a tokenizer would see, near enough."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_length(v) for k, v in value.items() if k != "cache_control")
    if isinstance(value, list):
        return sum(_text_length(v) for v in value)
    return 0


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        return " ".join(
            block["text"]
            for block in content
            if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)
        )
    return ""


def reply_text(model: str, messages: list[Any]) -> str:
    """The emulated answer: the start of the last user turn, and a checksum of all of it."""
    prompt = _last_user_text(messages)
    excerpt = " ".join(prompt.split())[:_EXCERPT_CHARS]
    checksum = zlib.crc32(prompt.encode())
    return f"Emulated reply from {model} to: {excerpt} [crc32 {checksum:08x}]"


def _check_content(content: Any, where: str) -> str | None:
    if isinstance(content, str):
        return None if content else f"{where}: text content must be non-empty"
    if not isinstance(content, list) or not content:
        return f"{where}: must be a non-empty string or a non-empty list of content blocks"
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            return f"{where}.{j}: each content block must be an object with a `type`"
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            return f"{where}.{j}.text: Field required"
    return None


class Responder:
    """Validates params and produces completions; owns the emulated prompt cache."""

    def __init__(self, extra_models: frozenset[str] = frozenset()) -> None:
        # The SDK's list drops models that the API still serves (2.16 no longer names claude-sonnet-4-5):
        # every model batchd has a built-in price for is a real one too.
        self.models = sdk_models() | frozenset(DEFAULT_MODELS) | extra_models
        self._cache: dict[int, float] = {}  # prefix checksum -> emulated time it expires

    def problem(self, params: Any, *, in_batch: bool) -> str | None:
        """Why the API would refuse these params, or None. Batches report it as an `errored` result."""
        if not isinstance(params, dict):
            return "params: Input should be an object"
        model = params.get("model")
        if model is None:
            return "model: Field required"
        if not isinstance(model, str) or model not in self.models:
            return f"model: {model!r} is not a known model"
        max_tokens = params.get("max_tokens")
        if max_tokens is None:
            return "max_tokens: Field required"
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            return "max_tokens: Input should be a valid integer"
        if max_tokens < 1:
            return (
                "max_tokens: must be at least 1 (max_tokens: 0 is not supported in batches)"
                if in_batch
                else ("max_tokens: must be at least 1")
            )
        if max_tokens > MAX_OUTPUT_TOKENS:
            return f"max_tokens: {max_tokens} > {MAX_OUTPUT_TOKENS}, the maximum allowed for {model}"
        messages = params.get("messages")
        if messages is None:
            return "messages: Field required"
        if not isinstance(messages, list) or not messages:
            return "messages: must be a non-empty list"
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                return f"messages.{i}: Input should be an object"
            if message.get("role") not in _ROLES:
                return f"messages.{i}.role: Input should be 'user' or 'assistant'"
            problem = _check_content(message.get("content"), f"messages.{i}.content")
            if problem:
                return problem
        system = params.get("system")
        if system is not None and not isinstance(system, str):
            problem = _check_content(system, "system")
            if problem:
                return problem
        if in_batch and params.get("stream"):
            return "stream: streaming is not supported in batch requests"
        temperature = params.get("temperature")
        if temperature is not None and (
            not isinstance(temperature, int | float) or not 0 <= temperature <= 1
        ):
            return "temperature: Input should be a number between 0 and 1"
        return None

    def complete(self, params: dict[str, Any], now: float) -> Completion:
        """Answer params that passed `problem`."""
        model: str = params["model"]
        messages: list[Any] = params["messages"]
        text = reply_text(model, messages)
        stop_reason = "end_turn"
        output_tokens = _tokens(len(text))
        if output_tokens > params["max_tokens"]:
            output_tokens = params["max_tokens"]
            text = text[: output_tokens * 4]
            stop_reason = "max_tokens"
        prompt_tokens = _tokens(
            _text_length(messages) + _text_length(params.get("system")) + _text_length(params.get("tools"))
        )
        write_5m, write_1h, read = self._use_cache(params, now)
        return Completion(
            model=model,
            text=text,
            stop_reason=stop_reason,
            input_tokens=max(1, prompt_tokens - write_5m - write_1h - read),
            output_tokens=output_tokens,
            cache_write_5m=write_5m,
            cache_write_1h=write_1h,
            cache_read=read,
        )

    def _use_cache(self, params: dict[str, Any], now: float) -> tuple[int, int, int]:
        """(5-minute writes, 1-hour writes, reads) for the prefix up to the last `cache_control` mark."""
        blocks = _prefix_blocks(params)
        last = max(
            (i for i, b in enumerate(blocks) if isinstance(b, dict) and "cache_control" in b), default=-1
        )
        if last < 0:
            return 0, 0, 0
        prefix = blocks[: last + 1]
        tokens = _tokens(_text_length(prefix))
        if tokens < MIN_CACHEABLE_TOKENS:
            return 0, 0, 0
        control = prefix[-1]["cache_control"]
        ttl = control.get("ttl", "5m") if isinstance(control, dict) else "5m"
        ttl_s = CACHE_TTL_S.get(ttl, CACHE_TTL_S["5m"])
        key = zlib.crc32(repr((params["model"], prefix)).encode())
        hit = self._cache.get(key, 0.0) > now
        if not hit and len(self._cache) >= _CACHE_PRUNE_AT:
            self._cache = {k: until for k, until in self._cache.items() if until > now}
        self._cache[key] = max(self._cache.get(key, 0.0), now + ttl_s)
        if hit:
            return 0, 0, tokens
        return (0, tokens, 0) if ttl == "1h" else (tokens, 0, 0)


def _prefix_blocks(params: dict[str, Any]) -> list[Any]:
    """The prompt in cache order: tools, then system, then every message's content blocks."""
    blocks: list[Any] = list(params.get("tools") or [])
    system = params.get("system")
    if isinstance(system, list):
        blocks.extend(system)
    elif isinstance(system, str):
        blocks.append(system)
    for message in params["messages"]:
        content = message["content"]
        blocks.extend(content if isinstance(content, list) else [content])
    return blocks
