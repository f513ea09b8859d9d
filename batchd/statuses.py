"""Every status a job or a batch can have, in one place.

The database's checks on batchd.jobs.status and batchd.batches.status allow exactly these (tests/
test_statuses.py reads the constraints of a migrated database and compares), and everything that lists
statuses iterates over these: the metrics (`batchd_jobs`, `batchd_batches`), `batchd status`, and the
dashboard, which gets them with their labels from `GET /v1/overview`. A migration that adds a status adds it
here too. The state machines themselves are told in docs/architecture.md ("State machines").
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class JobStatus(StrEnum):
    QUEUED = "queued"
    SUBMITTING = "submitting"  # claimed into a batch that the provider does not have yet
    SUBMITTED = "submitted"  # in a batch the provider has
    SENDING = "sending"  # on the sync path: its Messages API call is in flight, under a lease
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class BatchStatus(StrEnum):
    PENDING = "pending"  # recorded, not yet known to the provider
    IN_PROGRESS = "in_progress"
    ENDED = "ended"  # the provider is done (or no longer has it); its results are not all applied yet
    APPLIED = "applied"
    ABANDONED = "abandoned"  # pending with no job left to send


# In the order a job goes through them (the order `batchd status` and the metrics show them in).
JOB_STATUSES: Final = tuple(JobStatus)
BATCH_STATUSES: Final = tuple(BatchStatus)

# A job that is done for good: nothing moves it again.
FINAL_JOB_STATUSES: Final = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
# A job on its way to the provider (a batch's or the sync path's): it can no longer be canceled.
IN_FLIGHT_JOB_STATUSES: Final = frozenset({JobStatus.SUBMITTING, JobStatus.SUBMITTED, JobStatus.SENDING})
# A batch that still needs the daemon: a supervisor task drives it.
OPEN_BATCH_STATUSES: Final = frozenset({BatchStatus.PENDING, BatchStatus.IN_PROGRESS, BatchStatus.ENDED})
FINAL_BATCH_STATUSES: Final = frozenset(BATCH_STATUSES) - OPEN_BATCH_STATUSES

# What a person is shown for each status (the dashboard's badges and their tooltips).
JOB_LABELS: Final[dict[JobStatus, tuple[str, str]]] = {
    JobStatus.QUEUED: ("Queued", "Waiting to be sent"),
    JobStatus.SUBMITTING: ("Submitting", "In a batch not yet sent to the provider"),
    JobStatus.SUBMITTED: ("Submitted", "In a batch the provider is working on"),
    JobStatus.SENDING: ("Sending", "Sent alone through the Messages API, waiting for its answer"),
    JobStatus.SUCCEEDED: ("Succeeded", "Its result is here"),
    JobStatus.FAILED: ("Failed", "It will not be tried again; its error says why"),
    JobStatus.CANCELED: ("Canceled", "Canceled before it was sent"),
}
BATCH_LABELS: Final[dict[BatchStatus, tuple[str, str]]] = {
    BatchStatus.PENDING: ("Pending", "Not sent to the provider yet"),
    BatchStatus.IN_PROGRESS: ("In progress", "The provider is working on it"),
    BatchStatus.ENDED: ("Applying", "The provider finished; its results are being applied"),
    BatchStatus.APPLIED: ("Applied", "Its results are applied"),
    BatchStatus.ABANDONED: ("Abandoned", "No job was left to send in it"),
}


def described() -> dict[str, list[dict[str, str]]]:
    """Every status with its label and hint, in order: what the dashboard is given (GET /v1/overview)."""

    def rows(
        labels: dict[JobStatus, tuple[str, str]] | dict[BatchStatus, tuple[str, str]],
    ) -> list[dict[str, str]]:
        return [{"status": status, "label": label, "hint": hint} for status, (label, hint) in labels.items()]

    return {"jobs": rows(JOB_LABELS), "batches": rows(BATCH_LABELS)}
