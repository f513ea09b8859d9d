"""The `batchd` command line."""

from __future__ import annotations

import argparse
import json
import sys
from argparse import Namespace
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

# Only the standard library is imported before a command runs: `batchd --help` and `--version` answer without
# loading the SDK, aiohttp, asyncpg or pydantic (bench/cli_start.py measures it). Each handler imports what it
# uses, so `status` or `report` do not pay for the SDK either.
if TYPE_CHECKING:
    import asyncpg
    from asyncpg import Connection

    from .config import Settings
    from .emulator import EmulatorConfig
    from .enqueue import Checked, Checker

EX_CONFIG = 78  # sysexits: bad configuration; systemd is told not to restart on it
EX_DATAERR = 65  # sysexits: bad input data
EX_UNAVAILABLE = 69  # sysexits: a service (the database, a port to listen on) is not available
EX_NOPERM = 77  # sysexits: the database role lacks a privilege
# A reader that stopped reading (`batchd status | head -3`): what a shell reports for a process killed by
# SIGPIPE (128 + 13), as for `yes | head`, so `set -o pipefail` treats batchd as any other command.
EX_PIPE = 141
LOG_LEVELS = ("debug", "info", "warning", "error")


class CommandError(Exception):
    """An expected failure: `batchd: MESSAGE`, one line on stderr, and `code` as the exit status (1: the
    command was refused, e.g. canceling a job that is not queued)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- running a command ---------------------------------------------------------------------------------------

# A command that works on the database: it gets an open connection (to a database with every migration
# applied) and the settings, and returns the exit status.
Handler = Callable[["Connection", "Settings", Namespace], Awaitable[int]]


def execute_command(handler: Handler, args: Namespace, *, migrated: bool = True) -> int:
    """Loads the settings, connects, runs `handler`, closes the connection. The database's expected failures
    (unreachable, lost, not migrated) become a CommandError; `main` prints those."""
    import asyncio  # noqa: PLC0415 - see the imports above

    import asyncpg  # noqa: PLC0415

    from . import migrate  # noqa: PLC0415
    from .redact import redact_url  # noqa: PLC0415

    settings = _load_settings(args)
    url = redact_url(settings.database.url)

    async def run() -> int:
        connection = await _connect(settings)
        try:
            if migrated:
                # A producer's role may not read batchd.migrations (roles.sql): its `enqueue` goes unchecked.
                with suppress(asyncpg.InsufficientPrivilegeError):
                    await migrate.require_current(connection)
            return await handler(connection, settings, args)
        except BrokenPipeError:
            raise  # standard output's reader left (main); the database's socket fails as a PostgresError
        except asyncpg.InsufficientPrivilegeError as error:
            raise CommandError(_refused(url, connection, error, migrate=not migrated), EX_NOPERM) from None
        except asyncpg.UndefinedTableError as error:
            # Past require_current only when the role may not read batchd.migrations (see above).
            message = f"{url} lacks batchd's tables ({error}); run `batchd migrate`"
            raise CommandError(message, EX_CONFIG) from None
        except (ConnectionError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            if not _connection_lost(error, connection):
                raise
            raise CommandError(f"lost the connection to {url}: {error}", EX_UNAVAILABLE) from None
        finally:
            await connection.close()

    try:
        return asyncio.run(run())
    except migrate.MigrationError as error:
        raise CommandError(f"{url}: {error}", EX_CONFIG) from None


def _refused(url: str, connection: Connection, error: Exception, *, migrate: bool) -> str:
    """What a role without a privilege is told: who it was, where, and who may do it instead."""
    role = connection.get_settings().session_authorization or "this role"
    if migrate:
        fix = "run `batchd migrate` as the database's owner (or a role with CREATE on it)"
    else:
        fix = "grant the role what deploy/sql/roles.sql grants, or use a role that has it"
    return f"{url} refused {role}: {error}; {fix}"


def _connection_lost(error: Exception, connection: Connection) -> bool:
    """Whether `error` says the connection is gone (the server restarted, the session was ended, the network
    broke) rather than that a statement failed."""
    import asyncpg  # noqa: PLC0415 - see the imports above

    if isinstance(error, asyncpg.InterfaceError):  # e.g. ending a transaction on the closed connection
        return connection.is_closed()
    return isinstance(
        error,
        ConnectionError
        | asyncpg.PostgresConnectionError
        | asyncpg.AdminShutdownError
        | asyncpg.CrashShutdownError,
    )


def database_command(handler: Handler, *, migrated: bool = True) -> Callable[[Namespace], int]:
    """`handler` as a parser's `run`: through execute_command."""

    def run(args: Namespace) -> int:
        return execute_command(handler, args, migrated=migrated)

    return run


def _load_settings(args: Namespace) -> Settings:
    from .config import load_settings  # noqa: PLC0415 - see the imports above

    return load_settings(args.config)


async def _connect(settings: Settings) -> asyncpg.Connection:
    from . import store  # noqa: PLC0415 - see the imports above

    try:
        return await store.connect(settings.database.url)
    except store.BadDatabaseUrl as error:
        raise _bad_url(settings, error) from None
    except store.DatabaseUnavailable as error:
        raise _unreachable(settings, error) from None


def _unreachable(settings: Settings, error: Exception) -> CommandError:
    from .redact import redact_url  # noqa: PLC0415 - see the imports above

    return CommandError(f"cannot connect to {redact_url(settings.database.url)}: {error}", EX_UNAVAILABLE)


def _bad_url(settings: Settings, error: Exception) -> CommandError:
    from .redact import redact_url  # noqa: PLC0415 - see the imports above

    url, problem = redact_url(settings.database.url), redact_url(str(error))
    return CommandError(
        f"database.url {url} is not a PostgreSQL URL: {problem}; "
        "fix database.url (or $BATCHD_DATABASE__URL), e.g. postgresql://USER@HOST:5432/DATABASE",
        EX_CONFIG,
    )


def _cannot_listen(host: str, port: int, error: OSError, setting: str) -> CommandError | None:
    """The error of a server that could not bind its port (another process holds it), as one line; None for
    any other OSError, which is not expected."""
    import errno  # noqa: PLC0415 - see the imports above

    if error.errno != errno.EADDRINUSE:
        return None
    return CommandError(
        f"cannot listen on {host}:{port}: the address is already in use (another batchd, an emulator, or "
        f"another server holds it); stop that process or set another {setting}",
        EX_UNAVAILABLE,
    )


# -- the commands without a database connection of their own ------------------------------------------------


def _processing_time(text: str) -> tuple[float, float]:
    """`5` (always five emulated seconds) or `2-8` (drawn from that range)."""
    low, _, high = text.partition("-")
    try:
        return float(low), float(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SECONDS or LOW-HIGH, got {text!r}") from None


def _faults(text: str) -> dict[str, Any]:
    """A fault plan as JSON, or @FILE holding it."""
    raw = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--faults is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--faults must be a JSON object")
    return value


def emulator_config(args: Namespace) -> EmulatorConfig:
    """The settings' [emulator] (batchd.toml, then BATCHD_EMULATOR__*), then the command line's options."""
    import os  # noqa: PLC0415 - see the imports above

    from pydantic import ValidationError  # noqa: PLC0415

    from .config import ConfigError, describe  # noqa: PLC0415
    from .emulator import EmulatorConfig  # noqa: PLC0415

    overrides = {
        "host": args.host,
        "port": args.port,
        "api_key": args.api_key or os.environ.get("BATCHD_EMULATOR_API_KEY"),
        "processing_time_s": args.processing_time,
        "cancel_time_s": args.cancel_time,
        "time_scale": args.time_scale,
        "seed": args.seed,
        "rate_limit_rpm": args.rate_limit_rpm,
        "max_body_bytes": args.max_body_bytes,
        "extra_models": frozenset(args.model) if args.model else None,
        "faults": args.faults,
    }
    values = _load_settings(args).emulator.model_dump(exclude_unset=True)
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return EmulatorConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(describe(error, "emulator.")) from None


def _add_emulator_parser(commands: Any) -> None:
    parser = _add_command(
        commands,
        "emulator",
        help="serve an emulator of the Message Batches API",
        description="Serve an emulator of Anthropic's Message Batches API for development, demos and tests. "
        "Its settings are batchd.toml's [emulator]; these options win over them.",
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8787; 0 picks a free one)")
    parser.add_argument("--api-key", help="the only API key accepted (default: any non-empty key)")
    parser.add_argument(
        "--processing-time",
        type=_processing_time,
        metavar="SECONDS|LOW-HIGH",
        help="emulated seconds a batch takes (default 2-6)",
    )
    parser.add_argument(
        "--cancel-time", type=float, metavar="SECONDS", help="from cancel to ended (default 1)"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        metavar="FACTOR",
        help="emulated seconds per real second; 3600 makes a day pass in 24 s (default 1)",
    )
    parser.add_argument("--seed", type=int, help="make durations, outcomes and faults repeatable")
    parser.add_argument("--rate-limit-rpm", type=int, metavar="N", help="batch calls allowed per minute")
    parser.add_argument("--max-body-bytes", type=int, metavar="N", help="create body limit (default 256 MiB)")
    parser.add_argument("--model", action="append", metavar="NAME", help="accept this model too (repeatable)")
    parser.add_argument("--faults", type=_faults, metavar="JSON|@FILE", help="a fault plan to start with")
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")
    parser.set_defaults(run=run_emulator)


def run_emulator(args: Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above

    import structlog  # noqa: PLC0415

    config = emulator_config(args)
    logger = structlog.get_logger("batchd.emulator")
    try:
        return asyncio.run(_serve_emulator(config, logger, access_log=args.access_log))
    except OSError as error:
        problem = _cannot_listen(config.host, config.port, error, "port (--port, [emulator] port)")
        if problem is None:
            raise
        raise problem from None


async def _serve_emulator(config: EmulatorConfig, logger: Any, *, access_log: bool) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above
    import logging  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from aiohttp.log import access_logger  # noqa: PLC0415

    from .emulator import serve  # noqa: PLC0415

    if access_log:  # the libraries' info lines are off (log.configure); these were asked for
        access_logger.setLevel(logging.INFO)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(config, access_log=access_logger if access_log else None) as emulator:
        logger.info("emulator.listening", url=emulator.url, time_scale=config.time_scale)
        await stop.wait()
    logger.info("emulator.stopped")
    return 0


def _add_demo_parser(commands: Any) -> None:
    parser = _add_command(
        commands,
        "demo",
        help="run everything on this machine: emulator, daemon, a producer",
        description="Start the emulator and the daemon against a demo database (on the configured "
        "PostgreSQL, or an embedded one when none answers), insert jobs for three tenants and show them "
        "finishing.",
    )
    parser.add_argument("--keep", action="store_true", help="keep the demo database afterwards")
    parser.add_argument(
        "--emulator-only", action="store_true", help="only a scripted tour of the emulator with the SDK"
    )
    parser.set_defaults(run=run_demo_command)


def run_demo_command(args: Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above

    from . import log  # noqa: PLC0415
    from .dev.demo import run_demo  # noqa: PLC0415
    from .dev.tour import run_tour  # noqa: PLC0415

    if args.emulator_only:
        asyncio.run(run_tour())
        return 0
    log.configure("warning")  # the demo narrates; the daemon's own log would drown it
    return asyncio.run(run_demo(_load_settings(args), keep=args.keep))


def run_daemon(args: Namespace) -> int:
    """The daemon holds a pool of its own; only its first connection's failure is the command's. It logs its
    start-up at info (daemon.py) before any failure's line, so an operator sees how far it got."""
    import asyncio  # noqa: PLC0415 - see the imports above

    import asyncpg  # noqa: PLC0415

    from .config import config_path  # noqa: PLC0415
    from .daemon import Daemon  # noqa: PLC0415
    from .migrate import MigrationError  # noqa: PLC0415
    from .redact import redact_url  # noqa: PLC0415
    from .store import BadDatabaseUrl, DatabaseUnavailable  # noqa: PLC0415

    settings = _load_settings(args)
    source = config_path(args.config)
    url = redact_url(settings.database.url)
    try:
        asyncio.run(Daemon(settings, config_file=None if source is None else str(source.absolute())).run())
    except BadDatabaseUrl as error:
        raise _bad_url(settings, error) from None
    except DatabaseUnavailable as error:
        raise _unreachable(settings, error) from None
    except MigrationError as error:
        raise CommandError(f"{url}: {error}", EX_CONFIG) from None
    except asyncpg.InsufficientPrivilegeError as error:
        fix = "grant the role what deploy/sql/roles.sql grants (run it again after `batchd migrate`)"
        raise CommandError(f"{url} refused the daemon's role: {error}; {fix}", EX_NOPERM) from None
    except OSError as error:  # after DatabaseUnavailable: the database's own OSErrors are that
        problem = _cannot_listen(settings.http.host, settings.http.port, error, "[http] port")
        if problem is None:
            raise
        raise problem from None
    return 0


# -- the database commands -----------------------------------------------------------------------------------


async def cmd_migrate(conn: Connection, _settings: Settings, _args: Namespace) -> int:
    from . import migrate  # noqa: PLC0415 - see the imports above

    applied = await migrate.migrate(conn)
    if applied:
        for migration in applied:
            print(f"applied {migration.version:04d}_{migration.name}")
    else:
        print("the database is up to date")
    return 0


async def cmd_enqueue(conn: Connection, settings: Settings, args: Namespace) -> int:
    """Prints each job's id, one a line (or, with --json, a JSON object a job), once every job is written;
    says how many on stderr. A bad job: each named on stderr, nothing written, 65."""
    from . import enqueue  # noqa: PLC0415 - see the imports above

    def warn(message: str) -> None:
        print(f"batchd: warning: {message}", file=sys.stderr)

    checker = enqueue.Checker(settings, warn=warn)
    with _jobs_to_enqueue(args, checker) as (jobs, total), _enqueue_failures(args, conn):
        outcome = await enqueue.insert_jobs(
            conn, jobs, progress=None if args.quiet else sys.stderr, total=total, holders=args.json
        )
    if args.json:
        for job_id, added, (tenant, key) in zip(outcome.ids, outcome.added, outcome.keys, strict=True):
            record = {"id": None if job_id is None else str(job_id), "tenant_id": tenant, "enqueued": added}
            print(json.dumps(record if key is None else {**record, "idempotency_key": key}))
    elif not args.quiet:
        for job_id in outcome.ids:
            if job_id is not None:
                print(job_id)
    if not args.quiet:
        skipped = f", skipped {outcome.skipped:,}: their idempotency key is taken" if outcome.skipped else ""
        print(f"enqueued {outcome.inserted:,} job(s){skipped}", file=sys.stderr)
    return 0


@contextmanager
def _enqueue_failures(args: Namespace, conn: Connection) -> Iterator[None]:
    """An enqueue's expected failures, each a CommandError (65): nothing was written."""
    import asyncpg  # noqa: PLC0415 - see the imports above

    from . import enqueue  # noqa: PLC0415

    try:
        yield
    except enqueue.Refused as refused:
        bad, read = refused.outcome.bad, refused.outcome.read
        if read == 1 and args.file is None:
            raise CommandError(f"nothing was enqueued: {bad[0]}", EX_DATAERR) from None
        for problem in bad:
            print(f"batchd: {problem}", file=sys.stderr)
        raise CommandError(
            f"nothing was enqueued: {len(bad):,} bad job(s) of {read:,} read", EX_DATAERR
        ) from None
    except enqueue.BadInput as error:
        raise CommandError(f"nothing was enqueued: {args.file}: {error}", EX_DATAERR) from None
    except UnicodeDecodeError as error:
        raise CommandError(f"nothing was enqueued: {args.file} is not UTF-8: {error}", EX_DATAERR) from None
    except asyncpg.PostgresError as error:
        if _connection_lost(error, conn):
            raise  # execute_command says so
        message = f"nothing was enqueued: the database refused a job: {error}"
        raise CommandError(message, EX_DATAERR) from None


# The options that make the one job of `batchd enqueue` without --file; JSON ones are spliced in as given.
JOB_OPTIONS = {"request": "json", "job_type": "text", "input": "json", "idempotency_key": "text"}


@contextmanager
def _jobs_to_enqueue(args: Namespace, checker: Checker) -> Iterator[tuple[Iterator[Checked], int | None]]:
    """(the jobs, checked, and how many when known): one from the options, or --file's (read as they are
    sent). --tenant, --route, --deadline and --metadata are a file's defaults for jobs without them."""
    from . import enqueue  # noqa: PLC0415 - see the imports above

    try:
        defaults = enqueue.Defaults(
            tenant_id=args.tenant,
            route=args.route,
            deadline=None if args.deadline is None else enqueue.parse_deadline(args.deadline),
            metadata=None if args.metadata is None else _json_option("metadata", args.metadata),
        )
    except enqueue.BadJob as error:
        raise CommandError(f"nothing was enqueued: --deadline: {error}", EX_DATAERR) from None
    if args.file is None:
        members: dict[str, str] = {}
        for key, kind in JOB_OPTIONS.items():
            value = getattr(args, key)
            if value is not None:
                members[key] = _json_option(key, value) if kind == "json" else json.dumps(value)
        if args.tenant is None:
            raise CommandError("nothing was enqueued: --tenant is required (the job's tenant_id)", EX_DATAERR)
        yield iter([(None, enqueue.check_text(enqueue.job_text(members), checker, defaults))]), 1
        return
    given = [f"--{key.replace('_', '-')}" for key in JOB_OPTIONS if getattr(args, key) is not None]
    if given:
        raise CommandError(
            f"{', '.join(given)} make(s) one job and cannot go with --file (a file's jobs say it themselves)",
            EX_DATAERR,
        )
    if args.file == "-":
        yield enqueue.read_jobs(sys.stdin, checker, defaults), None
        return
    try:
        total = enqueue.count_jobs(args.file)
        stream = open(args.file, encoding="utf-8")  # noqa: SIM115, PTH123 - closed below
    except OSError as error:
        raise CommandError(
            f"nothing was enqueued: cannot read {args.file}: {error.strerror}", EX_DATAERR
        ) from None
    with stream:
        yield enqueue.read_jobs(stream, checker, defaults), total


def _json_option(key: str, text: str) -> str:
    """An option's JSON text, as given, once it reads as JSON the database can store (and for --metadata, as
    an object)."""
    from . import enqueue  # noqa: PLC0415 - see the imports above

    try:
        if not isinstance(enqueue.loads(text), dict) and key == "metadata":
            raise CommandError("nothing was enqueued: --metadata must be a JSON object", EX_DATAERR)
    except ValueError as error:  # json.JSONDecodeError is one
        raise CommandError(
            f"nothing was enqueued: --{key.replace('_', '-')} is not JSON: {error}", EX_DATAERR
        ) from None
    except RecursionError:
        raise CommandError(
            f"nothing was enqueued: --{key.replace('_', '-')} is nested too deeply", EX_DATAERR
        ) from None
    return text


async def cmd_status(conn: Connection, _settings: Settings, args: Namespace) -> int:
    from . import status  # noqa: PLC0415 - see the imports above

    report = await status.collect(conn, args.window)
    print(status.to_json(report) if args.json else status.render(report))
    return 0


def _window(text: str) -> float:
    """`status --window`: a duration as `report --since` takes one (30m, 2h, 1d), or plain seconds."""
    from .text import parse_duration  # noqa: PLC0415 - the standard library only

    seconds = parse_duration(text)
    if seconds is None:
        try:
            seconds = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a duration like 30m, 2h, 1d (or seconds), got {text!r}"
            ) from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return seconds


async def cmd_cancel(conn: Connection, _settings: Settings, args: Namespace) -> int:
    import uuid  # noqa: PLC0415 - see the imports above

    from .store import sql  # noqa: PLC0415

    try:
        job_id = uuid.UUID(args.job_id)
    except ValueError:
        raise CommandError(f"{args.job_id!r} is not a job id (a UUID)", EX_DATAERR) from None
    if await conn.fetchval(sql("cancel_job"), job_id):
        print(f"canceled {job_id}")
        return 0
    job = await conn.fetchrow(sql("get_job"), job_id)
    if job is None:
        raise CommandError(f"no job {job_id}")
    raise CommandError(f"job {job_id} is {job['status']}; only a queued job can be canceled")


async def cmd_tenant_add(conn: Connection, _settings: Settings, args: Namespace) -> int:
    from . import tenants  # noqa: PLC0415 - see the imports above

    try:
        token = await tenants.add_tenant(conn, args.name)
    except ValueError as error:
        raise CommandError(str(error), EX_DATAERR) from None
    print(token)
    print(f"a new token for tenant {args.name!r}: it is shown this once", file=sys.stderr)
    return 0


async def cmd_tenant_list(conn: Connection, _settings: Settings, _args: Namespace) -> int:
    from . import tenants  # noqa: PLC0415 - see the imports above

    print(tenants.render_list(await tenants.list_tenants(conn)))
    return 0


async def cmd_tenant_revoke(conn: Connection, _settings: Settings, args: Namespace) -> int:
    from . import tenants  # noqa: PLC0415 - see the imports above

    revoked = await tenants.revoke(conn, args.name)
    if revoked == 0:
        raise CommandError(f"tenant {args.name!r} has no active token")
    print(f"revoked {revoked} token(s) of {args.name!r}")
    return 0


# `batchd tenant set NAME [options]`: every per-tenant setting. An option not given is not in the namespace
# at all (default=SUPPRESS), so "not given" (left as it is) and `none` (None: removed) stay apart.
CLEAR = "none"
OVER_BUDGET = ("hold", "fail")  # budgets.OVER_BUDGET (tests/test_cli.py checks they agree)
BUDGET_OPTIONS = {"budget_day": "day", "budget_month": "month", "over_budget": "over_budget"}
LIMIT_OPTIONS = ("weight", "max_queued", "max_in_flight")


def _usd(text: str) -> Decimal | None:
    """A budget in USD (`12.50`), or `none` to remove it."""
    if text.strip().lower() == CLEAR:
        return None
    try:
        value = Decimal(text.strip().removeprefix("$"))
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"expected an amount in USD or {CLEAR!r}, got {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"a budget must be a non-negative amount, got {text!r}")
    return value


def _count(minimum: int, maximum: int | None = None) -> Any:
    def parse(text: str) -> int | None:
        if text.strip().lower() == CLEAR:
            return None
        try:
            value = int(text.strip().replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number or {CLEAR!r}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else f" and at most {maximum}"
            raise argparse.ArgumentTypeError(f"expected at least {minimum}{upper}, got {text!r}")
        return value

    return parse


def _add_tenant_set_parser(tenant_actions: Any) -> None:
    parser = _add_command(
        tenant_actions,
        "set",
        help="change a tenant's settings (budgets, weight, limits); adds the tenant if new",
        description="Change a tenant's settings; options not given stay as they are.",
    )
    parser.add_argument("name", metavar="NAME", help="the tenant: the jobs' tenant_id")
    unset = argparse.SUPPRESS
    budget = parser.add_argument_group("budgets (USD, per UTC day and month; `none` removes one)")
    budget.add_argument("--budget-day", type=_usd, default=unset, metavar="USD", help="the most spent a day")
    budget.add_argument(
        "--budget-month", type=_usd, default=unset, metavar="USD", help="the most spent a month"
    )
    budget.add_argument(
        "--over-budget",
        choices=OVER_BUDGET,
        default=unset,
        help="over budget, hold the tenant's queued jobs until the budget allows (default), or fail them",
    )
    limits = parser.add_argument_group(
        "sharing and limits (`none` goes back to batchd.toml's [tenants.NAME] or [tenant_defaults])"
    )
    for option, kind, text in (
        ("--weight", _count(1, 10_000), "its share of a batch when several tenants are queued (default 1)"),
        ("--max-queued", _count(0), "the most queued jobs; an INSERT past it is refused by the database"),
        ("--max-in-flight", _count(0), "the most of its requests in open batches; past it its jobs wait"),
    ):
        limits.add_argument(option, type=kind, default=unset, metavar="N", help=text)
    parser.set_defaults(run=database_command(cmd_tenant_set))


async def cmd_tenant_set(conn: Connection, _settings: Settings, args: Namespace) -> int:
    from . import budgets, fairness  # noqa: PLC0415 - see the imports above
    from .store import sql  # noqa: PLC0415

    if not args.name or args.name != args.name.strip():
        raise CommandError("a tenant name must be non-empty, without surrounding spaces", EX_DATAERR)
    budget = {setting: getattr(args, key) for key, setting in BUDGET_OPTIONS.items() if key in args}
    limits = {key: getattr(args, key) for key in LIMIT_OPTIONS if key in args}
    if not budget and not limits:
        raise CommandError("nothing to set (see batchd tenant set --help)", EX_DATAERR)
    async with conn.transaction():
        if budget:
            await budgets.set_budget(conn, args.name, **budget)
        if limits:
            await fairness.set_limits(conn, args.name, **limits)
    # Held or released at once (the daemons are woken too), so `batchd status` shows the verdict.
    await budgets.check(conn)
    for row in await conn.fetch(sql("tenant_budgets")):
        if row["tenant_id"] == args.name:
            print(budgets.describe({**row, "name": args.name}))
            break
    else:
        print(f"{args.name}: no budget")
    print(fairness.describe(args.name, await fairness.limits_of(conn, args.name)))
    return 0


async def cmd_webhook_add(conn: Connection, settings: Settings, args: Namespace) -> int:
    from . import webhooks  # noqa: PLC0415 - see the imports above
    from .targets import TargetPolicy, TargetRefused  # noqa: PLC0415

    try:
        types = webhooks.parse_event_types(args.events)
        endpoint_id, secret = await webhooks.add_endpoint(
            conn,
            args.tenant,
            args.url,
            types,
            TargetPolicy.from_settings(settings.webhooks),
            max_endpoints=settings.webhooks.max_endpoints_per_tenant,
        )
    except TargetRefused as error:
        raise CommandError(f"refused {args.url!r}: {error}", EX_DATAERR) from None
    except webhooks.TooManyEndpoints as error:
        raise CommandError(str(error)) from None
    except ValueError as error:
        raise CommandError(str(error), EX_DATAERR) from None
    if args.json:
        print(json.dumps({"id": endpoint_id, "tenant_id": args.tenant, "url": args.url, "secret": secret}))
    else:
        print(f"endpoint {endpoint_id}")
        print(f"secret {secret}")
    print(
        f"webhook endpoint {endpoint_id} for tenant {args.tenant!r}: its secret is shown this once",
        file=sys.stderr,
    )
    return 0


async def cmd_webhook_list(conn: Connection, _settings: Settings, args: Namespace) -> int:
    from . import webhooks  # noqa: PLC0415 - see the imports above

    rows = await webhooks.list_endpoints(conn, args.tenant)
    if args.json:
        print(json.dumps(rows, default=_json_default))
    else:
        print(webhooks.render_endpoints(rows))
    return 0


async def cmd_webhook_remove(conn: Connection, _settings: Settings, args: Namespace) -> int:
    from . import webhooks  # noqa: PLC0415 - see the imports above

    if not await webhooks.remove_endpoint(conn, args.endpoint):
        raise CommandError(f"no webhook endpoint {args.endpoint}")
    print(f"removed webhook endpoint {args.endpoint} and its delivery log")
    return 0


async def cmd_webhook_log(conn: Connection, _settings: Settings, args: Namespace) -> int:
    from . import webhooks  # noqa: PLC0415 - see the imports above

    if not any(row["id"] == args.endpoint for row in await webhooks.list_endpoints(conn, None)):
        raise CommandError(f"no webhook endpoint {args.endpoint}")
    rows = await webhooks.deliveries(conn, args.endpoint, args.limit, args.status)
    if args.json:
        print(json.dumps(rows, default=_json_default))
    else:
        print(webhooks.render_deliveries(rows))
    return 0


async def cmd_webhook_retry(conn: Connection, _settings: Settings, args: Namespace) -> int:
    from . import webhooks  # noqa: PLC0415 - see the imports above

    if args.delivery is not None:
        endpoint = await webhooks.retry_delivery(conn, args.delivery)
        if endpoint is None:
            raise CommandError(f"no webhook delivery {args.delivery}, or an attempt of it is in flight")
        print(f"delivery {args.delivery} will be sent again; endpoint {endpoint} is enabled")
        return 0
    if args.endpoint is None:
        raise CommandError("name an endpoint, or --delivery ID", EX_DATAERR)
    retried = await webhooks.retry_endpoint(conn, args.endpoint)
    if retried is None:
        raise CommandError(f"no webhook endpoint {args.endpoint}")
    print(f"endpoint {args.endpoint} is enabled; {retried} dead deliveries will be sent again")
    return 0


def _json_default(value: object) -> str:
    from datetime import datetime  # noqa: PLC0415 - see the imports above

    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _positive_id(text: str) -> int:
    """An id (a bigserial) or a count: a whole number from 1 to 2^63 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 2^63 - 1, got {text!r}")
    return value


def _add_webhook_parsers(commands: Any) -> None:
    parser = _add_command(
        commands, "webhook", help="tenants' webhook endpoints and their deliveries (docs/webhooks.md)"
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = _add_command(
        actions,
        "add",
        help="add an endpoint for a tenant; prints its id and its secret, once",
        description="Add a webhook endpoint: the tenant's events from now on are POSTed to URL, signed as "
        "the Standard Webhooks specification says. The URL must be http(s) and resolve to public addresses "
        "only (unless [webhooks] allows more).",
    )
    add.add_argument("tenant", metavar="TENANT", help="the tenant: the jobs' tenant_id")
    add.add_argument("url", metavar="URL", help="where the events go (http:// or https://)")
    add.add_argument(
        "--events", metavar="TYPES", help="only these event types, comma-separated (default: every type)"
    )
    add.add_argument(
        "--json", action="store_true", help='one JSON object: {"id", "tenant_id", "url", "secret"}'
    )
    add.set_defaults(run=database_command(cmd_webhook_add))

    listing = _add_command(actions, "list", help="the endpoints (of one tenant), with their state")
    listing.add_argument("tenant", metavar="TENANT", nargs="?", help="one tenant only")
    listing.add_argument("--json", action="store_true", help="a JSON array of endpoints (without secrets)")
    listing.set_defaults(run=database_command(cmd_webhook_list))

    remove = _add_command(actions, "remove", help="remove an endpoint and its delivery log")
    remove.add_argument("endpoint", metavar="ENDPOINT", type=_positive_id, help="the endpoint's id")
    remove.set_defaults(run=database_command(cmd_webhook_remove))

    log_parser = _add_command(actions, "log", help="an endpoint's deliveries, newest first")
    log_parser.add_argument("endpoint", metavar="ENDPOINT", type=_positive_id, help="the endpoint's id")
    log_parser.add_argument("--status", choices=("pending", "delivered", "dead"), help="this status only")
    log_parser.add_argument(
        "--limit", type=_positive_id, default=50, metavar="N", help="at most N (default 50)"
    )
    log_parser.add_argument("--json", action="store_true", help="a JSON array of deliveries")
    log_parser.set_defaults(run=database_command(cmd_webhook_log))

    retry = _add_command(
        actions,
        "retry",
        help="re-enable an endpoint and send its dead deliveries again (or one delivery)",
        description="Re-enable an endpoint and send its dead deliveries again from their first attempt; "
        "with --delivery, send that one delivery again (whatever became of it) and re-enable its endpoint.",
    )
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "endpoint", metavar="ENDPOINT", type=_positive_id, nargs="?", help="the endpoint's id"
    )
    target.add_argument("--delivery", metavar="ID", type=_positive_id, help="one delivery's id (from `log`)")
    retry.set_defaults(run=database_command(cmd_webhook_retry))


async def cmd_report(conn: Connection, _settings: Settings, args: Namespace) -> int:
    from . import report  # noqa: PLC0415 - see the imports above

    try:
        since = None if args.since is None else report.parse_since(args.since)
    except ValueError as error:
        raise CommandError(str(error), EX_DATAERR) from None
    render = report.RENDER_CACHE if args.cache else report.RENDER
    collected = await report.collect(conn, since, args.tenant)
    for warning in await report.warnings(conn, collected):
        print(f"batchd: warning: {warning}", file=sys.stderr)
    print(render[args.format](collected))
    return 0


REPORT_FORMATS = ("csv", "json", "table")  # report.RENDER's keys (tests/test_cli.py checks they agree)
ROUTES = ("batch", "sync", "auto")  # enqueue.ROUTES (the same test)


def _add_report_parser(commands: Any) -> None:
    parser = _add_command(
        commands,
        "report",
        help="costs and savings per tenant and model, from the ledger",
        description="What the ledger recorded per tenant and model: jobs, tokens, cost at batch prices, the "
        "same calls' cost through the synchronous API, and what batching saved; with totals. Then the "
        "prompt cache per job type: its reads and writes, and the hit ratio, cache read / (input + cache "
        "writes + cache read).",
    )
    parser.add_argument(
        "--since", metavar="WHEN", help="7d, 12h, 30m, 2w ago, or an ISO date (UTC); default: everything"
    )
    parser.add_argument("--tenant", metavar="T", help="one tenant only")
    parser.add_argument("--format", choices=REPORT_FORMATS, default="table", help="default: table")
    parser.add_argument(
        "--cache", action="store_true", help="only the prompt cache per job type (a CSV holds one table)"
    )
    parser.set_defaults(run=database_command(cmd_report))


def _add_database_parsers(commands: Any) -> None:
    run = _add_command(commands, "run", help="run the daemon", description="Run the batchd daemon.")
    run.set_defaults(run=run_daemon)

    migrate_parser = _add_command(commands, "migrate", help="create or upgrade batchd's schema")
    migrate_parser.set_defaults(run=database_command(cmd_migrate, migrated=False))

    enqueue_parser = _add_command(
        commands,
        "enqueue",
        help="queue one job, or a file of jobs; prints their ids",
        description="Queue jobs as a producer would, each checked first as the daemon will check it (a job "
        "type of this batchd.toml and its fields, a request's shape, its size): any bad job, and nothing is "
        "written (exit status 65). One job from the options, or --file: JSON lines (one job a line) or a "
        'JSON array of jobs, each {"tenant_id", "request"} or {"tenant_id", "job_type", "input"}, with '
        'optional "metadata", "idempotency_key", "deadline", "route". Prints the id of each job written, '
        "one a line, in order.",
    )
    enqueue_parser.add_argument("--tenant", help="the tenant (for a file: the default for jobs without one)")
    enqueue_parser.add_argument("--request", metavar="JSON", help="Messages API params")
    enqueue_parser.add_argument("--job-type", metavar="NAME", help="a job type from batchd.toml")
    enqueue_parser.add_argument("--input", metavar="JSON", help="the job type's input")
    enqueue_parser.add_argument(
        "--metadata", metavar="JSON", help="a JSON object, returned untouched with the result"
    )
    enqueue_parser.add_argument("--idempotency-key", metavar="KEY", help="unique per tenant")
    enqueue_parser.add_argument(
        "--deadline", metavar="WHEN", help="by when the result is wanted: an ISO 8601 time with a zone, or 2h"
    )
    enqueue_parser.add_argument(
        "--route", choices=ROUTES, help="batch (the default), sync (at once, at the full price) or auto"
    )
    enqueue_parser.add_argument(
        "--file", metavar="PATH", help="JSON lines or a JSON array of jobs (- for standard input)"
    )
    output = enqueue_parser.add_mutually_exclusive_group()
    output.add_argument(
        "--json",
        action="store_true",
        help='a JSON object a job, in order: {"id", "tenant_id", "enqueued", "idempotency_key"}; a job '
        "skipped for its idempotency key has the id of the job holding it",
    )
    output.add_argument("--quiet", action="store_true", help="print nothing but errors and warnings")
    enqueue_parser.set_defaults(run=database_command(cmd_enqueue))

    status_parser = _add_command(commands, "status", help="queued jobs, open batches, recent outcomes")
    status_parser.add_argument("--json", action="store_true", help="machine-readable output")
    status_parser.add_argument(
        "--window",
        type=_window,
        default=3600.0,
        metavar="DURATION",
        help="jobs finished within this long (30m, 2h, 1d, or seconds), from the start of its UTC hour; "
        "default 1h",
    )
    status_parser.set_defaults(run=database_command(cmd_status))

    tenant_parser = _add_command(commands, "tenant", help="tenants' tokens for batchd's HTTP API")
    tenant_actions = tenant_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text, handler in (
        ("add", "add a tenant (or another token for it); prints the token once", cmd_tenant_add),
        ("revoke", "revoke every token of a tenant", cmd_tenant_revoke),
    ):
        action_parser = _add_command(tenant_actions, action, help=text)
        action_parser.add_argument("name", metavar="NAME", help="the tenant: the jobs' tenant_id")
        action_parser.set_defaults(run=database_command(handler))
    list_parser = _add_command(
        tenant_actions, "list", help="every tenant with a token or jobs: its tokens and its jobs per status"
    )
    list_parser.set_defaults(run=database_command(cmd_tenant_list))
    _add_tenant_set_parser(tenant_actions)
    _add_webhook_parsers(commands)
    _add_report_parser(commands)

    cancel_parser = _add_command(commands, "cancel", help="cancel a queued job")
    cancel_parser.add_argument("job_id", metavar="JOB_ID")
    cancel_parser.set_defaults(run=database_command(cmd_cancel))


# -- the parser ----------------------------------------------------------------------------------------------


def _add_global_options(parser: argparse.ArgumentParser, *, on_root: bool) -> None:
    """The options every command takes, before or after its name. A subcommand's parser fills a namespace of
    its own that argparse then copies over the root's: there they default to SUPPRESS, so an option given
    before the command is not overwritten by the subcommand's default."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None if on_root else argparse.SUPPRESS,
        help="configuration file (default: $BATCHD_CONFIG, else ./batchd.toml)",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info" if on_root else argparse.SUPPRESS,
        help="the least level logged (default info)",
    )


_COMMAND_OPTIONS = argparse.ArgumentParser(add_help=False)
_add_global_options(_COMMAND_OPTIONS, on_root=False)


def _add_command(commands: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, parents=[_COMMAND_OPTIONS], **kwargs)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"batchd {__version__}")
    _add_global_options(parser, on_root=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_database_parsers(commands)
    _add_emulator_parser(commands)
    _add_demo_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a reader that left is caught, rather than at the interpreter's exit
    except BrokenPipeError:
        _discard_stdout()
        return EX_PIPE
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)  # argparse's own output (--help) ignores a broken pipe itself
    from . import log  # noqa: PLC0415 - see the imports above
    from .config import ConfigError  # noqa: PLC0415

    log.configure(args.log_level)
    try:
        code: int = args.run(args)
    except ConfigError as error:
        print(f"batchd: configuration error: {error}", file=sys.stderr)
        return EX_CONFIG
    except CommandError as error:
        print(f"batchd: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 0
    return code


def _discard_stdout() -> None:
    """Points standard output at /dev/null, so the interpreter's last flush of what is still buffered does
    not fail a second time (the convention of Python's documentation on SIGPIPE)."""
    import os  # noqa: PLC0415 - see the imports above

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
