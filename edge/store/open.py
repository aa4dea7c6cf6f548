"""Open the store a configuration names, and the host's local copy of it."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

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


def open_copy(config: Config, *, rebuild: bool) -> LocalCopy:
    """The host's local copy: the index every process serves from.

    ``rebuild``: this process prepares the copy (before any other opens it);
    when it cannot be used where configured (a read-only disk, a directory
    that is not ours), a private one in a temporary directory stands in for
    this run, with one log line: serving needs a copy, keeping it across
    restarts does not. Another process raises ``StoreError``."""
    path = config.store.index_dir
    try:
        return LocalCopy(path, copy_identity(config), rebuild=rebuild)
    except (lmdb.Error, OSError) as exc:
        if not rebuild:
            raise StoreError(f"local copy {path} cannot be read: {exc}") from None
        stand_in = Path(tempfile.mkdtemp(prefix="edge-index-"))
        log.error("local copy %s cannot be used (%s); using %s for this run (it is not kept across restarts)",
                  path, exc, stand_in)
        return LocalCopy(stand_in, copy_identity(config), rebuild=True)
