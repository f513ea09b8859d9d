"""The emulator's settings: how long batches take, how fast time runs, which faults are set at start."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .faults import FaultPlan

MAX_BATCH_REQUESTS = 100_000
MAX_BODY_BYTES = 256 * 1024 * 1024


def checked_processing_time(processing_time_s: tuple[float, float]) -> tuple[float, float]:
    """A batch's processing time range, as given at start (EmulatorConfig) or while the emulator runs
    (PATCH /_emulator/settings); ValueError says what is wrong with it."""
    low, high = processing_time_s
    if not 0 <= low <= high:
        raise ValueError("processing_time_s must be (low, high) with 0 <= low <= high")
    return processing_time_s


class EmulatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="the address the emulator listens on")
    port: int = Field(default=8787, ge=0, le=65535, description="...and its port (0 picks a free one)")
    api_key: str | None = Field(
        default=None,
        description="the only key accepted (`--api-key`, or `$BATCHD_EMULATOR_API_KEY`, wins over it); "
        "unset: any non-empty key",
    )
    processing_time_s: Annotated[tuple[float, float], AfterValidator(checked_processing_time)] = Field(
        default=(2.0, 6.0), description="emulated seconds a batch takes: drawn from this range"
    )
    cancel_time_s: float = Field(default=1.0, ge=0.0, description="emulated seconds from cancel to ended")
    time_scale: float = Field(default=1.0, gt=0.0, description="emulated seconds per real second")
    seed: int | None = Field(default=None, description="makes durations, outcomes and fault draws repeatable")
    rate_limit_rpm: int | None = Field(
        default=None, ge=1, description="batch endpoint calls allowed per emulated minute; unset: no limit"
    )
    max_batch_requests: int = Field(
        default=MAX_BATCH_REQUESTS, ge=1, description="requests a batch may hold (the API's 100,000)"
    )
    max_body_bytes: int = Field(
        default=MAX_BODY_BYTES, ge=1024, description="a create's body limit (the API's 256 MiB)"
    )
    extra_models: frozenset[str] = Field(
        default=frozenset(), description="models accepted besides those the installed SDK knows (`--model`)"
    )
    faults: FaultPlan = Field(
        default_factory=FaultPlan,
        description="The fault plan in force at start (docs/emulator.md, Faults); the defaults inject "
        "nothing. `--faults` replaces it.",
    )
