"""Listeners, the store follower, signals and shutdown: one edge process.

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
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge import config as config_mod
from edge import logs
from edge.config import Address, Config
from edge.proxy.exchange import ListenerInfo, ProxyContext
from edge.proxy.h2proto import AlpnSwitch
from edge.proxy.protocol import HttpProxyProtocol
from edge.proxy.routing import Router
from edge.store.base import (
    APPS,
    ResyncNeeded,
    Store,
    StoreError,
    cert_key,
    challenge_key,
    domain_key,
    tls_alpn_key,
)
from edge.store.index import KEY_TYPES, SOURCES, Index, split_bundle
from edge.store.open import open_store
from edge.tls import contexts, devcert, names
from edge.tls.acceptor import TlsAcceptor, TlsInfo
from edge.tls.contexts import ContextBuildError, ContextCache
from edge.tls.intake import PlainListener
from edge.tls.selector import Selector

if TYPE_CHECKING:
    from edge.acme.manager import AcmeManager

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """edge cannot start; the message says why and what to do."""


def bind(address: Address, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        hint = " (ports under 1024 need root or CAP_NET_BIND_SERVICE)" if address.port < 1024 else ""
        raise StartupError(f"cannot listen on {address}: {exc.strerror}{hint}") from None
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def load_fixed_context(cert: str, key: str, min_version: str) -> ssl.SSLContext:
    ctx = contexts.base_context(min_version)
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise StartupError(f"{exc.filename}: no such file; check [platform] cert/key in the config") from None
    except ssl.SSLError as exc:
        raise StartupError(f"{cert}: OpenSSL refused the certificate or key: {exc.reason or exc}") from None
    return ctx


@dataclass(frozen=True)
class FixedContexts:
    """The always-loaded contexts. Built before workers fork, so every worker's
    listener context shares one set of TLS session-ticket keys."""

    platform: ssl.SSLContext
    default: ssl.SSLContext


def _reload_certificates(cfg: Config, fixed: FixedContexts) -> None:
    """Load the configured platform/default certificates into the live contexts.

    Checked on a scratch context first: a broken file changes nothing.
    """
    pairs = [(fixed.platform, cfg.platform.cert, cfg.platform.key)]
    if cfg.tls.default_cert and cfg.tls.default_key and fixed.default is not fixed.platform:
        pairs.append((fixed.default, cfg.tls.default_cert, cfg.tls.default_key))
    for _ctx, cert, key in pairs:
        load_fixed_context(str(cert), str(key), cfg.tls.min_version)  # raises StartupError when broken
    for ctx, cert, key in pairs:
        ctx.load_cert_chain(str(cert), str(key))


def load_fixed_contexts(cfg: Config) -> FixedContexts:
    contexts.offer_http2(cfg.proxy.http2)  # before any context is built (workers inherit it)
    platform = cfg.platform
    if platform.dev_certificates:
        message = devcert.ensure_dev_certificates(platform.domain, platform.cert, platform.key)
        if message:
            log.warning("%s", message)
    min_version = cfg.tls.min_version
    platform_ctx = load_fixed_context(str(platform.cert), str(platform.key), min_version)
    if cfg.tls.default_cert and cfg.tls.default_key:
        default_ctx = load_fixed_context(str(cfg.tls.default_cert), str(cfg.tls.default_key), min_version)
    else:
        # The platform certificate is the default: one context serves both.
        default_ctx = platform_ctx
    return FixedContexts(platform_ctx, default_ctx)


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
    reloads: int = 0
    _watch_task: asyncio.Task[None] | None = None
    _reload_events: list | None = None  # changes seen while a full reload runs
    _reload_after_load: bool = False
    sync_lag: float = 0.0  # seconds from the last store change to it being applied here

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="edge-tls")

    # --- start ---------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        platform = cfg.platform
        fixed = self.fixed or load_fixed_contexts(cfg)
        platform_ctx, default_ctx = fixed.platform, fixed.default

        self.store = open_store(cfg)
        self.index = Index()
        self.selector = Selector(
            self.index, platform.domain, platform.strict_sni, default_is_platform=default_ctx is platform_ctx
        )
        self.cache = ContextCache(cfg.tls.context_cache_size, self._build_context)
        self.router = Router(self.index, self.selector, platform.domain, cfg.proxy.pool_size)
        self.proxy = ProxyContext(
            router=self.router,
            config=cfg.proxy,
            access_log=cfg.log.access_log,
            challenge=lambda token: self.store.get(challenge_key(token)),
        )
        await self._follow_store()

        self.acceptor = TlsAcceptor(
            listener_context=default_ctx,
            platform_context=platform_ctx,
            selector=self.selector,
            cache=self.cache,
            handshake_timeout=cfg.proxy.handshake_timeout,
            challenge_certificate=lambda domain: self.store.get(tls_alpn_key(domain)),
            fetch_name=self.fetch_name,
        )
        self.https_sockets = [bind(address, self.reuse_port) for address in cfg.server.https]
        # Redirects from port 80 point at the first TLS listener's real port.
        https_port = self.https_sockets[0].getsockname()[1] if self.https_sockets else 443
        for sock in self.https_sockets:
            listener = ListenerInfo(b"https", str(sock.getsockname()[1]).encode(), https_port)
            self.acceptor.listen(sock, self._https_protocol_factory(listener))
        loop = asyncio.get_running_loop()
        for address in cfg.server.http:
            sock = bind(address, self.reuse_port)
            listener = ListenerInfo(b"http", str(sock.getsockname()[1]).encode(), https_port)
            # Not loop.create_server: see PlainListener (the descriptor limit).
            self.http_servers.append(
                PlainListener(sock, lambda listener=listener: HttpProxyProtocol(self.proxy, listener, None))
            )
        if cfg.acme.enabled and self.serve_admin:
            # One manager per node (the process serving the admin API); the
            # store's per-domain lock keeps the nodes of a fleet from ordering twice.
            from edge.acme.manager import AcmeManager  # the ACME client stack loads only when used

            self.acme = AcmeManager(cfg.acme, self.store, self.index)
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

    def _https_protocol_factory(self, listener: ListenerInfo) -> Callable[[TlsInfo], asyncio.Protocol]:
        proxy = self.proxy

        def factory(info: TlsInfo) -> asyncio.Protocol:
            return AlpnSwitch(proxy, listener, info)  # HTTP/2 or HTTP/1.1, as ALPN chose

        return factory

    async def _start_admin(self) -> None:
        from aiohttp import web

        from edge.admin.app import make_app

        address = self.config.server.admin
        assert address is not None
        self.admin_runner = web.AppRunner(make_app(self, self.config.server.admin_token), access_log=None)
        await self.admin_runner.setup()
        site = web.TCPSite(self.admin_runner, address.host, address.port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot serve the admin API on {address}: {exc.strerror}") from None
        self.admin_address = site.name
        log.info("admin API on %s", site.name)

    async def health_problems(self) -> list[str]:
        """Why edge should not get traffic now; empty when it is fine."""
        problems = []
        if self._stopping:
            problems.append("shutting down")
        if not self.https_sockets or any(s.fileno() < 0 for s in self.https_sockets):
            problems.append("TLS listeners closed")
        if self._watch_task is not None and self._watch_task.done():
            problems.append("the store follower stopped")
        try:
            problems += await self.store.check()
        except StoreError as exc:
            problems.append(f"store: {exc}")
        return problems

    def bound_https(self) -> list[str]:
        return [f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in self.https_sockets]

    def bound_http(self) -> list[str]:
        out = []
        for server in self.http_servers:
            for s in server.sockets:
                out.append(f"{s.getsockname()[0]}:{s.getsockname()[1]}")
        return out

    async def _build_context(self, key: tuple[str, ...]) -> ssl.SSLContext:
        pems = []
        for part in key:
            store_key = part.partition("#")[0]
            value = await self.store.get(store_key)
            if value is None:
                raise ContextBuildError(f"{store_key} vanished from the store")
            pems.append(split_bundle(value)[1])
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, contexts.build_context, pems, self.config.tls.min_version)

    # --- store following ------------------------------------------------------------------
    async def _follow_store(self) -> None:
        """Follow the store, missing nothing, and serve while it loads.

        Apps (few) are read before anything is served. The rest loads in the
        background (``_initial_load``): at a million names that takes a while,
        and meanwhile a handshake for a name not loaded yet fetches that
        name's entries itself (``fetch_name``), so every name is answered
        correctly from the first second.

        etcd: snapshot at revision R, then watch from R+1. inotify cannot
        replay the past: arm the watch first, then load (a change in between
        is seen twice, harmlessly)."""
        self.index.start_loading()
        try:
            for key, value in (await self.store.items(APPS)).items():
                self.index.apply_loaded(key, value)
        except StoreError as exc:
            raise StartupError(f"cannot load the store: {exc}") from None
        armed = asyncio.Event()
        loop = asyncio.get_running_loop()
        if not self.store.resumable:
            self._start_watch(armed)
            await armed.wait()
        self._tasks.append(loop.create_task(self._initial_load(armed)))

    def _start_watch(self, armed: asyncio.Event) -> None:
        self._watch_task = asyncio.get_running_loop().create_task(self._watch(armed))
        self._tasks.append(self._watch_task)

    async def _initial_load(self, armed: asyncio.Event) -> None:
        """The whole store into the live index, in the background (see _follow_store)."""
        started = time.monotonic()
        backoff = 0.5
        while True:
            count = 0
            try:
                async for key, value in self.store.snapshot():
                    if self.store.resumable and self._watch_task is None:
                        # The snapshot's revision is known from its first page on.
                        self.index.revision = self.store.revision
                        self._start_watch(armed)
                    self.index.apply_loaded(key, value)
                    count += 1
                    if count % 2000 == 0:
                        await asyncio.sleep(0)  # handshakes go on while loading
                break
            except StoreError as exc:
                log.error("loading the store failed (%s); serving what is loaded, retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        if self._watch_task is None:  # an empty etcd prefix
            self.index.revision = self.store.revision
            self._start_watch(armed)
        self.index.finish_loading()
        self.reloads += 1
        log.info("store loaded: %d apps, %d domains, %d names with certificates in %.1f s",
                 len(self.index.apps), len(self.index.domains), len(self.index.certs), time.monotonic() - started)
        if self._reload_after_load:
            self._reload_after_load = False
            await self.reload_store()
        elif self.acme is not None:
            self.acme.rescan()

    async def fetch_name(self, name: str) -> None:
        """While the store loads: read the entries that decide ``name`` (its
        domain, its certificates, its wildcard's) straight from the store."""
        index = self.index
        if not index.loading or name in index.fetched:
            return
        wanted = [domain_key(name)] + [cert_key(name, s, k) for s in SOURCES for k in KEY_TYPES]
        parent = names.wildcard_parent(name)
        if parent is not None:
            wanted += [domain_key(parent)] + [cert_key(parent, "custom", k) for k in KEY_TYPES]
        found = await self.store.get_many(wanted)
        for key, value in found.items():
            index.apply_loaded(key, value)
        index.fetched.add(name)

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
            await asyncio.get_running_loop().run_in_executor(None, _reload_certificates, new, fixed)
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
            ("[proxy] http2", old.proxy.http2, new.proxy.http2),
        ):
            if before != after:
                log.warning("%s changed: it takes effect at the next restart", what)
        self.selector.strict_sni = new.platform.strict_sni
        self.cache.size = new.tls.context_cache_size
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

    async def reload_store(self) -> None:
        """Load the whole store again (SIGHUP, /v1/reload, a watch that lost track).

        A store that cannot be read keeps the current index in service."""
        if self.index.loading:
            self._reload_after_load = True  # the initial load may have read some keys too early
            return
        fresh = Index()
        # Changes the watch applies meanwhile may be newer than what the
        # snapshot read: they are applied again on top of it.
        self._reload_events = []
        try:
            async for key, value in self.store.snapshot():
                fresh.apply_put(key, value)
        except StoreError as exc:
            self._reload_events = None
            log.error("store reload failed, keeping the current index: %s", exc)
            return
        for event in self._reload_events:
            fresh.apply(event)
        self._reload_events = None
        fresh.revision = max(self.store.revision, fresh.revision)
        self.index.replace_with(fresh)
        self.reloads += 1
        if self.acme is not None:
            self.acme.rescan()

    async def _watch(self, armed: asyncio.Event) -> None:
        backoff = 0.1
        while True:
            try:
                stream = self.store.watch(self.index.revision + 1)
                # The generator's first step arms the watch (inotify) before it
                # first awaits; a short sleep lets that step run.
                first = asyncio.ensure_future(stream.__anext__())
                await asyncio.sleep(0.01)
                armed.set()
                batch = await first
                while True:
                    backoff = 0.1
                    for event in batch:
                        self.index.apply_watched(event)
                    if self._reload_events is not None:
                        self._reload_events.extend(batch)
                    if self.acme is not None:
                        for event in batch:
                            self.acme.notice(event.key)
                    if batch and batch[-1].changed_at:
                        self.sync_lag = max(0.0, time.time() - batch[-1].changed_at)
                    batch = await stream.__anext__()
            except asyncio.CancelledError:
                raise
            except ResyncNeeded as exc:
                armed.set()
                log.warning("store: %s", exc)
                await self.reload_store()
            except Exception as exc:  # the follower must survive anything
                armed.set()
                log.error("store watch failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                if not self.store.resumable:
                    await self.reload_store()  # inotify may have missed changes meanwhile

    # --- stop ---------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stopping

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace`` s), then close."""
        self._stopping = True
        self.acceptor.stop_listening()
        self.acceptor.close_pending()
        for server in self.http_servers:
            server.close()
        self.proxy.draining = True
        for connection in list(self.proxy.connections):
            connection.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.proxy.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.proxy.connections:
            log.warning("grace period over: closing %d connections with requests in flight",
                        len(self.proxy.connections))
            for connection in list(self.proxy.connections):
                if connection.transport is not None:
                    connection.transport.abort()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.router.close()
        for runner in (getattr(self, "admin_runner", None), getattr(self, "metrics_runner", None)):
            if runner is not None:
                await runner.cleanup()
        with contextlib.suppress(Exception):
            await self.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


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
