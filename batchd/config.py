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
# Names batchd does not read but which are no mistake: the README's examples keep a tenant's token in
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
    url: str = DEFAULT_DATABASE_URL
    pool_min_size: int = Field(default=1, ge=1)
    pool_max_size: int = Field(default=10, ge=2)


class AnthropicSettings(_Section):
    base_url: str | None = Field(default=None, description="unset: the real API")
    api_key_file: Path | None = None
    requests_per_minute: int = Field(default=50, ge=1, description="every batch call counts, polls included")
    timeout_s: float = Field(default=600.0, gt=0)


class BatchingSettings(_Section):
    max_requests: int = Field(default=10_000, ge=1, le=API_MAX_REQUESTS)
    max_bytes: int = Field(default=100_000_000, ge=1024, le=API_MAX_BYTES)
    max_wait_s: float = Field(default=60.0, gt=0)
    deadline_slack_s: float = Field(
        default=900.0, ge=0, description="a job whose deadline is this close is flushed at once"
    )
    max_in_flight_requests: int = Field(default=100_000, ge=1)
    cache_lookahead: float = Field(
        default=1.0,
        ge=0,
        le=10,
        description="how far past a batch's worth (in batches) a tenant's queue is searched for jobs sharing "
        "a cacheable prefix with those taken",
    )
    max_attempts: int = Field(default=3, ge=1)


_Ranged = TypeVar("_Ranged", bound=BaseModel)


def _in_order(section: _Ranged, low: str, high: str) -> _Ranged:
    """A section whose `low` may not exceed its `high` (a range's two ends)."""
    if getattr(section, low) > getattr(section, high):
        raise ValueError(f"{low} must not exceed {high}")
    return section


class PollingSettings(_Section):
    min_interval_s: float = Field(default=5.0, gt=0)
    max_interval_s: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> PollingSettings:
        return _in_order(self, "min_interval_s", "max_interval_s")


class ResultsSettings(_Section):
    delete_after_apply: bool = Field(default=False, description="delete the provider's copy once applied")
    apply_chunk: int = Field(default=2_000, ge=1, description="results applied per transaction")


class DaemonSettings(_Section):
    lease_s: float = Field(default=60.0, ge=1, description="how long a batch stays with a silent owner")
    sweep_interval_s: float = Field(default=30.0, gt=0, description="look for work even without a NOTIFY")
    reconcile_grace_s: float = Field(
        default=30.0, ge=0, description="wait this long after an unanswered create before listing batches"
    )
    clock_skew_s: float = Field(
        default=60.0,
        ge=0,
        description="how far the provider's clock and ours may disagree; a create that went unanswered (or "
        "answered 5xx) is sent again only once [anthropic] timeout_s + clock_skew_s have passed since it was "
        "sent and the provider's list still shows no batch of it",
    )
    retry_min_s: float = Field(
        default=1.0, gt=0, description="a failing step (API or database error) is tried again after this"
    )
    retry_max_s: float = Field(
        default=300.0,
        gt=0,
        description="... then twice as long after each failure in a row, up to this (jittered; reset by a "
        "success)",
    )
    isolate_after_s: float = Field(
        default=600.0,
        ge=0,
        description="a batch whose creates have failed (500, or a 4xx naming no request) for this long, 4 "
        "times or more, is halved to find the request the provider cannot take",
    )
    status_interval_s: float = Field(default=5.0, gt=0, description="how often STATUS= is sent to systemd")

    @model_validator(mode="after")
    def _retry_ordered(self) -> DaemonSettings:
        return _in_order(self, "retry_min_s", "retry_max_s")


class RoutingSettings(_Section):
    """Deadline-aware routing (`route` on a job): when an `auto` job goes through the synchronous Messages
    API, and how the sync path sends."""

    concurrency: int = Field(default=8, ge=1, description="sync calls in flight at once, per daemon")
    margin_s: float = Field(
        default=60.0, ge=0, description="safety margin added to the batch p90 when judging a deadline"
    )
    window: int = Field(default=50, ge=1, description="the batch p90 is taken over this many recent batches")
    min_samples: int = Field(
        default=10, ge=1, description="fewer applied batches than this: prior_turnaround_s stands in"
    )
    prior_turnaround_s: float = Field(
        default=3600.0, gt=0, description="the batch p90 assumed until min_samples batches are measured"
    )
    lease_s: float = Field(
        default=60.0, ge=1, description="a job a silent daemon was sending sync is queued again after this"
    )


class EventsSettings(_Section):
    retention_s: float = Field(default=7 * 86_400.0, gt=0, description="events older than this are pruned")
    prune_interval_s: float = Field(default=600.0, gt=0)
    prune_chunk: int = Field(default=10_000, ge=1, description="events deleted per statement")
    publish_chunk: int = Field(default=5_000, ge=1, description="events numbered per publishing statement")
    poll_interval_s: float = Field(
        default=5.0, gt=0, description="publish and fan out even without a NOTIFY (a fallback)"
    )
    heartbeat_s: float = Field(default=15.0, gt=0, description="a comment line on an idle stream")
    retry_ms: int = Field(default=2_000, ge=0, description="the reconnection delay advised to clients")
    client_buffer_bytes: int = Field(
        default=1_048_576, ge=1024, description="live events queued for one stream, at most"
    )
    on_full_buffer: Literal["replay", "cut"] = Field(
        default="replay",
        description="a stream whose buffer would overflow goes on from the table (replay), or is cut off",
    )
    send_timeout_s: float = Field(default=30.0, gt=0, description="a write stalled this long cuts the client")
    max_streams_per_tenant: int = Field(default=100, ge=1, description="open streams per tenant (and admin)")
    replay_page: int = Field(default=1_000, ge=1, description="events read per query when a client resumes")


DAY_S = 86_400.0
# The ledger is kept at least a month and a day: `batchd report` and the page may be asked about this month.
LEDGER_MIN_S = 32 * DAY_S


class RetentionSettings(_Section):
    """How long finished jobs and the money history are kept (pruner.py); `inf` keeps them for good."""

    succeeded_s: float = Field(default=14 * DAY_S, gt=0, description="succeeded jobs are deleted after this")
    failed_s: float = Field(default=30 * DAY_S, gt=0, description="failed jobs are deleted after this")
    canceled_s: float = Field(default=14 * DAY_S, gt=0, description="canceled jobs are deleted after this")
    ledger_s: float = Field(
        default=400 * DAY_S,
        ge=LEDGER_MIN_S,
        description="the cost ledger (batchd.costs) and hour rollups are deleted after this; day and "
        "all-time rollups are kept",
    )
    interval_s: float = Field(default=300.0, gt=0, description="the pruner looks this often")
    chunk: int = Field(default=1_000, ge=1, le=100_000, description="rows deleted per statement")
    busy_share: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="the pruner deletes at most this share of the time, resting the rest between chunks",
    )

    def jobs_s(self) -> dict[str, float]:
        """Each finished status's retention, in seconds."""
        return {"succeeded": self.succeeded_s, "failed": self.failed_s, "canceled": self.canceled_s}


class RollupSettings(_Section):
    fold_interval_s: float = Field(
        default=2.0, gt=0, description="finished jobs' tallies are folded into the rollups this often"
    )
    fold_chunk: int = Field(default=10_000, ge=1, description="tallies folded per statement")


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    admin_token_file: Path | None = Field(
        default=None, description="a file holding the admin token (or $BATCHD_ADMIN_TOKEN); unset: no admin"
    )
    secure_cookie: bool | None = Field(
        default=None,
        description="mark the dashboard's cookie Secure; unset: when the request came over HTTPS (set true "
        "behind a proxy that terminates TLS)",
    )
    session_max_age_s: int = Field(
        default=43_200,
        ge=60,
        description="how long a browser keeps the dashboard's cookie (Max-Age); then the page asks for the "
        "token again",
    )
    overview_interval_s: float = Field(
        default=2.0,
        ge=0,
        description="GET /v1/overview reads the database at most once per this, for every asker at once",
    )
    overview_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="the overview's reading is cancelled by the database after this",
    )
    metrics_interval_s: float = Field(
        default=1.5,
        ge=0,
        description="GET /metrics reads the database's counts and the ledger at most once per this",
    )
    metrics_timeout_s: float = Field(
        default=5.0, gt=0, le=300, description="each of the metrics' readings is cancelled after this"
    )


class TenantLimits(_Section):
    """How a tenant shares batches (fairness.py). Unset: the [tenant_defaults] value, then none."""

    weight: int | None = Field(
        default=None, ge=1, le=10_000, description="its share of a batch against other queued tenants"
    )
    max_queued: int | None = Field(
        default=None, ge=0, description="the most queued jobs; past it the database refuses the INSERT"
    )
    max_in_flight: int | None = Field(
        default=None, ge=0, description="the most of its requests in open batches; past it its jobs wait"
    )


class JobType(_Section):
    """A named kind of job: producers send `input`, the template makes the Messages API request."""

    model: str
    max_tokens: int = Field(ge=1)
    prompt: str = Field(description="the user turn; {field} is replaced by input[field]")
    system: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    fields: list[str] = Field(default_factory=list, description="input fields the templates need")
    cache: Literal["5m", "1h"] | None = Field(
        default=None,
        description='mark the system prompt for the prompt cache with this TTL, "5m" or "1h"; unset: no mark',
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

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    anthropic: AnthropicSettings = Field(default_factory=AnthropicSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    polling: PollingSettings = Field(default_factory=PollingSettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    events: EventsSettings = Field(default_factory=EventsSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    rollups: RollupSettings = Field(default_factory=RollupSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    job_types: dict[str, JobType] = Field(default_factory=dict)
    tenant_defaults: TenantLimits = Field(default_factory=TenantLimits)
    tenants: dict[str, TenantLimits] = Field(default_factory=dict)
    pricing: PricingSettings = Field(default_factory=PricingSettings)
    emulator: EmulatorConfig = Field(default_factory=EmulatorConfig, description="read by `batchd emulator`")

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
