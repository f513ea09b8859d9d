"""What the emulator does wrong on purpose, and the bookkeeping that decides when.

A `FaultPlan` is plain data: it arrives as JSON (the `--faults` option, or `PUT /_emulator/faults`) and is
validated here. `Faults` holds the plan that is in force and answers the questions the server asks while it
serves a call: should this call fail, should this create lose its response, how should this request end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .clock import EmulatedClock

Endpoint = Literal["create", "retrieve", "list", "cancel", "delete", "results", "messages"]
ENDPOINTS: tuple[Endpoint, ...] = ("create", "retrieve", "list", "cancel", "delete", "results", "messages")

# The error `type` the real API puts in the envelope for each status it sends.
ERROR_TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpFault(_Strict):
    """Answer calls to `endpoint` with an error status instead of serving them."""

    endpoint: Endpoint | Literal["*"] = Field(
        default="*",
        description="the calls that fail: `create`, `retrieve`, `list`, `cancel`, `delete`, `results`, "
        "`messages`, or `*` for every one",
    )
    status: int = Field(
        ge=400, le=599, description="the HTTP status they are answered with, in the API's envelope"
    )
    count: int | None = Field(default=None, ge=0, description="fail this many calls, then stop")
    rate: float = Field(default=1.0, ge=0.0, le=1.0, description="fail this fraction of the calls")
    retry_after_s: float | None = Field(
        default=None, ge=0.0, description="sent as retry-after and retry-after-ms; 429 defaults to 1 s"
    )
    for_s: float | None = Field(
        default=None,
        ge=0.0,
        description="fail calls for this many emulated seconds from when the plan is set, then stop",
    )
    message: str | None = Field(
        default=None, description="the error's message; unset: one naming the endpoint and the status"
    )

    @property
    def error_type(self) -> str:
        return ERROR_TYPE_BY_STATUS.get(self.status, "api_error")

    def effective_retry_after(self) -> float | None:
        if self.retry_after_s is None and self.status == 429:
            return 1.0
        return self.retry_after_s


class FaultPlan(_Strict):
    """Every fault the emulator can inject. The defaults inject nothing."""

    http: list[HttpFault] = Field(
        default_factory=list,
        description="Calls answered with an error status instead of being served, none by default: one table "
        "per fault.",
    )
    lose_create_responses: int = Field(
        default=0, ge=0, description="the next N creates succeed, then the connection drops unanswered"
    )
    api_error_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="requests ending errored/api_error"
    )
    overloaded_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="requests ending errored/overloaded_error"
    )
    expired_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="requests ending expired")
    stuck_batches: int = Field(default=0, ge=0, description="the next N batches never finish; they expire")
    stuck_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="a fraction of batches that never finish"
    )
    stuck_progress: float = Field(
        default=0.0, ge=0.0, le=1.0, description="the share of a stuck batch that completes before expiry"
    )
    results_chunk_delay_s: float = Field(default=0.0, ge=0.0, description="pause between results chunks")
    results_chunk_bytes: int = Field(
        default=64 * 1024, ge=1, description="a results download is written in chunks of about this size"
    )
    messages_delay_s: float = Field(
        default=0.0, ge=0.0, description="POST /v1/messages answers this many real seconds late"
    )
    results_break_after: int | None = Field(
        default=None, ge=0, description="results downloads drop the connection after this many lines"
    )
    results_break_count: int | None = Field(
        default=None, ge=0, description="how many downloads break (unset: every one while the fault is set)"
    )

    @model_validator(mode="after")
    def _outcome_rates_fit(self) -> FaultPlan:
        if self.api_error_rate + self.overloaded_rate + self.expired_rate > 1.0:
            raise ValueError("api_error_rate + overloaded_rate + expired_rate must not exceed 1")
        return self


RequestFault = Literal["api_error", "overloaded_error", "expired"]


@dataclass(frozen=True, slots=True)
class InjectedError:
    status: int
    error_type: str
    message: str
    retry_after_s: float | None


class Faults:
    """The plan in force, with the counters that say how much of it is used up."""

    def __init__(self, plan: FaultPlan, rng: random.Random, clock: EmulatedClock | None = None) -> None:
        self._rng = rng
        self._clock = clock or EmulatedClock()
        self.plan = plan

    @property
    def plan(self) -> FaultPlan:
        return self._plan

    @plan.setter
    def plan(self, plan: FaultPlan) -> None:
        # A deep copy: counts are consumed in place and the caller's object must not change under it.
        self._plan = plan.model_copy(deep=True)
        self._since = self._clock.now()  # when the plan was set: `for_s` counts from here

    def http_error_for(self, endpoint: Endpoint) -> InjectedError | None:
        for fault in self._plan.http:
            if fault.endpoint not in ("*", endpoint):
                continue
            if fault.count is not None and fault.count <= 0:
                continue
            if fault.for_s is not None and self._clock.now() - self._since >= fault.for_s:
                continue
            if fault.rate < 1.0 and self._rng.random() >= fault.rate:
                continue
            if fault.count is not None:
                fault.count -= 1
            message = fault.message or f"Injected fault: {endpoint} answered {fault.status}"
            return InjectedError(fault.status, fault.error_type, message, fault.effective_retry_after())
        return None

    def take_lost_create_response(self) -> bool:
        if self._plan.lose_create_responses > 0:
            self._plan.lose_create_responses -= 1
            return True
        return False

    def take_stuck_batch(self) -> bool:
        if self._plan.stuck_batches > 0:
            self._plan.stuck_batches -= 1
            return True
        return self._plan.stuck_rate > 0 and self._rng.random() < self._plan.stuck_rate

    def request_fault(self) -> RequestFault | None:
        plan = self._plan
        if plan.api_error_rate == plan.overloaded_rate == plan.expired_rate == 0:
            return None
        draw = self._rng.random()
        if draw < plan.api_error_rate:
            return "api_error"
        draw -= plan.api_error_rate
        if draw < plan.overloaded_rate:
            return "overloaded_error"
        draw -= plan.overloaded_rate
        if draw < plan.expired_rate:
            return "expired"
        return None

    def take_results_break(self) -> int | None:
        """How many lines this download may send before its connection drops (None: all of them)."""
        plan = self._plan
        if plan.results_break_after is None:
            return None
        if plan.results_break_count is not None:
            if plan.results_break_count <= 0:
                return None
            plan.results_break_count -= 1
        return plan.results_break_after
