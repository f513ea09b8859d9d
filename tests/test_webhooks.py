"""Signed webhooks: batchd's deliveries as a receiver sees them, verified by the Standard Webhooks reference
library (`standardwebhooks` from PyPI), never by batchd's own signing code.

The receiver is a real local HTTP server; the daemon is real (in the test's process, or `batchd run` as a
process that the test SIGKILLs mid-delivery). Events are written into batchd.events as the daemon's own
statements write them, and the publisher numbers them: what the deliverer reads is the real outbox.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError
from support import EmulatorHandle, daemon_config, daemon_process, run_batchd, wait_until

from batchd import webhooks
from batchd.config import Settings, WebhookSettings
from batchd.targets import TargetPolicy, TargetRefused, check_url, parse_url

PERMISSIVE = TargetPolicy(allow_private=True)
# Loopback allowed by name, as an operator would allow a network of their own.
LOOPBACK = {"allowed_networks": ["127.0.0.0/8", "::1/128"]}


# -- a receiver ---------------------------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    message_id: str
    timestamp: str
    body: bytes
    payload: Any


@dataclass
class Receiver:
    """A webhook receiver: each path is an endpoint with its own secret and behaviour (`modes`): "ok" (204),
    "fail" (500), "redirect" (307 to /target), "hold" (answers once `release` is set). Every request is
    verified first; a forged or unverifiable one is kept in `rejected` and answered 400."""

    url: str = ""
    secrets: dict[str, str] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)
    most_in_flight: Counter[str] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = dict(request.headers)
        secret = self.secrets.get(request.path)
        try:
            if secret is None:
                raise WebhookVerificationError(f"no endpoint at {request.path}")
            payload = Webhook(secret).verify(body, headers)
        except WebhookVerificationError as error:
            self.rejected.append(f"{request.path}: {error}")
            return web.Response(status=400)
        self.received.append(
            Received(request.path, headers["webhook-id"], headers["webhook-timestamp"], body, payload)
        )
        path = request.path
        self.in_flight[path] += 1
        self.most_in_flight[path] = max(self.most_in_flight[path], self.in_flight[path])
        try:
            mode = self.modes.get(path, "ok")
            if mode == "hold":
                await self.release.wait()
            if mode == "fail":
                return web.Response(status=500, text="receiver says no")
            if mode == "redirect":
                raise web.HTTPTemporaryRedirect(location="/target")
            return web.Response(status=204)
        finally:
            self.in_flight[path] -= 1

    def ids(self, path: str) -> Counter[str]:
        return Counter(item.message_id for item in self.received if item.path == path)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", state.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


async def add_endpoint(
    db: asyncpg.Connection, receiver: Receiver, path: str, *, tenant: str = "acme", types: str | None = None
) -> int:
    endpoint_id, secret = await webhooks.add_endpoint(
        db, tenant, receiver.url + path, webhooks.parse_event_types(types), PERMISSIVE
    )
    receiver.secrets[path] = secret
    return endpoint_id


async def publish(
    db: asyncpg.Connection, count: int, tenant: str = "acme", kind: str = "job.succeeded"
) -> None:
    """`count` events of the tenant, as the daemon's statements write them; the publisher numbers them."""
    await db.execute(
        "INSERT INTO batchd.events (type, tenant_id, job_id, data)"
        " SELECT $3, $2, gen_random_uuid(), jsonb_build_object('status', 'succeeded', 'n', n)"
        " FROM generate_series(1, $1) AS n",
        count,
        tenant,
        kind,
    )
    await db.execute("SELECT pg_notify('batchd_events', '')")


async def statuses(db: asyncpg.Connection, endpoint_id: int) -> Counter[str]:
    rows = await db.fetch(
        "SELECT status, count(*) AS n FROM batchd.webhook_deliveries WHERE endpoint_id = $1 GROUP BY status",
        endpoint_id,
    )
    return Counter({row["status"]: row["n"] for row in rows})


def settings_with(daemon_settings: Callable[..., Settings], **webhook_keys: Any) -> Settings:
    return daemon_settings(webhooks={"poll_interval_s": 0.2, **webhook_keys})


# -- signing, secrets, the schedule (no daemon) -------------------------------------------------------------


def test_a_signature_is_the_standard_one() -> None:
    secret = webhooks.new_secret()
    assert secret.startswith("whsec_")
    assert 24 <= len(base64.b64decode(secret.removeprefix("whsec_"))) <= 64
    assert secret != webhooks.new_secret()
    body = json.dumps({"type": "job.succeeded", "data": {"text": "é"}}).encode()
    import time  # noqa: PLC0415 - the signature is checked against the reference's clock window

    now = int(time.time())
    headers = {
        "webhook-id": "evt_7",
        "webhook-timestamp": str(now),
        "webhook-signature": webhooks.sign(secret, "evt_7", now, body),
    }
    assert Webhook(secret).verify(body, headers) == json.loads(body)
    for tampered in (
        {**headers, "webhook-id": "evt_8"},
        {**headers, "webhook-timestamp": str(now - 1)},
        {**headers, "webhook-signature": webhooks.sign(webhooks.new_secret(), "evt_7", now, body)},
    ):
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(body, tampered)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)


def test_the_back_off_doubles_with_full_jitter_up_to_its_cap_and_dies_after_about_three_days() -> None:
    defaults = WebhookSettings()
    base, cap = defaults.retry_base_s, defaults.retry_cap_s
    ceilings = [webhooks.retry_ceiling_s(n, base, cap) for n in range(1, defaults.max_attempts)]
    assert ceilings[:4] == [base, 2 * base, 4 * base, 8 * base]
    assert max(ceilings) == cap
    assert ceilings[-1] == cap
    assert all(b >= a for a, b in itertools.pairwise(ceilings))
    rng = random.Random(17)
    for n, ceiling in enumerate(ceilings, 1):
        draws = [webhooks.retry_in_s(n, base, cap, rng) for _ in range(200)]
        assert all(0 <= draw <= ceiling for draw in draws)
        assert max(draws) > 0.8 * ceiling, "spread over the whole range"
        assert min(draws) < 0.2 * ceiling, "spread over the whole range"
    # docs/webhooks.md: about 72 hours on average, never more than 143.
    expected_h = webhooks.expected_span_s(defaults.max_attempts, base, cap) / 3600
    assert 70 < expected_h < 74
    assert 142 < sum(ceilings) / 3600 < 144


def test_event_types_are_checked() -> None:
    assert webhooks.parse_event_types(None) is None
    assert webhooks.parse_event_types("job.succeeded, job.failed,job.succeeded") == [
        "job.failed",
        "job.succeeded",
    ]
    for bad in ("", " , ", "job.nope", "job.succeeded,JOB.FAILED"):
        with pytest.raises(ValueError, match="event type"):
            webhooks.parse_event_types(bad)


REFUSED_ADDRESSES = [
    "127.0.0.1",
    "127.8.9.10",
    "::1",
    "0.0.0.0",  # noqa: S104 - an address refused, not bound
    "::",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",  # shared address space (CGNAT)
    "169.254.169.254",  # cloud metadata
    "fe80::1",
    "fe80::1%eth0",
    "fc00::1",
    "fd12:3456::1",
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",  # documentation
    "198.18.0.1",  # benchmarking
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b:1::1",
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
]


@pytest.mark.parametrize("address", REFUSED_ADDRESSES)
def test_non_public_addresses_are_refused(address: str) -> None:
    reason = TargetPolicy().refusal(address)
    assert reason is not None
    assert address in reason
    with pytest.raises(TargetRefused):
        TargetPolicy().check_address(address)
    assert TargetPolicy(allow_private=True).refusal(address) is None


@pytest.mark.parametrize("address", ["93.184.215.14", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert TargetPolicy().refusal(address) is None


def test_allowed_networks_allow_exactly_themselves() -> None:
    policy = TargetPolicy.from_settings(WebhookSettings(allowed_networks=["10.20.0.0/16", "fd00::/8"]))
    assert policy.refusal("10.20.3.4") is None
    assert policy.refusal("fd00::5") is None
    assert policy.refusal("10.21.0.1") is not None
    assert policy.refusal("127.0.0.1") is not None
    with pytest.raises(ValueError, match="not a network"):
        WebhookSettings(allowed_networks=["10.0.0.0/33"])
    with pytest.raises(ValueError, match="must exceed timeout_s"):
        WebhookSettings(timeout_s=30, lease_s=30)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/x", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("gopher://example.com/", "http:// or https://"),
        ("example.com/hook", "http:// or https://"),
        ("http:///path", "must name a host"),
        ("https://user:pw@example.com/", "credentials"),
        ("https://example.com:0/", "port"),
        ("https://example.com:99999/", "not a URL"),
        ("https://example.com/ x", "spaces"),
        ("https://example.com/" + "x" * 2048, "at most 2048"),
    ],
)
def test_urls_batchd_will_not_use(url: str, why: str) -> None:
    with pytest.raises(TargetRefused, match=why):
        parse_url(url)


async def test_a_host_is_refused_for_what_it_resolves_to() -> None:
    with pytest.raises(TargetRefused, match="loopback"):
        await check_url("http://localhost:8080/hook", TargetPolicy())
    with pytest.raises(TargetRefused, match="private"):
        await check_url("https://[::ffff:192.168.0.1]/hook", TargetPolicy())
    # Spellings of 127.0.0.1 that are not IP literals to Python, but that the resolver reads as one.
    for disguised in ("127.1", "2130706433", "0x7f000001", "0177.0.0.1"):
        with pytest.raises(TargetRefused, match="loopback"):
            await check_url(f"http://{disguised}:8080/hook", TargetPolicy())
    with pytest.raises(TargetRefused, match="does not resolve"):
        await check_url("https://no-such-host.invalid/hook", TargetPolicy())
    await check_url("http://localhost:8080/hook", PERMISSIVE)


# -- delivery through a daemon ------------------------------------------------------------------------------


async def test_every_event_is_delivered_signed_with_its_own_id_to_the_endpoints_that_want_it(
    db: asyncpg.Connection,
    receiver: Receiver,
    daemon_settings: Callable[..., Settings],
    start_daemon: Callable[[Settings], Any],
) -> None:
    every = await add_endpoint(db, receiver, "/every")
    failed_only = await add_endpoint(db, receiver, "/failed", types="job.failed")
    await add_endpoint(db, receiver, "/globex", tenant="globex")
    async with start_daemon(settings_with(daemon_settings, **LOOPBACK)):
        await publish(db, 5)
        await publish(db, 2, kind="job.failed")
        await publish(db, 3, tenant="globex")

        async def delivered() -> bool:
            return await statuses(db, every) == {"delivered": 7} and await statuses(db, failed_only) == {
                "delivered": 2
            }

        await wait_until(delivered, timeout=20)
        await wait_until(lambda: _count(receiver, "/globex", 3), timeout=20)
    assert receiver.rejected == []
    assert receiver.ids("/every") == Counter(f"evt_{n}" for n in range(1, 8))
    assert receiver.ids("/failed") == Counter({"evt_6": 1, "evt_7": 1})
    assert receiver.ids("/globex") == Counter({"evt_1": 1, "evt_2": 1, "evt_3": 1}), "the tenant's own count"
    first = next(item for item in receiver.received if item.path == "/every" and item.message_id == "evt_1")
    assert first.payload["type"] == "job.succeeded"
    assert first.payload["data"]["tenant"] == "acme"
    assert first.payload["data"]["n"] == 1
    assert first.payload["timestamp"] == first.payload["data"]["at"]
    # A tenant's endpoint gets nothing of another tenant's.
    assert all(
        item.payload["data"]["tenant"] == "globex" for item in receiver.received if item.path == "/globex"
    )


async def _count(receiver: Receiver, path: str, count: int) -> bool:
    return sum(receiver.ids(path).values()) >= count


async def test_failures_back_off_then_die_disable_the_endpoint_and_retry_brings_them_back(  # noqa: PLR0917
    db: asyncpg.Connection,
    receiver: Receiver,
    daemon_settings: Callable[..., Settings],
    start_daemon: Callable[[Settings], Any],
    tmp_path: Path,
    database_url: str,
) -> None:
    endpoint = await add_endpoint(db, receiver, "/flaky")
    receiver.modes["/flaky"] = "fail"
    settings = settings_with(daemon_settings, retry_base_s=0.2, retry_cap_s=0.4, max_attempts=3, **LOOPBACK)
    async with start_daemon(settings) as daemon:
        await publish(db, 1)

        async def disabled() -> bool:
            return bool(
                await statuses(db, endpoint) == {"dead": 1}
                and await db.fetchval(
                    "SELECT disabled_at FROM batchd.webhook_endpoints WHERE id = $1", endpoint
                )
            )

        await wait_until(disabled, timeout=20)
        assert receiver.ids("/flaky") == {"evt_1": 3}, "max_attempts, the same id every time"
        sample = daemon.metrics.registry.get_sample_value
        assert [
            sample("batchd_webhook_attempts_total", {"outcome": kind}) for kind in ("failed", "dead")
        ] == [2, 1]
        times = [float(item.timestamp) for item in receiver.received if item.message_id == "evt_1"]
        assert times == sorted(times), "a timestamp per attempt"
        (row,) = await db.fetch(
            "SELECT attempts, last_status, last_error, first_attempt_at, last_attempt_at"
            " FROM batchd.webhook_deliveries WHERE endpoint_id = $1",
            endpoint,
        )
        assert (row["attempts"], row["last_status"], row["last_error"]) == (3, 500, "receiver says no")
        assert row["last_attempt_at"] > row["first_attempt_at"]
        (endpoint_row,) = await db.fetch("SELECT * FROM batchd.webhook_endpoints WHERE id = $1", endpoint)
        assert endpoint_row["failures"] == 3
        assert "3 failed attempts" in endpoint_row["disabled_reason"]

        # Disabled: new events are not enqueued for it.
        await publish(db, 1)
        await wait_until(lambda: _cursor_at(db, 2))
        assert await statuses(db, endpoint) == {"dead": 1}

        # The operator fixes the receiver and retries: the dead delivery goes again, from attempt one.
        receiver.modes["/flaky"] = "ok"
        code, out, err = await run_batchd(
            "webhook", "retry", str(endpoint), "--config", str(_config(tmp_path, database_url)), cwd=tmp_path
        )
        assert code == 0, err
        assert "1 dead deliveries" in out
        await wait_until(lambda: _statuses_are(db, endpoint, {"delivered": 1}), timeout=20)
        assert receiver.ids("/flaky") == {"evt_1": 4}
        assert sample("batchd_webhook_attempts_total", {"outcome": "delivered"}) == 1
        await wait_until(lambda: _none_in_flight(daemon))
        assert await db.fetchval("SELECT failures FROM batchd.webhook_endpoints WHERE id = $1", endpoint) == 0

        # One delivery again, whatever became of it: same id, same body.
        delivery = await db.fetchval(
            "SELECT id FROM batchd.webhook_deliveries WHERE endpoint_id = $1 AND message_id = 'evt_1'",
            endpoint,
        )
        code, out, err = await run_batchd(
            "webhook", "retry", "--delivery", str(delivery), "--config", str(_config(tmp_path, database_url)),
            cwd=tmp_path,
        )  # fmt: skip
        assert code == 0, err
        await wait_until(lambda: _ids_seen(receiver, "/flaky", "evt_1", 5), timeout=20)
        bodies = {item.body for item in receiver.received if item.message_id == "evt_1"}
        assert len(bodies) == 1


async def _none_in_flight(daemon: Any) -> bool:
    return bool(daemon.metrics.registry.get_sample_value("batchd_webhooks_in_flight") == 0)


async def _cursor_at(db: asyncpg.Connection, seq: int) -> bool:
    return bool(await db.fetchval("SELECT enqueued_seq FROM batchd.webhook_log") >= seq)


async def _statuses_are(db: asyncpg.Connection, endpoint: int, expected: dict[str, int]) -> bool:
    return await statuses(db, endpoint) == expected


async def _ids_seen(receiver: Receiver, path: str, message_id: str, times: int) -> bool:
    return receiver.ids(path)[message_id] >= times


def _config(tmp_path: Path, database_url: str) -> Path:
    path = tmp_path / "cli.toml"
    path.write_text(f'[database]\nurl = "{database_url}"\n')
    return path


async def test_one_success_keeps_an_endpoint_enabled_when_a_delivery_dies(
    db: asyncpg.Connection,
    receiver: Receiver,
    daemon_settings: Callable[..., Settings],
    start_daemon: Callable[[Settings], Any],
) -> None:
    endpoint = await add_endpoint(db, receiver, "/partly")
    settings = settings_with(daemon_settings, retry_base_s=0.5, retry_cap_s=0.5, max_attempts=2, **LOOPBACK)
    async with start_daemon(settings):
        receiver.modes["/partly"] = "fail"
        await publish(db, 1)
        await wait_until(lambda: _ids_seen(receiver, "/partly", "evt_1", 1), timeout=20)
        # Between its first attempt and its last, another delivery to the endpoint succeeds.
        receiver.modes["/partly"] = "ok"
        await publish(db, 1)
        await wait_until(lambda: _ids_seen(receiver, "/partly", "evt_2", 1), timeout=20)
        receiver.modes["/partly"] = "fail"
        await wait_until(lambda: _statuses_are(db, endpoint, {"dead": 1, "delivered": 1}), timeout=20)
    assert (
        await db.fetchval("SELECT disabled_at FROM batchd.webhook_endpoints WHERE id = $1", endpoint) is None
    )


async def test_redirects_are_not_followed(
    db: asyncpg.Connection,
    receiver: Receiver,
    daemon_settings: Callable[..., Settings],
    start_daemon: Callable[[Settings], Any],
) -> None:
    endpoint = await add_endpoint(db, receiver, "/moved")
    receiver.modes["/moved"] = "redirect"
    receiver.secrets["/target"] = receiver.secrets["/moved"]
    async with start_daemon(settings_with(daemon_settings, max_attempts=1, **LOOPBACK)):
        await publish(db, 1)
        await wait_until(lambda: _statuses_are(db, endpoint, {"dead": 1}), timeout=20)
    (row,) = await db.fetch("SELECT last_status, last_error FROM batchd.webhook_deliveries")
    assert row["last_status"] == 307
    assert "redirect" in row["last_error"]
    assert "/target" in row["last_error"]
    assert receiver.ids("/moved") == {"evt_1": 1}
    assert receiver.ids("/target") == {}, "the redirect's target was never asked"


async def test_a_private_target_is_refused_at_delivery_time_too(
    db: asyncpg.Connection,
    receiver: Receiver,
    daemon_settings: Callable[..., Settings],
    start_daemon: Callable[[Settings], Any],
) -> None:
    """Endpoints added while loopback was allowed (or whose name resolved elsewhere then): the deliverer
    checks the addresses it connects to, by IP literal and by name."""
    by_ip = await add_endpoint(db, receiver, "/ip")
    by_name, secret = await webhooks.add_endpoint(
        db, "acme", receiver.url.replace("127.0.0.1", "localhost") + "/name", None, PERMISSIVE
    )
    receiver.secrets["/name"] = secret
    async with start_daemon(settings_with(daemon_settings, max_attempts=1)):
        await publish(db, 1)

        async def both_dead() -> bool:
            return all([await statuses(db, by_ip) == {"dead": 1}, await statuses(db, by_name) == {"dead": 1}])

        await wait_until(both_dead, timeout=20)
    errors = {
        row["endpoint_id"]: row["last_error"]
        for row in await db.fetch("SELECT * FROM batchd.webhook_deliveries")
    }
    assert errors[by_ip].startswith("refused: 127.0.0.1 is a loopback address")
    assert errors[by_name].startswith("refused: localhost: ")
    assert "loopback" in errors[by_name]
    assert receiver.received == []
    assert receiver.rejected == []


@pytest.mark.slow
async def test_a_slow_endpoint_delays_no_other_and_holds_only_its_own_slots_across_daemons(
    db: asyncpg.Connection,
    receiver: Receiver,
    daemon_settings: Callable[..., Settings],
    start_daemon: Callable[[Settings], Any],
) -> None:
    slow = await add_endpoint(db, receiver, "/slow")
    fast = await add_endpoint(db, receiver, "/fast")
    receiver.modes["/slow"] = "hold"
    settings = settings_with(
        daemon_settings, concurrency_per_endpoint=2, max_in_flight=8, timeout_s=60, lease_s=90, **LOOPBACK
    )
    async with start_daemon(settings), start_daemon(settings):
        await publish(db, 12)
        await wait_until(lambda: _statuses_are(db, fast, {"delivered": 12}), timeout=20)

        async def slow_full() -> bool:
            return receiver.in_flight["/slow"] == 2

        await wait_until(slow_full, timeout=20)
        assert receiver.most_in_flight["/slow"] == 2, (
            "two daemons, at most concurrency_per_endpoint in flight"
        )
        assert sum(receiver.ids("/slow").values()) == 2
        receiver.release.set()
        await wait_until(lambda: _statuses_are(db, slow, {"delivered": 12}), timeout=30)
    assert receiver.most_in_flight["/slow"] == 2
    assert receiver.ids("/slow") == Counter(f"evt_{n}" for n in range(1, 13))


# -- a daemon killed mid-delivery ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_daemon_killed_mid_delivery_loses_nothing_and_repeats_only_with_the_same_id(
    db: asyncpg.Connection, receiver: Receiver, emulator: EmulatorHandle, database_url: str, tmp_path: Path
) -> None:
    events = 40
    endpoint = await add_endpoint(db, receiver, "/hook")
    receiver.modes["/hook"] = "hold"
    config = daemon_config(
        tmp_path / "batchd.toml",
        database_url,
        emulator.url,
        events={"poll_interval_s": 0.5},
        webhooks={
            "allow_private_targets": True,
            "poll_interval_s": 0.2,
            "concurrency_per_endpoint": 4,
            "timeout_s": 4,
            "lease_s": 5,
            "retry_base_s": 0.2,
            "retry_cap_s": 1,
        },
    )
    log = tmp_path / "daemon.log"
    await publish(db, events // 2)
    async with daemon_process(config, log) as first:
        # Four requests held open at the receiver, the rest waiting their turn: kill -9 now.
        await wait_until(lambda: _holding(receiver, 4), timeout=30)
        first.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(first.wait(), timeout=10) == -signal.SIGKILL
    held = set(receiver.ids("/hook"))
    assert len(held) == 4
    # More events while no daemon runs; the held requests are answered to a dead peer (the receiver did its
    # work, batchd never heard).
    await publish(db, events - events // 2)
    receiver.modes["/hook"] = "ok"
    receiver.release.set()
    async with daemon_process(config, log):
        await wait_until(lambda: _statuses_are(db, endpoint, {"delivered": events}), timeout=60)
    assert receiver.rejected == []
    seen = receiver.ids("/hook")
    assert set(seen) == {f"evt_{n}" for n in range(1, events + 1)}, "every event, none lost"
    repeated = {message_id for message_id, times in seen.items() if times > 1}
    assert held <= repeated, "the attempts cut by the kill were sent again"
    assert repeated <= held, "nothing else was sent twice"
    for message_id in repeated:
        bodies = {item.body for item in receiver.received if item.message_id == message_id}
        assert len(bodies) == 1, "a repeat is the same message: same id, same body"


async def _holding(receiver: Receiver, count: int) -> bool:
    return receiver.in_flight["/hook"] >= count


# -- the commands -------------------------------------------------------------------------------------------


async def test_the_webhook_commands(db: asyncpg.Connection, database_url: str, tmp_path: Path) -> None:
    config = _config(tmp_path, database_url)

    async def batchd(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        return await run_batchd("webhook", *args, "--config", str(config), cwd=tmp_path, env=env)

    allow = {"BATCHD_WEBHOOKS__ALLOW_PRIVATE_TARGETS": "true"}
    code, out, err = await batchd(
        "add", "acme", "http://127.0.0.1:9/hook", "--events", "job.failed", env=allow
    )
    assert code == 0, err
    endpoint_line, secret_line = out.splitlines()
    endpoint = int(endpoint_line.removeprefix("endpoint "))
    secret = secret_line.removeprefix("secret ")
    assert secret.startswith("whsec_")
    assert "shown this once" in err
    Webhook(secret)  # the reference library takes it as it is printed
    code, out, err = await batchd("add", "globex", "http://localhost:9/", "--json", env=allow)
    assert code == 0, err
    added = json.loads(out)
    assert added["tenant_id"] == "globex"
    assert added["secret"].startswith("whsec_")

    one_each = {**allow, "BATCHD_WEBHOOKS__MAX_ENDPOINTS_PER_TENANT": "1"}
    code, out, err = await batchd("add", "acme", "http://127.0.0.1:9/again", env=one_each)
    assert (code, out) == (1, ""), err
    assert (
        err == "batchd: tenant 'acme' has 1 webhook endpoints already ([webhooks] max_endpoints_per_tenant)\n"
    )

    code, out, _ = await batchd("list")
    assert code == 0
    assert "acme" in out
    assert "globex" in out
    assert "job.failed" in out
    assert secret not in out
    code, out, _ = await batchd("list", "acme", "--json")
    listed = json.loads(out)
    assert [row["id"] for row in listed] == [endpoint]
    assert "secret" not in listed[0]
    code, out, _ = await batchd("log", str(endpoint))
    assert code == 0
    assert "no delivery" in out

    refusals = [
        (("add", "acme", "http://127.0.0.1:9/"), 65, "loopback"),
        (("add", "acme", "http://169.254.169.254/latest/meta-data/"), 65, "link-local"),
        (("add", "acme", "http://[::ffff:10.0.0.1]/"), 65, "private"),
        (("add", "acme", "ftp://example.com/"), 65, "http:// or https://"),
        (("add", "acme", "http://user:pw@127.0.0.1/"), 65, "credentials"),
        (("add", " acme", "http://8.8.8.8/"), 65, "tenant name"),
        (("add", "acme", "http://8.8.8.8/", "--events", "job.nope"), 65, "unknown event types"),
        (("remove", "999"), 1, "no webhook endpoint 999"),
        (("log", "999"), 1, "no webhook endpoint 999"),
        (("retry", "999"), 1, "no webhook endpoint 999"),
        (("retry", "--delivery", "999"), 1, "no webhook delivery 999"),
    ]
    for args, status, message in refusals:
        code, out, err = await batchd(*args)
        assert (code, out) == (status, ""), (args, err)
        assert err.startswith("batchd: "), err
        assert err.count("\n") == 1, err
        assert "Traceback" not in err, err
        assert message in err, (args, err)
    code, _, err = await batchd("remove", "not-a-number")
    assert code == 2
    assert "whole number" in err

    code, out, err = await batchd("remove", str(endpoint))
    assert code == 0, err
    assert await db.fetchval("SELECT count(*) FROM batchd.webhook_endpoints") == 1


async def test_the_pruner_keeps_events_webhooks_have_not_enqueued_and_prunes_the_finished_log(
    db: asyncpg.Connection,
) -> None:
    from batchd import deliverer, pruner  # noqa: PLC0415
    from batchd.publisher import publish as number  # noqa: PLC0415

    endpoint = await webhooks.add_endpoint(db, "acme", "http://127.0.0.1:9/", None, PERMISSIVE)
    await publish(db, 3)
    await number(db, 100)
    await db.execute("UPDATE batchd.events SET published_at = now() - interval '30 days'")
    assert await pruner.prune_events(db, 86_400, 100) == 0, "not enqueued yet: kept"
    assert await deliverer.enqueue(db, 2) == 3
    assert await pruner.prune_events(db, 86_400, 100) == 3
    await db.execute(
        "UPDATE batchd.webhook_deliveries SET status = 'delivered', finished_at = now() - interval '8 days'"
        " WHERE event_seq <= 2"
    )
    assert await pruner.prune_webhook_deliveries(db, 7 * 86_400, 1, 1.0) == 2
    assert await statuses(db, endpoint[0]) == {"pending": 1}


# -- a tenant's own endpoints over HTTP ---------------------------------------------------------------------


async def test_a_tenant_manages_its_own_endpoints_over_http_and_sees_no_other(
    db: asyncpg.Connection,
    tokens: dict[str, str],
    serve: Any,
    session: Any,
    receiver: Receiver,
) -> None:
    acme = {"Authorization": f"Bearer {tokens['acme']}"}
    globex = {"Authorization": f"Bearer {tokens['globex']}"}
    async with serve() as (_, url):
        hooks = f"{url}/v1/webhooks"
        # The daemon's policy: no private targets. A tenant cannot aim batchd at the operator's network.
        for target in (
            receiver.url + "/a",
            "http://169.254.169.254/latest/",
            "http://[::1]:80/",
            "file:///x",
        ):
            async with session.post(hooks, json={"url": target}, headers=acme) as response:
                assert response.status == 400, target
                assert (await response.json())["error"]["field"] == "url"
        assert await db.fetchval("SELECT count(*) FROM batchd.webhook_endpoints") == 0
        async with session.post(
            hooks, json={"url": "https://8.8.8.8/hook", "events": ["job.failed"]}, headers=acme
        ) as response:
            assert response.status == 201
            created = await response.json()
            assert response.headers["Location"] == f"/v1/webhooks/{created['id']}"
        assert created["tenant_id"] == "acme"
        assert created["events"] == ["job.failed"]
        Webhook(created["secret"])
        stored = await db.fetchval("SELECT secret FROM batchd.webhook_endpoints WHERE id = $1", created["id"])
        assert stored == created["secret"]
        # Another tenant's: refused to write, invisible to read.
        async with session.post(
            hooks, json={"url": "https://8.8.8.8/", "tenant_id": "acme"}, headers=globex
        ) as response:
            assert response.status == 403
        async with session.get(hooks, headers=globex) as response:
            assert (await response.json()) == {"endpoints": []}
        own = f"{hooks}/{created['id']}"
        for method, path in (
            ("GET", own),
            ("GET", f"{own}/deliveries"),
            ("POST", f"{own}/retry"),
            ("DELETE", own),
        ):
            async with session.request(method, path, headers=globex) as response:
                assert response.status == 404, (method, path)
        async with session.get(hooks, headers=acme) as response:
            (listed,) = (await response.json())["endpoints"]
        assert listed["id"] == created["id"]
        assert "secret" not in listed
        async with session.delete(own, headers=acme) as response:
            assert response.status == 200
    assert await db.fetchval("SELECT count(*) FROM batchd.webhook_endpoints") == 0
