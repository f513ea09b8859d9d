"""batchd as a user installs it: the sdist and the wheel built from a copy of this tree, the wheel installed
with the runtime lock into a fresh virtual environment outside the source tree, and its console script run
there: `--version`, `migrate`, `emulator`, `run`, and one job from INSERT to result.

The build runs without isolation, so its setuptools is the locked one (requirements.lock), and the venv
installs from pip's cache after the first run: about 30 s on a fresh machine, a few seconds after.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import asyncpg
import pytest
from support import CHECKOUT_LOCAL, daemon_config, daemon_process, raw_request, running_emulator, wait_until

import batchd

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# What the package cannot run without, beside its modules.
PACKAGE_DATA = [
    "batchd/py.typed",
    "batchd/sql/queries.sql",
    "batchd/sql/schema.sql",
    *(f"batchd/sql/migrations/{path.name}" for path in (ROOT / "batchd/sql/migrations").glob("*.sql")),
    *(f"batchd/dashboard/{path.name}" for path in sorted((ROOT / "batchd/dashboard").iterdir())),
]
# What an operator needs beside the code, under <prefix>/share/batchd (pyproject.toml's data-files).
SHARED = [
    "batchd.toml",
    "requirements-runtime.lock",
    "deploy/README.md",
    "deploy/batchd.service",
    "deploy/batchd-emulator.service",
    "deploy/sql/roles.sql",
    "deploy/sql/rls.sql",
    "deploy/sql/tenant_producer.sql",
    "deploy/nginx/batchd.conf",
]


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel, built the way `python -m build` does by default: the wheel from the sdist."""
    work = tmp_path_factory.mktemp("build")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*CHECKOUT_LOCAL))
    out = work / "dist"
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, source, cwd=work)
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the runtime lock and the wheel; its bin directory."""
    venv = tmp_path_factory.mktemp("venv") / "batchd"
    run(sys.executable, "-m", "venv", venv, cwd=venv.parent)
    pip: list[str | Path] = [venv / "bin" / "python", "-m", "pip", "--quiet", "--disable-pip-version-check"]
    run(*pip, "install", "--require-hashes", "-r", ROOT / "requirements-runtime.lock", cwd=venv.parent)
    (wheel,) = dist.glob("*.whl")
    run(*pip, "install", "--no-deps", wheel, cwd=venv.parent)
    run(*pip, "check", cwd=venv.parent)
    return venv / "bin"


def clean_env(**extra: str) -> dict[str, str]:
    """The machine's environment without anything that would point Python back at this source tree."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("BATCHD_", "PYTHON"))}
    return {**env, "ANTHROPIC_API_KEY": "test-key", **extra}


def test_the_sdist_and_the_wheel_carry_the_sql_the_dashboard_and_the_deployment_files(dist: Path) -> None:
    version = batchd.__version__
    (wheel,) = dist.glob(f"batchd-{version}-py3-none-any.whl")
    (sdist,) = dist.glob(f"batchd-{version}.tar.gz")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert set(PACKAGE_DATA) <= in_wheel
    # `batchd demo` ships too: the development tools, in a subpackage of their own (batchd/dev/).
    assert {f"batchd/dev/{path.name}" for path in (ROOT / "batchd/dev").glob("*.py")} <= in_wheel
    assert {f"batchd-{version}.data/data/share/batchd/{path}" for path in SHARED} <= in_wheel
    assert not [name for name in in_wheel if "/tests/" in name or name.startswith("tests/")]
    with tarfile.open(sdist) as archive:
        in_sdist = {name.removeprefix(f"batchd-{version}/") for name in archive.getnames()}
    # `make demo` and `make test` work from it: the Makefile and development's configuration.
    assert {
        *PACKAGE_DATA,
        *SHARED,
        "pyproject.toml",
        "requirements.lock",
        "Makefile",
        "batchd.dev.toml",
    } <= in_sdist
    assert "tests/conftest.py" in in_sdist
    assert not [name for name in in_sdist if "__pycache__" in name or name.startswith(".venv")]


def test_the_installed_package_is_the_wheels_and_knows_its_version(installed: Path) -> None:
    outside = installed.parent.parent
    assert run(installed / "batchd", "--version", cwd=outside, env=clean_env()).strip() == (
        f"batchd {batchd.__version__}"
    )
    where = run(installed / "python", "-c", "import batchd; print(batchd.__file__)", cwd=outside)
    assert Path(where.strip()).is_relative_to(installed.parent), "batchd came from somewhere else"
    share = installed.parent / "share" / "batchd"
    assert all((share / path).is_file() for path in SHARED)


async def test_the_installed_console_script_migrates_serves_and_runs_a_job(
    installed: Path, blank_database_url: str, tmp_path: Path
) -> None:
    batchd_command = [str(installed / "batchd")]
    env = clean_env()
    out = await asyncio.to_thread(
        run, *batchd_command, "migrate", cwd=tmp_path, env={**env, "BATCHD_DATABASE__URL": blank_database_url}
    )
    assert out.startswith("applied 0001_")
    async with running_emulator("--processing-time", "0.2", batchd=batchd_command) as emulator_url:
        config = daemon_config(tmp_path / "batchd.toml", blank_database_url, emulator_url)
        log = tmp_path / "daemon.log"
        async with daemon_process(config, log, env=env, batchd=batchd_command) as daemon:
            db = await asyncpg.connect(blank_database_url)
            try:
                job_id = await db.fetchval(
                    "INSERT INTO batchd.jobs (tenant_id, request) VALUES ('acme', $1::jsonb) RETURNING id",
                    json.dumps(raw_request("from the wheel")),
                )

                async def done() -> bool:
                    status = await db.fetchval("SELECT status FROM batchd.jobs WHERE id = $1", job_id)
                    return status in ("succeeded", "failed")

                await wait_until(done, timeout=60)
                row = await db.fetchrow("SELECT status, result FROM batchd.jobs WHERE id = $1", job_id)
            finally:
                await db.close()
            daemon.terminate()
            assert await asyncio.wait_for(daemon.wait(), timeout=30) == 0
    assert row is not None
    assert row["status"] == "succeeded"
    assert "from the wheel" in json.dumps(json.loads(row["result"]))
