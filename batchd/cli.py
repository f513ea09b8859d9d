"""The `batchd` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from aiohttp.log import access_logger
from pydantic import ValidationError

from . import __version__, log
from .demo import run_tour
from .emulator import EmulatorConfig, serve

EX_CONFIG = 78  # sysexits: bad configuration; systemd is told not to restart on it
DEFAULT_CONFIG = Path("batchd.toml")


class ConfigError(Exception):
    """The configuration names a bad key or value; the message says which and why."""


def _config_path(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    env = os.environ.get("BATCHD_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def _read_table(path: Path | None, table: str) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    section = document.get(table, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [{table}] must be a table")
    return section


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
    values = _read_table(_config_path(args.config), "emulator")
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
        problems = "; ".join(f"emulator.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ConfigError(problems) from None


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
    config = emulator_config(args)
    logger = structlog.get_logger("batchd.emulator")
    return asyncio.run(_serve_emulator(config, logger, access_log=args.access_log))


async def _serve_emulator(config: EmulatorConfig, logger: Any, *, access_log: bool) -> int:
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
    parser = commands.add_parser("demo", help="a scripted tour of the emulator with the official SDK")
    parser.set_defaults(run=run_demo)


def run_demo(_args: argparse.Namespace) -> int:
    asyncio.run(run_tour())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"batchd {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_emulator_parser(commands)
    _add_demo_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.configure(args.log_level)
    try:
        code: int = args.run(args)
    except ConfigError as error:
        print(f"batchd: configuration error: {error}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
