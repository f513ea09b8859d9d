"""How long to wait before trying a failed step again: the one place that says so.

A step that fails (the provider answers 5xx or not at all, the database is away, a refused create) is tried
again after `low` seconds, then twice as long each time it fails again in a row, up to `high`; success
resets it. Each wait is drawn between 3/4 and all of that, so that batches failing together (an outage)
spread out instead of coming back together, and each wait is still longer than the one before it: a step
that keeps failing spends less and less of the per-minute budget every batch call shares.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

JITTER = 0.25  # a wait is drawn from [1 - JITTER, 1] times the exponential value


def backoff_s(failures: int, low: float, high: float, rng: random.Random | None = None) -> float:
    """The wait after the `failures`-th failure in a row (1 for the first): low * 2^(failures - 1), at most
    high, less up to a quarter at random."""
    exponent = min(max(failures, 1) - 1, 62)  # 2**62 seconds is past any cap; no overflow beyond it
    ceiling = min(high, low * 2.0**exponent)
    return ceiling * (1.0 - JITTER * (rng or random).random())


class Backoff(NamedTuple):
    """A failing step's waits: `low` seconds after its first failure in a row, up to `high` (backoff_s)."""

    low: float
    high: float

    def wait_s(self, failures: int, cap: float = math.inf) -> float:
        """The wait after the `failures`-th failure in a row, at most `cap` (and `high`)."""
        return backoff_s(failures, self.low, min(self.high, cap))


def jittered(seconds: float) -> float:
    """A regular interval (polls) spread by ±20%: batches submitted together are not polled together."""
    return seconds * random.uniform(0.8, 1.2)
