"""Open the store a configuration names."""

from __future__ import annotations

from edge.config import Config
from edge.store.base import Store, StoreError
from edge.store.file import FileStore


def open_store(config: Config) -> Store:
    if config.store.backend == "file":
        return FileStore(config.store.path)
    if config.store.backend == "etcd":
        from edge.store.etcd import EtcdStore

        return EtcdStore(config.store.etcd_endpoints, config.store.etcd_prefix)
    raise StoreError(f"unknown store backend {config.store.backend!r}; use \"file\" or \"etcd\"")
