"""Tenants' tokens and the tenant-scoped job API: each tenant sees only its own jobs; the admin sees all."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import EmulatorHandle, daemon_config, daemon_env, daemon_process, run_python, wait_until

from batchd import tenants
from batchd.config import (
    ADMIN_CREDENTIAL_NAME,
    ADMIN_TOKEN_MIN_LENGTH,
    CREDENTIAL_NAME,
    ConfigError,
    Settings,
    admin_token,
)
from batchd.daemon import Daemon

ADMIN_TOKEN = "admin-" + "x" * 32


@pytest.fixture
async def api(
    db: Any, emulator: EmulatorHandle, daemon_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    await db.execute("TRUNCATE batchd.tokens, batchd.tenants")
    monkeypatch.setenv("BATCHD_ADMIN_TOKEN", ADMIN_TOKEN)
    daemon = Daemon(daemon_settings())
    async with daemon.running():
        assert daemon.http_url is not None
        yield daemon.http_url


async def insert_job(db: Any, tenant: str) -> uuid.UUID:
    job_id: uuid.UUID = await db.fetchval(
        "INSERT INTO batchd.jobs (tenant_id, job_type, input, metadata)"
        " VALUES ($1, 'nope', '{}', $2) RETURNING id",
        tenant,
        {"user": 7},
    )
    return job_id


async def get(url: str, *, token: str | None = None, **options: Any) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(**options) as http, http.get(url, headers=headers) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, response.headers


async def test_a_tenant_sees_its_own_job_and_not_another_tenants(db: Any, api: str) -> None:
    acme = await tenants.add_tenant(db, "acme")
    await tenants.add_tenant(db, "globex")
    own, other = await insert_job(db, "acme"), await insert_job(db, "globex")

    status, body, _ = await get(f"{api}/v1/jobs/{own}", token=acme)
    assert status == 200
    assert body["id"] == str(own)
    assert body["tenant_id"] == "acme"
    assert body["metadata"] == {"user": 7}
    assert body["status"] in {"queued", "failed"}

    for missing in (other, uuid.uuid4(), "not-a-uuid", "%7Bnot-a-uuid%7D"):
        status, body, _ = await get(f"{api}/v1/jobs/{missing}", token=acme)
        assert status == 404, "another tenant's job looks exactly like one that does not exist"
        assert body["error"]["message"] == "no such job"

    # Every spelling uuid.UUID reads is the same job, braces included: aiohttp's default {job_id} pattern
    # refuses a segment with a brace, which answered a plain-text 404 the handler never saw.
    for spelling in (str(own).upper(), own.hex, f"urn:uuid:{own}", f"%7B{own}%7D"):
        status, body, _ = await get(f"{api}/v1/jobs/{spelling}", token=acme)
        assert (status, body["id"]) == (200, str(own)), spelling


async def test_no_token_a_bad_one_or_a_revoked_one_is_401(db: Any, api: str) -> None:
    token = await tenants.add_tenant(db, "acme")
    job = await insert_job(db, "acme")
    for bad in (None, "bdt_wrong", token + "x"):
        status, _, headers = await get(f"{api}/v1/jobs/{job}", token=bad)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
    assert await tenants.revoke(db, "acme") == 1
    status, _, _ = await get(f"{api}/v1/jobs/{job}", token=token)
    assert status == 401
    status, _, _ = await get(f"{api}/healthz")
    assert status == 200, "health needs no token"


async def test_the_admin_sees_every_tenant(db: Any, api: str) -> None:
    jobs = [await insert_job(db, "acme"), await insert_job(db, "globex")]
    for job in jobs:
        status, body, _ = await get(f"{api}/v1/jobs/{job}", token=ADMIN_TOKEN)
        assert status == 200
        assert body["id"] == str(job)


async def test_the_admin_token_read_from_admin_token_file(
    db: Any, daemon_settings: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """[http] admin_token_file, with no $BATCHD_ADMIN_TOKEN: the file's token (its newline stripped) is the
    admin's, and only it."""
    monkeypatch.delenv("BATCHD_ADMIN_TOKEN", raising=False)
    token = "file-admin-" + uuid.uuid4().hex
    token_file = tmp_path / "admin-token"
    token_file.write_text(token + "\n")
    jobs = [await insert_job(db, "acme"), await insert_job(db, "globex")]
    daemon = Daemon(daemon_settings(http={"admin_token_file": str(token_file)}))
    async with daemon.running():
        api = daemon.http_url
        for job in jobs:
            status, body, _ = await get(f"{api}/v1/jobs/{job}", token=token)
            assert status == 200
            assert body["id"] == str(job)
        for bad in (ADMIN_TOKEN, token[:-1], token + "x"):
            status, _, _ = await get(f"{api}/v1/jobs/{jobs[0]}", token=bad)
            assert status == 401


async def test_a_missing_empty_or_short_admin_token_file_stops_batchd_run_with_exit_78(
    database_url: str, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    cases = [
        (tmp_path / "missing", "cannot read"),
        (empty, "shorter than 16 characters"),
        (short, "shorter than 16 characters"),
    ]
    runs = []
    for n, (path, _) in enumerate(cases):
        config = daemon_config(
            tmp_path / f"batchd{n}.toml",
            database_url,
            "http://127.0.0.1:1",
            http={"admin_token_file": str(path)},
        )
        runs.append(run_python("-m", "batchd", "run", "--config", str(config), env=daemon_env(), timeout=30))
    for (code, _, err), (path, problem) in zip(await asyncio.gather(*runs), cases, strict=True):
        assert code == 78, err
        assert "configuration error: http.admin_token_file: " in err, err
        assert str(path) in err, err
        assert problem in err, err


def credentials_directory(path: Path, **credentials: str) -> Path:
    """A directory as systemd's LoadCredential= makes it: one file per credential, named by its id."""
    path.mkdir(mode=0o700)
    for name, value in credentials.items():
        (path / name.replace("_", "-")).write_text(value + "\n")
    return path


def without_secrets(env: dict[str, str]) -> dict[str, str]:
    """The environment with no API key, admin token or credentials directory of the test's own."""
    return {
        key: value
        for key, value in env.items()
        if not key.startswith(("BATCHD_", "ANTHROPIC_")) and key != "CREDENTIALS_DIRECTORY"
    }


async def test_the_admin_token_read_from_the_systemd_credential_and_only_it(
    db: Any, emulator: EmulatorHandle, database_url: str, tmp_path: Path
) -> None:
    """`batchd run` as deploy/batchd.service starts it: both secrets in $CREDENTIALS_DIRECTORY, none in the
    environment. The admin-token credential (its newline stripped) is the admin's token, and nothing else
    is."""
    token = "credential-admin-" + uuid.uuid4().hex
    credentials = credentials_directory(
        tmp_path / "credentials", anthropic_api_key="test-key", admin_token=token
    )
    assert sorted(p.name for p in credentials.iterdir()) == sorted([CREDENTIAL_NAME, ADMIN_CREDENTIAL_NAME])
    env = {**without_secrets(daemon_env()), "CREDENTIALS_DIRECTORY": str(credentials)}
    config = daemon_config(tmp_path / "batchd.toml", database_url, emulator.url)
    jobs = [await insert_job(db, "acme"), await insert_job(db, "globex")]
    log = tmp_path / "daemon.log"
    async with daemon_process(config, log, env=env) as process:

        def ready() -> list[dict[str, Any]]:
            lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
            return [line for line in lines if line.get("event") == "daemon.ready"]

        async def ready_or_ended() -> bool:
            return bool(ready()) or process.returncode is not None

        await wait_until(ready_or_ended, timeout=60)
        assert process.returncode is None, log.read_text()
        api = ready()[0]["http"]
        for job in jobs:
            status, body, _ = await get(f"{api}/v1/jobs/{job}", token=token)
            assert status == 200
            assert body["id"] == str(job)
        status, _, _ = await get(f"{api}/metrics", token=token)
        assert status == 200, "the admin's token opens /metrics"
        for bad in (ADMIN_TOKEN, token[:-1], token + "x", "test-key"):
            status, _, _ = await get(f"{api}/v1/jobs/{jobs[0]}", token=bad)
            assert status == 401, bad
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    assert token not in log.read_text(), "the token is never logged"


def test_the_admin_tokens_sources_in_order_and_one_minimum_for_all(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """$BATCHD_ADMIN_TOKEN, then [http] admin_token_file, then the credential: the first that is set is
    the token, the others are not read. Each refuses a token shorter than ADMIN_TOKEN_MIN_LENGTH."""
    from_env, from_file, from_credential = (f"{source}-{uuid.uuid4().hex}" for source in "efc")
    token_file = tmp_path / "admin-token"
    token_file.write_text(from_file + "\n")
    credentials = credentials_directory(tmp_path / "credentials", admin_token=from_credential)
    with_file = Settings(http={"admin_token_file": token_file})
    without_file = Settings()

    def token(settings: Settings) -> str | None:
        secret = admin_token(settings)
        return None if secret is None else secret.get_secret_value()

    monkeypatch.delenv("BATCHD_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert token(without_file) is None, "no source: no admin"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert token(without_file) == from_credential
    assert token(with_file) == from_file
    monkeypatch.setenv("BATCHD_ADMIN_TOKEN", from_env)
    assert token(with_file) == from_env
    assert token(without_file) == from_env

    # A credentials directory without admin-token (the API key's, say) means no admin, not an error.
    monkeypatch.delenv("BATCHD_ADMIN_TOKEN")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials_directory(tmp_path / "key-only", x="y")))
    assert token(without_file) is None

    shortest = "s" * ADMIN_TOKEN_MIN_LENGTH
    assert ADMIN_TOKEN_MIN_LENGTH == 16
    monkeypatch.setenv("BATCHD_ADMIN_TOKEN", shortest)
    assert token(without_file) == shortest
    for short in ("x", shortest[1:], f"  {shortest[1:]}\n"):
        monkeypatch.setenv("BATCHD_ADMIN_TOKEN", short)
        with pytest.raises(ConfigError, match=r"^BATCHD_ADMIN_TOKEN: .* shorter than 16 characters"):
            admin_token(without_file)


async def test_a_short_admin_token_in_the_environment_or_the_credential_stops_batchd_run_with_exit_78(
    database_url: str, tmp_path: Path
) -> None:
    """The same minimum as admin_token_file's (tested above), with an error naming where the token came
    from."""
    config = daemon_config(tmp_path / "batchd.toml", database_url, "http://127.0.0.1:1")
    base = {**without_secrets(dict(os.environ)), "ANTHROPIC_API_KEY": "test-key"}
    short = credentials_directory(tmp_path / "short", admin_token="tooshort")
    empty = credentials_directory(tmp_path / "empty", admin_token="")
    unreadable = credentials_directory(tmp_path / "unreadable")
    (unreadable / ADMIN_CREDENTIAL_NAME).mkdir()
    credential = "configuration error: the systemd credential admin-token ($CREDENTIALS_DIRECTORY): "
    cases = [
        ({"BATCHD_ADMIN_TOKEN": "x"}, "configuration error: BATCHD_ADMIN_TOKEN: ", "shorter than 16"),
        ({"BATCHD_ADMIN_TOKEN": "y" * 15}, "configuration error: BATCHD_ADMIN_TOKEN: ", "shorter than 16"),
        ({"CREDENTIALS_DIRECTORY": str(short)}, credential + str(short / ADMIN_CREDENTIAL_NAME), "shorter"),
        ({"CREDENTIALS_DIRECTORY": str(empty)}, credential + str(empty / ADMIN_CREDENTIAL_NAME), "shorter"),
        ({"CREDENTIALS_DIRECTORY": str(unreadable)}, credential, "cannot read"),
    ]
    # Each process ends at its configuration; five at once on a loaded machine took over 30 s to import.
    runs = [
        run_python("-m", "batchd", "run", "--config", str(config), env={**base, **env}, timeout=90)
        for env, _, _ in cases
    ]
    for (code, _, err), (env, names, problem) in zip(await asyncio.gather(*runs), cases, strict=True):
        assert code == 78, (env, err)
        assert names in err, (env, err)
        assert problem in err, (env, err)
        assert "tooshort" not in err, "the token itself is never shown"


async def test_a_token_in_the_query_or_a_cookie_for_browsers(db: Any, api: str) -> None:
    token = await tenants.add_tenant(db, "acme")
    job = await insert_job(db, "acme")
    status, _, _ = await get(f"{api}/v1/jobs/{job}?access_token={token}")
    assert status == 200
    status, _, _ = await get(f"{api}/v1/jobs/{job}", cookies={"batchd_token": token})
    assert status == 200


async def test_the_tenant_commands(db: Any, database_url: str, tmp_path: Path) -> None:
    await db.execute("TRUNCATE batchd.tokens, batchd.tenants")
    config = tmp_path / "batchd.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n')
    env = {"PATH": "/usr/bin:/bin"}  # nothing of the test's own environment: the file says it all

    async def batchd(*args: str) -> tuple[int, str, str]:
        return await run_python("-m", "batchd", *args, "--config", str(config), env=env, cwd=tmp_path)

    code, out, err = await batchd("tenant", "add", "acme")
    assert code == 0, err
    token = out.strip()
    assert token.startswith("bdt_")
    assert "shown this once" in err
    assert await db.fetchval(
        "SELECT count(*) FROM batchd.tokens WHERE token_sha256 = $1", tenants.token_hash(token)
    )
    assert token not in str(await db.fetch("SELECT * FROM batchd.tokens")), "only the hash is stored"
    code, out, _ = await batchd("tenant", "add", "acme")
    assert code == 0
    code, out, _ = await batchd("tenant", "list")
    assert out.splitlines()[1].split() == ["acme", "2", "0", "0", "0", "0", "0", "0"], out
    code, out, _ = await batchd("tenant", "revoke", "acme")
    assert (code, out.strip()) == (0, "revoked 2 token(s) of 'acme'")
    code, _, err = await batchd("tenant", "revoke", "acme")
    assert code == 1
    assert "no active token" in err
    code, _, err = await batchd("tenant", "add", " spaced ")
    assert code == 65
