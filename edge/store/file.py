"""The ``file`` store: one file per key in a directory an operator can read.

    <root>/apps/<app>.json
    <root>/domains/<domain>.json          ("*.example.com" is written "_.example.com")
    <root>/certs/<source>-<keytype>/<domain>.pem   (mode 0600)

Writes are atomic: a temporary file in the same directory, fsync, rename,
fsync of the directory. Readers never see half a file. Running edge
processes follow the directories with inotify and apply a change a few
milliseconds after the rename.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import logging
import os
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

from edge.records import KEY_TYPES, SOURCES
from edge.store.base import APPS, CERTS, DOMAINS, LOCKS, Event, EventKind, Lock, ResyncNeeded, Store, StoreError
from edge.store.inotify import Inotify, Overflow

log = logging.getLogger(__name__)

_SUFFIX = {APPS: ".json", DOMAINS: ".json", CERTS: ".pem"}
_TMP_PREFIX = ".tmp-"
_STANDARD_DIRS = (
    "apps", "domains", "acme/challenges", "acme/tls-alpn", "acme/status", "locks",
    *(f"certs/{source}-{kind}" for source in SOURCES for kind in KEY_TYPES),
)
_SNAPSHOT_BATCH = 5000
_READ_SIZE = 1 << 17  # larger than any valid entry (bundles are capped at 64 KiB)


def _suffix(key: str) -> str:
    for prefix, suffix in _SUFFIX.items():
        if key.startswith(prefix):
            return suffix
    return ".dat"


class FileLock(Lock):
    def __init__(self, store: FileStore, fd: int) -> None:
        self.store = store
        self.fd: int | None = fd

    async def put_if_held(self, key: str, value: bytes, *, secret: bool = False) -> bool:
        if self.fd is None:
            return False
        await self.store.put(key, value, secret=secret)
        return True

    async def refresh(self) -> bool:
        return self.fd is not None

    async def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


class FileStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = root
        # Files carry no revision: count changes seen by this process instead.
        # Watching starts from "now", so the count only orders events locally.
        self._revision = 0

    # --- key <-> path -----------------------------------------------------
    def path_of(self, key: str) -> Path:
        if ".." in key or key.startswith("/") or "\0" in key:
            raise StoreError(f"invalid store key {key!r}")
        head, _, name = key.rpartition("/")
        name = name.replace("*", "_")  # "*.example.com" -> "_.example.com"
        return self.root / head / (name + _suffix(key))

    def key_of(self, path: Path) -> str | None:
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return None
        if rel.name.startswith(".") or rel.suffix not in (".json", ".pem", ".dat"):
            return None
        name = rel.stem
        if name.startswith("_."):
            name = "*" + name[1:]
        head = rel.parent.as_posix()
        key = f"{head}/{name}"
        return key if _suffix(key) == rel.suffix else None

    # --- blocking primitives, run in a thread ------------------------------
    def _read(self, key: str) -> bytes | None:
        try:
            return self.path_of(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self.path_of(key)}: {exc.strerror}") from None

    def _write(self, key: str, value: bytes, secret: bool, sync: bool = True) -> None:
        path = self.path_of(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
            try:
                # mkstemp creates 0600; public values get the usual 0644.
                if not secret:
                    os.fchmod(fd, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(value)
                    if sync:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
            if sync:
                self._fsync_dir(path.parent)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror}") from None

    def _write_many(self, items: list[tuple[str, bytes, bool]]) -> None:
        # Each file is still written to a temporary name and renamed (readers
        # never see half of one); the data reaches the disk in one sync at the
        # end instead of two fsyncs per file, which made bulk imports disk-bound.
        for key, value, secret in items:
            self._write(key, value, secret, sync=False)
        os.sync()

    def _read_many(self, keys: list[str]) -> list[tuple[str, bytes | None, float]]:
        """(key, value or None, when it changed) for each key."""
        out = []
        for key in keys:
            value = self._read(key)
            try:
                changed = self.path_of(key).stat().st_mtime if value is not None else time.time()
            except FileNotFoundError:
                changed = time.time()
            out.append((key, value, changed))
        return out

    def _remove(self, key: str) -> bool:
        path = self.path_of(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot remove {path}: {exc.strerror}") from None
        self._fsync_dir(path.parent)
        return True

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- Store --------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self._read, key)

    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        def read() -> dict[str, bytes]:
            return {key: value for key in keys if (value := self._read(key)) is not None}

        return await asyncio.to_thread(read)

    async def put(self, key: str, value: bytes, *, secret: bool = False) -> None:
        await asyncio.to_thread(self._write, key, value, secret)

    async def put_many(self, items: list[tuple[str, bytes, bool]]) -> None:
        await asyncio.to_thread(self._write_many, items)

    async def delete(self, key: str) -> bool:
        return await asyncio.to_thread(self._remove, key)

    def _root_present(self) -> None:
        """A store whose directory is gone (moved away, unmounted, replaced by a file) read as
        empty would drop every name: a store error instead (#18); the local copy is served."""
        if not self.root.is_dir():
            raise StoreError(f"store directory {self.root} is missing or not a directory")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StoreError(f"store directory {self.root} is not readable")

    async def prepare(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

    async def items(self, prefix: str) -> dict[str, bytes]:
        listed = await asyncio.to_thread(self._list, prefix)
        return dict(await asyncio.to_thread(self._read_paths, listed))

    def _stamped(self, chunks: Iterator[list[tuple[str, str]]]) -> list[tuple[str, str, bytes]] | None:
        """The next chunk of ``_walk`` as (key, path, stamp: mtime, size, inode); None at the end."""
        chunk = next(chunks, None)
        if chunk is None:
            return None
        out = []
        for key, path in chunk:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # removed since it was listed: the watch reports it
            except OSError as exc:
                log.error("store: cannot read %s: %s; skipped", path, exc.strerror)
                continue
            out.append((key, path, struct.pack("<qqQ", st.st_mtime_ns, st.st_size, st.st_ino)))
        return out

    def _list(self, prefix: str) -> list[tuple[str, str]]:
        return [item for chunk in self._walk(prefix) for item in chunk]

    def _walk(self, prefix: str) -> Iterator[list[tuple[str, str]]]:
        """(key, path) of every entry under ``prefix`` (two directory levels at most), in chunks."""
        chunk: list[tuple[str, str]] = []  # edge replaces files by renaming: a change is a new inode
        suffix = _SUFFIX.get(prefix, ".dat")
        todo = [(str(self.root / prefix.rstrip("/")), prefix)]
        while todo:
            directory, key_prefix = todo.pop()
            try:
                entries = os.scandir(directory)
            except FileNotFoundError:
                continue
            with entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        todo.append((entry.path, f"{key_prefix}{name}/"))
                    elif name.endswith(suffix):
                        stem = name[: -len(suffix)]
                        if stem.startswith("_."):
                            stem = "*" + stem[1:]
                        chunk.append((key_prefix + stem, entry.path))
                        if len(chunk) >= _SNAPSHOT_BATCH:
                            yield chunk
                            chunk = []
        if chunk:
            yield chunk

    @staticmethod
    def _read_paths(items: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
        out = []
        for key, path in items:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # removed since it was listed: the watch reports it
            except OSError as exc:
                log.error("store: cannot read %s: %s; skipped", path, exc.strerror)
                continue
            try:
                data = os.read(fd, _READ_SIZE)
                if len(data) == _READ_SIZE:  # a short read is the end of a regular file
                    chunks = [data]
                    while chunk := os.read(fd, _READ_SIZE):
                        chunks.append(chunk)
                    data = b"".join(chunks)
            finally:
                os.close(fd)
            out.append((key, data))
        return out

    async def snapshot(self) -> AsyncIterator[tuple[str, bytes]]:  # type: ignore[override]
        """Every entry, read in batches off the event loop: at a million names
        the whole store is never held in memory at once."""
        async for key, value, _ in self.snapshot_stamped(lambda _keys: {}):
            if value is not None:
                yield key, value

    async def snapshot_stamped(self, known: Callable[[list[str]], Mapping[str, bytes]]
                               ) -> AsyncIterator[tuple[str, bytes | None, bytes]]:
        for prefix in (APPS, DOMAINS, CERTS):
            self._root_present()
            chunks = self._walk(prefix)  # advanced in a thread, one chunk at a time
            while (part := await asyncio.to_thread(self._stamped, chunks)) is not None:
                held = await asyncio.to_thread(known, [key for key, _, _ in part])
                stamps = {key: stamp for key, _, stamp in part}
                changed = []
                for key, path, stamp in part:
                    if held.get(key) == stamp:
                        yield key, None, stamp  # unchanged since the copy read it
                    else:
                        changed.append((key, path))
                for key, value in await asyncio.to_thread(self._read_paths, changed):
                    yield key, value, stamps[key]
        self._root_present()  # gone while it was read: what was listed last may be empty for that reason

    @property
    def revision(self) -> int:
        return self._revision

    async def watch(self, start_revision: int) -> AsyncIterator[list[Event]]:  # type: ignore[override]
        """Follow the store's directories with inotify (``edge.store.inotify``).

        The watches are in place when the first step of this generator has
        run (before its first await), so the caller arms the watch, *then*
        loads the snapshot: a change between the two is seen twice, never
        missed, and applying it twice is harmless.
        """
        self._root_present()  # never created here: that would make a vanished store look empty
        watcher = Inotify()
        try:
            # Every directory an entry can land in exists and is watched before
            # anything is read: the layout is fixed, no directory appears later.
            for directory in _STANDARD_DIRS:
                path = self.root / directory
                path.mkdir(parents=True, exist_ok=True)
                watcher.add(str(path))
        except BaseException:
            watcher.close()
            raise
        counter = itertools.count(max(start_revision, self._revision + 1))
        try:
            async for paths in watcher.changes():
                keys = {k for p in paths if (k := self.key_of(Path(p))) is not None}
                if not keys:
                    continue
                values = await asyncio.to_thread(self._read_many, sorted(keys))
                batch = []
                for key, value, changed in values:
                    self._revision = next(counter)
                    kind = EventKind.DELETE if value is None else EventKind.PUT
                    batch.append(Event(kind, key, value, self._revision, changed))
                yield batch
        except Overflow as exc:
            raise ResyncNeeded(f"{exc}; reloading the store") from None

    async def try_lock(self, name: str, ttl: int) -> FileLock | None:
        # One machine shares a file store: an flock on a lock file is enough,
        # and the kernel drops it when the holder dies (no expiry needed).
        path = self.root / LOCKS.rstrip("/") / f"{name.replace('*', '_')}.lock"

        def take() -> int | None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            return fd

        fd = await asyncio.to_thread(take)
        return None if fd is None else FileLock(self, fd)

    # --- debris of interrupted writes ---------------------------------------------------
    def _temp_files(self) -> list[Path]:
        """Temporary files of writes (``_write``) in the store's directories."""
        found = []
        for directory, subdirs, files in os.walk(self.root):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            found += [Path(directory, f) for f in files if f.startswith(_TMP_PREFIX)]
        return found

    async def leftovers(self) -> list[str]:
        found = await asyncio.to_thread(self._temp_files)
        return [f"{path}: a temporary file left by an interrupted write (the entry it was for kept its "
                "previous version); `edge serve` removes it at start" for path in sorted(found)]

    async def recover(self) -> list[str]:
        """Remove temporary files of writes that died (SIGKILL, power loss).

        Listed first, removed under the write lock: every command's writes that
        were in flight when the list was made are over by the time the lock is
        ours, so what is left is dead. (An unlocked write, an ACME answer from
        another process, that still finds its file gone fails and is retried.)"""
        found = await asyncio.to_thread(self._temp_files)
        if not found:
            return []
        removed = []
        async with self.write_lock():
            for path in found:
                try:
                    path.unlink()
                    removed.append(str(path))
                except FileNotFoundError:
                    pass
        return removed

    async def check(self) -> list[str]:
        if not self.root.exists():
            return []  # created on first write
        if not os.access(self.root, os.R_OK | os.X_OK):
            return [f"store directory {self.root} is not readable by this user"]
        return []
