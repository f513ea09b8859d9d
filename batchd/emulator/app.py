"""The emulator's HTTP surface: the Message Batches API as the official SDK calls it, and `/_emulator/`.

`/v1/...` behaves like the API: an API key is required, every response carries a `request-id`, errors come
in the API's envelope, and faults from the plan in force are injected before a call is served.
`/_emulator/...` is the operator's side door (no key): statistics, faults, the clock. Bind it to loopback.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections import deque
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .batches import Batch, BatchStore
from .clock import EmulatedClock, rfc3339
from .config import EmulatorConfig, checked_processing_time
from .faults import Endpoint, FaultPlan, Faults
from .responder import Responder
from .stats import Stats
from .wire import APIError, error_response, invalid_request, json_response, new_id, not_found

CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_READ_CHUNK_BYTES = 1024 * 1024
_WINDOW_S = 60.0
_BATCH_ENDPOINTS = frozenset({"create", "retrieve", "list", "cancel", "delete", "results"})
_Model = TypeVar("_Model", bound=BaseModel)
_DEFAULT_LIST_LIMIT = 20
_MAX_LIST_LIMIT = 1000


class Emulator:
    """The state behind one emulator app."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.clock = EmulatedClock(config.time_scale)
        rng = random.Random(config.seed)
        self.responder = Responder(config.extra_models)
        self.faults = Faults(config.faults, rng, self.clock)
        self.store = BatchStore(
            self.responder, self.faults, rng, config.processing_time_s, config.cancel_time_s
        )
        self.stats = Stats()
        self.rate_limit_rpm = config.rate_limit_rpm
        self._recent_calls: deque[float] = deque()

    def check_rate_limit(self) -> None:
        """The API's per-minute limit on batch calls, counted in emulated time."""
        if self.rate_limit_rpm is None:
            return
        now = self.clock.now()
        while self._recent_calls and self._recent_calls[0] <= now - _WINDOW_S:
            self._recent_calls.popleft()
        if len(self._recent_calls) >= self.rate_limit_rpm:
            wait = self.clock.to_real_seconds(self._recent_calls[0] + _WINDOW_S - now)
            raise APIError(
                429,
                "rate_limit_error",
                f"Number of batch requests has exceeded your per-minute rate limit ({self.rate_limit_rpm}).",
                retry_after_s=max(wait, 0.001),
            )
        self._recent_calls.append(now)

    def batch_json(self, batch: Batch, request: web.Request) -> dict[str, Any]:
        ended = batch.ended_at is not None
        archived_at = batch.archived_at() if batch.is_archived(self.clock.now()) else None
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status(),
            "request_counts": batch.counts(),
            "ended_at": rfc3339(batch.ended_at) if batch.ended_at is not None else None,
            "created_at": rfc3339(batch.created_at),
            "expires_at": rfc3339(batch.expires_at),
            "archived_at": rfc3339(archived_at) if archived_at is not None else None,
            "cancel_initiated_at": (
                rfc3339(batch.cancel_initiated_at) if batch.cancel_initiated_at is not None else None
            ),
            # Absolute, from the caller's own view of this server: the SDK fetches it exactly as given.
            "results_url": (
                f"{request.scheme}://{request.host}/v1/messages/batches/{batch.id}/results" if ended else None
            ),
        }

    def batch_or_404(self, batch_id: str) -> Batch:
        batch = self.store.get(batch_id, self.clock.now())
        if batch is None:
            raise not_found(f"No message batch found with id {batch_id!r}.")
        return batch


EMULATOR = web.AppKey("emulator", Emulator)
_REQUEST_ID = web.RequestKey("request_id", str)
_DROPPED = web.RequestKey("dropped", bool)


# -- middleware: request ids, the error envelope, auth, limits and injected faults --------------------------


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    request[_REQUEST_ID] = new_id("req_")
    endpoint = request.match_info.route.name
    try:
        if request.path.startswith("/v1/"):
            _authenticate(request, emulator.config.api_key)
            if endpoint is not None:
                emulator.stats.call(endpoint)
                if endpoint in _BATCH_ENDPOINTS:
                    emulator.check_rate_limit()
                injected = emulator.faults.http_error_for(_as_endpoint(endpoint))
                if injected is not None:
                    raise APIError(
                        injected.status,
                        injected.error_type,
                        injected.message,
                        retry_after_s=injected.retry_after_s,
                    )
        response = await handler(request)
    except APIError as error:
        response = error_response(error, request[_REQUEST_ID])
    except web.HTTPRequestEntityTooLarge:
        response = error_response(_too_large(emulator.config.max_body_bytes), request[_REQUEST_ID])
    except web.HTTPException as error:
        if error.status < 400:
            raise
        error_type = "not_found_error" if error.status == 404 else "invalid_request_error"
        response = error_response(APIError(error.status, error_type, error.reason), request[_REQUEST_ID])
    if endpoint is not None and request.path.startswith("/v1/"):
        emulator.stats.answered(endpoint, "dropped" if request.get(_DROPPED) else response.status)
    return response


def _as_endpoint(name: str) -> Endpoint:
    if name not in ("create", "retrieve", "list", "cancel", "delete", "results", "messages"):
        raise AssertionError(f"unrouted endpoint {name}")
    return name  # type: ignore[return-value]


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["request-id"] = request.get(_REQUEST_ID) or new_id("req_")


def _authenticate(request: web.Request, expected: str | None) -> None:
    key = request.headers.get("x-api-key")
    if key is None:
        authorization = request.headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else None
    if not key:
        raise APIError(401, "authentication_error", "x-api-key header is required")
    if expected is not None and key != expected:
        raise APIError(401, "authentication_error", "invalid x-api-key")


def _too_large(limit: int) -> APIError:
    return APIError(
        413, "request_too_large", f"Request exceeds the maximum allowed number of bytes ({limit})."
    )


# -- the Message Batches API ---------------------------------------------------------------------------------


async def _json_body(request: web.Request) -> Any:
    length = request.content_length
    limit = request.app[EMULATOR].config.max_body_bytes
    if length is not None and length > limit:
        raise _too_large(limit)
    # Read here rather than with request.read(), which keeps the raw body on the request until it ends:
    # at 100 MB, the emulator's peak memory would hold it twice over while the batch is built.
    raw = bytearray()
    async for chunk in request.content.iter_chunked(_READ_CHUNK_BYTES):
        raw += chunk
        if len(raw) > limit:
            raise _too_large(limit)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise invalid_request(f"The request body is not valid JSON: {error}") from None


def _checked_items(body: Any, max_requests: int) -> list[dict[str, Any]]:
    """The create body's shape, refused synchronously as the API does; params are judged later."""
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    items = body.get("requests")
    if items is None:
        raise invalid_request("requests: Field required")
    if not isinstance(items, list):
        raise invalid_request("requests: Input should be a valid list")
    if not items:
        raise invalid_request("requests: List should have at least 1 item after validation, not 0")
    if len(items) > max_requests:
        raise invalid_request(
            f"requests: List should have at most {max_requests} items after validation, not {len(items)}"
        )
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise invalid_request(f"requests.{i}: Input should be a valid dictionary")
        custom_id = item.get("custom_id")
        if custom_id is None:
            raise invalid_request(f"requests.{i}.custom_id: Field required")
        if not isinstance(custom_id, str):
            raise invalid_request(f"requests.{i}.custom_id: Input should be a valid string")
        if len(custom_id) > 64:
            raise invalid_request(f"requests.{i}.custom_id: String should have at most 64 characters")
        if not CUSTOM_ID.match(custom_id):
            raise invalid_request(
                f"requests.{i}.custom_id: String should match pattern '{CUSTOM_ID.pattern}'"
            )
        if custom_id in seen:
            raise invalid_request(
                f"requests.{i}.custom_id: {custom_id!r} is used by another request; "
                "custom_id must be unique within a batch"
            )
        seen.add(custom_id)
        if "params" not in item:
            raise invalid_request(f"requests.{i}.params: Field required")
        if not isinstance(item["params"], dict):
            raise invalid_request(f"requests.{i}.params: Input should be a valid dictionary")
    return items


async def create_batch(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    # The parsed body is not kept past this line: the batch holds what it needs in a compact form.
    batch = emulator.store.create(
        _checked_items(await _json_body(request), emulator.config.max_batch_requests), emulator.clock.now()
    )
    emulator.stats.batch_created([r.custom_id for r in batch.requests])
    payload = emulator.batch_json(batch, request)
    if emulator.faults.take_lost_create_response():
        # The nastiest failure: the batch exists, but the caller never hears of it.
        emulator.stats.lost_responses += 1
        _drop_connection(request)
    return json_response(payload)


def _drop_connection(request: web.Request) -> None:
    """Abort the TCP connection; what the handler returns afterwards is never sent."""
    request[_DROPPED] = True
    transport = request.transport
    if transport is not None:
        transport.abort()


async def retrieve_batch(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    return json_response(emulator.batch_json(emulator.batch_or_404(request.match_info["batch_id"]), request))


async def list_batches(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    query = ListQuery.parse(request.query)
    for cursor in (query.before_id, query.after_id):
        if cursor is not None and not emulator.store.knows(cursor):
            raise invalid_request(f"No message batch found with id {cursor!r} to page from.")
    batches, has_more = emulator.store.page(
        limit=query.limit, before_id=query.before_id, after_id=query.after_id, now=emulator.clock.now()
    )
    data = [emulator.batch_json(batch, request) for batch in batches]
    return json_response(
        {
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    limit: int = Field(default=_DEFAULT_LIST_LIMIT, ge=1, le=_MAX_LIST_LIMIT)
    before_id: str | None = None
    after_id: str | None = None

    @classmethod
    def parse(cls, query: Any) -> ListQuery:
        try:
            parsed = cls.model_validate(dict(query))
        except ValidationError as error:
            first = error.errors()[0]
            raise invalid_request(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        if parsed.before_id is not None and parsed.after_id is not None:
            raise invalid_request("Only one of before_id and after_id may be given.")
        return parsed


async def cancel_batch(request: web.Request) -> web.StreamResponse:
    # The SDK sends a JSON content type with an empty body: the body is deliberately not read.
    emulator = request.app[EMULATOR]
    batch = emulator.batch_or_404(request.match_info["batch_id"])
    if batch.ended_at is not None:
        raise invalid_request(f"Message batch {batch.id} has already ended and cannot be canceled.")
    emulator.store.cancel(batch, emulator.clock.now())
    return json_response(emulator.batch_json(batch, request))


async def delete_batch(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    batch = emulator.batch_or_404(request.match_info["batch_id"])
    if batch.ended_at is None:
        raise invalid_request(
            f"Message batch {batch.id} is still processing; it can be deleted once it has ended "
            "(cancel it first to end it early)."
        )
    emulator.store.delete(batch)
    return json_response({"id": batch.id, "type": "message_batch_deleted"})


async def batch_results(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    batch = emulator.batch_or_404(request.match_info["batch_id"])
    if batch.ended_at is None:
        raise invalid_request(f"Message batch {batch.id} has not ended yet; its results are not available.")
    if batch.is_archived(emulator.clock.now()):
        raise not_found(f"The results of message batch {batch.id} are no longer available.")
    break_after = emulator.faults.take_results_break()
    delay = emulator.faults.plan.results_chunk_delay_s
    chunk_bytes = emulator.faults.plan.results_chunk_bytes
    response = web.StreamResponse(headers={"Content-Type": "application/x-jsonl"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    chunk: list[bytes] = []
    size = 0
    for sent, line in enumerate(batch.results()):
        if break_after is not None and sent >= break_after:
            await response.write(b"".join(chunk))
            _drop_connection(request)
            return response
        chunk.append(line)
        size += len(line)
        if size >= chunk_bytes:
            await response.write(b"".join(chunk))
            chunk, size = [], 0
            if delay:
                await asyncio.sleep(delay)
    if chunk:
        await response.write(b"".join(chunk))
    await response.write_eof()
    return response


async def create_message(request: web.Request) -> web.StreamResponse:
    """The synchronous Messages API, for requests that cannot wait for a batch."""
    emulator = request.app[EMULATOR]
    params = await _json_body(request)
    problem = emulator.responder.problem(params, in_batch=False)
    if problem is not None:
        if problem.startswith("model:") and isinstance(params, dict) and isinstance(params.get("model"), str):
            raise not_found(f"model: {params['model']}")
        raise invalid_request(problem)
    if params.get("stream"):
        raise invalid_request("stream: the emulator answers whole messages only; send stream: false")
    delay = emulator.faults.plan.messages_delay_s
    if delay:
        # A slow model: a call in flight long enough to be caught there (a stop, a kill).
        await asyncio.sleep(delay)
    completion = emulator.responder.complete(params, emulator.clock.now())
    return json_response(completion.message(new_id("msg_"), "standard"))


# -- the operator's side door: /_emulator/ -------------------------------------------------------------------


async def _parse_body(request: web.Request, model: type[_Model], what: str) -> _Model:
    try:
        return model.model_validate_json(await request.read())
    except ValidationError as error:
        raise invalid_request(f"Not {what}: {error}") from None


async def get_stats(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[EMULATOR].stats.summary())


async def get_custom_ids(request: web.Request) -> web.StreamResponse:
    return json_response({"custom_ids": dict(request.app[EMULATOR].stats.custom_ids)})


async def get_faults(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[EMULATOR].faults.plan.model_dump(mode="json"))


async def put_faults(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    emulator.faults.plan = await _parse_body(request, FaultPlan, "a fault plan")
    return json_response(emulator.faults.plan.model_dump(mode="json"))


async def delete_faults(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    emulator.faults.plan = FaultPlan()
    return json_response(emulator.faults.plan.model_dump(mode="json"))


class SettingsChange(BaseModel):
    """A PATCH of /_emulator/settings: what may change while the emulator runs."""

    model_config = ConfigDict(extra="forbid")

    processing_time_s: tuple[float, float] | None = None
    cancel_time_s: float | None = Field(default=None, ge=0)
    rate_limit_rpm: int | None = Field(default=None, ge=1)


async def patch_settings(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    settings = await _parse_body(request, SettingsChange, "emulator settings")
    if settings.processing_time_s is not None:
        try:
            emulator.store.processing_time_s = checked_processing_time(settings.processing_time_s)
        except ValueError as error:
            raise invalid_request(str(error)) from None
    if settings.cancel_time_s is not None:
        emulator.store.cancel_time_s = settings.cancel_time_s
    if "rate_limit_rpm" in settings.model_fields_set:
        emulator.rate_limit_rpm = settings.rate_limit_rpm
    return json_response(_settings(emulator))


def _settings(emulator: Emulator) -> dict[str, Any]:
    return {
        "processing_time_s": list(emulator.store.processing_time_s),
        "cancel_time_s": emulator.store.cancel_time_s,
        "rate_limit_rpm": emulator.rate_limit_rpm,
        "time_scale": emulator.clock.scale,
    }


async def get_settings(request: web.Request) -> web.StreamResponse:
    return json_response(_settings(request.app[EMULATOR]))


async def get_clock(request: web.Request) -> web.StreamResponse:
    clock = request.app[EMULATOR].clock
    return json_response({"now": rfc3339(clock.now()), "scale": clock.scale})


async def advance_clock(request: web.Request) -> web.StreamResponse:
    clock = request.app[EMULATOR].clock
    try:
        seconds = json.loads(await request.read())["seconds"]
        clock.advance(float(seconds))
    except (ValueError, KeyError, TypeError) as error:
        raise invalid_request(f'Send {{"seconds": N}} with N >= 0 ({error}).') from None
    return json_response({"now": rfc3339(clock.now()), "scale": clock.scale})


async def reset(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    emulator.store.clear()
    emulator.stats = Stats()
    emulator.faults.plan = FaultPlan()
    return json_response({"reset": True})


def create_app(config: EmulatorConfig | None = None) -> web.Application:
    """The emulator as an aiohttp application: run it with `web.run_app`, or an `AppRunner` in tests."""
    config = config or EmulatorConfig()
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[api_middleware])
    app[EMULATOR] = Emulator(config)
    app.on_response_prepare.append(_add_request_id)
    batches = "/v1/messages/batches"
    app.router.add_post(batches, create_batch, name="create")
    app.router.add_get(batches, list_batches, name="list", allow_head=False)
    app.router.add_get(batches + "/{batch_id}", retrieve_batch, name="retrieve", allow_head=False)
    app.router.add_post(batches + "/{batch_id}/cancel", cancel_batch, name="cancel")
    app.router.add_delete(batches + "/{batch_id}", delete_batch, name="delete")
    app.router.add_get(batches + "/{batch_id}/results", batch_results, name="results", allow_head=False)
    app.router.add_post("/v1/messages", create_message, name="messages")
    admin = "/_emulator"
    app.router.add_get(admin + "/stats", get_stats)
    app.router.add_get(admin + "/custom_ids", get_custom_ids)
    app.router.add_get(admin + "/faults", get_faults)
    app.router.add_put(admin + "/faults", put_faults)
    app.router.add_delete(admin + "/faults", delete_faults)
    app.router.add_get(admin + "/settings", get_settings)
    app.router.add_patch(admin + "/settings", patch_settings)
    app.router.add_get(admin + "/clock", get_clock)
    app.router.add_post(admin + "/clock/advance", advance_clock)
    app.router.add_post(admin + "/reset", reset)
    return app
