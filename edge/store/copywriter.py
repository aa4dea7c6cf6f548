"""The one writer of a host's local copy (``edge.store.localcopy``).

Every write runs on one thread, in the order it was asked for, off the event
loop. Each write is one LMDB transaction that checks the entries it puts
(``edge.records`` decoders: a value that does not parse is not copied, and
the copy keeps its last good version), then derives the ``names`` record of
every domain it touched from that domain's entries *in the same
transaction*: the record and the entries it describes commit together, so a
kill -9 at any moment leaves a copy that holds either the state before or
after a change, and no process needs an index of its own.

A full load (the first start without a copy, a reload, catching up) is
written in pages, each its own transaction, so that readers see the copy
fill and watched changes land between pages. Entries are marked with the
generation of the full load that saw them; the end of the load removes what
it did not see (deleted from the store meanwhile). A key the watch changed
during the load is the watch's: a page read before the change does not
overwrite it. The copy is marked complete when a full load ends: until the
first one does, readers know the copy may lack names (``complete``).
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import struct
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import lmdb

from edge.records import (
    KEY_TYPES,
    SOURCES,
    CertMeta,
    EntryError,
    cert_key,
    decode_name_record,
    encode_name_record,
    parse_app,
    parse_cert,
    parse_cert_key,
    parse_domain,
)
from edge.store.base import APPS, DOMAINS
from edge.store.localcopy import _COMPLETE, _GENERATION, _REVISION, _WRITTEN, LocalCopy, copied

log = logging.getLogger(__name__)

Change = tuple[str, bytes | None]  # (key, value; None: deleted)
Parsed = dict[str, str | CertMeta | None]  # entries of one domain changed by a write: key -> parsed (None: gone)
_ORDER = {(s, k): i for i, (s, k) in enumerate((s, k) for s in SOURCES for k in KEY_TYPES)}
# Entries a full load writes or keeps between two drops of this process's mapping of the
# copy: the kernel maps 64 KiB around each page touched (fault-around), so a load that
# visits every record would otherwise count much of the file in this process's memory.
_RELEASE_EVERY = 1_000


def parse(key: str, value: bytes, digest: bytes) -> str | CertMeta | None:
    """What a names record needs of an entry (a domain's app, a bundle's
    header; None for an app); ``EntryError`` when it cannot be served."""
    if key.startswith(APPS):
        parse_app(key[len(APPS):], value)
        return None
    if key.startswith(DOMAINS):
        return parse_domain(value)
    return parse_cert(key, value, int.from_bytes(digest))


def domain_of(key: str) -> str | None:
    """The domain whose ``names`` record an entry is part of (None: an app)."""
    if key.startswith(DOMAINS):
        return key[len(DOMAINS):]
    parts = parse_cert_key(key)
    return parts[0] if parts is not None else None


class _FullLoad:
    def __init__(self, generation: int) -> None:
        self.mark = struct.pack("<I", generation)
        self.touched: set[str] = set()  # keys the watch changed meanwhile: newer than the pages


class CopyWriter:
    def __init__(self, copy: LocalCopy) -> None:
        self.copy = copy
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-copy")
        self._queued: deque[Future[None]] = deque()  # jobs not done yet: a full load waits when many are
        self._full: _FullLoad | None = None  # writer thread only
        with copy.env.begin(db=copy.meta) as txn:
            raw = txn.get(_GENERATION)
        self._generation = struct.unpack("<I", raw)[0] if raw is not None and len(raw) == 4 else 0
        self._mark = struct.pack("<I", self._generation)
        # store key -> why its value is not served (written on the writer thread; read as a copy).
        self.errors: dict[str, str] = {}
        self.failures = 0
        self._loaded = 0  # entries a full load wrote since this process's mapping of them was last dropped

    def _run(self, job: Callable[..., None], *args: object) -> Future[None]:
        def guarded() -> None:
            try:
                job(*args)
            except lmdb.Error as exc:  # disk full, map full: serving goes on from what is committed
                self.failures += 1
                log.error("local copy %s: write failed: %s", self.copy.path, exc)

        future = self._thread.submit(guarded)
        self._queued.append(future)
        while self._queued and self._queued[0].done():
            self._queued.popleft()
        return future

    async def backlog(self, limit: int = 2) -> None:
        """Wait until at most ``limit`` writes are queued: a full load must not
        hold the whole store in the queue (memory) while the thread catches up."""
        while len(self._queued) > limit:
            await asyncio.wrap_future(self._queued.popleft())

    # --- what the follower asks for ----------------------------------------------------------
    def apply(self, changes: list[Change], revision: int | None) -> Future[None]:
        """Watched changes, and the store revision they bring the copy to (None: unknown)."""
        return self._run(self._apply, changes, revision, False)

    def load(self, changes: list[Change], stamps: dict[str, bytes] | None = None, keep: list[str] | None = None
             ) -> Future[None]:
        """A page of a full load (see the module doc). ``stamps``: the file
        store's stamps of the values; ``keep``: entries the store says are
        unchanged since they were copied (not read again)."""
        return self._run(self._apply, changes, None, True, stamps or {}, keep or [])

    def begin_full(self, first: bool) -> Future[None]:
        """``first``: the copy is not complete (no copy, or a first load was
        interrupted): it is emptied, and readers fetch names on demand until it is."""
        return self._run(self._begin_full, first)

    def end_full(self, revision: int) -> Future[None]:
        """Commit a full load: entries it did not see are removed; the copy is complete."""
        return self._run(self._end_full, revision)

    def abort_full(self) -> None:
        """A full load failed midway: what it wrote stays (store values, newer or equal), nothing is removed."""
        self._run(self._abort_full)

    def touch(self, revision: int) -> None:
        """The store answered and the copy matches it at ``revision``."""
        self._run(self._apply, [], revision, False)

    def flush(self) -> None:
        """Wait for every queued write (tests, shutdown)."""
        self._thread.submit(lambda: None).result()

    def close(self) -> None:
        """Finish the queued writes (a full load cut short removes nothing)."""
        self._run(self._abort_full)
        self._thread.shutdown(wait=True)

    # --- on the writer thread ----------------------------------------------------------------
    def _apply(self, changes: list[Change], revision: int | None, loaded: bool,
               stamps: dict[str, bytes] | None = None, keep: list[str] | None = None) -> None:
        full = self._full
        if loaded and full is None:
            return  # the load was aborted: its late pages are dropped
        with self.copy.env.begin(write=True) as txn:
            touched: dict[str, Parsed] = {}
            for key in keep or ():  # unchanged in the store: this load saw it
                held = txn.get(key.encode(), db=self.copy.digests)
                if full is not None and key not in full.touched and held is not None:
                    txn.put(key.encode(), held[:8] + self._mark, db=self.copy.digests)
            for key, value in changes:
                if not copied(key):
                    continue
                if full is not None:
                    if loaded and key in full.touched:
                        continue
                    if not loaded:
                        full.touched.add(key)
                self._put(txn, key, value, touched, (stamps or {}).get(key))
            for domain, parsed in touched.items():
                self._write_record(txn, domain, parsed)
            if loaded:
                self._loaded += len(changes) + len(keep or ())
                if self._loaded > _RELEASE_EVERY:
                    self._loaded = 0
                    self.copy.release()  # a long load must not map the whole copy into this process
            # During a full load the revision waits for its end: the copy holds
            # the snapshot only in part, a restart must not resume past it.
            if revision is not None and full is None:
                self._stamp(txn, revision)

    def _put(self, txn: lmdb.Transaction, key: str, value: bytes | None, touched: dict[str, Parsed],
             stamp: bytes | None = None) -> None:
        copy = self.copy
        raw = key.encode()
        domain = domain_of(key)
        # The stamp of the file this very value was read from, or none (a watched
        # change, a value not copied): then the next catch-up reads the entry again.
        if stamp:
            txn.put(raw, stamp, db=copy.stamps)
        else:
            txn.delete(raw, db=copy.stamps)
        if value is None:
            self.errors.pop(key, None)
            if txn.delete(raw, db=copy.entries) and domain is not None:
                touched.setdefault(domain, {})[key] = None
            txn.delete(raw, db=copy.digests)
            return
        digest = hashlib.sha256(value).digest()[:8]
        held = txn.get(raw, db=copy.digests)
        try:
            parsed = parse(key, value, digest)
            problem = None
        except EntryError as exc:
            parsed, problem = None, str(exc)
        if problem is not None:
            if self.errors.get(key) != problem:
                log.error("store entry %s skipped: %s; its last good version (if this host saw one) stays "
                          "in service", key, problem)
            self.errors[key] = problem
            txn.delete(raw, db=copy.stamps)
            if held is not None:  # a full load keeps it
                txn.put(raw, held[:8] + self._mark, db=copy.digests)
            return
        self.errors.pop(key, None)
        if held is None or held[:8] != digest:
            txn.put(raw, value, db=copy.entries)
            if domain is not None:
                touched.setdefault(domain, {})[key] = parsed
        if held != digest + self._mark:
            txn.put(raw, digest + self._mark, db=copy.digests)

    def _write_record(self, txn: lmdb.Transaction, domain: str, changed: Parsed) -> None:
        """Bring ``domain``'s names record in step with its entries, ``changed``
        by this transaction: the record it holds, with those replaced; or,
        when it holds none, derived from every entry of the domain."""
        copy = self.copy
        name = domain.encode()
        current = txn.get(name, db=copy.names)
        if current is None:
            app, held = self._derive(txn, domain, changed)
        else:
            app, metas = decode_name_record(domain, current)
            by_kind = {(m.source, m.key_type): m for m in metas}
            for key, parsed in changed.items():
                if key.startswith(DOMAINS):
                    app = parsed if isinstance(parsed, str) else None
                elif (parts := parse_cert_key(key)) is not None:
                    if isinstance(parsed, CertMeta):
                        by_kind[parts[1], parts[2]] = parsed
                    else:
                        by_kind.pop((parts[1], parts[2]), None)
            held = [by_kind[kind] for kind in sorted(by_kind, key=lambda kind: _ORDER.get(kind, len(_ORDER)))]
        if app is None and not held:
            txn.delete(name, db=copy.names)
            return
        record = encode_name_record(app, held)
        if current != record:
            txn.put(name, record, db=copy.names)

    def _derive(self, txn: lmdb.Transaction, domain: str, changed: Parsed) -> tuple[str | None, list[CertMeta]]:
        """A domain's app and bundle headers, from its entries (checked when
        copied); those this transaction wrote as ``changed`` says, not parsed
        again (a first load writes every domain's record so: half its work was this)."""
        copy = self.copy
        key = DOMAINS + domain
        app: str | None = None
        if key in changed:
            parsed = changed[key]
            app = parsed if isinstance(parsed, str) else None
        elif (raw := txn.get(key.encode(), db=copy.entries)) is not None:
            try:
                app = parse_domain(raw)
            except EntryError:
                app = None
        held: list[CertMeta] = []
        for source in SOURCES:
            for key_type in KEY_TYPES:
                key = cert_key(domain, source, key_type)
                if key in changed:
                    if isinstance(parsed := changed[key], CertMeta):
                        held.append(parsed)
                    continue
                value = txn.get(key.encode(), db=copy.entries)
                if value is None:
                    continue
                digest = txn.get(key.encode(), db=copy.digests)
                try:
                    held.append(parse_cert(key, value, None if digest is None else int.from_bytes(digest[:8])))
                except EntryError:
                    continue
        return app, held

    def _stamp(self, txn: lmdb.Transaction, revision: int) -> None:
        txn.put(_REVISION, struct.pack("<q", revision), db=self.copy.meta)
        txn.put(_WRITTEN, struct.pack("<d", time.time()), db=self.copy.meta)

    def _begin_full(self, first: bool) -> None:
        copy = self.copy
        with copy.env.begin(write=True) as txn:
            raw = txn.get(_GENERATION, db=copy.meta)  # another process of the host may have begun one since
            if raw is not None and len(raw) == 4:
                self._generation = max(self._generation, struct.unpack("<I", raw)[0])
            self._generation = (self._generation + 1) & 0xFFFFFFFF
            self._mark = struct.pack("<I", self._generation)
            self._full = _FullLoad(self._generation)
            txn.put(_GENERATION, self._mark, db=copy.meta)
            if first:
                for db in (copy.entries, copy.digests, copy.names, copy.stamps):
                    txn.drop(db, delete=False)
                txn.delete(_COMPLETE, db=copy.meta)
                self.errors.clear()

    def _abort_full(self) -> None:
        self._full = None

    def _end_full(self, revision: int) -> None:
        full, copy = self._full, self.copy
        if full is None:
            return
        self._full = None
        with copy.env.begin(write=True) as txn:
            if txn.get(_GENERATION, db=copy.meta) != full.mark:
                # Another process began a newer full load (an upgrade's successor):
                # its marks are not ours to sweep; it sweeps when it ends.
                log.warning("local copy %s: another process is loading it; this load removes nothing", copy.path)
                return
            stale = []
            for count, (key, value) in enumerate(txn.cursor(db=copy.digests), 1):
                if value[8:12] != full.mark:
                    stale.append(bytes(key))
                if count % _RELEASE_EVERY == 0:
                    copy.release()  # a pass over every entry: not all of it mapped here at once
            touched: dict[str, Parsed] = {}
            for raw in stale:
                txn.delete(raw, db=copy.entries)
                txn.delete(raw, db=copy.digests)
                txn.delete(raw, db=copy.stamps)
                key = raw.decode()
                self.errors.pop(key, None)
                if (domain := domain_of(key)) is not None:
                    touched.setdefault(domain, {})[key] = None
            for domain, parsed in touched.items():
                self._write_record(txn, domain, parsed)
            self._stamp(txn, revision)
            txn.put(_COMPLETE, b"1", db=copy.meta)
        _trim()  # what the load allocated in this thread's arena: give it back
        copy.release()


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
