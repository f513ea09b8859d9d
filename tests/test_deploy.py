"""The files in deploy/ are valid for the systemd that runs them."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batchd import cli
from batchd.config import CREDENTIAL_NAME

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


def unit_settings(text: str) -> dict[str, list[str]]:
    """A unit file's `Key=value` lines (comments and sections left out), every value of each key."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", ";", "[")):
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


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
    (credential,) = settings["LoadCredential"]
    assert credential.partition(":")[0] == CREDENTIAL_NAME
    assert settings["MemoryDenyWriteExecute"] == ["yes"]  # tests/test_systemd.py runs batchd under it

    # verify checks that ExecStart's program exists: point it at this checkout's installed command. The
    # credential's file is only read when the service starts.
    local = tmp_path / "batchd.service"
    local.write_text(unit.replace(program, str(Path(sys.executable).with_name("batchd"))))
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "batchd.service" not in result.stderr, result.stderr

    # The sandbox stays tight: systemd's own exposure score (0 best, 10 worst), offline from the file.
    result = subprocess.run(
        [analyze, "security", "--offline=yes", str(local)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    (score,) = re.findall(r"Overall exposure level for batchd\.service: ([\d.]+)", result.stdout)
    assert float(score) <= 2.0, result.stdout


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
        ("LoadCredential", [f"{CREDENTIAL_NAME}:/etc/batchd/{CREDENTIAL_NAME}"]),
    ],
)
def test_the_daemon_unit_sets_restart_and_each_hardening_setting(key: str, expected: list[str]) -> None:
    """Each setting issue 5 asks of deploy/batchd.service, one by one, with every value the unit gives
    it (a second line of the same key would change its meaning, so none may be added unnoticed)."""
    settings = unit_settings((DEPLOY / "batchd.service").read_text())
    assert settings.get(key) == expected, f"{key}: {settings.get(key)}"
