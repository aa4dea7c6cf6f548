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
import enum
import logging
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edge import compiled
from edge import config as config_mod
from edge.appmetrics import control_counters
from edge.config import Config
from edge.errors import StartupError
from edge.limits import RateLimiter
from edge.listen import check_free, open_listeners
from edge.metrics import Counters, publish_counters, registry_for
from edge.proxy.appstats import AppStats
from edge.proxy.exchange import ListenerInfo, ProxyContext
from edge.proxy.h2proto import AlpnSwitch
from edge.proxy.not_tls import answer_not_tls
from edge.proxy.protocol import HttpProxyProtocol
from edge.proxy.routing import Router
from edge.store.base import Store, StoreError, challenge_key, parse_cert_key, tls_alpn_key
from edge.store.copywriter import CopyWriter
from edge.store.follower import FollowError, StoreFollower
from edge.store.localcopy import LocalCopy
from edge.store.open import open_copy, open_store
from edge.store.shared import ReaderFollower, SharedIndex
from edge.takeover import Listener, Offer, offer_path
from edge.tls.acceptor import TlsAcceptor, TlsInfo
from edge.tls.contexts import ContextCache
from edge.tls.fixed import FixedContexts, load_fixed_contexts, reload_certificates
from edge.tls.gate import Gate, Peer
from edge.tls.intake import PlainListener
from edge.tls.loader import ContextLoader
from edge.tls.selector import Selector

if TYPE_CHECKING:
    from aiohttp import web

    from edge.acme.manager import AcmeManager

log = logging.getLogger(__name__)


class State(enum.Enum):
    """Where one edge process is in its life; each step only moves forward."""

    NEW = "new"
    STARTING = "starting"  # the store follower and listeners coming up
    SERVING = "serving"
    STOPPING = "stopping"  # listeners closed, requests in flight finishing
    STOPPED = "stopped"


class Reconfigurable(Protocol):
    def reconfigure(self, config: Config) -> None:
        """Apply what of a reloaded configuration can change while running."""


class Edge:
    """One running edge process (the only one, or one of the workers): start,
    stop and reload over the parts built here. It is the ``Node`` of the admin
    API and what ``edge.metrics`` observes, both of which it is handed to."""

    def __init__(self, config: Config, fixed: FixedContexts | None = None, reuse_port: bool = False,
                 serve_admin: bool = True, metrics_dir: Path | None = None,
                 listeners: list[Listener] | None = None) -> None:
        self.config = config
        self.listeners = listeners  # a worker's share of its supervisor's; None: opened at start
        self.offer: Offer | None = None  # this process's listeners, for a successor (edge.takeover)
        self.fixed = fixed or load_fixed_contexts(config)  # a supervisor builds them before forking
        self.reuse_port = reuse_port  # workers share their ports with SO_REUSEPORT
        self.serve_admin = serve_admin  # with workers, only the first serves the admin API
        self.metrics_dir = metrics_dir  # with workers: where each publishes its counters
        self.state = State.NEW
        platform = config.platform
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="edge-tls")
        self.store: Store = open_store(config)
        # The host's index is its local copy (LMDB): written by one process
        # (this one, or the first worker), read by every process (#13, #18).
        self.copy: LocalCopy = open_copy(config, rebuild=not reuse_port)
        self.acme: AcmeManager | None = None  # this node's, when it runs one
        self.loader = ContextLoader(self.store, self.executor, lambda: self.config.tls.min_version,
                                    keep=min(config.tls.context_cache_size, 4096), copy=self.copy)
        loaded = asyncio.Event()  # set by the follower only, once the copy holds the whole store
        if serve_admin:  # the writer: with workers, the first (it also runs the admin API and ACME)
            self.copy_writer: CopyWriter | None = CopyWriter(self.copy)
            self.follower: StoreFollower | ReaderFollower = StoreFollower(
                self.store, self.copy, self.copy_writer, listener=self._acme_manager(loaded), loaded=loaded,
                on_cert=self.loader.remember)
        else:
            self.copy_writer = None
            self.follower = ReaderFollower(self.store, self.copy, on_cert=self.loader.remember)
            log.info("worker reads the shared index %s", self.copy.path)
        self.index = self.follower.index
        self.selector = Selector(self.index, platform.domain, platform.strict_sni,  # type: ignore[arg-type]
                                 default_is_platform=self.fixed.default is self.fixed.platform)
        self.cache = ContextCache(config.tls.context_cache_size, self.loader.load, config.tls.min_version)
        self.router = Router(self.index, self.selector, platform.domain, config.proxy.pool_size, self.follower.loaded)
        self.proxy = ProxyContext(
            router=self.router,
            config=config.proxy,
            access_log=config.log.access_log,
            access_format=config.log.access_format,
            challenge=lambda token: self.store.get(challenge_key(token)),
            app_stats=AppStats(config.metrics_per_app),
            rate=RateLimiter.from_config(config.limits),
        )
        self.gate = Gate.from_config(config)  # PROXY headers, connection limits: every listener of this process
        self.acceptor = TlsAcceptor(
            listener_context=self.fixed.default,
            platform_context=self.fixed.platform,
            selector=self.selector,
            cache=self.cache,
            handshake_timeout=config.proxy.handshake_timeout,
            challenge_certificate=lambda domain: self.store.get(tls_alpn_key(domain)),
            ensure=self.follower.ensure,
            loaded=self.follower.loaded,
            not_tls=answer_not_tls,
            gate=self.gate,
        )
        self.https_sockets: list[socket.socket] = []
        self.http_servers: list[PlainListener] = []
        self.admin_runner: web.AppRunner | None = None
        self.admin_address: str | None = None
        self.metrics_runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    def _acme_manager(self, loaded: asyncio.Event) -> AcmeManager | None:
        """One manager per node (the process that writes the copy); the store's
        per-domain lock keeps the nodes of a fleet from ordering twice."""
        if not self.config.acme.enabled:
            return None
        from edge.acme.manager import AcmeManager  # the ACME client stack loads only when used

        # It reads the index through its own view of the copy (data only), and
        # waits for ``loaded`` before its first scan; the follower tells it of changes.
        self.acme = AcmeManager(self.config.acme, self.store, SharedIndex(self.copy), loaded)  # type: ignore[arg-type]
        return self.acme

    # --- start ---------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        self.state = State.STARTING
        try:
            await self.follower.start()
        except FollowError as exc:
            raise StartupError(str(exc)) from None
        loop = asyncio.get_running_loop()
        if self.listeners is None:  # a single process: its own, offered to a successor
            self.listeners = open_listeners(cfg, 1)
            self.offer = Offer.open(offer_path(cfg), self.listeners, loop)
        self.https_sockets = [item.sock for item in self.listeners if item.kind == "https"]
        # Redirects from port 80 point at the first TLS listener's real port.
        https_port = self.https_sockets[0].getsockname()[1] if self.https_sockets else 443
        for sock in self.https_sockets:
            listener = ListenerInfo(b"https", str(sock.getsockname()[1]).encode(), https_port)
            self.acceptor.listen(sock, self._https_protocol_factory(listener))
        for sock in (item.sock for item in self.listeners if item.kind == "http"):
            listener = ListenerInfo(b"http", str(sock.getsockname()[1]).encode(), https_port)
            # Not loop.create_server: see PlainListener (the descriptor limit).
            self.http_servers.append(PlainListener(sock, self._http_protocol_factory(listener), self.gate))
        if self.serve_admin:  # one process per node cleans up
            self._tasks.append(loop.create_task(self._recover_store()))
        if self.acme is not None:
            self._tasks.append(loop.create_task(self.acme.run()))
        await self._start_http_apis()
        if self.reuse_port and self.metrics_dir is not None:  # a worker: publish counters for /metrics
            self._tasks.append(loop.create_task(publish_counters(self.counters, self.metrics_dir)))
        self.state = State.SERVING
        log.info(
            "edge serving https on %s, http on %s (platform domain %s; %d apps; %s)",
            ", ".join(self.bound_https()), ", ".join(self.bound_http()), cfg.platform.domain, len(self.index.apps),
            "store loaded" if self.follower.loaded.is_set() else "loading the store (names read on demand)",
        )
        log.info("request path: %s", compiled.state)  # "compiled" (mypyc), or why the sources run

    def _https_protocol_factory(self, listener: ListenerInfo) -> Callable[[TlsInfo], asyncio.BaseProtocol]:
        proxy = self.proxy

        def factory(info: TlsInfo) -> asyncio.BaseProtocol:
            return AlpnSwitch(proxy, listener, info)  # HTTP/2 or HTTP/1.1, as ALPN chose

        return factory

    def _http_protocol_factory(self, listener: ListenerInfo) -> Callable[[Peer | None], asyncio.BaseProtocol]:
        proxy = self.proxy
        return lambda peer: HttpProxyProtocol(proxy, listener, None, peer)

    async def _start_http_apis(self) -> None:
        """The admin API and the probes' listener, on the process that serves them."""
        server = self.config.server
        if not self.serve_admin or (server.admin is None and server.metrics is None):
            return
        from aiohttp import web

        from edge.admin.app import make_app, serve_probes
        from edge.operations import Operations

        registry = registry_for(self, self.metrics_dir)
        if server.admin is not None:
            ops = Operations(self.config, self.store)
            app = make_app(self, ops, registry, server.admin_token, server.admin_hosts)
            self.admin_runner = web.AppRunner(app, access_log=None)
            await self.admin_runner.setup()
            # reuse_port: a successor (serve --takeover) binds it too; refused otherwise when taken.
            site = web.TCPSite(self.admin_runner, server.admin.host, server.admin.port, reuse_port=True)
            try:
                if not server.takeover:
                    check_free(server.admin)
                await site.start()
            except (OSError, StartupError) as exc:  # check_free's names the address already
                raise StartupError(f"cannot serve the admin API: {exc}") from None
            self.admin_address = site.name
            log.info("admin API on %s", site.name)
        if server.metrics is not None:  # scrapers and probes, no token
            try:
                self.metrics_runner = await serve_probes(self, registry, server.admin_hosts,
                                                         server.metrics.host, server.metrics.port)
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {server.metrics}: {exc.strerror}") from None
            log.info("metrics and health on %s", server.metrics)

    # --- what the admin API and the metrics read (edge.admin.app.Node, edge.metrics.Observed)
    async def health_problems(self) -> list[str]:
        """Why edge should not get traffic now; empty when it is fine."""
        problems = []
        if self.stopping:
            problems.append("shutting down")
        if not self.https_sockets or any(s.fileno() < 0 for s in self.https_sockets):
            problems.append("TLS listeners closed")
        if self.follower.stopped():
            problems.append("the store follower stopped")
        return problems  # an unreachable store changes nothing served: the copy is (stale_since says so)

    async def store_problems(self) -> list[str]:
        try:
            return await self.store.check()
        except StoreError as exc:
            return [f"store: {exc}"]

    def store_state(self) -> dict[str, object]:
        """The follower's account of the store for /healthz: loading or loaded,
        and since when it serves a copy that may be stale (None: it does not)."""
        return self.follower.describe()

    def counters(self) -> Counters:
        """This process's traffic counters, for /metrics (summed over workers)."""
        return {
            "processes": 1,
            **self.acceptor.stats.counters(),
            **self.proxy.stats.counters(),
            **self.cache.counters(),
            "open_connections": len(self.proxy.connections),
            "reloads": self.follower.reloads,
            **control_counters(self.gate, self.proxy, self.index.apps),  # issue #14
        }

    @property
    def stale_since(self) -> float | None:
        return self.follower.stale_since

    @property
    def store_loaded(self) -> bool:
        """The follower's: the index holds the whole store (else names are read on demand)."""
        return self.follower.loaded.is_set()

    def bound_https(self) -> list[str]:  # once each (an upgrade may give one process several sockets per port)
        return list(dict.fromkeys(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in self.https_sockets))

    def bound_http(self) -> list[str]:
        return list(dict.fromkeys(f"{s.getsockname()[0]}:{s.getsockname()[1]}"
                                  for server in self.http_servers for s in server.sockets))

    def corrupted_entries(self, limit: int = 100) -> dict[str, str]:
        """Damaged store entries (key -> why) this process knows of, for /healthz:
        those the index could not parse (their last good version, if this
        process saw one, stays served) and those OpenSSL refused at a handshake."""
        held = {m.store_key for key in self.loader.damaged if (parts := parse_cert_key(key))
                for m in self.index.certs.get(parts[0], ())}
        # A damaged version since replaced or deleted is no longer a problem.
        found = {**self.follower.corrupted(limit), **{k: v for k, v in self.loader.damaged.items() if k in held}}
        return dict(sorted(found.items())[:limit])

    async def _recover_store(self) -> None:
        """Remove what writes killed midway left, in the background: serving does not need it."""
        try:
            removed = await self.store.recover()
        except StoreError as exc:
            log.error("store: cannot remove the debris of interrupted writes: %s", exc)
            return
        for path in removed:
            log.warning("store: removed %s, left by an interrupted write", path)

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
            await asyncio.get_running_loop().run_in_executor(None, reload_certificates, new, self.fixed)
        except (config_mod.ConfigError, StartupError) as exc:
            log.error("configuration refused, the running one is kept: %s", exc)
            return False
        old = self.config
        for what in config_mod.restart_needed(old, new):
            log.warning("%s changed: it takes effect at the next restart", what)
        logging.getLogger().setLevel(new.log.level.upper())
        self.config = config_mod.live(old, new)
        parts: list[Reconfigurable] = [self.selector, self.cache, self.proxy]
        if self.acme is not None:
            parts.append(self.acme)
        for part in parts:
            part.reconfigure(self.config)
        log.info("configuration reloaded from %s", new.path)
        return True

    # --- stop ---------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self.state in (State.STOPPING, State.STOPPED)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace`` s), then close."""
        self.state = State.STOPPING
        self.follower.close()  # a successor (an upgrade) writes the local copy from now on
        if self.offer is not None:
            self.offer.close()
        self.acceptor.stop_listening()
        for server in self.http_servers:
            server.close()
        await self.acceptor.finish_pending(min(grace, self.config.proxy.handshake_timeout))
        self.acceptor.close_pending()
        self.gate.close_all()
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
        tasks = [*self._tasks, *self.follower.tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.router.close()
        for runner in (self.admin_runner, self.metrics_runner):
            if runner is not None:
                await runner.cleanup()
        with contextlib.suppress(Exception):
            await self.store.close()
        if self.copy_writer is not None:
            self.copy_writer.close()  # queued copy writes land before exit
        self.copy.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.state = State.STOPPED
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
