"""The host's local copy of what the store held when last seen (LMDB).

Why it exists: serving must not depend on the store being reachable (a
bundle read from etcd at handshake time fails while etcd is down), and a
restart should not have to re-read the whole store before every name is
known. The copy holds the entries that decide what is served (``apps/``,
``domains/``, ``certs/``, bundles with their keys) and the store revision
they reflect.

Why LMDB: a copy-on-write B+tree in one memory-mapped file. A transaction
commits by switching a meta page, so a process killed at any moment leaves
the state before or after a change, never a torn one; readers in every
process see one consistent snapshot without locks and read values without
copying them onto the Python heap until asked.

One process per host writes (``CopyWriter``: every write runs on one thread,
in order, off the event loop); every process reads. Files are 0600 in a
0700 directory: the copy holds private keys.

A damaged file (truncated: reading past its end would kill the process with
SIGBUS), a file that is not LMDB, or a copy of another store or format is
removed and rebuilt from the store, with one log line.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import os
import shutil
import struct
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import lmdb

from edge.store.base import APPS, CERTS, DOMAINS

log = logging.getLogger(__name__)

FORMAT = b"edge-index-3"
PREFIXES = (APPS, DOMAINS, CERTS)
# The file is sparse at this size (``ls`` shows it, ``du`` shows what it holds:
# ~1.3 GB at 100k bundles of 4 KiB); room for a million bundles of RSA chains.
MAP_SIZE = 16 << 30
_MADV_DONTNEED = 4  # Linux: on a shared file mapping, drops this process's page table entries only
_REVISION = b"revision"
_WRITTEN = b"written"  # wall-clock time the copy was last known to match the store


def copied(key: str) -> bool:
    """Is ``key`` one of the entries the copy keeps (those that decide what is served)?"""
    return key.startswith(PREFIXES)


class LocalCopy:
    """Read access to the copy (every process) and the write primitives (the writer's thread)."""

    def __init__(self, path: Path, identity: str, *, rebuild: bool = False) -> None:
        """Open the copy at ``path``. ``rebuild``: the process that prepares the
        copy (before any reader opens it) replaces a damaged one; a reader
        raises ``lmdb.Error`` and does without."""
        self.path = path
        self.identity = identity.encode()
        self.env = _open_checked(path, self.identity, rebuild)
        self.entries = self.env.open_db(b"entries")
        self.meta = self.env.open_db(b"meta")
        # domain -> its app and bundle headers (``index.name_record``): what a
        # worker reading the shared index selects from, one lookup per name.
        self.names = self.env.open_db(b"names")
        # key -> 8 bytes of the value's SHA-256: a full load rewrites only what
        # changed, without reading (and so mapping into memory) every stored bundle.
        self.digests = self.env.open_db(b"digests")

    # --- reading (any process, any thread) ---------------------------------------------------
    def state(self) -> tuple[int, float, int]:
        """(revision, written at, entries) of the last committed change."""
        with self.env.begin() as txn:
            revision = _unpack(txn.get(_REVISION, db=self.meta), "<q", 0)
            written = _unpack(txn.get(_WRITTEN, db=self.meta), "<d", 0.0)
            count = txn.stat(self.entries)["entries"]
        return int(revision), float(written), int(count)

    def get(self, key: str) -> bytes | None:
        with self.env.begin(db=self.entries) as txn:
            return txn.get(key.encode())

    def name(self, domain: str) -> bytes | None:
        with self.env.begin(db=self.names) as txn:
            return txn.get(domain.encode())

    def records(self) -> Iterator[tuple[str, bytes]]:
        """Every name record (``index.name_record``), from one snapshot."""
        with self.env.begin(db=self.names) as txn:
            for key, value in txn.cursor():
                yield key.decode(), value

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        with self.env.begin(db=self.entries) as txn:
            return {k: v for k in keys if (v := txn.get(k.encode())) is not None}

    def items(self, prefix: str = "", *, with_revision: bool = False) -> Iterator[tuple[str, bytes]]:
        """Every entry under ``prefix``, from one consistent snapshot.
        ``with_revision``: the first item is ``("", revision, 8 bytes little-endian)``,
        so a reader knows which store revision the entries reflect."""
        with self.env.begin(db=self.entries, buffers=True) as txn:
            if with_revision:
                yield "", struct.pack("<q", int(_unpack(txn.get(_REVISION, db=self.meta), "<q", 0)))
            cursor = txn.cursor()
            start = prefix.encode()
            if not cursor.set_range(start):
                return
            for key, value in cursor:
                if not bytes(key).startswith(start):
                    return
                yield bytes(key).decode(), bytes(value)

    def release(self) -> None:
        """Unmap the pages this process touched (a full load writes every one):
        they stay in the page cache, shared and reclaimable, and fault back in
        on the next read; this process's memory (PSS) no longer counts them."""
        data = str(self.path.resolve() / "data.mdb")
        try:
            with open("/proc/self/maps") as maps:
                ranges = [line.split()[0] for line in maps if line.rstrip().endswith(data)]
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            return
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        for span in ranges:
            start, end = (int(x, 16) for x in span.split("-"))
            libc.madvise(start, end - start, _MADV_DONTNEED)

    def close(self) -> None:
        self.env.close()


def _unpack(raw: bytes | None, fmt: str, default: float) -> float:
    return struct.unpack(fmt, raw)[0] if raw is not None and len(raw) == struct.calcsize(fmt) else default


def _open_checked(path: Path, identity: bytes, rebuild: bool) -> lmdb.Environment:
    """Open the copy; a damaged or foreign one is removed and a new one made."""
    env = None
    data = path / "data.mdb"
    # Measured before opening: with writemap, opening extends the file to the map size.
    size = data.stat().st_size if data.exists() else None
    try:
        env = _open(path)
        problem = _problem(env, size, identity)
    except (lmdb.Error, OSError) as exc:
        problem = f"is not a readable LMDB file ({exc})"
    if problem is None and env is not None:
        return env
    if env is not None:
        env.close()
    if not rebuild:
        raise lmdb.Error(f"local copy {path} {problem}")
    log.error("local copy %s %s: removed, it is rebuilt from the store", path, problem)
    shutil.rmtree(path, ignore_errors=True)
    env = _open(path)
    _stamp(env, identity)
    return env


def _open(path: Path) -> lmdb.Environment:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    old = os.umask(0o077)  # data.mdb and lock.mdb 0600: the copy holds private keys
    try:
        # writemap: a write goes to the mapped file's pages, not to buffers LMDB
        # allocates and keeps for reuse (a full load would hold the whole store on the heap).
        return lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=8, subdir=True, writemap=True,
                         metasync=False, readahead=False, lock=True)
    finally:
        os.umask(old)


def _problem(env: lmdb.Environment, size: int | None, identity: bytes) -> str | None:
    info, stat = env.info(), env.stat()
    if size is not None and size < (info["last_pgno"] + 1) * stat["psize"]:
        return "is truncated"
    meta = env.open_db(b"meta")
    with env.begin(db=meta) as txn:
        fmt, owner = txn.get(b"format"), txn.get(b"store")
    if fmt is None and owner is None and stat["entries"] <= 1:  # a new, empty file
        _stamp(env, identity)
        return None
    if fmt != FORMAT:
        return f"has another format ({fmt!r})"
    if owner != identity:
        return f"is a copy of another store ({owner!r})"
    return None


def _stamp(env: lmdb.Environment, identity: bytes) -> None:
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        txn.put(b"format", FORMAT, db=meta)
        txn.put(b"store", identity, db=meta)


class CopyWriter:
    """The one writer of a host's copy. Writes are queued to one thread, so
    they apply in the order they were asked for and never block the event loop.

    A full load (``begin_full`` … ``end_full``) is one transaction: until it
    commits, readers (and a restart after a crash) see the previous copy.
    Changes asked for meanwhile go into the same transaction, in order.
    """

    def __init__(self, copy: LocalCopy) -> None:
        self.copy = copy
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-copy")
        self._queued: deque[Future[None]] = deque()  # jobs not done yet: a full load waits when many are
        self._full: lmdb.Transaction | None = None
        self._seen: set[bytes] | None = None  # entries a full load wrote
        self._seen_names: set[bytes] | None = None
        self.failures = 0

    def _run(self, job, *args: object) -> None:  # type: ignore[no-untyped-def]
        def guarded() -> None:
            try:
                job(*args)
            except lmdb.Error as exc:  # disk full, map full: serving goes on from memory
                self.failures += 1
                log.error("local copy %s: write failed: %s", self.copy.path, exc)
                self._abort_full()

        self._queued.append(self._thread.submit(guarded))
        while self._queued and self._queued[0].done():
            self._queued.popleft()

    async def backlog(self, limit: int = 2) -> None:
        """Wait until at most ``limit`` writes are queued: a full load must not
        hold the whole store in the queue (memory) while the thread catches up."""
        while len(self._queued) > limit:
            await asyncio.wrap_future(self._queued.popleft())

    def apply(self, changes: list[tuple[str, bytes | None]], revision: int | None,
              names: list[tuple[str, bytes | None]] = ()) -> None:  # type: ignore[assignment]
        """Puts (value) and deletes (None) of entries and of name records, and
        the revision they bring the copy to (None: part of a full load)."""
        self._run(self._apply, changes, revision, names)

    def begin_full(self) -> None:
        self._run(self._begin_full)

    def end_full(self, revision: int, keep: frozenset[str] = frozenset()) -> None:
        """Commit a full load: entries it did not put are removed (except ``keep``:
        damaged in the store, their last good version stays)."""
        self._run(self._end_full, revision, keep)

    def abort_full(self) -> None:
        """Drop a full load that failed midway: the previous copy stays."""
        self._run(self._abort_full)

    def touch(self, revision: int) -> None:
        """The store answered and the copy matches it at ``revision``."""
        self._run(self._apply, [], revision, [])

    def flush(self) -> None:
        """Wait for every queued write (tests, shutdown)."""
        self._thread.submit(lambda: None).result()

    def close(self) -> None:
        """Finish the queued writes; a full load still open (its task was
        cancelled at shutdown) is dropped: the copy keeps its previous state."""
        self._run(self._abort_full)
        self._thread.shutdown(wait=True)

    # --- on the writer thread ----------------------------------------------------------------
    def _apply(self, changes: list[tuple[str, bytes | None]], revision: int | None,
               names: list[tuple[str, bytes | None]]) -> None:
        if self._full is not None:
            self._write(self._full, changes, None, names)
            return
        with self.copy.env.begin(write=True) as txn:
            self._write(txn, changes, revision, names)

    def _write(self, txn: lmdb.Transaction, changes: list[tuple[str, bytes | None]], revision: int | None,
               names: list[tuple[str, bytes | None]]) -> None:
        entries, digests, records = self.copy.entries, self.copy.digests, self.copy.names
        for key, value in changes:
            raw = key.encode()
            if self._seen is not None:
                self._seen.add(raw)
            if value is None:
                txn.delete(raw, db=entries)
                txn.delete(raw, db=digests)
                continue
            digest = hashlib.sha256(value).digest()[:8]
            if txn.get(raw, db=digests) != digest:  # unchanged values are not rewritten (a catch-up)
                txn.put(raw, value, db=entries)
                txn.put(raw, digest, db=digests)
        for key, value in names:
            raw = key.encode()
            if self._seen_names is not None:
                self._seen_names.add(raw)
            if value is None:
                txn.delete(raw, db=records)
            elif txn.get(raw, db=records) != value:
                txn.put(raw, value, db=records)
        if revision is not None:
            self._stamp_revision(txn, revision)

    def _stamp_revision(self, txn: lmdb.Transaction, revision: int) -> None:
        meta = self.copy.meta
        txn.put(_REVISION, struct.pack("<q", revision), db=meta)
        txn.put(_WRITTEN, struct.pack("<d", time.time()), db=meta)

    def _begin_full(self) -> None:
        if self._full is None:
            self._full = self.copy.env.begin(write=True)
            self._seen, self._seen_names = set(), set()

    def _abort_full(self) -> None:
        if self._full is not None:
            self._full.abort()
            self._full, self._seen, self._seen_names = None, None, None

    def _end_full(self, revision: int, keep: frozenset[str]) -> None:
        txn, seen, seen_names = self._full, self._seen, self._seen_names
        if txn is None or seen is None or seen_names is None:
            return
        seen |= {k.encode() for k in keep}
        for dbs, kept in (((self.copy.digests, self.copy.entries), seen), ((self.copy.names,), seen_names)):
            stale = [bytes(k) for k in txn.cursor(db=dbs[0]).iternext(keys=True, values=False) if bytes(k) not in kept]
            for key in stale:
                for db in dbs:
                    txn.delete(key, db=db)
        self._stamp_revision(txn, revision)
        txn.commit()
        self._full, self._seen, self._seen_names = None, None, None
        _trim()  # what a full load allocated in this thread's arena: give it back
        self.copy.release()


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
