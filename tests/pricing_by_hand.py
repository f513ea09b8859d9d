"""The pricing page's rates typed by hand, and a request priced with them: what the cost tests check batchd's
ledger against (never batchd's own table)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

D = Decimal
MTOK = D(1_000_000)
BATCH = D("0.5")
# USD per MTok through the synchronous API, as the pricing page lists them: input, output, 5-minute cache
# writes, 1-hour cache writes, cache reads (https://platform.claude.com/docs/en/about-claude/pricing).
RATES = {
    "claude-haiku-4-5": (D(1), D(5), D("1.25"), D(2), D("0.10")),
    "claude-sonnet-4-5": (D(3), D(15), D("3.75"), D(6), D("0.30")),
    "claude-opus-4-5": (D(5), D(25), D("6.25"), D(10), D("0.50")),
    "claude-haiku-5-5": (D("0.10"), D("0.50"), D("0.125"), D("0.20"), D("0.01")),
}
HAIKU_55_LONG = (D("0.50"), D("2.50"), D("0.625"), D(1), D("0.05"))  # prompts over 100,000 tokens


def token_counts(usage: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """input, output, 5m cache writes, 1h cache writes, cache reads."""
    creation = usage.get("cache_creation")
    if isinstance(creation, dict):
        write_5m = creation.get("ephemeral_5m_input_tokens") or 0
        write_1h = creation.get("ephemeral_1h_input_tokens") or 0
    else:
        write_5m, write_1h = usage.get("cache_creation_input_tokens") or 0, 0
    return (
        usage["input_tokens"],
        usage["output_tokens"],
        write_5m,
        write_1h,
        usage.get("cache_read_input_tokens") or 0,
    )


def sync_price(model: str, usage: dict[str, Any]) -> Decimal:
    """The same call's price through the synchronous API, worked out by hand."""
    family = model[:-9] if model[-8:].isdigit() else model  # claude-haiku-4-5-20251001 -> claude-haiku-4-5
    counts = token_counts(usage)
    rates = RATES[family]
    if family == "claude-haiku-5-5" and counts[0] + sum(counts[2:]) > 100_000:
        rates = HAIKU_55_LONG
    return sum((n * rate for n, rate in zip(counts, rates, strict=True)), D(0)) / MTOK


def cached(text: str, ttl: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral", "ttl": ttl}}]
