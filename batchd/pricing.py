"""What a request costs: `[pricing]` in batchd.toml, per model, per million tokens (MTok).

Each model has five rates: base input, output, 5-minute cache writes, 1-hour cache writes and cache reads
(the last three default to 1.25x, 2x and 0.1x the input rate, the pricing page's multipliers). A model
may have a second tier for long prompts (`long_prompt`: above `above_tokens` prompt tokens, counting cache
reads and writes, every token of the request is billed at those rates). The batch factor (0.5: the Message
Batches API's 50% discount) multiplies every rate, so inside a batch a cache read costs 0.1 x 0.5 = 0.05x
the base input price.

The cost is computed in the database, in the statement that applies results (queries.sql, apply_results),
which joins this table as the daemon published it when it started (`publish`: batchd.price_sets and
batchd.prices, migration 0010). A table is published as a *price set* named by a digest of its contents
(`PricingSettings.price_set`), and each daemon prices what it applies with its own set: daemons sharing a
database with different prices (a rolling change of batchd.toml) each bill as their own file says, and
those with the same prices share one set. A result's `model` is matched exactly, or without a date suffix
(`claude-haiku-4-5-20251001` is priced as `claude-haiku-4-5`). A model with no price here is recorded with
its tokens and a null cost, and logged once per process (`cost.unpriced_model`); a job type whose model has
no price is a configuration error at start.
"""

from __future__ import annotations

import hashlib
import json
import re
from decimal import Decimal
from functools import cached_property
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = structlog.get_logger("batchd.pricing")

# The pricing page's multipliers of the base input rate, for cache rates a table entry leaves out.
CACHE_MULTIPLIERS = {
    "cache_write_5m": Decimal("1.25"),
    "cache_write_1h": Decimal(2),
    "cache_read": Decimal("0.1"),
}
_DATED = re.compile(r"-\d{8}$")


RATE_FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")


def _rates(*values: str) -> dict[str, Any]:
    return dict(zip(RATE_FIELDS, values, strict=True))


# USD per MTok, through the synchronous API: base input, output, 5m cache writes, 1h cache writes, cache
# reads. From Anthropic's pricing page, https://platform.claude.com/docs/en/about-claude/pricing ("Model
# pricing"), and for the models released since the copy checked (2026-11-25), their model pages
# (https://platform.claude.com/docs/en/models/<model>/overview, "Pricing"). batchd.toml repeats this table;
# entries there replace these, model by model. Rows marked "not on the pricing page" were checked only
# against release notes quoting it: verify them before billing anyone with them.
_OPUS_45 = _rates("5", "25", "6.25", "10", "0.50")
_SONNET_4 = _rates("3", "15", "3.75", "6", "0.30")
_FABLE_5 = _rates("10", "50", "12.50", "20", "1")
_FABLE_51 = _rates("10", "50", "12.50", "20", "0.25")
DEFAULT_MODELS: dict[str, dict[str, Any]] = {
    "claude-fable-5-2": _rates("8", "40", "10", "16", "0.20"),  # not on the pricing page copy checked
    "claude-fable-5-1": _FABLE_51,
    "claude-mythos-5-1": _FABLE_51,
    "claude-fable-5": _FABLE_5,
    "claude-mythos-5": _FABLE_5,
    "claude-opus-5-5": _rates("4", "20", "5", "8", "0.20"),  # its model page
    "claude-opus-5": _OPUS_45,
    "claude-opus-4-8": _OPUS_45,
    "claude-opus-4-7": _OPUS_45,
    "claude-opus-4-6": _OPUS_45,
    "claude-opus-4-5": _OPUS_45,
    # Cache reads cut from $0.20 to $0.10 on 2026-10-07 (release notes; its model page gives $2 / $10).
    "claude-sonnet-5-5": _rates("2", "10", "2.50", "4", "0.10"),
    "claude-sonnet-5": _rates("2", "10", "2.50", "4", "0.20"),  # its model page
    "claude-sonnet-4-6": _SONNET_4,
    "claude-sonnet-4-5": _SONNET_4,
    # Priced by prompt length (its model page says "from $0.10 / $0.50"; the tiers per its release notes).
    "claude-haiku-5-5": {
        **_rates("0.10", "0.50", "0.125", "0.20", "0.01"),
        "long_prompt": {"above_tokens": 100_000, **_rates("0.50", "2.50", "0.625", "1", "0.05")},
    },
    "claude-haiku-4-5": _rates("1", "5", "1.25", "2", "0.10"),
}


class Rates(BaseModel):
    """USD per million tokens through the synchronous API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Decimal = Field(ge=0, description="USD per million input tokens: the base input price")
    output: Decimal = Field(ge=0, description="USD per million output tokens")
    # Left out, each cache rate is its multiple of `input` (_default_cache_rates); the configuration
    # reference shows that as the default (batchd/dev/config_reference.py).
    cache_write_5m: Decimal = Field(
        ge=0,
        description="USD per million tokens written to the prompt cache with a 5-minute TTL",
        json_schema_extra={"derived_default": f"{CACHE_MULTIPLIERS['cache_write_5m']}x input"},
    )
    cache_write_1h: Decimal = Field(
        ge=0,
        description="USD per million tokens written to the prompt cache with a 1-hour TTL",
        json_schema_extra={"derived_default": f"{CACHE_MULTIPLIERS['cache_write_1h']}x input"},
    )
    cache_read: Decimal = Field(
        ge=0,
        description="USD per million tokens read from the prompt cache (hits and refreshes)",
        json_schema_extra={"derived_default": f"{CACHE_MULTIPLIERS['cache_read']}x input"},
    )

    @model_validator(mode="before")
    @classmethod
    def _default_cache_rates(cls, data: Any) -> Any:
        if isinstance(data, dict) and "input" in data:
            try:
                base = Decimal(str(data["input"]))
            except ArithmeticError:
                return data  # the field's own validation says what is wrong
            data = {key: base * factor for key, factor in CACHE_MULTIPLIERS.items()} | data
        return data


class LongPromptRates(Rates):
    above_tokens: int = Field(
        ge=1,
        description="a request whose prompt (input, cache writes and cache reads) is longer than this many "
        "tokens is billed at these rates, every token of it",
    )


class ModelRates(Rates):
    long_prompt: LongPromptRates | None = Field(
        default=None,
        description="A second tier for long prompts, none by default: `above_tokens` and the five rates.",
    )


class PricingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_factor: Decimal = Field(
        default=Decimal("0.5"),
        gt=0,
        le=1,
        description="batch price / synchronous price, for every rate (the Message Batches API's 50% "
        "discount; it stacks with the cache rates: a cache read in a batch costs 0.05x the base input price)",
    )
    models: dict[str, ModelRates] = Field(
        default_factory=lambda: _validated(DEFAULT_MODELS),
        description="A model's prices through the synchronous API, in USD per million tokens. batchd has a "
        "table built in (batchd/pricing.py, which the shipped batchd.toml repeats): an entry here replaces "
        "that model's rates, models not listed keep the built-in ones. `MODEL-YYYYMMDD` is priced as "
        "`MODEL`.",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _over_the_defaults(cls, value: Any) -> Any:
        # The built-in table, with the file's entries replacing it model by model.
        return {**DEFAULT_MODELS, **value} if isinstance(value, dict) else value

    def rates_for(self, model: str) -> ModelRates | None:
        """The rates a model is billed at: by its name, else by its name without a date suffix."""
        return self.models.get(model) or self.models.get(_DATED.sub("", model))

    def price_rows(self) -> list[tuple[Any, ...]]:
        """The table as batchd.prices holds it, by model name: the name, its five rates, then its long-prompt
        tier's threshold and rates, or nulls."""
        rows = []
        for name, rates in sorted(self.models.items()):
            long = rates.long_prompt
            rows.append(
                (
                    name,
                    *(getattr(rates, field) for field in RATE_FIELDS),
                    None if long is None else long.above_tokens,
                    *(None if long is None else getattr(long, field) for field in RATE_FIELDS),
                )
            )
        return rows

    @cached_property
    def price_set(self) -> str:
        """This table's name in batchd.price_sets: a digest of everything it prices with, exactly as the
        database receives it (str of each Decimal, so 0.50 and 0.5 are two sets, as they are two numerics).
        Worked out once: settings do not change while a process runs."""
        rows = [[None if value is None else str(value) for value in row] for row in self.price_rows()]
        text = json.dumps([str(self.batch_factor), rows])
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def _validated(models: dict[str, dict[str, Any]]) -> dict[str, ModelRates]:
    return {name: ModelRates.model_validate(rates) for name, rates in models.items()}


_warned: set[str] = set()


def warn_unpriced(models: list[str]) -> None:
    """Logs each model that was billed without a price here, once per process."""
    for model in models:
        if model not in _warned:
            _warned.add(model)
            log.warning(
                "cost.unpriced_model",
                model=model,
                message="no price in [pricing.models]: its jobs' cost is recorded as null (tokens are kept)",
            )
