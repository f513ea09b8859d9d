"""One redactor for database URLs (batchd/redact.py), used by the CLI's messages and the embedded server's
logs: a password never shows, wherever in the URL it was given; everything else that says which server was
meant does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import run_python

from batchd.redact import redact_url

EX_UNAVAILABLE = 69


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://batchd:s3cret@db.example:5432/batchd",
            "postgresql://batchd:***@db.example:5432/batchd",
        ),
        ("postgresql://batchd@db.example/batchd", "postgresql://batchd@db.example/batchd"),
        ("postgresql://db.example/batchd", "postgresql://db.example/batchd"),
        # An unencoded "@" in the password: the user info ends at the last one.
        ("postgres://u:p@ss@h1:5432,h2:5433/db", "postgres://u:***@h1:5432,h2:5433/db"),
        # libpq takes the password as a parameter too.
        (
            "postgresql://batchd@db.example/batchd?sslmode=require&password=s3cret",
            "postgresql://batchd@db.example/batchd?sslmode=require&password=***",
        ),
        (
            "postgresql:///batchd?host=/run/postgresql&sslpassword=k3y",
            "postgresql:///batchd?host=/run/postgresql&sslpassword=***",
        ),
        ("host=db.example password=s3cret dbname=batchd", "host=db.example password=*** dbname=batchd"),
        ("postgresql://u:@h/db", "postgresql://u:***@h/db"),
    ],
)
def test_a_password_never_shows(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)
    assert "k3y" not in redact_url(url)


async def test_the_cli_names_an_unreachable_database_without_its_password(tmp_path: Path) -> None:
    url = "postgresql://batchd:in-userinfo@127.0.0.1:1/batchd?connect_timeout=5&password=in-query"
    (tmp_path / "batchd.toml").write_text(f'[database]\nurl = "{url}"\n')
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "ANTHROPIC_"))}
    code, _, err = await run_python("-m", "batchd", "status", env=environment, cwd=tmp_path)
    assert code == EX_UNAVAILABLE, err
    assert (
        "cannot connect to postgresql://batchd:***@127.0.0.1:1/batchd?connect_timeout=5&password=***" in err
    )
    assert "in-userinfo" not in err
    assert "in-query" not in err
