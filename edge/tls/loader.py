"""Build the TLS context a cache key names, from the store's bundles.

A cache key (``edge.tls.selector.BundleKey``) names each bundle by its record
(domain, source, key type: its store key) and the digest of the stored value
the index accepted.
The loader uses the bytes it kept of that very version when it has them
(delivered by the watch, or built before), without asking the store: a
handshake then neither waits on the store nor fails when it is unreachable
(issue #18, for those names). Otherwise it reads the host's local copy
(``edge.store.localcopy``: what the store held when last seen, on local
disk), and only when the copy does not hold that version, the store; a store
that cannot be read then falls back to the copy's version, if it has one. A
name the index knows therefore never falls to the default certificate
because the store is unreachable. A version OpenSSL refuses (a file damaged inside its PEM) is served
as the last version of that entry that built: the previous version stays in
service.

Kept bytes are bounded (an LRU as large as the context cache): the versions
the watch delivered and the ones contexts were built from.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor

from edge.records import EntryError, entry_digest, parse_cert, split_bundle
from edge.store.base import Store, StoreError
from edge.store.localcopy import LocalCopy
from edge.tls import contexts
from edge.tls.contexts import ContextBuildError
from edge.tls.selector import ContextKey

log = logging.getLogger(__name__)


class _Kept:
    """A bounded LRU of store key -> (digest, value)."""

    def __init__(self, size: int) -> None:
        self.size = max(size, 1)
        self.entries: OrderedDict[str, tuple[int, bytes]] = OrderedDict()

    def put(self, store_key: str, digest: int, value: bytes) -> None:
        self.entries[store_key] = (digest, value)
        self.entries.move_to_end(store_key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def get(self, store_key: str, digest: int | None = None) -> bytes | None:
        held = self.entries.get(store_key)
        if held is None or (digest is not None and held[0] != digest):
            return None
        return held[1]


def _parses(store_key: str, value: bytes) -> bool:
    try:
        parse_cert(store_key, value)
    except EntryError:
        return False
    return True


class ContextLoader:
    def __init__(self, store: Store, executor: Executor, min_version: Callable[[], str], keep: int,
                 copy: LocalCopy | None = None) -> None:
        self.store = store
        self.copy = copy
        self.executor = executor
        self.min_version = min_version  # read at each build: SIGHUP may change it
        self._good = _Kept(keep)  # the last version of each key a context was built from
        self._watched = _Kept(keep)  # the last version of each key the watch delivered (not built yet)
        self.damaged: dict[str, str] = {}  # store key -> why OpenSSL refused its current version

    def remember(self, store_key: str, value: bytes) -> None:
        """``value`` for ``store_key`` came from the store (the watch, or a name
        read on demand while the copy fills): a handshake builds it without reading it again."""
        self._watched.put(store_key, entry_digest(value), value)
        self.damaged.pop(store_key, None)  # a new version: judged when a handshake builds it

    def kept(self, store_key: str, digest: int) -> bytes | None:
        return self._good.get(store_key, digest) or self._watched.get(store_key, digest)

    async def _value(self, store_key: str, digest: int) -> bytes:
        """The stored value of ``store_key`` whose digest is ``digest`` (see the module doc)."""
        kept = self.kept(store_key, digest)
        if kept is not None:
            return kept  # no store round trip: the handshake does not wait on it, nor fail with it
        local = self.copy.get(store_key) if self.copy is not None else None  # µs: a page-cache lookup
        if local is not None and entry_digest(local) == digest:
            return local
        try:
            value = await self.store.get(store_key)
        except StoreError as exc:
            if local is not None and _parses(store_key, local):
                return local  # the store is unreachable: its last version seen is the one to serve
            raise ContextBuildError(f"{store_key}: {exc}") from None
        if value is not None and entry_digest(value) == digest:
            return value
        if value is None:
            raise ContextBuildError(f"{store_key} vanished from the store")
        try:
            parse_cert(store_key, value)  # a newer version the index has not applied yet
        except EntryError as exc:
            raise ContextBuildError(f"{store_key} is damaged ({exc}) and its last good version is unknown") from None
        return value

    async def load(self, key: ContextKey) -> ssl.SSLContext:
        values = []
        for bundle in key:
            store_key = bundle.store_key
            values.append((store_key, await self._value(store_key, bundle.digest)))
        try:
            ctx = await self._build(values)
        except ContextBuildError as exc:
            # A version whose header parses but whose PEM OpenSSL refuses (a
            # file damaged by hand): serve the last version that built, if known.
            for store_key, _ in values:
                self.damaged[store_key] = str(exc)
            earlier = [(k, self._good.get(k)) for k, _ in values]
            if any(value is None for _, value in earlier):
                raise
            log.error("%s: %s; serving its last good version", ", ".join(k for k, _ in values), exc)
            return await self._build(earlier)  # type: ignore[arg-type]
        for store_key, value in values:
            self.damaged.pop(store_key, None)
            self._good.put(store_key, entry_digest(value), value)
        return ctx

    async def _build(self, values: list[tuple[str, bytes]]) -> ssl.SSLContext:
        pems = [split_bundle(value)[1] for _, value in values]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, contexts.build_context, pems, self.min_version())
