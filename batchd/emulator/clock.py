"""The emulator's clock: wall time that can run faster, and be pushed forward, so a day passes in seconds."""

from __future__ import annotations

import time
from datetime import UTC, datetime


class EmulatedClock:
    """Emulated seconds since the epoch. `scale` emulated seconds pass for each real one."""

    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError("the time scale must be positive")
        self.scale = scale
        self._wall0 = time.time()
        self._mono0 = time.monotonic()
        self._offset = 0.0

    def now(self) -> float:
        return self._wall0 + (time.monotonic() - self._mono0) * self.scale + self._offset

    def advance(self, seconds: float) -> None:
        """Jump ahead; the clock never goes back."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self._offset += seconds

    def to_real_seconds(self, emulated_seconds: float) -> float:
        return emulated_seconds / self.scale


def rfc3339(epoch_seconds: float) -> str:
    """The API's timestamp form: UTC, microseconds, a `Z`."""
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
