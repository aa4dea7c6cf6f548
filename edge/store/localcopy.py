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

It *is* the index of the host: no process keeps one of its own on its heap.
One process per host writes (``edge.store.copywriter``: every write runs on
one thread, in order, off the event loop, and derives each domain's
``names`` record from the entries inside the same transaction); every
process reads (``edge.store.shared``). Files are 0600 in a 0700 directory:
the copy holds private keys.

A damaged file (truncated: reading past its end would kill the process with
SIGBUS), a file that is not LMDB, or a copy of another store or format is
removed and rebuilt from the store, with one log line.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import lmdb

from edge.store.base import APPS, CERTS, DOMAINS

log = logging.getLogger(__name__)

FORMAT = b"edge-index-4"  # 4: digests carry the generation of the full load that last saw the entry
PREFIXES = (APPS, DOMAINS, CERTS)
# The file is sparse at this size (``ls`` shows it, ``du`` shows what it holds:
# ~1.3 GB at 100k bundles of 4 KiB); room for a million bundles of RSA chains.
MAP_SIZE = 16 << 30
_MADV_DONTNEED = 4  # Linux: on a shared file mapping, drops this process's page table entries only
_REVISION = b"revision"
_WRITTEN = b"written"  # wall-clock time the copy was last known to match the store
_COMPLETE = b"complete"  # set once a full load committed: the copy holds the whole store (as of ``written``)
_GENERATION = b"generation"  # of the last full load begun (edge.store.copywriter)


_SCAN = 50_000  # records read between two drops of this process's mapping (``records``)


class CopyState(NamedTuple):
    revision: int  # the store revision the copy reflects (etcd; 0 for the file store)
    written: float  # wall-clock time it was last known to match the store
    entries: int
    complete: bool  # a full load committed (else: a first load is under way, or was interrupted)


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
        # domain -> its app and bundle headers (``records.encode_name_record``):
        # what every process selects from, one lookup per name.
        self.names = self.env.open_db(b"names")
        # key -> 8 bytes of the value's SHA-256 and 4 of the generation of the
        # full load that last saw it: a full load rewrites only what changed
        # (without reading, and so mapping, every stored bundle), then removes
        # what it did not see.
        self.digests = self.env.open_db(b"digests")
        # key -> the file store's stamp (mtime, size, inode) of the file the
        # entry was read from: catching up reads only the files that changed.
        self.stamps = self.env.open_db(b"stamps")

    # --- reading (any process, any thread) ---------------------------------------------------
    def state(self) -> CopyState:
        """What the last committed change left."""
        with self.env.begin() as txn:
            revision = _unpack(txn.get(_REVISION, db=self.meta), "<q", 0)
            written = _unpack(txn.get(_WRITTEN, db=self.meta), "<d", 0.0)
            count = txn.stat(self.entries)["entries"]
            complete = txn.get(_COMPLETE, db=self.meta) == b"1"
        return CopyState(int(revision), float(written), int(count), complete)

    def complete(self) -> bool:
        with self.env.begin(db=self.meta) as txn:
            return txn.get(_COMPLETE) == b"1"

    def version(self) -> int:
        """Changes with every committed write (the LMDB transaction id): lets readers cache derived views."""
        return int(self.env.info()["last_txnid"])

    def names_count(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self.names)["entries"])

    def counts(self) -> tuple[int, int, int]:
        """(apps, domains, names with certificates): one pass over the names records, for log lines."""
        apps = sum(1 for _ in self.items(APPS))
        domains = certs = 0
        for _domain, raw in self.records():
            domains += not raw.startswith(b"[null,")
            certs += not raw.endswith(b",[]]")
        return apps, domains, certs

    def get(self, key: str) -> bytes | None:
        with self.env.begin(db=self.entries) as txn:
            return txn.get(key.encode())

    def name(self, domain: str) -> bytes | None:
        with self.env.begin(db=self.names) as txn:
            return txn.get(domain.encode())

    def records(self) -> Iterator[tuple[str, bytes]]:
        """Every name record (``records.encode_name_record``), from one snapshot.
        A pass over all of them must not leave them mapped in this process (the
        kernel maps 64 KiB around each page read): dropped every ``_SCAN`` records."""
        with self.env.begin(db=self.names) as txn:
            for count, (key, value) in enumerate(txn.cursor(), 1):
                if count % _SCAN == 0:
                    self.release()
                yield key.decode(), value

    def stamps_of(self, keys: list[str]) -> dict[str, bytes]:
        with self.env.begin(db=self.stamps) as txn:
            return {k: v for k in keys if (v := txn.get(k.encode())) is not None}

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


def _unpack(raw: bytes | memoryview | None, fmt: str, default: float) -> float:
    return struct.unpack(fmt, raw)[0] if raw is not None and len(raw) == struct.calcsize(fmt) else default


def _open_checked(path: Path, identity: bytes, rebuild: bool) -> lmdb.Environment:
    """Open the copy; a damaged or foreign one is removed and a new one made."""
    env = None
    try:
        # Checked before opening for writing: with writemap, that extends the
        # file to the map size (zeros where the truncated pages were).
        problem = _truncated(path)
        if problem is None:
            env = _open(path)
            problem = _problem(env, identity)
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


def _truncated(path: Path) -> str | None:
    data = path / "data.mdb"
    if not data.exists():
        return None
    size = data.stat().st_size
    probe = lmdb.open(str(path), readonly=True, lock=False, subdir=True, max_dbs=8)
    try:
        needed = (probe.info()["last_pgno"] + 1) * probe.stat()["psize"]
    finally:
        probe.close()
    return "is truncated" if size < needed else None


def _problem(env: lmdb.Environment, identity: bytes) -> str | None:
    stat = env.stat()
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

