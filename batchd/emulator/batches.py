"""Message batches in memory: their lifecycle, their JSON, their results.

A batch's fate is drawn when it is created (how long it takes, how each request ends, whether it is stuck)
and its state is worked out from the clock whenever someone looks, so no background task is needed and a
clock pushed forward takes effect at once. A request whose processing finished before the batch was
canceled, or before it expired, keeps its result; the others end `canceled` or `expired`, as with the API.
"""

from __future__ import annotations

import hashlib
import math
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from .faults import Faults, RequestFault
from .responder import Completion, Responder
from .wire import dumps, new_id

DAY_S = 86_400.0
EXPIRES_AFTER_S = DAY_S  # a batch ends, unfinished requests expired, 24 h after it was created
RESULTS_KEPT_S = 29 * DAY_S  # then it is archived and its results are gone

ResultType = Literal["succeeded", "errored", "canceled", "expired"]
Outcome = Literal["succeeded", "invalid_request_error", "api_error", "overloaded_error", "expired"]
_ERRORED: dict[Outcome, str] = {
    "api_error": "Internal server error while processing the request (injected fault).",
    "overloaded_error": "Overloaded (injected fault).",
}


@dataclass(slots=True)
class BatchRequest:
    custom_id: str
    done_at: float  # emulated time its processing finishes; inf when it never would
    outcome: Outcome
    completion: Completion | None = None
    error: str | None = None


@dataclass
class Batch:
    id: str
    created_at: float
    planned_end: float  # when processing finishes if nobody cancels and it is not stuck
    requests: list[BatchRequest]
    cancel_initiated_at: float | None = None
    ended_at: float | None = None
    final: list[ResultType] = field(default_factory=list)
    # The results file, one JSON line each, written once when the batch ends (as the API prepares its
    # file): a download only sends it, so downloading 100,000 results costs the emulator no rendering
    # (1.1 s of CPU each time, which on one machine was taken from the client applying them).
    lines: list[bytes] = field(default_factory=list)

    @property
    def expires_at(self) -> float:
        return self.created_at + EXPIRES_AFTER_S

    def counts(self) -> dict[str, int]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if self.ended_at is None:
            # The API keeps every per-outcome count at zero until the whole batch has ended.
            counts["processing"] = len(self.requests)
            return counts
        for result in self.final:
            counts[result] += 1
        return counts

    def status(self) -> Literal["in_progress", "canceling", "ended"]:
        if self.ended_at is not None:
            return "ended"
        return "in_progress" if self.cancel_initiated_at is None else "canceling"

    def archived_at(self) -> float | None:
        return None if self.ended_at is None else self.ended_at + RESULTS_KEPT_S

    def is_archived(self, now: float) -> bool:
        archived = self.archived_at()
        return archived is not None and now >= archived

    def settle(self, now: float, cancel_time_s: float) -> None:
        """Bring the batch up to `now`: end it if its time has come."""
        if self.ended_at is not None:
            return
        end = min(self.planned_end, self.expires_at)
        if self.cancel_initiated_at is not None:
            end = min(end, self.cancel_initiated_at + cancel_time_s)
        if now >= end:
            self._end(end)

    def _end(self, at: float) -> None:
        processed_until = at if self.cancel_initiated_at is None else min(at, self.cancel_initiated_at)
        unprocessed: ResultType = "canceled" if self.cancel_initiated_at is not None else "expired"
        self.final = [
            _result_type(r.outcome) if r.done_at <= processed_until else unprocessed for r in self.requests
        ]
        self.ended_at = at
        self.lines = [(dumps(line) + "\n").encode() for line in self._results()]
        for request in self.requests:
            request.completion = None  # in the lines now; kept twice, an ended batch took twice the memory

    def results(self) -> list[bytes]:
        """The results file's lines (LF-terminated, never blank: the SDK's decoder needs both), in an order
        unrelated to the requests' (as the API warns); empty until the batch has ended."""
        return self.lines

    def _results(self) -> Iterator[dict[str, Any]]:
        order = sorted(
            range(len(self.requests)), key=lambda i: zlib.crc32(self.requests[i].custom_id.encode())
        )
        for i in order:
            request = self.requests[i]
            yield {"custom_id": request.custom_id, "result": self._result(request, self.final[i])}

    def _result(self, request: BatchRequest, result_type: ResultType) -> dict[str, Any]:
        if result_type == "succeeded" and request.completion is not None:
            digest = hashlib.blake2b(f"{self.id}/{request.custom_id}".encode(), digest_size=12).hexdigest()
            return {"type": "succeeded", "message": request.completion.message(f"msg_{digest}", "batch")}
        if result_type == "errored":
            return {
                "type": "errored",
                "error": {"type": "error", "error": {"type": request.outcome, "message": request.error}},
            }
        return {"type": result_type}


def _result_type(outcome: Outcome) -> ResultType:
    if outcome == "succeeded":
        return "succeeded"
    if outcome == "expired":
        return "expired"
    return "errored"


class BatchStore:
    """Every batch the emulator holds, oldest first, with the rules for creating and ending them."""

    def __init__(
        self,
        responder: Responder,
        faults: Faults,
        rng: random.Random,
        processing_time_s: tuple[float, float],
        cancel_time_s: float,
    ) -> None:
        self._responder = responder
        self._faults = faults
        self._rng = rng
        self.processing_time_s = processing_time_s
        self.cancel_time_s = cancel_time_s
        self._batches: dict[str, Batch] = {}
        # Creation order, deleted ids included, so a page cursor that names a deleted batch still works.
        self._order: list[str] = []
        self._position: dict[str, int] = {}

    def create(self, items: list[dict[str, Any]], now: float) -> Batch:
        """Make a batch of requests whose shape was already checked (custom ids valid and unique)."""
        low, high = self.processing_time_s
        duration = self._rng.uniform(low, high)
        stuck = self._faults.take_stuck_batch()
        progress = self._faults.plan.stuck_progress
        requests: list[BatchRequest] = []
        for item in items:
            share = self._rng.random()
            done_at = math.inf if stuck and share >= progress else now + share * duration
            requests.append(self._request(item["custom_id"], item["params"], done_at, now))
        batch = Batch(
            id=new_id("msgbatch_"),
            created_at=now,
            planned_end=math.inf if stuck else now + duration,
            requests=requests,
        )
        self._batches[batch.id] = batch
        self._position[batch.id] = len(self._order)
        self._order.append(batch.id)
        return batch

    def _request(self, custom_id: str, params: Any, done_at: float, now: float) -> BatchRequest:
        problem = self._responder.problem(params, in_batch=True)
        if problem is not None:
            return BatchRequest(custom_id, done_at, "invalid_request_error", error=problem)
        fault: RequestFault | None = self._faults.request_fault()
        if fault == "expired":
            return BatchRequest(custom_id, done_at, "expired")
        if fault is not None:
            return BatchRequest(custom_id, done_at, fault, error=_ERRORED[fault])
        return BatchRequest(custom_id, done_at, "succeeded", completion=self._responder.complete(params, now))

    def get(self, batch_id: str, now: float) -> Batch | None:
        batch = self._batches.get(batch_id)
        if batch is not None:
            batch.settle(now, self.cancel_time_s)
        return batch

    def cancel(self, batch: Batch, now: float) -> None:
        if batch.cancel_initiated_at is None and batch.ended_at is None:
            batch.cancel_initiated_at = now
            batch.settle(now, self.cancel_time_s)

    def delete(self, batch: Batch) -> None:
        del self._batches[batch.id]

    def page(
        self, *, limit: int, before_id: str | None, after_id: str | None, now: float
    ) -> tuple[list[Batch], bool]:
        """A page of the newest-first listing: the `limit` batches just after `after_id` (older ones) or
        just before `before_id` (newer ones), and whether more lie beyond the page in that direction."""
        newest_first = [bid for bid in reversed(self._order) if bid in self._batches]
        if after_id is not None:
            cursor = self._position[after_id]
            candidates = [bid for bid in newest_first if self._position[bid] < cursor]
            chosen, has_more = candidates[:limit], len(candidates) > limit
        elif before_id is not None:
            cursor = self._position[before_id]
            candidates = [bid for bid in newest_first if self._position[bid] > cursor]
            chosen, has_more = candidates[-limit:], len(candidates) > limit
        else:
            chosen, has_more = newest_first[:limit], len(newest_first) > limit
        batches = [self._batches[bid] for bid in chosen]
        for batch in batches:
            batch.settle(now, self.cancel_time_s)
        return batches, has_more

    def knows(self, batch_id: str) -> bool:
        """Whether the id was ever issued here (deleted batches included): a valid page cursor."""
        return batch_id in self._position

    def clear(self) -> None:
        self._batches.clear()
        self._order.clear()
        self._position.clear()
