"""Linux inotify on the event loop (inotify(7)), for the file store.

Why not watchfiles: its thread wakes every ``step`` ms and hands over the set
of changed paths between polls; under load an update was seen never applied
(a lost event in that hand-over, found by the benchmark's update scenario).
Here the kernel queue is read directly when its descriptor is readable: no
polling thread, no set to clear, and a queue overflow is reported
(``IN_Q_OVERFLOW``) so the caller reloads instead of missing changes.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
from collections.abc import AsyncIterator

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# A renamed-in file (how every write lands), a file written in place (a hand
# edit), and removals.
MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CREATE | IN_MODIFY

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Overflow(Exception):
    """The kernel dropped events: reload everything."""


class Inotify:
    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        self.fd = fd
        self.dirs: dict[int, str] = {}

    def add(self, directory: str) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(directory), MASK)
        if wd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"inotify_add_watch {directory}: {os.strerror(errno)}")
        self.dirs[wd] = directory

    def read(self) -> list[str]:
        """Paths changed since the last read (raises Overflow)."""
        out = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(data):
                wd, mask, _cookie, length = _HEADER.unpack_from(data, pos)
                name = data[pos + _HEADER.size : pos + _HEADER.size + length].rstrip(b"\0")
                pos += _HEADER.size + length
                if mask & IN_Q_OVERFLOW:
                    raise Overflow("inotify queue overflowed")
                if mask & IN_IGNORED or not name:
                    continue
                directory = self.dirs.get(wd)
                if directory is not None:
                    out.append(os.path.join(directory, os.fsdecode(name)))

    def close(self) -> None:
        os.close(self.fd)

    async def changes(self) -> AsyncIterator[list[str]]:
        """Batches of changed paths, as the kernel reports them."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.fd, ready.set)
        try:
            while True:
                await ready.wait()
                ready.clear()
                paths = self.read()
                if paths:
                    yield paths
        finally:
            loop.remove_reader(self.fd)
            self.close()
