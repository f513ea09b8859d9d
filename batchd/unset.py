"""`UNSET`: a setting that was not given, where None means something of its own (clear it). Shared by the
partial updates of a tenant's settings (budgets.set_budget, fairness.set_limits)."""

from __future__ import annotations

from enum import Enum
from typing import Final


class Unset(Enum):
    UNSET = "unset"


UNSET: Final = Unset.UNSET


def update_parameters(*values: object) -> list[object]:
    """A partial update's query parameters: each value (None where not given), then whether each was
    given (the query changes only those)."""
    return [None if value is UNSET else value for value in values] + [value is not UNSET for value in values]
