"""The store interface: keys and bytes, a revision, and a stream of changes.

The store is the source of truth shared by the CLI, the admin API and every
running edge process. It knows nothing of certificates or HTTP: values are
bytes, and ``edge.store.index`` gives them meaning.

Key space (the same for every backend):

    apps/<app>                        JSON  {"backends": [...], "force_https": true}
    domains/<domain>                  JSON  {"app": "<app>"}
    certs/<source>-<keytype>/<domain> one JSON header line, then PEM chain + key (secret)
    acme/challenges/<token>           HTTP-01 key authorization (RFC 8555 §8.3)
    acme/tls-alpn/<domain>            TLS-ALPN-01 validation certificate + key (RFC 8737 §3, secret)
    acme/status/<domain>              JSON  what the ACME manager last did for the domain
    acme/account                      the ACME account key, PEM (secret)

``<domain>`` is canonical (see ``edge.names``) and may be ``*.example.com``.
"""

from __future__ import annotations

import asyncio
import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

# The certificate key space is defined with its records (edge.records); named here with the rest.
from edge.records import CERTS as CERTS
from edge.records import cert_key as cert_key
from edge.records import parse_cert_key as parse_cert_key

APPS = "apps/"
DOMAINS = "domains/"
CHALLENGES = "acme/challenges/"
TLS_ALPN = "acme/tls-alpn/"
ACME_STATUS = "acme/status/"
ACME_ACCOUNT = "acme/account"
LOCKS = "locks/"
WRITE_LOCK = "store-writes"  # held by every management write that checks a rule first
WRITE_LOCK_TTL = 30  # s: a dead holder (etcd) frees it after this; a file lock dies with its holder
WRITE_LOCK_WAIT = 20.0  # s: how long a command waits for the others before giving up


class StoreError(RuntimeError):
    """The store cannot be read or written (gone, full, permissions)."""


class ResyncNeeded(StoreError):
    """The watch cannot resume where it stopped (history compacted): reload in full."""


class EventKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    key: str
    value: bytes | None
    revision: int
    changed_at: float = 0.0  # wall-clock time of the change, when the backend knows it


def app_key(app: str) -> str:
    return APPS + app


def domain_key(domain: str) -> str:
    return DOMAINS + domain


def challenge_key(token: str) -> str:
    return CHALLENGES + token


def tls_alpn_key(domain: str) -> str:
    return TLS_ALPN + domain


class Store(ABC):
    """What every backend provides. All methods are safe on the event loop."""

    #: A watch can restart from a past revision (etcd); otherwise (inotify) a
    #: watch that broke may have missed changes and the index is reloaded.
    resumable = False

    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """The values of those of ``keys`` that exist (one round trip where the backend can)."""
        out = {}
        for key in keys:
            value = await self.get(key)
            if value is not None:
                out[key] = value
        return out

    @abstractmethod
    async def put(self, key: str, value: bytes, *, secret: bool = False) -> None:
        """Write atomically; ``secret`` values are readable by the owner only."""

    async def put_many(self, items: list[tuple[str, bytes, bool]]) -> None:
        """Write many (key, value, secret) at once; backends may batch the syncing."""
        for key, value, secret in items:
            await self.put(key, value, secret=secret)

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove ``key``; False when it was not there."""

    @abstractmethod
    async def items(self, prefix: str) -> dict[str, bytes]:
        """Every key under ``prefix`` with its value (small prefixes only)."""

    @abstractmethod
    def snapshot(self) -> AsyncIterator[tuple[str, bytes]]:
        """Every key and value, in pages, for the local copy to load.

        ``revision`` holds the revision the snapshot was taken at once the
        iteration is done; ``watch(revision + 1)`` then misses nothing.
        """

    async def snapshot_stamped(self, known: Callable[[list[str]], Mapping[str, bytes]]
                               ) -> AsyncIterator[tuple[str, bytes | None, bytes]]:
        """Like ``snapshot``, as (key, value, stamp). A backend that can tell
        an entry unchanged without reading it (the file store: mtime, size,
        inode) gives its stamp, and for an entry whose stamp ``known`` (what
        the local copy recorded) already holds, None instead of the value:
        catching up after a restart then reads only what changed. b"": no stamp."""
        async for key, value in self.snapshot():
            yield key, value, b""

    @property
    @abstractmethod
    def revision(self) -> int: ...

    @abstractmethod
    def watch(self, start_revision: int) -> AsyncIterator[list[Event]]:
        """Changes from ``start_revision`` on, in batches, forever."""

    async def check(self) -> list[str]:
        """Problems an operator should hear about (``edge check``); empty when fine."""
        return []

    async def prepare(self) -> None:  # noqa: B027 - an optional hook: most backends need nothing
        """A host's first start (no local copy): make what an empty store needs
        (the file store's directory). Never done later: a store that vanished
        is an outage, not an empty store."""

    async def leftovers(self) -> list[str]:
        """Debris of interrupted writes (``edge check``); empty when none."""
        return []

    async def recover(self) -> list[str]:
        """Remove the debris of interrupted writes (at start); what was removed."""
        return []

    async def close(self) -> None:  # noqa: B027 - an optional hook: most backends hold nothing
        pass

    # --- coordination between nodes (ACME) -------------------------------------------------
    async def put_expiring(self, key: str, value: bytes, ttl: int, *, secret: bool = False) -> None:
        """Write a value that disappears after ``ttl`` seconds (challenge answers).

        Backends without expiry keep it until it is deleted: the writer deletes
        it when done, and a leftover answer does no harm."""
        await self.put(key, value, secret=secret)

    @asynccontextmanager
    async def write_lock(self, wait: float = WRITE_LOCK_WAIT) -> AsyncIterator[Lock]:
        """Hold the store-wide write lock: what is read inside stays true until
        the writes inside are done, for every CLI, admin API and node.

        A rule checked before a write ("the app exists", "the domain is free")
        holds only if nobody writes in between: each such check-then-write runs
        under this lock, so of two racing commands one wins and the other sees
        its result. Polls ``try_lock`` (never blocks a thread: the holder's own
        writes need the thread pool)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        delay = 0.002
        while (lock := await self.try_lock(WRITE_LOCK, WRITE_LOCK_TTL)) is None:
            if loop.time() > deadline:
                raise StoreError(
                    f"another command held the store's write lock for over {wait:.0f} s; try again "
                    "(a stuck one frees it when it exits)"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        try:
            yield lock
        finally:
            await lock.release()

    @abstractmethod
    async def try_lock(self, name: str, ttl: int) -> Lock | None:
        """Take the lock ``name`` without waiting; None when another holder has it.

        The lock expires after ``ttl`` seconds unless refreshed, so a node that
        dies does not hold it forever."""


class Lock(ABC):
    """A held lock. ``put_if_held`` writes only while the lock is still ours."""

    @abstractmethod
    async def put_if_held(self, key: str, value: bytes, *, secret: bool = False) -> bool: ...

    @abstractmethod
    async def refresh(self) -> bool:
        """Extend the lock's life; False when it was lost meanwhile."""

    @abstractmethod
    async def release(self) -> None: ...
