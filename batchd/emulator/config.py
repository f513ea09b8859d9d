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

    host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535)
    api_key: str | None = Field(
        default=None, description="the one key accepted; unset: any non-empty key is accepted"
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
    max_batch_requests: int = Field(default=MAX_BATCH_REQUESTS, ge=1)
    max_body_bytes: int = Field(default=MAX_BODY_BYTES, ge=1024)
    extra_models: frozenset[str] = Field(default=frozenset(), description="accepted besides the SDK's models")
    faults: FaultPlan = Field(default_factory=FaultPlan)
