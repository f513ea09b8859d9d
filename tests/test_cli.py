"""`batchd emulator` and `batchd demo` as a user runs them: real processes, stopped by signals."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import aiohttp
import anthropic
import asyncpg
import pytest
from conftest import SERVER_URL
from support import request, run_python, running_emulator

from batchd.emulator import EmulatorConfig

EX_CONFIG = 78
ROOT = Path(__file__).resolve().parent.parent
# What `make demo` passes the demo (Makefile): development's configuration, the emulator's.
DEV_CONFIG = ROOT / "batchd.dev.toml"


async def run_batchd(
    *args: str,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    module: bool = True,
) -> tuple[int, str, str]:
    """Runs `python -m batchd ARGS` (or `python ARGS` when module is False) and waits for it."""
    command = ["-m", "batchd", *args] if module else list(args)
    return await run_python(*command, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


async def test_the_emulator_command_serves_the_sdk_and_stops_on_sigterm() -> None:
    async with (
        running_emulator("--processing-time", "0", "--seed", "1") as url,
        anthropic.AsyncAnthropic(api_key="k", base_url=url, _strict_response_validation=True) as client,
    ):
        batch = await client.messages.batches.create(requests=[request("cli-1")])
        while batch.processing_status != "ended":  # a zero processing time ends it on the next look
            batch = await client.messages.batches.retrieve(batch.id)
        assert batch.request_counts.succeeded == 1


async def test_settings_come_from_the_config_file_and_options_override_them(tmp_path: Path) -> None:
    config = tmp_path / "batchd.toml"
    config.write_text('[emulator]\napi_key = "from-file"\nprocessing_time_s = [1000, 1000]\n')
    async with running_emulator("--config", str(config)) as url:
        async with anthropic.AsyncAnthropic(api_key="other", base_url=url, max_retries=0) as client:
            with pytest.raises(anthropic.AuthenticationError):
                await client.messages.batches.list()
        async with anthropic.AsyncAnthropic(api_key="from-file", base_url=url) as client:
            batch = await client.messages.batches.create(requests=[request("x")])
            assert (await client.messages.batches.retrieve(batch.id)).processing_status == "in_progress"
    async with (
        running_emulator("--config", str(config), "--api-key", "from-flag") as url,
        anthropic.AsyncAnthropic(api_key="from-flag", base_url=url) as client,
    ):
        assert (await client.messages.batches.list()).data == []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def emulator_settings(*args: str, env: dict[str, str], port: int) -> tuple[int, float]:
    """(rate_limit_rpm, time_scale) of `batchd emulator ARGS` without --port; it must listen on `port`."""
    async with (
        running_emulator(*args, port=None, env=env) as url,
        aiohttp.ClientSession() as session,
        session.get(f"{url}/_emulator/settings") as answer,
    ):
        assert url == f"http://127.0.0.1:{port}"
        settings = await answer.json()
    return settings["rate_limit_rpm"], settings["time_scale"]


async def test_the_environment_overrides_the_emulator_section_as_any_other(tmp_path: Path) -> None:
    """[emulator] is a section of Settings: BATCHD_EMULATOR__<KEY> wins over the file, an option over both."""
    config = tmp_path / "batchd.toml"
    config.write_text("[emulator]\nport = 1\ntime_scale = 7.0\nrate_limit_rpm = 5\n")
    port = free_port()
    env = {"BATCHD_CONFIG": str(config), "BATCHD_EMULATOR__PORT": str(port), "BATCHD_EMULATOR__SEED": "3"}
    assert await emulator_settings("--rate-limit-rpm", "42", env=env, port=port) == (42, 7.0)  # the option's
    assert await emulator_settings(env=env, port=port) == (5, 7.0)  # the file's rate limit


def test_the_configuration_reference_lists_every_emulator_key() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    # Its keys, in the [emulator] table, and its own tables ([emulator.faults]).
    documented = set(re.findall(r"^\| `emulator\.(\w+)` \|", reference, re.MULTILINE))
    documented |= set(re.findall(r"^### `\[emulator\.(\w+)\]`", reference, re.MULTILINE))
    assert documented == set(EmulatorConfig.model_fields)


async def test_the_access_log_is_json_events_as_the_rest() -> None:
    log: list[str] = []
    async with (
        running_emulator("--access-log", log=log) as url,
        anthropic.AsyncAnthropic(api_key="k", base_url=url) as client,
    ):
        await client.messages.batches.list()
    events = [json.loads(line) for line in log]  # every line is JSON
    (access,) = [event for event in events if event.get("logger") == "aiohttp.access"]
    assert "GET /v1/messages/batches" in access["event"]
    assert access["level"] == "info"
    assert access["response_status"] == 200
    assert {"event", "level", "timestamp"} <= set(access)


async def test_faults_given_at_start() -> None:
    faults = json.dumps({"http": [{"endpoint": "list", "status": 529, "count": 1}]})
    async with (
        running_emulator("--faults", faults) as url,
        anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0) as client,
    ):
        with pytest.raises(anthropic.OverloadedError):
            await client.messages.batches.list()
        await client.messages.batches.list()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[emulator]\ntime_scale = -1\n", "emulator.time_scale"),
        ("[emulator]\nbogus = 1\n", "emulator.bogus"),
        ("[emulator]\nprocessing_time_s = [5, 1]\n", "processing_time_s"),
        ("[emulator\n", "not valid TOML"),
        ('emulator = "flat"\n', "emulator: Input should be a valid dictionary"),
    ],
)
async def test_a_bad_config_stops_at_start_naming_the_key(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "batchd.toml"
    config.write_text(content)
    code, _, err = await run_batchd("emulator", "--config", str(config))
    assert code == EX_CONFIG
    assert "configuration error" in err
    assert message in err


async def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    code, _, err = await run_batchd("emulator", "--config", str(tmp_path / "absent.toml"))
    assert code == EX_CONFIG
    assert "no such configuration file" in err


async def test_bad_options_are_refused_by_the_parser() -> None:
    code, _, err = await run_batchd("emulator", "--processing-time", "soon")
    assert code == 2
    assert "SECONDS or LOW-HIGH" in err
    code, _, err = await run_batchd("emulator", "--faults", "{nope")
    assert code == 2
    assert "--faults is not JSON" in err


# What `batchd --help` and `--version` may load before answering: the standard library and batchd/__init__.
# The rest waits for the command that needs it (bench/cli_start.py measures the time; this keeps the cause).
HEAVY = ("anthropic", "aiohttp", "asyncpg", "pydantic", "pydantic_settings", "structlog", "prometheus_client")
PROBE = """
import json, sys
from batchd import cli
try:
    code = cli.main({argv!r})
except SystemExit as exit:
    code = exit.code
print(json.dumps([code, sorted(name for name in {heavy!r} if name in sys.modules)]))
"""


@pytest.mark.parametrize(
    ("argv", "allowed"),
    [
        (["--version"], []),
        (["--help"], []),
        (["status", "--help"], []),
        (["report", "--help"], []),
        (["tenant", "set", "--help"], []),
        # A command that reads the database needs its driver, its settings and its log, never the SDK.
        (["status"], ["asyncpg", "pydantic", "pydantic_settings", "structlog"]),
        (["tenant", "list"], ["asyncpg", "pydantic", "pydantic_settings", "structlog"]),
        (["report"], ["asyncpg", "pydantic", "pydantic_settings", "structlog"]),
    ],
)
async def test_a_command_imports_only_what_it_needs(
    argv: list[str], allowed: list[str], database_url: str
) -> None:
    env = {**os.environ, "BATCHD_DATABASE__URL": database_url}
    code, out, err = await run_python("-c", PROBE.format(argv=argv, heavy=HEAVY), env=env)
    assert code == 0, err
    status, loaded = json.loads(out.strip().splitlines()[-1])
    assert status == 0, f"batchd {' '.join(argv)} failed: {err}"
    assert set(loaded) <= set(allowed), f"batchd {' '.join(argv)} imported {loaded}"


def test_the_parsers_choices_are_the_modules_own() -> None:
    """The parser lists some values itself, to build without importing the modules that own them."""
    from batchd import budgets, cli, enqueue, report  # noqa: PLC0415 - the point is when they load

    assert set(cli.OVER_BUDGET) == set(budgets.OVER_BUDGET)
    assert set(cli.REPORT_FORMATS) == set(report.RENDER) == set(report.RENDER_CACHE)
    assert cli.ROUTES == enqueue.ROUTES


async def test_version_is_the_packages_one() -> None:
    from importlib.metadata import version  # noqa: PLC0415

    import batchd  # noqa: PLC0415

    code, out, _ = await run_batchd("--version")
    assert code == 0
    assert out.strip() == f"batchd {batchd.__version__}" == f"batchd {version('batchd')}"


@pytest.mark.slow
async def test_the_emulator_tour() -> None:
    code, out, err = await run_batchd("demo", "--emulator-only", timeout=120)
    assert code == 0, err
    assert "errored, invalid_request_error" in out
    assert "then ended: {'canceled': 1" in out
    assert 'custom_ids sent twice = {"once-only": 2}' in out
    assert out.rstrip().endswith("every call above went through the official SDK over HTTP.")


@pytest.mark.slow
async def test_the_demo_runs_everything_and_cleans_up(database_server: str) -> None:
    # As `make demo` runs it (its job types and the emulator), pointed at the test server.
    code, out, err = await run_batchd(
        "demo", "--config", str(DEV_CONFIG), timeout=180, env={"BATCHD_DATABASE__URL": SERVER_URL}
    )
    assert code == 0, out + err
    assert "63 jobs succeeded and 1 failed (on purpose)" in out
    assert "input lacks categories, required by job type 'classify'" in out
    assert "sent twice: {}" in out
    name = re.search(r"Demo database: \S+/(batchd_demo_\w+)", out)
    assert name is not None, out
    connection = await asyncpg.connect(SERVER_URL)
    try:
        assert not await connection.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name[1])
    finally:
        await connection.close()


@pytest.mark.slow
async def test_the_demo_starts_an_embedded_postgresql_when_none_answers(tmp_path: Path) -> None:
    # Nothing listens on port 1: the demo must fall back to the embedded server, in the directory it names.
    try:
        code, out, err = await run_batchd(
            "demo",
            "--config",
            str(DEV_CONFIG),
            timeout=240,
            env={"BATCHD_DATABASE__URL": "postgresql://postgres@127.0.0.1:1/postgres"},
            cwd=tmp_path,
        )
        assert code == 0, out + err
        assert f"starting an embedded one in {tmp_path / '.batchd' / 'pgdata'}" in out
        assert "63 jobs succeeded and 1 failed (on purpose)" in out
    finally:
        stopped, _, stop_err = await run_batchd(
            "-m",
            "batchd.dev.embedded_pg",
            "stop",
            "--data-dir",
            str(tmp_path / ".batchd" / "pgdata"),
            module=False,
        )
        assert stopped == 0, stop_err
