"""The store follower: one process's in-memory index kept in step with the store.

Start-up: apps (few) are read before anything is served; the rest loads in
the background (``_initial_load``), and meanwhile a handshake for a name not
loaded yet fetches that name's entries itself (``fetch_name``), so every name
is answered correctly from the first second.

With a local copy (``edge.store.localcopy``) that holds entries, they are
read from it instead of the store: a restart does not wait on the store, and
a node whose store is unreachable serves what it served before it stopped
(``stale_since`` says since when). It then catches up: etcd resumes its
watch from the revision the copy reflects (a compacted one: a full reload
in the background, while serving); the file store is read again in the
background and the differences applied. The writer process of the host
writes every change it applies to the copy.

etcd: snapshot at revision R, then watch from R+1. inotify cannot replay the
past: arm the watch first, then load (a change in between is seen twice,
harmlessly).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from edge import names
from edge.records import KEY_TYPES, SOURCES
from edge.store.base import (
    APPS,
    CERTS,
    DOMAINS,
    Event,
    EventKind,
    ResyncNeeded,
    Store,
    StoreError,
    cert_key,
    domain_key,
    parse_cert_key,
)
from edge.store.index import Index, name_record, read_name_record
from edge.store.localcopy import CopyWriter, LocalCopy, copied

if TYPE_CHECKING:
    from edge.acme.manager import AcmeManager

log = logging.getLogger(__name__)


class FollowError(RuntimeError):
    """The store cannot be read at start: nothing sensible to serve."""


_COPY_BATCH = 2000  # entries per queued copy write during a full load


class StoreFollower:
    def __init__(self, store: Store, index: Index, on_cert: Callable[[str, bytes], None] | None = None,
                 copy: LocalCopy | None = None, writer: CopyWriter | None = None) -> None:
        self.store = store
        self.index = index
        self.copy = copy  # read at start and by ``fetch_name``; None: no local copy
        self.writer = writer  # this process writes the host's copy
        # Wall-clock time since which what is served may be behind the store
        # (unreachable, or not caught up yet after a start from the copy); None: following it.
        self.stale_since: float | None = None
        self._from_copy = False
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
        if self.copy is not None and self.copy.state()[2]:
            self._start_from_copy(self.copy)
            return
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

    def _start_from_copy(self, copy: LocalCopy) -> None:
        _revision, written, count = copy.state()
        self._from_copy = True
        self.stale_since = written
        for key, value in copy.items(APPS):
            self.index.apply_loaded(key, value)
        log.info("serving from the local copy %s (%d entries, in step with the store at %s); catching up",
                 copy.path, count, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(written)))
        self.tasks.append(asyncio.get_running_loop().create_task(self._load_copy(copy)))

    async def _load_copy(self, copy: LocalCopy) -> None:
        """Fill the index from the copy, then follow the store from where the copy left off."""
        started = time.monotonic()
        # The revision first: records read after it are as new or newer, and
        # replaying a change the copy already holds is harmless.
        for key, value in copy.items(APPS, with_revision=True):
            if not key:
                self.index.revision = int.from_bytes(value, "little", signed=True)
            else:
                self.index.apply_loaded(key, value)
        for count, (domain, raw) in enumerate(copy.records(), 1):  # checked when written: nothing parsed again
            app, held = read_name_record(domain, raw)
            self.index.load_record(domain, app, held)
            if count % 5000 == 0:
                await asyncio.sleep(0)  # handshakes go on while loading
        self.index.finish_loading()
        self._from_copy = False
        log.info("local copy loaded: %d apps, %d domains, %d names with certificates in %.2f s",
                 len(self.index.apps), len(self.index.domains), len(self.index.certs), time.monotonic() - started)
        self._report_corrupted()
        armed = asyncio.Event()
        self._start_watch(armed)  # etcd: from the copy's revision on; a compacted one reloads in full
        await armed.wait()
        if not self.store.resumable:
            await self._catch_up()  # inotify cannot replay what changed while edge was down
        elif self.acme is not None:
            self.acme.rescan()

    async def _catch_up(self) -> None:
        """Read the whole store again until it answers (file store after a start from the copy)."""
        backoff = 0.5
        while not await self.reload():
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _probe(self) -> None:
        try:
            problems = await self.store.check()
        except StoreError:
            return
        if not problems:
            self._mark_fresh()

    def _mark_stale(self) -> None:
        if self.stale_since is None:
            self.stale_since = time.time()

    def _mark_fresh(self) -> None:
        if self.stale_since is not None:
            log.info("store reachable again: following it")
        self.stale_since = None
        if self.writer is not None:
            self.writer.touch(self.index.revision)

    def describe(self) -> dict[str, object]:
        """For /healthz: where what is served comes from, and since when it may be stale."""
        since = self.stale_since
        state = "stale copy" if since is not None else "loading" if self.index.loading else "loaded"
        return {"store": state, "index": "loading" if self.index.loading else "loaded",
                "stale_since": None if since is None else
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))}

    def stopped(self) -> bool:
        return self.watch_task is not None and self.watch_task.done()

    def _start_watch(self, armed: asyncio.Event) -> None:
        self.watch_task = asyncio.get_running_loop().create_task(self._watch(armed))
        self.tasks.append(self.watch_task)

    async def _initial_load(self, armed: asyncio.Event) -> None:
        started = time.monotonic()
        backoff = 0.5
        self._begin_copy()
        while True:
            count = 0
            try:
                async for key, value in self.store.snapshot():
                    if self.store.resumable and self.watch_task is None:
                        # The snapshot's revision is known from its first page on.
                        self.index.revision = self.store.revision
                        self._start_watch(armed)
                    if self.index.apply_loaded(key, value):
                        self._copy_loaded(key, value)
                    count += 1
                    if count % 2000 == 0:
                        await asyncio.sleep(0)  # handshakes go on while loading
                        await self._copy_backlog()
                break
            except StoreError as exc:
                self._mark_stale()
                log.error("loading the store failed (%s); serving what is loaded, retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        if self.watch_task is None:  # an empty etcd prefix
            self.index.revision = self.store.revision
            self._start_watch(armed)
        self.index.finish_loading()
        await self._end_copy(frozenset(self.index.errors))
        self.stale_since = None
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

    # --- the local copy (this process writes it) --------------------------------------------
    _pending: list[tuple[str, bytes | None]] | None = None  # entries of a full load, not queued yet

    def _begin_copy(self) -> None:
        if self.writer is not None:
            self.writer.begin_full()
            self._pending = []

    def _copy_loaded(self, key: str, value: bytes) -> None:
        if self._pending is not None and copied(key):
            self._pending.append((key, value))
            if len(self._pending) >= _COPY_BATCH:
                self._flush_pending()

    async def _copy_backlog(self) -> None:
        if self.writer is not None:
            await self.writer.backlog()

    def _flush_pending(self) -> None:
        if self.writer is not None and self._pending:
            self.writer.apply(self._pending, 0)
            self._pending = []

    async def _end_copy(self, keep: frozenset[str], replay: Sequence[Event] = ()) -> None:
        """Commit a full load; ``replay``: changes watched meanwhile, newer than what the snapshot read.

        Every name's record is written again, in slices between which the
        loop serves: a change applied meanwhile queues its own record after
        the slice that held the older one, or lands before the slice reads it."""
        if self.writer is None or self._pending is None:
            return
        self._flush_pending()
        self._pending = None
        self._copy_events(replay)
        domains = list(self.index.domains.keys() | self.index.certs.keys())
        for start in range(0, len(domains), 5000):
            records = [(d, r) for d in domains[start : start + 5000] if (r := name_record(self.index, d)) is not None]
            self.writer.apply([], None, records)
            await self._copy_backlog()
            await asyncio.sleep(0)
        self.writer.end_full(self.index.revision, keep)

    def _abort_copy(self) -> None:
        if self.writer is not None and self._pending is not None:
            self._pending = None
            self.writer.abort_full()

    def _copy_events(self, batch: Sequence[Event]) -> None:
        if self.writer is None or not batch:
            return
        self._flush_pending()  # an older snapshot value must not land after a newer watched one
        changes = [(e.key, e.value if e.kind is EventKind.PUT else None) for e in batch
                   if copied(e.key) and e.key not in self.index.errors]
        domains = {e.key[len(DOMAINS):] if e.key.startswith(DOMAINS) else parts[0] for e in batch
                   if e.key.startswith(DOMAINS) or (parts := parse_cert_key(e.key)) is not None}
        self.writer.apply(changes, self.index.revision, [(d, name_record(self.index, d)) for d in domains])

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
        # From the copy when the index loads from it: local, and it needs no store.
        source = self.copy.get_many(wanted) if self._from_copy and self.copy is not None else None
        found = source if source is not None else await self.store.get_many(wanted)
        for key, value in found.items():
            index.apply_loaded(key, value)
        index.fetched.add(name)

    async def reload(self) -> bool:
        """Load the whole store again (SIGHUP, /v1/reload, a watch that lost track,
        catching up after a start from the local copy); False when the store
        could not be read.

        A store that cannot be read keeps the current index in service; an
        entry that no longer parses keeps its last good version (``Index.replace_with``)."""
        if self.index.loading:
            self._reload_after_load = True  # the initial load may have read some keys too early
            return True
        fresh = Index()
        # Changes the watch applies meanwhile may be newer than what the
        # snapshot read: they are applied again on top of it.
        self._reload_events = []
        self._begin_copy()
        read = 0
        try:
            async for key, value in self.store.snapshot():
                fresh.apply_put(key, value)
                if key not in fresh.errors:
                    self._copy_loaded(key, value)
                read += 1
                if read % 2000 == 0:
                    await self._copy_backlog()
        except StoreError as exc:
            self._reload_events = None
            self._abort_copy()
            self._mark_stale()
            log.error("store reload failed, keeping the current index: %s", exc)
            return False
        events, self._reload_events = self._reload_events, None
        for event in events:
            fresh.apply(event)
        fresh.revision = max(self.store.revision, fresh.revision)
        self.index.replace_with(fresh)
        await self._end_copy(frozenset(fresh.errors), events)
        self._mark_fresh()
        self.reloads += 1
        log.info("store reloaded: %d apps, %d domains, %d names with certificates; %d damaged entries",
                 len(fresh.apps), len(fresh.domains), len(fresh.certs), len(fresh.errors))
        if self.acme is not None:
            self.acme.rescan()
        return True

    def _apply(self, batch: list[Event]) -> None:
        for event in batch:
            self.index.apply_watched(event)
            if (self.on_cert is not None and event.kind is EventKind.PUT and event.value is not None
                    and event.key.startswith(CERTS) and event.key not in self.index.errors):
                self.on_cert(event.key, event.value)
        self._copy_events(batch)
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
                if self.stale_since is not None and self.store.resumable and not first.done():
                    await self._probe()  # etcd replays what was missed: answering is being in step
                batch = await first
                while True:
                    backoff = 0.1
                    self._apply(batch)
                    if self.stale_since is not None and self.store.resumable:
                        self._mark_fresh()  # etcd delivers again, from where it stopped: in step
                    batch = await stream.__anext__()
            except asyncio.CancelledError:
                raise
            except ResyncNeeded as exc:
                armed.set()
                log.warning("store: %s", exc)
                await self.reload()
            except Exception as exc:  # the follower must survive anything
                armed.set()
                self._mark_stale()
                log.error("store watch failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                if not self.store.resumable:
                    await self.reload()  # inotify may have missed changes meanwhile
