"""The shipped batchd.toml is production's template: copied to /etc/batchd as it is, it talks to the real API
and to a database of batchd's own, never to the emulator nor the server's maintenance database. `make demo`
and development have a configuration of their own, batchd.dev.toml, which talks to the emulator."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from batchd.config import load_settings
from batchd.dev.demo import demo_settings
from batchd.provider import Provider
from batchd.ratelimit import RateLimiter

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "batchd.toml"
# Where the official SDK sends requests when given no base_url (anthropic._client.AsyncAnthropic).
REAL_API = "https://api.anthropic.com"
EMULATOR = "http://127.0.0.1:8787"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The files as they are: no BATCHD_ override, and no ANTHROPIC_BASE_URL that the SDK would take instead
    of its default."""
    for name in list(os.environ):
        if name.startswith("BATCHD_") or name == "ANTHROPIC_BASE_URL":
            monkeypatch.delenv(name)


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def test_the_shipped_configuration_talks_to_the_real_api() -> None:
    settings = load_settings(SHIPPED)
    assert settings.anthropic.base_url is None
    # The client the daemon makes from it (daemon.py) goes where the SDK goes by default: the real API.
    provider = Provider("key", base_url=settings.anthropic.base_url, limiter=RateLimiter(50), timeout_s=5)
    try:
        url = str(provider.client.base_url)
    finally:
        await provider.close()
    assert url.rstrip("/") == REAL_API
    assert not is_local(urlsplit(url).hostname or "")


def test_the_shipped_configuration_names_a_database_of_batchds_own() -> None:
    url = urlsplit(load_settings(SHIPPED).database.url)
    assert url.path == "/batchd"  # not the server's maintenance database `postgres`
    assert url.password is None  # batchd.toml is readable by every user


def demo_config() -> Path:
    """The file `make demo` passes `batchd demo` (the Makefile's demo recipe)."""
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe is not None
    config = re.search(r"--config (\S+)", recipe[1])
    assert config is not None, "make demo must pass a configuration of its own, not the shipped one"
    return ROOT / config[1]


def test_make_demo_runs_against_the_emulator() -> None:
    path = demo_config()
    assert path.resolve() != SHIPPED.resolve()
    settings = load_settings(path)
    assert settings.anthropic.base_url == EMULATOR
    assert is_local(urlsplit(settings.database.url).hostname or "")
    # The job types its producer inserts.
    assert {"summarize", "classify"} <= set(settings.job_types)
    # `batchd demo` starts an emulator of its own and points the daemon there, whatever the file says.
    own = "http://127.0.0.1:40123"
    for base in (settings, load_settings(SHIPPED)):
        assert demo_settings(base, "postgresql://demo", own).anthropic.base_url == own


def test_the_development_configuration_serves_the_emulator_where_it_points_the_daemon() -> None:
    settings = load_settings(demo_config())
    emulator = f"http://{settings.emulator.host}:{settings.emulator.port}"
    assert settings.anthropic.base_url == emulator
