"""Turning a claimed job into the request that goes into a batch, or into the reason it never can.

A raw request is sent as the producer wrote it (the database already checked its shape); a job type's
input is rendered through the template in `batchd.toml`. Every refusal here saves the producer the hours
it would take the API to say the same when the whole batch ends.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, NamedTuple
from uuid import UUID

from .config import JobType
from .store import ClaimedJob

CUSTOM_ID_PREFIX = "bd"
_TAG_ALPHABET = string.ascii_lowercase + string.digits


def new_tag() -> str:
    """A batch's tag: 12 characters, part of each of its custom_ids."""
    return "".join(secrets.choice(_TAG_ALPHABET) for _ in range(12))


def custom_id(tag: str, job_id: UUID) -> str:
    """`bd-<batch tag>-<job id>`: recognisably batchd's, names its batch, and maps back to the job."""
    return _custom_id_head(tag) + job_id.hex


def _custom_id_head(tag: str) -> str:
    return f"{CUSTOM_ID_PREFIX}-{tag}-"


def job_id_from(custom: str, tag: str) -> UUID | None:
    """The job a result belongs to, or None when the custom_id is not one of this batch's."""
    prefix, _, rest = custom.partition("-")
    batch_tag, _, hex_id = rest.partition("-")
    if prefix != CUSTOM_ID_PREFIX or batch_tag != tag or len(hex_id) != 32:
        return None
    try:
        return UUID(hex=hex_id)
    except ValueError:
        return None


# The envelope each request adds around its params in the create body: {"custom_id":"bd-…","params":…},
ITEM_OVERHEAD = len('{"custom_id":"","params":},') + len(custom_id("x" * 12, UUID(int=0)))
BODY_OVERHEAD = len('{"requests":[]}')


class Prepared(NamedTuple):  # a tuple: a batch makes up to 100,000 of them
    job_id: UUID
    params: str  # JSON text of the Messages API params
    rendered: bool  # made from a template: stored with the job so a rebuilt batch sends the same
    size: int  # bytes this request adds to the create body


def prepare(job: ClaimedJob, job_types: dict[str, JobType], max_request_bytes: int) -> Prepared | str:
    """The request to send for `job`, or why it cannot be sent."""
    if job.request is not None:
        if job.problem is not None:
            return job.problem
        params, rendered = job.request, False
    else:
        outcome = render(job.job_type or "", job.input, job_types)
        if not isinstance(outcome, dict):
            return outcome
        params, rendered = json.dumps(outcome, ensure_ascii=False, separators=(",", ":")), True
    size = (len(params) if params.isascii() else len(params.encode())) + ITEM_OVERHEAD
    if size > max_request_bytes:
        return f"the request is {size} bytes, more than a batch may hold ({max_request_bytes} bytes)"
    return Prepared(job.id, params, rendered, size)


def request_problem(request: Any) -> str | None:  # noqa: C901, PLR0911 - the function's CASE, branch for branch
    """Why a raw request (parsed JSON, numbers as Decimal or int so that none is rounded) cannot be sent in a
    batch, or None: the database's batchd.request_problem(jsonb), which the daemon applies, in Python, so
    that `batchd enqueue` refuses the job before writing it. The same checks in the same order with the
    same words (tests/test_enqueue.py runs both on the same inputs)."""
    if not isinstance(request, dict):
        return "request must be a JSON object of Messages API params"
    if "model" not in request:
        return "request lacks model"
    if not isinstance(request["model"], str):
        return "request.model must be a string"
    if "max_tokens" not in request:
        return "request lacks max_tokens"
    max_tokens = request["max_tokens"]
    # A bool is an int in Python; in JSON it is no number.
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int | Decimal | float):
        return "request.max_tokens must be an integer"
    if isinstance(max_tokens, Decimal | float) and not _integral(max_tokens):
        return "request.max_tokens must be an integer"
    if max_tokens < 1:
        return "request.max_tokens must be at least 1 in a batch"
    if "messages" not in request:
        return "request lacks messages"
    if not isinstance(request["messages"], list) or not request["messages"]:
        return "request.messages must be a non-empty array"
    if "stream" in request and request["stream"] is not False:
        return "request.stream is not allowed in a batch"
    return None


def _integral(number: Decimal | float) -> bool:
    if isinstance(number, float):
        return number.is_integer()
    # to_integral_value, not int(): 1e100000 is integral, and building that int would take a while.
    return number.is_finite() and number == number.to_integral_value()


def render(name: str, input_text: str | None, job_types: dict[str, JobType]) -> dict[str, Any] | str:
    """A job type's request with the input filled in, or what is wrong with the job."""
    job_type = job_types.get(name)
    if job_type is None:
        known = ", ".join(sorted(job_types)) or "none are configured"
        return f"unknown job type {name!r} (known: {known})"
    # The database holds jsonb that Python's json cannot read back or write out: nesting past its recursion
    # limit, integers past its 4,300 digits. Such a job fails here; raised, it stopped the flusher.
    try:
        values = json.loads(input_text) if input_text is not None else {}
    except (ValueError, RecursionError) as error:
        return f"input of a {name} job cannot be read: {error}"
    if not isinstance(values, dict):
        return f"input of a {name} job must be a JSON object"
    missing = [field for field in job_type.fields if field not in values]
    if missing:
        return f"input lacks {', '.join(missing)}, required by job type {name!r}"
    try:
        text = {field: _as_text(values[field]) for field in job_type.fields}
    except (ValueError, RecursionError) as error:
        return f"input of a {name} job cannot be rendered: {error}"
    params: dict[str, Any] = {
        "model": job_type.model,
        "max_tokens": job_type.max_tokens,
        "messages": [{"role": "user", "content": job_type.prompt.format_map(text)}],
    }
    if job_type.system is not None:
        system = job_type.system.format_map(text)
        if job_type.cache is None:
            params["system"] = system
        else:
            # The system prompt is what a job type's jobs share: marked, the provider caches the prefix up to
            # it, and the batch's other requests read it at a tenth of the input price. The TTL is always
            # written out, since the API's default (5 minutes) is shorter than most batches take.
            params["system"] = [
                {
                    "type": "text",
                    "text": system,
                    "cache_control": {"type": "ephemeral", "ttl": job_type.cache},
                }
            ]
    if job_type.temperature is not None:
        params["temperature"] = job_type.temperature
    return params


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ", ".join(_as_text(item) for item in value)
    return json.dumps(value, ensure_ascii=False)


def create_body(tag: str, requests: Iterable[tuple[UUID, str]]) -> bytes:
    """The create request's JSON for a batch's (job id, params) pairs, built from params already encoded:
    100,000 requests are not parsed and re-serialized on the way out, nor copied more than twice (one join,
    one encode)."""
    head = '{"custom_id":"' + _custom_id_head(tag)
    parts = ['{"requests":[']
    for job_id, params in requests:
        parts += (head, job_id.hex, '","params":', params, "},")
    if len(parts) > 1:
        parts[-1] = "}"
    parts.append("]}")
    return "".join(parts).encode()
