"""The files in deploy/ are valid for the systemd that runs them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
