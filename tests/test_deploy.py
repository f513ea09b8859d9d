"""The files in deploy/ are valid for the systemd that runs them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import (
    daemon_config,
    in_unit_sandbox,
    insert_raw,
    unit_sandbox_unavailable,
    unit_settings,
    wait_until,
    watched,
)

from batchd import cli
from batchd.config import ADMIN_CREDENTIAL_NAME, CREDENTIAL_NAME

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_the_emulator_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package")
    unit = (DEPLOY / "batchd-emulator.service").read_text()
    # verify checks that ExecStart's program exists: point it at this checkout's installed command.
    batchd = Path(sys.executable).with_name("batchd")
    assert "ExecStart=/opt/batchd/.venv/bin/batchd " in unit
    local = tmp_path / "batchd-emulator.service"
    local.write_text(unit.replace("/opt/batchd/.venv/bin/batchd", str(batchd)))
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "batchd-emulator.service" not in result.stderr, result.stderr
    assert exposure(analyze, local) <= EXPOSURE, "the emulator's sandbox is the daemon's"


# systemd-analyze security's rating of both units (0 best, 10 worst; 252's scale): what is left is the
# network (they serve and call out; the API's addresses are not fixed) and running in the host's root.
EXPOSURE = 1.1


def exposure(analyze: str, unit: Path) -> float:
    """systemd's own exposure score of a unit file, offline (from the file alone)."""
    result = subprocess.run(
        [analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    (score,) = re.findall(rf"Overall exposure level for {re.escape(unit.name)}: ([\d.]+)", result.stdout)
    return float(score)


def test_the_daemon_unit_passes_systemd_analyze_verify_and_matches_batchd(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package")
    unit = (DEPLOY / "batchd.service").read_text()
    settings = unit_settings(unit)
    # The command line is one the real `batchd` accepts, for the daemon.
    (exec_start,) = settings["ExecStart"]
    program, *argv = shlex.split(exec_start)
    assert program == "/opt/batchd/.venv/bin/batchd"
    args = cli.build_parser().parse_args(argv)
    assert args.run is cli.run_daemon
    assert args.config == "/etc/batchd/batchd.toml"
    # What batchd does and systemd must expect.
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["RestartPreventExitStatus"] == [str(cli.EX_CONFIG)]
    assert [credential.partition(":")[0] for credential in settings["LoadCredential"]] == [
        CREDENTIAL_NAME,
        ADMIN_CREDENTIAL_NAME,
    ]
    assert settings["MemoryDenyWriteExecute"] == ["yes"]  # tests/test_systemd.py runs batchd under it

    # verify checks that ExecStart's program exists: point it at this checkout's installed command. The
    # credential's file is only read when the service starts.
    local = tmp_path / "batchd.service"
    local.write_text(unit.replace(program, str(Path(sys.executable).with_name("batchd"))))
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "batchd.service" not in result.stderr, result.stderr

    # The sandbox stays tight: systemd's own exposure score, offline from the file.
    assert exposure(analyze, local) <= EXPOSURE


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Restart", ["on-failure"]),
        ("DynamicUser", ["yes"]),
        ("ProtectSystem", ["strict"]),
        ("NoNewPrivileges", ["yes"]),
        ("PrivateTmp", ["yes"]),
        # Empty: no capability at all (a later non-empty line would add some back).
        ("CapabilityBoundingSet", [""]),
        ("RestrictAddressFamilies", ["AF_UNIX AF_INET AF_INET6"]),
        # The allow list first; the deny list after it only narrows it.
        ("SystemCallFilter", ["@system-service", "~@privileged @resources"]),
        (
            "LoadCredential",
            [
                f"{CREDENTIAL_NAME}:/etc/batchd/{CREDENTIAL_NAME}",
                f"{ADMIN_CREDENTIAL_NAME}:/etc/batchd/{ADMIN_CREDENTIAL_NAME}",
            ],
        ),
        # What issue 11 added; test_both_units_work_in_their_sandbox runs batchd under the first two.
        ("PrivateUsers", ["yes"]),
        ("ProcSubset", ["pid"]),
        ("PrivateMounts", ["yes"]),
    ],
)
def test_the_daemon_unit_sets_restart_and_each_hardening_setting(key: str, expected: list[str]) -> None:
    """Each setting issue 5 asks of deploy/batchd.service, one by one, with every value the unit gives
    it (a second line of the same key would change its meaning, so none may be added unnoticed)."""
    settings = unit_settings((DEPLOY / "batchd.service").read_text())
    assert settings.get(key) == expected, f"{key}: {settings.get(key)}"


@asynccontextmanager
async def sandboxed(argv: list[str], log: Path, env: dict[str, str]) -> AsyncIterator[None]:
    """`python ARGV` in the units' sandbox (support.in_unit_sandbox), its log in a file; killed (with
    everything in its PID namespace) when the block ends."""
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            *in_unit_sandbox([sys.executable, *argv]),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    async with watched(process, log):
        yield


def fields(log: Path, event: str, field: str) -> list[str]:
    """`field` of every `event` in a JSON log so far."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line[field] for line in lines if line.get("event") == event]


async def logged(log: Path, event: str, field: str) -> str:
    """`field` of the first `event` in a JSON log, once it is there."""

    async def there() -> bool:
        return bool(fields(log, event, field))

    await wait_until(there, timeout=60)
    return fields(log, event, field)[0]


async def test_both_units_work_in_their_sandbox(db: Any, database_url: str, tmp_path: Path) -> None:
    """The emulator and the daemon, each under what its unit adds that a test can build without systemd:
    a user namespace mapping only its own user (PrivateUsers=yes), a /proc of its own process alone
    (ProtectProc=invisible, ProcSubset=pid) and MemoryDenyWriteExecute. Both start, a job goes through, the
    secrets come from a credentials directory, and /metrics still has the process_* metrics (prometheus_client
    takes the boot time from /proc/stat, which ProcSubset=pid hides)."""
    for unit in ("batchd.service", "batchd-emulator.service"):
        settings = unit_settings((DEPLOY / unit).read_text())
        for key, value in [
            ("PrivateUsers", "yes"),
            ("ProtectProc", "invisible"),
            ("ProcSubset", "pid"),
            ("MemoryDenyWriteExecute", "yes"),
        ]:
            assert settings.get(key) == [value], (unit, key)
    unavailable = unit_sandbox_unavailable()
    if unavailable:
        pytest.skip(f"cannot build the units' namespaces here: {unavailable}")

    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / CREDENTIAL_NAME).write_text("sandboxed-key\n")
    admin = "sandboxed-admin-" + "z" * 16
    (credentials / ADMIN_CREDENTIAL_NAME).write_text(admin + "\n")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("BATCHD_", "ANTHROPIC_", "NOTIFY_", "WATCHDOG_", "CREDENTIALS_"))
    }
    emulator = ["-m", "batchd", "emulator", "--port", "0", "--processing-time", "0.1-0.3"]
    emulator_log, daemon_log = tmp_path / "emulator.log", tmp_path / "daemon.log"
    (job,) = await insert_raw(db, "acme", ["Hello from inside the sandbox"])
    async with sandboxed(emulator, emulator_log, {**env, "ANTHROPIC_API_KEY": "unused"}):
        emulator_url = await logged(emulator_log, "emulator.listening", "url")
        config = daemon_config(tmp_path / "batchd.toml", database_url, emulator_url)
        daemon = ["-m", "batchd", "run", "--config", str(config)]
        async with sandboxed(daemon, daemon_log, {**env, "CREDENTIALS_DIRECTORY": str(credentials)}):
            http = await logged(daemon_log, "daemon.ready", "http")

            async def succeeded() -> bool:
                status: str = await db.fetchval("SELECT status FROM batchd.jobs WHERE id = $1", job)
                return status == "succeeded"

            await wait_until(succeeded, timeout=60)
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{http}/metrics", headers={"Authorization": f"Bearer {admin}"}) as response,
            ):
                assert response.status == 200
                metrics = await response.text()
    values = {
        name: float(value) for name, value in re.findall(r"^(process_\w+) (\S+)$", metrics, re.MULTILINE)
    }
    assert values.keys() >= {
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
    }, metrics
    assert time.time() - 600 < values["process_start_time_seconds"] <= time.time(), values
