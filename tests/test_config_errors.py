"""A misspelt setting stops batchd, naming it and the nearest valid one: an unknown key in batchd.toml, and a
BATCHD_ variable batchd does not read (pydantic-settings would pass over it in silence). DATABASE_URL, which
batchd does not read, is a warning; `daemon.ready` says which API and database batchd talks to."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from support import daemon_config, daemon_env, daemon_process, run_python, start_emulator, wait_until

from batchd.config import (
    FOREIGN_VARIABLES,
    ConfigError,
    check_environment,
    nearest_key,
    unknown_variables,
)
from batchd.emulator import EmulatorConfig

EX_CONFIG = 78
ROOT = Path(__file__).resolve().parent.parent
VARIABLE = re.compile(r"\bBATCHD_[A-Z0-9]+(?:_[A-Z0-9]+)*(?:__[A-Z0-9_]+)?\b")


async def run_batchd(*args: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """`python -m batchd ARGS` in `cwd` (no stray ./batchd.toml), without the test's own BATCHD_ variables
    nor DATABASE_URL: only `env`'s."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith(("BATCHD_", "DATABASE_URL"))}
    return await run_python("-m", "batchd", *args, env={**clean, **env}, cwd=cwd)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("BATCHD_DATABASE_URL", "$BATCHD_DATABASE__URL"),
        ("BATCHD_BATCHING__MAX_WIAT_S", "$BATCHD_BATCHING__MAX_WAIT_S"),
        ("batchd_databse__url", "$BATCHD_DATABASE__URL"),  # pydantic-settings ignores case: so does the check
        ("BATCHD_ADMIN_TOKN", "$BATCHD_ADMIN_TOKEN"),
        ("BATCHD_CONIFG", "$BATCHD_CONFIG"),
    ],
)
async def test_an_unknown_batchd_variable_stops_a_command_naming_the_nearest(
    tmp_path: Path, variable: str, suggestion: str
) -> None:
    code, _, err = await run_batchd("status", cwd=tmp_path, env={variable: "postgresql://x@127.0.0.1:1/x"})
    assert code == EX_CONFIG, err
    line = one_line(err)
    assert line.startswith("batchd: configuration error: ")
    assert f"${variable} is not a variable batchd reads (did you mean {suggestion}?)" in line


async def test_an_unknown_key_in_the_file_names_the_file_the_key_and_the_nearest(tmp_path: Path) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text("[batching]\nmax_wiat_s = 30\n\n[tenants.acme]\nwieght = 2\n\n[retenton]\n")
    code, _, err = await run_batchd("--config", str(config), "run", cwd=tmp_path, env={})
    assert code == EX_CONFIG, err
    line = one_line(err)
    assert f"{config}: unknown key batching.max_wiat_s (did you mean batching.max_wait_s?)" in line
    assert f"{config}: unknown key tenants.acme.wieght (did you mean tenants.acme.weight?)" in line
    assert f"{config}: unknown key retenton (did you mean retention?)" in line
    assert "Extra inputs" not in line


async def test_an_unknown_key_under_a_named_entry_from_the_environment_names_the_variable(
    tmp_path: Path,
) -> None:
    """A table's entries (tenants, job types) are named by the operator, so any BATCHD_TENANTS__<NAME>__ is
    read: a misspelt key under one is pydantic's to refuse, and the message names the variable."""
    code, _, err = await run_batchd("status", cwd=tmp_path, env={"BATCHD_TENANTS__ACME__WIEGHT": "2"})
    assert code == EX_CONFIG, err
    assert (
        "$BATCHD_TENANTS__ACME__WIEGHT: unknown key tenants.acme.wieght (did you mean tenants.acme.weight?)"
        in one_line(err)
    )


async def test_database_url_is_a_warning_naming_the_variable_batchd_reads(
    tmp_path: Path, database_url: str
) -> None:
    config = tmp_path / "batchd.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n')
    ignored = "postgresql://someone:hunter2@db.example:5432/other"
    runs = await asyncio.gather(
        run_batchd("--config", str(config), "status", cwd=tmp_path, env={"DATABASE_URL": ignored}),
        # The same database as batchd's, or BATCHD_DATABASE__URL given as well: nothing to say.
        run_batchd("--config", str(config), "status", cwd=tmp_path, env={"DATABASE_URL": database_url}),
        run_batchd(
            "status", cwd=tmp_path, env={"DATABASE_URL": ignored, "BATCHD_DATABASE__URL": database_url}
        ),
    )
    for code, _, err in runs:
        assert code == 0, err
    warned, same, both = (err for _, _, err in runs)
    assert "config.database_url_ignored" not in same + both
    event = json.loads(one_line(warned))
    assert event["event"] == "config.database_url_ignored"
    assert event["level"] == "warning"
    assert event["database_url"] == "postgresql://someone:***@db.example:5432/other"
    assert event["database"] == database_url
    assert "hunter2" not in warned


def test_the_suggestions() -> None:
    assert unknown_variables({"BATCHD_DATABASE_URL": "x", "PATH": "/bin"}) == [
        ("BATCHD_DATABASE_URL", "BATCHD_DATABASE__URL")
    ]
    assert unknown_variables({"BATCHD_ZZZ": "1"}) == [("BATCHD_ZZZ", None)]
    with pytest.raises(ConfigError, match=r"^\$BATCHD_ZZZ is not a variable batchd reads$"):
        check_environment({"BATCHD_ZZZ": "1"})
    # Valid: a key, a whole section (as JSON), a table's entry, the other variables, and the foreign ones.
    fine = {
        "BATCHD_DATABASE__URL": "x",
        "BATCHD_HTTP": "{}",
        "BATCHD_EMULATOR__PORT": "1",
        "BATCHD_TENANTS__ACME__WEIGHT": "2",
        "BATCHD_JOB_TYPES__FAQ__MAX_TOKENS": "5",
        "BATCHD_PRICING__MODELS__X__INPUT": "1",
        "BATCHD_CONFIG": "x",
        "BATCHD_ADMIN_TOKEN": "x",
        "BATCHD_EMULATOR_API_KEY": "x",
        **dict.fromkeys(FOREIGN_VARIABLES, "x"),
    }
    assert unknown_variables(fine) == []
    assert nearest_key(["batching", "max_wiat_s"]) == "batching.max_wait_s"
    assert nearest_key(["tenants", "acme", "wieght"]) == "tenants.acme.weight"
    assert nearest_key(["job_types", "faq", "promt"]) == "job_types.faq.prompt"
    assert nearest_key(["pricing", "models", "x", "inptu"]) == "pricing.models.x.input"
    assert nearest_key(["emulator", "sed"]) == "emulator.seed"
    assert nearest_key(["batchng"]) == "batching"
    assert nearest_key(["batching", "zzz"]) is None
    assert nearest_key(["nowhere", "max_wait_s"]) is None


def test_every_batchd_variable_the_repository_names_is_read_or_let_be() -> None:
    """The docs, the tests and the Makefile pass these to batchd: none may stop it."""
    mentioned: set[str] = set()
    for path in [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("tests/*.py"), ROOT / "Makefile"]:
        mentioned.update(
            re.findall(r"\bBATCHD_[A-Z0-9]+(?:_[A-Z0-9]+)*(?:__[A-Z0-9_]+)?\b", path.read_text())
        )
    mentioned -= {"BATCHD_ZZZ", "BATCHD_DATABASE_URL", "BATCHD_BATCHING__MAX_WIAT_S", "BATCHD_ADMIN_TOKN"}
    mentioned -= {"BATCHD_CONIFG", "BATCHD_TENANTS__ACME__WIEGHT"}  # this file's own misspellings
    assert mentioned
    assert unknown_variables(dict.fromkeys(mentioned, "x")) == []


async def test_ready_names_the_api_and_the_database_without_its_password(
    tmp_path: Path, database_url: str
) -> None:
    # The server trusts local connections, so the password is never checked: it must still not be logged.
    with_password = database_url.replace("postgresql://postgres@", "postgresql://postgres:hunter2@", 1)
    assert with_password != database_url
    async with start_emulator(EmulatorConfig()) as emulator:
        config = daemon_config(tmp_path / "batchd.toml", with_password, emulator.url)
        log = tmp_path / "daemon.log"
        async with daemon_process(config, log, env=daemon_env()) as process:

            def ready() -> list[dict[str, Any]]:
                lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
                return [line for line in lines if line.get("event") == "daemon.ready"]

            async def ready_or_ended() -> bool:
                return bool(ready()) or process.returncode is not None

            await wait_until(ready_or_ended, timeout=60)
            assert process.returncode is None, log.read_text()
            event = ready()[0]
    assert event["api"].rstrip("/") == emulator.url.rstrip("/")
    assert event["database"] == with_password.replace("hunter2", "***")
    assert "hunter2" not in log.read_text()
