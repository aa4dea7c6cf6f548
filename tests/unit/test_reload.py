"""A full reload (SIGHUP, /v1/reload, a compacted watch) and a change that lands while it reads.

Driven through the follower's interface (``start``, ``reload``) over a store
whose watch delivers a change while the reload's snapshot is reading."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from edge.store.base import Event, EventKind
from edge.store.copywriter import CopyWriter
from edge.store.file import FileStore
from edge.store.follower import StoreFollower
from edge.store.localcopy import LocalCopy


class _RacingStore(FileStore):
    """Its second snapshot returns a key's old value after the watch delivered the new one."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.snapshots = 0
        self.reading = asyncio.Event()  # the reload's snapshot has begun
        self.delivered = asyncio.Event()  # the follower took the watched change

    async def snapshot_stamped(self, known):  # type: ignore[no-untyped-def, override]
        self.snapshots += 1
        if self.snapshots == 1:  # the load at start: an empty store
            return
        self.reading.set()
        await self.delivered.wait()
        yield "domains/www.example.com", b'{"app": "old"}', b""  # read before the change

    async def watch(self, start_revision: int) -> AsyncIterator[list[Event]]:  # type: ignore[override]
        await self.reading.wait()
        yield [Event(EventKind.PUT, "domains/www.example.com", b'{"app": "new"}', 7)]
        self.delivered.set()  # resumed: the batch above was applied
        await asyncio.Event().wait()


def test_a_change_seen_during_a_full_reload_is_not_lost(tmp_path: Path) -> None:
    async def run() -> None:
        store = _RacingStore(tmp_path / "store")
        copy = LocalCopy(tmp_path / "index", "file:/s", rebuild=True)
        writer = CopyWriter(copy)
        follower = StoreFollower(store, copy, writer)
        await follower.start()
        await asyncio.gather(*(t for t in follower.tasks if t is not follower.watch_task))  # loaded
        await asyncio.wait_for(follower.reload(), 5)
        writer.flush()
        assert follower.index.domains.get("www.example.com") == "new"
        assert follower.reloads == 2
        for task in follower.tasks:
            task.cancel()
        await asyncio.gather(*follower.tasks, return_exceptions=True)
        writer.close()

    asyncio.run(run())
