"""The ``etcd`` store, for fleets: every node follows one etcd cluster.

Keys live under a prefix (``/edge/`` by default) with the same layout as the
file store. A node loads a snapshot at revision R in pages (never one giant
range), then watches from R+1; after a disconnect it resumes from the last
revision it applied, and when that revision was compacted it reloads in full
(``ResyncNeeded``). No update is missed: every change has a revision, and the
watch starts right after the last one applied.

A page is a range bounded near its keys, not ``[key, end of prefix)`` with a
limit: etcd 3.4 collects every revision of a range before it applies the
limit (``mvcc.rangeKeys``), so each such page cost as much as the whole
prefix, and a snapshot of N keys cost N²/(2 PAGE) keys counted (85 ms a
page at 200k keys, 12-14 s of a first load at 100k names, and every other
read queued behind it).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import aetcd
from aetcd import exceptions as etcd_errors
from aetcd import rpc

from edge.store.base import LOCKS, Event, EventKind, Lock, ResyncNeeded, Store, StoreError

log = logging.getLogger(__name__)

# Keys per range request while loading a snapshot. A bundle is at most 64 KiB
# (SPEC §3), so a page is at most 32 MiB: under the receive limit set below
# (gRPC's default, 4 MiB, is what ~3,000 small bundles already exceed).
PAGE = 500
MAX_MESSAGE = 64 * 1024 * 1024
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's prefix range)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _shared(a: bytes, b: bytes) -> int:
    """How many leading bytes ``a`` and ``b`` have in common."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class EtcdLock(Lock):
    def __init__(self, store: EtcdStore, key: bytes, token: bytes, lease: object) -> None:
        self.store, self.key, self.token, self.lease = store, key, token, lease

    async def put_if_held(self, key: str, value: bytes, *, secret: bool = False) -> bool:
        """One transaction: the write happens only if the lock key still holds our token."""
        client = self.store.client
        txn = client.transactions
        try:
            done, _ = await client.transaction(
                compare=[txn.value(self.key) == self.token],
                success=[txn.put(self.store._key(key), value)],
                failure=[],
            )
        except etcd_errors.ClientError as exc:
            raise self.store._error(exc) from None
        return bool(done)

    async def refresh(self) -> bool:
        try:
            await self.lease.refresh()  # type: ignore[attr-defined]
            current = await self.store.client.get(self.key)
        except etcd_errors.ClientError:
            return False
        return current is not None and current.value == self.token

    async def release(self) -> None:
        client = self.store.client
        txn = client.transactions
        try:
            await client.transaction(compare=[txn.value(self.key) == self.token],
                                     success=[txn.delete(self.key)], failure=[])
            await self.lease.revoke()  # type: ignore[attr-defined]
        except etcd_errors.ClientError:
            pass  # the lease expires by itself


class EtcdStore(Store):
    resumable = True

    def __init__(self, endpoints: tuple[str, ...], prefix: str = "/edge/", timeout: int = 5) -> None:
        host, _, port = endpoints[0].rpartition(":")
        self.endpoint = endpoints[0]
        self.prefix = prefix.encode()
        self.client = aetcd.Client(host=host or "127.0.0.1", port=int(port or 2379), timeout=timeout,
                                   options={"grpc.max_receive_message_length": MAX_MESSAGE})
        self._revision = 0

    def _key(self, key: str) -> bytes:
        return self.prefix + key.encode()

    def _unkey(self, raw: bytes) -> str:
        return raw[len(self.prefix) :].decode()

    def _error(self, exc: BaseException) -> StoreError:
        """One line an operator can act on, whatever gRPC or aetcd raised."""
        details = getattr(exc, "details", None)
        text = details() if callable(details) else str(exc)
        code = getattr(exc, "code", None)
        kind = code().name if callable(code) else exc.__class__.__name__
        one_line = " ".join(str(text or kind).split())
        return StoreError(
            f"etcd at {self.endpoint}: {kind}: {one_line} (check [store.etcd] endpoints and that etcd runs)"
        )

    # --- Store ----------------------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        try:
            result = await self.client.get(self._key(key))
        except etcd_errors.ClientError as exc:
            raise self._error(exc) from None
        return None if result is None else result.value

    async def put(self, key: str, value: bytes, *, secret: bool = False) -> None:
        # ``secret``: etcd protects values with its own authentication and TLS;
        # nothing more to do per key here.
        try:
            await self.client.put(self._key(key), value)
        except etcd_errors.ClientError as exc:
            raise self._error(exc) from None

    async def delete(self, key: str) -> bool:
        try:
            result = await self.client.delete(self._key(key))
        except etcd_errors.ClientError as exc:
            raise self._error(exc) from None
        return result is not None

    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """One read-only transaction of point ranges: one round trip, one revision
        (a handshake for a name not loaded yet waits on this, not on ten gets)."""
        out: dict[str, bytes] = {}
        for first in range(0, len(keys), MAX_TXN_OPS):
            ops = [rpc.RequestOp(request_range=rpc.RangeRequest(key=self._key(key)))
                   for key in keys[first : first + MAX_TXN_OPS]]
            try:
                response = await self.client.kvstub.Txn(rpc.TxnRequest(success=ops), timeout=self.client._timeout,
                                                        metadata=self.client.metadata)
            except Exception as exc:  # grpc errors: the store is unreachable
                raise self._error(exc) from None
            for each in response.responses:
                for kv in each.response_range.kvs:
                    out[self._unkey(kv.key)] = kv.value
        return out

    async def _pages(self, prefix: bytes, revision: int = 0) -> AsyncIterator[tuple[int, list]]:
        """(revision, key-values) pages of a prefix, all read at one revision.

        Each range ends where the keys sharing the start's first ``depth``
        bytes end (see the module doc): after a full page, ``depth`` is what
        its middle and last keys share, so the next range holds about as
        many keys as half a page's neighbourhood; after a range read whole
        with under a quarter page, one byte less, so the ranges widen again
        past the end of a group of keys. The first range, ``depth`` = the
        prefix, is the whole prefix: nothing is known of the keys yet (one
        range that etcd counts in full, sent first: edge.store.follower)."""
        start, end = prefix, _range_end(prefix)
        depth = len(prefix)
        first = True
        while True:
            bound = _range_end(start[:depth])
            # Built here: aetcd 1.0's request builder drops `limit` and `revision`
            # (a TODO in its source), which made every snapshot one unbounded range.
            request = rpc.RangeRequest(key=start, range_end=bound, limit=PAGE, revision=revision)
            try:
                response = await self.client.kvstub.Range(request, timeout=self.client._timeout,
                                                          metadata=self.client.metadata)
            except Exception as exc:  # grpc errors: the store is unreachable
                raise self._error(exc) from None
            revision = revision or response.header.revision
            kvs = list(response.kvs)
            if kvs or first:  # the first, even empty: its revision is the snapshot's
                yield revision, kvs
            first = False
            if response.more and kvs:
                start = kvs[-1].key + b"\0"
                depth = max(len(prefix), _shared(kvs[len(kvs) // 2].key, kvs[-1].key))
            elif bound == end:
                return
            else:
                # A bound that carried past 0xFF bytes is shorter: its range is one level up already.
                start, depth = bound, min(depth, len(bound))
                if 4 * len(kvs) < PAGE:
                    depth = max(len(prefix), depth - 1)

    async def items(self, prefix: str) -> dict[str, bytes]:
        await self._connect()
        out = {}
        async for _revision, kvs in self._pages(self._key(prefix)):
            out.update((self._unkey(kv.key), kv.value) for kv in kvs)
        return out

    async def snapshot(self) -> AsyncIterator[tuple[str, bytes]]:  # type: ignore[override]
        await self._connect()
        async for revision, kvs in self._pages(self.prefix):
            self._revision = revision
            for kv in kvs:
                yield self._unkey(kv.key), kv.value

    @property
    def revision(self) -> int:
        return self._revision

    async def watch(self, start_revision: int) -> AsyncIterator[list[Event]]:  # type: ignore[override]
        await self._connect()
        try:
            watch = await self.client.watch_prefix(self.prefix, start_revision=max(start_revision, 1))
            async for item in watch:
                kv = item.kv
                kind = EventKind.PUT if item.kind == "PUT" else EventKind.DELETE
                self._revision = max(self._revision, kv.mod_revision)
                yield [Event(kind, self._unkey(kv.key), kv.value if kind is EventKind.PUT else None, kv.mod_revision)]
        except etcd_errors.RevisionCompactedError as exc:
            raise ResyncNeeded(f"revision {start_revision} was compacted ({exc}); reloading in full") from None
        except etcd_errors.ClientError as exc:
            raise self._error(exc) from None

    async def put_expiring(self, key: str, value: bytes, ttl: int, *, secret: bool = False) -> None:
        # etcd has no file modes: access to the whole keyspace is what protects secrets.
        try:
            await self._connect()
            lease = await self.client.lease(ttl)
            await self.client.put(self._key(key), value, lease=lease)
        except etcd_errors.ClientError as exc:
            raise self._error(exc) from None

    async def try_lock(self, name: str, ttl: int) -> EtcdLock | None:
        """A lease-backed lock: the key exists only while its lease lives."""
        key = self._key(LOCKS + name)
        token = uuid.uuid4().bytes
        try:
            await self._connect()
            lease = await self.client.lease(ttl)
            txn = self.client.transactions
            taken, _ = await self.client.transaction(
                compare=[txn.create(key) == 0],  # nobody holds it
                success=[txn.put(key, token, lease=lease)],
                failure=[],
            )
            if not taken:
                await lease.revoke()
                return None
        except etcd_errors.ClientError as exc:
            raise self._error(exc) from None
        return EtcdLock(self, key, token, lease)

    async def _connect(self) -> None:
        try:
            await self.client.connect()
        except Exception as exc:
            raise self._error(exc) from None

    async def check(self) -> list[str]:
        try:
            await self._connect()
            await self.client.status()
        except (StoreError, etcd_errors.ClientError) as exc:
            return [f"etcd store unreachable: {exc}"]
        return []

    async def close(self) -> None:
        await self.client.close()
