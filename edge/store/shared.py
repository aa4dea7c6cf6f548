"""A worker's view of the host's shared index: lookups in the local copy.

With ``workers = N`` one process (the first worker) follows the store and
writes the host's local copy (``edge.store.localcopy``); the other workers
hold no index of their own. They select certificates and route requests
with lookups in the copy's ``names`` records (one per domain: its app and
bundle headers) and ``apps/`` entries, done in C on pages the kernel maps
once for every process. Memory per worker then does not grow with the
number of names, a worker starts without loading anything, and a change
is visible to every worker as soon as the writer commits it.

Nothing here is invalidated on change: TLS contexts are cached under the
digest of their bundles, so a replaced bundle names a new context.
"""

from __future__ import annotations

import time

from edge.store.base import APPS
from edge.store.index import App, DomainCerts, EntryError, parse_app, read_name_record
from edge.store.localcopy import LocalCopy

_APPS_PARSED = 4096  # parsed app records kept (keyed by their stored bytes)


class _Certs:
    def __init__(self, index: SharedIndex) -> None:
        self._index = index

    def get(self, name: str, default: DomainCerts | None = None) -> DomainCerts | None:
        record = self._index.record(name)
        return record[1] if record is not None and record[1] else default


class _Domains:
    def __init__(self, index: SharedIndex) -> None:
        self._index = index

    def get(self, name: str, default: str | None = None) -> str | None:
        record = self._index.record(name)
        return record[0] if record is not None and record[0] is not None else default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None


class _Apps:
    def __init__(self, copy: LocalCopy) -> None:
        self._copy = copy
        self._parsed: dict[bytes, App] = {}

    def __len__(self) -> int:
        return sum(1 for _ in self._copy.items(APPS))  # apps are few

    def __contains__(self, name: object) -> bool:  # per-app series forget removed apps (appmetrics)
        return isinstance(name, str) and self._copy.get(APPS + name) is not None

    def get(self, name: str, default: App | None = None) -> App | None:
        raw = self._copy.get(APPS + name)
        if raw is None:
            return default
        app = self._parsed.get(raw)
        if app is None:
            try:
                app = parse_app(name, raw)
            except EntryError:  # the writer copies only entries that parse
                return default
            if len(self._parsed) >= _APPS_PARSED:
                self._parsed.clear()
            self._parsed[raw] = app
        return app


class SharedIndex:
    """What the selector and the router read of an ``Index``, from the copy."""

    loading = False  # nothing to load: the writer keeps the copy complete
    fetched: frozenset[str] = frozenset()
    def __init__(self, copy: LocalCopy) -> None:
        self.copy = copy
        self.errors: dict[str, str] = {}  # damaged entries are the writer's to report
        self.certs = _Certs(self)
        self.domains = _Domains(self)
        self.apps = _Apps(copy)

    def record(self, name: str) -> tuple[str | None, DomainCerts] | None:
        raw = self.copy.name(name)
        return None if raw is None else read_name_record(name, raw)

    def app_of(self, host: str) -> App | None:
        app = self.domains.get(host)
        return self.apps.get(app) if app is not None else None

    @property
    def revision(self) -> int:
        return self.copy.state()[0]


class SharedFollower:
    """The follower of a worker that reads the shared index: the writer follows
    the store for it, so there is nothing to start, fetch or reload here."""

    reloads = 0
    sync_lag = 0.0
    writer = None
    acme = None

    def __init__(self, copy: LocalCopy) -> None:
        self.copy = copy
        self.tasks: list = []
        self.stale_since: float | None = None

    async def start(self) -> None:
        pass

    def stopped(self) -> bool:
        return False

    async def fetch_name(self, name: str) -> None:
        pass

    async def reload(self) -> bool:
        return True  # SIGHUP reaches the writer too: it reloads the store and the copy

    def describe(self) -> dict[str, object]:
        written = self.copy.state()[1]
        return {"store": "shared index", "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(written))}
