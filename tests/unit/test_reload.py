"""A full reload (SIGHUP, /v1/reload, a compacted watch) and a change that lands while it reads."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge.store.base import Event, EventKind
from edge.store.file import FileStore
from edge.store.follower import StoreFollower
from edge.store.index import Index


class _RacingStore(FileStore):
    """Its snapshot returns a key's old value after the watch already delivered the new one."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.follower: StoreFollower | None = None

    async def snapshot(self):  # type: ignore[override]
        # The watch applies a change (what StoreFollower._watch does with each batch)...
        event = Event(EventKind.PUT, "domains/www.example.com", b'{"app": "new"}', 7)
        assert self.follower is not None
        self.follower._apply([event])
        # ... after the snapshot had read the key's previous version.
        yield "domains/www.example.com", b'{"app": "old"}'


def test_a_change_seen_during_a_full_reload_is_not_lost(tmp_path: Path) -> None:
    async def run() -> None:
        store = _RacingStore(tmp_path / "store")
        follower = store.follower = StoreFollower(store, Index())
        await follower.reload()
        assert follower.index.domains["www.example.com"] == "new"
        assert follower._reload_events is None and follower.reloads == 1

    asyncio.run(run())
