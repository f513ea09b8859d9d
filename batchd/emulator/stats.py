"""What the emulator saw: calls per endpoint and status, batches made, and every custom_id received.

The custom_id counts are how a test proves that nothing was submitted twice."""

from __future__ import annotations

from collections import Counter
from typing import Any


class Stats:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()  # "endpoint status", e.g. "create 429"
        self.batches_created = 0
        self.requests_received = 0
        self.custom_ids: Counter[str] = Counter()
        self.lost_responses = 0

    def call(self, endpoint: str) -> None:
        self.calls[endpoint] += 1

    def answered(self, endpoint: str, status: int | str) -> None:
        self.statuses[f"{endpoint} {status}"] += 1

    def batch_created(self, custom_ids: list[str]) -> None:
        self.batches_created += 1
        self.requests_received += len(custom_ids)
        self.custom_ids.update(custom_ids)

    def duplicates(self) -> dict[str, int]:
        return {cid: n for cid, n in self.custom_ids.items() if n > 1}

    def summary(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "statuses": dict(self.statuses),
            "batches_created": self.batches_created,
            "requests_received": self.requests_received,
            "distinct_custom_ids": len(self.custom_ids),
            "duplicate_custom_ids": self.duplicates(),
            "lost_responses": self.lost_responses,
        }
