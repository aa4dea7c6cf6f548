"""Host -> app -> backend pool, from the in-memory index.

An app's own name under the platform domain routes to it; custom domains
route through the index's domain map. Pools live as long as the app's
backend list is unchanged; a change replaces the pool (idle connections to
the old backends are closed).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from edge import names
from edge.proxy.upstream import Pool
from edge.records import App
from edge.tls.selector import Selector


class AppsByName(Protocol):
    def get(self, name: str, /) -> App | None: ...


class RoutingIndex(Protocol):
    """What the router reads: the in-memory ``Index`` or a worker's view of the
    local copy (``SharedIndex``). A protocol, not either class: compiled code
    (mypyc) checks declared types at run time."""

    @property
    def apps(self) -> AppsByName: ...
    def app_of(self, host: str) -> App | None: ...


class Router:
    def __init__(self, index: RoutingIndex, selector: Selector, platform_domain: str, pool_size: int,
                 loaded: asyncio.Event | None = None) -> None:
        self.index = index
        self.loaded = loaded  # the store follower's: None or set, every name is in the index
        self.selector = selector
        self.platform_domain = platform_domain
        self.pool_size = pool_size
        self._pools: dict[str, tuple[tuple[str, ...], Pool]] = {}

    def app_for(self, host: str) -> App | None:
        app = self.index.app_of(host)
        if app is not None:
            return app
        if names.is_one_label_under(host, self.platform_domain):
            return self.index.apps.get(host[: -len(self.platform_domain) - 1])
        # A custom wildcard domain (*.example.com) routes its names one label down.
        parent = names.wildcard_parent(host)
        return self.index.app_of(parent) if parent is not None else None

    def loading(self) -> bool:
        return self.loaded is not None and not self.loaded.is_set()

    def pool_for(self, app: App) -> Pool:
        held = self._pools.get(app.name)
        if held is not None and held[0] == app.backends:
            return held[1]
        if held is not None:
            held[1].close()
        pool = Pool(app.backends, self.pool_size)
        self._pools[app.name] = (app.backends, pool)
        return pool

    def same_certificate(self, sni: str, host: str) -> bool:
        """SNI and Host select the same certificate (else 421, RFC 9110 §15.5.20)."""
        if sni == host:
            return True
        return self.selector.same_certificate(self.selector.select(sni), self.selector.select(host))

    def close(self) -> None:
        for _, pool in self._pools.values():
            pool.close()
        self._pools.clear()
