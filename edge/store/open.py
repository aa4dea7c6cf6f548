"""Open the store a configuration names."""

from __future__ import annotations

from edge.config import Config
from edge.store.base import Store, StoreError
from edge.store.file import FileStore


def open_store(config: Config) -> Store:
    if config.store.backend == "file":
        return FileStore(config.store.path)
    raise StoreError(
        f"store backend {config.store.backend!r} is not available in this build; use backend = \"file\""
    )
