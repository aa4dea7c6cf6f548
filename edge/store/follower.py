"""The store follower: one process's in-memory index kept in step with the store.

Start-up: apps (few) are read before anything is served; the rest loads in
the background (``_initial_load``), and meanwhile a handshake for a name not
loaded yet fetches that name's entries itself (``fetch_name``), so every name
is answered correctly from the first second.

etcd: snapshot at revision R, then watch from R+1. inotify cannot replay the
past: arm the watch first, then load (a change in between is seen twice,
harmlessly).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge import names
from edge.records import KEY_TYPES, SOURCES
from edge.store.base import APPS, CERTS, Event, EventKind, ResyncNeeded, Store, StoreError, cert_key, domain_key
from edge.store.index import Index

if TYPE_CHECKING:
    from edge.acme.manager import AcmeManager

log = logging.getLogger(__name__)


class FollowError(RuntimeError):
    """The store cannot be read at start: nothing sensible to serve."""


class StoreFollower:
    def __init__(self, store: Store, index: Index, on_cert: Callable[[str, bytes], None] | None = None) -> None:
        self.store = store
        self.index = index
        self.acme: AcmeManager | None = None  # set once the manager exists
        # Called with each certificate entry the watch delivers and the index
        # accepted: the context loader keeps the bytes of the last good version.
        self.on_cert = on_cert
        self.tasks: list[asyncio.Task[None]] = []
        self.watch_task: asyncio.Task[None] | None = None
        self.reloads = 0
        self.sync_lag = 0.0  # seconds from the last store change to it being applied here
        self._reload_events: list[Event] | None = None  # changes seen while a full reload runs
        self._reload_after_load = False

    async def start(self) -> None:
        """Read the apps, arm the watch, start loading the rest (see the module doc)."""
        self.index.start_loading()
        try:
            for key, value in (await self.store.items(APPS)).items():
                self.index.apply_loaded(key, value)
        except StoreError as exc:
            raise FollowError(f"cannot load the store: {exc}") from None
        armed = asyncio.Event()
        if not self.store.resumable:
            self._start_watch(armed)
            await armed.wait()
        self.tasks.append(asyncio.get_running_loop().create_task(self._initial_load(armed)))

    def stopped(self) -> bool:
        return self.watch_task is not None and self.watch_task.done()

    def _start_watch(self, armed: asyncio.Event) -> None:
        self.watch_task = asyncio.get_running_loop().create_task(self._watch(armed))
        self.tasks.append(self.watch_task)

    async def _initial_load(self, armed: asyncio.Event) -> None:
        started = time.monotonic()
        backoff = 0.5
        while True:
            count = 0
            try:
                async for key, value in self.store.snapshot():
                    if self.store.resumable and self.watch_task is None:
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
        if self.watch_task is None:  # an empty etcd prefix
            self.index.revision = self.store.revision
            self._start_watch(armed)
        self.index.finish_loading()
        self.reloads += 1
        index = self.index
        log.info("store loaded: %d apps, %d domains, %d names with certificates in %.1f s",
                 len(index.apps), len(index.domains), len(index.certs), time.monotonic() - started)
        self._report_corrupted()
        if self._reload_after_load:
            self._reload_after_load = False
            await self.reload()
        elif self.acme is not None:
            self.acme.rescan()

    def _report_corrupted(self) -> None:
        """Say at start what the store holds that is not served as stored."""
        index = self.index
        for key, reason in sorted(index.errors.items())[:20]:
            log.error("store entry %s is damaged and not served (%s); no earlier version of it is known to this "
                      "process; `edge check` lists every damaged entry", key, reason)
        orphans = sorted(d for d in index.certs if d not in index.domains)
        if orphans:
            # Left by a command killed midway (or a hand edit): not served,
            # as they are listed nowhere; the operator decides what they were.
            log.warning("store: %d certificates belong to no domain and are not served (%s%s); "
                        "`edge check` lists them",
                        len(orphans), ", ".join(orphans[:5]), ", ..." if len(orphans) > 5 else "")

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

    async def reload(self) -> None:
        """Load the whole store again (SIGHUP, /v1/reload, a watch that lost track).

        A store that cannot be read keeps the current index in service; an
        entry that no longer parses keeps its last good version (``Index.replace_with``)."""
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
        log.info("store reloaded: %d apps, %d domains, %d names with certificates; %d damaged entries",
                 len(fresh.apps), len(fresh.domains), len(fresh.certs), len(fresh.errors))
        if self.acme is not None:
            self.acme.rescan()

    def _apply(self, batch: list[Event]) -> None:
        for event in batch:
            self.index.apply_watched(event)
            if (self.on_cert is not None and event.kind is EventKind.PUT and event.value is not None
                    and event.key.startswith(CERTS) and event.key not in self.index.errors):
                self.on_cert(event.key, event.value)
        if self._reload_events is not None:
            self._reload_events.extend(batch)
        if self.acme is not None:
            for event in batch:
                self.acme.notice(event.key)
        if batch and batch[-1].changed_at:
            self.sync_lag = max(0.0, time.time() - batch[-1].changed_at)

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
                    self._apply(batch)
                    batch = await stream.__anext__()
            except asyncio.CancelledError:
                raise
            except ResyncNeeded as exc:
                armed.set()
                log.warning("store: %s", exc)
                await self.reload()
            except Exception as exc:  # the follower must survive anything
                armed.set()
                log.error("store watch failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                if not self.store.resumable:
                    await self.reload()  # inotify may have missed changes meanwhile
