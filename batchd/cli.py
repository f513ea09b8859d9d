"""The `batchd` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

# Only the standard library is imported before a command runs: `batchd --help` and `--version` answer without
# loading the SDK, aiohttp, asyncpg or pydantic (bench/cli_start.py measures it). Each handler imports what it
# uses, so `status` or `report` do not pay for the SDK either.
if TYPE_CHECKING:
    import asyncpg

    from .config import Settings
    from .emulator import EmulatorConfig

EX_CONFIG = 78  # sysexits: bad configuration; systemd is told not to restart on it
EX_DATAERR = 65  # sysexits: bad input data
EX_UNAVAILABLE = 69  # sysexits: a service (the database) is not available


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


def emulator_config(args: argparse.Namespace) -> EmulatorConfig:
    """[emulator] from the config file, then the command line's options over it."""
    import os  # noqa: PLC0415 - see the imports above

    from pydantic import ValidationError  # noqa: PLC0415

    from .config import ConfigError, config_path, describe, read_toml  # noqa: PLC0415
    from .emulator import EmulatorConfig  # noqa: PLC0415

    values = read_toml(config_path(args.config)).get("emulator", {})
    if not isinstance(values, dict):
        raise ConfigError("[emulator] must be a table")
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
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return EmulatorConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(describe(error, "emulator.")) from None


def _add_emulator_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "emulator",
        help="serve an emulator of the Message Batches API",
        description="Serve an emulator of Anthropic's Message Batches API for development, demos and tests.",
    )
    parser.add_argument("--config", help="configuration file (default: $BATCHD_CONFIG, else ./batchd.toml)")
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


def run_emulator(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above

    import structlog  # noqa: PLC0415

    config = emulator_config(args)
    logger = structlog.get_logger("batchd.emulator")
    return asyncio.run(_serve_emulator(config, logger, access_log=args.access_log))


async def _serve_emulator(config: EmulatorConfig, logger: Any, *, access_log: bool) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above
    import signal  # noqa: PLC0415

    from aiohttp.log import access_logger  # noqa: PLC0415

    from .emulator import serve  # noqa: PLC0415

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
    parser = commands.add_parser(
        "demo",
        help="run everything on this machine: emulator, daemon, a producer",
        description="Start the emulator and the daemon against a demo database (on the configured "
        "PostgreSQL, or an embedded one when none answers), insert jobs for three tenants and show them "
        "finishing.",
    )
    _add_config_option(parser)
    parser.add_argument("--keep", action="store_true", help="keep the demo database afterwards")
    parser.add_argument(
        "--emulator-only", action="store_true", help="only a scripted tour of the emulator with the SDK"
    )
    parser.set_defaults(run=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above

    from . import log  # noqa: PLC0415
    from .dev.demo import run_demo  # noqa: PLC0415
    from .dev.tour import run_tour  # noqa: PLC0415

    if args.emulator_only:
        asyncio.run(run_tour())
        return 0
    log.configure("warning")  # the demo narrates; the daemon's own log would drown it
    return asyncio.run(run_demo(_settings(args), keep=args.keep))


def _settings(args: argparse.Namespace) -> Settings:
    from .config import load_settings  # noqa: PLC0415 - see the imports above

    return load_settings(args.config)


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="configuration file (default: $BATCHD_CONFIG, else ./batchd.toml)")


def run_daemon(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above

    from .daemon import Daemon  # noqa: PLC0415

    settings = _settings(args)
    asyncio.run(Daemon(settings).run())
    return 0


async def _connect(settings: Settings) -> asyncpg.Connection:
    import asyncpg  # noqa: PLC0415 - see the imports above

    from .redact import redact_url  # noqa: PLC0415
    from .store import init_connection  # noqa: PLC0415

    try:
        connection: asyncpg.Connection = await asyncpg.connect(settings.database.url)
    except (OSError, asyncpg.PostgresError) as error:
        raise DatabaseUnavailable(f"cannot connect to {redact_url(settings.database.url)}: {error}") from None
    await init_connection(connection)
    return connection


class DatabaseUnavailable(Exception):  # noqa: N818 - reads as the condition it reports
    pass


def run_migrate(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above

    from . import migrate  # noqa: PLC0415

    async def go() -> list[migrate.Migration]:
        connection = await _connect(_settings(args))
        try:
            return await migrate.migrate(connection)
        finally:
            await connection.close()

    applied = asyncio.run(go())
    if applied:
        for migration in applied:
            print(f"applied {migration.version:04d}_{migration.name}")
    else:
        print("the database is up to date")
    return 0


def run_enqueue(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above

    import asyncpg  # noqa: PLC0415

    from . import enqueue  # noqa: PLC0415

    if args.file is not None:
        total = enqueue.count_lines(args.file) if args.file != "-" else None
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115, PTH123
        jobs = enqueue.read_jsonl(stream, args.tenant)
    else:
        job: dict[str, Any] = {"tenant_id": args.tenant}
        for key in ("request", "input", "metadata"):
            value = getattr(args, key)
            if value is not None:
                try:
                    job[key] = json.loads(value)
                except json.JSONDecodeError as error:
                    print(f"batchd: --{key} is not JSON: {error}", file=sys.stderr)
                    return EX_DATAERR
        for key in ("job_type", "idempotency_key", "deadline"):
            if getattr(args, key) is not None:
                job[key] = getattr(args, key)
        total, stream = 1, None
        try:
            jobs = iter([enqueue.parse_job(job)])
        except enqueue.BadJob as error:
            print(f"batchd: nothing was enqueued: {error}", file=sys.stderr)
            return EX_DATAERR

    async def go() -> tuple[int, int]:
        connection = await _connect(_settings(args))
        try:
            return await enqueue.insert_jobs(connection, jobs, progress=sys.stderr, total=total)
        finally:
            await connection.close()

    try:
        inserted, skipped = asyncio.run(go())
    except enqueue.BadJob as error:
        print(f"batchd: nothing was enqueued: {error}", file=sys.stderr)
        return EX_DATAERR
    except asyncpg.PostgresError as error:
        print(f"batchd: nothing was enqueued: the database refused a job: {error}", file=sys.stderr)
        return EX_DATAERR
    finally:
        if stream is not None and stream is not sys.stdin:
            stream.close()
    print(
        f"enqueued {inserted} job(s)"
        + (f", skipped {skipped} already queued (same idempotency key)" if skipped else "")
    )
    return 0


def run_status(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above

    from . import status  # noqa: PLC0415

    async def go() -> dict[str, Any]:
        connection = await _connect(_settings(args))
        try:
            return await status.collect(connection, args.window)
        finally:
            await connection.close()

    report = asyncio.run(go())
    print(json.dumps(report, indent=2, default=str) if args.json else status.render(report))
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above
    import uuid  # noqa: PLC0415

    from .store import sql  # noqa: PLC0415

    try:
        job_id = uuid.UUID(args.job_id)
    except ValueError:
        print(f"batchd: {args.job_id!r} is not a job id (a UUID)", file=sys.stderr)
        return EX_DATAERR

    async def go() -> tuple[bool, str | None]:
        connection = await _connect(_settings(args))
        try:
            canceled = await connection.fetchval(sql("cancel_job"), job_id)
            job = await connection.fetchrow(sql("get_job"), job_id)
            return bool(canceled), None if job is None else job["status"]
        finally:
            await connection.close()

    canceled, current = asyncio.run(go())
    if canceled:
        print(f"canceled {job_id}")
        return 0
    if current is None:
        print(f"batchd: no job {job_id}", file=sys.stderr)
    else:
        print(f"batchd: job {job_id} is {current}; only a queued job can be canceled", file=sys.stderr)
    return 1


def run_tenant(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above

    from . import tenants  # noqa: PLC0415

    async def go() -> int:
        connection = await _connect(_settings(args))
        try:
            if args.action == "add":
                try:
                    token = await tenants.add_tenant(connection, args.name)
                except ValueError as error:
                    print(f"batchd: {error}", file=sys.stderr)
                    return EX_DATAERR
                print(token)
                print(f"a new token for tenant {args.name!r}: it is shown this once", file=sys.stderr)
            elif args.action == "list":
                for row in await tenants.list_tenants(connection):
                    print(f"{row['name']}\t{row['active_tokens']} active\t{row['revoked_tokens']} revoked")
            else:
                revoked = await tenants.revoke(connection, args.name)
                if revoked == 0:
                    print(f"batchd: tenant {args.name!r} has no active token", file=sys.stderr)
                    return 1
                print(f"revoked {revoked} token(s) of {args.name!r}")
            return 0
        finally:
            await connection.close()

    return asyncio.run(go())


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
    parser = tenant_actions.add_parser(
        "set",
        help="change a tenant's settings (budgets, weight, limits); adds the tenant if new",
        description="Change a tenant's settings; options not given stay as they are.",
    )
    _add_config_option(parser)
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
    limits.add_argument(
        "--weight",
        type=_count(1, 10_000),
        default=unset,
        metavar="N",
        help="its share of a batch when several tenants are queued (default 1)",
    )
    limits.add_argument(
        "--max-queued",
        type=_count(0),
        default=unset,
        metavar="N",
        help="the most queued jobs; an INSERT past it is refused by the database",
    )
    limits.add_argument(
        "--max-in-flight",
        type=_count(0),
        default=unset,
        metavar="N",
        help="the most of its requests in open batches; past it its jobs wait",
    )
    parser.set_defaults(run=run_tenant_set)


def run_tenant_set(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above

    from . import budgets, fairness  # noqa: PLC0415
    from .store import sql  # noqa: PLC0415

    if not args.name or args.name != args.name.strip():
        print("batchd: a tenant name must be non-empty, without surrounding spaces", file=sys.stderr)
        return EX_DATAERR
    budget = {setting: getattr(args, key) for key, setting in BUDGET_OPTIONS.items() if key in args}
    limits = {key: getattr(args, key) for key in LIMIT_OPTIONS if key in args}
    if not budget and not limits:
        print("batchd: nothing to set (see batchd tenant set --help)", file=sys.stderr)
        return EX_DATAERR

    async def go() -> int:
        connection = await _connect(_settings(args))
        try:
            async with connection.transaction():
                if budget:
                    await budgets.set_budget(connection, args.name, **budget)
                if limits:
                    await fairness.set_limits(connection, args.name, **limits)
            # Held or released at once (the daemons are woken too), so `batchd status` shows the verdict.
            await budgets.check(connection)
            for row in await connection.fetch(sql("tenant_budgets")):
                if row["tenant_id"] == args.name:
                    print(budgets.describe({**row, "name": args.name}))
                    break
            else:
                print(f"{args.name}: no budget")
            print(fairness.describe(args.name, await fairness.limits_of(connection, args.name)))
            return 0
        finally:
            await connection.close()

    return asyncio.run(go())


def run_report(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - see the imports above

    from . import report  # noqa: PLC0415

    try:
        since = None if args.since is None else report.parse_since(args.since)
    except ValueError as error:
        print(f"batchd: {error}", file=sys.stderr)
        return EX_DATAERR

    async def go() -> dict[str, Any]:
        connection = await _connect(_settings(args))
        try:
            return await report.collect(connection, since, args.tenant)
        finally:
            await connection.close()

    render = report.RENDER_CACHE if args.cache else report.RENDER
    print(render[args.format](asyncio.run(go())))
    return 0


REPORT_FORMATS = ("csv", "json", "table")  # report.RENDER's keys (tests/test_cli.py checks they agree)


def _add_report_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "report",
        help="costs and savings per tenant and model, from the ledger",
        description="What the ledger recorded per tenant and model: jobs, tokens, cost at batch prices, the "
        "same calls' cost through the synchronous API, and what batching saved; with totals. Then the "
        "prompt cache per job type: its reads and writes, and the hit ratio, cache read / (input + cache "
        "writes + cache read).",
    )
    _add_config_option(parser)
    parser.add_argument(
        "--since", metavar="WHEN", help="7d, 12h, 30m, 2w ago, or an ISO date (UTC); default: everything"
    )
    parser.add_argument("--tenant", metavar="T", help="one tenant only")
    parser.add_argument("--format", choices=REPORT_FORMATS, default="table", help="default: table")
    parser.add_argument(
        "--cache", action="store_true", help="only the prompt cache per job type (a CSV holds one table)"
    )
    parser.set_defaults(run=run_report)


def _add_daemon_parsers(commands: Any) -> None:
    run = commands.add_parser("run", help="run the daemon", description="Run the batchd daemon.")
    _add_config_option(run)
    run.set_defaults(run=run_daemon)

    migrate_parser = commands.add_parser("migrate", help="create or upgrade batchd's schema")
    _add_config_option(migrate_parser)
    migrate_parser.set_defaults(run=run_migrate)

    enqueue_parser = commands.add_parser(
        "enqueue",
        help="queue one job, or a JSONL file of jobs",
        description="Queue jobs as a producer would. One job from the options, or --file with one JSON job a "
        'line: {"tenant_id", "request"} or {"tenant_id", "job_type", "input"}, with optional "metadata", '
        '"idempotency_key", "deadline".',
    )
    _add_config_option(enqueue_parser)
    enqueue_parser.add_argument("--tenant", help="the tenant (for a file: the default for lines without one)")
    enqueue_parser.add_argument("--request", metavar="JSON", help="Messages API params")
    enqueue_parser.add_argument("--job-type", metavar="NAME", help="a job type from batchd.toml")
    enqueue_parser.add_argument("--input", metavar="JSON", help="the job type's input")
    enqueue_parser.add_argument("--metadata", metavar="JSON", help="returned untouched with the result")
    enqueue_parser.add_argument("--idempotency-key", metavar="KEY", help="unique per tenant")
    enqueue_parser.add_argument("--deadline", metavar="ISO8601", help="by when the result is wanted")
    enqueue_parser.add_argument("--file", metavar="PATH", help="a JSONL file of jobs (- for standard input)")
    enqueue_parser.set_defaults(run=run_enqueue)

    status_parser = commands.add_parser("status", help="queued jobs, open batches, recent outcomes")
    _add_config_option(status_parser)
    status_parser.add_argument("--json", action="store_true", help="machine-readable output")
    status_parser.add_argument(
        "--window", type=float, default=3600.0, metavar="SECONDS", help="recent = this long"
    )
    status_parser.set_defaults(run=run_status)

    tenant_parser = commands.add_parser("tenant", help="tenants' tokens for batchd's HTTP API")
    tenant_actions = tenant_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("add", "add a tenant (or another token for it); prints the token once"),
        ("revoke", "revoke every token of a tenant"),
    ):
        action_parser = tenant_actions.add_parser(action, help=text)
        _add_config_option(action_parser)
        action_parser.add_argument("name", metavar="NAME", help="the tenant: the jobs' tenant_id")
    _add_config_option(tenant_actions.add_parser("list", help="tenants and how many tokens each has"))
    tenant_parser.set_defaults(run=run_tenant)
    _add_tenant_set_parser(tenant_actions)  # after: its own `run` wins over the group's
    _add_report_parser(commands)

    cancel_parser = commands.add_parser("cancel", help="cancel a queued job")
    _add_config_option(cancel_parser)
    cancel_parser.add_argument("job_id", metavar="JOB_ID")
    cancel_parser.set_defaults(run=run_cancel)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"batchd {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_daemon_parsers(commands)
    _add_emulator_parser(commands)
    _add_demo_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import log  # noqa: PLC0415 - see the imports above
    from .config import ConfigError  # noqa: PLC0415

    log.configure(args.log_level)
    try:
        code: int = args.run(args)
    except ConfigError as error:
        print(f"batchd: configuration error: {error}", file=sys.stderr)
        return EX_CONFIG
    except DatabaseUnavailable as error:
        print(f"batchd: {error}", file=sys.stderr)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
