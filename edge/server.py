"""Listeners, signals and shutdown: one edge process (the store follower is edge.store.follower).

Start-up order matters for correctness:
1. the platform and default certificates load (a broken one stops start-up
   with its error: there is nothing sensible to serve without them);
2. the store watch is armed, *then* the snapshot is loaded, so a change
   made in between is seen (twice, harmlessly) rather than missed;
3. listeners open last, when every name can be answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge import config as config_mod
from edge import logs
from edge.config import Config
from edge.errors import StartupError
from edge.listen import bind, check_free, listen_probe
from edge.proxy.exchange import ListenerInfo, ProxyContext
from edge.proxy.protocol import HttpProxyProtocol
from edge.proxy.routing import Router
from edge.store.base import Store, StoreError, challenge_key, parse_cert_key, tls_alpn_key
from edge.store.follower import FollowError, StoreFollower
from edge.store.index import Index
from edge.store.localcopy import CopyWriter, LocalCopy
from edge.store.open import open_copy, open_store
from edge.store.shared import SharedFollower, SharedIndex
from edge.tls.acceptor import TlsAcceptor, TlsInfo
from edge.tls.contexts import ContextCache
from edge.tls.fixed import FixedContexts, load_fixed_contexts, reload_certificates
from edge.tls.intake import PlainListener
from edge.tls.loader import ContextLoader
from edge.tls.selector import Selector

if TYPE_CHECKING:
    from edge.acme.manager import AcmeManager

log = logging.getLogger(__name__)


@dataclass
class Edge:
    """One running edge process (the only one, or one of the workers)."""

    config: Config
    fixed: FixedContexts | None = None  # built here unless a supervisor did it
    reuse_port: bool = False  # workers share their ports with SO_REUSEPORT
    serve_admin: bool = True  # with workers, only the first serves the admin API
    store: Store = field(init=False)
    index: Index = field(init=False)
    selector: Selector = field(init=False)
    cache: ContextCache = field(init=False)
    router: Router = field(init=False)
    acceptor: TlsAcceptor = field(init=False)
    acme: AcmeManager | None = None
    https_sockets: list[socket.socket] = field(default_factory=list)
    http_servers: list[PlainListener] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False
    follower: StoreFollower = field(init=False)
    copy: LocalCopy | None = None
    copy_writer: CopyWriter | None = None

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="edge-tls")

    # --- start ---------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        platform = cfg.platform
        fixed = self.fixed or load_fixed_contexts(cfg)
        platform_ctx, default_ctx = fixed.platform, fixed.default

        self.store = open_store(cfg)
        shared = self._open_index()
        self.selector = Selector(
            self.index, platform.domain, platform.strict_sni, default_is_platform=default_ctx is platform_ctx
        )
        self.loader = ContextLoader(self.store, self.executor, lambda: self.config.tls.min_version,
                                    keep=min(cfg.tls.context_cache_size, 4096), copy=self.copy)
        self.cache = ContextCache(cfg.tls.context_cache_size, self.loader.load)
        self.router = Router(self.index, self.selector, platform.domain, cfg.proxy.pool_size)
        self.proxy = ProxyContext(
            router=self.router,
            config=cfg.proxy,
            access_log=cfg.log.access_log,
            challenge=lambda token: self.store.get(challenge_key(token)),
        )
        await self._follow(shared)

        self.acceptor = TlsAcceptor(
            listener_context=default_ctx,
            platform_context=platform_ctx,
            selector=self.selector,
            cache=self.cache,
            handshake_timeout=cfg.proxy.handshake_timeout,
            challenge_certificate=lambda domain: self.store.get(tls_alpn_key(domain)),
            fetch_name=self.fetch_name,
        )
        probe = listen_probe(cfg.server.takeover, worker=self.reuse_port)
        self.https_sockets = [bind(address, probe) for address in cfg.server.https]
        # Redirects from port 80 point at the first TLS listener's real port.
        https_port = self.https_sockets[0].getsockname()[1] if self.https_sockets else 443
        for sock in self.https_sockets:
            listener = ListenerInfo(b"https", str(sock.getsockname()[1]).encode(), https_port)
            self.acceptor.listen(sock, self._https_protocol_factory(listener))
        loop = asyncio.get_running_loop()
        for address in cfg.server.http:
            sock = bind(address, probe)
            listener = ListenerInfo(b"http", str(sock.getsockname()[1]).encode(), https_port)
            # Not loop.create_server: see PlainListener (the descriptor limit).
            self.http_servers.append(
                PlainListener(sock, lambda listener=listener: HttpProxyProtocol(self.proxy, listener, None))
            )
        if self.serve_admin:  # one process per node cleans up
            self._tasks.append(loop.create_task(self._recover_store()))
        if cfg.acme.enabled and self.serve_admin:
            # One manager per node (the process serving the admin API); the
            # store's per-domain lock keeps the nodes of a fleet from ordering twice.
            from edge.acme.manager import AcmeManager  # the ACME client stack loads only when used

            self.acme = AcmeManager(cfg.acme, self.store, self.index)
            self.follower.acme = self.acme
            self._tasks.append(loop.create_task(self.acme.run()))
        if cfg.server.admin is not None and self.serve_admin:
            await self._start_admin()
        if cfg.server.metrics is not None and self.serve_admin:  # scrapers and probes, no token
            from edge.admin.app import serve_probes

            try:
                self.metrics_runner = await serve_probes(self, cfg.server.metrics.host, cfg.server.metrics.port)
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {cfg.server.metrics}: {exc.strerror}") from None
            log.info("metrics and health on %s", cfg.server.metrics)
        if self.reuse_port:  # a worker: publish counters for the one serving /metrics
            from edge.metrics import publish_counters

            self._tasks.append(asyncio.get_running_loop().create_task(publish_counters(self)))
        log.info(
            "edge serving https on %s, http on %s (platform domain %s; %d apps; %s)",
            ", ".join(self.bound_https()), ", ".join(self.bound_http()), platform.domain, len(self.index.apps),
            "loading the rest of the store" if self.index.loading else "store loaded",
        )

    def _open_index(self) -> bool:
        """True: this worker reads the shared index (edge.store.shared) its first worker writes."""
        self.copy = open_copy(self.config, rebuild=not self.reuse_port)
        shared = self.copy is not None and self.reuse_port and not self.serve_admin and self.copy.state()[2] > 0
        if self.copy is not None and self.serve_admin:
            self.copy_writer = CopyWriter(self.copy)
        self.index = SharedIndex(self.copy) if shared else Index()  # type: ignore[arg-type,assignment]
        log.info("worker reads the shared index %s", self.config.store.index_dir) if shared else None
        return shared

    async def _follow(self, shared: bool) -> None:
        self.follower = SharedFollower(self.copy) if shared else StoreFollower(  # type: ignore[assignment,arg-type]
            self.store, self.index, on_cert=self.loader.remember, copy=self.copy, writer=self.copy_writer)
        try:
            await self.follower.start()
        except FollowError as exc:
            raise StartupError(str(exc)) from None

    def _https_protocol_factory(self, listener: ListenerInfo) -> Callable[[TlsInfo], asyncio.Protocol]:
        proxy = self.proxy

        def factory(info: TlsInfo) -> asyncio.Protocol:
            return HttpProxyProtocol(proxy, listener, info)

        return factory

    async def _start_admin(self) -> None:
        from aiohttp import web

        from edge.admin.app import make_app

        address = self.config.server.admin
        assert address is not None
        self.admin_runner = web.AppRunner(make_app(self, self.config.server.admin_token), access_log=None)
        await self.admin_runner.setup()
        site = web.TCPSite(self.admin_runner, address.host, address.port, reuse_port=True)  # for a --takeover
        try:
            if not self.config.server.takeover:
                check_free(address)
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot serve the admin API on {address}: {exc.strerror}") from None
        except StartupError as exc:
            raise StartupError(f"cannot serve the admin API: {exc}") from None
        self.admin_address = site.name
        log.info("admin API on %s", site.name)

    async def health_problems(self) -> list[str]:
        """Why edge should not get traffic now; empty when it is fine."""
        problems = []
        if self._stopping:
            problems.append("shutting down")
        if not self.https_sockets or any(s.fileno() < 0 for s in self.https_sockets):
            problems.append("TLS listeners closed")
        if self.follower.stopped():
            problems.append("the store follower stopped")
        if self.copy is None:  # with a local copy, an unreachable store changes nothing served
            problems += await self.store_problems()
        return problems

    async def store_problems(self) -> list[str]:
        try:
            return await self.store.check()
        except StoreError as exc:
            return [f"store: {exc}"]


    def bound_https(self) -> list[str]:
        return [f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in self.https_sockets]

    def bound_http(self) -> list[str]:
        return [f"{s.getsockname()[0]}:{s.getsockname()[1]}" for server in self.http_servers for s in server.sockets]

    def corrupted_entries(self, limit: int = 100) -> dict[str, str]:
        """Damaged store entries (key -> why) this process knows of, for /healthz:
        those the index could not parse (their last good version, if this
        process saw one, stays served) and those OpenSSL refused at a handshake."""
        held = {m.store_key for key in self.loader.damaged if (parts := parse_cert_key(key))
                for m in self.index.certs.get(parts[0], ())}
        # A damaged version since replaced or deleted is no longer a problem.
        found = {**self.index.corrupted(limit), **{k: v for k, v in self.loader.damaged.items() if k in held}}
        return dict(sorted(found.items())[:limit])

    async def _recover_store(self) -> None:
        """Remove what writes killed midway left (temporary files); in the
        background: it walks the whole store, and serving does not need it."""
        try:
            removed = await self.store.recover()
        except StoreError as exc:
            log.error("store: cannot remove the debris of interrupted writes: %s", exc)
            return
        for path in removed:
            log.warning("store: removed %s, left by an interrupted write", path)

    # --- store following (edge.store.follower) ----------------------------------------------
    async def fetch_name(self, name: str) -> None:
        await self.follower.fetch_name(name)

    async def reload_store(self) -> None:
        await self.follower.reload()

    @property
    def reloads(self) -> int:
        return self.follower.reloads

    @property
    def sync_lag(self) -> float:
        return self.follower.sync_lag

    async def reload_config(self) -> bool:
        """SIGHUP: read the configuration again and apply what can change live.

        A configuration that does not validate is refused with its error and
        the running one kept. Certificates are loaded into the live contexts,
        so the listener keeps its session-ticket keys (shared by workers).
        """
        if self.config.path is None:
            return False
        try:
            new = config_mod.load(self.config.path)
            fixed = self.fixed or FixedContexts(self.acceptor.platform_context, self.acceptor.listener_context)
            await asyncio.get_running_loop().run_in_executor(None, reload_certificates, new, fixed)
        except (config_mod.ConfigError, StartupError) as exc:
            log.error("configuration refused, the running one is kept: %s", exc)
            return False
        old = self.config
        for what, before, after in (
            ("[server] https", old.server.https, new.server.https),
            ("[server] http", old.server.http, new.server.http),
            ("[server] admin", old.server.admin, new.server.admin),
            ("[server] admin_hosts", old.server.admin_hosts, new.server.admin_hosts),
            ("[server] metrics", old.server.metrics, new.server.metrics),
            ("[server] workers", old.server.workers, new.server.workers),
            ("[store]", old.store, new.store),
            ("[platform] domain", old.platform.domain, new.platform.domain),
            ("[acme] enabled", old.acme.enabled, new.acme.enabled),
        ):
            if before != after:
                log.warning("%s changed: it takes effect at the next restart", what)
        self.selector.strict_sni = new.platform.strict_sni
        self.cache.size = new.tls.context_cache_size
        if new.tls.min_version != old.tls.min_version:
            # Built contexts carry the version they were built with and their
            # cache key does not name it: drop them, the next handshakes rebuild.
            self.cache.clear()
        self.proxy.config = new.proxy  # new connections take the new timeouts and limits
        self.proxy.access_log = new.log.access_log
        if self.acme is not None and new.acme.enabled:
            self.acme.config = new.acme  # the next order uses the new directory, key types, back-off
        logging.getLogger().setLevel(new.log.level.upper())
        # What needs a restart stays as it runs until then.
        platform = dataclasses.replace(new.platform, domain=old.platform.domain)
        self.config = dataclasses.replace(new, server=old.server, store=old.store, platform=platform)
        log.info("configuration reloaded from %s", new.path)
        return True

    # --- stop ---------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stopping

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace`` s), then close."""
        self._stopping = True
        self.follower.writer = None  # a successor (an upgrade) writes the local copy from now on
        self.acceptor.stop_listening()
        for server in self.http_servers:
            server.close()
        await self.acceptor.finish_pending(min(grace, self.config.proxy.handshake_timeout))
        self.acceptor.close_pending()
        loop = asyncio.get_running_loop()
        self.proxy.draining = True
        for connection in list(self.proxy.connections):
            connection.drain()
        deadline = loop.time() + grace
        while self.proxy.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.proxy.connections:
            log.warning("grace period over: closing %d connections with requests in flight",
                        len(self.proxy.connections))
            for connection in list(self.proxy.connections):
                if connection.transport is not None:
                    connection.transport.abort()
        tasks = [*self._tasks, *self.follower.tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.router.close()
        for runner in (getattr(self, "admin_runner", None), getattr(self, "metrics_runner", None)):
            if runner is not None:
                await runner.cleanup()
        with contextlib.suppress(Exception):
            await self.store.close()
        for closing in (self.copy_writer, self.copy):  # queued copy writes land before exit
            closing.close() if closing is not None else None
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _log_failure(task: asyncio.Task[None]) -> None:
    """A signal's work that failed says why (a task's exception is otherwise lost)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_coro().__qualname__, exc_info=task.exception())


async def serve(
    config: Config, fixed: FixedContexts | None = None, reuse_port: bool = False, serve_admin: bool = True
) -> None:
    edge = Edge(config, fixed=fixed, reuse_port=reuse_port, serve_admin=serve_admin)
    try:
        await edge.start()
    except StoreError as exc:
        raise StartupError(str(exc)) from None
    loop = asyncio.get_running_loop()
    background: set[asyncio.Task[None]] = set()

    def spawn(coro) -> None:
        task = loop.create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)
        task.add_done_callback(_log_failure)

    def on_term() -> None:
        if not edge.stopping:
            log.info("stopping")
            spawn(edge.stop())

    async def reload() -> None:
        await edge.reload_config()
        await edge.reload_store()

    def on_hup() -> None:
        log.info("SIGHUP: reloading the configuration and the store")
        spawn(reload())

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGUSR1, logs.reopen)
    await edge.wait_stopped()
