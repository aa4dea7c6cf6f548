"""Open the store a configuration names, and the host's local copy of it."""

from __future__ import annotations

import logging

import lmdb

from edge.config import Config
from edge.store.base import Store, StoreError
from edge.store.file import FileStore
from edge.store.localcopy import LocalCopy

log = logging.getLogger(__name__)


def open_store(config: Config) -> Store:
    if config.store.backend == "file":
        return FileStore(config.store.path)
    if config.store.backend == "etcd":
        from edge.store.etcd import EtcdStore

        return EtcdStore(config.store.etcd_endpoints, config.store.etcd_prefix)
    raise StoreError(f"unknown store backend {config.store.backend!r}; use \"file\" or \"etcd\"")


def copy_identity(config: Config) -> str:
    """Which store a local copy reflects: a copy of another one is not served."""
    store = config.store
    if store.backend == "etcd":
        return f"etcd:{','.join(sorted(store.etcd_endpoints))}{store.etcd_prefix}"
    return f"file:{store.path.resolve()}"


def open_copy(config: Config, *, rebuild: bool) -> LocalCopy | None:
    """The host's local copy; None (with one log line) when it cannot be used:
    edge then serves as without it, from memory, following the store."""
    path = config.store.index_dir
    try:
        return LocalCopy(path, copy_identity(config), rebuild=rebuild)
    except (lmdb.Error, OSError) as exc:
        log.error("local copy %s cannot be used (%s); serving without it", path, exc)
        return None
