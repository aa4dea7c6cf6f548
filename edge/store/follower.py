"""The store follower: the one process of a host that keeps its local copy in step with the store.

It holds no index of its own: every change it sees goes to the copy
(``edge.store.copywriter``), which every process of the host, this one
included, serves from (``edge.store.shared``). It owns "the store is
loading": ``loaded`` is set once the copy holds the whole store, and until
then ``ensure(name)`` reads a name's entries from the store for the handshake
that asks (``CopyFollower``).

Start-up with a complete copy: serve it at once (``stale_since`` says since
when it may be behind), then catch up: etcd resumes its watch from the
revision the copy reflects (a compacted one: a full reload in the
background, while serving); the file store is read again in the background
and the differences written (``CopyWriter`` rewrites only what changed).
Without one (a host's first start): the apps are read, the watch armed,
and the store loaded into the copy in the background.

etcd: snapshot at revision R, then watch from R+1. inotify cannot replay the
past: arm the watch first, then load (a change in between is seen twice,
harmlessly).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from edge.store.base import APPS, CERTS, Event, EventKind, ResyncNeeded, Store, StoreError
from edge.store.copywriter import CopyWriter, domain_of
from edge.store.localcopy import LocalCopy, copied
from edge.store.shared import CopyFollower

log = logging.getLogger(__name__)

_PAGE = 2000  # entries per page of a full load


class FollowError(RuntimeError):
    """The store cannot be read at start: nothing sensible to serve."""


class StoreListener(Protocol):
    """Told of store changes (the ACME manager)."""

    def notice(self, key: str) -> None:
        """A watched change of ``key``."""
        ...

    def rescan(self) -> None:
        """The whole store was (re)loaded: look at everything again."""
        ...


class StoreFollower(CopyFollower):
    def __init__(self, store: Store, copy: LocalCopy, writer: CopyWriter, listener: StoreListener | None = None,
                 on_cert: Callable[[str, bytes], None] | None = None, loaded: asyncio.Event | None = None) -> None:
        super().__init__(store, copy, writer.errors, loaded, on_cert)
        self.writer = writer
        self.listener = listener
        self.revision = 0  # the store revision the copy is being brought to
        self.watch_task: asyncio.Task[None] | None = None
        self._reload_after_load = False
        self._reloading = asyncio.Lock()  # one full load at a time: each sweeps what it did not see

    async def start(self) -> None:
        """Serve the copy, or start the first load (see the module doc)."""
        state = self.copy.state()
        loop = asyncio.get_running_loop()
        if state.complete:
            self.revision = state.revision
            self.stale_since = state.written
            self._set_loaded()
            log.info("serving the local copy %s (%d entries, in step with the store at %s); catching up",
                     self.copy.path, state.entries, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.written)))
            self.tasks.append(loop.create_task(self._catch_up(time.monotonic())))
            return
        try:
            await self.store.prepare()
            apps = await self.store.items(APPS)
        except StoreError as exc:  # no copy, no store: nothing sensible to serve
            raise FollowError(f"cannot load the store: {exc}") from None
        await self._start_overlay(apps)
        begun = self.writer.begin_full(first=True)  # the load's pages queue behind it on the writer's thread
        armed = asyncio.Event()
        if not self.store.resumable:
            self._start_watch(armed)
            await armed.wait()
        self.tasks.append(loop.create_task(self._initial_load(armed)))
        # The load's first read is sent while this waits: etcd answers it while
        # the rest of start-up runs, not while the first handshake's read waits
        # (etcd 3.4 counts the whole prefix for that first page: ~0.1 s at 100k names).
        await asyncio.wrap_future(begun)

    async def _catch_up(self, started: float) -> None:
        counts = await asyncio.to_thread(self.copy.counts)
        log.info("local copy loaded: %d apps, %d domains, %d names with certificates in %.2f s",
                 *counts, time.monotonic() - started)
        self.copy.release()  # the pages that count read: this process keeps none it does not serve from
        armed = asyncio.Event()
        self._start_watch(armed)  # etcd: from the copy's revision on; a compacted one reloads in full
        await armed.wait()
        if self.store.resumable:
            if self.listener is not None:
                self.listener.rescan()
            return
        backoff = 0.5  # inotify cannot replay what changed while edge was down: read the store again
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
        self.writer.touch(self.revision)

    def stopped(self) -> bool:
        return self.watch_task is not None and self.watch_task.done()

    def _start_watch(self, armed: asyncio.Event) -> None:
        self.watch_task = asyncio.get_running_loop().create_task(self._watch(armed))
        self.tasks.append(self.watch_task)

    async def _load_pages(self, armed: asyncio.Event | None = None) -> int:
        """Read the store's snapshot into the copy's current full load; how many values were read
        (the file store does not read again what the copy holds: ``Store.snapshot_stamped``)."""
        read = 0
        page: list[tuple[str, bytes | None]] = []
        stamps: dict[str, bytes] = {}
        keep: list[str] = []
        async for key, value, stamp in self.store.snapshot_stamped(self._stamps_of):
            if armed is not None and self.store.resumable and self.watch_task is None:
                # The snapshot's revision is known from its first page on.
                self.revision = max(self.revision, self.store.revision)
                self._start_watch(armed)
            read += value is not None
            if not copied(key):
                continue
            if value is None:
                keep.append(key)  # unchanged since the copy read it: not read again
            else:
                page.append((key, value))
                if stamp:
                    stamps[key] = stamp
            if len(page) >= _PAGE or len(keep) >= _PAGE:
                self.writer.load(page, stamps, keep)
                page, stamps, keep = [], {}, []
                await self.writer.backlog()
                await asyncio.sleep(0)  # handshakes go on while loading
        if page or keep:
            self.writer.load(page, stamps, keep)
        return read

    def _stamps_of(self, keys: list[str]) -> dict[str, bytes]:
        """The stamps the copy recorded (the store's thread, a catch-up): the
        kernel maps 64 KiB around each page read, so this process's mapping is
        dropped again, else a catch-up at a million names counts gigabytes."""
        stamps = self.copy.stamps_of(keys)
        self.copy.release()
        return stamps

    async def _initial_load(self, armed: asyncio.Event) -> None:
        started = time.monotonic()
        backoff = 0.5
        while True:
            try:
                read = await self._load_pages(armed)
                break
            except StoreError as exc:
                self._mark_stale()
                log.error("loading the store failed (%s); serving what is loaded, retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        self.revision = max(self.revision, self.store.revision)
        if self.watch_task is None:  # an empty etcd prefix
            self._start_watch(armed)
        await asyncio.wrap_future(self.writer.end_full(self.revision))
        self._set_loaded()
        self.stale_since = None
        self.reloads += 1
        log.info("store loaded: %d apps, %d domains, %d names with certificates in %.1f s (%d entries read)",
                 *await asyncio.to_thread(self.copy.counts), time.monotonic() - started, read)
        self._report_corrupted()
        self.copy.release()
        if self._reload_after_load:
            self._reload_after_load = False
            await self.reload()
        elif self.listener is not None:
            self.listener.rescan()

    def _report_corrupted(self) -> None:
        """Say what the store holds that is not served as stored."""
        errors = self.index.corrupted(20)
        for key, reason in errors.items():
            log.error("store entry %s is damaged and not served (%s); `edge check` lists every damaged entry",
                      key, reason)
        orphans = [domain for domain, raw in self.copy.records() if raw.startswith(b"[null,")]
        if orphans:
            # Left by a command killed midway (or a hand edit): not served,
            # as they are listed nowhere; the operator decides what they were.
            log.warning("store: %d certificates belong to no domain and are not served (%s%s); "
                        "`edge check` lists them",
                        len(orphans), ", ".join(orphans[:5]), ", ..." if len(orphans) > 5 else "")

    async def reload(self) -> bool:
        """Load the whole store again into the copy (SIGHUP, /v1/reload, a watch
        that lost track, catching up after a start from the copy); False when
        the store could not be read: the copy stays in service as it is.

        An entry that no longer parses keeps its last good version (the copy writer)."""
        if not self.loaded.is_set():
            self._reload_after_load = True  # the first load may have read some keys too early
            return True
        async with self._reloading:
            await asyncio.wrap_future(self.writer.begin_full(first=False))
            try:
                read = await self._load_pages()
            except StoreError as exc:
                self.writer.abort_full()
                self._mark_stale()
                log.error("store reload failed, serving the local copy as it is: %s", exc)
                return False
            except BaseException:
                self.writer.abort_full()
                raise
            self.revision = max(self.revision, self.store.revision)
            await asyncio.wrap_future(self.writer.end_full(self.revision))
        self._mark_fresh()
        self.reloads += 1
        log.info("store reloaded: %d apps, %d domains, %d names with certificates; %d damaged entries (%d read)",
                 *await asyncio.to_thread(self.copy.counts), len(self.writer.errors), read)
        self.copy.release()
        if self.listener is not None:
            self.listener.rescan()
        return True

    def _apply(self, batch: list[Event]) -> None:
        changes: list[tuple[str, bytes | None]] = []
        for event in batch:
            self.revision = max(self.revision, event.revision)
            if not copied(event.key):
                continue
            value = event.value if event.kind is EventKind.PUT else None
            changes.append((event.key, value))
            if self.on_cert is not None and value is not None and event.key.startswith(CERTS):
                self.on_cert(event.key, value)
            if self.overlay.active and (domain := domain_of(event.key)) is not None:
                self.overlay.names.pop(domain, None)  # read again on demand: the copy may hold it only in part
        written = self.writer.apply(changes, self.revision) if changes else None
        if self.listener is not None:
            listener, keys = self.listener, [event.key for event in batch]

            def notice(_: object = None) -> None:
                for key in keys:
                    listener.notice(key)

            if written is None:
                notice()
            else:  # once the copy holds the change: the listener reads it from there
                asyncio.wrap_future(written).add_done_callback(notice)
        if batch and batch[-1].changed_at:
            self.sync_lag = max(0.0, time.time() - batch[-1].changed_at)

    async def _watch(self, armed: asyncio.Event) -> None:
        backoff = 0.1
        while True:
            try:
                stream = self.store.watch(self.revision + 1)
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
