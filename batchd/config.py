"""batchd's configuration: `batchd.toml`, with environment overrides, checked whole at start.

The file is found by `--config`, else `$BATCHD_CONFIG`, else `./batchd.toml`. Any key can be overridden by
an environment variable `BATCHD_<SECTION>__<KEY>` (for example `BATCHD_BATCHING__MAX_WAIT_S=30`). The API
key is never in the file: it comes from `ANTHROPIC_API_KEY`, from `[anthropic] api_key_file`, or from the
credential `anthropic-api-key` that systemd's `LoadCredential=` puts in `$CREDENTIALS_DIRECTORY`. The admin
token comes the same three ways: `BATCHD_ADMIN_TOKEN`, `[http] admin_token_file`, the credential
`admin-token`.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import string
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import structlog
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .emulator import EmulatorConfig
from .pricing import PricingSettings
from .redact import redact_url

log = structlog.get_logger("batchd.config")

DEFAULT_CONFIG = Path("batchd.toml")
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
API_MAX_REQUESTS = 100_000
API_MAX_BYTES = 256_000_000
CREDENTIAL_NAME = "anthropic-api-key"
ADMIN_TOKEN_ENV = "BATCHD_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret
ADMIN_CREDENTIAL_NAME = "admin-token"
ENV_PREFIX = "BATCHD_"
CONFIG_ENV = "BATCHD_CONFIG"
# The variables batchd reads besides BATCHD_<SECTION>__<KEY>: a misspelling of one is pointed at it.
OTHER_VARIABLES = (CONFIG_ENV, ADMIN_TOKEN_ENV, "BATCHD_EMULATOR_API_KEY")
# Names batchd does not read but which are no mistake: the docs' examples keep a tenant's token in
# BATCHD_TOKEN, and the tests and the Makefile pass the rest down to every batchd they start.
FOREIGN_VARIABLES = frozenset(
    {
        "BATCHD_TOKEN",
        "BATCHD_TEST_DATABASE_URL",
        "BATCHD_CHAOS_SEED",
        "BATCHD_CHAOS_REPEAT",
        "BATCHD_CHROMIUM",
    }
)
# The name other tools read a database's URL from; batchd reads BATCHD_DATABASE__URL.
FOREIGN_DATABASE_ENV = "DATABASE_URL"
DATABASE_URL_ENV = "BATCHD_DATABASE__URL"
# The admin token sees every tenant: one this short could be guessed, from any of its three sources.
ADMIN_TOKEN_MIN_LENGTH = 16
# The prompt cache's TTLs, as cache_control's `ttl` spells them (anthropic.types.CacheControlEphemeralParam).
CACHE_TTLS = ("5m", "1h")


class ConfigError(Exception):
    """The configuration names a bad key or value; the message says which and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatabaseSettings(_Section):
    url: str = Field(
        default=DEFAULT_DATABASE_URL,
        description="the database holding schema `batchd`, as a PostgreSQL URL: "
        "`postgresql://USER@HOST:PORT/DATABASE`, or over the local socket "
        "`postgresql://USER@/DATABASE?host=/run/postgresql`; a password goes in `$BATCHD_DATABASE__URL` (a "
        "root-only environment file), not in batchd.toml, which every user may read",
    )
    pool_min_size: int = Field(default=1, ge=1, description="connections the daemon's pool keeps open")
    pool_max_size: int = Field(
        default=10,
        ge=2,
        description="connections the daemon's pool may open (the listener has one of its own)",
    )


class AnthropicSettings(_Section):
    base_url: str | None = Field(
        default=None,
        description="where the API is; unset: the real API (the SDK's default, https://api.anthropic.com). "
        "Development points it at the emulator, e.g. `http://127.0.0.1:8787`",
    )
    api_key_file: Path | None = Field(
        default=None,
        description="a file holding the API key, read when `$ANTHROPIC_API_KEY` is not set (before the "
        "systemd credential `anthropic-api-key`); unset: none",
    )
    requests_per_minute: int = Field(
        default=50,
        ge=1,
        description="calls to the batch endpoints per minute, polls included, shared by every one of this "
        "daemon's calls; a 429 pauses them all (the lowest tier allows 50)",
    )
    timeout_s: float = Field(default=600.0, gt=0, description="how long one API call may take")


class BatchingSettings(_Section):
    max_requests: int = Field(
        default=10_000,
        ge=1,
        le=API_MAX_REQUESTS,
        description="flush at this many queued jobs (at most 100,000)",
    )
    max_bytes: int = Field(
        default=100_000_000,
        ge=1024,
        le=API_MAX_BYTES,
        description="...or at this many bytes of requests (at most 256,000,000)",
    )
    max_wait_s: float = Field(
        default=60.0, gt=0, description="...or when the oldest queued job has waited this long"
    )
    deadline_slack_s: float = Field(
        default=900.0, ge=0, description="...or when a job's deadline is this close: it is flushed at once"
    )
    max_in_flight_requests: int = Field(
        default=100_000,
        ge=1,
        description="requests allowed in open batches at once, across every daemon sharing the database (the "
        "workspace's cap: 100k to 500k by tier)",
    )
    cache_lookahead: float = Field(
        default=1.0,
        ge=0,
        le=10,
        description="how many batches past a tenant's queue head the flusher looks for jobs sharing a "
        "cacheable prefix with those taken (0: plain FIFO per tenant)",
    )
    max_attempts: int = Field(
        default=3, ge=1, description="tries per job before a transient failure is final"
    )


_Ranged = TypeVar("_Ranged", bound=BaseModel)


def _in_order(section: _Ranged, low: str, high: str) -> _Ranged:
    """A section whose `low` may not exceed its `high` (a range's two ends)."""
    if getattr(section, low) > getattr(section, high):
        raise ValueError(f"{low} must not exceed {high}")
    return section


class PollingSettings(_Section):
    min_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="a batch's first poll interval; it grows by half each time, with jitter",
    )
    max_interval_s: float = Field(default=300.0, gt=0, description="...up to this")

    @model_validator(mode="after")
    def _ordered(self) -> PollingSettings:
        return _in_order(self, "min_interval_s", "max_interval_s")


class ResultsSettings(_Section):
    delete_after_apply: bool = Field(
        default=False,
        description="delete the provider's copy once results are applied (it keeps them 29 days)",
    )
    apply_chunk: int = Field(default=2_000, ge=1, description="results applied per transaction")


class DaemonSettings(_Section):
    lease_s: float = Field(
        default=60.0,
        ge=1,
        description="how long a batch stays with a silent owner before another daemon takes it",
    )
    sweep_interval_s: float = Field(
        default=30.0, gt=0, description="look for work this often even without a notification"
    )
    reconcile_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="after an unanswered create, wait this long before listing the provider's batches",
    )
    clock_skew_s: float = Field(
        default=60.0,
        ge=0,
        description="how far the provider's clock and ours may disagree. A create answered 5xx or not at "
        "all may still land (a gateway gave up while the API went on): it is sent again only once "
        "`anthropic.timeout_s` + this has passed since it was sent and the provider's list still holds "
        "nothing of it (with the defaults, 11 minutes; batchd lists again meanwhile and adopts it if it "
        "appears)",
    )
    retry_min_s: float = Field(
        default=1.0,
        gt=0,
        description="a step that fails (an API or database error: poll, results, reconciliation, a refused "
        "create; a database error in the flusher, sync sender, lease renewal, publisher, event hub, pruner "
        "or fold) is tried again after this",
    )
    retry_max_s: float = Field(
        default=300.0,
        gt=0,
        description="...then twice as long after each further failure in a row, up to this (for those loops, "
        "at most their own interval), each wait jittered (3/4 to all of it); a success resets it",
    )
    isolate_after_s: float = Field(
        default=600.0,
        ge=0,
        description="a batch whose creates keep failing (500, or a 4xx naming no request: 4 attempts or "
        "more, over this long) is halved, and halved again, until the request the provider cannot take "
        "fails alone with the reason",
    )
    status_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="how often the daemon sends systemd its `STATUS=` line (under `Type=notify`)",
    )

    @model_validator(mode="after")
    def _retry_ordered(self) -> DaemonSettings:
        return _in_order(self, "retry_min_s", "retry_max_s")


class RoutingSettings(_Section):
    """Deadline-aware routing (`route` on a job): when an `auto` job goes through the synchronous Messages
    API, and how the sync path sends."""

    concurrency: int = Field(
        default=8, ge=1, description="Messages API calls in flight at once per daemon, for jobs routed sync"
    )
    margin_s: float = Field(
        default=60.0,
        ge=0,
        description="safety margin added to the batch p90 when judging an `auto` job's deadline",
    )
    window: int = Field(
        default=50, ge=1, description="the batch p90 is taken over this many most recently applied batches"
    )
    min_samples: int = Field(
        default=10,
        ge=1,
        description="with fewer applied batches than this in the window, `prior_turnaround_s` stands in for "
        "the p90",
    )
    prior_turnaround_s: float = Field(
        default=3600.0,
        gt=0,
        description="the batch turnaround assumed until `min_samples` batches are measured (batches mostly "
        "end within 1 h, and may take 24)",
    )
    lease_s: float = Field(
        default=60.0,
        ge=1,
        description="a job being sent sync by a daemon that went silent (killed mid-call) is queued again, "
        "and sent again, after this; renewed while the call runs",
    )


class EventsSettings(_Section):
    retention_s: float = Field(
        default=7 * 86_400.0,
        gt=0,
        description="events older than this (7 days) are pruned; a client resuming from before gets "
        "`event: reset`",
    )
    prune_interval_s: float = Field(
        default=600.0,
        gt=0,
        description="events are pruned this often (only the oldest, so a resuming client never meets a hole)",
    )
    prune_chunk: int = Field(default=10_000, ge=1, description="events deleted per statement")
    publish_chunk: int = Field(default=5_000, ge=1, description="events numbered per publishing statement")
    poll_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="publish and fan out this often even without a notification (a fallback)",
    )
    heartbeat_s: float = Field(
        default=15.0, gt=0, description="a `: heartbeat` comment on a stream idle this long"
    )
    retry_ms: int = Field(
        default=2_000, ge=0, description="the reconnection delay advised to clients (`retry:`)"
    )
    client_buffer_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        description="live events held for one stream; past it, the stream reads from the table",
    )
    on_full_buffer: Literal["replay", "cut"] = Field(
        default="replay",
        description='a stream whose buffer would overflow goes on from the table (`"replay"`) or is cut off '
        'as a slow consumer (`"cut"`)',
    )
    send_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a client that reads nothing for this long is cut off (`event: disconnect`)",
    )
    max_streams_per_tenant: int = Field(
        default=100, ge=1, description="open streams per tenant (and for the admin); one more is a 429"
    )
    replay_page: int = Field(default=1_000, ge=1, description="events read per query when a stream replays")


DAY_S = 86_400.0
# The ledger is kept at least a month and a day: `batchd report` and the page may be asked about this month.
LEDGER_MIN_S = 32 * DAY_S


class RetentionSettings(_Section):
    """How long finished jobs and the money history are kept (pruner.py); `inf` keeps them for good."""

    succeeded_s: float = Field(
        default=14 * DAY_S,
        gt=0,
        description="succeeded jobs are deleted this long after they finished (14 days), their idempotency "
        "keys with them; the rollups keep what they counted, so totals, `/metrics`, `batchd status` and "
        "`batchd report` do not change. A batch goes once no job refers to it",
    )
    failed_s: float = Field(
        default=30 * DAY_S,
        gt=0,
        description="failed jobs are deleted this long after they finished (30 days)",
    )
    canceled_s: float = Field(
        default=14 * DAY_S,
        gt=0,
        description="canceled jobs are deleted this long after they finished (14 days)",
    )
    ledger_s: float = Field(
        default=400 * DAY_S,
        ge=LEDGER_MIN_S,
        description="the cost ledger (`batchd.costs`) and hourly rollups are deleted after this (400 days; "
        "at least 32); day and all-time rollups are kept, and budgets read those",
    )
    flow_minutes_s: float = Field(
        default=2 * DAY_S,
        ge=7_200,
        description="the queue's and batch turnaround's per-minute history (what the dashboard's last hour "
        "reads) is deleted after this (2 days; at least 2 hours); their hour rows go with the hourly rollups "
        "(`ledger_s`), their day rows are kept",
    )
    interval_s: float = Field(default=300.0, gt=0, description="the pruner looks this often")
    chunk: int = Field(default=1_000, ge=1, le=100_000, description="rows the pruner deletes per statement")
    busy_share: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="the pruner rests between statements so that it is busy at most this share of the time",
    )

    def jobs_s(self) -> dict[str, float]:
        """Each finished status's retention, in seconds."""
        return {"succeeded": self.succeeded_s, "failed": self.failed_s, "canceled": self.canceled_s}


class WebhookSettings(_Section):
    """Signed webhooks (webhooks.py, deliverer.py; docs/webhooks.md)."""

    allow_private_targets: bool = Field(
        default=False,
        description="deliver to loopback, private, link-local and other non-public addresses too; off, an "
        "endpoint resolving to one is refused when added and at each delivery (a tenant cannot aim batchd at "
        "the operator's network)",
    )
    allowed_networks: list[str] = Field(
        default_factory=list,
        description='non-public networks that endpoints may reach all the same, e.g. `["10.20.0.0/16"]`',
    )
    max_endpoints_per_tenant: int = Field(
        default=10, ge=1, le=10_000, description="endpoints one tenant may have (each event is sent to each)"
    )
    concurrency_per_endpoint: int = Field(
        default=4, ge=1, le=1_000, description="deliveries in flight to one endpoint, across daemons"
    )
    max_in_flight: int = Field(
        default=64, ge=1, le=10_000, description="deliveries this daemon has in flight, over every endpoint"
    )
    connect_timeout_s: float = Field(
        default=5.0, gt=0, description="an attempt's connection must open within this"
    )
    timeout_s: float = Field(
        default=15.0, gt=0, description="an attempt must be answered within this (else it failed)"
    )
    max_response_bytes: int = Field(
        default=16_384, ge=0, description="an endpoint's answer read at most this far (kept for the log)"
    )
    retry_base_s: float = Field(
        default=5.0, gt=0, description="the n-th retry waits a random time up to retry_base_s * 2^(n-1)..."
    )
    retry_cap_s: float = Field(default=21_600.0, gt=0, description="...and never more than this (6 hours)")
    max_attempts: int = Field(
        default=36,
        ge=1,
        le=1_000,
        description="attempts before a delivery is dead (36: about 3 days of retries on average); a dead "
        "delivery disables its endpoint unless another delivery to it succeeded since",
    )
    lease_s: float = Field(
        default=60.0,
        gt=0,
        description="an attempt's claim; a daemon that dies mid-request leaves the delivery to be sent again "
        "after this (it must exceed timeout_s)",
    )
    poll_interval_s: float = Field(
        default=1.0, gt=0, description="due retries are looked for this often (new events wake it at once)"
    )
    enqueue_chunk: int = Field(default=1_000, ge=1, description="events enqueued per statement")
    log_retention_s: float = Field(
        default=7 * DAY_S,
        gt=0,
        description="finished deliveries (delivered or dead) stay in the delivery log this long (7 days)",
    )

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not a network (e.g. 10.20.0.0/16 or fd00::/8)") from None
        return value

    @model_validator(mode="after")
    def _lease_outlasts_attempt(self) -> WebhookSettings:
        if self.lease_s <= self.timeout_s:
            raise ValueError(f"lease_s ({self.lease_s}) must exceed timeout_s ({self.timeout_s})")
        return self


class RollupSettings(_Section):
    fold_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="finished jobs' tallies are folded into the rollups this often (readers add the tallies "
        "not yet folded, so totals are exact either way)",
    )
    fold_chunk: int = Field(default=10_000, ge=1, description="tallies folded per statement")
    flow_sample_interval_s: float = Field(
        default=15.0,
        ge=0.5,
        le=60,
        description="the queue's depth and oldest wait per tenant, and the routing p90 in use, are sampled "
        "this often into the dashboard's history, by one daemon whichever the number of daemons",
    )


class HttpSettings(_Section):
    host: str = Field(
        default="127.0.0.1",
        description="the address the HTTP server listens on (`/healthz`, `/readyz`, `/metrics`, `/v1/...`, "
        "the dashboard at `/`)",
    )
    port: int = Field(default=8080, ge=0, le=65535, description="...and its port (0 picks a free one)")
    admin_token_file: Path | None = Field(
        default=None,
        description="a file holding the admin token, which sees every tenant and `/metrics` (read when "
        "`$BATCHD_ADMIN_TOKEN` is not set, before the systemd credential `admin-token`); unset: none",
    )
    secure_cookie: bool | None = Field(
        default=None,
        description="mark the dashboard's cookie `Secure`; unset: when the request came over HTTPS (set "
        "`true` behind a proxy that terminates TLS)",
    )
    session_max_age_s: int = Field(
        default=43_200,
        ge=60,
        description="how long a browser keeps the dashboard's cookie (`Max-Age`, 12 hours; at least 60); "
        "then the page asks for the token again",
    )
    overview_interval_s: float = Field(
        default=2.0,
        ge=0,
        description="`GET /v1/overview` reads the database at most once per this (for every tenant at once, "
        "shared by every request meanwhile), and `GET /v1/series` once per window; 0: only requests that "
        "come while a reading is under way share it",
    )
    overview_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="the overview's reading (and each of `GET /v1/series`) is ended by the database after "
        "this (its statement timeout); the overview (or the series) then answers 503 until the next interval",
    )
    metrics_interval_s: float = Field(
        default=1.5,
        ge=0,
        description="`GET /metrics` reads the database's counts, and the money, at most once per this each",
    )
    metrics_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="each of the metrics' readings is ended by the database after this; the database's "
        "metrics are then left out until the next interval",
    )
    max_post_bytes: int = Field(
        default=16_000_000,
        ge=1_000,
        le=API_MAX_BYTES,
        description="the largest body `POST /v1/jobs` reads (bytes); a larger one is answered 413 unread. A "
        "job larger than this goes in through SQL or `batchd enqueue`",
    )
    max_post_jobs: int = Field(
        default=1_000,
        ge=1,
        le=100_000,
        description="the most jobs one `POST /v1/jobs` may carry (a JSON array); more: 413",
    )


class TenantLimits(_Section):
    """How a tenant shares batches (fairness.py). Unset: the [tenant_defaults] value, then none."""

    weight: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="its share of a batch when several tenants are queued (1 to 10,000); unset: 1 "
        "(for a tenant, `[tenant_defaults]`'s first)",
    )
    max_queued: int | None = Field(
        default=None,
        ge=0,
        description="the most queued jobs; an INSERT past it is refused by the database (SQLSTATE 53400); "
        "unset: no limit (for a tenant, `[tenant_defaults]`'s first)",
    )
    max_in_flight: int | None = Field(
        default=None,
        ge=0,
        description="the most of its requests in open batches; past it its jobs wait in the queue; unset: "
        "no limit (for a tenant, `[tenant_defaults]`'s first)",
    )


class JobType(_Section):
    """A named kind of job: producers send `input`, the template makes the Messages API request."""

    model: str = Field(description="the model its requests ask for; it needs a price in `[pricing.models]`")
    max_tokens: int = Field(ge=1, description="the requests' `max_tokens`")
    prompt: str = Field(
        description="the user turn's template: `{field}` is replaced by the job's `input[field]`; a list "
        'input is joined with ", "'
    )
    system: str | None = Field(default=None, description="the system prompt's template, with `{field}`s too")
    temperature: float | None = Field(default=None, ge=0, le=1, description="the requests' `temperature`")
    fields: list[str] = Field(
        default_factory=list,
        description="the input fields the templates need: a job whose input lacks one fails at once",
    )
    cache: Literal["5m", "1h"] | None = Field(
        default=None,
        description='`"1h"` or `"5m"`: send the system prompt as a text block marked for the prompt cache '
        "with this TTL, so a batch's first request writes it and the others read it at 0.1x the input price "
        "(docs/costs.md); needs a `system`. Unset: no mark",
    )

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_ttl(cls, value: Any) -> Any:
        # Checked before the Literal does, for a message that says what the two values are: the API knows
        # no other TTL, and would say so only when the whole batch ends, as every job's error.
        if value is not None and value not in CACHE_TTLS:
            raise ValueError(
                f'must be "5m" or "1h" (the prompt cache\'s two TTLs), or left out for no cache mark; '
                f"got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _fields_cover_the_templates(self) -> JobType:
        used = template_fields(self.prompt) | template_fields(self.system or "")
        missing = used - set(self.fields)
        if missing:
            raise ValueError(f"the templates use {sorted(missing)} but `fields` does not list them")
        if self.cache is not None and self.system is None:
            raise ValueError(
                "`cache` marks the system prompt as the shared prefix to cache, but this job type has no "
                "`system`: add one (the part its jobs share) or remove `cache`"
            )
        return self


def template_fields(template: str) -> set[str]:
    fields = set()
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            if not name.isidentifier():
                raise ValueError(f"template field {{{name}}} must be a plain name")
            fields.add(name)
    return fields


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    database: DatabaseSettings = Field(
        default_factory=DatabaseSettings,
        description="The PostgreSQL database that holds all of batchd's state: every daemon, command and "
        "producer works through it.",
    )
    anthropic: AnthropicSettings = Field(
        default_factory=AnthropicSettings,
        description="The Message Batches API, and the Messages API for jobs routed sync, through the "
        "official SDK. The API key is never in the file: `$ANTHROPIC_API_KEY`, `api_key_file` or the "
        "systemd credential `anthropic-api-key`.",
    )
    batching: BatchingSettings = Field(
        default_factory=BatchingSettings,
        description="When the flusher makes a batch, what it may hold, and how often a job is tried.",
    )
    polling: PollingSettings = Field(
        default_factory=PollingSettings, description="How often an open batch is asked whether it has ended."
    )
    results: ResultsSettings = Field(
        default_factory=ResultsSettings, description="How an ended batch's results are applied."
    )
    daemon: DaemonSettings = Field(
        default_factory=DaemonSettings,
        description="The daemon's own pace: leases between daemons, sweeps, retries and what it tells "
        "systemd.",
    )
    events: EventsSettings = Field(
        default_factory=EventsSettings,
        description="The event log (`batchd.events`) and the streams of `GET /v1/events` (docs/sse.md).",
    )
    retention: RetentionSettings = Field(
        default_factory=RetentionSettings,
        description="How long finished jobs and the money history are kept (docs/retention.md); `inf` keeps "
        "a kind for good.",
    )
    rollups: RollupSettings = Field(
        default_factory=RollupSettings,
        description="Folding finished jobs' tallies into the rollups that the totals, `/metrics`, `batchd "
        "status`, `batchd report` and the budgets read, and sampling the queue for the dashboard's charts.",
    )
    routing: RoutingSettings = Field(
        default_factory=RoutingSettings,
        description="Deadline-aware routing (docs/routing.md): when an `auto` job goes through the "
        "synchronous Messages API, and how the sync path sends.",
    )
    webhooks: WebhookSettings = Field(
        default_factory=WebhookSettings,
        description="Signed webhooks to tenants' endpoints (docs/webhooks.md).",
    )
    http: HttpSettings = Field(
        default_factory=HttpSettings,
        description="batchd's HTTP server: health, metrics, the API for tenants and the dashboard.",
    )
    job_types: dict[str, JobType] = Field(
        default_factory=dict,
        description="Named job types, none by default: a producer inserts `(tenant_id, job_type, input)` and "
        "batchd renders the Messages API request from the job type's templates (docs/producers.md).",
    )
    tenant_defaults: TenantLimits = Field(
        default_factory=TenantLimits,
        description="Every tenant's share of a batch and limits (docs/fairness.md); a value set with `batchd "
        "tenant set` wins. Daemons sharing a database should share these.",
    )
    tenants: dict[str, TenantLimits] = Field(
        default_factory=dict,
        description="One tenant's share and limits, over `[tenant_defaults]`; a value set with `batchd "
        "tenant set` wins.",
    )
    pricing: PricingSettings = Field(
        default_factory=PricingSettings,
        description="What requests cost (docs/costs.md): each result is priced with this table into the "
        "ledger when it is applied.",
    )
    emulator: EmulatorConfig = Field(
        default_factory=EmulatorConfig,
        description="Read by `batchd emulator` alone (docs/emulator.md); its command-line options win over "
        "these.",
    )

    @field_validator("job_types")
    @classmethod
    def _names(cls, value: dict[str, JobType]) -> dict[str, JobType]:
        for name in value:
            if not name.isidentifier():
                raise ValueError(f"job type name {name!r} must be a plain name")
        return value

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, value: dict[str, TenantLimits]) -> dict[str, TenantLimits]:
        for name in value:
            if not name or name != name.strip():
                raise ValueError(f"tenant name {name!r} must be non-empty, without surrounding spaces")
        return value

    @model_validator(mode="after")
    def _job_types_priced(self) -> Settings:
        # A raw request for a model with no price is recorded with a null cost (and a warning); a job type,
        # which the operator writes, must name a priced model (pricing.py).
        for name, job_type in self.job_types.items():
            if self.pricing.rates_for(job_type.model) is None:
                raise ValueError(
                    f"job type {name!r} uses model {job_type.model!r}, which has no price in [pricing.models]"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],  # noqa: ARG003
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment overrides them.
        return env_settings, init_settings


def config_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def read_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


def describe(
    error: ValidationError,
    prefix: str = "",
    *,
    data: Mapping[str, Any] | None = None,
    path: Path | None = None,
) -> str:
    """Every problem as `section.key: what is wrong`. An unknown key is named with the nearest valid one,
    and where it was written: `path` when `data` (the file's contents) holds it, else the environment."""
    problems = []
    for problem in error.errors():
        loc = [*prefix.split(".")[:-1], *map(str, problem["loc"])]
        key = ".".join(loc)
        if problem["type"] != "extra_forbidden":
            problems.append(f"{key}: {problem['msg']}")
            continue
        if path is not None and _holds(data or {}, loc):
            where = f"{path}: "
        elif data is not None:
            where = f"${ENV_PREFIX}{'__'.join(loc).upper()}: "
        else:
            where = ""
        nearest = nearest_key(loc)
        hint = f" (did you mean {nearest}?)" if nearest else ""
        problems.append(f"{where}unknown key {key}{hint}")
    return "; ".join(problems)


def _holds(data: Mapping[str, Any], loc: Sequence[str]) -> bool:
    value: Any = data
    for part in loc:
        if not isinstance(value, Mapping) or part not in value:
            return False
        value = value[part]
    return True


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (`X` or `X | None`), if any; not a table's (`dict[str, X]`)."""
    if get_origin(annotation) is dict:
        return None
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def nearest_key(loc: Sequence[str]) -> str | None:
    """The valid key nearest to the unknown `loc` (section, ..., key), spelled as `loc` is, or None when no
    valid key there is close."""
    model: type[BaseModel] = Settings
    index = 0
    while index < len(loc) - 1:
        field = model.model_fields.get(loc[index])
        if field is None:
            return None
        annotation = field.annotation
        if get_origin(annotation) is dict:
            # A table of named entries (job_types, tenants, pricing.models): the next part is a name.
            annotation = get_args(annotation)[1]
            index += 1
        inner = _model_of(annotation)
        if inner is None:
            return None
        model = inner
        index += 1
    matches = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return ".".join([*loc[:-1], matches[0]]) if matches else None


def _variables(model: type[BaseModel], prefix: str, names: set[str], open_prefixes: list[str]) -> None:
    for key, field in model.model_fields.items():
        name = f"{prefix}{key.upper()}"
        names.add(name)  # a section as a whole takes JSON
        inner = _model_of(field.annotation)
        if inner is not None:
            _variables(inner, f"{name}__", names, open_prefixes)
        elif get_origin(field.annotation) is dict:
            # Entries are named by the operator; pydantic itself refuses an unknown key inside one.
            open_prefixes.append(f"{name}__")


def environment_names() -> tuple[frozenset[str], tuple[str, ...]]:
    """Every BATCHD_ variable batchd reads, and the prefixes under which any name is read (a table's
    entries, such as BATCHD_TENANTS__<NAME>__WEIGHT)."""
    names: set[str] = set(OTHER_VARIABLES)
    open_prefixes: list[str] = []
    _variables(Settings, ENV_PREFIX, names, open_prefixes)
    return frozenset(names), tuple(open_prefixes)


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Each BATCHD_ variable in `environ` that batchd does not read, with the nearest name it does (or
    None): pydantic-settings passes over such a variable in silence, so BATCHD_DATABASE_URL (one underscore)
    would leave batchd on the default database. Case is ignored, as pydantic-settings ignores it."""
    names, open_prefixes = environment_names()
    bare = [name.removeprefix(ENV_PREFIX) for name in sorted(names)]
    unknown = []
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith(ENV_PREFIX) or name in names or name in FOREIGN_VARIABLES:
            continue
        if name.startswith(open_prefixes):
            continue
        # Compared without the prefix every name shares, which would make any two names look alike.
        matches = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), bare, n=1)
        unknown.append((variable, ENV_PREFIX + matches[0] if matches else None))
    return unknown


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuses the BATCHD_ variables batchd does not read, naming each with its nearest valid name."""
    problems = [
        f"${variable} is not a variable batchd reads" + (f" (did you mean ${nearest}?)" if nearest else "")
        for variable, nearest in unknown_variables(environ)
    ]
    if problems:
        raise ConfigError("; ".join(problems))


def foreign_database_url(settings: Settings, environ: Mapping[str, str]) -> str | None:
    """$DATABASE_URL, when it is set, $BATCHD_DATABASE__URL is not, and the database in use is another:
    batchd does not read DATABASE_URL (other tools in the same environment do), but whoever set it may
    have meant batchd to use it. Redacted, for a warning."""
    foreign = environ.get(FOREIGN_DATABASE_ENV)
    if not foreign or any(name.upper() == DATABASE_URL_ENV for name in environ):
        return None
    return redact_url(foreign) if foreign != settings.database.url else None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    check_environment(os.environ)
    source = config_path(path)
    data = read_toml(source)
    try:
        settings = Settings(**data)
    except ValidationError as error:
        raise ConfigError(describe(error, data=data, path=source)) from None
    foreign = foreign_database_url(settings, os.environ)
    if foreign is not None:
        log.warning(
            "config.database_url_ignored",
            database_url=foreign,
            database=redact_url(settings.database.url),
            hint=f"batchd reads ${DATABASE_URL_ENV}, not ${FOREIGN_DATABASE_ENV}",
        )
    return settings


def admin_token(settings: Settings) -> SecretStr | None:
    """The admin token, which sees every tenant, from the first place that has one: $BATCHD_ADMIN_TOKEN,
    [http] admin_token_file, then the systemd credential admin-token. None of them: there is no admin (a
    credentials directory without admin-token is no error: the API key's credential may be all it holds)."""
    from_env = os.environ.get(ADMIN_TOKEN_ENV)
    if from_env:
        return _admin_token(ADMIN_TOKEN_ENV, "the variable", from_env)
    path = settings.http.admin_token_file
    if path is not None:
        try:
            return _admin_token("http.admin_token_file", str(path), path.read_text())
        except OSError as error:
            raise ConfigError(f"http.admin_token_file: cannot read {path}: {error.strerror}") from None
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not credentials:
        return None
    path = Path(credentials) / ADMIN_CREDENTIAL_NAME
    source = f"the systemd credential {ADMIN_CREDENTIAL_NAME} ($CREDENTIALS_DIRECTORY)"
    try:
        return _admin_token(source, str(path), path.read_text())
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigError(f"{source}: cannot read {path}: {error.strerror}") from None


def _admin_token(source: str, holder: str, text: str) -> SecretStr:
    token = text.strip()
    if len(token) < ADMIN_TOKEN_MIN_LENGTH:
        raise ConfigError(
            f"{source}: {holder} holds a token shorter than {ADMIN_TOKEN_MIN_LENGTH} characters "
            "(make one with `openssl rand -hex 32`)"
        )
    return SecretStr(token)


def api_key(settings: Settings) -> SecretStr:
    """The API key, from the first place that has one; never logged (a SecretStr prints as stars)."""
    from_env = os.environ.get("ANTHROPIC_API_KEY")
    if from_env:
        return SecretStr(from_env.strip())
    # (where the key comes from, as an error names it; its file)
    candidates: list[tuple[str, Path]] = []
    if settings.anthropic.api_key_file is not None:
        candidates.append(("anthropic.api_key_file", settings.anthropic.api_key_file))
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        candidates.append(
            (
                f"the systemd credential {CREDENTIAL_NAME} ($CREDENTIALS_DIRECTORY)",
                Path(credentials) / CREDENTIAL_NAME,
            )
        )
    for source, candidate in candidates:
        try:
            key = candidate.read_text().strip()
        except OSError as error:
            raise ConfigError(f"{source}: cannot read {candidate}: {error.strerror}") from None
        if key:
            return SecretStr(key)
        raise ConfigError(f"{source}: {candidate} is empty")
    raise ConfigError(
        "anthropic: no API key; set ANTHROPIC_API_KEY, or [anthropic] api_key_file, "
        f"or a systemd credential named {CREDENTIAL_NAME}"
    )
