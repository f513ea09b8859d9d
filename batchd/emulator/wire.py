"""How the emulator speaks on the wire: ids, the error envelope, JSON responses."""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

from aiohttp import web

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    """An id shaped like the API's: a prefix and 24 base62 characters."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_response(payload: Any, *, status: int = 200) -> web.Response:
    return web.Response(text=dumps(payload), status=status, content_type="application/json")


class APIError(Exception):
    """Raised by a handler to answer with the API's error envelope."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.retry_after_s = retry_after_s


def invalid_request(message: str) -> APIError:
    return APIError(400, "invalid_request_error", message)


def not_found(message: str) -> APIError:
    return APIError(404, "not_found_error", message)


def error_response(error: APIError, request_id: str) -> web.Response:
    body = {
        "type": "error",
        "error": {"type": error.error_type, "message": error.message},
        "request_id": request_id,
    }
    response = json_response(body, status=error.status)
    if error.retry_after_s is not None:
        # retry-after is whole seconds by the HTTP spec; the SDK prefers the precise -ms form when present.
        response.headers["retry-after"] = str(max(1, round(error.retry_after_s)))
        response.headers["retry-after-ms"] = str(round(error.retry_after_s * 1000))
    return response
