"""Every process's view of the host's index: lookups in the local copy.

The local copy (``edge.store.localcopy``) is the index of the host: one
process writes it (``edge.store.follower``), and every process, the writer
included, selects certificates and routes requests with lookups in its
``names`` records (one per domain: its app and bundle headers) and ``apps/``
entries, done in C on pages the kernel maps once for every process. Memory
per process then does not grow with the number of names, a process starts
without loading anything, and a change is visible to every process as soon
as the writer commits it.

Only while the copy is not complete yet (the first start of a host, no copy
on disk) a process reads the names it is asked for straight from the store
(``CopyFollower.ensure``) and keeps them, briefly, in a small ``Overlay``.

Nothing here is invalidated on change: TLS contexts are cached under the
digest of their bundles, so a replaced bundle names a new context.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping

from edge import names
from edge.records import (
    KEY_TYPES,
    SOURCES,
    App,
    DomainCerts,
    EntryError,
    decode_name_record,
    parse_app,
    parse_cert,
    parse_domain,
)
from edge.store.base import APPS, CERTS, Store, StoreError, cert_key, domain_key
from edge.store.localcopy import LocalCopy

log = logging.getLogger(__name__)

_DECODED = 4096  # decoded records and parsed apps kept per process (keyed by their stored bytes)
# How long a name read on demand stands in for the copy while the copy fills:
# a change committed meanwhile is seen by every process within this.
OVERLAY_TTL = 0.05
_OVERLAY_NAMES = 10_000
Record = tuple[str | None, DomainCerts]  # a domain's app and bundle headers


class Overlay:
    """Names (and apps) read straight from the store while the copy is not complete."""

    def __init__(self) -> None:
        self.active = False
        self.names: dict[str, tuple[float, Record]] = {}  # name -> (valid until, monotonic; record)
        self.apps: dict[str, App] = {}

    def stop(self) -> None:
        self.active = False
        self.names = {}
        self.apps = {}


class _Certs:
    def __init__(self, index: SharedIndex) -> None:
        self._index = index

    def get(self, name: str, default: DomainCerts | None = None) -> DomainCerts | None:
        record = self._index.record(name)
        return record[1] if record is not None and record[1] else default

    def __len__(self) -> int:
        return self._index.copy.names_count()  # names with a record (an upper bound: metrics' pacing)

    def values(self) -> Iterator[DomainCerts]:
        for domain, raw in self._index.copy.records():
            if not raw.endswith(b",[]]"):  # no certificate: skip the decoding
                yield decode_name_record(domain, raw)[1]


class _Domains:
    def __init__(self, index: SharedIndex) -> None:
        self._index = index

    def get(self, name: str, default: str | None = None) -> str | None:
        record = self._index.record(name)
        return record[0] if record is not None and record[0] is not None else default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        """Every attached domain (one pass over the copy: the ACME manager's scan)."""
        for domain, raw in self._index.copy.records():
            if not raw.startswith(b"[null,"):
                yield domain


class _Apps:
    def __init__(self, copy: LocalCopy, overlay: Overlay) -> None:
        self._copy = copy
        self._overlay = overlay
        self._parsed: dict[bytes, App] = {}

    def __len__(self) -> int:
        return sum(1 for _ in self._copy.items(APPS))  # apps are few

    def __contains__(self, name: object) -> bool:  # per-app series forget removed apps (appmetrics)
        return isinstance(name, str) and self.get(name) is not None

    def get(self, name: str, default: App | None = None) -> App | None:
        raw = self._copy.get(APPS + name)
        if raw is None:
            return self._overlay.apps.get(name, default) if self._overlay.active else default
        app = self._parsed.get(raw)
        if app is None:
            try:
                app = parse_app(name, raw)
            except EntryError:  # the writer copies only entries that parse
                return default
            if len(self._parsed) >= _DECODED:
                self._parsed.clear()
            self._parsed[raw] = app
        return app


class SharedIndex:
    """What the selector, the router and the ACME manager read, from the copy.
    Data only: whether the store is loaded is the follower's to say."""

    def __init__(self, copy: LocalCopy, overlay: Overlay | None = None, errors: Mapping[str, str] | None = None
                 ) -> None:
        self.copy = copy
        self.overlay = overlay or Overlay()
        self.errors: Mapping[str, str] = errors if errors is not None else {}  # damaged entries (the writer's)
        self.certs = _Certs(self)
        self.domains = _Domains(self)
        self.apps = _Apps(copy, self.overlay)
        self._decoded: dict[str, tuple[bytes, Record]] = {}

    def record(self, name: str) -> Record | None:
        """A name's app and certificates: one lookup in the copy (the
        selector's and the router's only read of a name)."""
        overlay = self.overlay
        if overlay.active and (fetched := overlay.names.get(name)) is not None:
            return fetched[1]
        raw = self.copy.name(name)  # ~1 us: always read, a change is seen at once
        if raw is None:
            return None
        # The decoded record, kept while the stored bytes are the same (as
        # _decode would: inlined, it runs on every handshake and request).
        held = self._decoded.get(name)
        if held is not None and held[0] == raw:
            return held[1]
        return self._decode(name, raw)

    def _decode(self, name: str, raw: bytes) -> Record:
        record = decode_name_record(name, raw)
        if len(self._decoded) >= _DECODED:
            self._decoded.clear()
        self._decoded[name] = (raw, record)
        return record

    def app_of(self, host: str) -> App | None:
        record = self.record(host)
        return self.apps.get(record[0]) if record is not None and record[0] is not None else None

    def corrupted(self, limit: int = 100) -> dict[str, str]:
        return dict(sorted(dict(self.errors).items())[:limit])

    @property
    def changes(self) -> int:
        return self.copy.version()

    @property
    def revision(self) -> int:
        return self.copy.state().revision


def _wanted(name: str) -> list[str]:
    return [domain_key(name)] + [cert_key(name, s, k) for s in SOURCES for k in KEY_TYPES]


def _record(name: str, found: Mapping[str, bytes]) -> Record:
    app = None
    if (raw := found.get(domain_key(name))) is not None:
        try:
            app = parse_domain(raw)
        except EntryError:
            app = None
    held = []
    for key in _wanted(name)[1:]:
        if (value := found.get(key)) is not None:
            try:
                held.append(parse_cert(key, value))
            except EntryError:
                continue
    return app, DomainCerts(held)


class CopyFollower:
    """What every process's follower does: own "the store is loaded" (``loaded``)
    and, until it is, read the names asked for from the store (``ensure``)."""

    def __init__(self, store: Store, copy: LocalCopy, errors: Mapping[str, str] | None = None,
                 loaded: asyncio.Event | None = None, on_cert: Callable[[str, bytes], None] | None = None) -> None:
        self.store = store
        self.copy = copy
        # Told each certificate entry read from the store (the watch's, a name's
        # on demand): the context loader keeps the bytes, so building the
        # name's context reads neither the copy nor the store again.
        self.on_cert = on_cert
        # Set once the copy is complete (every name is in it), by this follower
        # only; given when a part built before it waits on it (the ACME manager).
        self.loaded = loaded if loaded is not None else asyncio.Event()
        self.overlay = Overlay()
        self.index = SharedIndex(copy, self.overlay, errors)
        self.tasks: list[asyncio.Task[None]] = []
        self.stale_since: float | None = None
        self.reloads = 0
        self.sync_lag = 0.0
        self._fetching: dict[str, asyncio.Future[None]] = {}

    async def _start_overlay(self, apps: Mapping[str, bytes] | None = None) -> None:
        """The copy is not complete: serve the apps from the store (few), names on demand."""
        self.overlay.active = True
        try:
            apps = await self.store.items(APPS) if apps is None else apps
        except StoreError as exc:
            log.error("reading the apps from the store failed (%s); serving the local copy's", exc)
            return
        for key, value in apps.items():
            try:
                self.overlay.apps[key[len(APPS):]] = parse_app(key[len(APPS):], value)
            except EntryError:
                continue

    def _set_loaded(self) -> None:
        self.loaded.set()
        self.overlay.stop()  # reads still under way finish; what they bring is not kept

    async def ensure(self, name: str) -> None:
        """Return when ``name`` is known (or certainly absent): at once when the
        copy is complete, else after reading its entries from the store."""
        if self.loaded.is_set():
            return
        if self.copy.complete():
            self._set_loaded()
            return
        held = self.overlay.names.get(name)
        if held is not None and held[0] > time.monotonic():
            return
        pending = self._fetching.get(name)
        if pending is None:
            pending = self._fetching[name] = asyncio.ensure_future(self._fetch(name))
            pending.add_done_callback(lambda _: self._fetching.pop(name, None))
        await asyncio.shield(pending)

    async def _fetch(self, name: str) -> None:
        parent = names.wildcard_parent(name)
        wanted = _wanted(name) + (_wanted(parent) if parent is not None else [])
        found = await self.store.get_many(wanted)
        if self.on_cert is not None:
            for key, value in found.items():
                if key.startswith(CERTS):
                    self.on_cert(key, value)
        until = time.monotonic() + OVERLAY_TTL
        if self.overlay.active:
            if len(self.overlay.names) >= _OVERLAY_NAMES:
                self.overlay.names.clear()  # bounded: each is read again on demand
            for each in (name, parent):
                if each is not None:
                    self.overlay.names[each] = (until, _record(each, found))

    def describe(self) -> dict[str, object]:
        """For /healthz: where what is served comes from, and since when it may be stale."""
        since = self.stale_since
        loaded = "loaded" if self.loaded.is_set() else "loading"
        return {"store": "stale copy" if since is not None else loaded, "index": loaded,
                "stale_since": None if since is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))}

    def corrupted(self, limit: int = 100) -> dict[str, str]:
        return self.index.corrupted(limit)

    def stopped(self) -> bool:
        return False

    def close(self) -> None:
        """Stop following (shutdown, or a successor took over)."""
        for task in self.tasks:
            task.cancel()


class ReaderFollower(CopyFollower):
    """A worker's follower when another process of the host writes the copy:
    nothing to follow; until the first load completes, names come on demand."""

    async def start(self) -> None:
        if self.copy.complete():
            self._set_loaded()
            return
        await self._start_overlay()
        self.tasks.append(asyncio.get_running_loop().create_task(self._wait_complete()))

    async def _wait_complete(self) -> None:
        while not self.copy.complete():
            await asyncio.sleep(0.05)
        self._set_loaded()

    async def reload(self) -> bool:
        return True  # SIGHUP reaches the writer too: it reloads the store into the copy

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "store": "shared index",
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.copy.state().written))}
