"""A full reload (SIGHUP, /v1/reload, a compacted watch) and a change that lands while it reads."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge import config
from edge.server import Edge
from edge.store.base import Event, EventKind
from edge.store.file import FileStore
from edge.store.index import Index


class _RacingStore(FileStore):
    """Its snapshot returns a key's old value after the watch already delivered the new one."""

    def __init__(self, root: Path, edge: Edge) -> None:
        super().__init__(root)
        self.edge = edge

    async def snapshot(self):  # type: ignore[override]
        # The watch applies a change (what Edge._watch does with each batch)...
        event = Event(EventKind.PUT, "domains/www.example.com", b'{"app": "new"}', 7)
        self.edge.index.apply_watched(event)
        assert self.edge._reload_events is not None
        self.edge._reload_events.append(event)
        # ... after the snapshot had read the key's previous version.
        yield "domains/www.example.com", b'{"app": "old"}'


def test_a_change_seen_during_a_full_reload_is_not_lost(tmp_path: Path) -> None:
    async def run() -> None:
        edge = Edge(config.parse("", tmp_path / "edge.toml"))
        edge.index = Index()
        edge.store = _RacingStore(tmp_path / "store", edge)
        await edge.reload_store()
        assert edge.index.domains["www.example.com"] == "new"
        assert edge._reload_events is None and edge.reloads == 1

    asyncio.run(run())
