"""`batchd run`: the daemon, put together.

Named side tasks — the listener, the flusher, the sync sender (sync.py), the supervisor, the publisher, the
webhooks' deliverer (deliverer.py), the event hub (with HTTP), the pruner, the API's check (health.py), and
under systemd the notifier (systemd.py:
READY=1, STATUS=, WATCHDOG=1, STOPPING=1) — run until SIGTERM or SIGINT; if any
dies the daemon stops with an error (systemd restarts it) rather than limp on half-deaf. On a signal it
stops claiming, cancels the batch tasks (each is safe to stop at any await: the database holds every
state), hands its leases back so another instance can carry on at once, deletes its row in
batchd.instances, and exits within `shutdown_timeout_s`.

Start-up says how far it got, at info: `daemon.starting` (the configuration file, the database, the API),
`daemon.database_connected` (the schema checked), the API's check (`api.ok`, `api.key_refused`,
`api.unreachable`), `daemon.ready`. A failure before ready ends the command with one line (cli.py); a
refused key or an unreachable API does not stop the daemon: it starts, is not ready (`/readyz`), sends
nothing, and checks again until the API takes the key.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import asyncpg
import structlog
from aiohttp import web

from . import (
    __version__,
    fairness,
    flow,
    health,
    instances,
    migrate,
    pruner,
    results,
    rollups,
    status,
    store,
    systemd,
)
from .config import Settings, admin_token, api_key
from .context import Context, new_instance_id
from .deliverer import Deliverer
from .events import TOKENS_CHANNEL, EventHub, HubCollector
from .flusher import Flusher
from .listener import JOBS_CHANNEL, Listener
from .metrics import Metrics
from .provider import Provider
from .publisher import EVENTS_CHANNEL, PUBLISHED_CHANNEL, Publisher
from .ratelimit import RateLimiter
from .readings import Readings
from .redact import redact_url
from .server import create_app
from .store import Routing
from .supervisor import Supervisor
from .sync import SyncSender

log = structlog.get_logger("batchd.daemon")

SHUTDOWN_TIMEOUT_S = 7.0
# How long sync calls in flight may finish on SIGTERM before they are cancelled and their jobs handed back;
# within SHUTDOWN_TIMEOUT_S, with time left to hand them back.
SYNC_DRAIN_S = 5.0
KEEPALIVE_TIMEOUT_S = 75.0
POOL_CLOSE_TIMEOUT_S = 1.0
STATUS_TIMEOUT_S = 5.0  # systemd's STATUS= says "database unreachable" when its query takes longer
DEREGISTER_TIMEOUT_S = 1.0  # deleting this daemon's row at the end; a row left is pruned after a day


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        serve_http: bool = True,
        api_key: str | None = None,
        admin_token: str | None = None,
        config_file: str | None = None,
    ) -> None:
        """`api_key` and `admin_token`, when given, take the place of the configured ones (the demo's);
        `config_file` is the file the settings came from, for the start-up log."""
        self.settings = settings
        self.serve_http = serve_http
        self._api_key = api_key
        self._admin_token = admin_token
        self.config_file = config_file
        self.instance_id = new_instance_id()
        self.ready = asyncio.Event()
        self.ctx: Context | None = None
        self.flusher: Flusher | None = None
        self.supervisor: Supervisor | None = None
        self.sync: SyncSender | None = None
        self.listener: Listener | None = None
        self.hub: EventHub | None = None
        self.deliverer: Deliverer | None = None
        self.http_url: str | None = None
        self.metrics = Metrics()  # this daemon's own registry, served at GET /metrics
        self.readings = Readings(  # the database's, read when asked
            self.metrics.registry, settings.http, Routing.from_settings(settings.routing)
        )

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Runs until `stop` is set (or a signal arrives when `stop` is None)."""
        settings = self.settings
        key, admin = self._secrets()
        stop = stop or _stop_on_signals()
        provider = self._provider(key)
        pool: asyncpg.Pool | None = None
        runner: web.AppRunner | None = None
        tasks: set[asyncio.Task[None]] = set()
        notifier = systemd.Notifier.from_environment()
        ctx: Context | None = None
        try:
            pool = await self._open_database()
            ctx = self.ctx = Context(
                pool=pool,
                settings=settings,
                provider=provider,
                metrics=self.metrics,
                instance_id=self.instance_id,
            )
            self.metrics.identify(ctx.instance_id)
            await instances.heartbeat(ctx)
            hub = self.hub = EventHub(pool, settings.events) if self.serve_http else None
            if hub is not None:
                await hub.start()
            tasks, listener, supervisor = self._start_parts(ctx, hub, notifier)
            if hub is not None:
                runner = await self._start_http(pool, listener, hub, admin, provider.health)
            # After the HTTP server: a port in use ends the start before the API is asked anything.
            tasks.add(asyncio.create_task(self._watch_api(ctx), name="api-check"))
            await listener.connected.wait()
            await self._announce_ready(ctx, notifier)
            stopper = asyncio.create_task(stop.wait(), name="stop")
            done, _ = await asyncio.wait({*tasks, stopper}, return_when=asyncio.FIRST_COMPLETED)
            ctx.stopping.set()
            notifier.stopping()
            log.info("daemon.stopping")
            stopper.cancel()
            # Streams end at once (clients reconnect elsewhere) while the daemon winds down.
            closing = hub.close_all(SHUTDOWN_TIMEOUT_S) if hub else asyncio.sleep(0)
            await asyncio.gather(self._shutdown(tasks, supervisor, self.sync), closing)
            for task in done - {stopper}:
                if not task.cancelled() and task.exception() is not None:
                    raise RuntimeError(f"the {task.get_name()} task died") from task.exception()
        finally:
            for task in tasks:
                task.cancel()  # only those a failed start left running
            if runner is not None:
                await runner.cleanup()
            if ctx is not None:
                await _deregister(ctx)
            await provider.close()
            notifier.close()
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), timeout=POOL_CLOSE_TIMEOUT_S)
                except TimeoutError:
                    pool.terminate()  # a connection still held by a cancelled step: the database rolls back
            log.info("daemon.stopped")

    def _provider(self, key: str) -> Provider:
        """The API's client, unchecked (nothing is sent before the first check has answered: health.py); and
        the start-up's first line, naming what the daemon is about to use."""
        settings = self.settings
        provider = Provider(
            key,
            base_url=settings.anthropic.base_url,
            limiter=RateLimiter(settings.anthropic.requests_per_minute),
            timeout_s=settings.anthropic.timeout_s,
            on_call=self.metrics.api_call,
        )
        provider.health = health.ApiHealth(provider.health.url, state=health.UNCHECKED)
        log.info(
            "daemon.starting",
            version=__version__,
            instance_id=self.instance_id,
            config=self.config_file,
            # Which API and database, as the SDK and the pool are given them: a variable misspelt or left to
            # another tool shows here as the default.
            database=redact_url(settings.database.url),
            api=provider.health.url,
            http=f"{settings.http.host}:{settings.http.port}" if self.serve_http else None,
        )
        return provider

    async def _open_database(self) -> asyncpg.Pool:
        """The pool, on a database with this batchd's schema, and the settings the database uses published."""
        settings = self.settings
        pool = await store.create_pool(
            settings.database.url,
            min_size=settings.database.pool_min_size,
            max_size=settings.database.pool_max_size,
        )
        try:
            async with pool.acquire() as connection:
                schema = await migrate.require_current(connection)
            log.info("daemon.database_connected", database=redact_url(settings.database.url), schema=schema)
            await _publish_settings(pool, settings)
        except BaseException:
            pool.terminate()
            raise
        return pool

    async def _announce_ready(self, ctx: Context, notifier: systemd.Notifier) -> None:
        """Ready once the API's first check has answered (or had its time): READY=1 and `daemon.ready`, which
        says the API's state. A refused key does not stop the start: the daemon serves, sends nothing, and
        says why at `/readyz` until the key works."""
        api = ctx.provider.health
        with suppress(TimeoutError):
            timeout_s = health.check_timeout(ctx.settings.anthropic.timeout_s) + 1
            await asyncio.wait_for(api.checked.wait(), timeout=timeout_s)
        await instances.heartbeat(ctx)  # the row says what the check found from the moment it is ready
        _freeze_startup_objects()
        self.ready.set()
        notifier.ready()
        log.info(
            "daemon.ready",
            instance_id=ctx.instance_id,
            http=self.http_url,
            api=api.url,
            database=redact_url(ctx.settings.database.url),
            api_state=api.state,
        )

    async def _watch_api(self, ctx: Context) -> None:
        """The API's check (health.watch). A key the daemon was given is the key; a configured one is read
        again from its source before each new check while it is refused."""
        settings = ctx.settings

        def reload_key() -> str:
            return api_key(settings).get_secret_value()

        await health.watch(
            ctx.provider,
            stopping=ctx.stopping,
            backoff=ctx.backoff,
            timeout_s=health.check_timeout(settings.anthropic.timeout_s),
            reload_key=None if self._api_key else reload_key,
        )

    def _start_parts(
        self, ctx: Context, hub: EventHub | None, notifier: systemd.Notifier
    ) -> tuple[set[asyncio.Task[None]], Listener, Supervisor]:
        """Wires the parts together and starts each as a named task."""
        supervisor = self.supervisor = Supervisor(ctx)
        flusher = self.flusher = Flusher(ctx, on_batch=supervisor.start)
        # Read through the flusher at each check, not bound now: its budget_clock may be replaced later.
        sync = self.sync = SyncSender(ctx, budget_clock=lambda: flusher.budget_clock())  # noqa: PLW0108

        def on_batch_closed() -> None:
            # A batch that closes frees in-flight room: the flusher may have been waiting for it. And the
            # batch p90 may have moved: the sync sender judges waiting `auto` deadlines again.
            flusher.wake()
            sync.wake()

        def on_jobs() -> None:
            # New jobs (or a changed budget): the flusher looks at the queue, the sync sender routes.
            flusher.wake()
            sync.wake()

        supervisor.on_batch_closed = on_batch_closed

        def on_api_change() -> None:
            # The API ok again: what the gate held looks at once. Any change: the row says it soon.
            flusher.wake()
            sync.wake()
            supervisor.wake()

        ctx.provider.health.on_change = on_api_change
        deliverer = self.deliverer = Deliverer(ctx)
        on_published = _on_published(deliverer, hub)
        publisher = Publisher(ctx, on_published=on_published)
        channels = {JOBS_CHANNEL: on_jobs, EVENTS_CHANNEL: publisher.wake, PUBLISHED_CHANNEL: on_published}
        if hub is not None:
            channels[TOKENS_CHANNEL] = hub.tokens_changed

        def on_connect() -> None:
            flusher.wake()
            sync.wake()
            supervisor.wake()
            publisher.wake()
            deliverer.wake()
            if hub is not None:
                hub.wake()
                hub.tokens_changed()  # a revocation may have come while the listener was away

        listener = self.listener = Listener(ctx.settings.database.url, channels, on_connect=on_connect)
        tasks = {
            asyncio.create_task(listener.run(ctx.stopping), name="listener"),
            asyncio.create_task(flusher.run(), name="flusher"),
            asyncio.create_task(sync.run(), name="sync"),
            asyncio.create_task(supervisor.run(), name="supervisor"),
            asyncio.create_task(publisher.run(), name="publisher"),
            asyncio.create_task(deliverer.run(), name="webhooks"),
            asyncio.create_task(pruner.run(ctx), name="pruner"),
            asyncio.create_task(rollups.run(ctx), name="rollups"),
            asyncio.create_task(flow.run(ctx), name="flow"),
            asyncio.create_task(ctx.metrics.watch_loop_lag(ctx.stopping), name="loop-lag"),
        }
        if hub is not None:
            tasks.add(asyncio.create_task(hub.run(ctx.stopping, ctx.backoff), name="events"))
        if notifier.enabled:

            async def status_line() -> str:
                line = await status.summary_line(ctx.pool, hub.open_streams if hub else 0, STATUS_TIMEOUT_S)
                # `systemctl status` says first that nothing is being sent, and why.
                problem = ctx.provider.health.problem()
                return line if problem is None else f"{problem}; sending nothing; {line}"

            notifying = notifier.run(status_line, ctx.settings.daemon.status_interval_s)
            tasks.add(asyncio.create_task(notifying, name="systemd"))
        return tasks, listener, supervisor

    @asynccontextmanager
    async def running(self, ready_timeout_s: float = 30.0) -> AsyncIterator[Daemon]:
        """Runs the daemon in this event loop for the block: ready on entry, stopped cleanly on exit.
        A daemon that fails to start raises here, with its own error."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.run(stop), name="daemon")
        ready = asyncio.create_task(self.ready.wait(), name="daemon-ready")
        try:
            await asyncio.wait({task, ready}, timeout=ready_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("the daemon stopped before it was ready")
            if not self.ready.is_set():
                raise TimeoutError(f"the daemon was not ready within {ready_timeout_s} s")
            yield self
        finally:
            ready.cancel()
            stop.set()
            await asyncio.wait_for(task, timeout=SHUTDOWN_TIMEOUT_S + 5)

    def _secrets(self) -> tuple[str, str | None]:
        """The API key and the admin token (None: no admin), each the one given or else the configured one.
        Read before anything connects: a bad one is a configuration error (exit 78) whether or not the
        database answers. The admin token is read only when there is an HTTP server to use it."""
        key = self._api_key or api_key(self.settings).get_secret_value()
        if self._admin_token or not self.serve_http:
            return key, self._admin_token
        configured = admin_token(self.settings)
        return key, configured.get_secret_value() if configured else None

    async def _start_http(
        self, pool: asyncpg.Pool, listener: Listener, hub: EventHub, admin: str | None, api: health.ApiHealth
    ) -> web.AppRunner:
        self.metrics.registry.register(HubCollector(hub))  # the streams, read at scrape time
        app = create_app(
            pool,
            listener.connected.is_set,
            admin,
            hub,
            self.settings.http.secure_cookie,
            metrics=self.metrics,
            readings=self.readings,
            session_max_age_s=self.settings.http.session_max_age_s,
            api_problem=api.problem,
            settings=self.settings,
        )
        # A stream whose client leaves is cancelled at once (its slot and subscription freed), not at its next
        # heartbeat; every handler is safe to cancel (the database rolls back what it was doing).
        # keepalive_timeout: an idle or never-finished connection holds a file descriptor this long, not
        # aiohttp's default hour (streams are not idle: the timer runs only between requests).
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, keepalive_timeout=KEEPALIVE_TIMEOUT_S
        )
        await runner.setup()
        await web.TCPSite(runner, self.settings.http.host, self.settings.http.port).start()
        host, port = runner.addresses[0][:2]
        self.http_url = f"http://{host}:{port}"
        return runner

    async def _shutdown(
        self, tasks: set[asyncio.Task[None]], supervisor: Supervisor, sync: SyncSender | None
    ) -> None:
        async def wind_down() -> None:
            # The flusher, the sync sender's loop and the supervisor's lease loop first: a batch recorded (or
            # a lease taken, a sync job claimed) after the leases are handed back would stay leased to this
            # dead instance for lease_s. Then sync calls in flight get SYNC_DRAIN_S to finish.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(supervisor.stop(), sync.stop(SYNC_DRAIN_S) if sync else asyncio.sleep(0))

        with suppress(TimeoutError):
            await asyncio.wait_for(wind_down(), timeout=SHUTDOWN_TIMEOUT_S)


def _on_published(deliverer: Deliverer, hub: EventHub | None) -> Callable[[], None]:
    """Events numbered, here or by another daemon: streams fan them out, webhooks enqueue them."""

    def wake() -> None:
        deliverer.wake()
        if hub is not None:
            hub.wake()

    return wake


async def _deregister(ctx: Context) -> None:
    """Deletes this daemon's row in batchd.instances; one left behind (the database away) is pruned later."""
    try:
        await asyncio.wait_for(instances.remove(ctx), timeout=DEREGISTER_TIMEOUT_S)
    except store.DB_ERRORS as error:
        log.warning("instance.remove_failed", instance_id=ctx.instance_id, error=str(error) or repr(error))


def _freeze_startup_objects() -> None:
    """Moves what start-up made (imports, the SDK, settings: ~180k objects) out of the collector's sight.
    Every full collection walked them all, ~120 ms with the event loop stopped, the whole p99 of SSE
    delivery under load (docs/benchmarks.md); frozen, a full collection takes ~20 ms."""
    gc.collect()
    gc.freeze()


async def _publish_settings(pool: asyncpg.Pool, settings: Settings) -> None:
    """Writes what of batchd.toml the database uses itself: the tenant limits (it refuses INSERTs past
    max_queued) and the prices (the statement that applies results joins them)."""
    async with pool.acquire() as connection:
        await fairness.publish(connection, settings)
        await results.publish_prices(connection, settings.pricing)


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop
