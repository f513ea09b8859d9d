"""The OpenAPI 3.1 description of batchd's HTTP API, served at `GET /v1/openapi.json`: every route
server.py registers but the dashboard's page and files (`/` and `/static/`, which are for a browser, not for
a client), with their parameters, request bodies, security and every status each answers with, and the
schemas of the answers (JSON Schema 2020-12) and of the events `/v1/events` streams.

This module is the one source of the description: tests/test_openapi.py checks it against the
specification, checks that it names exactly the routes the server has, and validates the server's real
answers, success and errors, against these schemas. Statuses, event types and windows come from the modules
that define them, so the description cannot list one the code does not have.

The document needs no token: it describes the API and holds no data (no tenant, job or setting of the
daemon it is asked of), as the code it describes is public.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from . import __version__
from .enqueue import ROUTES
from .readings import SYNC_REASONS, WINDOWS
from .sse import EVENT_TYPES
from .statuses import BATCH_STATUSES, JOB_STATUSES

Schema = dict[str, Any]

# The server's list limits (server.py's LIST_LIMIT_DEFAULT and LIST_LIMIT_MAX: the test compares; server.py
# imports this module, so it cannot import them from there).
LIST_LIMIT_DEFAULT = 100
LIST_LIMIT_MAX = 1_000
JSON = "application/json"
EVENT_STREAM = "text/event-stream"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Schema], *, optional: tuple[str, ...] = (), **extra: Any) -> Schema:
    """An object with exactly these members (those in `optional` may be absent)."""
    required = [name for name in properties if name not in optional]
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
        **extra,
    }


STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
COUNT: Schema = {"type": "integer", "minimum": 0}
NUMBER: Schema = {"type": "number"}
BOOLEAN: Schema = {"type": "boolean"}
UUID: Schema = {"type": "string", "format": "uuid"}
TIME: Schema = {"type": "string", "format": "date-time", "description": "ISO 8601 with `T` and an offset."}
ANY_JSON: Schema = {"description": "Any JSON value, as it was written (null when absent)."}
DECIMAL: Schema = {
    "type": ["string", "null"],
    "pattern": r"^-?[0-9]+(\.[0-9]+)?(E[-+]?[0-9]+)?$",
    "description": "USD as an exact decimal string; null when nothing was billed or the model had no price.",
}
SPEND_INTERVALS: Schema = {
    "type": "array",
    "items": _object({"cost_usd": NUMBER, "saved_usd": NUMBER}),
}
TENANT: Schema = {
    "type": ["string", "null"],
    "description": "The token's tenant; null for the admin token (every tenant's).",
}
JOB_STATUS: Schema = {"type": "string", "enum": list(JOB_STATUSES)}
BATCH_STATUS: Schema = {"type": "string", "enum": list(BATCH_STATUSES)}


def _error_schema() -> Schema:
    return _object(
        {
            "error": _object(
                {
                    "status": {"type": "integer", "description": "The HTTP status, again."},
                    "message": STRING,
                    "field": {
                        "type": ["string", "null"],
                        "description": "The member or query parameter at fault, when one is.",
                    },
                    "problems": {
                        "type": "array",
                        "description": "POST /v1/jobs: every bad job (none was written).",
                        "items": _object(
                            {
                                "index": {
                                    **COUNT,
                                    "description": "The job's place in the body (0 for one job).",
                                },
                                "field": {"type": ["string", "null"]},
                                "message": STRING,
                            }
                        ),
                    },
                    "job_status": {
                        **JOB_STATUS,
                        "description": "DELETE /v1/jobs/{job_id}: the job's status.",
                    },
                    "detail": {"type": ["string", "null"], "description": "The database's detail, if any."},
                    "hint": {"type": ["string", "null"], "description": "The database's hint, if any."},
                },
                optional=("field", "problems", "job_status", "detail", "hint"),
            )
        },
        description="Every error the API answers in JSON.",
    )


def _job_schema(*, with_result: bool) -> Schema:
    properties: dict[str, Schema] = {
        "id": {**UUID, "description": "A UUID version 7: ids sort by creation time."},
        "tenant_id": STRING,
        "status": JOB_STATUS,
        "attempts": COUNT,
        "batch_id": _nullable(UUID),
        "job_type": {"type": ["string", "null"]},
        "route": {"type": "string", "enum": list(ROUTES)},
        "path": {
            "type": ["string", "null"],
            "enum": ["batch", "sync", None],
            "description": "Null: undecided.",
        },
        "path_reason": {"type": ["string", "null"]},
        "metadata": {**ANY_JSON, "description": "The producer's metadata, sent back untouched."},
        "error": {**ANY_JSON, "description": "Why the job failed (or its last attempt did); null otherwise."},
        "usage": {"type": ["object", "null"], "description": "The tokens the API counted for the result."},
        "result": {**ANY_JSON, "description": "The Messages API's answer; null until the job succeeded."},
        "created_at": TIME,
        "submitted_at": _nullable(TIME),
        "completed_at": _nullable(TIME),
        "cost_usd": DECIMAL,
        "sync_cost_usd": {**DECIMAL, "description": "What the Messages API would have charged, USD, exact."},
    }
    if not with_result:
        del properties["result"]
    return _object(properties)


def _new_job_schema() -> Schema:
    properties: dict[str, Schema] = {
        "tenant_id": {
            **STRING,
            "minLength": 1,
            "description": "The job's tenant: a tenant's token may name its own only (or leave it out); "
            "the admin token must name one.",
        },
        "request": {
            "type": "object",
            "description": "Messages API parameters (model, max_tokens, messages, ...); or job_type.",
        },
        "job_type": {
            **STRING,
            "description": "A job type of the daemon's batchd.toml. Either this or request.",
        },
        "input": {"type": "object", "description": "The job type's template's fields."},
        "metadata": {"type": "object", "description": "Anything; sent back with the job and its events."},
        "idempotency_key": {
            **STRING,
            "description": "A job whose key its tenant already holds is not added again.",
        },
        "deadline": {**STRING, "description": "ISO 8601 with a zone, or a duration from now (30m, 2h)."},
        "route": {"type": "string", "enum": list(ROUTES), "default": "batch"},
    }
    return {
        "type": "object",
        "description": "A job of the producer contract (docs/producers.md); any other member is a 400.",
        "properties": properties,
        "additionalProperties": False,
    }


def _event_schemas() -> dict[str, Schema]:
    """The `data` of each event /v1/events sends: one line of JSON."""
    envelope: dict[str, Schema] = {
        "tenant": {**STRING, "description": "Absent on an event of no tenant (the admin's stream only)."},
        "at": TIME,
    }
    job_types = sorted(t for t in EVENT_TYPES if t.startswith("job."))
    batch_types = sorted(t for t in EVENT_TYPES if t.startswith("batch."))
    tenant_types = sorted(t for t in EVENT_TYPES if t.startswith("tenant."))
    return {
        "JobEvent": _object(
            {
                "type": {"type": "string", "enum": job_types},
                "job_id": UUID,
                "batch_id": {**UUID, "description": "Absent for a job on the sync path or not in a batch."},
                **envelope,
                "status": {"type": "string", "enum": [*JOB_STATUSES]},
                "path": {"type": "string", "enum": ["sync"]},
                "metadata": ANY_JSON,
                "usage": {"type": "object"},
                "error": ANY_JSON,
                "attempts": COUNT,
            },
            optional=("batch_id", "tenant", "path", "metadata", "usage", "error", "attempts"),
            description="job.submitted, job.succeeded, job.failed (with error), job.retrying (queued again "
            "after a transient failure), job.canceled. The full result is GET /v1/jobs/{job_id}.",
        ),
        "BatchEvent": _object(
            {
                "type": {"type": "string", "enum": batch_types},
                "batch_id": UUID,
                **envelope,
                "status": {"type": "string", "enum": ["in_progress", "ended"]},
                "provider_batch_id": {"type": ["string", "null"]},
                "requests": {**COUNT, "description": "The tenant's own requests in the batch."},
                "adopted": {
                    **BOOLEAN,
                    "description": "batch.submitted: found at the provider after a restart.",
                },
                "vanished": {**BOOLEAN, "description": "batch.ended: the provider no longer had it."},
            },
            optional=("tenant", "adopted", "vanished"),
            description="One per tenant in the batch: a tenant never learns what the others sent.",
        ),
        "TenantEvent": _object(
            {
                "type": {"type": "string", "enum": tenant_types},
                **envelope,
                "status": {"type": "string", "enum": ["held", "released"]},
                "reason": STRING,
                "over_budget": {"type": "string", "enum": ["hold", "fail"]},
                "spent_day_usd": NUMBER,
                "spent_month_usd": NUMBER,
                "budget_day_usd": NUMBER,
                "budget_month_usd": NUMBER,
            },
            optional=(
                "tenant",
                "reason",
                "spent_day_usd",
                "spent_month_usd",
                "budget_day_usd",
                "budget_month_usd",
            ),
            description="The tenant reached its budget (its queued jobs wait, or fail), or may spend again.",
        ),
        "Event": {
            "description": "The data of an event of the types in EventType (the frame's `event:`).",
            "oneOf": [_ref("JobEvent"), _ref("BatchEvent"), _ref("TenantEvent")],
        },
        "EventType": {"type": "string", "enum": sorted(EVENT_TYPES)},
        "ResetEvent": _object(
            {
                "reason": STRING,
                "last_event_id": {**COUNT, "description": "The id the client asked to resume after."},
                "resume_from": {**COUNT, "description": "The stream's position now (also the frame's id)."},
            },
            description="`event: reset`: the id cannot be resumed from (past the retention, or never sent to "
            "this client); live events follow. Reload your state.",
        ),
        "DisconnectEvent": _object(
            {
                "reason": {"type": "string", "enum": ["shutdown", "slow_consumer", "revoked"]},
                "detail": STRING,
            },
            description="`event: disconnect` (no id): the stream's last frame. Reconnect with Last-Event-ID "
            "(a revoked token is refused).",
        ),
    }


def _schemas() -> dict[str, Schema]:
    status_rows = {
        "type": "array",
        "items": _object({"status": STRING, "label": STRING, "hint": STRING}),
    }
    return {
        "Error": _error_schema(),
        "Health": _object({"status": {"const": "ok"}}),
        "Ready": _object({"status": {"const": "ready"}}),
        "Unready": _object(
            {
                "status": {"const": "unavailable"},
                "problems": {
                    "type": "array",
                    "minItems": 1,
                    "items": STRING,
                    "description": "database: unavailable; listener: not connected; api <url>: <why>.",
                },
            }
        ),
        "Job": _job_schema(with_result=True),
        "JobSummary": _job_schema(with_result=False),
        "JobPage": _object(
            {
                "next_cursor": {
                    **_nullable(UUID),
                    "description": "Pass as `cursor` for the next page (null: no job was read yet).",
                },
                "more": {**BOOLEAN, "description": "Jobs follow: ask again with next_cursor now."},
                "jobs": {"type": "array", "items": _ref("JobSummary")},
            },
            description="Jobs oldest first. A page filtered by status may hold fewer than `limit` jobs, even "
            "none, with `more` true.",
        ),
        "NewJob": _new_job_schema(),
        "Enqueued": _object(
            {
                "id": UUID,
                "enqueued": {**BOOLEAN, "description": "False: the key's holder, added before, is this id."},
            }
        ),
        "EnqueuedJobs": _object({"jobs": {"type": "array", "items": _ref("Enqueued"), "minItems": 1}}),
        "Canceled": _object({"id": UUID, "status": {"const": "canceled"}}),
        "Overview": _object(
            {
                "tenant": TENANT,
                "admin": BOOLEAN,
                "last_event_id": {
                    **COUNT,
                    "description": "Follow /v1/events from it (in the asker's count).",
                },
                "queued": {
                    "type": "array",
                    "items": _object({"tenant_id": STRING, "jobs": COUNT, "oldest_s": NUMBER}),
                },
                "open_batches": {
                    "type": "array",
                    "items": _object(
                        {
                            "id": UUID,
                            "provider_batch_id": {"type": ["string", "null"]},
                            "status": BATCH_STATUS,
                            "in_flight": COUNT,
                            "request_count": {**COUNT, "description": "The admin's view only."},
                            "age_s": NUMBER,
                        },
                        optional=("request_count",),
                    ),
                },
                "totals": {
                    "type": "array",
                    "items": _object(
                        {
                            "tenant_id": STRING,
                            **dict.fromkeys(("succeeded", "failed", "canceled"), INTEGER),
                            **{
                                name: _nullable(INTEGER)
                                for name in (
                                    "input_tokens",
                                    "output_tokens",
                                    "cache_read_input_tokens",
                                    "cache_creation_input_tokens",
                                )
                            },
                            **{
                                name: _nullable(NUMBER) for name in ("cost_usd", "sync_cost_usd", "saved_usd")
                            },
                        }
                    ),
                },
                "budgets": {
                    "type": "array",
                    "items": _object(
                        {
                            "tenant_id": STRING,
                            "day_usd": _nullable(NUMBER),
                            "month_usd": _nullable(NUMBER),
                            "spent_day_usd": NUMBER,
                            "spent_month_usd": NUMBER,
                            "over_budget": {"type": "string", "enum": ["hold", "fail"]},
                            "held": BOOLEAN,
                            "hold_reason": {"type": ["string", "null"]},
                            "held_since": _nullable(TIME),
                        }
                    ),
                },
                "turnaround": _object(
                    {
                        "routing_p90_s": {
                            **NUMBER,
                            "description": "The p90 the router uses (the prior till measured).",
                        },
                        "samples": COUNT,
                        "measured": BOOLEAN,
                        "p50_s": {
                            **_nullable(NUMBER),
                            "description": "Measured; null: no batch applied yet.",
                        },
                        "p90_s": _nullable(NUMBER),
                        "margin_s": NUMBER,
                        "window": COUNT,
                        "min_samples": COUNT,
                    },
                    description="The batch turnaround of every tenant's batches, as the router uses it.",
                ),
                "sync_last_hour": {
                    "type": "array",
                    "description": "The principal's jobs finished in the last hour through the Messages API.",
                    "items": _object(
                        {"reason": {"type": "string", "enum": list(SYNC_REASONS)}, "jobs": COUNT}
                    ),
                },
                "statuses": _object({"jobs": status_rows, "batches": status_rows}),
            }
        ),
        "Series": _object(
            {
                "tenant": TENANT,
                "admin": BOOLEAN,
                "window": {"type": "string", "enum": list(WINDOWS)},
                "interval": {"type": "string", "enum": ["hour", "day"]},
                "intervals": {
                    "type": "array",
                    "items": _object(
                        {
                            "start": TIME,
                            **dict.fromkeys(
                                ("succeeded", "failed", "canceled", "batch_jobs", "sync_jobs"), COUNT
                            ),
                            "cost_usd": NUMBER,
                            "sync_cost_usd": NUMBER,
                            "saved_usd": NUMBER,
                            "batch_share": {**_nullable(NUMBER), "description": "Null: nothing was sent."},
                            "cache_hit_ratio": {
                                **_nullable(NUMBER),
                                "description": "Null: no prompt tokens.",
                            },
                        }
                    ),
                },
                "spend_by_tenant": {
                    "type": "array",
                    "description": "The admin's only: the tenants that spent the most in the window (the "
                    "top five, most first), each with its cost and saving per interval, aligned with "
                    "`intervals`.",
                    "items": _object(
                        {
                            "tenant": STRING,
                            "cost_usd": NUMBER,
                            "saved_usd": NUMBER,
                            "intervals": SPEND_INTERVALS,
                        }
                    ),
                },
                "spend_others": {
                    **_nullable(
                        _object(
                            {
                                "tenants": COUNT,
                                "cost_usd": NUMBER,
                                "saved_usd": NUMBER,
                                "intervals": SPEND_INTERVALS,
                            }
                        )
                    ),
                    "description": "The admin's only: the other tenants' spend summed; null when there are "
                    "none.",
                },
                "flow": _object(
                    {
                        "interval": {
                            "type": "string",
                            "enum": ["minute", "hour", "day"],
                            "description": "The flow's own intervals: minutes for the last hour, hours for "
                            "the day, UTC days for 30 days.",
                        },
                        "routing_margin_s": {
                            **NUMBER,
                            "description": "The margin the router adds to its p90 (`routing.margin_s`).",
                        },
                        "intervals": {
                            "type": "array",
                            "description": "Oldest first, every interval of the window present. The "
                            "queue's numbers are the principal's own (every tenant's for the admin), null "
                            "for an interval no daemon sampled; the routing p90 is the database's.",
                            "items": _object(
                                {
                                    "start": TIME,
                                    "samples": {**COUNT, "description": "Samples of the queue taken in it."},
                                    "queued": {
                                        **_nullable(NUMBER),
                                        "description": "Queued jobs, on average over the samples.",
                                    },
                                    "queued_max": {**_nullable(COUNT), "description": "The most queued."},
                                    "oldest_wait_s": {
                                        **_nullable(NUMBER),
                                        "description": "The longest a queued job had waited at a sample.",
                                    },
                                    "routing_p90_s": {
                                        **_nullable(NUMBER),
                                        "description": "The batch turnaround p90 the router used, on "
                                        "average over the samples (the prior while too few batches are "
                                        "measured).",
                                    },
                                    "turnaround_jobs": {
                                        **COUNT,
                                        "description": "Jobs batches finished in it (created to finished).",
                                    },
                                    "turnaround_p50_s": {
                                        **_nullable(NUMBER),
                                        "description": "Their turnaround's median, from a log-scale "
                                        "histogram (within 9%); null: none.",
                                    },
                                    "turnaround_p90_s": {**_nullable(NUMBER), "description": "Its p90."},
                                }
                            ),
                        },
                    },
                    description="The queue and batch turnaround over the window (flow.py).",
                ),
            },
            optional=("spend_by_tenant", "spend_others"),
            description="Oldest interval first, every interval of the window present.",
        ),
        "Session": _object({"tenant": TENANT, "admin": BOOLEAN}),
        **_webhook_schemas(),
        "SignedOut": _object({"signed_out": {"const": True}}),
        **_event_schemas(),
    }


WEBHOOK_EVENTS: Schema = {
    "anyOf": [
        {"type": "array", "items": {"type": "string", "enum": sorted(EVENT_TYPES)}, "minItems": 1},
        {"type": "null"},
    ],
    "description": "The event types it gets; null: every type.",
}
# webhooks.STATUSES (the test compares; webhooks.py imports the SSE module, which this one does too).
DELIVERY_STATUSES = ("pending", "delivered", "dead")


def _webhook_schemas() -> dict[str, Schema]:
    endpoint = {
        "id": {**INTEGER, "minimum": 1},
        "tenant_id": STRING,
        "url": STRING,
        "events": WEBHOOK_EVENTS,
    }
    return {
        "NewWebhookEndpoint": _object(
            {
                "url": {**STRING, "description": "http:// or https://, resolving to public addresses only."},
                "events": WEBHOOK_EVENTS,
                "tenant_id": {**STRING, "description": "The admin token only (and then required)."},
            },
            optional=("events", "tenant_id"),
        ),
        "CreatedWebhookEndpoint": _object(
            {
                **endpoint,
                "secret": {
                    **STRING,
                    "pattern": "^whsec_[A-Za-z0-9+/]+=*$",
                    "description": "Verifies the signatures (Standard Webhooks); shown this once.",
                },
            }
        ),
        "WebhookEndpoint": _object(
            {
                **endpoint,
                "created_at": TIME,
                "disabled_at": {
                    **_nullable(TIME),
                    "description": "Since when nothing is sent (a run of failures); null: enabled.",
                },
                "disabled_reason": {"type": ["string", "null"]},
                "failures": {**COUNT, "description": "Failed attempts since the last success."},
                "last_success_at": _nullable(TIME),
                "pending": {**COUNT, "description": "Deliveries waiting or in flight."},
            }
        ),
        "WebhookEndpoints": _object({"endpoints": {"type": "array", "items": _ref("WebhookEndpoint")}}),
        "WebhookDelivery": _object(
            {
                "id": {**INTEGER, "minimum": 1},
                "webhook_id": {**STRING, "description": "The `webhook-id` header, the same every attempt."},
                "event_type": STRING,
                "status": {"type": "string", "enum": list(DELIVERY_STATUSES)},
                "attempts": COUNT,
                "created_at": TIME,
                "last_attempt_at": _nullable(TIME),
                "next_attempt_at": {**TIME, "description": "When a pending one is tried (again)."},
                "last_status": {"type": ["integer", "null"], "description": "The last answer's HTTP status."},
                "last_error": {"type": ["string", "null"], "description": "Why the last attempt failed."},
                "finished_at": _nullable(TIME),
            }
        ),
        "WebhookDeliveries": _object({"deliveries": {"type": "array", "items": _ref("WebhookDelivery")}}),
        "WebhookRemoved": _object({"id": {**INTEGER, "minimum": 1}, "removed": {"const": True}}),
        "WebhookRetried": _object(
            {
                "id": {**INTEGER, "minimum": 1},
                "enabled": {"const": True},
                "retried": {**COUNT, "description": "Dead deliveries sent again."},
            }
        ),
    }


def _json(schema: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": _ref(schema)}}}
    if headers:
        response["headers"] = headers
    return response


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _json("Error", description, headers)


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}}
UNAUTHORIZED = {
    "401": _error(
        "No token, or not a valid one (unknown or revoked).",
        {"WWW-Authenticate": {"schema": {"const": 'Bearer realm="batchd"'}}},
    )
}
TOKEN: list[dict[str, list[str]]] = [{"bearer": []}, {"access_token": []}, {"cookie": []}]
JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "description": "The job's id (any spelling of a UUID; anything else is a 404).",
    "schema": STRING,
}


def _operation(summary: str, responses: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"summary": summary, "security": TOKEN, **more, "responses": {**responses, **UNAUTHORIZED}}


def _public(summary: str, responses: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"summary": summary, "security": [], **more, "responses": responses}


def _query(name: str, description: str, schema: Schema) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema}


ENDPOINT_ID = {
    "name": "endpoint_id",
    "in": "path",
    "required": True,
    "description": "The endpoint's id (anything else is a 404).",
    "schema": STRING,
}
NO_ENDPOINT = {"404": _error("No such endpoint, or another tenant's.")}


def _webhook_paths() -> dict[str, Any]:
    return {
        "/v1/webhooks": {
            "get": _operation(
                "The principal's webhook endpoints (docs/webhooks.md), without their secrets",
                {
                    "200": _json("WebhookEndpoints", "Its endpoints, by tenant and id."),
                    "403": _error("A tenant's token asking for another tenant's endpoints."),
                },
                parameters=[_query("tenant", "Whose (the admin token; a tenant's token: its own).", STRING)],
            ),
            "post": _operation(
                "Add a webhook endpoint; the answer holds its secret, the only time it is shown",
                {
                    "201": {
                        **_json("CreatedWebhookEndpoint", "Added."),
                        "headers": {"Location": {"description": "The endpoint's URL.", "schema": STRING}},
                    },
                    "400": _error("Bad JSON, an unknown member or event type, or a URL refused (`field`)."),
                    "403": _error("A tenant's token adding another tenant's endpoint."),
                    "409": _error("The tenant has [webhooks] max_endpoints_per_tenant endpoints already."),
                    "413": _error("A body over 16 KiB."),
                },
                requestBody={"required": True, "content": {JSON: {"schema": _ref("NewWebhookEndpoint")}}},
            ),
        },
        "/v1/webhooks/{endpoint_id}": {
            "parameters": [ENDPOINT_ID],
            "get": _operation("A webhook endpoint", {"200": _json("WebhookEndpoint", "It."), **NO_ENDPOINT}),
            "delete": _operation(
                "Remove a webhook endpoint and its delivery log",
                {"200": _json("WebhookRemoved", "Removed."), **NO_ENDPOINT},
            ),
        },
        "/v1/webhooks/{endpoint_id}/deliveries": {
            "parameters": [ENDPOINT_ID],
            "get": _operation(
                "An endpoint's delivery log, newest event first",
                {
                    "200": _json("WebhookDeliveries", "Its deliveries."),
                    "400": _error("A bad status or limit (`field` names it)."),
                    **NO_ENDPOINT,
                },
                parameters=[
                    _query("status", "Only deliveries of this status.", {"enum": list(DELIVERY_STATUSES)}),
                    _query("limit", "At most this many.", {"type": "integer", "minimum": 1, "maximum": 1000}),
                ],
            ),
        },
        "/v1/webhooks/{endpoint_id}/retry": {
            "parameters": [ENDPOINT_ID],
            "post": _operation(
                "Enable the endpoint again and send its dead deliveries again",
                {"200": _json("WebhookRetried", "Enabled."), **NO_ENDPOINT},
            ),
        },
    }


def _paths() -> dict[str, Any]:
    return {
        "/healthz": {"get": _public("The process answers", {"200": _json("Health", "Alive.")})},
        "/readyz": {
            "get": _public(
                "The database and listener are up and the API takes the key",
                {"200": _json("Ready", "Ready."), "503": _json("Unready", "Not ready: what is not.")},
                description="Without a token: the answer names the dependency, nothing of it.",
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus' scrape (the admin token only: the metrics name every tenant)",
                {
                    "200": {
                        "description": "The text format, or OpenMetrics when the Accept header asks for it.",
                        "content": {
                            "text/plain": {"schema": STRING},
                            "application/openmetrics-text": {"schema": STRING},
                        },
                    },
                    "403": _error("A tenant's token."),
                },
            )
        },
        "/v1/jobs": {
            "get": _operation(
                "A page of jobs, oldest first, keyset by id",
                {
                    "200": _json("JobPage", "The page."),
                    "400": _error("A bad status, limit, cursor or since (`field` names it)."),
                    "403": _error("A tenant's token asking for another tenant's jobs."),
                },
                parameters=[
                    _query("tenant", "Whose jobs (the admin token; a tenant's token: its own).", STRING),
                    _query("status", "Only jobs of this status.", JOB_STATUS),
                    _query(
                        "limit",
                        "At most this many jobs.",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": LIST_LIMIT_MAX,
                            "default": LIST_LIMIT_DEFAULT,
                        },
                    ),
                    _query("cursor", "A next_cursor a page gave: the jobs after it.", UUID),
                    _query(
                        "since",
                        "Jobs made at or after: ISO 8601 with a zone, or a duration before now (30m, 2h).",
                        STRING,
                    ),
                ],
            ),
            "post": _operation(
                "Enqueue one job or several, all or none",
                {
                    "202": {
                        "description": "Enqueued: one job's answer, or the array's (in order).",
                        "headers": {"Location": {"description": "One job: its URL.", "schema": STRING}},
                        "content": {JSON: {"schema": {"oneOf": [_ref("Enqueued"), _ref("EnqueuedJobs")]}}},
                    },
                    "400": _error("A bad job (`problems` lists each), bad JSON, or refused by the database."),
                    "403": _error("A tenant's token writing another tenant's job."),
                    "413": _error("Larger than [http] max_post_bytes, or more jobs than max_post_jobs."),
                    "429": _error("The tenant's max_queued is reached.", RETRY_AFTER),
                    "503": _error("The database could not be written; try again."),
                },
                parameters=[
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "description": "One job only: its idempotency_key.",
                        "schema": {**STRING, "minLength": 1},
                    }
                ],
                requestBody={
                    "required": True,
                    "content": {
                        JSON: {
                            "schema": {
                                "oneOf": [
                                    _ref("NewJob"),
                                    {"type": "array", "items": _ref("NewJob"), "minItems": 1},
                                ]
                            }
                        }
                    },
                },
            ),
        },
        "/v1/jobs/{job_id}": {
            "parameters": [JOB_ID],
            "get": _operation(
                "A job, with its result",
                {"200": _json("Job", "The job."), "404": _error("No such job, or another tenant's.")},
            ),
            "delete": _operation(
                "Cancel a queued job",
                {
                    "200": _json("Canceled", "Canceled."),
                    "404": _error("No such job, or another tenant's."),
                    "409": _error("The job is no longer queued (`job_status` says what it is)."),
                },
            ),
        },
        **_webhook_paths(),
        "/v1/events": {
            "get": _operation(
                "The principal's events as Server-Sent Events, resumable (docs/sse.md)",
                {
                    "200": {
                        "description": "`retry:`, then frames `id: N`, `event: <type>`, `data: <JSON>`: each "
                        "data is an Event of its type, a ResetEvent (`event: reset`) or a DisconnectEvent "
                        "(`event: disconnect`, the last); `: heartbeat` comments while idle.",
                        "content": {
                            EVENT_STREAM: {
                                "schema": STRING,
                                # OpenAPI 3.1 has no schema for a stream's items (3.2's itemSchema).
                                "x-data-schema": {
                                    "oneOf": [_ref("Event"), _ref("ResetEvent"), _ref("DisconnectEvent")]
                                },
                            }
                        },
                    },
                    "400": _error("An unknown event type, a malformed id or Last-Event-ID."),
                    "404": _error("job_id names no job of the tenant's."),
                    "429": _error("The tenant holds [events] max_streams_per_tenant streams.", RETRY_AFTER),
                },
                parameters=[
                    _query("job_id", "Only this job's events.", UUID),
                    _query("batch_id", "Only this batch's events.", UUID),
                    _query("types", "Only these types, comma-separated.", STRING),
                    _query("last_event_id", "Resume after this id (the header wins).", {"type": "string"}),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "description": "Resume after this id: a non-negative integer up to 2^63-1.",
                        "schema": STRING,
                    },
                ],
            )
        },
        "/v1/overview": {
            "get": _operation(
                "The dashboard's snapshot: queued jobs, open batches, totals, budgets, statuses",
                {
                    "200": _json("Overview", "The principal's share of the snapshot."),
                    "503": _error("The database could not be read.", RETRY_AFTER),
                },
            )
        },
        "/v1/series": {
            "get": _operation(
                "Per interval of a window: jobs finished, spend, savings, batch share, cache hit ratio; "
                "the queue's depth and oldest wait, batch turnaround p50/p90 and the routing p90",
                {
                    "200": _json("Series", "The principal's series."),
                    "400": _error("An unknown window."),
                    "503": _error("The database could not be read.", RETRY_AFTER),
                },
                parameters=[
                    _query(
                        "window", "How far back.", {"type": "string", "enum": list(WINDOWS), "default": "1d"}
                    )
                ],
            )
        },
        "/v1/session": {
            "get": _operation("Who the token is", {"200": _json("Session", "The token's principal.")}),
            "post": _operation(
                "Sign in: the token becomes the batchd_token cookie (HttpOnly, SameSite=Strict)",
                {
                    "200": _json(
                        "Session",
                        "Signed in.",
                        {"Set-Cookie": {"description": "batchd_token=<the token>; …", "schema": STRING}},
                    )
                },
            ),
            "delete": _public(
                "Sign out: the cookie is deleted (no token needed: a revoked one must sign out too)",
                {"200": _json("SignedOut", "Signed out.")},
            ),
        },
        "/v1/openapi.json": {
            "get": _public(
                "This document (no token: it describes the API and holds no data)",
                {"200": {"description": "OpenAPI 3.1.", "content": {JSON: {"schema": {"type": "object"}}}}},
            )
        },
    }


@functools.cache
def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "batchd",
            "version": __version__,
            "description": "batchd's HTTP API: jobs, their events, the dashboard's readings, health and "
            "metrics. A tenant's token sees its own tenant's only; the admin token every tenant's. Every GET "
            "also answers HEAD. Not described: the dashboard's page and files (`/`, `/static/`); an unknown "
            "path or method gets aiohttp's plain-text 404 or 405 (under /v1/, a 401 first without a valid "
            "token). `/metrics` and `/v1/events` are served by `batchd run` (a server made without metrics "
            "or an event hub lacks them).",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tenant's token (batchd tenant add) or the admin token. Preferred.",
                },
                "access_token": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "access_token",
                    "description": "For an EventSource, which cannot set headers; a URL ends up in logs: "
                    "short-lived tokens only.",
                },
                "cookie": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "batchd_token",
                    "description": "Set by POST /v1/session (HttpOnly, SameSite=Strict, Secure over HTTPS).",
                },
            },
        },
    }


@functools.cache
def document_text() -> str:
    return json.dumps(document(), indent=1)
