"""deploy/README.md's "Step by step, on Debian 12", run as written: every command block of that section, in
its order, with bash, then a job from a producer's INSERT to its completion read through nginx.

What stands in for a host of its own:
- a scratch directory for `/`: the guide's absolute paths (MOVED) are rewritten under it, in the commands
  and in the files they install (the unit's, nginx's snippet, batchd.toml);
- a PostgreSQL cluster of its own (initdb, its socket in the scratch `/run/postgresql`, a free port), so that
  the guide's names (database `batchd`, roles `batchd`, `batchd_owner`, `batchd_producer`, `alice`) are used
  as they are, and all of it goes when the cluster does. It trusts local connections: peer authentication
  would need an OS account per role;
- `apt` and `systemctl` are recorded, not run (the Makefile's `nginx` target installs the packages; the
  test then starts the daemon as the unit says and nginx with the snippet); `make` gets the test's own venv;
- the emulator instead of the API, and free ports instead of 80, 443 and 8080 (edits an operator could make).

As root (CI), the commands run as the guide says (`runuser -u postgres`), the daemon as `nobody` (for the
unit's dynamic user) and nginx's workers as `nobody`; otherwise as the test's own user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import tomllib
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from sse_support import Collector
from support import (
    CHECKOUT_LOCAL,
    QUICK,
    log_tail,
    run_command,
    start_emulator,
    to_toml,
    unit_settings,
    wait_until,
)

import batchd
from batchd.client import Message, messages
from batchd.config import ADMIN_CREDENTIAL_NAME, CREDENTIAL_NAME, EventsSettings, HttpSettings
from batchd.dev import embedded_pg
from batchd.tenants import TOKEN_PREFIX

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "deploy" / "README.md"
SECTION = "## Step by step, on Debian 12"

# The guide's steps in order: a new one fails the test until it is run here.
STEPS = [
    "packages",
    "dist",
    "install",
    "configure",
    "configure-edit",
    "database",
    "producer-password",
    "service",
    "certificate",
    "nginx",
    "nginx-reload",
    "operator-role",
    "operator",
    "check-stream",
    "check-job",
]
NOT_RUN = {
    # The scratch cluster trusts local connections: no password is asked for.
    "producer-password": "psql's \\password asks for the password at the terminal",
}
# The guide's absolute paths that the scratch directory stands in for.
MOVED = (
    "/opt/batchd",
    "/etc/batchd",
    "/etc/nginx",
    "/etc/ssl",
    "/etc/systemd",
    "/usr/local/bin",
    "/run/postgresql",
)
SERVER_NAME = "batchd.example.com"
# Stand-ins for the tools that cannot run here; each records its arguments.
PRELUDE = r"""
set -euo pipefail
umask 022
apt() { echo "apt $*" >> "$DEPLOY_RECORD"; }
systemctl() { echo "systemctl $*" >> "$DEPLOY_RECORD"; }
make() { command make -o "$DEPLOY_VENV/.installed" VENV="$DEPLOY_VENV" "$@"; }
nginx() { command "$DEPLOY_NGINX" -p "$DEPLOY_NGINX_PREFIX" -c "$DEPLOY_NGINX_CONF" -e stderr "$@"; }
"""
# Without root, the commands that the guide runs as another account run as the test's own user.
NOT_ROOT_PRELUDE = r"""
runuser() { while [ "$1" != "--" ]; do shift; done; shift; "$@"; }
"""


@dataclass(frozen=True)
class Step:
    name: str
    language: str
    text: str


def guide_steps() -> list[Step]:
    """The section's command blocks, each after its `<!-- step: NAME -->` marker."""
    guide = GUIDE.read_text()
    start = guide.index(SECTION)
    end = guide.index("\n## ", start + len(SECTION))
    section = guide[start:end]
    steps = [
        Step(name, language, text)
        for name, language, text in re.findall(
            r"<!-- step: ([\w-]+) -->\n```(\w+)\n(.*?)\n```\n", section, flags=re.DOTALL
        )
    ]
    fences = re.findall(r"^```\w+$", section, flags=re.MULTILINE)
    assert len(fences) == len(steps), "every command block of the section has a step marker"
    return steps


def commands(script: str) -> list[str]:
    """A shell script's commands: continued lines joined, `&&` lists split, comments and spacing dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    lines = (line.split(" # ")[0] for line in joined.splitlines())
    return [" ".join(part.split()) for line in lines for part in line.split(" && ") if part.strip()]


def test_the_readmes_steps_are_the_guides() -> None:
    """The README's "Run it for real" is the guide, shortened: each of its commands is one of the guide's,
    in the guide's order, so the two cannot tell an operator different things."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run it for real") :]
    (block,) = re.findall(r"```sh\n(.*?)\n```", section[: section.index("\n## ")], flags=re.DOTALL)
    guide = [command for step in guide_steps() if step.language == "sh" for command in commands(step.text)]
    ours = commands(block)
    assert len(ours) >= 10
    missing = [command for command in ours if command not in guide]
    assert not missing, f"README commands that the guide does not run: {missing}"
    at = 0
    for command in ours:
        assert command in guide[at:], f"the README runs {command!r} out of the guide's order"
        at = guide.index(command, at) + 1


def test_every_step_of_the_guide_is_run_or_says_why_not() -> None:
    steps = guide_steps()
    assert [step.name for step in steps] == STEPS
    assert set(NOT_RUN) <= set(STEPS)
    # The guide's nginx snippet passes to [http]'s defaults, which its configuration step keeps.
    snippet = (ROOT / "deploy" / "nginx" / "batchd.conf").read_text()
    http = HttpSettings()
    assert f"server {http.host}:{http.port};" in snippet
    edit = tomllib.loads(next(step.text for step in steps if step.name == "configure-edit"))
    assert not {"host", "port"} & set(edit.get("http", {}))
    # The event streams' location is unbuffered, and waits for a heartbeat far longer than one takes.
    events = snippet[snippet.index("location = /v1/events") :]
    assert "proxy_buffering off;" in events
    (hours,) = re.findall(r"proxy_read_timeout (\d+)h;", events)
    assert int(hours) * 3600 >= 10 * EventsSettings().heartbeat_s


def moved(text: str, root: Path) -> str:
    """`text` with the guide's absolute paths under `root`."""
    pattern = "|".join(re.escape(path) for path in MOVED)
    return re.sub(rf"(?<![\w./-])({pattern})(?![\w.-])", lambda match: f"{root}{match[1]}", text)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def postgres_binaries() -> Path:
    """The newest PostgreSQL server that Debian's packages installed, else the embedded one's."""
    installed = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if (path / "initdb").exists()]
    if installed:
        return max(installed, key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0)
    return embedded_pg.find_binaries()


def account(name: str) -> pwd.struct_passwd | None:
    """The account a command runs as, as root; None: the test's own user."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pytest.fail(f"the guide runs commands as the {name!r} account, which this machine lacks")


def give(path: Path, owner: pwd.struct_passwd | None) -> None:
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


@dataclass
class Host:
    """The scratch `/`, the guide's steps, and the ports that stand in for 5432, 8080, 443 and 80."""

    root: Path
    steps: dict[str, Step]
    ports: dict[str, int]
    env: dict[str, str] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)

    @property
    def record(self) -> Path:
        """What the stand-ins for apt and systemctl were asked, a line each."""
        return self.root / "recorded"

    @property
    def release(self) -> Path:
        """Where the wheel and the runtime lock are copied to, and the guide's commands run."""
        return self.root / "release"

    def path(self, absolute: str) -> Path:
        return Path(moved(absolute, self.root))

    def recorded(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    def script(self, name: str) -> str:
        """The guide's step `name` as bash runs it: the stand-ins, then its commands, paths moved."""
        found = self.steps[name]
        assert found.language == "sh", name
        self.ran.append(name)
        prelude = PRELUDE + (NOT_ROOT_PRELUDE if os.geteuid() != 0 else "")
        return prelude + moved(found.text, self.root)

    async def step(self, name: str, cwd: Path | None = None, **env: str) -> str:
        """Runs the guide's step `name` with bash, in the release's directory unless `cwd` says otherwise;
        its standard output."""
        try:
            return await run(
                "bash", "-c", self.script(name), env={**self.env, **env}, cwd=cwd or self.release, timeout=120
            )
        except AssertionError as error:
            error.add_note(f"step {name!r} of deploy/README.md:\n{self.steps[name].text}")
            raise


@contextlib.contextmanager
def scratch_root() -> Iterator[Path]:
    """A short path (sockets live in it), readable by the accounts the steps run as; removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="batchd-deploy-"))
    try:
        root.chmod(0o755)
        for directory in (
            "etc/nginx/sites-available",
            "etc/nginx/sites-enabled",
            "etc/ssl/certs",
            "etc/systemd/system",
            "usr/local/bin",
            "opt",
            "run/postgresql",
            "release",
            "nginx",
        ):
            (root / directory).mkdir(parents=True)
        (root / "etc/ssl/private").mkdir(mode=0o700)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 60, **kwargs: Any) -> str:
    """Runs `argv`, which must succeed; its standard output."""
    code, out, err = await run_command(*argv, env=env, timeout=timeout, **kwargs)
    assert code == 0, f"{argv} exited {code}:\n{out}\n{err}"
    return out


@asynccontextmanager
async def cluster(root: Path, port: int) -> AsyncIterator[str]:
    """A PostgreSQL cluster of the test's own, its socket in the scratch /run/postgresql, on 127.0.0.1:port
    too (the producer's connection in the guide); the superuser is `postgres`. Yields its superuser's URL."""
    binaries = postgres_binaries()
    owner = account("postgres")
    data, sockets = root / "pgdata", root / "run" / "postgresql"
    data.mkdir(mode=0o700)
    sockets.chmod(0o755)  # every account reaches the socket, as in Debian's /run/postgresql
    give(data, owner)
    give(sockets, owner)
    as_owner: dict[str, Any] = (
        {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []} if owner else {}
    )
    await run(
        str(binaries / "initdb"),
        "-D",
        str(data),
        "-U",
        "postgres",
        "-A",
        "trust",
        "--no-sync",
        "-E",
        "UTF8",
        "--locale=C",
        cwd=root,
        **as_owner,
    )
    options = (
        f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={sockets} -c fsync=off"
    )
    log = data / "server.log"  # where its owner may write
    pg_ctl = str(binaries / "pg_ctl")
    await run(pg_ctl, "-D", str(data), "-o", options, "-l", str(log), "-w", "start", cwd=root, **as_owner)
    try:
        yield f"postgresql://postgres@/postgres?host={sockets}&port={port}"
    finally:
        await run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop", cwd=root, **as_owner)


def configure(host: Host, overrides: dict[str, dict[str, Any]]) -> None:
    """The guide's edit of /etc/batchd/batchd.toml (its TOML, paths moved), then the test's own."""
    path = host.path("/etc/batchd/batchd.toml")
    settings = tomllib.loads(path.read_text())
    host.ran.append("configure-edit")
    for layer in (tomllib.loads(moved(host.steps["configure-edit"].text, host.root)), overrides):
        for section, keys in layer.items():
            settings[section] = {**settings.get(section, {}), **keys}
    path.write_text(to_toml(settings))


@asynccontextmanager
async def as_systemd_runs(host: Host, log: Path) -> AsyncIterator[None]:
    """batchd.service as installed in /etc/systemd/system: its ExecStart, Environment= and credentials
    (copies of the LoadCredential= files in a directory of the service's own), as `nobody` when root; ready
    when it says READY=1 on the notify socket (`systemctl enable --now` returns then). Stopped with SIGTERM,
    as `systemctl stop` does, at the end."""
    unit = unit_settings(moved(host.path("/etc/systemd/system/batchd.service").read_text(), host.root))
    service_user = account("nobody")
    credentials = host.root / "run" / "credentials" / "batchd.service"
    credentials.mkdir(parents=True, mode=0o700)
    give(credentials, service_user)
    for line in unit["LoadCredential"]:
        name, _, source = line.partition(":")
        shutil.copyfile(source, credentials / name)
        (credentials / name).chmod(0o400)
        give(credentials / name, service_user)
    notify_socket = f"@batchd-deploy-{uuid.uuid4().hex}"
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        **dict(line.split("=", 1) for line in unit.get("Environment", [])),
        "CREDENTIALS_DIRECTORY": str(credentials),
        "NOTIFY_SOCKET": notify_socket,
        # The scratch cluster's socket is not 5432's, which database.url leaves implicit.
        "PGPORT": str(host.ports["postgres"]),
    }
    as_service: dict[str, Any] = (
        {"user": service_user.pw_uid, "group": service_user.pw_gid, "extra_groups": []}
        if service_user
        else {}
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + notify_socket[1:])
        notify.setblocking(False)  # noqa: FBT003 - the socket API's own flag
        (exec_start,) = unit["ExecStart"]
        with log.open("ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                *shlex.split(exec_start),
                env=env,
                cwd="/",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                **as_service,
            )
        try:
            said: list[str] = []

            async def ready() -> bool:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        said.extend(notify.recv(65536).decode().splitlines())
                assert process.returncode is None, f"batchd exited {process.returncode}"
                return "READY=1" in said

            await wait_until(ready, timeout=60, interval=0.05)
            yield
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=30) == 0
        except BaseException as error:
            error.add_note(log_tail(log))
            raise
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def nginx_program() -> str:
    found = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None:
        pytest.fail("nginx is missing: `make nginx` installs Debian's package")
    return found


def nginx_main_config(host: Host, prefix: Path) -> Path:
    """What Debian's /etc/nginx/nginx.conf gives the snippet (an http block that includes sites-enabled,
    gzip on), with a pid, logs and temporary files of the test's own; workers as nobody when root. nginx
    ignores batchd's `X-Accel-Buffering: no` here, so that what keeps the stream unbuffered is the snippet's
    own proxy_buffering."""
    workers = "user nobody nogroup;" if os.geteuid() == 0 else ""
    temporary = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = host.path("/etc/nginx/nginx.conf")
    config.write_text(f"""
daemon off;
worker_processes 1;
{workers}
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    access_log {prefix / "access.log"};
{temporary}
    gzip on;
    proxy_ignore_headers X-Accel-Buffering;
    include {host.path("/etc/nginx/sites-enabled")}/*;
}}
""")
    return config


def edit_snippet(host: Host) -> None:
    """The operator's edits of the installed snippet, here: the scratch paths, and the test's ports (on
    127.0.0.1: IPv4 only) instead of 80, 443 and 8080."""
    path = host.path("/etc/nginx/sites-available/batchd")
    text = moved(path.read_text(), host.root)
    text = re.sub(r"^\s*listen \[::\]:.*\n", "", text, flags=re.MULTILINE)
    for standard, port in (("443", host.ports["https"]), ("80", host.ports["http"])):
        text, count = re.subn(rf"listen {standard}\b", f"listen 127.0.0.1:{port}", text)
        assert count == 1, f"listen {standard}"
    text, count = re.subn(r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{host.ports['daemon']};", text)
    assert count == 1
    path.write_text(text)


@asynccontextmanager
async def nginx_running(
    program: str, config: Path, prefix: Path, tls: ssl.SSLContext, port: int
) -> AsyncIterator[None]:
    """nginx with the test's main configuration, in the foreground; ready once /readyz answers through it
    (the daemon's, over TLS); stopped at the end."""
    url = f"https://127.0.0.1:{port}"
    log = prefix / "error.log"
    with (prefix / "stderr.log").open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            program,
            "-p",
            str(prefix),
            "-c",
            str(config),
            "-e",
            "stderr",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    try:

        async def answers() -> bool:
            assert process.returncode is None, f"nginx exited {process.returncode}"
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                    session.get(f"{url}/readyz", ssl=tls, server_hostname=SERVER_NAME) as response,
                ):
                    return response.status == 200
            except (aiohttp.ClientConnectionError, TimeoutError):
                return False

        await wait_until(answers, timeout=30, interval=0.05)
        yield
    except BaseException as error:
        error.add_note(f"nginx: {log_tail(log)}\n{(prefix / 'stderr.log').read_text(errors='replace')}")
        raise
    finally:
        if process.returncode is None:
            # SIGTERM: nginx's fast stop (SIGQUIT, the graceful one, waits for open streams to end).
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
                await process.wait()


class Stream:
    """A stream's messages as they arrive on a process's standard output (curl -N)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.messages: list[Message] = []
        assert process.stdout is not None
        self._task = asyncio.create_task(self._read(process.stdout))

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await stdout.read(4096):
                yield chunk

        async for message in messages(chunks()):
            self.messages.append(message)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(message.data) for message in self.messages if message.event == kind]

    async def close(self) -> None:
        """Kills the process's group (bash and its curl: it was started in a session of its own)."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        await self.process.wait()
        await asyncio.gather(self._task, return_exceptions=True)


def host_env(host: Host, nginx: str) -> dict[str, str]:
    """The environment the guide's commands run in: the test's, less what would point them elsewhere; a
    Debian root's PATH (its python3) after the scratch /usr/local/bin; libpq's defaults at the scratch
    cluster; what the stand-ins need."""
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("BATCHD_", "PYTHON", "VIRTUAL_ENV", "PG", "ANTHROPIC_", "CURL_"))
        and key not in {"CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "PATH"}
    }
    debian = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return {
        **inherited,
        "PATH": f"{host.path('/usr/local/bin')}:{debian}:{os.environ.get('PATH', '')}:{postgres_binaries()}",
        "PGHOST": str(host.path("/run/postgresql")),
        "PGPORT": str(host.ports["postgres"]),
        "DEPLOY_RECORD": str(host.record),
        "DEPLOY_VENV": sys.prefix,
        "DEPLOY_NGINX": nginx,
        "DEPLOY_NGINX_PREFIX": str(host.root / "nginx"),
        "DEPLOY_NGINX_CONF": str(host.path("/etc/nginx/nginx.conf")),
    }


async def install(host: Host, build: Path) -> None:
    """Steps 1 to 3: the packages (recorded), the release built in a copy of this tree at `build`, the
    wheel and the runtime lock installed from the release's directory."""
    await host.step("packages")
    (apt,) = host.recorded()
    assert apt.split()[:2] == ["apt", "install"]
    assert set(apt.split()[2:]) == {"python3-venv", "postgresql", "nginx"}

    shutil.copytree(ROOT, build, ignore=shutil.ignore_patterns(*CHECKOUT_LOCAL))
    await host.step("dist", cwd=build)
    (wheel,) = (build / "dist").glob(f"batchd-{batchd.__version__}-py3-none-any.whl")
    shutil.copy(wheel, host.release)
    shutil.copy(build / "requirements-runtime.lock", host.release)

    out = await host.step("install")
    assert f"batchd {batchd.__version__}" in out
    assert host.path("/usr/local/bin/batchd").resolve() == host.path("/opt/batchd/.venv/bin/batchd")


async def set_up(host: Host, emulator_url: str, superuser: str) -> None:
    """Steps 4 and 5: the configuration (the guide's edit, then the test's emulator, port and quick
    batches) and its secrets, then the database: the schema the owner's, the daemon recorded as `batchd`."""
    await host.step("configure", ANTHROPIC_API_KEY="sk-ant-deploy-test")
    assert host.path("/etc/batchd/batchd.toml").stat().st_mode & 0o777 == 0o644
    for secret in (CREDENTIAL_NAME, ADMIN_CREDENTIAL_NAME):
        assert host.path(f"/etc/batchd/{secret}").stat().st_mode & 0o777 == 0o600
    configure(
        host,
        {
            "anthropic": {"base_url": emulator_url},
            "http": {"port": host.ports["daemon"]},
            "batching": {"max_wait_s": 0.2},
            "polling": {"min_interval_s": 0.05, "max_interval_s": 0.2},
        },
    )

    await host.step("database")
    db = await asyncpg.connect(superuser.replace("/postgres?", "/batchd?"))
    try:
        owners = await db.fetchval(
            "SELECT array_agg(DISTINCT pg_get_userbyid(relowner)) FROM pg_class"
            " WHERE relnamespace = 'batchd'::regnamespace"
        )
        assert owners == ["batchd_owner"]
        assert await db.fetchval(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'batchd'"
        ) == ("batchd_owner")
        assert await db.fetchval("SELECT array_agg(role_name) FROM batchd.daemon_roles") == ["batchd"]

        # Run again without -v daemon (an upgrade's roles.sql, say), roles.sql keeps the daemon it recorded;
        # when the record is ambiguous, it refuses rather than guess.
        await psql_script(host, "roles.sql")
        assert await db.fetchval("SELECT array_agg(role_name) FROM batchd.daemon_roles") == ["batchd"]
        await db.execute("INSERT INTO batchd.daemon_roles VALUES ('batchd_daemon')")
        code, _, err = await psql_script(host, "roles.sql", check=False)
        assert code != 0
        assert "names more than one role (batchd, batchd_daemon)" in err
        await db.execute("DELETE FROM batchd.daemon_roles WHERE role_name = 'batchd_daemon'")
    finally:
        await db.close()


async def psql_script(host: Host, script: str, *, check: bool = True) -> tuple[int, str, str]:
    """The installed deploy/sql/SCRIPT, as the superuser, without variables."""
    path = host.path(f"/opt/batchd/.venv/share/batchd/deploy/sql/{script}")
    argv = ("psql", "-X", "-U", "postgres", "-d", "batchd", "-f", str(path))
    code, out, err = await run_command(*argv, env=host.env, cwd=host.release)
    assert code == 0 or not check, f"{script} exited {code}:\n{out}\n{err}"
    return code, out, err


async def read_the_stream(host: Host, stack: AsyncExitStack, tls: ssl.SSLContext, token: str) -> str:
    """Step 9: a tenant's stream through nginx, read by the guide's curl (its name and port are the test's
    nginx: curl's connect-to, from a .curlrc; it speaks HTTP/2 to this snippet) and by an HTTP/1.1 client
    (where nginx, buffering, held the stream's very first bytes back); the producer's job; and its completion
    reaching both while their responses are still open. The succeeded event's id."""
    curl_home = host.root / "curl"
    curl_home.mkdir()
    (curl_home / ".curlrc").write_text(f"connect-to = {SERVER_NAME}:443:127.0.0.1:{host.ports['https']}\n")
    curl = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        host.script("check-stream"),
        env={**host.env, "TOKEN": token, "CURL_HOME": str(curl_home)},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    stream = Stream(curl)
    stack.push_async_callback(stream.close)
    session = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)))
    try:
        async with asyncio.timeout(30):
            response = await stack.enter_async_context(
                session.get(
                    f"https://127.0.0.1:{host.ports['https']}/v1/events",
                    headers={"Authorization": f"Bearer {token}"},
                    ssl=tls,
                    server_hostname=SERVER_NAME,
                )
            )
    except TimeoutError:
        pytest.fail("nginx sent an HTTP/1.1 stream's response no header within 30 s: it is buffering")
    assert (response.status, response.version) == (200, aiohttp.HttpVersion11)
    http11 = Collector(response)
    stack.push_async_callback(http11.close)

    async def subscribed() -> bool:
        assert curl.returncode is None, f"curl exited {curl.returncode}"
        return any(message.retry is not None for message in stream.messages)

    await wait_until(subscribed, timeout=30)
    await http11.until(lambda collector: any(message.retry is not None for message in collector.messages))
    out = await host.step("check-job")
    (job_id,) = re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", out)

    async def succeeded() -> bool:
        assert curl.returncode is None, f"curl exited {curl.returncode}"
        return any(event["job_id"] == job_id for event in stream.events("job.succeeded"))

    await wait_until(succeeded, timeout=60)
    await http11.until(
        lambda collector: any(
            message.event == "job.succeeded" and json.loads(message.data)["job_id"] == job_id
            for message in collector.events
        )
    )
    assert [event["job_id"] for event in stream.events("job.submitted")] == [job_id]
    (event_id,) = [message.id for message in stream.messages if message.event == "job.succeeded"]
    assert event_id is not None
    return event_id


async def through_nginx(host: Host, tls: ssl.SSLContext, token: str, succeeded_id: str) -> None:
    """What else the snippet passes on: Last-Event-ID (the stream resumes right after it), the admin token
    made in step 4 (it reached the daemon as its credential: /metrics), the dashboard's cookie (Secure behind
    TLS: step 4's secure_cookie), and plain HTTP's redirect."""
    https = f"https://127.0.0.1:{host.ports['https']}"
    admin_token = host.path(f"/etc/batchd/{ADMIN_CREDENTIAL_NAME}").read_text().strip()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": str(int(succeeded_id) - 1)}
        async with (
            asyncio.timeout(30),
            session.get(
                f"{https}/v1/events", headers=headers, ssl=tls, server_hostname=SERVER_NAME
            ) as response,
        ):
            assert response.status == 200
            resumed = await anext(
                message async for message in messages(response.content.iter_any()) if message.is_event
            )
        assert (resumed.id, resumed.event) == (succeeded_id, "job.succeeded")

        headers = {"Authorization": f"Bearer {admin_token}"}
        async with session.get(
            f"{https}/metrics", headers=headers, ssl=tls, server_hostname=SERVER_NAME
        ) as response:
            assert response.status == 200
            assert "batchd_" in await response.text()

        headers = {"Authorization": f"Bearer {token}"}
        async with session.post(
            f"{https}/v1/session", headers=headers, ssl=tls, server_hostname=SERVER_NAME
        ) as response:
            assert response.status == 200, await response.text()
            assert "Secure" in response.headers["Set-Cookie"]

        async with session.get(
            f"http://127.0.0.1:{host.ports['http']}/v1/events",
            headers={"Host": SERVER_NAME},
            allow_redirects=False,
        ) as response:
            assert response.status == 301
            assert response.headers["Location"] == f"https://{SERVER_NAME}/v1/events"


async def test_the_guides_steps_install_and_run_batchd_behind_nginx(tmp_path: Path) -> None:
    steps = {found.name: found for found in guide_steps()}
    assert list(steps) == STEPS
    nginx = nginx_program()
    ports = {name: free_port() for name in ("postgres", "daemon", "https", "http")}
    async with AsyncExitStack() as stack:
        host = Host(root=stack.enter_context(scratch_root()), steps=steps, ports=ports)
        host.env = host_env(host, nginx)
        superuser = await stack.enter_async_context(cluster(host.root, ports["postgres"]))
        emulator = await stack.enter_async_context(start_emulator(QUICK))

        await install(host, tmp_path / "source")
        await set_up(host, emulator.url, superuser)

        # 6. The service: started as systemd would start the unit `systemctl enable --now` named.
        await host.step("service")
        assert host.recorded()[-2:] == ["systemctl daemon-reload", "systemctl enable --now batchd"]
        await stack.enter_async_context(as_systemd_runs(host, host.root / "daemon.log"))

        # 7. A self-signed certificate, the snippet (edited), nginx -t, and nginx as the reload starts it.
        await host.step("certificate")
        await host.step("nginx")
        edit_snippet(host)
        config = nginx_main_config(host, host.root / "nginx")
        await host.step("nginx-reload")
        assert host.recorded()[-1] == "systemctl reload nginx"
        tls = ssl.create_default_context(cafile=host.path("/etc/ssl/certs/batchd.crt"))
        await stack.enter_async_context(
            nginx_running(nginx, config, host.root / "nginx", tls, host.ports["https"])
        )

        # 8. alice's role, then status, a token for tenant acme and a report, as her.
        await host.step("operator-role")
        out = await host.step("operator")
        (token,) = [line for line in out.splitlines() if line.startswith(TOKEN_PREFIX)]

        succeeded_id = await read_the_stream(host, stack, tls, token)
        await through_nginx(host, tls, token, succeeded_id)

        # rls.sql without -v daemon gives the recorded daemon, `batchd`, its policy.
        assert "batchd sees every tenant" in (await psql_script(host, "rls.sql"))[1]
    assert host.ran == [name for name in STEPS if name not in NOT_RUN]
